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
pub struct Supervisor {
    tasks: JoinSet<Task>,
    board: Arc<StatusBoard>,
    shutdown: CancellationToken,
    fatal_tx: mpsc::UnboundedSender<DaemonError>,
    fatal_rx: mpsc::UnboundedReceiver<DaemonError>,
}

impl Supervisor {
    pub fn new(board: Arc<StatusBoard>, shutdown: CancellationToken) -> Supervisor {
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
    pub fn fatal_sender(&self) -> mpsc::UnboundedSender<DaemonError> {
        self.fatal_tx.clone()
    }

    /// Runs `worker` under the runner until shutdown, woken early by `nudge`.
    pub fn spawn_worker<W: Worker>(&mut self, worker: W, nudge: Arc<Notify>) {
        let (shutdown, board) = (self.shutdown.clone(), self.board.clone());
        let task = worker.task();
        self.tasks.spawn(async move {
            worker::run(worker, nudge, shutdown, board).await;
            task
        });
    }

    /// Runs a task that is not a `Worker` (the watcher's actor).
    pub fn spawn_task(
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
    pub async fn serve(
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
    pub async fn teardown(mut self, timeout: Duration) -> Vec<Task> {
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
