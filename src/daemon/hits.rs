//! The hit flusher loop: writes the hits that serving (and nothing else in the daemon)
//! counted in memory, in one transaction per `http.hit_flush_interval`, and once more
//! as the loops stop. A failed flush keeps the hits for the next one (the runner backs
//! off as for any loop); memory stays one entry per image however long the database is
//! away. It also mirrors the readers table into the metrics at each step.

use tokio::time::Instant;
use tracing::{debug, warn};

use super::context::{Context, Task};
use super::worker::{Next, Worker};
use crate::cache::CacheError;

pub(super) struct HitFlusherWorker {
    ctx: Context,
}

impl HitFlusherWorker {
    pub(super) fn new(ctx: Context) -> Self {
        HitFlusherWorker { ctx }
    }

    fn publish_metrics(&self) {
        let (images, hits) = self.ctx.driver.pending_hits();
        self.ctx
            .metrics
            .set_readers(&self.ctx.driver.reader_stats(), images, hits);
    }
}

impl Worker for HitFlusherWorker {
    type Error = CacheError;

    fn task(&self) -> Task {
        Task::HitFlusher
    }

    async fn step(&mut self) -> Result<Next, CacheError> {
        let flushed = self.ctx.driver.flush_hits().await;
        self.publish_metrics();
        let images = flushed?;
        if images > 0 {
            debug!(images, "hits written");
        }
        Ok(Next::IdleUntil(
            Instant::now() + self.ctx.config().http.hit_flush_interval,
        ))
    }

    /// The last flush, before the database closes (the supervisor's deadline bounds it).
    async fn finish(&mut self) {
        if let Err(error) = self.ctx.driver.flush_hits().await {
            let (images, hits) = self.ctx.driver.pending_hits();
            warn!(%error, images, hits, "could not write the last hits at shutdown; they are lost");
        }
    }
}
