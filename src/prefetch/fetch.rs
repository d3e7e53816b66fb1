//! The download of one image: upstream stream -> `ImageWriter` (hashing while writing,
//! on a thread of its own) -> verified publish. Room is made first so the cache never
//! has to exceed `cache.max_size`, counting the downloads in progress beside this one;
//! an image larger than the cache is refused; a shutdown aborts at the next chunk with
//! nothing published.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

use super::budget::{DownloadBudget, WaitTicket, unknown_size_step};
use super::writer_thread::WriterThread;
use crate::cache::{CacheDriver, CacheError, Expectations, Filling, PrunePolicy};
use crate::config::Config;
use crate::digest::VerifyPolicy;
use crate::image_id::ImageId;
use crate::upstream::{ErrorClass, TransferFloor, Upstream, UpstreamError};

/// How long a shutdown waits for a commit the writer thread has taken: ample for a
/// rename, an fsync and a row on a loaded node, short beside `daemon.shutdown_timeout`.
const PUBLISH_WAIT_AT_SHUTDOWN: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    Published { bytes: u64 },
    AlreadyCached,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("interrupted by shutdown")]
    Cancelled,
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Writing, verifying or publishing, or making room.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The upstream says the image is larger than the whole cache.
    #[error("image is {size} bytes, larger than cache.max_size ({max_size} bytes)")]
    LargerThanCache { size: u64, max_size: u64 },
    /// An image of unknown size turned out larger than the whole cache.
    #[error("image is larger than cache.max_size ({max_size} bytes)")]
    GrewLargerThanCache { max_size: u64 },
    /// An image of unknown size needs more room than the downloads beside it leave.
    #[error(
        "image of unknown size: no room for more than {reserved} bytes beside the downloads in progress"
    )]
    NoRoomBeside { reserved: u64 },
}

impl FetchError {
    /// What becomes of the image; a shutdown (`Cancelled`) is no failure of the image,
    /// and is retried.
    pub fn class(&self) -> ErrorClass {
        match self {
            FetchError::Upstream(e) => e.class(),
            // The bytes were not what the upstream promised (size or checksum).
            FetchError::Cache(CacheError::Verification { .. } | CacheError::TooLarge { .. }) => {
                ErrorClass::Verify
            }
            // Disk full, database outage, another writer: all may pass.
            FetchError::Cache(_) | FetchError::Cancelled | FetchError::NoRoomBeside { .. } => {
                ErrorClass::Retry
            }
            FetchError::LargerThanCache { .. } | FetchError::GrewLargerThanCache { .. } => {
                ErrorClass::Permanent
            }
        }
    }
}

/// Limits a download obeys, read from the configuration when it starts.
#[derive(Debug, Clone, Copy)]
pub struct FetchLimits {
    pub max_size: u64,
    pub min_free_disk: Option<u64>,
    pub max_bytes_per_second: Option<u64>,
    /// The upstream's transfer floor: bytes per second over a window of waiting.
    pub min_bytes_per_second: Option<u64>,
    pub min_rate_window: Duration,
    /// Which of the upstream's digests are computed and checked (`prefetcher.verify`).
    pub verify: VerifyPolicy,
}

/// Here rather than a `Config` method: `prefetch` stands above `config`.
impl From<&Config> for FetchLimits {
    fn from(config: &Config) -> Self {
        FetchLimits {
            max_size: config.cache.max_size,
            min_free_disk: config.pruner.min_free_disk,
            max_bytes_per_second: config.prefetcher.max_bytes_per_second,
            min_bytes_per_second: config.prefetcher.min_bytes_per_second,
            min_rate_window: config.prefetcher.min_rate_window,
            verify: config.prefetcher.verify,
        }
    }
}

