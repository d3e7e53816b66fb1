//! The queue loop: adopts marker files that appear in `queue/` (Glance's
//! `PUT /v2/cache/{id}`, our `queue_image` and the `queue` command write them) into the
//! queue table, a pass's new markers in one transaction, and keeps the queued count for
//! the status line. The watcher wakes it when a marker appears.

use tokio::time::Instant;
use tracing::info;

use super::context::Context;
use super::context::Task;
use super::worker::{Next, Worker};
use crate::cache::CacheError;

pub(super) struct QueueWorker {
    ctx: Context,
}

impl QueueWorker {
    pub(super) fn new(ctx: Context) -> Self {
        QueueWorker { ctx }
    }
}

impl Worker for QueueWorker {
    type Error = CacheError;

    fn task(&self) -> Task {
        Task::Queue
    }

    async fn step(&mut self) -> Result<Next, CacheError> {
        let config = self.ctx.config();
        let adopted = self.ctx.driver.adopt_queue_markers().await?;
        if adopted > 0 {
            info!(adopted, "adopted queue markers into the queue");
        }
        // Queued rows wake the prefetcher, also those this pass did not adopt: a
        // read-through fill writes its marker before its row (`queue_claimable`), so
        // the watcher's nudge for the marker can reach this loop before the row exists,
        // and this pass may then find the row already there.
        if self.ctx.refresh_queued().await? > 0 {
            self.ctx.nudges.prefetcher.notify_one();
        }
        Ok(Next::IdleUntil(Instant::now() + config.queue_interval()))
    }
}
