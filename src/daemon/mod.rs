//! The daemon: `glance-cached run`. A boot script (config, database, node, lease,
//! reconcile, loops, READY), a supervisor that turns signals into shutdown or reload and
//! feeds the systemd watchdog while the loops are healthy, and a teardown script that
//! drains the loops at step boundaries under a hard deadline.

mod cleaner;
pub(crate) mod lease;
mod prefetcher;
mod pruner;
mod queue;
mod reload;
pub(crate) mod signals;
mod status;
mod systemd;
mod watcher;
mod worker;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cache::{CacheDriver, CacheError, CacheLayout, CleanPolicy};
use crate::clock;
use crate::config::Config;
use crate::db::{Db, DbError, DbTime, LeaseOutcome};
use crate::telemetry::LogLevelHandle;

pub use signals::SignalCommand;
pub use status::StatusBoard;

/// The background tasks, named in logs and the status table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Task {
    Cleaner,
    Pruner,
    Queue,
    Lease,
    Prefetcher,
    Watcher,
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Task::Cleaner => "cleaner",
            Task::Pruner => "pruner",
            Task::Queue => "queue",
            Task::Lease => "lease",
            Task::Prefetcher => "prefetcher",
            Task::Watcher => "watcher",
        })
    }
}

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
    #[error(transparent)]
    DbLocation(#[from] crate::db::location::LocationError),
    #[error("cannot listen for signals: {0}")]
    Signals(std::io::Error),
    #[error("cannot watch the cache directory: {0}")]
    Watch(#[from] notify::Error),
    #[error("{0}")]
    Fatal(String),
}

/// How loops are woken early.
#[derive(Clone, Default)]
pub struct Nudges {
    pub cleaner: Arc<Notify>,
    pub pruner: Arc<Notify>,
    pub queue: Arc<Notify>,
    pub prefetcher: Arc<Notify>,
}

impl Nudges {
    pub fn all(&self) {
        self.cleaner.notify_one();
        self.pruner.notify_one();
        self.queue.notify_one();
        self.prefetcher.notify_one();
    }
}

/// What every loop shares.
#[derive(Clone)]
pub struct Context {
    pub driver: CacheDriver,
    pub config: watch::Receiver<Arc<Config>>,
    pub board: Arc<StatusBoard>,
    pub nudges: Nudges,
}

impl Context {
    /// The current configuration (swapped by a reload).
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    /// Counts the queue for the status line and publishes it.
    pub async fn publish_queue_status(&self) -> Result<(), crate::cache::CacheError> {
        let queued = self.driver.db().count_queued(self.driver.node()).await?;
        self.board.set_queued(queued.max(0) as usize);
        self.publish_status();
        Ok(())
    }

    /// Sends the status line to systemd when it changed.
    pub fn publish_status(&self) {
        if let Some(line) = self.board.line_if_changed() {
            systemd::status(&line);
        }
    }
}

/// Options of `glance-cached run` beyond the configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The file to re-read on SIGHUP.
    pub config_path: Option<PathBuf>,
    /// Take the node's lease even if another daemon seems to hold it.
    pub force: bool,
    /// Let the start-up reconcile drop the rows of missing files however many they are.
    pub force_reconcile: bool,
}

/// Runs the daemon until SIGTERM/SIGINT. Returns an error for a failed boot or a fatal
/// condition (a dead loop, a lost lease); a clean shutdown returns `Ok`.
pub async fn run(
    config: Config,
    options: RunOptions,
    log_level: Option<LogLevelHandle>,
) -> Result<(), DaemonError> {
    info!(version = env!("CARGO_PKG_VERSION"), config = ?options.config_path, "starting glance-cached");
    let mut signals = signals::listen().map_err(DaemonError::Signals)?;

    info!(dir = %config.cache.dir.display(), database = %crate::db::mask_url(&config.database.url), "opening the cache");
    let layout = CacheLayout::new(&config.cache.dir);
    let layout_for_check = layout.clone();
    tokio::task::spawn_blocking(move || layout_for_check.ensure())
        .await
        .expect("layout check panicked")
        .map_err(CacheError::from)?;
    let db_options = config.database.db_options();
    let url = prepare_database(&config).await?;
    let db = Db::connect(&url, &db_options).await?;
    let driver = CacheDriver::configure(layout, db, &config.node_reference_url).await?;
    // Taken once the pool has the file open (migrations ran on it).
    let db_file = driver
        .db()
        .sqlite_file()
        .and_then(|path| lease::DbFile::identify(&path));

    let holder = lease::holder_name();
    take_lease(&driver, &holder, &config, options.force).await?;

    let shutdown = CancellationToken::new();
    let result = serve(
        driver.clone(),
        config,
        db_file,
        &options,
        log_level,
        &holder,
        &mut signals,
        &shutdown,
    )
    .await;

    if let Err(error) = driver.db().release_lease(driver.node(), &holder).await {
        warn!(%error, "could not release the node lease; it expires by itself");
    }
    driver.db().close().await;
    match &result {
        Ok(()) => info!("stopped"),
        Err(e) => error!(error = %e, "stopped after a fatal error"),
    }
    result
}

