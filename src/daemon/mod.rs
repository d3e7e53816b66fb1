//! The daemon: `glance-cached run`. This file is the boot script: signals, layout, the
//! directory lock, database, node, lease, reconcile, the loops spawned under the
//! `supervisor`, READY; each phase gives way to a shutdown signal. The shared types live
//! in `context`, the errors in `error`, serving and teardown in `supervisor`.

mod cleaner;
mod context;
mod error;
mod hits;
mod lease;
mod prefetcher;
mod pruner;
mod queue;
mod reload;
mod status;
mod supervisor;
mod systemd;
mod watcher;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cache::{CacheDriver, CacheError, CacheLayout};
use crate::clock;
use crate::config::Config;
use crate::db::{Db, DbTime, LeaseHolder, LeaseOutcome, NodeDb};
use crate::metrics::Metrics;
use crate::process;
use crate::signals;
use crate::telemetry::LogLevelHandle;

pub(crate) use crate::signals::SignalCommand;
pub(crate) use context::{Context, PassRequests};
use context::{Nudges, Task};
pub(crate) use error::DaemonError;
pub(crate) use status::StatusBoard;
use supervisor::Supervisor;

/// Options of `glance-cached run` beyond the configuration.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunOptions {
    /// The file to re-read on SIGHUP.
    pub config_path: Option<PathBuf>,
    /// Take the node's lease even if another daemon seems to hold it.
    pub force: bool,
    /// Let the start-up reconcile drop the rows of missing files however many they are.
    pub force_reconcile: bool,
    /// Where the daemon records its metrics (made by the caller, so a test in process,
    /// or the HTTP listener, can encode them).
    pub metrics: Arc<Metrics>,
}

/// Runs the daemon until `signals` brings a shutdown (the binary feeds it from
/// SIGTERM/SIGINT/SIGHUP through `signals::listen`; tests feed it themselves). Returns an
/// error for a failed boot or a fatal condition (a dead loop, a lost lease); a clean
/// shutdown returns `Ok`, also when it came during start-up (each boot phase gives way
/// to it: stopping mid-phase leaves what a crash there would, which the next start
/// repairs).
pub(crate) async fn run(
    config: Config,
    options: RunOptions,
    log_level: Option<LogLevelHandle>,
    signals: mpsc::UnboundedReceiver<SignalCommand>,
) -> Result<(), DaemonError> {
    let result = boot_and_serve(config, options, log_level, signals).await;
    match &result {
        Ok(()) => info!("stopped"),
        Err(DaemonError::Stopped(signal)) => {
            info!(signal, "stopped during start-up");
            return Ok(());
        }
        Err(e) => error!(error = %e, "stopped after a fatal error"),
    }
    result
}

/// How long teardown waits for the database to take the lease back and close: the
/// lease expires by itself, and a database that does not answer must not hold the exit
/// past systemd's `TimeoutStopSec`.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

async fn boot_and_serve(
    config: Config,
    options: RunOptions,
    log_level: Option<LogLevelHandle>,
    signals: mpsc::UnboundedReceiver<SignalCommand>,
) -> Result<(), DaemonError> {
    info!(version = env!("CARGO_PKG_VERSION"), config = ?options.config_path, "starting glance-cached");
    let mut boot = Boot::new(signals);

    info!(dir = ?config.cache.dir, database = %crate::db::mask_url(&config.database.url), "opening the cache");
    let dir = config.cache.dir.clone();
    let layout = boot
        .phase(crate::blocking(move || CacheLayout::open(dir)))
        .await?
        .map_err(CacheError::from)?;
    // Held until the process ends: the kernel releases it however we exit.
    let _directory_lock = lock_directory(&config.cache.dir)?;
    let db_options = boot.phase(prepare_database(&config)).await??;
    let db = boot
        .phase(Db::connect(&config.database.url, &db_options))
        .await??
        .timed_by(options.metrics.db_queries());
    let db = boot
        .phase(NodeDb::configure(db, &config.node_reference_url))
        .await??;
    let driver = CacheDriver::new(layout.clone(), db.clone());
    // Taken once the pool has the file open (migrations ran on it).
    let db_file = db
        .db()
        .sqlite_file()
        .and_then(|path| lease::DbFile::identify(&path));

    let holder = crate::process::holder_name();
    let taken = take_lease(&db, &holder, &config, options.force, &mut boot).await;
    let result = match taken {
        Ok(()) => {
            info!(node = %db.url(), %holder, "holding the node's lease");
            let shutdown = CancellationToken::new();
            let result = start_loops_and_serve(
                driver.clone(),
                db.clone(),
                layout,
                config,
                db_file,
                &options,
                log_level,
                &holder,
                &mut boot,
                &shutdown,
            )
            .await;
            let release = db.db().release_lease(db.node(), &holder);
            match tokio::time::timeout(RELEASE_TIMEOUT, release).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    warn!(%error, "could not release the node lease; it expires by itself")
                }
                Err(_) => warn!(
                    "the database did not take the node lease back in time; it expires by itself"
                ),
            }
            result
        }
        Err(e) => Err(e),
    };
    if tokio::time::timeout(RELEASE_TIMEOUT, db.db().close())
        .await
        .is_err()
    {
        warn!("the database connections did not close in time");
    }
    result
}

