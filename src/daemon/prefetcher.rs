//! The prefetcher loop: claims this node's due queued images, at most
//! `prefetcher.concurrency` downloads at once, each streamed through the driver's
//! writer (hashing, verification, publish). A failed image is retried with capped
//! exponential backoff or dropped with its reason; one failing image never stops the
//! loop. Woken by queue commands, markers and finished downloads.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::Context;
use super::Task;
use super::worker::{Next, Worker};
use crate::cache::{CacheError, QueuedImage};
use crate::clock;
use crate::download::{DownloadBudget, FetchError, FetchLimits, Fetched, fetch_into_cache};
use crate::image_id::ImageId;
use crate::upstream::Upstream;

/// How long a claim lasts. Claims are released when a download ends and at every start
/// (under the node lease any claim is a dead process's), so this only bounds a wedge.
const CLAIM_TTL: Duration = Duration::from_secs(6 * 3600);
/// How often the claims of downloads in progress are renewed: a download may outlast
/// `CLAIM_TTL` (a large image under a bandwidth cap), and a database outage of several
/// hours must still leave a renewal due before the claims expire.
const CLAIM_RENEW_EVERY: Duration = Duration::from_secs(3600);

pub struct PrefetcherWorker {
    ctx: Context,
    upstream: Arc<Upstream>,
    holder: String,
    /// Each download yields the id whose claim it could not settle, if any.
    downloads: JoinSet<Option<ImageId>>,
    /// Claims left behind by downloads whose outcome could not be recorded (the
    /// database was down): released at the next step, so the image is tried again
    /// soon rather than when the claim expires.
    unsettled: Vec<ImageId>,
    cancel: CancellationToken,
    done: Arc<Notify>,
    budget: Arc<DownloadBudget>,
    /// When the claims of the downloads in progress were last renewed.
    claims_renewed: Instant,
}

impl PrefetcherWorker {
    pub fn new(
        ctx: Context,
        upstream: Upstream,
        holder: String,
        cancel: CancellationToken,
    ) -> Self {
        let done = ctx.nudges.prefetcher.clone();
        PrefetcherWorker {
            ctx,
            upstream: Arc::new(upstream),
            holder,
            downloads: JoinSet::new(),
            unsettled: Vec::new(),
            cancel,
            done,
            budget: Arc::new(DownloadBudget::default()),
            claims_renewed: Instant::now(),
        }
    }

    /// Renews this process's claims when due while downloads are in progress; returns
    /// when the next renewal is due.
    async fn renew_claims(&mut self) -> Result<Instant, CacheError> {
        if self.downloads.is_empty() {
            self.claims_renewed = Instant::now();
        } else if self.claims_renewed.elapsed() >= CLAIM_RENEW_EVERY {
            let renewed = self
                .ctx
                .driver
                .renew_claims(&self.holder, CLAIM_TTL)
                .await?;
            debug!(renewed, "renewed the claims of downloads in progress");
            self.claims_renewed = Instant::now();
        }
        Ok(self.claims_renewed + CLAIM_RENEW_EVERY)
    }

    fn reap(&mut self) {
        while let Some(result) = self.downloads.try_join_next() {
            match result {
                Ok(Some(id)) => self.unsettled.push(id),
                Ok(None) => {}
                Err(e) => error!(error = %e, "a download task crashed"),
            }
        }
    }

    /// Releases the claims of downloads whose outcome was lost; keeps what still fails.
    async fn settle(&mut self) -> Result<(), CacheError> {
        while let Some(id) = self.unsettled.last() {
            self.ctx.driver.release_claim(id).await?;
            info!(image_id = %id, "released the claim of a download whose outcome was lost");
            self.unsettled.pop();
        }
        Ok(())
    }
}

impl Worker for PrefetcherWorker {
    type Error = CacheError;

    fn task(&self) -> Task {
        Task::Prefetcher
    }

