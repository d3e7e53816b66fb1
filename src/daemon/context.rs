//! What the loops share, in a file of its own so that no loop imports from the file
//! that spawns it: the loops' names (`Task`), the nudges that wake them early, and the
//! `Context` each loop holds (the driver, the live configuration, the status board).

use std::fmt;
use std::sync::Arc;

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
}

impl Nudges {
    pub(crate) fn all(&self) {
        self.cleaner.notify_one();
        self.pruner.notify_one();
        self.queue.notify_one();
        self.prefetcher.notify_one();
    }
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
}

impl Context {
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
