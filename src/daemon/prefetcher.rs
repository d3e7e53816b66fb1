//! The prefetcher loop: the prefetch engine (`prefetch::engine`) as a daemon loop. Each
//! step lets the engine settle, recover, renew and claim up to
//! `prefetcher.concurrency` downloads, then publishes the queue in the STATUS line. A
//! failed image is retried with capped exponential backoff or dropped with its reason;
//! one failing image never stops the loop. Woken by queue commands, markers and
//! finished downloads.

use std::sync::Arc;

use super::status::StatusBoard;
use tokio::task::JoinError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::error;

use super::context::{Context, Nudges, Task};
use super::worker::{Next, Worker};
use crate::metrics::Metrics;
use crate::prefetch::{DownloadEvents, EngineError, Finished, PrefetchEngine, PrefetchOutcome};
use crate::upstream::Upstream;

pub(super) struct PrefetcherWorker {
    ctx: Context,
    engine: PrefetchEngine<Loops>,
}

impl PrefetcherWorker {
    /// Start-up has just looked for dead claims when the prefetcher is made: the engine
    /// looks again one `prefetcher.interval` from now.
    pub(super) fn new(
        ctx: Context,
        upstream: Arc<Upstream>,
        holder: String,
        cancel: CancellationToken,
    ) -> Self {
        let loops = Loops {
            board: ctx.board.clone(),
            nudges: ctx.nudges.clone(),
            metrics: ctx.metrics.clone(),
        };
        let engine = PrefetchEngine::new(ctx.driver.clone(), upstream, holder, cancel, loops);
        PrefetcherWorker { ctx, engine }
    }
}

/// Logs what the outcome of a finished download leaves to the daemon to say.
fn log_ended(ended: Result<Finished, JoinError>) {
    match ended {
        Ok(Finished {
            image_id,
            recorded: Err(error),
            ..
        }) => {
            error!(%image_id, %error, "could not record the prefetch outcome; the claim is released once the database answers");
        }
        Ok(_) => {}
        Err(e) => error!(error = %e, "a download task crashed"),
    }
}

impl Worker for PrefetcherWorker {
    type Error = EngineError;

    fn task(&self) -> Task {
        Task::Prefetcher
    }

    async fn step(&mut self) -> Result<Next, EngineError> {
        self.engine.reap().into_iter().for_each(log_ended);
        let config = self.ctx.config();
        let due = self.engine.tick(&config).await?;
        self.engine.fill(&config).await?;
        // Downloads change the queue; the queue loop only hears of markers.
        self.ctx
            .refresh_queued()
            .await
            .map_err(EngineError::Queue)?;
        let periodic = (Instant::now() + config.prefetcher.interval).min(due);
        let wake = self.engine.claim_due(&config, periodic).await?;
        Ok(Next::IdleUntil(wake))
    }

    async fn finish(&mut self) {
        // The shared token is cancelled: downloads abort at their next chunk, leaving
        // nothing published and the image queued.
        self.engine.finish(log_ended).await;
    }
}

/// The daemon's side of each download: the STATUS count and the nudges.
struct Loops {
    board: Arc<StatusBoard>,
    nudges: Nudges,
    metrics: Arc<Metrics>,
}

/// One download in the STATUS count, from its start until dropped: however the task
/// ends (done, crashed, aborted), it leaves the count. With its start, for its duration.
struct DownloadCounted(Arc<StatusBoard>, Instant);

impl Drop for DownloadCounted {
    fn drop(&mut self) {
        self.0.download_finished();
    }
}

impl DownloadEvents for Loops {
    type Running = DownloadCounted;

    fn started(&self) -> DownloadCounted {
        self.board.download_started();
        DownloadCounted(self.board.clone(), Instant::now())
    }

    fn finished(&self, counted: DownloadCounted, outcome: &PrefetchOutcome) {
        self.metrics.prefetch_finished(outcome, counted.1.elapsed());
        if let PrefetchOutcome::Published { .. } = outcome {
            self.nudges.pruner.notify_one();
        }
        // Before the nudge, so the step it wakes reports this download gone.
        drop(counted);
        self.nudges.prefetcher.notify_one();
    }
}
