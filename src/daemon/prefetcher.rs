//! The prefetcher loop: claims this node's due queued images, at most
//! `prefetcher.concurrency` downloads at once, each streamed through the driver's
//! writer (hashing, verification, publish). A failed image is retried with capped
//! exponential backoff or dropped with its reason; one failing image never stops the
//! loop. Woken by queue commands, markers and finished downloads.

use std::sync::Arc;
use std::time::Duration;

use super::status::StatusBoard;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use super::context::Context;
use super::context::Task;
use super::worker::{Next, Worker};
use crate::cache::{CacheError, QueuedImage};
use crate::clock;
use crate::config::PrefetcherConfig;
use crate::download::{DownloadBudget, PrefetchOutcome, prefetch_claimed};
use crate::image_id::ImageId;
use crate::upstream::Upstream;

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
    budget: Arc<DownloadBudget>,
    /// When the claims of the downloads in progress were last renewed.
    claims_renewed: Instant,
    /// When the claims of dead processes were last looked for (once per
    /// `prefetcher.interval`: each look scans the node's queue rows). Start-up has just
    /// looked when the prefetcher is made.
    dead_claims_checked: Instant,
}

impl PrefetcherWorker {
    pub fn new(
        ctx: Context,
        upstream: Upstream,
        holder: String,
        cancel: CancellationToken,
    ) -> Self {
        PrefetcherWorker {
            ctx,
            upstream: Arc::new(upstream),
            holder,
            downloads: JoinSet::new(),
            unsettled: Vec::new(),
            cancel,
            budget: Arc::new(DownloadBudget::default()),
            claims_renewed: Instant::now(),
            dead_claims_checked: Instant::now(),
        }
    }

    /// Renews this process's claims when due while downloads are in progress (a download
    /// may outlast `prefetcher.claim_ttl`: a large image under a bandwidth cap); returns
    /// when the next renewal is due.
    async fn renew_claims(&mut self, config: &PrefetcherConfig) -> Result<Instant, CacheError> {
        let every = config.claim_renew_every();
        if self.downloads.is_empty() {
            self.claims_renewed = Instant::now();
        } else if self.claims_renewed.elapsed() >= every {
            let renewed = self
                .ctx
                .driver
                .renew_claims(&self.holder, config.claim_ttl)
                .await?;
            debug!(renewed, "renewed the claims of downloads in progress");
            self.claims_renewed = Instant::now();
        }
        Ok(self.claims_renewed + every)
    }

    /// Releases the claims of `prefetch` commands on this host that died (kill -9, a
    /// crash) since we started, and moves their partial files to `invalid/`, so their
    /// images are fetched now rather than when the claims run out. Our own claims, and
    /// those whose holder cannot be checked from here, stay. At most once per `every`.
    async fn recover_dead_claims(&mut self, every: Duration) -> Result<(), CacheError> {
        if self.dead_claims_checked.elapsed() < every {
            return Ok(());
        }
        let recovered = self
            .ctx
            .driver
            .recover_claims(|holder| crate::process::claim_may_be_live(&self.holder, holder))
            .await?;
        if recovered > 0 {
            info!(
                recovered,
                "released the claims of a process that is no longer running"
            );
        }
        self.dead_claims_checked = Instant::now();
        Ok(())
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
        self.recover_dead_claims(config.prefetcher.interval).await?;
        let limit = config.prefetcher.concurrency;
        while self.downloads.len() < limit && !self.cancel.is_cancelled() {
            let claim_ttl = config.prefetcher.claim_ttl;
            let Some(image) = self.ctx.driver.claim_next(&self.holder, claim_ttl).await? else {
                break;
            };
            let job = Download {
                ctx: self.ctx.clone(),
                upstream: self.upstream.clone(),
                cancel: self.cancel.clone(),
                budget: self.budget.clone(),
            };
            let counted = DownloadCounted::start(self.ctx.board.clone());
            self.downloads.spawn(job.run(image, counted));
        }
        // Downloads change the queue; the queue loop only hears of markers.
        self.ctx.refresh_queued().await?;
        let renew_due = self.renew_claims(&config.prefetcher).await?;
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
    budget: Arc<DownloadBudget>,
}

/// One download in the STATUS count, from its start until dropped: however the task
/// ends (done, crashed, aborted), it leaves the count.
struct DownloadCounted(Arc<StatusBoard>);

impl DownloadCounted {
    fn start(board: Arc<StatusBoard>) -> Self {
        board.download_started();
        DownloadCounted(board)
    }
}

impl Drop for DownloadCounted {
    fn drop(&mut self) {
        self.0.download_finished();
    }
}

impl Download {
    /// Returns the id if its outcome could not be recorded (its claim is still held).
    async fn run(self, image: QueuedImage, counted: DownloadCounted) -> Option<ImageId> {
        let config = self.ctx.config();
        let (outcome, recorded) = prefetch_claimed(
            &self.ctx.driver,
            &self.upstream,
            &image,
            &config,
            &self.cancel,
            &self.budget,
        )
        .await;
        if let PrefetchOutcome::Published { .. } = outcome {
            self.ctx.nudges.pruner.notify_one();
        }
        // Before the nudge, so the step it wakes reports this download gone.
        drop(counted);
        self.ctx.nudges.prefetcher.notify_one();
        match recorded {
            Ok(()) => None,
            Err(error) => {
                error!(image_id = %image.image_id, %error, "could not record the prefetch outcome; the claim is released once the database answers");
                Some(image.image_id)
            }
        }
    }
}
