//! The supervisor: owns the running loops from READY to exit. It turns signals into
//! shutdown or reload, feeds the systemd watchdog only while every loop is healthy, and
//! stops on a fatal condition (a loop that ended, a lost lease). Teardown cancels the
//! shared token, drains the loops at step boundaries under a deadline, and aborts and
//! names the stragglers.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::context::Task;
use super::error::DaemonError;
use super::signals::SignalCommand;
use super::status::StatusBoard;
use super::systemd;
use super::worker::{self, Worker};

/// The running loops and what stops them.
pub(super) struct Supervisor {
    tasks: JoinSet<Task>,
    board: Arc<StatusBoard>,
    shutdown: CancellationToken,
    fatal_tx: mpsc::UnboundedSender<DaemonError>,
    fatal_rx: mpsc::UnboundedReceiver<DaemonError>,
}

impl Supervisor {
    pub(super) fn new(board: Arc<StatusBoard>, shutdown: CancellationToken) -> Supervisor {
        let (fatal_tx, fatal_rx) = mpsc::unbounded_channel();
        Supervisor {
            tasks: JoinSet::new(),
            board,
            shutdown,
            fatal_tx,
            fatal_rx,
        }
    }

    /// Where a loop reports a condition that must stop the daemon.
    pub(super) fn fatal_sender(&self) -> mpsc::UnboundedSender<DaemonError> {
        self.fatal_tx.clone()
    }

    /// Runs `worker` under the runner until shutdown, woken early by `nudge`.
    pub(super) fn spawn_worker<W: Worker>(&mut self, worker: W, nudge: Arc<Notify>) {
        let (shutdown, board) = (self.shutdown.clone(), self.board.clone());
        let task = worker.task();
        self.tasks.spawn(async move {
            worker::run(worker, nudge, shutdown, board).await;
            task
        });
    }

    /// Runs a task that is not a `Worker` (the watcher's actor).
    pub(super) fn spawn_task(
        &mut self,
        task: Task,
        run: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        self.board.task_started(task);
        let board = self.board.clone();
        self.tasks.spawn(async move {
            run.await;
            board.task_ended(task);
            task
        });
    }

