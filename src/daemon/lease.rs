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

use super::Context;
use super::Task;
use super::worker::{Next, Worker};
use crate::clock;
use crate::db::{DbError, DbTime};

/// The name a daemon holds its lease and its queue claims under: host and process, so
/// the refusal message tells the operator where the other daemon runs.
pub fn holder_name() -> String {
    format!("{}{}", holder_prefix(), std::process::id())
}

/// What a `prefetch` command's claims are held under, before its [`holder_name`].
const PREFETCH_COMMAND: &str = "prefetch on ";

/// The name a `glance-cached prefetch` command holds its queue claims under.
pub fn prefetch_command_holder_name() -> String {
    format!("{PREFETCH_COMMAND}{}", holder_name())
}

/// "<host> pid ": what every holder name of this host starts with.
fn holder_prefix() -> String {
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    format!("{host} pid ")
}

/// What this host can tell of the process a holder name (a daemon's or a `prefetch`
/// command's) points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HolderState {
    /// A glance-cached process on this host with that pid is running.
    Running,
    /// No process with that pid runs here, or one of another program (the pid was
    /// reused after a crash).
    Gone,
    /// Another host's process, or a name not of our making: nothing can be told.
    Unknown,
}

/// A holder naming this process's pid is a predecessor's (in a container the daemon is
/// pid 1 at every start): callers that hold claims compare their own holder name first
/// (`claim_may_be_live`).
pub fn holder_state(holder: &str) -> HolderState {
    let name = holder.strip_prefix(PREFETCH_COMMAND).unwrap_or(holder);
    let Some(pid) = name
        .strip_prefix(&holder_prefix())
        .and_then(|p| p.parse::<i32>().ok())
        .and_then(rustix::process::Pid::from_raw)
    else {
        return HolderState::Unknown;
    };
    if pid.as_raw_nonzero().get() as u32 == std::process::id() {
        return HolderState::Gone;
    }
    match rustix::process::test_kill_process(pid) {
        Err(rustix::io::Errno::SRCH) => HolderState::Gone,
        // EPERM: it exists, as another user's process.
        _ if runs_this_program(pid) => HolderState::Running,
        _ => HolderState::Gone,
    }
}

/// Whether a queue claim held by `holder` must stay while this process, holding claims
/// as `own`, runs: ours, a running process's, or one this host cannot check.
pub fn claim_may_be_live(own: &str, holder: &str) -> bool {
    holder == own || holder_state(holder) != HolderState::Gone
}

/// Whether `pid` runs the same program as this process, by the kernel's command name.
/// When that cannot be read (`/proc` mounted with `hidepid`), the process is taken to
/// be ours: wrongly thinking a holder gone could run two downloads of one image, or two
/// daemons for one node.
fn runs_this_program(pid: rustix::process::Pid) -> bool {
    let comm = |path: String| std::fs::read(path).ok();
    match (
        comm(format!("/proc/{}/comm", pid.as_raw_nonzero())),
        comm("/proc/self/comm".to_owned()),
    ) {
        (Some(theirs), Some(ours)) => theirs == ours,
        _ => true,
    }
}

pub fn expired_before(ttl: Duration) -> DbTime {
    let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
    DbTime::from_utc(clock::now() - ttl)
}

/// The SQLite file the daemon opened: its path, and the device and inode it had then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl DbFile {
    /// The identity of the file at `path` now (taken once the pool has opened it);
    /// `None` when it cannot be read (an in-memory database has no file).
    pub fn identify(path: &Path) -> Option<DbFile> {
        let meta = std::fs::metadata(path).ok()?;
        Some(DbFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// Why the path no longer names the opened file, if it does not. A stat that fails
    /// otherwise (a permission change) is logged and not fatal.
    fn gone(&self) -> Option<String> {
        let what = match std::fs::metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == (self.dev, self.ino) => return None,
            Ok(_) => "was replaced by another file",
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "was deleted",
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "cannot check the SQLite database file");
                return None;
            }
        };
        Some(format!(
            "the SQLite database {} {what} while the daemon ran on it; stopping so that a restart opens the file the path names now",
            self.path.display()
        ))
    }
}

pub struct LeaseWorker {
    ctx: Context,
    holder: String,
    db_file: Option<DbFile>,
    fatal: mpsc::UnboundedSender<String>,
}

impl LeaseWorker {
    pub fn new(
        ctx: Context,
        holder: String,
        db_file: Option<DbFile>,
        fatal: mpsc::UnboundedSender<String>,
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
        if let Some(message) = self.db_file.as_ref().and_then(DbFile::gone) {
            error!("{message}");
            let _ = self.fatal.send(message);
            return Ok(Next::IdleUntil(Instant::now() + ttl / 3));
        }
        let now = DbTime::from_utc(clock::now());
        let held = self
            .ctx
            .driver
            .db()
            .renew_lease(self.ctx.driver.node(), &self.holder, now)
            .await?;
        if !held {
            let message = format!(
                "lost the lease on node {:?}: another daemon took it over (started with --force?)",
                self.ctx.driver.node_url()
            );
            error!("{message}");
            let _ = self.fatal.send(message);
        }
        Ok(Next::IdleUntil(Instant::now() + ttl / 3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(pid: u32) -> String {
        format!("{}{pid}", holder_prefix())
    }

    #[test]
    fn holders_are_told_apart_by_host_pid_and_program() {
        // Another host's process, or a name not of our making: nothing can be told.
        assert_eq!(
            holder_state("elsewhere.example pid 1"),
            HolderState::Unknown
        );
        assert_eq!(holder_state("worker-3"), HolderState::Unknown);
        assert_eq!(holder_state(&local(0)), HolderState::Unknown);
        // Our own pid is a predecessor's (we hold nothing yet when this is asked).
        assert_eq!(holder_state(&holder_name()), HolderState::Gone);
        assert_eq!(
            holder_state(&prefetch_command_holder_name()),
            HolderState::Gone
        );
        // A process that has exited.
        let mut exited = std::process::Command::new("true").spawn().unwrap();
        let exited_pid = exited.id();
        exited.wait().unwrap();
        assert_eq!(holder_state(&local(exited_pid)), HolderState::Gone);
        // A running process of another program: the pid was reused.
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let state = holder_state(&local(other.id()));
        let command_state = holder_state(&format!("{PREFETCH_COMMAND}{}", local(other.id())));
        other.kill().unwrap();
        other.wait().unwrap();
        assert_eq!(state, HolderState::Gone);
        assert_eq!(command_state, HolderState::Gone);
        // Ours, and live processes of this program, are kept by claim recovery.
        let own = holder_name();
        assert!(claim_may_be_live(&own, &own));
        assert!(claim_may_be_live(&own, "elsewhere.example pid 1"));
        assert!(!claim_may_be_live(&own, &local(exited_pid)));
    }
}
