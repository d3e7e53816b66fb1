//! The daemon's errors: a boot that cannot complete, and the fatal conditions the
//! supervisor stops on (exit 1, and systemd restarts the service).

use std::path::PathBuf;

use super::context::Task;
use crate::cache::CacheError;
use crate::db::DbError;
use crate::upstream::UpstreamError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum DaemonError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    #[error(
        "node {node:?} is already served by another glance-cached ({holder}, last heartbeat {age}s ago); stop it, or start with --force if it is gone"
    )]
    NodeTaken {
        node: String,
        holder: String,
        age: i64,
    },
    #[error(
        "cache directory {dir:?} is in use by another glance-cached daemon on this host (it holds the directory's lock); stop it first"
    )]
    DirectoryInUse { dir: PathBuf },
    #[error("cannot lock the cache directory {dir:?}: {source}")]
    DirectoryLock {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    DbLocation(#[from] crate::db::location::LocationError),
    /// A shutdown signal came during start-up: not a failure.
    #[error("stopped by {0} during start-up")]
    Stopped(&'static str),
    #[error("cannot listen for signals: {0}")]
    Signals(std::io::Error),
    #[error("cannot watch the cache directory: {0}")]
    Watch(#[from] notify::Error),
    /// The configured `[upstream]` cannot be set up (its HTTP client, its CA bundle).
    #[error("{0}")]
    Config(#[source] UpstreamError),
    /// The signal stream the daemon was given ended.
    #[error("signal listener stopped")]
    SignalsEnded,
    /// A loop returned while the daemon was not shutting down.
    #[error("the {task} loop stopped unexpectedly")]
    LoopEnded { task: Task },
    /// A loop panicked (or was cancelled from outside).
    #[error("a loop crashed: {0}")]
    LoopCrashed(#[source] tokio::task::JoinError),
    /// No loop is left to supervise.
    #[error("every loop stopped")]
    NoLoops,
    /// Another daemon took the node's lease over (started with `--force`).
    #[error("lost the lease on node {node:?}: another daemon took it over (started with --force?)")]
    LeaseLost { node: String },
    /// The SQLite file the daemon opened is no longer the one its path names.
    #[error(
        "the SQLite database {} {what} while the daemon ran on it; stopping so that a restart opens the file the path names now",
        .path.display()
    )]
    DatabaseFileGone { path: PathBuf, what: &'static str },
}
