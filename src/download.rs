//! The prefetch path for one image: upstream stream -> `ImageWriter` (hashing while
//! writing) -> verified publish. Room is made first so the cache never has to exceed
//! `cache.max_size`, counting the downloads in progress beside this one; an image larger
//! than the cache is refused; a shutdown aborts at the next chunk with nothing published.

mod writer_thread;

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cache::{CacheDriver, CacheError, Expectations, PrunePolicy, QueuedImage};
use crate::clock;
use crate::config::Config;
use crate::image_id::ImageId;
use crate::upstream::{TransferFloor, Upstream, UpstreamError};
use writer_thread::WriterThread;

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
            UpstreamError::Verify(m) => FetchError::Verify(m),
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
    /// The upstream's transfer floor: bytes per second over a window of waiting.
    pub min_bytes_per_second: Option<u64>,
    pub min_rate_window: Duration,
}

/// Here rather than a `Config` method: `download` stands above `config`.
impl From<&Config> for FetchLimits {
    fn from(config: &Config) -> Self {
        FetchLimits {
            max_size: config.cache.max_size,
            min_free_disk: config.pruner.min_free_disk,
            max_bytes_per_second: config.prefetcher.max_bytes_per_second,
            min_bytes_per_second: config.prefetcher.min_bytes_per_second,
            min_rate_window: config.prefetcher.min_rate_window,
        }
    }
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

/// Cache space promised to the downloads in progress. Each download reserves its size
/// before making room (one of unknown size reserves [`unknown_size_step`] at a time, as
/// its bytes arrive), and makes room for every reservation, not only its own: two downloads that each fit alone would otherwise together push the cache past
/// `max_size`. A download that does not fit beside the others waits for one to end, in
/// turn: while one waits, later downloads wait behind it even if they would fit, so a
/// large image is not passed over forever by a stream of small ones.
#[derive(Debug, Default)]
pub struct SpaceReservations {
    ledger: Mutex<Ledger>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct Ledger {
    reserved: u64,
    /// Tickets of the downloads waiting for room, oldest first.
    waiting: std::collections::VecDeque<u64>,
    next_ticket: u64,
}

impl Ledger {
    /// Everything reserved with `bytes` added, if that fits in `max_size` and it is the
    /// turn of `ticket` (a newcomer, `None`, has its turn only while nobody waits).
    fn grant(&self, bytes: u64, max_size: u64, ticket: Option<u64>) -> Option<u64> {
        let my_turn = self
            .waiting
            .front()
            .is_none_or(|first| Some(*first) == ticket);
        if !my_turn {
            return None;
        }
        self.reserved.checked_add(bytes).filter(|t| *t <= max_size)
    }
}

/// `bytes` of cache space held for one download until dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    space: &'a SpaceReservations,
    bytes: u64,
    /// Everything reserved when this reservation was granted, itself included.
    pub total: u64,
}

impl Reservation<'_> {
    /// Bytes this reservation holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Grows this reservation by `bytes` if everything reserved then still fits in
    /// `max_size` (a download in progress does not wait in line: it holds a
    /// connection). Returns everything reserved, itself included.
    pub fn grow(&mut self, bytes: u64, max_size: u64) -> Option<u64> {
        let mut ledger = self.space.lock();
        let total = ledger
            .reserved
            .checked_add(bytes)
            .filter(|t| *t <= max_size)?;
        ledger.reserved = total;
        self.bytes += bytes;
        self.total = total;
        Some(total)
    }
}

/// How much a download of unknown size (no `Content-Length`, Glance metadata without
/// `size`) reserves at a time: a 64th of the cache, at least 1 MiB, at most the cache.
/// Small enough not to evict much more than the image needs, large enough that a big
/// image makes room a few dozen times, not at every chunk.
pub fn unknown_size_step(max_size: u64) -> u64 {
    (max_size / 64).max(1 << 20).min(max_size)
}

/// A download's place in the line for room; leaves the line when dropped.
#[derive(Debug)]
pub struct WaitTicket<'a> {
    space: &'a SpaceReservations,
    number: u64,
}

impl SpaceReservations {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `bytes` if everything reserved then still fits in `max_size` and no
    /// download waits ahead: none waits, or `ticket` is the first in line.
    pub fn try_reserve(
        &self,
        bytes: u64,
        max_size: u64,
        ticket: Option<&WaitTicket<'_>>,
    ) -> Option<Reservation<'_>> {
        let mut ledger = self.lock();
        let total = ledger.grant(bytes, max_size, ticket.map(|t| t.number))?;
        ledger.reserved = total;
        Some(Reservation {
            space: self,
            bytes,
            total,
        })
    }

    /// Whether `try_reserve(bytes, max_size, Some(ticket))` would succeed now.
    pub fn could_reserve(&self, bytes: u64, max_size: u64, ticket: &WaitTicket<'_>) -> bool {
        self.lock()
            .grant(bytes, max_size, Some(ticket.number))
            .is_some()
    }

    /// Joins the line of downloads waiting for room.
    pub fn wait_in_line(&self) -> WaitTicket<'_> {
        let mut ledger = self.lock();
        let number = ledger.next_ticket;
        ledger.next_ticket += 1;
        ledger.waiting.push_back(number);
        WaitTicket {
            space: self,
            number,
        }
    }

    /// Bytes reserved now.
    pub fn reserved(&self) -> u64 {
        self.lock().reserved
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.space.lock().reserved -= self.bytes;
        self.space.changed.notify_waiters();
    }
}

