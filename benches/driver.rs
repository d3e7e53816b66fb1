//! Driver operations, prune and clean, on SQLite (and PostgreSQL / MariaDB when their
//! URLs are set, as `scripts/bench` does).
//!
//!   scripts/bench                      # everything, with the servers started
//!   BENCH_SMOKE=1 cargo bench --bench driver
//!   BENCH_SIZES=10000 cargo bench --bench driver   # SQLite with 10k images only
//!
//! Figures are medians of `BENCH_ROUNDS` rounds (default 3). Results: a table on stdout
//! and JSON in target/bench/driver.json.

// Test and benchmark code: a panic here is a failed run, not a crashed daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A test or benchmark binary has no API: `pub` shares its kit between its files.
#![allow(unreachable_pub)]
// Measured and real times (timings, file ages, deadlines): the clock lint is for the
// daemon's code.
#![allow(clippy::disallowed_methods)]

mod common;

use common::{bench_dir, median, ops_per_second, rounds, smoke};
use std::path::Path;
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
}

impl Figures {
    fn add(&mut self, key: &str, label: String, value: f64, unit: &str, target: &str) {
        self.rows
            .push((label, format!("{value:.0} {unit}"), target.into()));
        self.json.insert(key.into(), serde_json::json!(value));
    }
}

async fn driver_ops(figures: &mut Figures, backend: &str, db_url: &str, n: usize) {
    let ops = if smoke() { 500 } else { 10_000.min(n) };
    let tmp = tempfile::Builder::new()
        .prefix("gc-bench-")
        .tempdir_in(bench_dir())
        .unwrap();
    let (driver, db) = populated(&tmp.path().join("cache"), db_url, n, 64).await;
    let (mut cached, mut read, mut hits, mut queue, mut list, mut pass) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut served = vec![];
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
        let started = Instant::now();
        let listed = driver.get_cached_images().await.unwrap();
        assert_eq!(listed.len(), n);
        list.push(started.elapsed().as_secs_f64() * 1000.0);
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
}

async fn prune_and_clean(figures: &mut Figures) {
    let n = if smoke() { 2_000 } else { 100_000 };
    let (mut prune_secs, mut clean_secs, mut rm_secs) = (vec![], vec![], vec![]);
    for _ in 0..rounds() {
        let tmp = tempfile::Builder::new()
            .prefix("gc-bench-")
            .tempdir_in(bench_dir())
            .unwrap();
        let dir = tmp.path().join("cache");
        let url = format!("sqlite://{}/bench.db", tmp.path().display());
        let (driver, db) = populated(&dir, &url, n, 1024).await;
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

        // n stalled incomplete/ files and n invalid/ files, and the same tree for rm -rf.
        let old = SystemTime::now() - Duration::from_secs(7 * 86_400);
        let twin = tmp.path().join("twin");
        std::fs::create_dir_all(twin.join("incomplete")).unwrap();
        std::fs::create_dir_all(twin.join("invalid")).unwrap();
        for i in 0..n {
            let id = image_id(i).to_string();
            for root in [&dir, &twin] {
                for sub in ["incomplete", "invalid"] {
                    let p = root.join(sub).join(&id);
                    std::fs::write(&p, b"x").unwrap();
                    filetime::set_file_mtime(&p, filetime::FileTime::from_system_time(old))
                        .unwrap();
                }
            }
        }
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
        db.close().await;
    }
    let k = format!("{}k", n / 1000);
    figures.add(
        "prune_100k_to_half_ms",
        format!("prune {k} small images to half the size"),
        median(prune_secs) * 1000.0,
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

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut figures = Figures {
        rows: vec![],
        json: serde_json::Map::new(),
    };
    runtime.block_on(async {
        // BENCH_SIZES=10000 (a comma list) picks the SQLite populations.
        let sizes: Vec<usize> = match std::env::var("BENCH_SIZES") {
            Ok(list) => list.split(',').map(|n| n.trim().parse().unwrap()).collect(),
            Err(_) if smoke() => vec![2_000],
            Err(_) => vec![10_000, 100_000],
        };
        for n in sizes {
            let tmp = tempfile::Builder::new()
                .prefix("gc-bench-db-")
                .tempdir_in(bench_dir())
                .unwrap();
            let url = format!("sqlite://{}/bench.db", tmp.path().display());
            driver_ops(&mut figures, "sqlite", &url, n).await;
        }
        for (backend, var) in [
            ("postgresql", "GLANCE_CACHED_TEST_POSTGRES_URL"),
            ("mariadb", "GLANCE_CACHED_TEST_MYSQL_URL"),
        ] {
            match std::env::var(var) {
                Ok(url) if !url.is_empty() => {
                    let n = if smoke() { 2_000 } else { 10_000 };
                    driver_ops(&mut figures, backend, &url, n).await;
                    cleanup_node(&url).await;
                }
                _ => eprintln!("{backend}: {var} not set, skipped (scripts/bench sets it)"),
            }
        }
        prune_and_clean(&mut figures).await;
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
