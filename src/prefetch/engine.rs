//! The prefetch engine, used by the daemon's prefetcher loop and by the `prefetch`
//! command alike: claims this node's due queued images, runs at most
//! `prefetcher.concurrency` downloads as tasks it owns, renews their claims six times per
//! `prefetcher.claim_ttl`, releases the claims of local processes that died, and releases
//! the claims of downloads whose outcome could not be recorded. Its operations are
//! bounded steps; the caller decides when to run them and what to tell the operator.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{DownloadBudget, PrefetchOutcome, prefetch_claimed};
use crate::cache::{CacheDriver, CacheError};
use crate::clock;
use crate::config::Config;
use crate::image_id::ImageId;
use crate::upstream::Upstream;

/// What a caller hears of each download from inside its task, as it happens (the
/// daemon counts downloads in its STATUS and nudges loops).
pub(crate) trait DownloadEvents: Send + Sync + 'static {
    /// Held by the download's task from its start; dropped however the task ends (done,
    /// crashed, aborted).
    type Running: Send + 'static;

    /// A download is about to start.
    fn started(&self) -> Self::Running;

    /// A download's outcome is known and its recording done (or failed).
    fn finished(&self, running: Self::Running, outcome: &PrefetchOutcome);
}

/// No one to tell.
impl DownloadEvents for () {
    type Running = ();

    fn started(&self) {}

    fn finished(&self, (): (), _: &PrefetchOutcome) {}
}

/// One download that ended.
#[derive(Debug)]
pub(crate) struct Finished {
    pub image_id: ImageId,
    pub outcome: PrefetchOutcome,
    /// The recording of the outcome in the queue. On an error the claim is still held:
    /// the engine releases it at a later [`PrefetchEngine::tick`].
    pub recorded: Result<(), CacheError>,
}

/// Which of the engine's periodic duties failed; the text is the cause's alone.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EngineError {
    /// Claiming queued images, or reading when the next one is due.
    #[error(transparent)]
    Queue(CacheError),
    /// Releasing the claim of a download whose outcome was lost.
    #[error(transparent)]
    Settle(CacheError),
    /// Looking for and releasing the claims of processes that died.
    #[error(transparent)]
    Recover(CacheError),
    /// Renewing the claims of the downloads in progress.
    #[error(transparent)]
    Renew(CacheError),
}

/// Extra wait after the next queued image's due time, so the claim that follows finds
/// it due even if the database's clock reads a little behind ours.
const DUE_SLACK: Duration = Duration::from_millis(10);

pub(crate) struct PrefetchEngine<E: DownloadEvents = ()> {
    driver: CacheDriver,
    upstream: Arc<Upstream>,
    /// The name our claims are held under.
    holder: String,
    cancel: CancellationToken,
    budget: Arc<DownloadBudget>,
    events: Arc<E>,
    downloads: JoinSet<Finished>,
    /// Claims left behind by downloads whose outcome could not be recorded (the
    /// database was down): released at the next tick, so the image is tried again soon
    /// rather than when the claim expires.
    unsettled: Vec<ImageId>,
    /// When the claims of the downloads in progress were last renewed.
    claims_renewed: Instant,
    /// When the claims of dead processes were last looked for (once per
    /// `prefetcher.interval`: each look scans the node's queue rows).
    dead_claims_checked: Instant,
}

impl<E: DownloadEvents> PrefetchEngine<E> {
    /// An engine holding claims as `holder`; `cancel` stops its downloads at their next
    /// chunk. The first look for dead claims is due one `prefetcher.interval` from now
    /// (call [`PrefetchEngine::recover_dead_claims`] to look at once).
    pub(crate) fn new(
        driver: CacheDriver,
        upstream: Arc<Upstream>,
        holder: String,
        cancel: CancellationToken,
        events: E,
    ) -> Self {
        PrefetchEngine {
            driver,
            upstream,
            holder,
            cancel,
            budget: Arc::new(DownloadBudget::default()),
            events: Arc::new(events),
            downloads: JoinSet::new(),
            unsettled: Vec::new(),
            claims_renewed: Instant::now(),
            dead_claims_checked: Instant::now(),
        }
    }