    async fn step(&mut self) -> Result<Next, CacheError> {
        self.reap();
        self.settle().await?;
        let config = self.ctx.config();
        let limit = config.prefetcher.concurrency;
        while self.downloads.len() < limit && !self.cancel.is_cancelled() {
            let Some(image) = self.ctx.driver.claim_next(&self.holder, CLAIM_TTL).await? else {
                break;
            };
            let job = Download {
                ctx: self.ctx.clone(),
                upstream: self.upstream.clone(),
                cancel: self.cancel.clone(),
                done: self.done.clone(),
                budget: self.budget.clone(),
            };
            self.downloads.spawn(job.run(image));
        }
        self.ctx.board.set_downloading(self.downloads.len());
        let renew_due = self.renew_claims().await?;
        let periodic = (Instant::now() + config.prefetcher.interval).min(renew_due);
        if self.downloads.len() >= limit {
            // Full: a finished download nudges us.
            return Ok(Next::IdleUntil(periodic));
        }
        let wake = match self.ctx.driver.next_queue_due().await? {
            Some(due) => {
                let wait = (due - clock::now()).to_std().unwrap_or(Duration::ZERO);
                periodic.min(Instant::now() + wait + Duration::from_millis(10))
            }
            None => periodic,
        };
        Ok(Next::IdleUntil(wake))
    }

    async fn finish(&mut self) {
        // The shared token is cancelled: downloads abort at their next chunk, leaving
        // nothing published and the image queued.
        while let Some(result) = self.downloads.join_next().await {
            if let Err(e) = result {
                error!(error = %e, "a download task crashed");
            }
        }
        // Best effort: whatever is still claimed is released at the next start.
        let _ = self.settle().await;
    }
}

/// One image's download and the bookkeeping of its outcome.
struct Download {
    ctx: Context,
    upstream: Arc<Upstream>,
    cancel: CancellationToken,
    done: Arc<Notify>,
    budget: Arc<DownloadBudget>,
}

impl Download {
    /// Returns the id if its outcome could not be recorded (its claim is still held).
    async fn run(self, image: QueuedImage) -> Option<ImageId> {
        let id = image.image_id.clone();
        let started = Instant::now();
        let config = self.ctx.config();
        let limits = FetchLimits {
            max_size: config.cache.max_size,
            min_free_disk: config.pruner.min_free_disk,
            max_bytes_per_second: config.prefetcher.max_bytes_per_second,
        };
        let driver = &self.ctx.driver;
        let outcome = fetch_into_cache(
            driver,
            &self.upstream,
            &id,
            limits,
            &self.cancel,
            &self.budget,
        )
        .await;
        let attempts = image.attempts + 1;
        let recorded = match outcome {
            Ok(Fetched::Published { bytes }) => {
                let secs = started.elapsed().as_secs_f64();
                info!(image_id = %id, bytes, duration_ms = (secs * 1000.0) as u64, mib_per_s = (bytes as f64 / 1_048_576.0 / secs.max(1e-9)) as u64, "prefetched image");
                self.ctx.nudges.pruner.notify_one();
                Ok(())
            }
            Ok(Fetched::AlreadyCached) => {
                info!(image_id = %id, "already cached; taken off the queue");
                driver.dequeue_cached(&id).await
            }
            Err(FetchError::Cancelled) => {
                info!(image_id = %id, "download interrupted by shutdown; the image stays queued");
                driver.release_claim(&id).await
            }
            Err(FetchError::Verify(reason))
                if attempts >= u64::from(config.prefetcher.max_attempts) =>
            {
                warn!(image_id = %id, attempts, error = %reason, "image failed verification too often; dropped from the queue");
                driver.give_up(&id, attempts, &reason).await
            }
            Err(FetchError::Permanent(reason)) => {
                warn!(image_id = %id, attempts, error = %reason, "image cannot be prefetched; dropped from the queue");
                driver.give_up(&id, attempts, &reason).await
            }
            Err(FetchError::Retry(reason) | FetchError::Verify(reason)) => {
                let delay = retry_delay(
                    attempts,
                    config.prefetcher.retry_delay,
                    config.prefetcher.max_retry_delay,
                );
                let next = clock::now()
                    + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
                warn!(image_id = %id, attempts, retry_in_s = delay.as_secs(), error = %reason, "prefetch failed; will retry");
                driver.retry_later(&id, attempts, next, &reason).await
            }
        };
        self.done.notify_one();
        match recorded {
            Ok(()) => None,
            Err(error) => {
                error!(image_id = %id, %error, "could not record the prefetch outcome; the claim is released once the database answers");
                Some(id)
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
