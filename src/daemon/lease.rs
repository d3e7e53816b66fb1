//! The node lease: taken at boot so a second daemon with the same `node.reference_url`
//! on the same database is refused, renewed by this loop while we run, released at a
//! clean shutdown. Losing it (a forced takeover) stops this daemon.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::error;

use super::Context;
use super::Task;
use super::worker::{Next, Worker};
use crate::clock;
use crate::db::{DbError, DbTime};

/// The name a daemon holds its lease under: host and process, so the refusal message
/// tells the operator where the other daemon runs.
pub fn holder_name() -> String {
    format!("{}{}", holder_prefix(), std::process::id())
}

/// "<host> pid ": what every holder name of this host starts with.
fn holder_prefix() -> String {
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    format!("{host} pid ")
}

/// Whether `holder` names a process on this host that no longer exists (a crashed
/// daemon whose lease has not expired yet): its lease may be taken over at once.
pub fn holder_is_dead_local_process(holder: &str) -> bool {
    let Some(pid) = holder
        .strip_prefix(&holder_prefix())
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return false;
    };
    match rustix::process::Pid::from_raw(pid) {
        Some(pid) => matches!(
            rustix::process::test_kill_process(pid),
            Err(rustix::io::Errno::SRCH)
        ),
        None => false,
    }
}

pub fn expired_before(ttl: Duration) -> DbTime {
    let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
    DbTime::from_utc(clock::now() - ttl)
}

pub struct LeaseWorker {
    ctx: Context,
    holder: String,
    fatal: mpsc::UnboundedSender<String>,
}

impl LeaseWorker {
    pub fn new(ctx: Context, holder: String, fatal: mpsc::UnboundedSender<String>) -> Self {
        LeaseWorker { ctx, holder, fatal }
    }
}

impl Worker for LeaseWorker {
    type Error = DbError;

    fn task(&self) -> Task {
        Task::Lease
    }

    async fn step(&mut self) -> Result<Next, DbError> {
        let ttl = self.ctx.config().daemon.lease_ttl;
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