/// The connection settings for the configured database, with a SQLite file made ready
/// to open (its directory; a database at the old default place moved in once no live
/// daemon holds it) and named by path.
pub(crate) async fn prepare_database(
    config: &Config,
) -> Result<crate::db::DbOptions, crate::db::location::LocationError> {
    let mut options = config.database.db_options();
    let file = match &options.sqlite_file {
        Some(file) => Some(file.clone()),
        None => crate::db::location::sqlite_path(&config.database.url),
    };
    if let Some(file) = file {
        let ttl = config.daemon.lease_ttl;
        let chosen = crate::db::location::prepare_sqlite(&file, &config.cache.dir, |holder, at| {
            at > lease::expired_before(ttl)
                && process::holder_state(holder) != process::HolderState::Gone
        })
        .await?;
        options.sqlite_file = Some(chosen);
    }
    Ok(options)
}

/// The signals as seen during start-up: a shutdown signal ends the phase in progress,
/// a reload is kept for when the loops run.
struct Boot {
    signals: mpsc::UnboundedReceiver<SignalCommand>,
    reload_pending: bool,
}

impl Boot {
    fn new(signals: mpsc::UnboundedReceiver<SignalCommand>) -> Boot {
        Boot {
            signals,
            reload_pending: false,
        }
    }

    /// Runs one boot phase unless SIGTERM or SIGINT comes first
    /// (`DaemonError::Stopped`).
    async fn phase<F: Future>(&mut self, phase: F) -> Result<F::Output, DaemonError> {
        tokio::pin!(phase);
        let mut listening = true;
        loop {
            tokio::select! {
                out = &mut phase => return Ok(out),
                command = self.signals.recv(), if listening => match command {
                    Some(SignalCommand::Shutdown(signal)) => return Err(DaemonError::Stopped(signal)),
                    Some(SignalCommand::Reload) => {
                        info!("SIGHUP during start-up: reloading once the daemon is ready");
                        self.reload_pending = true;
                    }
                    None => listening = false,
                },
            }
        }
    }
}

/// Takes an exclusive `flock` on the cache directory itself for as long as the
/// returned handle lives, so two daemons never work one directory, whatever their
/// databases or node URLs. The directory, not a file in it: Glance's clear-cache
/// unlinks every regular file at the top of the cache root but `*.db`, and a lock on an
/// unlinked file excludes nobody.
fn lock_directory(dir: &std::path::Path) -> Result<std::fs::File, DaemonError> {
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |source: std::io::Error| DaemonError::DirectoryLock {
        dir: dir.to_path_buf(),
        source,
    };
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(failed)?;
    match rustix::fs::flock(
        &handle,
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    ) {
        Ok(()) => Ok(handle),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(DaemonError::DirectoryInUse {
            dir: dir.to_path_buf(),
        }),
        Err(e) => Err(failed(e.into())),
    }
}

