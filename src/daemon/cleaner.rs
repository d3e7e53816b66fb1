//! The cleaner loop: removes `invalid/` files (after `cleaner.invalid_grace`) and stalled
//! `incomplete/` files. It sleeps until the next file can become due, or the periodic
//! interval, whichever is first; the watcher wakes it when files appear.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info};

use super::context::Context;
use super::context::Task;
use super::worker::{Next, Worker};
use crate::cache::CacheError;
use crate::clock;

/// Wake a little after a file becomes due, so its mtime is strictly past the cutoff.
const DUE_SLACK: Duration = Duration::from_millis(20);

pub(super) struct CleanerWorker {
    ctx: Context,
}

impl CleanerWorker {
    pub(super) fn new(ctx: Context) -> Self {
        CleanerWorker { ctx }
    }
}

impl Worker for CleanerWorker {
    type Error = CacheError;

    fn task(&self) -> Task {
        Task::Cleaner
    }

    async fn step(&mut self) -> Result<Next, CacheError> {
        let config = self.ctx.config();
        let policy = config.clean_policy();
        let now = clock::system_now();
        let started = Instant::now();
        // Every pass also checks the layout itself: a subdirectory swapped for a symlink
        // shows in STATUS until it is restored (the watcher wakes this loop for it).
        let replaced = self.ctx.layout.replaced_dirs();
        self.ctx.board.set_replaced_dirs(replaced);
        let requests = &self.ctx.passes.clean;
        let ticket = requests.starting();
        let report = self
            .ctx
            .driver
            .clean(policy, now)
            .await
            .inspect_err(|e| requests.finished(ticket, Err(e.to_string())))?;
        requests.finished(ticket, Ok((report.files(), report.bytes())));
        if report.being_written > 0 {
            debug!(
                files = report.being_written,
                "left files alone that a writer still holds"
            );
        }
        if report.files() > 0 {
            info!(
                files = report.files(),
                bytes = report.bytes(),
                duration_ms = started.elapsed().as_millis() as u64,
                "clean pass removed files"
            );
        }
        self.ctx.board.cleaned(report.files(), report.bytes());
        self.ctx.metrics.cleaned(&report);
        let mut wake = Instant::now() + config.cleaner.interval;
        if let Some(due) = report.next_due {
            // Never past the interval: a far-future mtime must not overflow `Instant`.
            let wait = due.duration_since(now).unwrap_or(Duration::ZERO) + DUE_SLACK;
            wake = wake.min(Instant::now() + wait.min(config.cleaner.interval));
        }
        Ok(Next::IdleUntil(wake))
    }
}
