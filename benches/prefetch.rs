//! Prefetch against the real limit: `curl -o` from a `sendfile` origin in a process of
//! its own, `sha512sum` and `md5sum` over the same bytes, and glance-cached's
//! `prefetch` command under both verification policies, in the same run.
//!
//! The origin is nginx (Debian's `nginx-light`; the benchmark stops, saying so, when it
//! is missing: an in-process origin would put the origin's CPU into our figures). Its
//! own config in a temp dir (`daemon off`, loopback, `sendfile on`) serves one image as
//! Glance does: `/v2/images/{id}` as Glance's JSON (`size`, `checksum`, `os_hash_algo`
//! sha512, `os_hash_value`) and `/v2/images/{id}/file` as the bytes. So the real Glance
//! upstream path runs: the record, then `Range: bytes=0-` (nginx answers 206 with the
//! whole body), the published SHA-512 verified.
//!
//! Each round runs, one after the other: `curl -s -o`; `sha512sum` and `md5sum` of the
//! source file (in the page cache); `glance-cached queue` + `glance-cached prefetch`
//! with `prefetcher.verify = "strongest"` (the default: SHA-512 and size) and with
//! `"all"` (MD5 too), each into a fresh cache (HTTP, digests, write, fsync, rename,
//! SQLite row). Every figure is one child process's, read from `wait4`: wall time,
//! user + system CPU, peak RSS. Then the real daemon prefetches a larger image from
//! the same nginx and its peak RSS (VmHWM) is read.
//!
//!   cargo bench --bench prefetch                       # 1 GiB x 5 rounds, 4 GiB RSS run
//!   BENCH_SIZE_MIB=64 BENCH_RSS_SIZE_MIB=128 BENCH_ROUNDS=2 cargo bench --bench prefetch
//!   BENCH_SMOKE=1 cargo bench --bench prefetch         # 16 MiB x 1, 32 MiB RSS run
//!
//! Results: a table on stdout and JSON in target/bench/prefetch.json.

// Test and benchmark code: a panic here is a failed run, not a crashed daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A test or benchmark binary has no API: `pub` shares its kit between its files.
#![allow(unreachable_pub)]
// Measured and real times (timings, file ages, deadlines): the clock lint is for the
// daemon's code.
#![allow(clippy::disallowed_methods)]

mod common;

use common::nginx::{Nginx, Served, nginx_binary};
use common::{Measured, bench_dir, median, run_measured, smoke};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn curl_once(url: &str, out: &Path) -> Measured {
    let m = run_measured(
        Command::new("curl")
            .args(["-s", "-f", "-o"])
            .arg(out)
            .arg(url),
    );
    assert!(m.success, "curl failed");
    std::fs::remove_file(out).unwrap();
    m
}

fn digest_once(tool: &str, file: &Path) -> Measured {
    let m = run_measured(Command::new(tool).arg(file).stdout(Stdio::null()));
    assert!(m.success, "{tool} failed");
    m
}