/// Makes a SQLite database ready to open (its directory; a database at the old default
/// place moved in once no live daemon holds it). Returns the url to connect to.
pub async fn prepare_database(
    config: &Config,
) -> Result<String, crate::db::location::LocationError> {
    let ttl = config.daemon.lease_ttl;
    crate::db::location::prepare_sqlite(&config.database.url, &config.cache.dir, |holder, at| {
        at > lease::expired_before(ttl) && lease::holder_state(holder) != lease::HolderState::Gone
    })
    .await
}

async fn take_lease(
    driver: &CacheDriver,
    holder: &str,
    config: &Config,
    force: bool,
) -> Result<(), DaemonError> {
    let now = clock::now();
    let attempt = |force: bool| {
        driver.db().acquire_lease(
            driver.node(),
            holder,
            DbTime::from_utc(now),
            lease::expired_before(config.daemon.lease_ttl),
            force,
        )
    };
    let other = match attempt(force).await? {
        LeaseOutcome::Acquired => return Ok(()),
        LeaseOutcome::HeldBy(other) => other,
    };
    // A daemon on this host that crashed (kill -9, OOM) left a fresh lease: take it over
    // at once rather than fail every restart until it expires.
    if lease::holder_state(&other.holder) == lease::HolderState::Gone {
        warn!(previous = %other.holder, "taking over the lease of a daemon that is no longer running");
        if let LeaseOutcome::Acquired = attempt(true).await? {
            return Ok(());
        }
    }
    Err(DaemonError::NodeTaken {
        node: driver.node_url().to_owned(),
        holder: other.holder,
        age: (now - other.heartbeat_at.to_utc()).num_seconds(),
    })
}

