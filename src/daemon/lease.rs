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
