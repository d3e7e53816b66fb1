//! The daemon's errors: a boot that cannot complete, and the fatal conditions the
//! supervisor stops on (exit 1, and systemd restarts the service).

use std::path::PathBuf;

use crate::cache::CacheError;
use crate::db::DbError;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Db(#[from] DbError),
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
    #[error("{0}")]
    Fatal(String),
}