/// `glance-cached queue` then `glance-cached prefetch` (measured) into a fresh cache.
fn ours_once(work: &Path, port: u16, image: &Served, verify: &str, max_mib: u64) -> Measured {
    let bin = env!("CARGO_BIN_EXE_glance-cached");
    let cache = work.join(format!("cache-{verify}"));
    let config = work.join(format!("prefetch-{verify}.toml"));
    std::fs::write(
        &config,
        format!(
            "[cache]\ndir = \"{}\"\nmax_size = \"{}MiB\"\n[upstream]\nkind = \"glance\"\nurl = \"http://127.0.0.1:{port}\"\n[prefetcher]\nverify = \"{verify}\"\n",
            cache.display(),
            max_mib
        ),
    )
    .unwrap();
    let log = |name: &str| std::fs::File::create(work.join(name)).unwrap();
    let queued = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .args(["queue", &image.id])
        .stdout(log("queue.log"))
        .stderr(log("queue.err"))
        .status()
        .unwrap();
    assert!(queued.success(), "glance-cached queue failed");
    let m = run_measured(
        Command::new(bin)
            .arg("--config")
            .arg(&config)
            .arg("prefetch")
            .stdout(log("prefetch.log"))
            .stderr(log("prefetch.err")),
    );
    let published = cache.join(&image.id);
    assert!(
        m.success && published.is_file(),
        "glance-cached prefetch failed: {}{}",
        std::fs::read_to_string(work.join("prefetch.log")).unwrap_or_default(),
        std::fs::read_to_string(work.join("prefetch.err")).unwrap_or_default()
    );
    std::fs::remove_dir_all(&cache).unwrap();
    m
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Medians of one tool's rounds: seconds, CPU seconds, peak RSS (KiB).
struct Figure {
    runs: Vec<Measured>,
}

impl Figure {
    fn secs(&self) -> f64 {
        median(self.runs.iter().map(|m| m.wall).collect())
    }
    fn cpu(&self) -> f64 {
        median(self.runs.iter().map(|m| m.cpu).collect())
    }
    fn rss_kib(&self) -> f64 {
        median(self.runs.iter().map(|m| m.max_rss_kib as f64).collect())
    }
    fn json(&self, mib: f64) -> serde_json::Value {
        serde_json::json!({
            "seconds": self.runs.iter().map(|m| m.wall).collect::<Vec<_>>(),
            "cpu_seconds": self.runs.iter().map(|m| m.cpu).collect::<Vec<_>>(),
            "max_rss_kib": self.runs.iter().map(|m| m.max_rss_kib).collect::<Vec<_>>(),
            "median_mib_s": mib / self.secs(),
            "median_cpu_seconds_per_gib": self.cpu() * 1024.0 / mib,
        })
    }
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let size_mib = env_u64("BENCH_SIZE_MIB", if smoke() { 16 } else { 1024 });
    let rss_mib = env_u64("BENCH_RSS_SIZE_MIB", if smoke() { 32 } else { 4096 });
    let rounds = env_u64("BENCH_ROUNDS", if smoke() { 1 } else { 5 }) as usize;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let work = tempfile::Builder::new()
        .prefix("gc-bench-")
        .tempdir_in(bench_dir())
        .unwrap();
    nginx_binary();
    eprintln!("generating a {size_mib} MiB and a {rss_mib} MiB source...");
    let image = Served::new(work.path(), "bench-image", size_mib);
    let rss_image = Served::new(work.path(), "rss-image", rss_mib);
    let nginx = Nginx::start(work.path(), &[&image, &rss_image]);
    let port = nginx.port;
    let file_url = format!("http://127.0.0.1:{port}/v2/images/{}/file", image.id);
    let max_mib = size_mib * 2 + 16;

    let curl_out = work.path().join("curl.out");
    curl_once(&file_url, &curl_out); // warm the page cache and the origin
    let mut curl = Figure { runs: vec![] };
    let mut sha512sum = Figure { runs: vec![] };
    let mut md5sum = Figure { runs: vec![] };
    let mut strongest = Figure { runs: vec![] };
    let mut all = Figure { runs: vec![] };
    for round in 0..rounds {
        curl.runs.push(curl_once(&file_url, &curl_out));
        sha512sum.runs.push(digest_once("sha512sum", &image.file));
        md5sum.runs.push(digest_once("md5sum", &image.file));
        strongest
            .runs
            .push(ours_once(work.path(), port, &image, "strongest", max_mib));
        all.runs
            .push(ours_once(work.path(), port, &image, "all", max_mib));
        let last = |f: &Figure| *f.runs.last().unwrap();
        let show = |m: Measured| format!("{:.3}s/{:.2} CPU-s", m.wall, m.cpu);
        eprintln!(
            "round {round}: curl {}, sha512sum {}, md5sum {}, glance-cached strongest {}, all {}",
            show(last(&curl)),
            show(last(&sha512sum)),
            show(last(&md5sum)),
            show(last(&strongest)),
            show(last(&all)),
        );
    }
    let mib = size_mib as f64;
    let per_gib = |f: &Figure| f.cpu() * 1024.0 / mib;
    let ratio = curl.secs() / strongest.secs();
    let ratio_all = curl.secs() / all.secs();
    let cpu_limit = 1.2 * (per_gib(&curl) + per_gib(&sha512sum));
    let cpu_limit_all = 1.2 * (per_gib(&curl) + per_gib(&md5sum) + per_gib(&sha512sum));

    // Peak RSS of the real daemon prefetching a large image, from the same nginx.
    eprintln!("peak RSS run: a {rss_mib} MiB image through the daemon...");
    let rss_cache = work.path().join("rss-cache");
    let config = work.path().join("rss.toml");
    std::fs::write(
        &config,
        format!(
            "[cache]\ndir = \"{}\"\nmax_size = \"{}MiB\"\n[upstream]\nkind = \"glance\"\nurl = \"http://127.0.0.1:{port}\"\n",
            rss_cache.display(),
            rss_mib * 2
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_glance-cached");
    let mut daemon = Command::new(bin)
        .args(["--config", config.to_str().unwrap(), "run"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let queued = Command::new(bin)
        .args(["--config", config.to_str().unwrap(), "queue", &rss_image.id])
        .output()
        .unwrap();
    assert!(queued.status.success());
    let started = Instant::now();
    let published = rss_cache.join(&rss_image.id);
    while !published.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(1200),
            "the daemon did not prefetch the image"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rss_secs = started.elapsed().as_secs_f64();
    let hwm_kib = vm_hwm_kib(daemon.id()).unwrap_or(0);
    common::terminate(&mut daemon);
    drop(nginx);

    // What one core hashes, in memory, with the implementation the cache uses (the
    // system's OpenSSL): the floor under the prefetch path's CPU cost.
    let block = vec![0x5au8; 64 << 20];
    let rate = |digest: openssl::hash::MessageDigest| {
        let started = Instant::now();
        for _ in 0..4 {
            std::hint::black_box(openssl::hash::hash(digest, &block).unwrap());
        }
        256.0 / started.elapsed().as_secs_f64()
    };
    let md5_rate = rate(openssl::hash::MessageDigest::md5());
    let sha512_rate = rate(openssl::hash::MessageDigest::sha512());
    // One stream is hashed no faster than one core runs its slowest digest: that rate
    // over curl's caps the ratio, whatever the core count.
    let ceiling = sha512_rate / (mib / curl.secs());
    let ceiling_all = md5_rate.min(sha512_rate) / (mib / curl.secs());

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let load_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
    let json = serde_json::json!({
        "date": date,
        "machine": {"cores": cores, "memory_kib": mem_kib},
        "loadavg_start": load.trim(),
        "loadavg_end": load_end.trim(),
        "origin": "nginx, sendfile on",
        "image_mib": size_mib,
        "rounds": rounds,
        "curl": curl.json(mib),
        "sha512sum": sha512sum.json(mib),
        "md5sum": md5sum.json(mib),
        "glance_cached_strongest": strongest.json(mib),
        "glance_cached_all": all.json(mib),
        "ratio": ratio,
        "ratio_all": ratio_all,
        "cpu_limit_per_gib": cpu_limit,
        "cpu_limit_all_per_gib": cpu_limit_all,
        "rss_image_mib": rss_mib,
        "rss_prefetch_seconds": rss_secs,
        "daemon_peak_rss_kib": hwm_kib,
        "md5_one_core_mib_s": md5_rate,
        "sha512_one_core_mib_s": sha512_rate,
        "ratio_ceiling_sha512": ceiling,
        "ratio_ceiling_all": ceiling_all,
    });
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(
        out_dir.join("prefetch.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    let met = |ok: bool| if ok { "met" } else { "**missed**" };
    println!(
        "Origin nginx (sendfile), {size_mib} MiB, medians of {rounds} rounds; CPU is user + system of the one process (wait4)."
    );
    println!();
    println!("| figure | MiB/s | CPU-s per GiB | peak RSS | target |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, f: &Figure, target: String| {
        println!(
            "| {name} | {:.0} | {:.2} | {:.1} MiB | {target} |",
            mib / f.secs(),
            per_gib(f),
            f.rss_kib() / 1024.0
        );
    };
    row("`curl -s -o`", &curl, "baseline".into());
    row("`sha512sum` of the file", &sha512sum, String::new());
    row("`md5sum` of the file", &md5sum, String::new());
    row(
        "glance-cached `prefetch`, verify = \"strongest\" (SHA-512 + size)",
        &strongest,
        format!(
            "ratio {ratio:.2} (>= 0.6: {}); CPU <= 1.2 x (curl + sha512sum) = {cpu_limit:.2}: {}",
            met(ratio >= 0.6),
            met(per_gib(&strongest) <= cpu_limit)
        ),
    );
    row(
        "glance-cached `prefetch`, verify = \"all\" (MD5 + SHA-512 + size)",
        &all,
        format!(
            "ratio {ratio_all:.2}; CPU <= 1.2 x (curl + md5sum + sha512sum) = {cpu_limit_all:.2}: {}",
            met(per_gib(&all) <= cpu_limit_all)
        ),
    );
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| daemon peak RSS (VmHWM) prefetching {rss_mib} MiB | {:.1} MiB ({:.0} MiB/s; < 64 MiB: {}) |",
        hwm_kib as f64 / 1024.0,
        rss_mib as f64 / rss_secs,
        met(hwm_kib > 0 && hwm_kib < 64 * 1024)
    );
    println!(
        "| MD5 / SHA-512 on one core, in memory (OpenSSL) | {md5_rate:.0} / {sha512_rate:.0} MiB/s |"
    );
    println!(
        "| ratio ceiling: SHA-512 on one core / curl (all: slower digest / curl) | {ceiling:.2} ({ceiling_all:.2}) |"
    );
    println!(
        "| machine | {cores} cores, {:.0} GiB, {date}, load {} -> {} |",
        mem_kib as f64 / 1_048_576.0,
        load.split_whitespace().next().unwrap_or("?"),
        load_end.split_whitespace().next().unwrap_or("?")
    );
    let _ = std::io::stdout().flush();
}