    /// Whether `prefetcher.concurrency` downloads are in progress.
    pub(crate) fn is_full(&self, config: &Config) -> bool {
        self.downloads.len() >= config.prefetcher.concurrency
    }

    /// Claims due queued images and starts their downloads, up to
    /// `prefetcher.concurrency` in progress; none once cancelled. Returns how many
    /// started.
    pub(crate) async fn fill(&mut self, config: &Arc<Config>) -> Result<usize, EngineError> {
        let mut started = 0;
        let now = clock::now();
        while !self.is_full(config) && !self.cancel.is_cancelled() {
            let claim_ttl = config.prefetcher.claim_ttl;
            let claimed = self.driver.claim_next(&self.holder, now, claim_ttl).await;
            let Some(image) = claimed.map_err(EngineError::Queue)? else {
                break;
            };
            let running = self.events.started();
            let (driver, upstream, config, cancel, budget, events) = (
                self.driver.clone(),
                self.upstream.clone(),
                config.clone(),
                self.cancel.clone(),
                self.budget.clone(),
                self.events.clone(),
            );
            self.downloads.spawn(async move {
                let (outcome, recorded) =
                    prefetch_claimed(&driver, &upstream, &image, &config, &cancel, &budget).await;
                events.finished(running, &outcome);
                Finished {
                    image_id: image.image_id,
                    outcome,
                    recorded,
                }
            });
            started += 1;
        }
        Ok(started)
    }

    /// The downloads that ended since the last call, without waiting.
    pub(crate) fn reap(&mut self) -> Vec<Result<Finished, JoinError>> {
        let mut ended = Vec::new();
        while let Some(result) = self.downloads.try_join_next() {
            ended.push(self.note(result));
        }
        ended
    }

    /// Waits for the next download to end; `None` when none is in progress.
    /// Cancel-safe: a download that ended is never lost.
    pub(crate) async fn next_finished(&mut self) -> Option<Result<Finished, JoinError>> {
        let result = self.downloads.join_next().await?;
        Some(self.note(result))
    }

    /// Keeps the claim of a download whose outcome could not be recorded, to release.
    fn note(&mut self, result: Result<Finished, JoinError>) -> Result<Finished, JoinError> {
        if let Ok(finished) = &result
            && finished.recorded.is_err()
        {
            self.unsettled.push(finished.image_id.clone());
        }
        result
    }

    /// The periodic duties, each when due: releases the claims of downloads whose outcome
    /// was lost, looks for dead processes' claims once per `prefetcher.interval`, renews
    /// the claims of the downloads in progress every `claim_ttl / 6`. Returns when the
    /// next duty is due. Stops at the first that fails; the next tick tries again.
    pub(crate) async fn tick(&mut self, config: &Config) -> Result<Instant, EngineError> {
        self.settle().await.map_err(EngineError::Settle)?;
        let every = config.prefetcher.interval;
        if self.dead_claims_checked.elapsed() >= every {
            self.recover_dead_claims()
                .await
                .map_err(EngineError::Recover)?;
        }
        let renew_due = self
            .renew_claims(config, clock::now())
            .await
            .map_err(EngineError::Renew)?;
        Ok(renew_due.min(self.dead_claims_checked + every))
    }

    /// When a queued image not yet due becomes due, if any (and the engine has room for
    /// it), capped at `due`: the time to claim again.
    pub(crate) async fn claim_due(
        &self,
        config: &Config,
        due: Instant,
    ) -> Result<Instant, EngineError> {
        if self.is_full(config) {
            // Full: a finished download is what makes room.
            return Ok(due);
        }
        let next = self.driver.next_queue_due().await;
        Ok(match next.map_err(EngineError::Queue)? {
            Some(at) => {
                let wait = (at - clock::now()).to_std().unwrap_or(Duration::ZERO);
                due.min(Instant::now() + wait + DUE_SLACK)
            }
            None => due,
        })
    }

