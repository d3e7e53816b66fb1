//! The hit flusher loop: writes the hits that serving (and nothing else in the daemon)
//! counted in memory, in one transaction per `http.hit_flush_interval`, and once more
//! as the loops stop. A failed flush keeps the hits for the next one (the runner backs
//! off as for any loop); memory stays one entry per image however long the database is
//! away. It also mirrors the readers table into the metrics at each step.
//!
//! Idle, it does not wake: with nothing pending it sleeps until the book's signal (the
//! first hit counted into an empty book, `CacheDriver::first_pending_hit`, which is this
//! loop's nudge), then waits one interval and flushes. A daemon that serves nothing
//! keeps no timer of its own here (the idle-wakeups benchmark).

use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

use super::context::{Context, Task};
use super::worker::{Next, Worker};
use crate::cache::CacheError;

/// How long an idle flusher sleeps when no signal comes: a bound, not a schedule (the
/// signal is a stored permit, so none is lost; this only caps the cost of a bug there).
const IDLE_WAIT: Duration = Duration::from_secs(3600);

pub(super) struct HitFlusherWorker {
    ctx: Context,
    /// Hits were pending at the end of the last step: this step writes them.
    armed: bool,
}

impl HitFlusherWorker {
    pub(super) fn new(ctx: Context) -> Self {
        HitFlusherWorker { ctx, armed: false }
    }
}

impl Worker for HitFlusherWorker {
    type Error = CacheError;

    fn task(&self) -> Task {
        Task::HitFlusher
    }

    async fn step(&mut self) -> Result<Next, CacheError> {
        if self.armed {
            let flushed = self.ctx.driver.flush_hits().await;
            self.ctx.publish_reader_metrics();
            let images = flushed?;
            self.armed = false;
            if images > 0 {
                debug!(images, "hits written");
            }
        }
        if self.ctx.driver.pending_hits().0 == 0 {
            // A hit counted from here on leaves a permit: the wait below ends at once.
            return Ok(Next::IdleUntil(Instant::now() + IDLE_WAIT));
        }
        // Hits pending: written one interval from now. A permit left by a hit counted
        // while the flush above had emptied the book is spent here, or it would end
        // this wait at once and, under steady serving, flush back to back.
        let signal = self.ctx.driver.first_pending_hit();
        std::pin::pin!(signal.notified()).enable();
        self.armed = true;
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

    use tokio::sync::watch;
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

    /// The image `img`, with its row (0 hits), for the hits counted in a test.
    async fn cached_image(ctx: &Context) -> ImageId {
        let now = DbTime::from_utc(crate::clock::now());
        ctx.db
            .upsert_cached_image("img", 1, None, now)
            .await
            .unwrap();
        ImageId::parse("img").unwrap()
    }

    /// The shutdown a SIGTERM starts (the supervisor cancels the loops' token) writes
    /// the hits still pending, long before the next interval.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_flushes_the_pending_hits() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = context(tmp.path(), Duration::from_secs(3600)).await;
        let image = cached_image(&ctx).await;
        let shutdown = CancellationToken::new();
        let board = ctx.board.clone();
        let running = tokio::spawn(worker::run(
            HitFlusherWorker::new(ctx.clone()),
            ctx.driver.first_pending_hit(),
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

    /// Idle, the flusher asks for no wake-up but the hit book's signal; the first hit
    /// arms it for one interval, at whose end it writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_flusher_waits_for_the_first_hit_then_one_interval() {
        let tmp = tempfile::tempdir().unwrap();
        let interval = Duration::from_secs(5);
        let ctx = context(tmp.path(), interval).await;
        let image = cached_image(&ctx).await;
        let mut flusher = HitFlusherWorker::new(ctx.clone());
        let asked = Instant::now();
        let Next::IdleUntil(wake) = flusher.step().await.unwrap() else {
            panic!("an idle flusher has nothing to do again");
        };
        assert!(
            wake >= asked + IDLE_WAIT,
            "idle, it sleeps past any interval"
        );
        ctx.driver.record_hit(&image);
        ctx.driver.record_hit(&image);
        // The signal's permit ends the runner's wait at once.
        tokio::time::timeout(
            Duration::from_secs(5),
            ctx.driver.first_pending_hit().notified(),
        )
        .await
        .expect("the first hit signals");
        let asked = Instant::now();
        let Next::IdleUntil(wake) = flusher.step().await.unwrap() else {
            panic!("armed, the flusher waits an interval");
        };
        assert!(wake >= asked + interval && wake < asked + IDLE_WAIT);
        assert_eq!(
            ctx.db.hit_count("img").await.unwrap(),
            0,
            "not before the interval"
        );
        // Counted into a book with hits pending: no signal, the interval stands.
        ctx.driver.record_hit(&image);
        let signal = ctx.driver.first_pending_hit();
        let woken = tokio::time::timeout(Duration::from_millis(100), signal.notified()).await;
        assert!(woken.is_err(), "no signal while hits are pending");
        flusher.step().await.unwrap();
        assert_eq!(ctx.db.hit_count("img").await.unwrap(), 3);
        let asked = Instant::now();
        let Next::IdleUntil(wake) = flusher.step().await.unwrap() else {
            panic!("idle again");
        };
        assert!(wake >= asked + IDLE_WAIT);
        ctx.db.db().close().await;
    }

    /// Within an interval of being counted, the hits are in the row.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_interval_writes_what_was_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = context(tmp.path(), Duration::from_millis(50)).await;
        let image = cached_image(&ctx).await;
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(worker::run(
            HitFlusherWorker::new(ctx.clone()),
            ctx.driver.first_pending_hit(),
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