impl Drop for WaitTicket<'_> {
    fn drop(&mut self) {
        self.space.lock().waiting.retain(|n| *n != self.number);
        // The next in line may now go.
        self.space.changed.notify_waiters();
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
        // An unknown size is reserved a step at a time as the bytes arrive.
        let size = meta
            .size
            .unwrap_or_else(|| unknown_size_step(limits.max_size));
        if size > limits.max_size {
            return Err(FetchError::Permanent(format!(
                "image is {size} bytes, larger than cache.max_size ({} bytes)",
                limits.max_size
            )));
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
    };
    // Every file operation of the write happens on the writer's own thread.
    let mut writer = WriterThread::open(driver, id, expectations).await?;
    let mut floor = TransferFloor::new(limits.min_bytes_per_second, limits.min_rate_window);
    loop {
        let chunk = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                writer.abandon("interrupted by shutdown");
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
                return Err(FetchError::Permanent(format!(
                    "image is larger than cache.max_size ({} bytes)",
                    limits.max_size
                )));
            }
            let more = (needed - reservation.bytes()).max(unknown_size_step(limits.max_size));
            let more = more.min(limits.max_size - reservation.bytes());
            let Some(total) = reservation.grow(more, limits.max_size) else {
                writer
                    .abort("no room beside the downloads in progress")
                    .await;
                return Err(FetchError::Retry(format!(
                    "image of unknown size: no room for more than {} bytes beside the downloads in progress",
                    reservation.bytes()
                )));
            };
            make_room(driver, &limits, total).await?;
        }
        // Waits while the disk is behind, but a shutdown need not wait for the disk.
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                writer.abandon("interrupted by shutdown");
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
    // The thread may still be writing queued chunks: a shutdown need not wait for them.
    // Dropped before it took the commit, the thread moves the bytes to invalid/; after,
    // it publishes a verified image, as a commit under way always could.
    let published = tokio::select! {
        biased;
        _ = cancel.cancelled() => return Err(FetchError::Cancelled),
        published = writer.commit() => published?,
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

/// What became of one claimed queued image, as recorded in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefetchOutcome {
    /// Downloaded, verified and published; off the queue.
    Published { bytes: u64 },
    /// Already in the cache; off the queue.
    AlreadyCached,
    /// Stopped by shutdown; still queued.
    Interrupted,
    /// Failed for good; kept as `failed` with the reason.
    Dropped { reason: String },
    /// Failed; queued again for after `delay`.
    Retrying { reason: String, delay: Duration },
}

/// Downloads the claimed `image` and records what became of it: dequeued once published
/// or found cached, retried later with capped exponential backoff, dropped as failed for
/// good (permanent errors, or verification failing `prefetcher.max_attempts` times), or
/// released on shutdown. The second value is the recording's result: on an error the
/// claim is still held and the caller releases it once the database answers.
pub async fn prefetch_claimed(
    driver: &CacheDriver,
    upstream: &Upstream,
    image: &QueuedImage,
    config: &Config,
    cancel: &CancellationToken,
    budget: &DownloadBudget,
) -> (PrefetchOutcome, Result<(), CacheError>) {
    let id = &image.image_id;
    let started = Instant::now();
    let limits = FetchLimits::from(config);
    let fetched = fetch_into_cache(driver, upstream, id, limits, cancel, budget).await;
    let attempts = image.attempts + 1;
    match fetched {
        Ok(Fetched::Published { bytes }) => {
            let secs = started.elapsed().as_secs_f64();
            info!(image_id = %id, bytes, duration_ms = (secs * 1000.0) as u64, mib_per_s = (bytes as f64 / 1_048_576.0 / secs.max(1e-9)) as u64, "prefetched image");
            (PrefetchOutcome::Published { bytes }, Ok(()))
        }
        Ok(Fetched::AlreadyCached) => {
            info!(image_id = %id, "already cached; taken off the queue");
            (
                PrefetchOutcome::AlreadyCached,
                driver.dequeue_cached(id).await,
            )
        }
        Err(FetchError::Cancelled) => {
            info!(image_id = %id, "download interrupted by shutdown; the image stays queued");
            (PrefetchOutcome::Interrupted, driver.release_claim(id).await)
        }
        Err(FetchError::Verify(reason))
            if attempts >= u64::from(config.prefetcher.max_attempts) =>
        {
            warn!(image_id = %id, attempts, error = %reason, "image failed verification too often; dropped from the queue");
            let recorded = driver.give_up(id, attempts, &reason).await;
            (PrefetchOutcome::Dropped { reason }, recorded)
        }
        Err(FetchError::Permanent(reason)) => {
            warn!(image_id = %id, attempts, error = %reason, "image cannot be prefetched; dropped from the queue");
            let recorded = driver.give_up(id, attempts, &reason).await;
            (PrefetchOutcome::Dropped { reason }, recorded)
        }
        Err(FetchError::Retry(reason) | FetchError::Verify(reason)) => {
            let delay = retry_delay(
                attempts,
                config.prefetcher.retry_delay,
                config.prefetcher.max_retry_delay,
            );
            let next = clock::after(clock::now(), delay);
            warn!(image_id = %id, attempts, retry_in_s = delay.as_secs(), error = %reason, "prefetch failed; will retry");
            let recorded = driver.retry_later(id, attempts, next, &reason).await;
            (PrefetchOutcome::Retrying { reason, delay }, recorded)
        }
    }
}