    /// Releases the claims of `prefetch` commands and daemons on this host that died
    /// (kill -9, a crash), and moves their partial files to `invalid/`, so their images
    /// are fetched now rather than when the claims run out. Our own claims, and those
    /// whose holder cannot be checked from here, stay. Returns how many were released.
    pub(crate) async fn recover_dead_claims(&mut self) -> Result<u64, CacheError> {
        let own = &self.holder;
        let recovered = self
            .driver
            .recover_claims(|holder| crate::process::claim_may_be_live(own, holder))
            .await?;
        if recovered > 0 {
            info!(
                recovered,
                "released the claims of a process that is no longer running"
            );
        }
        self.dead_claims_checked = Instant::now();
        Ok(recovered)
    }

    /// Renews our claims when due while downloads are in progress (a download may
    /// outlast `prefetcher.claim_ttl`: a large image under a bandwidth cap); returns when
    /// the next renewal is due.
    async fn renew_claims(
        &mut self,
        config: &Config,
        now: DateTime<Utc>,
    ) -> Result<Instant, CacheError> {
        let every = config.prefetcher.claim_renew_every();
        if self.downloads.is_empty() {
            self.claims_renewed = Instant::now();
        } else if self.claims_renewed.elapsed() >= every {
            let renewed = self
                .driver
                .renew_claims(&self.holder, now, config.prefetcher.claim_ttl)
                .await?;
            debug!(renewed, "renewed the claims of downloads in progress");
            self.claims_renewed = Instant::now();
        }
        Ok(self.claims_renewed + every)
    }

    /// Releases the claims of downloads whose outcome was lost; keeps what still fails.
    async fn settle(&mut self) -> Result<(), CacheError> {
        while let Some(id) = self.unsettled.last() {
            self.driver.release_claim(id).await?;
            info!(image_id = %id, "released the claim of a download whose outcome was lost");
            self.unsettled.pop();
        }
        Ok(())
    }

    /// At shutdown, once the cancel token is cancelled: waits for every download (each
    /// aborts at its next chunk, leaving nothing published and the image queued), hands
    /// each to `ended`, then releases what is left to settle, best effort: whatever is
    /// still claimed is released at the next start.
    pub(crate) async fn finish(&mut self, mut ended: impl FnMut(Result<Finished, JoinError>)) {
        while let Some(result) = self.next_finished().await {
            ended(result);
        }
        let _ = self.settle().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::ErrorClass;

    /// The engine in process, as its callers drive it: two images queued, one the
    /// directory upstream has and one it has not; both settle in one drain, within the
    /// concurrency, and each outcome is recorded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_engine_drains_the_queue_and_records_every_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let (config, driver, upstream) = crate::prefetch::test_support::directory_cache(
            dir.path(),
            &[("present", &[7u8; 100_000])],
            "[prefetcher]\nconcurrency = 1\n",
        )
        .await;
        let (present, missing) = (
            ImageId::parse("present").unwrap(),
            ImageId::parse("missing").unwrap(),
        );
        assert!(driver.queue_image(&present).await.unwrap());
        assert!(driver.queue_image(&missing).await.unwrap());
        assert_eq!(driver.adopt_queue_markers().await.unwrap(), 2);
        let cancel = CancellationToken::new();
        let mut engine = PrefetchEngine::new(
            driver.clone(),
            Arc::new(upstream),
            "test".into(),
            cancel,
            (),
        );
        let mut ended = Vec::new();
        loop {
            engine.tick(&config).await.unwrap();
            engine.fill(&config).await.unwrap();
            assert!(engine.downloads.len() <= 1, "within prefetcher.concurrency");
            let Some(done) = engine.next_finished().await else {
                break;
            };
            let done = done.unwrap();
            done.recorded.as_ref().unwrap();
            ended.push(done);
        }
        engine.finish(|_| panic!("nothing is left running")).await;
        ended.sort_by(|a, b| a.image_id.as_str().cmp(b.image_id.as_str()));
        assert!(
            matches!(
                &ended[..],
                [
                    Finished {
                        outcome: PrefetchOutcome::Dropped { error },
                        ..
                    },
                    Finished {
                        outcome: PrefetchOutcome::Published { bytes: 100_000 },
                        ..
                    },
                ] if error.class() == ErrorClass::Permanent
            ),
            "{ended:?}"
        );
        assert!(driver.cached(&present).await);
    }
}
