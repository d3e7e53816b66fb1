//! What the loops share, in a file of its own so that no loop imports from the file
//! that spawns it: the loops' names (`Task`), the nudges that wake them early, and the
//! `Context` each loop holds (the driver, the live configuration, the status board).

use std::fmt;
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Notify, watch};

use super::status::StatusBoard;
use crate::cache::{CacheDriver, CacheLayout};
use crate::config::Config;
use crate::db::NodeDb;
use crate::metrics::Metrics;

/// The background tasks, named in logs and the status table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Task {
    Cleaner,
    Pruner,
    Queue,
    Lease,
    Prefetcher,
    Watcher,
    Http,
    HitFlusher,
}

impl Task {
    /// The name in logs, STATUS and the metrics' `loop` label.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Task::Cleaner => "cleaner",
            Task::Pruner => "pruner",
            Task::Queue => "queue",
            Task::Lease => "lease",
            Task::Prefetcher => "prefetcher",
            Task::Watcher => "watcher",
            Task::Http => "http",
            Task::HitFlusher => "hits",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How loops are woken early.
#[derive(Clone, Default)]
pub(crate) struct Nudges {
    pub cleaner: Arc<Notify>,
    pub pruner: Arc<Notify>,
    pub queue: Arc<Notify>,
    pub prefetcher: Arc<Notify>,
    /// The hit flusher: the hit book's signal (`CacheDriver::first_pending_hit`), so an
    /// idle flusher wakes for the first hit; nudged by a reload too, so a new
    /// `http.hit_flush_interval` applies at once rather than after the old one's wait.
    pub hits: Arc<Notify>,
}

impl Nudges {
    pub(crate) fn all(&self) {
        self.cleaner.notify_one();
        self.pruner.notify_one();
        self.queue.notify_one();
        self.prefetcher.notify_one();
        self.hits.notify_one();
    }
}

/// How a pass is asked of a loop from outside it (the cache API's prune and clean): the
/// caller takes a ticket, nudges the loop and waits for the end of a pass that started
/// after its ticket, so a request is served by the loop's own pass (holding its turn)
/// and never runs beside it.
#[derive(Debug)]
pub(crate) struct PassRequests {
    requested: AtomicU64,
    done: watch::Sender<Option<PassDone>>,
}

/// The end of a pass: the highest ticket it serves, and its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PassDone {
    pub(crate) ticket: u64,
    /// Files and bytes removed, or the error that ended the pass.
    pub(crate) outcome: Result<(usize, u64), String>,
}

impl Default for PassRequests {
    fn default() -> Self {
        PassRequests {
            requested: AtomicU64::new(0),
            done: watch::Sender::new(None),
        }
    }
}

impl PassRequests {
    /// The loop, as a pass starts: the ticket this pass will serve.
    pub(crate) fn starting(&self) -> u64 {
        self.requested.load(Ordering::SeqCst)
    }

    /// The loop, as a pass ends (or fails).
    pub(crate) fn finished(&self, ticket: u64, outcome: Result<(usize, u64), String>) {
        self.done.send_replace(Some(PassDone { ticket, outcome }));
    }

    /// A caller: asks for a pass, wakes the loop with `nudge` and waits for a pass that
    /// started after the request; `None` if the loop is gone.
    pub(crate) async fn request(&self, nudge: &Notify) -> Option<PassDone> {
        let mut done = self.done.subscribe();
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        nudge.notify_one();
        let seen = done
            .wait_for(|d| d.as_ref().is_some_and(|d| d.ticket >= ticket))
            .await
            .ok()?;
        seen.clone()
    }
}

/// The loops that take pass requests.
#[derive(Clone, Default, Debug)]
pub(crate) struct Passes {
    pub(crate) prune: Arc<PassRequests>,
    pub(crate) clean: Arc<PassRequests>,
}

/// What every loop shares.
#[derive(Clone)]
pub(crate) struct Context {
    pub driver: CacheDriver,
    /// This node's database, for what is not the cache's (the lease, the queue count).
    pub db: NodeDb,
    /// The cache directory's held handles (the watcher, the cleaner's check of them).
    pub layout: CacheLayout,
    pub config: watch::Receiver<Arc<Config>>,
    pub board: Arc<StatusBoard>,
    pub nudges: Nudges,
    /// The Prometheus metrics (the board mirrors its figures into them too).
    pub metrics: Arc<Metrics>,
    /// Passes asked of the pruner and the cleaner from outside (the cache API).
    pub(crate) passes: Passes,
}

impl Context {
    /// Mirrors the readers table and the hit book into the metrics: the hit flusher
    /// after each flush, and a scrape before it encodes (an idle flusher does not step).
    pub(crate) fn publish_reader_metrics(&self) {
        let (images, hits) = self.driver.pending_hits();
        self.metrics
            .set_readers(&self.driver.reader_stats(), images, hits);
    }

    /// The current configuration (swapped by a reload).
    pub(crate) fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    /// Counts the queue for the status board; returns the count.
    pub(crate) async fn refresh_queued(&self) -> Result<usize, crate::cache::CacheError> {
        let (queued, failed) = self.db.count_queue_states().await?;
        let (queued, failed) = (queued.max(0) as usize, failed.max(0) as usize);
        self.board.set_queued(queued);
        self.metrics.set_queue(queued, failed);
        Ok(queued)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A request made while a pass runs is not answered by that pass's end (it started
    /// before the request, and may have passed what the caller wants removed), but by
    /// the next pass, which the nudge starts.
    #[tokio::test(start_paused = true)]
    async fn a_request_is_served_by_a_pass_that_started_after_it() {
        let requests = Arc::new(PassRequests::default());
        let nudge = Arc::new(Notify::new());
        let running = requests.starting();
        let caller = {
            let (requests, nudge) = (requests.clone(), nudge.clone());
            tokio::spawn(async move { requests.request(&nudge).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        requests.finished(running, Ok((1, 10)));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            !caller.is_finished(),
            "answered by a pass older than the request"
        );
        // The loop was nudged, so it starts the next pass at once.
        tokio::time::timeout(Duration::from_secs(1), nudge.notified())
            .await
            .expect("the loop is nudged");
        let next = requests.starting();
        requests.finished(next, Ok((2, 20)));
        let done = caller.await.unwrap().unwrap();
        assert_eq!(done.outcome, Ok((2, 20)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_pass_answers_with_its_error() {
        let requests = Arc::new(PassRequests::default());
        let nudge = Arc::new(Notify::new());
        let caller = {
            let (requests, nudge) = (requests.clone(), nudge.clone());
            tokio::spawn(async move { requests.request(&nudge).await })
        };
        nudge.notified().await;
        let ticket = requests.starting();
        requests.finished(ticket, Err("disk on fire".into()));
        let done = caller.await.unwrap().unwrap();
        assert_eq!(done.outcome, Err("disk on fire".into()));
    }
}
