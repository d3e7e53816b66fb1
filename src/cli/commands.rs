//! One function per CLI command. Arguments are validated (clap parses every id through
//! `ImageId`) before the cache is opened, so a bad argument changes nothing.

use std::io::{Read, Write};
use std::process::ExitCode;

use anyhow::{Context, bail};

use super::output;
use super::{Cli, Command};
use crate::cache::{CacheDriver, CacheError, CacheLayout, CleanPolicy, Expectations};
use crate::config::{Config, resolve_config_path};
use crate::db::{Db, Dialect, NodeDb};
use crate::digest::{HashAlgo, VerifyPolicy};
use crate::image_id::ImageId;

/// Bytes per read when importing or streaming an image.
const COPY_CHUNK_BYTES: usize = 1 << 20;

pub(super) async fn dispatch(cli: Cli, config: Config) -> anyhow::Result<ExitCode> {
    let config = &config;
    let access = if cli.command.reads_only() {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    match cli.command {
        Command::Run { .. }
        | Command::Man
        | Command::Completions { .. }
        | Command::ImportGlanceConfig { .. } => {
            // `cli::run` handles these before reading the configuration; should that
            // change, this is an error, not a crash.
            anyhow::bail!(
                "internal error: this command is handled before the configuration is read"
            )
        }
        Command::MigrateSqlite { path } => migrate_sqlite(config, access, path).await,
        Command::Reconcile { force } => reconcile(config, access, force).await,
        Command::CheckConfig => check_config(config),
        Command::ListCached { json } => list_cached(config, access, json).await,
        Command::ListQueued { json } => list_queued(config, access, json).await,
        Command::Queue { ids } => queue(config, access, ids).await,
        Command::DeleteCached { ids, all } => delete_cached(config, access, ids, all).await,
        Command::DeleteQueued { ids, all } => delete_queued(config, access, ids, all).await,
        Command::Import {
            id,
            file,
            md5,
            sha512,
        } => import(config, id, file, md5, sha512).await,
        Command::Cat { id } => cat(config, id).await,
        Command::Hits { id } => hits(config, access, id).await,
        Command::Size { json } => size(config, access, json).await,
        Command::Clean { stall_time } => clean(config, access, stall_time).await,
        Command::Prefetch => prefetch(config).await,
        Command::Prune => prune(config, access).await,
    }
}

/// `glance-cached migrate-sqlite [PATH]`: rows of Glance's own SQLite cache database
/// into ours; rows already present and rows with invalid ids are skipped.
async fn migrate_sqlite(
    config: &Config,
    access: Access,
    path: Option<std::path::PathBuf>,
) -> anyhow::Result<ExitCode> {
    let path = path.unwrap_or_else(|| config.cache.dir.join("cache.db"));
    if !path.is_file() {
        bail!(
            "{} is not a file (Glance's image_cache_sqlite_db)",
            path.display()
        );
    }
    let rows = crate::db::legacy::read_glance_sqlite(&path).await?;
    let (_driver, db) = open_with_db(config, access).await?;
    let (mut imported, mut present, mut invalid) = (0, 0, 0);
    for row in &rows {
        if ImageId::parse(&row.image_id).is_err() {
            invalid += 1;
            continue;
        }
        if db.import_cached_image(row).await? {
            imported += 1;
        } else {
            present += 1;
        }
    }
    println!(
        "migrated {imported} rows from {} ({present} already present, {invalid} with invalid ids skipped)",
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `glance-cached reconcile [--force]`: rows and files made to agree.
async fn reconcile(config: &Config, access: Access, force: bool) -> anyhow::Result<ExitCode> {
    let driver = open(config, access).await?;
    let policy = config.clean_policy();
    let report = driver
        .reconcile(policy, crate::clock::system_now(), force)
        .await?;
    for id in &report.adopted {
        println!("adopted {id}: file without a row");
    }
    for id in &report.removed_rows {
        println!("removed row {id}: file is gone");
    }
    for id in &report.resized {
        println!("refreshed row {id}: file changed size, checksum cleared");
    }
    println!(
        "reconciled: {} adopted, {} rows removed, {} rows refreshed, {} leftover files cleaned",
        report.adopted.len(),
        report.removed_rows.len(),
        report.resized.len(),
        report.cleaned.files()
    );
    Ok(ExitCode::SUCCESS)
}

/// `glance-cached check-config`: the effective configuration as TOML.
fn check_config(config: &Config) -> anyhow::Result<ExitCode> {
    match &config.file {
        Some(f) => println!("# configuration from {} and the environment", f.display()),
        None => println!("# no configuration file: built-in defaults and the environment"),
    }
    print!("{}", config.to_toml());
    let glance = config
        .upstream
        .as_ref()
        .is_some_and(|u| matches!(u.kind, crate::config::UpstreamKind::Glance { .. }));
    if config.http.enabled && !glance && config.http.serve_auth.is_none() {
        eprintln!(
            "warning: neither a Glance upstream nor http.serve_auth is configured: every image download (GET /v2/images/{{id}}/file) is refused with 403"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `glance-cached list-cached [--json]`.
async fn list_cached(config: &Config, access: Access, json: bool) -> anyhow::Result<ExitCode> {
    let images = open(config, access).await?.get_cached_images().await?;
    if json {
        println!("{}", output::cached_json(&images)?);
    } else {
        print!("{}", output::cached_table(&images));
    }
    Ok(ExitCode::SUCCESS)
}

/// `glance-cached list-queued [--json]`.
async fn list_queued(config: &Config, access: Access, json: bool) -> anyhow::Result<ExitCode> {
    let images = open(config, access).await?.get_queued_images().await?;
    if json {
        println!("{}", output::queued_json(&images)?);
    } else {
        print!("{}", output::queued_table(&images));
    }
    Ok(ExitCode::SUCCESS)
}

/// `glance-cached queue ID...`.
async fn queue(config: &Config, access: Access, ids: Vec<ImageId>) -> anyhow::Result<ExitCode> {
    let driver = open(config, access).await?;
    for id in ids {
        if driver.queue_image(&id).await? {
            println!("queued {id}");
        } else {
            println!("not queued {id}: already cached, being cached or queued");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `glance-cached delete-cached [--all] [ID...]`.
async fn delete_cached(
    config: &Config,
    access: Access,
    ids: Vec<ImageId>,
    all: bool,
) -> anyhow::Result<ExitCode> {
    let driver = open(config, access).await?;
    if all {
        let n = driver.delete_all_cached_images().await?;
        println!("deleted {n} cached images");
    }
    for id in ids {
        if driver.delete_cached_image(&id).await? {
            println!("deleted {id}");
        } else {
            println!("{id} was not cached");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `glance-cached delete-queued [--all] [ID...]`.
async fn delete_queued(
    config: &Config,
    access: Access,
    ids: Vec<ImageId>,
    all: bool,
) -> anyhow::Result<ExitCode> {
    let driver = open(config, access).await?;
    if all {
        let n = driver.delete_all_queued_images().await?;
        println!("removed {n} images from the queue");
    }
    for id in ids {
        if driver.delete_queued_image(&id).await? > 0 {
            println!("removed {id} from the queue");
        } else {
            println!("{id} was not queued");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `glance-cached hits ID`.
async fn hits(config: &Config, access: Access, id: ImageId) -> anyhow::Result<ExitCode> {
    let hits = open(config, access).await?.get_hit_count(&id).await?;
    println!("{hits}");
    Ok(ExitCode::SUCCESS)
}

/// `glance-cached size [--json]`: the bytes in the cache, its maximum, the images.
async fn size(config: &Config, access: Access, json: bool) -> anyhow::Result<ExitCode> {
    let driver = open(config, access).await?;
    let listing = driver.list(crate::cache::Area::Cached).await?;
    let size = crate::cache::total_bytes(listing.files.iter().map(|f| f.size));
    if json {
        println!(
            "{}",
            output::size_json(size, config.cache.max_size, listing.files.len())?
        );
    } else {
        println!(
            "{}",
            output::size_line(size, config.cache.max_size, listing.files.len())
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `glance-cached clean [--stall-time D]`: stalled and invalid files removed.
async fn clean(
    config: &Config,
    access: Access,
    stall_time: Option<std::time::Duration>,
) -> anyhow::Result<ExitCode> {
    let driver = open(config, access).await?;
    let policy = CleanPolicy {
        stall_time: stall_time.unwrap_or(config.cache.stall_time),
        ..config.clean_policy()
    };
    let report = driver.clean(policy, crate::clock::system_now()).await?;
    let invalid = report
        .removed
        .iter()
        .filter(|r| r.area == crate::cache::Area::Invalid)
        .count();
    println!(
        "removed {} files, {} bytes ({invalid} invalid, {} stalled)",
        report.files(),
        report.bytes(),
        report.files() - invalid
    );
    if !report.failed.is_empty() {
        bail!(
            "{} files could not be removed (see the warnings above)",
            report.failed.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `glance-cached prune`: the least recently used images removed down to the maximum.
async fn prune(config: &Config, access: Access) -> anyhow::Result<ExitCode> {
    let driver = open(config, access).await?;
    let report = driver.prune(config.prune_policy()).await?;
    println!(
        "pruned {} files, {} bytes; size now {} bytes (max {})",
        report.files(),
        report.bytes(),
        report.size_after,
        config.cache.max_size
    );
    Ok(ExitCode::SUCCESS)
}

/// `glance-cached prefetch`: claims due queued images one after another (at most
/// `prefetcher.concurrency` at once) and downloads each as the daemon would, recording
/// every outcome in the queue, until none is due. SIGINT or SIGTERM stops the downloads
/// with nothing published and the images still queued. Exits 1 if any image failed.
async fn prefetch(config: &Config) -> anyhow::Result<ExitCode> {
    use crate::prefetch::{EngineError, PrefetchEngine, PrefetchOutcome};
    use std::sync::Arc;

    let Some(upstream) = &config.upstream else {
        bail!("the configuration has no [upstream] section: there is nothing to prefetch from");
    };
    let upstream = Arc::new(crate::upstream::Upstream::from_config(upstream)?);
    let driver = open(config, Access::ReadWrite).await?;
    // Markers Glance's PUT /v2/cache/{id} left in queue/ join the queue first.
    driver.adopt_queue_markers().await?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut signals = crate::signals::listen().context("listening for signals")?;
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if let Some(crate::signals::SignalCommand::Shutdown(_)) = signals.recv().await {
                cancel.cancel();
            }
        });
    }
    let holder = crate::process::prefetch_command_holder_name();
    let mut engine = PrefetchEngine::new(driver, upstream, holder, cancel, ());
    // Claims of earlier runs on this host that died (kill -9) would keep their images
    // until the claims run out.
    let recovered = engine.recover_dead_claims().await?;
    if recovered > 0 {
        println!("released {recovered} claims of a process that is no longer running");
    }
    let config = Arc::new(config.clone());
    // Each image's latest outcome: one may fail, be retried (when due again before the
    // queue runs dry) and then succeed.
    let mut latest = std::collections::BTreeMap::new();
    loop {
        let tick_at = match engine.tick(&config).await {
            Ok(at) => at,
            Err(e) => {
                // The next tick tries again; the claims last a while yet.
                match &e {
                    EngineError::Renew(_) => {
                        println!("could not renew the claims of the downloads in progress: {e}")
                    }
                    _ => println!("{e}"),
                }
                tokio::time::Instant::now() + config.prefetcher.claim_renew_every()
            }
        };
        engine.fill(&config).await?;
        let done = tokio::select! {
            done = engine.next_finished() => done,
            () = tokio::time::sleep_until(tick_at) => continue,
        };
        let Some(done) = done else {
            break;
        };
        let done = done.context("a download task crashed")?;
        let id = done.image_id;
        match &done.outcome {
            PrefetchOutcome::Published { bytes } => println!("prefetched {id} ({bytes} bytes)"),
            PrefetchOutcome::AlreadyCached => println!("{id} was already cached"),
            PrefetchOutcome::Interrupted => println!("interrupted {id}; it stays queued"),
            PrefetchOutcome::Dropped { error } => println!("failed {id} for good: {error}"),
            PrefetchOutcome::Retrying { error, delay } => println!(
                "failed {id}: {error}; tried again in {}",
                crate::config::format_duration(*delay)
            ),
        }
        let recorded_ok = match done.recorded {
            Ok(()) => true,
            Err(e) => {
                println!("the outcome for {id} could not be recorded: {e}");
                false
            }
        };
        latest.insert(id, (done.outcome, recorded_ok));
    }
    // Nothing is running: releases what is left to settle.
    engine.finish(|_| {}).await;
    let count =
        |f: fn(&PrefetchOutcome) -> bool| latest.values().filter(|(o, ok)| *ok && f(o)).count();
    let published = count(|o| matches!(o, PrefetchOutcome::Published { .. }));
    let cached = count(|o| matches!(o, PrefetchOutcome::AlreadyCached));
    let interrupted = count(|o| matches!(o, PrefetchOutcome::Interrupted));
    let failed = latest.len() - published - cached - interrupted;
    println!(
        "prefetched {published} images ({cached} already cached), {failed} failed, {interrupted} interrupted"
    );
    if interrupted > 0 {
        bail!("interrupted by a signal; the unfinished images stay queued");
    }
    if failed > 0 {
        bail!("{failed} images failed (see above; `list-queued` shows when each is tried again)");
    }
    Ok(ExitCode::SUCCESS)
}

/// `glance-cached man`: the man page, generated from the command definitions.
pub(super) fn man_page() -> anyhow::Result<ExitCode> {
    use clap::CommandFactory;
    let mut out = Vec::new();
    clap_mangen::Man::new(super::Cli::command())
        .section("8")
        .render(&mut out)?;
    std::io::stdout().write_all(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// `glance-cached completions SHELL`.
pub(super) fn completions(shell: clap_complete::Shell) -> anyhow::Result<ExitCode> {
    use clap::CommandFactory;
    clap_complete::generate(
        shell,
        &mut super::Cli::command(),
        "glance-cached",
        &mut std::io::stdout(),
    );
    Ok(ExitCode::SUCCESS)
}

/// `glance-cached import-glance-config`: Glance's INI options as our TOML.
pub(super) fn import_glance_config(
    api_conf: &std::path::Path,
    cache_conf: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let mut ini = crate::glance_config::Ini::default();
    ini.read(api_conf)?;
    let mut sources = vec![api_conf];
    if let Some(c) = cache_conf {
        ini.read(c)?;
        sources.push(c);
    }
    print!("{}", crate::glance_config::to_toml(&ini, &sources)?);
    Ok(ExitCode::SUCCESS)
}

/// `glance-cached run`: the daemon, on a multi-threaded runtime with daemon logging.
pub(super) fn run_daemon(
    config_arg: Option<std::path::PathBuf>,
    force: bool,
    force_reconcile: bool,
) -> anyhow::Result<ExitCode> {
    let path = resolve_config_path(config_arg.as_deref());
    let config = Config::load(path.as_deref())?;
    super::owner::act_as_cache_owner(&config.cache.dir)?;
    let (log_level, _) = crate::telemetry::init_daemon(&config.log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("glance-cached")
        .build()?;
    let options = crate::daemon::RunOptions {
        config_path: path,
        force,
        force_reconcile,
        ..Default::default()
    };
    let signals = crate::signals::listen().map_err(crate::daemon::DaemonError::Signals)?;
    runtime.block_on(crate::daemon::run(
        config,
        options,
        Some(log_level),
        signals,
    ))?;
    // Blocking threads (a stuck filesystem call) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(ExitCode::SUCCESS)
}

/// Whether a command may create and change things, or only look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    ReadWrite,
    ReadOnly,
}

/// Opens the cache of this node: directories, database, schema, node row. With SQLite
/// the directory comes first (the database lives in it); with a server the database
/// does. A read-only command creates nothing: the cache directory and database must
/// exist (the daemon or a first write makes them), and it never registers the node. No
/// command creates the built-in default directory when nothing configured it.
pub(super) async fn open(config: &Config, access: Access) -> anyhow::Result<CacheDriver> {
    Ok(open_with_db(config, access).await?.0)
}

/// `open`, and the database bound to this node as the driver has it.
async fn open_with_db(config: &Config, access: Access) -> anyhow::Result<(CacheDriver, NodeDb)> {
    let dir = &config.cache.dir;
    let sqlite = config.dialect() == Dialect::Sqlite;
    if !dir.exists()
        && access == Access::ReadWrite
        && config.file.is_none()
        && std::env::var_os("GLANCE_CACHED_CACHE__DIR").is_none()
    {
        bail!(
            "no configuration file, and the default cache directory {dir:?} does not exist: not creating it; give --config, or set cache.dir"
        );
    }
    let missing_dir = || {
        anyhow::anyhow!("the cache directory {dir:?} does not exist: nothing is cached there yet")
    };
    let open_layout = || match access {
        Access::ReadWrite => CacheLayout::open(dir),
        Access::ReadOnly => CacheLayout::open_existing(dir),
    };
    // SQLite's file is in the cache directory, which comes first (and is said to be
    // missing, rather than a database that cannot be opened); a server comes first
    // otherwise, so an unreachable one leaves the disk untouched.
    let mut layout = None;
    if sqlite {
        if access == Access::ReadOnly && !dir.exists() {
            return Err(missing_dir());
        }
        layout = Some(open_layout()?);
    }
    let options = match access {
        Access::ReadWrite => crate::daemon::prepare_database(config).await?,
        // Looking moves and creates nothing: a database not yet moved from the old
        // default place is read where it is.
        Access::ReadOnly => {
            let mut options = config.database.db_options();
            let legacy = dir.join(crate::db::location::LEGACY_SQLITE_FILE);
            if options.sqlite_file.as_ref().is_some_and(|f| !f.exists()) && legacy.is_file() {
                options.sqlite_file = Some(legacy);
            }
            options.read_only = true;
            options
        }
    };
    let db = Db::connect(&config.database.url, &options).await?;
    let layout = match layout {
        Some(layout) => layout,
        None if access == Access::ReadOnly && !dir.exists() => return Err(missing_dir()),
        None => open_layout()?,
    };
    let db = match access {
        Access::ReadWrite => NodeDb::configure(db, &config.node_reference_url).await?,
        Access::ReadOnly => NodeDb::open_read_only(db, &config.node_reference_url).await?,
    };
    Ok((CacheDriver::new(layout, db.clone()), db))
}

fn parse_hex(name: &str, value: Option<String>, len: usize) -> anyhow::Result<Option<String>> {
    let Some(v) = value else { return Ok(None) };
    let v = v.trim().to_ascii_lowercase();
    if v.len() != len || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("--{name} must be {len} hexadecimal characters");
    }
    Ok(Some(v))
}

/// `glance-cached import ID FILE [--md5 H] [--sha512 H]`: a local file into the cache,
/// checked against the checksums given.
async fn import(
    config: &Config,
    id: ImageId,
    file: std::path::PathBuf,
    md5: Option<String>,
    sha512: Option<String>,
) -> anyhow::Result<ExitCode> {
    let md5 = parse_hex("md5", md5, 32)?;
    let sha512 = parse_hex("sha512", sha512, HashAlgo::Sha512.hex_len())?;
    let mut source =
        std::fs::File::open(&file).with_context(|| format!("cannot open {}", file.display()))?;
    let meta = source.metadata()?;
    if !meta.is_file() {
        bail!("{} is not a regular file", file.display());
    }
    let driver = open(config, Access::ReadWrite).await?;
    let expectations = Expectations {
        size: Some(meta.len()),
        md5,
        os_hash: sha512.map(|h| (HashAlgo::Sha512, h)),
        // The operator gave these digests to be checked: `prefetcher.verify` is about
        // what an upstream publishes.
        verify: VerifyPolicy::All,
    };
    let mut writer = driver.open_for_write(&id, expectations).await?;
    let writer = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut buf = vec![0u8; COPY_CHUNK_BYTES];
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => return Ok(writer),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    writer.abort("reading the source failed");
                    return Err(e).context("cannot read the source file");
                }
            };
            writer.write(&buf[..n])?;
        }
    })
    .await??;
    let published = driver.publish(writer).await?;
    println!(
        "cached {} ({} bytes, md5 {})",
        published.image_id, published.size, published.md5
    );
    Ok(ExitCode::SUCCESS)
}

/// `glance-cached cat ID`: a cached image to stdout.
async fn cat(config: &Config, id: ImageId) -> anyhow::Result<ExitCode> {
    let driver = open(config, Access::ReadWrite).await?;
    // Counted in the driver's hit book, as the daemon's serving counts, and written once
    // at the end: the command is one process, so one flush.
    let Some(served) = driver.open_to_serve(&id).await? else {
        return Err(CacheError::NotCached(id).into());
    };
    let (mut file, reader) = served.into_parts();
    let copied = tokio::task::spawn_blocking(move || -> anyhow::Result<ExitCode> {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let mut buf = vec![0u8; COPY_CHUNK_BYTES];
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("cannot read the cached image"),
            };
            match out.write_all(&buf[..n]) {
                Ok(()) => {}
                // The reader went away (`| head`): not an error of ours.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    return Ok(ExitCode::SUCCESS);
                }
                Err(e) => return Err(e).context("cannot write to stdout"),
            }
        }
        match out.flush() {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                Err(e).context("cannot write to stdout")
            }
            _ => Ok(ExitCode::SUCCESS),
        }
    })
    .await?;
    drop(reader);
    driver
        .flush_hits()
        .await
        .context("the image was written out, but its hit could not be recorded")?;
    copied
}
