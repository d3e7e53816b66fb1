//! The loop runtime: one `Worker` trait for every background loop and one runner that
//! owns what loops should not: waiting, nudges, error counting, capped exponential
//! backoff, status and cancellation. A worker does one bounded step and says when it
//! wants the next.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::context::Task;
use super::status::StatusBoard;

/// What a worker wants after a step.
///
/// There is no `Done`: every loop of the daemon runs for the life of the process, and
/// the supervisor takes a loop that ends for a dead one (`DaemonError::LoopEnded`).
/// A worker that could finish for good would need the supervisor to tell the two apart;
/// add the variant with the first such worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// Nothing to do until this instant, or until nudged.
    IdleUntil(Instant),
    /// More work is due: step again at once. Long work is cut into such steps, so each
    /// step stays bounded and the watchdog judges each one, not the whole work.
    Again,
}

/// First and longest pause after failed steps: from one second, doubling, up to a minute,
/// so an outage is retried promptly but a dead database is not hammered.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

pub(super) fn backoff(failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
    BACKOFF_FIRST.saturating_mul(factor).min(BACKOFF_MAX)
}

pub(super) trait Worker: Send + 'static {
    type Error: std::fmt::Display + Send;

    fn task(&self) -> Task;

    /// One bounded step of work.
    fn step(&mut self) -> impl Future<Output = Result<Next, Self::Error>> + Send;

    /// Called once after shutdown, to wait for work the worker started in the
    /// background (the prefetcher's downloads).
    fn finish(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Runs `worker` until `shutdown`, stepping when due or when `nudge` fires. Shutdown is
/// observed at step boundaries: a step in progress finishes (the supervisor's deadline
/// aborts one that does not).
pub(super) async fn run<W: Worker>(
    mut worker: W,
    nudge: Arc<Notify>,
    shutdown: CancellationToken,
    board: Arc<StatusBoard>,
) {
    let task = worker.task();
    board.task_started(task);
    debug!(%task, "loop started");
    while !shutdown.is_cancelled() {
        board.step_started(task);
        let result = worker.step().await;
        let wake_at = match result {
            Ok(next) => {
                if board.step_finished(task, None) {
                    info!(%task, "loop recovered");
                }
                match next {
                    Next::IdleUntil(at) => at,
                    Next::Again => {
                        // Let the other tasks of this worker thread run between steps.
                        tokio::task::yield_now().await;
                        continue;
                    }
                }
            }
            Err(error) => {
                // Every failed step backs off alike, not classified as transient or
                // permanent: a loop's errors come from the database or the disk, both of
                // which an operator can repair under a running daemon, and STATUS shows
                // the error either way.
                let message = error.to_string();
                board.step_finished(task, Some(message.clone()));
                let failures = board.consecutive_failures(task);
                let delay = backoff(failures);
                warn!(%task, error = %message, failures, retry_in_ms = delay.as_millis() as u64, "loop step failed; backing off");
                // During a backoff nudges are ignored: they would only hammer whatever
                // is failing.
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(wake_at) => {}
            _ = nudge.notified() => {}
        }
    }
    worker.finish().await;
    board.task_ended(task);
    debug!(%task, "loop stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    const HOUR: Duration = Duration::from_secs(3600);

    /// Fails its first `failures` steps, then idles for an hour after each; reports the
    /// instant each step ran.
    struct Scripted {
        failures: u32,
        steps: mpsc::UnboundedSender<Instant>,
    }

    impl Worker for Scripted {
        type Error = String;

        fn task(&self) -> Task {
            Task::Cleaner
        }

        async fn step(&mut self) -> Result<Next, String> {
            let _ = self.steps.send(Instant::now());
            if self.failures > 0 {
                self.failures -= 1;
                return Err("database down".into());
            }
            Ok(Next::IdleUntil(Instant::now() + HOUR))
        }
    }

    struct Running {
        nudge: Arc<Notify>,
        board: Arc<StatusBoard>,
        steps: mpsc::UnboundedReceiver<Instant>,
        _shutdown: tokio_util::sync::DropGuard,
    }

    fn start(failures: u32) -> Running {
        let (tx, steps) = mpsc::unbounded_channel();
        let (nudge, board) = (Arc::new(Notify::new()), Arc::new(StatusBoard::default()));
        let shutdown = CancellationToken::new();
        let worker = Scripted {
            failures,
            steps: tx,
        };
        tokio::spawn(run(worker, nudge.clone(), shutdown.clone(), board.clone()));
        Running {
            nudge,
            board,
            steps,
            _shutdown: shutdown.drop_guard(),
        }
    }

    /// `a` is `b` to the millisecond (the paused clock's timers are exact to a tick).
    fn about(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) <= Duration::from_millis(1)
    }

    #[tokio::test(start_paused = true)]
    async fn failed_steps_back_off_exponentially_up_to_a_cap_deaf_to_nudges_then_resume() {
        let failures = 9;
        let mut w = start(failures);
        // Nudges all through the backoffs: none of them may cut one short.
        let nudger = tokio::spawn({
            let nudge = w.nudge.clone();
            async move {
                loop {
                    nudge.notify_one();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        let mut at = Vec::new();
        for _ in 0..=failures {
            at.push(w.steps.recv().await.unwrap());
        }
        nudger.abort();
        let gaps: Vec<Duration> = at.windows(2).map(|p| p[1] - p[0]).collect();
        let expected = [1, 2, 4, 8, 16, 32, 60, 60, 60].map(Duration::from_secs);
        assert!(
            gaps.iter().zip(&expected).all(|(g, e)| about(*g, *e)),
            "{gaps:?}"
        );
        // The last step succeeded. A nudge left over from the backoffs may still step
        // once more at that instant; after that, the runner is idle...
        tokio::time::sleep(Duration::from_secs(60)).await;
        while let Ok(extra) = w.steps.try_recv() {
            assert_eq!(extra, at[9]);
        }
        assert_eq!(w.board.consecutive_failures(Task::Cleaner), 0);
        assert!(!w.board.line().contains("failing"), "{}", w.board.line());
        // ...listens to nudges again at once...
        w.nudge.notify_one();
        let nudged = w.steps.recv().await.unwrap();
        assert!(about(nudged - at[9], Duration::from_secs(60)));
        // ...and, not nudged, waits for the worker's own `IdleUntil`.
        let idle_end = w.steps.recv().await.unwrap();
        assert!(about(idle_end - nudged, HOUR), "{:?}", idle_end - nudged);
    }

    #[tokio::test(start_paused = true)]
    async fn a_nudge_wakes_an_idle_worker_before_its_idle_until() {
        let mut w = start(0);
        let first = w.steps.recv().await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        w.nudge.notify_one();
        let second = w.steps.recv().await.unwrap();
        assert!(
            about(second - first, Duration::from_secs(5)),
            "{:?}",
            second - first
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(7), Duration::from_secs(60));
        assert_eq!(backoff(1000), Duration::from_secs(60));
    }
}