/// Reconcile, start the loops, supervise, and tear down.
#[allow(clippy::too_many_arguments)]
async fn serve(
    driver: CacheDriver,
    config: Config,
    db_file: Option<lease::DbFile>,
    options: &RunOptions,
    log_level: Option<LogLevelHandle>,
    holder: &str,
    signals: &mut mpsc::UnboundedReceiver<SignalCommand>,
    shutdown: &CancellationToken,
) -> Result<(), DaemonError> {
    info!("reconciling disk and database");
    let report = driver
        .reconcile(
            CleanPolicy {
                stall_time: config.cache.stall_time,
                invalid_grace: config.cleaner.invalid_grace,
            },
            clock::system_now(),
            options.force_reconcile,
        )
        .await?;
    info!(
        adopted = report.adopted.len(),
        removed_rows = report.removed_rows.len(),
        resized = report.resized.len(),
        cleaned = report.cleaned.files(),
        "reconcile done"
    );
    // Under the node lease any claim is a dead process's, unless a `prefetch` command
    // is downloading beside us: its claims stay.
    let recovered = driver
        .recover_claims(|holder| {
            let running = lease::holder_state(holder) == lease::HolderState::Running;
            if running {
                info!(%holder, "left the claim of a download still running in another process");
            }
            running
        })
        .await?;
    if recovered > 0 {
        info!(recovered, "released the claims of interrupted downloads");
    }
    let upstream = match &config.upstream {
        Some(u) => Some(
            crate::upstream::Upstream::from_config(u)
                .map_err(|e| DaemonError::Fatal(e.to_string()))?,
        ),
        None => {
            info!("no [upstream] configured: queued images are not prefetched");
            None
        }
    };

    let board = Arc::new(StatusBoard::default());
    board.set_max_size(config.cache.max_size);
    let shutdown_timeout = config.daemon.shutdown_timeout;
    let (config_tx, config_rx) = watch::channel(Arc::new(config));
    let ctx = Context {
        driver: driver.clone(),
        config: config_rx,
        board: board.clone(),
        nudges: Nudges::default(),
    };
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel();
    let mut tasks: JoinSet<Task> = JoinSet::new();
    let status_ctx = ctx.clone();
    let on_change = move || status_ctx.publish_status();
    macro_rules! spawn_loop {
        ($worker:expr, $nudge:expr) => {{
            let (w, n, s, b, c) = (
                $worker,
                $nudge,
                shutdown.clone(),
                board.clone(),
                on_change.clone(),
            );
            let task = worker::Worker::task(&w);
            tasks.spawn(async move {
                worker::run(w, n, s, b, c).await;
                task
            });
        }};
    }
    spawn_loop!(
        cleaner::CleanerWorker::new(ctx.clone()),
        ctx.nudges.cleaner.clone()
    );
    spawn_loop!(
        pruner::PrunerWorker::new(ctx.clone()),
        ctx.nudges.pruner.clone()
    );
    spawn_loop!(
        queue::QueueWorker::new(ctx.clone()),
        ctx.nudges.queue.clone()
    );
    spawn_loop!(
        lease::LeaseWorker::new(ctx.clone(), holder.to_owned(), db_file, fatal_tx),
        Arc::new(Notify::new())
    );
    if let Some(upstream) = upstream {
        spawn_loop!(
            prefetcher::PrefetcherWorker::new(
                ctx.clone(),
                upstream,
                holder.to_owned(),
                shutdown.clone()
            ),
            ctx.nudges.prefetcher.clone()
        );
    }
    let watch_actor = watcher::start(driver.layout(), ctx.nudges.clone(), shutdown.clone())?;
    board.task_started(Task::Watcher);
    let watch_board = board.clone();
    tasks.spawn(async move {
        watch_actor.await;
        watch_board.task_ended(Task::Watcher);
        Task::Watcher
    });

    let reloader = reload::Reloader {
        config_path: options.config_path.clone(),
        config_tx,
        log_level,
    };
    let watchdog = systemd::watchdog_timeout();
    let mut watchdog_tick =
        tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |w| w / 2));
    info!(
        watchdog_ms = watchdog.map(|w| w.as_millis() as u64),
        "ready"
    );
    systemd::ready(&board.line());

    let outcome = loop {
        tokio::select! {
            command = signals.recv() => match command {
                Some(SignalCommand::Reload) => {
                    info!("SIGHUP: reloading configuration");
                    reloader.reload(&ctx);
                }
                Some(SignalCommand::Shutdown(signal)) => {
                    info!(signal, "shutting down");
                    break Ok(());
                }
                None => break Err(DaemonError::Fatal("signal listener stopped".into())),
            },
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                let unhealthy = board.unhealthy(watchdog.unwrap_or_default());
                if unhealthy.is_empty() {
                    systemd::watchdog();
                } else {
                    let names: Vec<String> = unhealthy.iter().map(Task::to_string).collect();
                    error!(tasks = %names.join(","), "loops are dead or stuck; withholding the watchdog ping so systemd restarts us");
                }
            }
            ended = tasks.join_next() => {
                let what = match ended {
                    Some(Ok(task)) => format!("the {task} loop stopped unexpectedly"),
                    Some(Err(e)) => format!("a loop crashed: {e}"),
                    None => "every loop stopped".to_string(),
                };
                break Err(DaemonError::Fatal(what));
            }
            Some(message) = fatal_rx.recv() => break Err(DaemonError::Fatal(message)),
        }
    };

    systemd::stopping();
    shutdown.cancel();
    let drained = tokio::time::timeout(shutdown_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        let busy: Vec<String> = board.busy().iter().map(Task::to_string).collect();
        warn!(tasks = %busy.join(","), timeout_s = shutdown_timeout.as_secs(), "loops did not stop in time; aborting them");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    outcome
}
