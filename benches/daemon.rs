//! The daemon's reaction times, idle cost and startup, through the real binary.
//!
//!   cargo bench --bench daemon            # 1000 invalid files, 20 prunes, 60 s idle, 100k startup
//!   BENCH_SMOKE=1 cargo bench --bench daemon
//!
//! Results: a table on stdout and JSON in target/bench/daemon.json.

// Test and benchmark code: a panic here is a failed run, not a crashed daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A test or benchmark binary has no API: `pub` shares its kit between its files.
#![allow(unreachable_pub)]
// Measured and real times (timings, file ages, deadlines): the clock lint is for the
// daemon's code.
#![allow(clippy::disallowed_methods)]

mod common;

use common::bench_dir;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use glance_cached::cache::{Area, CacheLayout};
use glance_cached::db::{Db, DbOptions, DbTime, NodeDb};
use glance_cached::image_id::ImageId;

fn smoke() -> bool {
    std::env::var_os("BENCH_SMOKE").is_some()
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

struct Daemon {
    child: Child,
    notify: UnixDatagram,
}

impl Daemon {
    /// Starts the daemon on `config` and waits for READY=1; returns it and the time taken.
    fn start(dir: &Path, config: &Path) -> (Daemon, Duration) {
        let sock = dir.join(format!(
            "notify-{}.sock",
            Instant::now().elapsed().as_nanos()
        ));
        let _ = std::fs::remove_file(&sock);
        let notify = UnixDatagram::bind(&sock).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let started = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_glance-cached"))
            .args(["--config", config.to_str().unwrap(), "run"])
            .env("NOTIFY_SOCKET", &sock)
            .env("GLANCE_CACHED_LOG__LEVEL", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 4096];
        loop {
            let n = notify.recv(&mut buf).expect("READY=1 within 60 s");
            if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                break;
            }
        }
        let took = started.elapsed();
        // Keep reading so the daemon never finds the socket full.
        let reader = notify.try_clone().unwrap();
        reader
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match reader.recv(&mut buf) {
                    Ok(_) => {}
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break,
                }
            }
        });
        (Daemon { child, notify }, took)
    }

    fn stop(mut self) {
        common::terminate(&mut self.child);
        drop(self.notify);
    }

    fn proc_status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// utime + stime of the whole process, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let after = stat.rsplit_once(')').unwrap().1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    /// Context switches of every thread: each is a wakeup.
    fn wakeups(&self) -> u64 {
        let mut total = 0;
        for task in std::fs::read_dir(format!("/proc/{}/task", self.child.id()))
            .unwrap()
            .flatten()
        {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            for l in status.lines() {
                if l.starts_with("voluntary_ctxt_switches")
                    || l.starts_with("nonvoluntary_ctxt_switches")
                {
                    total += l
                        .split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
        total
    }
}

fn write_config(dir: &Path, cache: &Path, extra: &str) -> PathBuf {
    let path = dir.join("bench.toml");
    std::fs::write(
        &path,
        format!("[cache]\ndir = \"{}\"\n{extra}\n", cache.display()),
    )
    .unwrap();
    path
}

fn wait_gone(path: &Path, limit: Duration) -> f64 {
    let started = Instant::now();
    while path.exists() {
        assert!(
            started.elapsed() < limit,
            "{} was not removed",
            path.display()
        );
        std::thread::sleep(Duration::from_micros(100));
    }
    started.elapsed().as_secs_f64() * 1000.0
}

fn main() {
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let mut json = serde_json::Map::new();
    let tmp = tempfile::Builder::new()
        .prefix("gc-bench-")
        .tempdir_in(bench_dir())
        .unwrap();

    // 3a. A file in invalid/ disappears: latency over many files.
    let files = if smoke() { 100 } else { 1000 };
    let cache = tmp.path().join("react");
    let config = write_config(tmp.path(), &cache, "");
    let (daemon, _) = Daemon::start(tmp.path(), &config);
    let mut latencies = Vec::with_capacity(files);
    for i in 0..files {
        let p = cache.join("invalid").join(format!("inv-{i}"));
        std::fs::write(&p, b"x").unwrap();
        latencies.push(wait_gone(&p, Duration::from_secs(10)));
    }
    let (p50, p99) = (
        percentile(latencies.clone(), 0.5),
        percentile(latencies.clone(), 0.99),
    );
    rows.push((
        format!("invalid/ file removed, p50 over {files}"),
        format!("{p50:.1} ms"),
        String::new(),
    ));
    rows.push((
        format!("invalid/ file removed, p99 over {files}"),
        format!("{p99:.1} ms"),
        "< 200 ms".into(),
    ));
    json.insert("invalid_removed_p50_ms".into(), p50.into());
    json.insert("invalid_removed_p99_ms".into(), p99.into());
    daemon.stop();

    // 3b. A new image takes the cache over max_size: the LRU image is pruned.
    let cache = tmp.path().join("prune");
    let config = write_config(tmp.path(), &cache, "max_size = 3000");
    let (daemon, _) = Daemon::start(tmp.path(), &config);
    let rounds = if smoke() { 5 } else { 20 };
    let mut prune_ms = Vec::new();
    for i in 0..rounds {
        // Two 1000-byte images fit; publishing a third (as Glance does: write in
        // incomplete/, rename into place) takes the cache over.
        for j in 0..3 {
            let name = format!("p{i}-{j}");
            let part = cache.join("incomplete").join(&name);
            std::fs::write(&part, vec![0u8; 1000]).unwrap();
            std::fs::rename(&part, cache.join(&name)).unwrap();
            if j < 2 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let started = Instant::now();
        loop {
            let size: u64 = std::fs::read_dir(&cache)
                .unwrap()
                .flatten()
                .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
                .filter(|e| ImageId::from_file_name(&e.file_name()).is_some())
                .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                .sum();
            if size <= 3000 {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "not pruned");
            std::thread::sleep(Duration::from_micros(200));
        }
        prune_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let (pm50, pmax) = (
        percentile(prune_ms.clone(), 0.5),
        percentile(prune_ms.clone(), 1.0),
    );
    rows.push((
        format!("over max_size to pruned, median of {rounds}"),
        format!("{pm50:.1} ms"),
        String::new(),
    ));
    rows.push((
        format!("over max_size to pruned, max of {rounds}"),
        format!("{pmax:.1} ms"),
        "< 500 ms".into(),
    ));
    json.insert("prune_reaction_median_ms".into(), pm50.into());
    json.insert("prune_reaction_max_ms".into(), pmax.into());
    daemon.stop();

    // 5. Idle: RSS, CPU and wakeups over a quiet period.
    let idle = if smoke() {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(60)
    };
    let cache = tmp.path().join("idle");
    let config = write_config(tmp.path(), &cache, "");
    let (daemon, _) = Daemon::start(tmp.path(), &config);
    std::thread::sleep(Duration::from_secs(2)); // let the first passes finish
    let (ticks0, wake0) = (daemon.cpu_ticks(), daemon.wakeups());
    std::thread::sleep(idle);
    let (ticks1, wake1) = (daemon.cpu_ticks(), daemon.wakeups());
    let hz = 100.0; // USER_HZ on Linux
    let cpu_ms = (ticks1 - ticks0) as f64 * 1000.0 / hz;
    let rss_kib = daemon.proc_status("VmRSS:");
    let per_min = (wake1 - wake0) as f64 * 60.0 / idle.as_secs_f64();
    rows.push((
        format!("idle {}s: RSS", idle.as_secs()),
        format!("{:.1} MiB", rss_kib as f64 / 1024.0),
        "< 20 MiB".into(),
    ));
    rows.push((
        format!("idle {}s: CPU time", idle.as_secs()),
        format!("{cpu_ms:.0} ms"),
        "< 50 ms".into(),
    ));
    rows.push((
        format!("idle {}s: thread wakeups", idle.as_secs()),
        format!("{per_min:.1} /min"),
        "intervals only".into(),
    ));
    json.insert("idle_rss_kib".into(), rss_kib.into());
    json.insert("idle_cpu_ms".into(), cpu_ms.into());
    json.insert("idle_wakeups_per_min".into(), per_min.into());
    daemon.stop();

    // 6. Startup to READY with many cached images, reconcile included.
    let n = if smoke() { 5_000 } else { 100_000 };
    let cache = tmp.path().join("startup");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let layout = CacheLayout::open(&cache).unwrap();
        // The default place (config::DEFAULT_SQLITE_FILE), where the daemon looks.
        let db_file = cache.join(glance_cached::config::DEFAULT_SQLITE_FILE);
        std::fs::create_dir_all(db_file.parent().unwrap()).unwrap();
        let url = format!("sqlite://{}", db_file.display());
        let db = Db::connect(&url, &DbOptions::default()).await.unwrap();
        let db = NodeDb::configure(db, glance_cached::config::DEFAULT_NODE_URL)
            .await
            .unwrap();
        let now = DbTime::from_utc(chrono::Utc::now());
        let mut rows = Vec::with_capacity(n);
        for i in 0..n {
            let id = ImageId::parse(&format!("{i:08x}-0000-4000-8000-000000000000")).unwrap();
            std::fs::write(layout.path(Area::Cached, &id), b"tiny image").unwrap();
            rows.push((id, 10i64, now));
        }
        db.adopt_cached_images(&rows).await.unwrap();
        db.db().close().await;
    });
    let config = write_config(tmp.path(), &cache, "");
    let mut startup = Vec::new();
    for _ in 0..3 {
        let (daemon, took) = Daemon::start(tmp.path(), &config);
        startup.push(took.as_secs_f64() * 1000.0);
        daemon.stop();
    }
    let s50 = percentile(startup, 0.5);
    rows.push((
        format!("start to READY=1 with {}k cached images", n / 1000),
        format!("{s50:.0} ms"),
        "< 2000 ms".into(),
    ));
    json.insert("startup_ready_ms".into(), s50.into());

    json.insert(
        "date".into(),
        chrono::Utc::now().format("%Y-%m-%d").to_string().into(),
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("daemon.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("| figure | value | target |\n|---|---|---|");
    for (label, value, target) in rows {
        println!("| {label} | {value} | {target} |");
    }
}
