//! The prefetch path for one image: upstream stream -> `ImageWriter` (hashing while
//! writing) -> verified publish. Room is made first so the cache never has to exceed
//! `cache.max_size`, counting the downloads in progress beside this one; an image larger
//! than the cache is refused; a shutdown aborts at the next chunk with nothing published.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::cache::{CacheDriver, CacheError, Expectations, PrunePolicy};
use crate::image_id::ImageId;
use crate::upstream::{Upstream, UpstreamError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    Published { bytes: u64 },
    AlreadyCached,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("interrupted by shutdown")]
    Cancelled,
    #[error("{0}")]
    Retry(String),
    #[error("{0}")]
    Permanent(String),
    /// The bytes were not what the upstream promised (size or checksum).
    #[error("{0}")]
    Verify(String),
}

impl From<UpstreamError> for FetchError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Retry(m) => FetchError::Retry(m),
            UpstreamError::Permanent(m) => FetchError::Permanent(m),
        }
    }
}

impl From<CacheError> for FetchError {
    fn from(e: CacheError) -> Self {
        match e {
            CacheError::Verification { .. } | CacheError::TooLarge { .. } => {
                FetchError::Verify(e.to_string())
            }
            // Disk full, database outage, another writer: all may pass.
            other => FetchError::Retry(other.to_string()),
        }
    }
}

/// Limits a download obeys, read from the configuration when it starts.
#[derive(Debug, Clone, Copy)]
pub struct FetchLimits {
    pub max_size: u64,
    pub min_free_disk: Option<u64>,
    pub max_bytes_per_second: Option<u64>,
}

/// What every download of this process shares.
#[derive(Debug, Default)]
pub struct DownloadBudget {
    pub bandwidth: RateLimiter,
    pub space: SpaceReservations,
}

/// A bandwidth cap shared by every download: each chunk reserves its share of time.
#[derive(Debug, Default)]
pub struct RateLimiter {
    next_free: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// Waits as long as `bytes` take at `per_second`.
    pub async fn pace(&self, bytes: usize, per_second: u64) {
        let cost = Duration::from_secs_f64(bytes as f64 / per_second as f64);
        let until = {
            let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
            let start = next.map_or(Instant::now(), |n| n.max(Instant::now()));
            let end = start + cost;
            *next = Some(end);
            end
        };
        tokio::time::sleep_until(until).await;
    }
}

/// Cache space promised to the downloads in progress. Each download of a known size
/// reserves it before making room, and makes room for every reservation, not only its
/// own: two downloads that each fit alone would otherwise together push the cache past
/// `max_size`. A download that does not fit beside the others waits for one to end.
#[derive(Debug, Default)]
pub struct SpaceReservations {
    reserved: Mutex<u64>,
    released: Notify,
}

/// `bytes` of cache space held for one download until dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    ledger: &'a SpaceReservations,
    bytes: u64,
    /// Everything reserved when this reservation was granted, itself included.
    pub total: u64,
}

impl SpaceReservations {
    /// Reserves `bytes` if everything reserved then still fits in `max_size`.
    pub fn try_reserve(&self, bytes: u64, max_size: u64) -> Option<Reservation<'_>> {
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let total = reserved.checked_add(bytes).filter(|t| *t <= max_size)?;
        *reserved = total;
        Some(Reservation {
            ledger: self,
            bytes,
            total,
        })
    }

    /// Bytes reserved now.
    pub fn reserved(&self) -> u64 {
        *self.reserved.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        {
            let mut reserved = self
                .ledger
                .reserved
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            *reserved -= self.bytes;
        }
        self.ledger.released.notify_waiters();
    }
}

/// Downloads `id` from `upstream` into the cache.
pub async fn fetch_into_cache(
    driver: &CacheDriver,
    upstream: &Upstream,
    id: &ImageId,
    limits: FetchLimits,
    cancel: &CancellationToken,
    budget: &DownloadBudget,
) -> Result<Fetched, FetchError> {
    let (meta, mut stream, reservation) = loop {
        // Checked again after waiting for room: the image may have arrived meanwhile.
        if driver.is_cached(id) {
            return Ok(Fetched::AlreadyCached);
        }
        // Listening before asking, so a release in between is not missed.
        let released = budget.space.released.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        let (meta, stream) = tokio::select! {
            _ = cancel.cancelled() => return Err(FetchError::Cancelled),
            r = upstream.fetch(id) => r?,
        };
        crate::failpoint::hit("download:connected");
        let Some(size) = meta.size else {
            break (meta, stream, None);
        };
        if size > limits.max_size {
            return Err(FetchError::Permanent(format!(
                "image is {size} bytes, larger than cache.max_size ({} bytes)",
                limits.max_size
            )));
        }
        if let Some(r) = budget.space.try_reserve(size, limits.max_size) {
            break (meta, stream, Some(r));
        }
        // The downloads in progress leave no room for this one: hang up rather than hold
        // an idle connection, and ask again once one of them ends.
        drop(stream);
        info!(image_id = %id, bytes = size, reserved = budget.space.reserved(), "waiting for downloads in progress to leave room in the cache");
        tokio::select! {
            _ = cancel.cancelled() => return Err(FetchError::Cancelled),
            () = released => {}
        }
    };
    if let Some(reservation) = &reservation {
        // Make room for this image and the others in progress first, so the cache never
        // exceeds max_size because of them.
        driver
            .prune(PrunePolicy {
                max_size: limits.max_size - reservation.total,
                low_watermark: None,
                min_free_disk: limits.min_free_disk,
            })
            .await?;
    }
    let expectations = Expectations {
        size: meta.size,
        md5: meta.md5,
        os_hash: meta.os_hash,
    };
    let mut writer = driver.open_for_write(id, expectations).await?;
    loop {
        let chunk = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                writer.abort("interrupted by shutdown");
                return Err(FetchError::Cancelled);
            }
            c = stream.next_chunk() => c,
        };
        let chunk = match chunk {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                writer.abort(&e.to_string());
                return Err(e.into());
            }
        };
        let len = chunk.len();
        let before = writer.bytes_written();
        writer.write_bytes(chunk)?;
        if let Some(size) = meta.size
            && before < size / 2
            && writer.bytes_written() >= size / 2
        {
            crate::failpoint::hit("download:half");
        }
        if meta.size.is_none() && writer.bytes_written() > limits.max_size {
            writer.abort("larger than the cache");
            return Err(FetchError::Permanent(format!(
                "image is larger than cache.max_size ({} bytes)",
                limits.max_size
            )));
        }
        if let Some(rate) = limits.max_bytes_per_second {
            budget.bandwidth.pace(len, rate).await;
        }
    }
    let published = writer.commit().await?;
    // Published, the image counts in the cache's size: its reservation can go.
    drop(reservation);
    Ok(Fetched::Published {
        bytes: published.size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_fit_together_and_are_returned_on_drop() {
        let space = SpaceReservations::default();
        let first = space.try_reserve(600, 1000).unwrap();
        assert_eq!(first.total, 600);
        assert!(space.try_reserve(600, 1000).is_none(), "600 + 600 > 1000");
        let second = space.try_reserve(400, 1000).unwrap();
        assert_eq!(second.total, 1000);
        drop(first);
        assert_eq!(space.reserved(), 400);
        assert_eq!(space.try_reserve(600, 1000).unwrap().total, 1000);
        drop(second);
        assert_eq!(space.reserved(), 0);
        let everything = space.try_reserve(u64::MAX, u64::MAX).unwrap();
        assert!(space.try_reserve(1, u64::MAX).is_none(), "no overflow");
        drop(everything);
        assert_eq!(space.reserved(), 0);
    }
}
