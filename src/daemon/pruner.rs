//! The pruner loop: evicts least recently used images while the cache is over
//! `cache.max_size` (down to `pruner.low_watermark`) or the disk is short of
//! `pruner.min_free_disk`. Woken at once by a newly published image and by a reload.

use tokio::time::Instant;
use tracing::info;

use super::Context;
use super::Task;
use super::worker::{Next, Worker};
use crate::cache::{CacheError, PrunePolicy};

pub struct PrunerWorker {
    ctx: Context,
}

impl PrunerWorker {
    pub fn new(ctx: Context) -> Self {
        PrunerWorker { ctx }
    }
}

impl Worker for PrunerWorker {
    type Error = CacheError;

    fn task(&self) -> Task {
        Task::Pruner
    }

    async fn step(&mut self) -> Result<Next, CacheError> {
        let config = self.ctx.config();
        let policy = PrunePolicy {
            max_size: config.cache.max_size,
            low_watermark: config.pruner.low_watermark,
            min_free_disk: config.pruner.min_free_disk,
        };
        let started = Instant::now();
        let report = self.ctx.driver.prune(policy).await?;
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
        self.ctx
            .board
            .set_cache(report.size_after, report.images_after, policy.max_size);
        self.ctx.publish_status();
        Ok(Next::IdleUntil(Instant::now() + config.pruner.interval))
    }
}
