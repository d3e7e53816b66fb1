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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::{Notify, watch};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::cache::{CacheDriver, CacheLayout};
    use crate::config::Config;
    use crate::daemon::status::StatusBoard;
    use crate::daemon::worker;
    use crate::db::{Db, DbOptions, DbTime, NodeDb};
    use crate::image_id::ImageId;
    use crate::metrics::Metrics;

    /// The loop's context on a SQLite database in `dir`, flushing every `interval`.
    async fn context(dir: &std::path::Path, interval: Duration) -> Context {
        let file = dir.join("glance-cached.toml");
        let text = format!(
            "[cache]\ndir = \"{}\"\n[http]\nhit_flush_interval = \"{}ms\"\n",
            dir.join("cache").display(),
            interval.as_millis()
        );
        std::fs::write(&file, text).unwrap();
        let config = Config::load(Some(&file)).unwrap();
        let layout = CacheLayout::open(&config.cache.dir).unwrap();
        let url = format!("sqlite://{}", dir.join("test.db").display());
        let db = Db::connect(&url, &DbOptions::default()).await.unwrap();
        let db = NodeDb::configure(db, "http://node:9292").await.unwrap();
        Context {
            driver: CacheDriver::new(layout.clone(), db.clone()),
            db,
            layout,
            config: watch::channel(Arc::new(config)).1,
            board: Arc::new(StatusBoard::default()),
            nudges: Default::default(),
            metrics: Arc::new(Metrics::new()),
            passes: Default::default(),
        }
    }

    /// The shutdown a SIGTERM starts (the supervisor cancels the loops' token) writes
    /// the hits still pending, long before the next interval.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_flushes_the_pending_hits() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = context(tmp.path(), Duration::from_secs(3600)).await;
        let image = ImageId::parse("img").unwrap();
        let now = DbTime::from_utc(crate::clock::now());
        ctx.db
            .upsert_cached_image("img", 1, None, now)
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let board = ctx.board.clone();
        let running = tokio::spawn(worker::run(
            HitFlusherWorker::new(ctx.clone()),
            Arc::new(Notify::new()),
            shutdown.clone(),
            board,
        ));
        // The first step ran at start (nothing to write); these wait an hour.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..5 {
            ctx.driver.record_hit(&image);
        }
        assert_eq!(ctx.db.hit_count("img").await.unwrap(), 0);
        shutdown.cancel();
        running.await.unwrap();
        assert_eq!(ctx.db.hit_count("img").await.unwrap(), 5);
        assert_eq!(ctx.driver.pending_hits(), (0, 0));
        ctx.db.db().close().await;
    }

    /// Within an interval of being counted, the hits are in the row.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_interval_writes_what_was_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = context(tmp.path(), Duration::from_millis(50)).await;
        let image = ImageId::parse("img").unwrap();
        let now = DbTime::from_utc(crate::clock::now());
        ctx.db
            .upsert_cached_image("img", 1, None, now)
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(worker::run(
            HitFlusherWorker::new(ctx.clone()),
            Arc::new(Notify::new()),
            shutdown.clone(),
            ctx.board.clone(),
        ));
        for _ in 0..3 {
            ctx.driver.record_hit(&image);
        }
        let mut seen = 0;
        for _ in 0..200 {
            seen = ctx.db.hit_count("img").await.unwrap();
            if seen == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(seen, 3);
        shutdown.cancel();
        running.await.unwrap();
        ctx.db.db().close().await;
    }
}
