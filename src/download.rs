//! The prefetch path for one image: upstream stream -> `ImageWriter` (hashing while
//! writing) -> verified publish. Room is made first so the cache never has to exceed
//! `cache.max_size`; an image larger than the cache is refused; a shutdown aborts at the
//! next chunk with nothing published.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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

/// Downloads `id` from `upstream` into the cache.
pub async fn fetch_into_cache(
    driver: &CacheDriver,
    upstream: &Upstream,
    id: &ImageId,
    limits: FetchLimits,
    cancel: &CancellationToken,
    limiter: &RateLimiter,
) -> Result<Fetched, FetchError> {
    if driver.is_cached(id) {
        return Ok(Fetched::AlreadyCached);
    }
    let (meta, mut stream) = tokio::select! {
        _ = cancel.cancelled() => return Err(FetchError::Cancelled),
        r = upstream.fetch(id) => r?,
    };
    crate::failpoint::hit("download:connected");
    if let Some(size) = meta.size {
        if size > limits.max_size {
            return Err(FetchError::Permanent(format!(
                "image is {size} bytes, larger than cache.max_size ({} bytes)",
                limits.max_size
            )));
        }
        // Make room first, so the cache never exceeds max_size because of us.
        driver
            .prune(PrunePolicy {
                max_size: limits.max_size - size,
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
            limiter.pace(len, rate).await;
        }
    }
    let published = writer.commit().await?;
    Ok(Fetched::Published {
        bytes: published.size,
    })
}
