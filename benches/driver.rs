//! Driver operations, prune and clean, on SQLite (and PostgreSQL / MariaDB when their
//! URLs are set, as `scripts/bench` does).
//!
//!   scripts/bench                      # everything, with the servers started
//!   BENCH_SMOKE=1 cargo bench --bench driver
//!   BENCH_SIZES=10000 cargo bench --bench driver   # SQLite with 10k images only
//!
//! Figures are medians of `BENCH_ROUNDS` rounds (default 3). Results: a table on stdout
//! and JSON in target/bench/driver.json.
//!
//! With `GLANCE_CACHED_TEST_GLANCE_PYTHON` set (the Glance 33.0.0 virtualenv's python, as
//! `scripts/bench` sets it), the real Glance `centralized_db` driver is measured first
//! on the same population (same image count, file size, disk and SQLite file layout,
//! through `benches/glance_driver.py`), then ours, and a second table gives the ratio per
//! operation; the prune of 100k images to half runs as Glance's `glance-cache-pruner`
//! command against `glance-cached prune`.
//!
//! `BENCH_ONLY` (a comma list of `ops`, `servers`, `prune_clean`, `prune_commands`) runs
//! only those parts: the driver operations on SQLite, on PostgreSQL / MariaDB, the prune
//! and clean of 100k (2k in smoke mode) files, and the prune through the two commands.
//! The last alone, at 100,000 images, is
//!
//!   BENCH_ONLY=prune_commands GLANCE_CACHED_TEST_GLANCE_PYTHON=... cargo bench --bench driver

// Test and benchmark code: a panic here is a failed run, not a crashed daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A test or benchmark binary has no API: `pub` shares its kit between its files.
#![allow(unreachable_pub)]
// Measured and real times (timings, file ages, deadlines): the clock lint is for the
// daemon's code.
#![allow(clippy::disallowed_methods)]

mod common;

use common::{bench_dir, median, ops_per_second, rounds, smoke};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use glance_cached::cache::{Area, CacheDriver, CacheLayout, CleanPolicy, PrunePolicy};
use glance_cached::db::{Db, DbOptions, DbTime, NodeDb};
use glance_cached::image_id::ImageId;

fn image_id(n: usize) -> ImageId {
    ImageId::parse(&format!("{n:08x}-0000-4000-8000-000000000000")).unwrap()
}

/// A cache with `n` cached images of `size` bytes (files written directly, rows
/// adopted in batches, as a reconcile would).
async fn populated(dir: &Path, db_url: &str, n: usize, size: usize) -> (CacheDriver, Db) {
    let layout = CacheLayout::open(dir).unwrap();
    let data = vec![0x42u8; size];
    let mut rows = Vec::with_capacity(n);
    let base = chrono::Utc::now() - chrono::Duration::days(1);
    for i in 0..n {
        let id = image_id(i);
        std::fs::write(layout.path(Area::Cached, &id), &data).unwrap();
        // Distinct access times, oldest first, so LRU order is well defined.
        rows.push((
            id.clone(),
            size as i64,
            DbTime::from_utc(base + chrono::Duration::milliseconds(i as i64)),
        ));
    }
    let db = Db::connect(db_url, &DbOptions::default()).await.unwrap();
    let db = NodeDb::configure(db, "http://bench:9292").await.unwrap();
    db.adopt_cached_images(&rows).await.unwrap();
    (CacheDriver::new(layout, db.clone()), db.db().clone())
}

struct Figures {
    rows: Vec<(String, String, String)>,
    json: serde_json::Map<String, serde_json::Value>,
    /// Glance's figure beside ours: label, Glance, ours, unit ("/s": more is better;
    /// "ms", "us": less is better).
    versus: Vec<(String, f64, f64, &'static str)>,
}

impl Figures {
    fn add(&mut self, key: &str, label: String, value: f64, unit: &str, target: &str) {
        self.rows
            .push((label, format!("{value:.0} {unit}"), target.into()));
        self.json.insert(key.into(), serde_json::json!(value));
    }

