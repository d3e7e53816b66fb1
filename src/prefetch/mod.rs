//! Prefetching: downloading queued images into the cache. `engine` claims queued images
//! and runs their downloads (for the daemon and the `prefetch` command alike), `fetch`
//! is the download of one image, `budget` what the downloads of this process share, and
//! this module what becomes of a claimed queued image (published, retried later,
//! dropped, released).

mod budget;
mod engine;
mod fetch;
mod fill;
#[cfg(test)]
mod test_support;
mod writer_thread;

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cache::{CacheDriver, CacheError, QueuedImage};
use crate::clock;
use crate::config::Config;
use crate::upstream::{ErrorClass, Upstream};

pub use budget::DownloadBudget;
pub(crate) use engine::{DownloadEvents, EngineError, Finished, PrefetchEngine};
pub(crate) use fetch::FetchError;
pub use fetch::{FetchLimits, Fetched, fetch_into_cache};
pub(crate) use fill::{Miss, ReadThrough};

/// What became of one claimed queued image, as recorded in the queue.
#[derive(Debug)]
pub enum PrefetchOutcome {
    /// Downloaded, verified and published; off the queue.
    Published { bytes: u64 },
    /// Already in the cache; off the queue.
    AlreadyCached,
    /// Stopped by shutdown; still queued.
    Interrupted,
    /// Failed for good; kept as `failed` with the error's text.
    Dropped { error: FetchError },
    /// Failed; queued again for after `delay`.
    Retrying { error: FetchError, delay: Duration },
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
    let started = Instant::now();
    let limits = FetchLimits::from(config);
    let id = &image.image_id;
    let fetched = fetch_into_cache(driver, upstream, id, limits, cancel, budget).await;
    record_outcome(driver, image, config, fetched, started).await
}

/// Records what became of the download of the claimed `image` that began at `started`
/// (see `prefetch_claimed`; a read-through fill records its own the same way).
pub(crate) async fn record_outcome(
    driver: &CacheDriver,
    image: &QueuedImage,
    config: &Config,
    fetched: Result<Fetched, FetchError>,
    started: Instant,
) -> (PrefetchOutcome, Result<(), CacheError>) {
    let id = &image.image_id;
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
        Err(error) => {
            // The queue keeps the text (`last_error`); the outcome keeps the error.
            let reason = error.to_string();
            let now = clock::now();
            let max_attempts = u64::from(config.prefetcher.max_attempts);
            match error.class() {
                ErrorClass::Verify if attempts >= max_attempts => {
                    warn!(image_id = %id, attempts, error = %reason, "image failed verification too often; dropped from the queue");
                    let recorded = driver.give_up(id, attempts, now, &reason).await;
                    (PrefetchOutcome::Dropped { error }, recorded)
                }
                ErrorClass::Permanent => {
                    warn!(image_id = %id, attempts, error = %reason, "image cannot be prefetched; dropped from the queue");
                    let recorded = driver.give_up(id, attempts, now, &reason).await;
                    (PrefetchOutcome::Dropped { error }, recorded)
                }
                ErrorClass::Retry | ErrorClass::Verify => {
                    let delay = retry_delay(
                        attempts,
                        config.prefetcher.retry_delay,
                        config.prefetcher.max_retry_delay,
                    );
                    let next = clock::after(now, delay);
                    warn!(image_id = %id, attempts, retry_in_s = delay.as_secs(), error = %reason, "prefetch failed; will retry");
                    let recorded = driver.retry_later(id, attempts, next, &reason).await;
                    (PrefetchOutcome::Retrying { error, delay }, recorded)
                }
            }
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
}