    /// Supervises until a shutdown signal (`Ok`) or a fatal condition (`Err`). `reload`
    /// runs for each SIGHUP. The board's changes are sent as STATUS from here, so
    /// nothing is sent after STOPPING.
    pub(super) async fn serve(
        &mut self,
        signals: &mut mpsc::UnboundedReceiver<SignalCommand>,
        watchdog: Option<Duration>,
        mut reload: impl FnMut(),
    ) -> Result<(), DaemonError> {
        let mut watchdog_tick =
            tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |w| w / 2));
        loop {
            tokio::select! {
                command = signals.recv() => match command {
                    Some(SignalCommand::Reload) => {
                        info!("SIGHUP: reloading configuration");
                        reload();
                    }
                    Some(SignalCommand::Shutdown(signal)) => {
                        info!(signal, "shutting down");
                        return Ok(());
                    }
                    None => return Err(DaemonError::SignalsEnded),
                },
                _ = watchdog_tick.tick(), if watchdog.is_some() => {
                    let unhealthy = self.board.unhealthy(watchdog.unwrap_or_default());
                    if unhealthy.is_empty() {
                        systemd::watchdog();
                    } else {
                        let names: Vec<String> = unhealthy.iter().map(Task::to_string).collect();
                        error!(tasks = %names.join(","), "loops are dead or stuck; withholding the watchdog ping so systemd restarts us");
                    }
                }
                ended = self.tasks.join_next() => return Err(match ended {
                    Some(Ok(task)) => DaemonError::LoopEnded { task },
                    Some(Err(e)) => DaemonError::LoopCrashed(e),
                    None => DaemonError::NoLoops,
                }),
                Some(fatal) = self.fatal_rx.recv() => return Err(fatal),
                _ = self.board.changed() => self.board.publish(),
            }
        }
    }

    /// Sends STOPPING, cancels the loops and waits for them at their step boundaries
    /// for at most `timeout`; aborts and names those still busy then, and returns them.
    pub(super) async fn teardown(mut self, timeout: Duration) -> Vec<Task> {
        systemd::stopping();
        self.shutdown.cancel();
        let drained = tokio::time::timeout(timeout, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_ok() {
            return Vec::new();
        }
        let busy = self.board.busy();
        let names: Vec<String> = busy.iter().map(Task::to_string).collect();
        warn!(tasks = %names.join(","), timeout_s = timeout.as_secs(), "loops did not stop in time; aborting them");
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        busy
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use tokio::time::Instant;

    use super::*;
    use crate::daemon::worker::Next;

    /// Idles between steps; its first step hangs when `stuck` (a wedged disk call).
    struct Fake {
        task: Task,
        stuck: bool,
        finished: Arc<AtomicBool>,
    }

    impl Fake {
        fn new(task: Task, stuck: bool) -> (Fake, Arc<AtomicBool>) {
            let finished = Arc::new(AtomicBool::new(false));
            let fake = Fake {
                task,
                stuck,
                finished: finished.clone(),
            };
            (fake, finished)
        }
    }

    impl Worker for Fake {
        type Error = String;

        fn task(&self) -> Task {
            self.task
        }

        async fn step(&mut self) -> Result<Next, String> {
            if self.stuck {
                std::future::pending::<()>().await;
            }
            Ok(Next::IdleUntil(Instant::now() + Duration::from_secs(3600)))
        }

        async fn finish(&mut self) {
            self.finished.store(true, Ordering::SeqCst);
        }
    }

    /// Panics in its step.
    struct Crashing;

    impl Worker for Crashing {
        type Error = String;

        fn task(&self) -> Task {
            Task::Queue
        }

        async fn step(&mut self) -> Result<Next, String> {
            panic!("a bug in a loop");
        }
    }

    fn supervisor() -> Supervisor {
        Supervisor::new(Arc::new(StatusBoard::default()), CancellationToken::new())
    }

    fn spawn_fake(s: &mut Supervisor, task: Task, stuck: bool) -> Arc<AtomicBool> {
        let (fake, finished) = Fake::new(task, stuck);
        s.spawn_worker(fake, Arc::new(Notify::new()));
        finished
    }

    /// Serves until a fatal condition or a shutdown; the signals are `commands`, and
    /// the stream stays open after them.
    async fn serve_with(
        s: &mut Supervisor,
        commands: &[SignalCommand],
    ) -> (Result<(), DaemonError>, usize) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        for command in commands {
            tx.send(*command).unwrap();
        }
        let reloads = AtomicUsize::new(0);
        let outcome = tokio::time::timeout(
            Duration::from_secs(3600),
            s.serve(&mut rx, None, || {
                reloads.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .await
        .expect("the supervisor returns");
        drop(tx);
        (outcome, reloads.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn teardown_drains_loops_at_step_boundaries() {
        let mut s = supervisor();
        let cleaner = spawn_fake(&mut s, Task::Cleaner, false);
        let pruner = spawn_fake(&mut s, Task::Pruner, false);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = Instant::now();
        let stragglers = s.teardown(Duration::from_secs(30)).await;
        assert_eq!(stragglers, []);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(cleaner.load(Ordering::SeqCst) && pruner.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn teardown_aborts_and_names_the_loops_still_busy_at_the_deadline() {
        let mut s = supervisor();
        let cleaner = spawn_fake(&mut s, Task::Cleaner, false);
        spawn_fake(&mut s, Task::Pruner, true);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = Instant::now();
        let stragglers = tokio::time::timeout(
            Duration::from_secs(3600),
            s.teardown(Duration::from_secs(5)),
        )
        .await
        .expect("teardown keeps its deadline");
        assert_eq!(stragglers, [Task::Pruner]);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
            "{waited:?}"
        );
        assert!(cleaner.load(Ordering::SeqCst), "the idle loop drained");
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_ends_is_fatal() {
        let mut s = supervisor();
        spawn_fake(&mut s, Task::Cleaner, false);
        s.spawn_task(Task::Watcher, async {});
        let (outcome, _) = serve_with(&mut s, &[]).await;
        assert!(
            matches!(
                outcome,
                Err(DaemonError::LoopEnded {
                    task: Task::Watcher
                })
            ),
            "{outcome:?}"
        );
        let message = outcome.unwrap_err().to_string();
        assert_eq!(message, "the watcher loop stopped unexpectedly");
        s.teardown(Duration::from_secs(5)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_panics_is_fatal() {
        let mut s = supervisor();
        spawn_fake(&mut s, Task::Cleaner, false);
        s.spawn_worker(Crashing, Arc::new(Notify::new()));
        let (outcome, _) = serve_with(&mut s, &[]).await;
        assert!(
            matches!(&outcome, Err(DaemonError::LoopCrashed(e)) if e.is_panic()),
            "{outcome:?}"
        );
        s.teardown(Duration::from_secs(5)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_fatal_report_stops_the_supervisor_with_its_error() {
        let mut s = supervisor();
        spawn_fake(&mut s, Task::Lease, false);
        s.fatal_sender()
            .send(DaemonError::LeaseLost {
                node: "http://node-a:9292".into(),
            })
            .unwrap();
        let (outcome, _) = serve_with(&mut s, &[]).await;
        assert!(
            matches!(&outcome, Err(DaemonError::LeaseLost { node }) if node == "http://node-a:9292"),
            "{outcome:?}"
        );
        s.teardown(Duration::from_secs(5)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn signals_reload_then_shut_down() {
        let mut s = supervisor();
        spawn_fake(&mut s, Task::Cleaner, false);
        let commands = [
            SignalCommand::Reload,
            SignalCommand::Reload,
            SignalCommand::Shutdown("SIGTERM"),
        ];
        let (outcome, reloads) = serve_with(&mut s, &commands).await;
        assert!(outcome.is_ok(), "{outcome:?}");
        assert_eq!(reloads, 2);
        assert_eq!(s.teardown(Duration::from_secs(5)).await, []);
    }
}