/// Downloads `id` from `upstream` into the cache, registered in the driver's fills
/// while it runs (readers of the image follow it); a download of `id` already
/// registered in this process is not started beside it (`AlreadyBeingWritten`).
pub async fn fetch_into_cache(
    driver: &CacheDriver,
    upstream: &Upstream,
    id: &ImageId,
    limits: FetchLimits,
    cancel: &CancellationToken,
    budget: &DownloadBudget,
) -> Result<Fetched, FetchError> {
    let Ok(filling) = driver.fills().register(id) else {
        return Err(CacheError::AlreadyBeingWritten(id.clone()).into());
    };
    fetch_registered(driver, upstream, id, limits, cancel, budget, filling).await
}

/// `fetch_into_cache` for a download registered already (a read-through fill, which
/// registers before it claims): its readers hear of its progress and of its end.
pub(crate) async fn fetch_registered(
    driver: &CacheDriver,
    upstream: &Upstream,
    id: &ImageId,
    limits: FetchLimits,
    cancel: &CancellationToken,
    budget: &DownloadBudget,
    filling: Filling,
) -> Result<Fetched, FetchError> {
    let fetched = download(driver, upstream, id, limits, cancel, budget, &filling).await;
    filling.finish(match &fetched {
        Ok(Fetched::Published { bytes }) => Ok(*bytes),
        Ok(Fetched::AlreadyCached) => Err("already cached".to_owned()),
        Err(e) => Err(e.to_string()),
    });
    fetched
}

