//! The node lease: taken at boot so a second daemon with the same `node.reference_url`
//! on the same database is refused, renewed by this loop while we run, released at a
//! clean shutdown. Losing it (a forced takeover) stops this daemon.
//!
//! With SQLite, each heartbeat also checks that the database's path still names the
//! file the daemon opened: a file deleted or replaced under it (an operator's `rm`, a
//! backup restored with `mv`) would leave the daemon on an orphaned inode while the CLI
//! and a second daemon use a new file. The daemon stops, and systemd restarts it on
//! the file the path names now.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{error, warn};

use super::context::Context;
use super::context::Task;
use super::error::DaemonError;
use super::worker::{Next, Worker};
use crate::clock;
use crate::db::{DbError, DbTime};

pub(crate) fn expired_before(ttl: Duration) -> DbTime {
    let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
    DbTime::from_utc(clock::now() - ttl)
}

/// The SQLite file the daemon opened: its path, and the device and inode it had then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DbFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl DbFile {
    /// The identity of the file at `path` now (taken once the pool has opened it);
    /// `None` when it cannot be read (an in-memory database has no file).
    pub(crate) fn identify(path: &Path) -> Option<DbFile> {
        let meta = std::fs::metadata(path).ok()?;
        Some(DbFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// Why the path no longer names the opened file, if it does not. A stat that fails
    /// otherwise (a permission change) is logged and not fatal.
    fn gone(&self) -> Option<DaemonError> {
        let what = match std::fs::metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == (self.dev, self.ino) => return None,
            Ok(_) => "was replaced by another file",
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "was deleted",
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "cannot check the SQLite database file");
                return None;
            }
        };
        Some(DaemonError::DatabaseFileGone {
            path: self.path.clone(),
            what,
        })
    }
}

pub(crate) struct LeaseWorker {
    ctx: Context,
    holder: String,
    db_file: Option<DbFile>,
    fatal: mpsc::UnboundedSender<DaemonError>,
}

impl LeaseWorker {
    pub(crate) fn new(
        ctx: Context,
        holder: String,
        db_file: Option<DbFile>,
        fatal: mpsc::UnboundedSender<DaemonError>,
    ) -> Self {
        LeaseWorker {
            ctx,
            holder,
            db_file,
            fatal,
        }
    }
}

impl Worker for LeaseWorker {
    type Error = DbError;

    fn task(&self) -> Task {
        Task::Lease
    }

    async fn step(&mut self) -> Result<Next, DbError> {
        let ttl = self.ctx.config().daemon.lease_ttl;
        if let Some(fatal) = self.db_file.as_ref().and_then(DbFile::gone) {
            error!("{fatal}");
            let _ = self.fatal.send(fatal);
            return Ok(Next::IdleUntil(Instant::now() + ttl / 3));
        }
        let now = DbTime::from_utc(clock::now());
        let db = &self.ctx.db;
        let held = db.db().renew_lease(db.node(), &self.holder, now).await;
        self.ctx.metrics.lease_renewal(matches!(held, Ok(true)));
        let held = held?;
        if !held {
            let fatal = DaemonError::LeaseLost {
                node: self.ctx.db.url().to_owned(),
            };
            error!("{fatal}");
            let _ = self.fatal.send(fatal);
        }
        Ok(Next::IdleUntil(Instant::now() + ttl / 3))
    }
}