async fn take_lease(
    db: &NodeDb,
    holder: &str,
    config: &Config,
    force: bool,
    boot: &mut Boot,
) -> Result<(), DaemonError> {
    let ttl = config.daemon.lease_ttl;
    let attempt = |force: bool| {
        db.db().acquire_lease(
            db.node(),
            holder,
            DbTime::from_utc(clock::now()),
            lease::expired_before(ttl),
            force,
        )
    };
    let other = match boot.phase(attempt(force)).await?? {
        LeaseOutcome::Acquired => return Ok(()),
        LeaseOutcome::HeldBy(other) => other,
    };
    let taken = |other: LeaseHolder| DaemonError::NodeTaken {
        node: db.url().to_owned(),
        age: (clock::now() - other.heartbeat_at.to_utc()).num_seconds(),
        holder: other.holder,
    };
    match process::holder_state(&other.holder) {
        // A daemon of this PID namespace that crashed (kill -9, OOM) left a fresh lease:
        // take it over at once rather than fail every restart until it expires.
        process::HolderState::Gone => {
            warn!(previous = %other.holder, "taking over the lease of a daemon that is no longer running");
        }
        process::HolderState::Running => return Err(taken(other)),
        // A holder of this host and boot in another PID namespace: a predecessor in a
        // container that was restarted, or a live daemon in another container. Only
        // its renewals tell them apart: a live holder renews every third of the TTL.
        process::HolderState::Unknown if process::may_be_predecessor(&other.holder) => {
            let watch = ttl / 2;
            info!(previous = %other.holder, watch_ms = watch.as_millis() as u64, "the node's lease is held by a process this host cannot look at; waiting to see whether it still renews it");
            status::boot_phase("waiting to see whether the previous lease holder still renews it");
            boot.phase(tokio::time::sleep(watch)).await?;
            match boot.phase(db.db().lease_holder(db.node())).await?? {
                Some(now) if now == other => {
                    warn!(previous = %other.holder, "taking over the lease of a daemon that stopped renewing it");
                }
                Some(now) => return Err(taken(now)),
                None => {}
            }
            // Compare-and-swap on the holder and heartbeat just observed.
            return match boot
                .phase(db.db().take_over_lease(
                    db.node(),
                    holder,
                    DbTime::from_utc(clock::now()),
                    &other,
                ))
                .await??
            {
                LeaseOutcome::Acquired => Ok(()),
                LeaseOutcome::HeldBy(now) => Err(taken(now)),
            };
        }
        process::HolderState::Unknown => return Err(taken(other)),
    }
    match boot.phase(attempt(true)).await?? {
        LeaseOutcome::Acquired => Ok(()),
        LeaseOutcome::HeldBy(now) => Err(taken(now)),
    }
}

/// The longest step `/healthz` allows without a systemd watchdog: the unit's
/// `WatchdogSec`.
const HEALTH_MAX_STEP: Duration = Duration::from_secs(60);