/// `first`, doubling per attempt, capped at `max`.
pub fn retry_delay(attempts: u64, first: Duration, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(30) as u32);
    first.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_up_to_the_cap() {
        let (first, max) = (Duration::from_secs(30), Duration::from_secs(3600));
        assert_eq!(retry_delay(1, first, max), Duration::from_secs(30));
        assert_eq!(retry_delay(3, first, max), Duration::from_secs(120));
        assert_eq!(retry_delay(99, first, max), max);
    }

    #[test]
    fn a_reservation_grows_only_within_max_size() {
        let space = SpaceReservations::default();
        let mut growing = space.try_reserve(300, 1000, None).unwrap();
        let other = space.try_reserve(500, 1000, None).unwrap();
        assert_eq!(growing.grow(200, 1000), Some(1000));
        assert_eq!(growing.bytes(), 500);
        assert_eq!(growing.grow(1, 1000), None, "no room beside the other");
        assert_eq!(growing.bytes(), 500);
        drop(other);
        assert_eq!(growing.grow(1, 1000), Some(501));
        drop(growing);
        assert_eq!(space.reserved(), 0, "all of it is returned");
        assert_eq!(unknown_size_step(64 << 30), 1 << 30);
        assert_eq!(unknown_size_step(32 << 20), 1 << 20);
        assert_eq!(unknown_size_step(1000), 1000);
    }

    #[test]
    fn reservations_fit_together_and_are_returned_on_drop() {
        let space = SpaceReservations::default();
        let first = space.try_reserve(600, 1000, None).unwrap();
        assert_eq!(first.total, 600);
        assert!(
            space.try_reserve(600, 1000, None).is_none(),
            "600 + 600 > 1000"
        );
        let second = space.try_reserve(400, 1000, None).unwrap();
        assert_eq!(second.total, 1000);
        drop(first);
        assert_eq!(space.reserved(), 400);
        assert_eq!(space.try_reserve(600, 1000, None).unwrap().total, 1000);
        drop(second);
        assert_eq!(space.reserved(), 0);
        let everything = space.try_reserve(u64::MAX, u64::MAX, None).unwrap();
        assert!(
            space.try_reserve(1, u64::MAX, None).is_none(),
            "no overflow"
        );
        drop(everything);
        assert_eq!(space.reserved(), 0);
    }

    #[test]
    fn waiting_downloads_get_room_in_turn() {
        let space = SpaceReservations::default();
        let small = space.try_reserve(300, 1000, None).unwrap();
        // A large image does not fit beside it and joins the line.
        assert!(space.try_reserve(800, 1000, None).is_none());
        let large = space.wait_in_line();
        // A later small one would fit, but must not pass the large one.
        assert!(space.try_reserve(300, 1000, None).is_none());
        let later = space.wait_in_line();
        assert!(space.try_reserve(300, 1000, Some(&later)).is_none());
        // Room comes back: the first in line goes, then the next.
        drop(small);
        assert!(space.try_reserve(300, 1000, Some(&later)).is_none());
        let large_room = space.try_reserve(800, 1000, Some(&large)).unwrap();
        drop(large);
        assert!(
            space.try_reserve(300, 1000, Some(&later)).is_none(),
            "800 + 300 > 1000"
        );
        drop(large_room);
        assert!(space.try_reserve(300, 1000, Some(&later)).is_some());
        // A waiter that gives up (cancelled) leaves the line.
        let gone = space.wait_in_line();
        drop(gone);
        drop(later);
        assert!(space.try_reserve(300, 1000, None).is_some());
        // could_reserve answers what try_reserve would, without reserving.
        let next = space.wait_in_line();
        assert!(space.could_reserve(1000, 1000, &next));
        assert!(!space.could_reserve(1001, 1000, &next));
        let behind = space.wait_in_line();
        assert!(!space.could_reserve(1, 1000, &behind), "not first in line");
        drop(next);
        assert!(space.could_reserve(1, 1000, &behind));
        assert_eq!(space.reserved(), 0, "asking reserves nothing");
    }
}