async fn download(
    driver: &CacheDriver,
    upstream: &Upstream,
    id: &ImageId,
    limits: FetchLimits,
    cancel: &CancellationToken,
    budget: &DownloadBudget,
    filling: &Filling,
) -> Result<Fetched, FetchError> {
    // Taken on the first wait for room, kept until room is granted; with the size the
    // upstream gave then.
    let mut waiting: Option<(WaitTicket<'_>, u64)> = None;
    let (meta, mut stream, mut reservation) = loop {
        // Checked again after waiting for room: the image may have arrived meanwhile.
        if driver.cached(id).await {
            return Ok(Fetched::AlreadyCached);
        }
        // Listening before asking, so a release in between is not missed.
        let changed = budget.space.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        // While others wait ahead or there is still no room, asking the upstream again
        // would only open a connection to hang up: keep waiting.
        if let Some((ticket, size)) = &waiting
            && !budget.space.could_reserve(*size, limits.max_size, ticket)
        {
            tokio::select! {
                _ = cancel.cancelled() => return Err(FetchError::Cancelled),
                () = changed => continue,
            }
        }
        let (meta, stream) = tokio::select! {
            _ = cancel.cancelled() => return Err(FetchError::Cancelled),
            r = upstream.fetch(id) => r?,
        };
        crate::failpoint::hit("download:connected");
        filling.described(meta.size, meta.md5.as_deref());
        // An unknown size is reserved a step at a time as the bytes arrive.
        let size = meta
            .size
            .unwrap_or_else(|| unknown_size_step(limits.max_size));
        if size > limits.max_size {
            return Err(FetchError::LargerThanCache {
                size,
                max_size: limits.max_size,
            });
        }
        let ticket = waiting.as_ref().map(|(t, _)| t);
        if let Some(r) = budget.space.try_reserve(size, limits.max_size, ticket) {
            break (meta, stream, r);
        }
        // No room beside the downloads in progress, or others wait ahead: hang up rather
        // than hold an idle connection, and ask again when the reservations change.
        drop(stream);
        match &mut waiting {
            Some((_, known)) => *known = size,
            None => {
                info!(image_id = %id, bytes = size, reserved = budget.space.reserved(), "waiting for downloads in progress to leave room in the cache");
                waiting = Some((budget.space.wait_in_line(), size));
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(FetchError::Cancelled),
            () = changed => {}
        }
    };
    drop(waiting);
    // Make room for this image and the others in progress first, so the cache never
    // exceeds max_size because of them.
    make_room(driver, &limits, reservation.total).await?;
    let expectations = Expectations {
        size: meta.size,
        md5: meta.md5,
        os_hash: meta.os_hash,
        verify: limits.verify,
    };
    // Every file operation of the write happens on the writer's own thread.
    let mut writer = WriterThread::open(driver, id, expectations, Some(filling.progress())).await?;
    let mut floor = TransferFloor::new(limits.min_bytes_per_second, limits.min_rate_window);
    loop {
        let chunk = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                writer.abandon("interrupted by shutdown").await;
                return Err(FetchError::Cancelled);
            }
            c = async {
                match &mut floor {
                    Some(floor) => floor.next_chunk(&mut stream).await,
                    None => stream.next_chunk().await,
                }
            } => c,
        };
        let chunk = match chunk {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                writer.abort(&e.to_string()).await;
                return Err(e.into());
            }
        };
        let len = chunk.len();
        let before = writer.bytes_written();
        // Of unknown size: the chunk goes to disk only within the reservation, grown
        // (and room made for it) as needed.
        let needed = before.saturating_add(len as u64);
        if meta.size.is_none() && needed > reservation.bytes() {
            if needed > limits.max_size {
                writer.abort("larger than the cache").await;
                return Err(FetchError::GrewLargerThanCache {
                    max_size: limits.max_size,
                });
            }
            let more = (needed - reservation.bytes()).max(unknown_size_step(limits.max_size));
            let more = more.min(limits.max_size - reservation.bytes());
            let Some(total) = reservation.grow(more, limits.max_size) else {
                writer
                    .abort("no room beside the downloads in progress")
                    .await;
                return Err(FetchError::NoRoomBeside {
                    reserved: reservation.bytes(),
                });
            };
            make_room(driver, &limits, total).await?;
        }
        // Waits while the disk is behind, but a shutdown need not wait for the disk.
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                writer.abandon("interrupted by shutdown").await;
                return Err(FetchError::Cancelled);
            }
            written = writer.write(chunk) => written?,
        }
        if let Some(size) = meta.size
            && before < size / 2
            && writer.bytes_written() >= size / 2
        {
            crate::failpoint::hit("download:half");
        }
        if let Some(rate) = limits.max_bytes_per_second {
            budget.bandwidth.pace(len, rate).await;
        }
    }
    // The thread may still be writing queued chunks: a shutdown need not wait for them
    // (dropped before it took the commit, the thread moves the bytes to invalid/).
    let mut committing = tokio::select! {
        biased;
        _ = cancel.cancelled() => return Err(FetchError::Cancelled),
        committing = writer.start_commit() => committing?,
    };
    // Once the thread takes the commit it publishes a verified image whatever happens
    // here. A shutdown withdraws a commit not yet taken (a disk behind its queued
    // chunks is not waited for); one taken is waited for (a rename, an fsync and a
    // row), so a clean stop never leaves a published file without its row or with its
    // queue entry. Only a disk that stops answering mid-publish is given up on after
    // `PUBLISH_WAIT_AT_SHUTDOWN`, leaving what a crash would, which the next start's
    // reconcile repairs.
    let published = tokio::select! {
        biased;
        published = committing.published() => published?,
        _ = cancel.cancelled() => {
            if committing.withdraw() {
                return Err(FetchError::Cancelled);
            }
            match tokio::time::timeout(PUBLISH_WAIT_AT_SHUTDOWN, committing.published()).await {
                Ok(published) => published?,
                Err(_) => return Err(FetchError::Cancelled),
            }
        }
    };
    // Published, the image counts in the cache's size: its reservation can go.
    drop(reservation);
    Ok(Fetched::Published {
        bytes: published.size,
    })
}

/// Prunes so that the cache plus `reserved` (the downloads in progress, this one
/// included) fits in `max_size`.
async fn make_room(
    driver: &CacheDriver,
    limits: &FetchLimits,
    reserved: u64,
) -> Result<(), FetchError> {
    driver
        .prune(PrunePolicy {
            max_size: limits.max_size.saturating_sub(reserved),
            low_watermark: None,
            min_free_disk: limits.min_free_disk,
        })
        .await?;
    Ok(())
}