    /// Glance's figure `key` beside ours (`ours_key`, already added), when Glance ran.
    fn versus(&mut self, label: String, glance: f64, ours_key: &str, unit: &'static str) {
        let ours = self.json[ours_key].as_f64().unwrap();
        self.json
            .insert(format!("glance_{ours_key}"), serde_json::json!(glance));
        self.versus.push((label, glance, ours, unit));
    }
}

/// The node both drivers are.
const NODE: &str = "http://bench:9292";

/// The real Glance 33.0.0 driver (`benches/glance_driver.py` in the Glance virtualenv)
/// and a database its `db sync` made, copied for each population.
struct Glance {
    python: PathBuf,
    template: PathBuf,
    _dir: tempfile::TempDir,
}

impl Glance {
    /// `None` (with a note) when `GLANCE_CACHED_TEST_GLANCE_PYTHON` is not set.
    fn find() -> Option<Glance> {
        let python: PathBuf = match std::env::var("GLANCE_CACHED_TEST_GLANCE_PYTHON") {
            Ok(p) if !p.is_empty() => p.into(),
            _ => {
                eprintln!(
                    "glance: GLANCE_CACHED_TEST_GLANCE_PYTHON not set, Glance's figures skipped (scripts/bench sets it)"
                );
                return None;
            }
        };
        let dir = tempfile::Builder::new()
            .prefix("gc-bench-glance-")
            .tempdir_in(bench_dir())
            .unwrap();
        let template = dir.path().join("synced.db");
        let mut glance = Glance {
            python,
            template: template.clone(),
            _dir: dir,
        };
        glance.run(&template.with_extension("cache"), &template, &["db-sync"]);
        assert!(template.is_file(), "Glance's db sync made no {template:?}");
        glance.template = template;
        Some(glance)
    }

    /// A fresh copy of the synced database at `db`.
    fn database(&self, db: &Path) {
        std::fs::copy(&self.template, db).unwrap();
    }

    fn run(&self, cache: &Path, db: &Path, args: &[&str]) -> serde_json::Value {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/glance_driver.py");
        let out = Command::new(&self.python)
            .arg(script)
            .arg("--cache-dir")
            .arg(cache)
            .arg("--db-url")
            .arg(format!("sqlite:///{}", db.display()))
            .args(["--node-url", NODE])
            .args(args)
            // Glance turns naive UTC into epoch seconds as local time.
            .env("TZ", "UTC")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "glance_driver.py {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.lines().last().unwrap_or("null")).unwrap()
    }

    /// A Glance-synced database in `dir` with `n` cached images of `size` bytes, filled
    /// as our own populations are; returns (cache dir, database file).
    async fn populated(&self, dir: &Path, n: usize, size: usize) -> (PathBuf, PathBuf) {
        let (cache, db) = (dir.join("cache"), dir.join("glance.db"));
        std::fs::create_dir_all(dir).unwrap();
        self.database(&db);
        let (driver, db_handle) =
            populated(&cache, &format!("sqlite://{}", db.display()), n, size).await;
        drop(driver);
        db_handle.close().await;
        (cache, db)
    }