/// Reconcile, start the loops, send READY, and hand over to the supervisor until
/// shutdown or a fatal condition; then tear down.
#[allow(clippy::too_many_arguments)]
async fn start_loops_and_serve(
    driver: CacheDriver,
    db: NodeDb,
    layout: CacheLayout,
    config: Config,
    db_file: Option<lease::DbFile>,
    options: &RunOptions,
    log_level: Option<LogLevelHandle>,
    holder: &str,
    boot: &mut Boot,
    shutdown: &CancellationToken,
) -> Result<(), DaemonError> {
    info!("reconciling disk and database");
    let report = boot
        .phase(driver.reconcile(
            config.clean_policy(),
            clock::system_now(),
            options.force_reconcile,
        ))
        .await??;
    info!(
        adopted = report.adopted.len(),
        removed_rows = report.removed_rows.len(),
        resized = report.resized.len(),
        cleaned = report.cleaned.files(),
        "reconcile done"
    );
    options.metrics.reconciled(&report);
    // Under the node lease any claim is a dead process's, unless a `prefetch` command
    // is downloading beside us: its claims stay.
    let recovered = boot
        .phase(driver.recover_claims(|holder| {
            let running = process::holder_state(holder) == process::HolderState::Running;
            if running {
                info!(%holder, "left the claim of a download still running in another process");
            }
            running
        }))
        .await??;
    if recovered > 0 {
        info!(recovered, "released the claims of interrupted downloads");
    }
    // One upstream for the prefetcher and the listener, so both see one endpoint health.
    let upstream = match &config.upstream {
        Some(u) => Some(Arc::new(
            crate::upstream::Upstream::from_config(u).map_err(DaemonError::Config)?,
        )),
        None => {
            info!("no [upstream] configured: queued images are not prefetched");
            None
        }
    };

    let board = Arc::new(StatusBoard::with_metrics(options.metrics.clone()));
    board.set_max_size(config.cache.max_size);
    let (config_tx, config_rx) = watch::channel(Arc::new(config));
    let ctx = Context {
        driver: driver.clone(),
        db,
        layout,
        config: config_rx,
        board: board.clone(),
        // The hit flusher's nudge is the hit book's signal (see `daemon::hits`).
        nudges: Nudges {
            hits: driver.first_pending_hit(),
            ..Nudges::default()
        },
        metrics: options.metrics.clone(),
        passes: Default::default(),
    };
    // Bound before any loop runs, so a listener that cannot start fails the boot
    // cleanly. The listener and its read-through fills share the prefetcher's upstream
    // (one view of the endpoints' health).
    if let Some(u) = &upstream {
        u.report_to(&ctx.metrics);
    }
    let (listeners, http_upstream, fill_upstream) = if ctx.config().http.enabled {
        let listeners = crate::http::bind(&ctx.config().http)?;
        (Some(listeners), upstream.clone(), upstream.clone())
    } else {
        (None, None, None)
    };
    let mut loops = Supervisor::new(board.clone(), shutdown.clone());
    loops.spawn_worker(
        cleaner::CleanerWorker::new(ctx.clone()),
        ctx.nudges.cleaner.clone(),
    );
    loops.spawn_worker(
        pruner::PrunerWorker::new(ctx.clone()),
        ctx.nudges.pruner.clone(),
    );
    loops.spawn_worker(
        queue::QueueWorker::new(ctx.clone()),
        ctx.nudges.queue.clone(),
    );
    loops.spawn_worker(
        hits::HitFlusherWorker::new(ctx.clone()),
        ctx.nudges.hits.clone(),
    );
    let fatal = loops.fatal_sender();
    loops.spawn_worker(
        lease::LeaseWorker::new(ctx.clone(), holder.to_owned(), db_file, fatal),
        Arc::new(Notify::new()),
    );
    if let Some(upstream) = upstream {
        loops.spawn_worker(
            prefetcher::PrefetcherWorker::new(
                ctx.clone(),
                upstream,
                holder.to_owned(),
                shutdown.clone(),
            ),
            ctx.nudges.prefetcher.clone(),
        );
    }
    let watch_actor = watcher::start(
        &ctx.layout,
        ctx.nudges.clone(),
        ctx.metrics.clone(),
        shutdown.clone(),
    )?;
    loops.spawn_task(Task::Watcher, watch_actor);
    let watchdog = systemd::watchdog_timeout();
    if let Some(listeners) = listeners {
        let state = crate::http::HttpState {
            ctx: ctx.clone(),
            shutdown: shutdown.clone(),
            max_step: watchdog.unwrap_or(HEALTH_MAX_STEP),
            upstream: http_upstream,
            auth_cache: Default::default(),
            static_token: Default::default(),
            auth: Default::default(),
            read_through: crate::prefetch::ReadThrough::new(
                ctx.driver.clone(),
                fill_upstream,
                holder.to_owned(),
                shutdown.clone(),
            ),
        };
        loops.spawn_task(Task::Http, crate::http::serve(listeners, Arc::new(state)));
    }

    let reloader = reload::Reloader {
        config_path: options.config_path.clone(),
        config_tx,
        log_level,
    };
    info!(
        watchdog_ms = watchdog.map(|w| w.as_millis() as u64),
        "ready"
    );
    board.ready();
    if boot.reload_pending {
        reloader.reload(&ctx);
    }

    let outcome = loops
        .serve(&mut boot.signals, watchdog, || reloader.reload(&ctx))
        .await;
    // Read now, not at start: the timeout is reloadable.
    loops.teardown(ctx.config().daemon.shutdown_timeout).await;
    // The hits of the last requests, counted after the flusher's own last flush (the
    // listener and the loops stop together), before the database closes.
    match tokio::time::timeout(RELEASE_TIMEOUT, ctx.driver.flush_hits()).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => warn!(%error, "could not write the last hits at shutdown; they are lost"),
        Err(_) => warn!("the database did not take the last hits in time; they are lost"),
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_config(dir: &std::path::Path) -> PathBuf {
        let file = dir.join("glance-cached.toml");
        let text = format!(
            "[cache]\ndir = \"{}\"\n[daemon]\nshutdown_timeout = \"5s\"\n",
            dir.join("cache").display()
        );
        std::fs::write(&file, text).unwrap();
        file
    }

    /// Starts the daemon in this process on the config at `file`, fed its signals by
    /// the test.
    fn start(
        file: &std::path::Path,
    ) -> (
        mpsc::UnboundedSender<SignalCommand>,
        tokio::task::JoinHandle<Result<(), DaemonError>>,
    ) {
        let config = Config::load(Some(file)).unwrap();
        let options = RunOptions {
            config_path: Some(file.to_path_buf()),
            ..RunOptions::default()
        };
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, tokio::spawn(run(config, options, None, rx)))
    }

    /// The signals are a parameter: a daemon in process boots, reloads and stops on the
    /// commands it is given, and gives its directory's lock back (a second daemon on the
    /// same directory then serves, rather than failing at once).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_serves_until_its_signals_say_stop() {
        const SERVING: Duration = Duration::from_secs(3);
        let tmp = tempfile::tempdir().unwrap();
        let file = write_config(tmp.path());
        for _ in 0..2 {
            let (signals, mut daemon) = start(&file);
            signals.send(SignalCommand::Reload).unwrap();
            let early = tokio::time::timeout(SERVING, &mut daemon).await;
            assert!(early.is_err(), "still serving: {early:?}");
            signals.send(SignalCommand::Shutdown("SIGTERM")).unwrap();
            let stopped = tokio::time::timeout(Duration::from_secs(30), daemon).await;
            assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
        }
    }
}
