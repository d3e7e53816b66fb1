//! The pruner loop: evicts least recently used images while the cache is over
//! `cache.max_size` (down to `pruner.low_watermark`) or the disk is short of
//! `pruner.min_free_disk`. Woken at once by a newly published image and by a reload.
//! A prune is walked `PRUNE_STEP_ROWS` rows per step, so a very large cache is evicted
//! in many short steps rather than one the watchdog would take for stuck.

use tokio::time::Instant;
use tracing::info;

use super::context::Context;
use super::context::Task;
use super::worker::{Next, Worker};
use crate::cache::{CacheError, PRUNE_STEP_ROWS, PrunePass, PrunePolicy};

pub(super) struct PrunerWorker {
    ctx: Context,
    /// The prune in progress between steps, with its policy, start, and the pass
    /// request ticket it serves (`Passes`).
    pass: Option<(PrunePass, PrunePolicy, Instant, u64)>,
}

impl PrunerWorker {
    pub(super) fn new(ctx: Context) -> Self {
        PrunerWorker { ctx, pass: None }
    }
}

impl Worker for PrunerWorker {
    type Error = CacheError;

    fn task(&self) -> Task {
        Task::Pruner
    }

    async fn step(&mut self) -> Result<Next, CacheError> {
        let driver = &self.ctx.driver;
        let requests = &self.ctx.passes.prune;
        match self.pass.take() {
            None => {
                // Starting (listing, measuring) is one step; adopting and evicting the next.
                let config = self.ctx.config();
                let policy = config.prune_policy();
                let ticket = requests.starting();
                let pass = driver
                    .start_prune(policy)
                    .await
                    .inspect_err(|e| requests.finished(ticket, Err(e.to_string())))?;
                self.pass = Some((pass, policy, Instant::now(), ticket));
                Ok(Next::Again)
            }
            Some((mut pass, policy, started, ticket)) if !pass.is_done() => {
                // On an error the pass is dropped with its prune turn, so downloads can
                // make room during the backoff; the next step starts a new pass.
                pass.step(driver, PRUNE_STEP_ROWS)
                    .await
                    .inspect_err(|e| requests.finished(ticket, Err(e.to_string())))?;
                self.pass = Some((pass, policy, started, ticket));
                Ok(Next::Again)
            }
            Some((pass, policy, started, ticket)) => {
                self.report(pass, policy, started, ticket);
                Ok(Next::IdleUntil(
                    Instant::now() + self.ctx.config().pruner.interval,
                ))
            }
        }
    }
}

impl PrunerWorker {
    fn report(&self, pass: PrunePass, policy: PrunePolicy, started: Instant, ticket: u64) {
        let report = pass.into_report();
        self.ctx
            .passes
            .prune
            .finished(ticket, Ok((report.files(), report.bytes())));
        if report.files() > 0 || report.rows_without_file > 0 {
            info!(
                files = report.files(),
                bytes = report.bytes(),
                size_before = report.size_before,
                size_after = report.size_after,
                max_size = policy.max_size,
                duration_ms = started.elapsed().as_millis() as u64,
                "prune pass evicted images"
            );
            self.ctx.board.pruned(report.files(), report.bytes());
        }
        self.ctx.metrics.pruned(&report);
        self.ctx
            .board
            .set_cache(report.size_after, report.images_after);
    }
}