    /// The venv's `bin/NAME`.
    fn command(&self, name: &str) -> PathBuf {
        self.python.parent().unwrap().join(name)
    }
}

/// Glance's driver on a population of `n` images: its per-operation rates, medians of
/// `rounds()` (the JSON of `glance_driver.py ops`).
/// `BENCH_GLANCE_OPS` calls per figure (default 1,000, 100 in smoke mode, at most
/// ours): Glance commits a SQLite transaction per hit, some 20 ms each on this disk.
/// `queue_image` (and the bare creates beside it) as many times as ours: a directory's
/// create cost grows with its entries, so both `queue/` directories get as many.
/// Returns the figures and Glance's directory, to be removed only after ours are
/// measured: ext4 skips inodes freed in the last minutes when it allocates one (perf:
/// `recently_deleted`, `find_get_block_common`), so removing 10,000 files right before
/// our creates would slow ours by Glance's removal.
async fn glance_ops(
    glance: &Glance,
    n: usize,
    ops: usize,
) -> (serde_json::Value, tempfile::TempDir) {
    let queue_ops = ops;
    let ops = std::env::var("BENCH_GLANCE_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if smoke() { 100 } else { 1_000 })
        .min(ops);
    let tmp = tempfile::Builder::new()
        .prefix("gc-bench-glance-")
        .tempdir_in(bench_dir())
        .unwrap();
    let (cache, db) = glance.populated(tmp.path(), n, 64).await;
    let figures = glance.run(
        &cache,
        &db,
        &[
            "ops",
            "--count",
            &n.to_string(),
            "--ops",
            &ops.to_string(),
            "--queue-ops",
            &queue_ops.to_string(),
            "--rounds",
            &rounds().to_string(),
        ],
    );
    (figures, tmp)
}

async fn driver_ops(
    figures: &mut Figures,
    backend: &str,
    db_url: &str,
    n: usize,
    glance: Option<&Glance>,
) {
    let ops = if smoke() { 500 } else { 10_000.min(n) };
    // Glance first, right before ours, on the same population.
    let (glance, glance_dir) = match glance {
        Some(g) if backend == "sqlite" => {
            let (figures, dir) = glance_ops(g, n, ops).await;
            (Some(figures), Some(dir))
        }
        _ => (None, None),
    };
    let tmp = tempfile::Builder::new()
        .prefix("gc-bench-")
        .tempdir_in(bench_dir())
        .unwrap();
    let (driver, db) = populated(&tmp.path().join("cache"), db_url, n, 64).await;
    let (mut cached, mut read, mut hits, mut queue, mut list, mut pass) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut served = vec![];
    let mut served_opens = vec![];
    let mut create = vec![];
    let mut adopt = vec![];
    let mut queue_and_adopt = vec![];
    for round in 0..rounds() {
        let pick = |i: usize| image_id((i * 7919 + round) % n);
        cached.push(
            ops_per_second(ops, |i| {
                let d = driver.clone();
                async move {
                    assert!(d.is_cached(&pick(i)));
                }
            })
            .await,
        );
        read.push(
            ops_per_second(ops, |i| {
                let d = driver.clone();
                async move {
                    drop(d.open_for_read(&pick(i)).await.unwrap());
                }
            })
            .await,
        );
        // Serving's open: the hit goes to the book, and the flush that writes them all
        // (once per interval in the daemon) is in the time.
        let (before, started) = (
            driver.get_hit_count(&pick(0)).await.unwrap(),
            Instant::now(),
        );
        for i in 0..ops {
            drop(driver.open_to_serve(&pick(i)).await.unwrap().unwrap());
        }
        // The opens alone too: in a smoke run the flush's commit is of their order.
        served_opens.push(ops as f64 / started.elapsed().as_secs_f64());
        driver.flush_hits().await.unwrap();
        served.push(ops as f64 / started.elapsed().as_secs_f64());
        let per_image = ops.div_ceil(n) as u64;
        let after = driver.get_hit_count(&pick(0)).await.unwrap();
        assert!(after > before && after - before <= per_image, "hits exact");
        hits.push(
            ops_per_second(ops, |i| {
                let d = driver.clone();
                async move {
                    std::hint::black_box(d.get_hit_count(&pick(i)).await.unwrap());
                }
            })
            .await,
        );
        queue.push(
            ops_per_second(ops, |i| {
                let d = driver.clone();
                async move {
                    let id = ImageId::parse(&format!("q{round}-{i}")).unwrap();
                    assert!(d.queue_image(&id).await.unwrap());
                }
            })
            .await,
        );
        create.push(bare_creates(&tmp.path().join("cache/queue"), ops, round));
        let started = Instant::now();
        let listed = driver.get_cached_images().await.unwrap();
        assert_eq!(listed.len(), n);
        list.push(started.elapsed().as_secs_f64() * 1000.0);
        // The rows queue_image leaves to the queue loop: its first pass adopts every
        // marker just made, in one transaction.
        let started = Instant::now();
        assert_eq!(driver.adopt_queue_markers().await.unwrap(), ops as u64);
        let adopted = ops as f64 / started.elapsed().as_secs_f64();
        adopt.push(adopted);
        // Both, per image: what a queued image costs before it can be claimed.
        queue_and_adopt.push(1.0 / (1.0 / queue[queue.len() - 1] + 1.0 / adopted));
        // The queue loop's pass when a marker event wakes it: every marker in queue/ is
        // already queued, nothing is new.
        let started = Instant::now();
        assert_eq!(driver.adopt_queue_markers().await.unwrap(), 0);
        pass.push(started.elapsed().as_secs_f64() * 1000.0);
        driver.delete_all_queued_images().await.unwrap();
    }
    let k = format!("{}k", n / 1000);
    let target = if backend == "sqlite" {
        ">= 20000/s"
    } else {
        "within 5x of SQLite"
    };
    figures.add(
        &format!("{backend}_{k}_is_cached_per_s"),
        format!("{backend}, {k} images: is_cached"),
        median(cached),
        "/s",
        target,
    );
    figures.add(
        &format!("{backend}_{k}_open_for_read_per_s"),
        format!("{backend}, {k} images: open_for_read + hit"),
        median(read),
        "/s",
        target,
    );
    figures.add(
        &format!("{backend}_{k}_open_to_serve_per_s"),
        format!("{backend}, {k} images: open_to_serve + hit (flushed once)"),
        median(served),
        "/s",
        target,
    );
    figures.add(
        &format!("{backend}_{k}_open_to_serve_opens_per_s"),
        format!("{backend}, {k} images: open_to_serve + hit, the opens alone (flush apart)"),
        median(served_opens),
        "/s",
        target,
    );
    figures.add(
        &format!("{backend}_{k}_get_hit_count_per_s"),
        format!("{backend}, {k} images: get_hit_count"),
        median(hits),
        "/s",
        target,
    );
    figures.add(
        &format!("{backend}_{k}_queue_image_per_s"),
        format!("{backend}, {k} images: queue_image"),
        median(queue),
        "/s",
        target,
    );
    figures.add(
        &format!("{backend}_{k}_queue_dir_create_per_s"),
        format!("{backend}, {k} images: a bare exclusive create in queue/ (the marker alone)"),
        median(create),
        "/s",
        "",
    );
    figures.add(
        &format!("{backend}_{k}_queue_adopt_per_s"),
        format!(
            "{backend}, {k} images: the queue loop's adoption of {ops} new markers (their rows)"
        ),
        median(adopt),
        "/s",
        "",
    );
    figures.add(
        &format!("{backend}_{k}_queue_and_adopt_per_s"),
        format!("{backend}, {k} images: queue_image and its marker's adoption, per image"),
        median(queue_and_adopt),
        "/s",
        "",
    );
    figures.add(
        &format!("{backend}_{k}_queue_pass_ms"),
        format!("{backend}, {k} images: queue loop pass over {ops} queued markers"),
        median(pass),
        "ms",
        "",
    );
    figures.add(
        &format!("{backend}_{k}_get_cached_images_ms"),
        format!("{backend}, {k} images: get_cached_images (all rows)"),
        median(list),
        "ms",
        "",
    );
    db.close().await;
    drop(glance_dir);
    if let Some(g) = glance {
        for (label, glance_key, ours, unit) in [
            ("is_cached", "is_cached", "is_cached_per_s", "/s"),
            (
                "open_for_read + hit",
                "open_for_read",
                "open_for_read_per_s",
                "/s",
            ),
            (
                "get_hit_count",
                "get_hit_count",
                "get_hit_count_per_s",
                "/s",
            ),
            ("queue_image", "queue_image", "queue_image_per_s", "/s"),
            (
                "queue_image + its adoption (Glance: queue_image)",
                "queue_image",
                "queue_and_adopt_per_s",
                "/s",
            ),
            (
                "a bare create in its queue/ (baseline)",
                "queue_dir_create",
                "queue_dir_create_per_s",
                "/s",
            ),
            (
                "get_cached_images (all rows)",
                "list_ms",
                "get_cached_images_ms",
                "ms",
            ),
        ] {
            figures.versus(
                format!("sqlite, {k} images: {label}"),
                g[glance_key].as_f64().unwrap(),
                &format!("{backend}_{k}_{ours}"),
                unit,
            );
        }
    }
}

/// Exclusive creates of `count` empty files in `queue` (names no image has), timed, then
/// removed untimed: what a marker alone costs in that directory. ext4's create cost
/// differs by up to 20x between directories of one disk (the inode allocator's state
/// where each lies), so `queue_image` is read against its own directory's figure, and
/// Glance's against Glance's (`glance_driver.py` measures its queue/ the same way).
fn bare_creates(queue: &Path, count: usize, round: usize) -> f64 {
    let names: Vec<PathBuf> = (0..count)
        .map(|i| queue.join(format!("zz{round}-{i}")))
        .collect();
    let started = Instant::now();
    for name in &names {
        drop(
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(name)
                .unwrap(),
        );
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    for name in &names {
        std::fs::remove_file(name).unwrap();
    }
    rate
}

/// `n` stalled `incomplete/` and `n` `invalid/` files a week old under each of `roots`,
/// written back to the disk before returning (`sync`): leftovers are old, so a cleaner
/// meets them on disk. A removal of a file not yet written back costs a tenth (delayed
/// allocation: no blocks to free yet), so a tree timed before its writeback, or timed
/// while some of it is written back, would measure the writeback's timing instead.
fn stale_files(roots: &[&Path], n: usize) {
    let old = SystemTime::now() - Duration::from_secs(7 * 86_400);
    for root in roots {
        std::fs::create_dir_all(root.join("incomplete")).unwrap();
        std::fs::create_dir_all(root.join("invalid")).unwrap();
    }
    for i in 0..n {
        let id = image_id(i).to_string();
        for root in roots {
            for sub in ["incomplete", "invalid"] {
                let p = root.join(sub).join(&id);
                std::fs::write(&p, b"x").unwrap();
                filetime::set_file_mtime(&p, filetime::FileTime::from_system_time(old)).unwrap();
            }
        }
    }
    rustix::fs::sync();
}

/// Glance's driver cleaning `n` stalled and `n` invalid files beside a cache of `n`
/// images of 1 KiB: seconds, timed inside its process.
async fn glance_clean(glance: &Glance, n: usize) -> f64 {
    let tmp = tempfile::Builder::new()
        .prefix("gc-bench-glance-")
        .tempdir_in(bench_dir())
        .unwrap();
    let (cache, db) = glance.populated(tmp.path(), n, 1024).await;
    stale_files(&[&cache], n);
    let cleaned = glance.run(&cache, &db, &["clean", "--stall-time", "86400"]);
    assert_eq!(cleaned["files"].as_u64(), Some(2 * n as u64), "{cleaned}");
    cleaned["seconds"].as_f64().unwrap()
}

/// The prune of `n` images to half through the commands operators run: Glance's
/// `glance-cache-pruner` (its cron job) and `glance-cached prune`, each on its own
/// fresh population of the same shape (1 KiB files), wall time of the whole command.
/// `BENCH_GLANCE_PRUNE_IMAGES` sets `n` (default 100,000; 200 in smoke mode): Glance
/// commits one SQLite transaction per file removed, some 20 ms each on this disk, so
/// its half of 100,000 images takes many minutes.
async fn prune_commands(figures: &mut Figures, glance: &Glance) {
    let n = std::env::var("BENCH_GLANCE_PRUNE_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if smoke() { 200 } else { 100_000 });
    let max = (n as u64 * 1024) / 2;
    let tmp = tempfile::Builder::new()
        .prefix("gc-bench-glance-")
        .tempdir_in(bench_dir())
        .unwrap();
    let (cache, db) = glance.populated(&tmp.path().join("glance"), n, 1024).await;
    let conf = tmp.path().join("glance-cache.conf");
    std::fs::write(
        &conf,
        format!(
            "[DEFAULT]\nimage_cache_dir = {}\nimage_cache_driver = centralized_db\nimage_cache_max_size = {max}\nworker_self_reference_url = {NODE}\n[database]\nconnection = sqlite:///{}\n",
            cache.display(),
            db.display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let out = Command::new(glance.command("glance-cache-pruner"))
        .arg("--config-file")
        .arg(&conf)
        .env("TZ", "UTC")
        .output()
        .unwrap();
    let glance_secs = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "glance-cache-pruner: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left = std::fs::read_dir(&cache)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_file())
        .count();
    assert_eq!(left, n / 2, "glance-cache-pruner left {left} files");

    let ours_dir = tmp.path().join("ours");
    let ours_cache = ours_dir.join("cache");
    let ours_db = ours_dir.join("bench.db");
    let url = format!("sqlite://{}", ours_db.display());
    let (driver, db_handle) = populated(&ours_cache, &url, n, 1024).await;
    drop(driver);
    db_handle.close().await;
    let config = tmp.path().join("glance-cached.toml");
    std::fs::write(
        &config,
        format!(
            "[cache]\ndir = \"{}\"\nmax_size = {max}\n[database]\nurl = \"{url}\"\n[node]\nreference_url = \"{NODE}\"\n",
            ours_cache.display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    // BENCH_GLANCE_CACHED_BIN: a copy of the binary, so that a long run measures the
    // build it started with even when target/ is rebuilt meanwhile.
    let bin = std::env::var_os("BENCH_GLANCE_CACHED_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_glance-cached").into());
    let out = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .arg("prune")
        .output()
        .unwrap();
    let ours_secs = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "glance-cached prune: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left = std::fs::read_dir(&ours_cache)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_file())
        .count();
    assert_eq!(left, n / 2, "glance-cached prune left {left} files");
    figures.add(
        "prune_command_ms",
        format!("`glance-cached prune` of {n} images to half (whole command)"),
        ours_secs * 1000.0,
        "ms",
        "",
    );
    figures.add(
        "prune_command_per_file_us",
        format!("`glance-cached prune` of {n} images to half, per file removed"),
        ours_secs * 1e6 / (n / 2) as f64,
        "us",
        "",
    );
    figures.versus(
        format!("prune {n} images to half: `glance-cache-pruner` vs `glance-cached prune`"),
        glance_secs * 1000.0,
        "prune_command_ms",
        "ms",
    );
    figures.versus(
        "prune, per file removed (the same commands)".to_string(),
        glance_secs * 1e6 / (n / 2) as f64,
        "prune_command_per_file_us",
        "us",
    );
}

async fn prune_and_clean(figures: &mut Figures, glance: Option<&Glance>) {
    let n = if smoke() { 2_000 } else { 100_000 };
    // Glance first, once, on the same shape (its prune: `prune_commands`).
    let glance = match glance {
        Some(g) => Some(glance_clean(g, n).await),
        None => None,
    };
    let (mut prune_secs, mut clean_secs, mut rm_secs) = (vec![], vec![], vec![]);
    for _ in 0..rounds() {
        let tmp = tempfile::Builder::new()
            .prefix("gc-bench-")
            .tempdir_in(bench_dir())
            .unwrap();
        let dir = tmp.path().join("cache");
        let url = format!("sqlite://{}/bench.db", tmp.path().display());
        let (driver, db) = populated(&dir, &url, n, 1024).await;
        // The clean first, in the sequence Glance's (`glance_clean`) runs: the population,
        // then n stalled incomplete/ files and n invalid/ files, then the clean; so both
        // remove files made the same way on a tree in the same state.
        stale_files(&[&dir], n);
        let started = Instant::now();
        let report = driver
            .clean(
                CleanPolicy {
                    stall_time: Duration::from_secs(86_400),
                    invalid_grace: Duration::ZERO,
                },
                SystemTime::now(),
            )
            .await
            .unwrap();
        clean_secs.push(started.elapsed().as_secs_f64());
        assert_eq!(report.files(), 2 * n);
        // The same files again, for rm -rf.
        let twin = tmp.path().join("twin");
        stale_files(&[&twin], n);
        let started = Instant::now();
        assert!(
            Command::new("rm")
                .arg("-rf")
                .arg(&twin)
                .status()
                .unwrap()
                .success()
        );
        rm_secs.push(started.elapsed().as_secs_f64());

        let started = Instant::now();
        let report = driver
            .prune(PrunePolicy {
                max_size: (n as u64 * 1024) / 2,
                ..Default::default()
            })
            .await
            .unwrap();
        prune_secs.push(started.elapsed().as_secs_f64());
        assert_eq!(report.files(), n / 2);
        db.close().await;
    }
    let k = format!("{}k", n / 1000);
    figures.add(
        "prune_100k_to_half_ms",
        format!("prune {k} small images to half the size"),
        median(prune_secs.clone()) * 1000.0,
        "ms",
        "< 3000 ms",
    );
    figures.add(
        "clean_2x100k_ms",
        format!("clean {k} stalled + {k} invalid files"),
        median(clean_secs.clone()) * 1000.0,
        "ms",
        "< 5000 ms",
    );
    figures.add(
        "rm_rf_2x100k_ms",
        format!("rm -rf of the same {} files", 2 * n),
        median(rm_secs.clone()) * 1000.0,
        "ms",
        "baseline",
    );
    figures.add(
        "prune_per_file_us",
        "prune, per file removed".into(),
        median(prune_secs.clone()) * 1e6 / (n / 2) as f64,
        "us",
        "",
    );
    figures.add(
        "clean_per_file_us",
        "clean, per file removed".into(),
        median(clean_secs.clone()) * 1e6 / (2 * n) as f64,
        "us",
        "",
    );
    if let Some(clean) = glance {
        figures.versus(
            format!("clean {k} stalled + {k} invalid, per file (driver)"),
            clean * 1e6 / (2 * n) as f64,
            "clean_per_file_us",
            "us",
        );
    }
    let ratio = median(clean_secs) / median(rm_secs);
    figures.rows.push((
        "clean / rm -rf".into(),
        format!("{ratio:.2}"),
        String::new(),
    ));
    figures
        .json
        .insert("clean_over_rm_rf".into(), serde_json::json!(ratio));
}

/// Whether the part `name` runs: every part unless `BENCH_ONLY` lists some.
fn part(name: &str) -> bool {
    common::part_selected("BENCH_ONLY", name)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut figures = Figures {
        rows: vec![],
        json: serde_json::Map::new(),
        versus: vec![],
    };
    runtime.block_on(async {
        let glance = Glance::find();
        // BENCH_SIZES=10000 (a comma list) picks the SQLite populations.
        let sizes: Vec<usize> = match std::env::var("BENCH_SIZES") {
            Ok(list) => list.split(',').map(|n| n.trim().parse().unwrap()).collect(),
            Err(_) if smoke() => vec![2_000],
            Err(_) => vec![10_000, 100_000],
        };
        for n in sizes.into_iter().filter(|_| part("ops")) {
            let tmp = tempfile::Builder::new()
                .prefix("gc-bench-db-")
                .tempdir_in(bench_dir())
                .unwrap();
            let url = format!("sqlite://{}/bench.db", tmp.path().display());
            driver_ops(&mut figures, "sqlite", &url, n, glance.as_ref()).await;
        }
        for (backend, var) in [
            ("postgresql", "GLANCE_CACHED_TEST_POSTGRES_URL"),
            ("mariadb", "GLANCE_CACHED_TEST_MYSQL_URL"),
        ] {
            match std::env::var(var) {
                _ if !part("servers") => {}
                Ok(url) if !url.is_empty() => {
                    let n = if smoke() { 2_000 } else { 10_000 };
                    driver_ops(&mut figures, backend, &url, n, None).await;
                    cleanup_node(&url).await;
                }
                _ => eprintln!("{backend}: {var} not set, skipped (scripts/bench sets it)"),
            }
        }
        if part("prune_clean") {
            prune_and_clean(&mut figures, glance.as_ref()).await;
        }
        match &glance {
            Some(g) if part("prune_commands") => prune_commands(&mut figures, g).await,
            _ => {}
        }
    });
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    figures.json.insert(
        "date".into(),
        serde_json::json!(chrono::Utc::now().format("%Y-%m-%d").to_string()),
    );
    figures
        .json
        .insert("cores".into(), serde_json::json!(cores));
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("driver.json"),
        serde_json::to_string_pretty(&figures.json).unwrap(),
    )
    .unwrap();
    println!("| figure | value | target |\n|---|---|---|");
    for (label, value, target) in figures.rows {
        println!("| {label} | {value} | {target} |");
    }
    if !figures.versus.is_empty() {
        println!();
        println!(
            "Glance 33.0.0's `centralized_db` driver, measured right before ours on the same population and disk:"
        );
        println!();
        println!(
            "| figure | Glance | glance-cached | glance-cached / Glance (speed) | not slower |"
        );
        println!("|---|---|---|---|---|");
        for (label, glance, ours, unit) in figures.versus {
            // As speeds: a rate over a rate, or a time under a time.
            let speedup = if unit == "/s" {
                ours / glance
            } else {
                glance / ours
            };
            let (g, o) = if unit == "us" {
                (format!("{glance:.1} {unit}"), format!("{ours:.1} {unit}"))
            } else {
                (format!("{glance:.0} {unit}"), format!("{ours:.0} {unit}"))
            };
            let met = if speedup >= 1.0 { "met" } else { "**missed**" };
            println!("| {label} | {g} | {o} | {speedup:.2} | {met} |");
        }
    }
}

/// Removes the bench node's rows from a shared server database.
async fn cleanup_node(url: &str) {
    let db = Db::connect(url, &DbOptions::default()).await.unwrap();
    let node = NodeDb::open_read_only(db.clone(), "http://bench:9292")
        .await
        .unwrap();
    node.delete_all_cached_images().await.unwrap();
    node.dequeue_all().await.unwrap();
    db.close().await;
}
