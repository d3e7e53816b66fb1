//! Read-through on a miss: `GET /v2/images/{id}/file` of an image glance-cached has not
//! cached, from 1 and from N concurrent clients at once (`curl -o /dev/null`, one
//! process each), against `curl -o /dev/null` straight from the upstream, in the same
//! run. The upstream is nginx posing as Glance (`common::nginx`: a process of its own,
//! `sendfile`), whose access log counts every byte it sends, so "the image is fetched
//! once, however many clients ask" is measured where the bytes leave.
//!
//! Each round: a direct download from nginx (the baseline: its time to first byte and
//! to last byte); then a daemon with a fresh cache, `[http]` on, one client (time to
//! first byte on a miss, time to last byte); then another fresh daemon and N clients
//! started together (each client's time to last byte, median and max; the wall time
//! until the last one ended). What nginx sent during each cold run is read from its
//! access log: the image's bytes (`$body_bytes_sent` of the `/file` requests, the
//! authorization's `Range: bytes=0-0` probes included) over the image's size.
//!
//!   cargo bench --bench fill                              # 256 MiB, 100 clients, 3 rounds
//!   BENCH_SIZE_MIB=64 BENCH_CLIENTS=20 BENCH_ROUNDS=1 cargo bench --bench fill
//!   BENCH_SMOKE=1 cargo bench --bench fill                # 8 MiB, 10 clients, 1 round
//!
//! Results: a table on stdout and JSON in target/bench/fill.json.

// Test and benchmark code: a panic here is a failed run, not a crashed daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A test or benchmark binary has no API: `pub` shares its kit between its files.
#![allow(unreachable_pub)]
// Measured real times: the clock lint is for the daemon's code.
#![allow(clippy::disallowed_methods)]

mod common;

use common::nginx::{Nginx, Served, nginx_binary};
use common::{bench_dir, median, rounds, smoke};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const IMAGE_ID: &str = "f1110000-0000-4000-8000-0000000000b1";
const TOKEN: &str = "a-bench-token-nginx-does-not-check";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What curl's `-w` said of one download.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// `time_starttransfer`: seconds to the first byte of the body.
    first_byte: f64,
    /// `time_total`: seconds to the last byte.
    last_byte: f64,
}

/// A `curl -s -S -f -o /dev/null` of `url` with the token, started (not waited for).
fn spawn_curl(url: &str) -> Child {
    Command::new("curl")
        .args(["-s", "-S", "-f", "-o", "/dev/null", "-H"])
        .arg(format!("X-Auth-Token: {TOKEN}"))
        .args([
            "-w",
            "%{http_code} %{size_download} %{time_starttransfer} %{time_total}",
        ])
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning curl")
}

/// Waits for a curl of `spawn_curl` and checks it got the whole image with a 200.
fn finish_curl(child: Child, size: u64) -> Timing {
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let fields: Vec<&str> = said.split_whitespace().collect();
    assert!(
        out.status.success() && fields.len() == 4 && fields[0] == "200",
        "curl failed ({}): {said} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fields[1].parse::<u64>().unwrap(), size, "bytes received");
    Timing {
        first_byte: fields[2].parse().unwrap(),
        last_byte: fields[3].parse().unwrap(),
    }
}

/// What nginx's access log says was sent between two of its lengths.
#[derive(Debug, Clone, Copy, Default)]
struct Sent {
    /// Body bytes of `/file` requests.
    file_body_bytes: u64,
    /// Headers and bodies of every request.
    all_bytes: u64,
    file_requests: u64,
    /// `/file` requests with `Range: bytes=0-0` (the authorization's probe).
    probes: u64,
    record_requests: u64,
}

fn sent_since(log: &Path, offset: u64) -> Sent {
    let text = std::fs::read(log).unwrap();
    let text = String::from_utf8_lossy(&text[offset as usize..]).into_owned();
    let mut sent = Sent::default();
    for line in text.lines() {
        // ACCESS_LOG_FORMAT: msec method uri status "range" body_bytes_sent bytes_sent
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 7, "an access log line: {line}");
        let (body, all) = (
            f[f.len() - 2].parse::<u64>().unwrap(),
            f[f.len() - 1].parse::<u64>().unwrap(),
        );
        sent.all_bytes += all;
        if f[2].ends_with("/file") {
            sent.file_requests += 1;
            sent.file_body_bytes += body;
            if line.contains("\"bytes=0-0\"") {
                sent.probes += 1;
            }
        } else {
            sent.record_requests += 1;
        }
    }
    sent
}

fn log_len(log: &Path) -> u64 {
    std::fs::metadata(log).map(|m| m.len()).unwrap_or(0)
}

/// A glance-cached daemon with a fresh cache and its HTTP listener on, in front of
/// nginx; stopped (SIGTERM) on drop.
struct Daemon {
    child: Child,
    port: u16,
}

impl Daemon {
    fn start(dir: &Path, upstream_port: u16, max_mib: u64) -> Daemon {
        std::fs::create_dir_all(dir).unwrap();
        let port = common::free_port();
        let config = dir.join("glance-cached.toml");
        std::fs::write(
            &config,
            format!(
                "[cache]\ndir = \"{}\"\nmax_size = \"{max_mib}MiB\"\n\
                 [http]\nenabled = true\nlisten = [\"127.0.0.1:{port}\"]\nauth_cache_ttl = \"1h\"\n\
                 [upstream]\nkind = \"glance\"\nurl = \"http://127.0.0.1:{upstream_port}\"\n",
                dir.join("cache").display()
            ),
        )
        .unwrap();
        // `BENCH_GLANCE_CACHED`: another build of the daemon, for an A/B of two versions.
        let bin = std::env::var_os("BENCH_GLANCE_CACHED")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_glance-cached").into());
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .arg("run")
            .stdout(std::fs::File::create(dir.join("daemon.out")).unwrap())
            .stderr(std::fs::File::create(dir.join("daemon.err")).unwrap())
            .spawn()
            .unwrap();
        let mut daemon = Daemon { child, port };
        let started = Instant::now();
        while !daemon.ready() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!(
                    "glance-cached exited ({status}): {}",
                    std::fs::read_to_string(dir.join("daemon.err")).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "glance-cached was not ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    /// `GET /readyz` answers 200.
    fn ready(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let asked = write!(
            stream,
            "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut answer = String::new();
        asked.is_ok()
            && stream.read_to_string(&mut answer).is_ok()
            && answer.starts_with("HTTP/1.1 200")
    }

    /// User + system CPU seconds the daemon has used (`/proc/<pid>/stat`, in clock
    /// ticks: coarse, 10 ms).
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // The fields after the command's parenthesised name; utime and stime are the
        // 14th and 15th of the line.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // SAFETY: sysconf reads a constant of the system.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        ticks as f64 / per_second
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v2/images/{IMAGE_ID}/file", self.port)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        common::terminate(&mut self.child);
    }
}

/// One cold fill: `clients` downloads of the image, not cached, started together.
struct Cold {
    timings: Vec<Timing>,
    /// From the first client's start to the last one's end.
    wall: f64,
    sent: Sent,
    /// The daemon's user + system CPU seconds over the fill (its start excluded).
    cpu: f64,
}

fn cold(dir: &Path, nginx_port: u16, log: &Path, size: u64, clients: usize) -> Cold {
    let max_mib = (size >> 20) * 2 + 64;
    let daemon = Daemon::start(dir, nginx_port, max_mib);
    let url = daemon.url();
    let offset = log_len(log);
    let cpu_before = daemon.cpu_seconds();
    let started = Instant::now();
    let children: Vec<Child> = (0..clients).map(|_| spawn_curl(&url)).collect();
    let timings: Vec<Timing> = children.into_iter().map(|c| finish_curl(c, size)).collect();
    let wall = started.elapsed().as_secs_f64();
    // Every client had the last byte, which waits for the verification: published.
    let published = dir.join("cache").join(IMAGE_ID);
    let meta = std::fs::metadata(&published).expect("the image is cached after the fill");
    assert_eq!(meta.len(), size, "the cached image's size");
    let cpu = daemon.cpu_seconds() - cpu_before;
    drop(daemon);
    let sent = sent_since(log, offset);
    // More than the image and its probes from the upstream: the daemon's log says why.
    if sent.file_body_bytes > size + sent.probes {
        let kept = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench/fill-daemon.err");
        std::fs::create_dir_all(kept.parent().unwrap()).unwrap();
        std::fs::copy(dir.join("daemon.err"), &kept).unwrap();
        let text = std::fs::read(log).unwrap();
        std::fs::write(kept.with_extension("access.log"), &text[offset as usize..]).unwrap();
        eprintln!(
            "the upstream sent more than the image: the daemon's log is in {}",
            kept.display()
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
    Cold {
        timings,
        wall,
        sent,
        cpu,
    }
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let size_mib = env_u64("BENCH_SIZE_MIB", if smoke() { 8 } else { 256 });
    let clients = env_u64("BENCH_CLIENTS", if smoke() { 10 } else { 100 }) as usize;
    let rounds = rounds();
    let size = size_mib << 20;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let work = tempfile::Builder::new()
        .prefix("gc-bench-fill-")
        .tempdir_in(bench_dir())
        .unwrap();
    nginx_binary();
    eprintln!("generating a {size_mib} MiB source...");
    let image = Served::new(work.path(), IMAGE_ID, size_mib);
    let log = work.path().join("access.log");
    let nginx = Nginx::start_logging(work.path(), &[&image], &log);
    let direct_url = format!("http://127.0.0.1:{}/v2/images/{IMAGE_ID}/file", nginx.port);
    finish_curl(spawn_curl(&direct_url), size); // warm the page cache and the origin

    let mut direct = Vec::new();
    let mut one = Vec::new();
    let mut many = Vec::new();
    for round in 0..rounds {
        direct.push(finish_curl(spawn_curl(&direct_url), size));
        let dir = |what: &str| work.path().join(format!("round{round}-{what}"));
        one.push(cold(&dir("one"), nginx.port, &log, size, 1));
        many.push(cold(&dir("many"), nginx.port, &log, size, clients));
        let (d, o, m) = (
            direct.last().unwrap(),
            &one.last().unwrap(),
            &many.last().unwrap(),
        );
        let lasts: Vec<f64> = m.timings.iter().map(|t| t.last_byte).collect();
        eprintln!(
            "round {round}: direct {:.3}s (first byte {:.1} ms); 1 client {:.3}s (first byte {:.1} ms, upstream {:.3}x, {:.2} CPU-s); \
             {clients} clients median {:.3}s max {:.3}s wall {:.3}s (upstream {:.3}x, {} /file requests, {:.2} CPU-s)",
            d.last_byte,
            d.first_byte * 1e3,
            o.timings[0].last_byte,
            o.timings[0].first_byte * 1e3,
            o.sent.file_body_bytes as f64 / size as f64,
            o.cpu,
            median(lasts.clone()),
            lasts.iter().cloned().fold(0.0, f64::max),
            m.wall,
            m.sent.file_body_bytes as f64 / size as f64,
            m.sent.file_requests,
            m.cpu,
        );
    }
    drop(nginx);

    let med = |v: Vec<f64>| median(v);
    let direct_last = med(direct.iter().map(|t| t.last_byte).collect());
    let direct_first = med(direct.iter().map(|t| t.first_byte).collect());
    let one_last = med(one.iter().map(|c| c.timings[0].last_byte).collect());
    let one_first = med(one.iter().map(|c| c.timings[0].first_byte).collect());
    let one_bytes = med(one
        .iter()
        .map(|c| c.sent.file_body_bytes as f64 / size as f64)
        .collect());
    // Per round: the median and the max over the clients; then medians over rounds.
    let many_median = med(many
        .iter()
        .map(|c| median(c.timings.iter().map(|t| t.last_byte).collect()))
        .collect());
    let many_max = med(many
        .iter()
        .map(|c| c.timings.iter().map(|t| t.last_byte).fold(0.0, f64::max))
        .collect());
    let many_wall = med(many.iter().map(|c| c.wall).collect());
    let many_first = med(many
        .iter()
        .map(|c| median(c.timings.iter().map(|t| t.first_byte).collect()))
        .collect());
    let many_bytes = med(many
        .iter()
        .map(|c| c.sent.file_body_bytes as f64 / size as f64)
        .collect());
    let worst_bytes = many
        .iter()
        .chain(one.iter())
        .map(|c| c.sent.file_body_bytes as f64 / size as f64)
        .fold(0.0, f64::max);
    let mib = size_mib as f64;
    // The daemon's CPU per GiB it sent to its clients.
    let one_cpu = med(one.iter().map(|c| c.cpu * 1024.0 / mib).collect());
    let many_cpu = med(many
        .iter()
        .map(|c| c.cpu * 1024.0 / (mib * clients as f64))
        .collect());
    // What the N clients received in all, per second of the wall time.
    let many_aggregate = mib * clients as f64 / many_wall;

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let load_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
    let sent_json = |c: &Cold| {
        serde_json::json!({
            "file_body_bytes": c.sent.file_body_bytes,
            "all_bytes": c.sent.all_bytes,
            "file_requests": c.sent.file_requests,
            "range_0_0_probes": c.sent.probes,
            "record_requests": c.sent.record_requests,
        })
    };
    let json = serde_json::json!({
        "date": date,
        "cores": cores,
        "loadavg_start": load.trim(),
        "loadavg_end": load_end.trim(),
        "origin": "nginx, sendfile on",
        "image_mib": size_mib,
        "clients": clients,
        "rounds": rounds,
        "direct": direct.iter().map(|t| serde_json::json!({"first_byte_s": t.first_byte, "last_byte_s": t.last_byte})).collect::<Vec<_>>(),
        "one_client": one.iter().map(|c| serde_json::json!({
            "first_byte_s": c.timings[0].first_byte,
            "last_byte_s": c.timings[0].last_byte,
            "daemon_cpu_s": c.cpu,
            "upstream": sent_json(c),
        })).collect::<Vec<_>>(),
        "many_clients": many.iter().map(|c| serde_json::json!({
            "first_byte_s": c.timings.iter().map(|t| t.first_byte).collect::<Vec<_>>(),
            "last_byte_s": c.timings.iter().map(|t| t.last_byte).collect::<Vec<_>>(),
            "wall_s": c.wall,
            "daemon_cpu_s": c.cpu,
            "upstream": sent_json(c),
        })).collect::<Vec<_>>(),
        "median": {
            "direct_last_byte_s": direct_last,
            "direct_first_byte_s": direct_first,
            "one_last_byte_s": one_last,
            "one_first_byte_s": one_first,
            "many_median_last_byte_s": many_median,
            "many_max_last_byte_s": many_max,
            "many_wall_s": many_wall,
            "many_median_first_byte_s": many_first,
            "one_upstream_bytes_ratio": one_bytes,
            "many_upstream_bytes_ratio": many_bytes,
            "one_daemon_cpu_s_per_gib_sent": one_cpu,
            "many_daemon_cpu_s_per_gib_sent": many_cpu,
        },
    });
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(
        out_dir.join("fill.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();

    let met = |ok: bool| if ok { "met" } else { "**missed**" };
    println!(
        "Origin nginx (sendfile, own process), {size_mib} MiB image, cold cache each run, medians of {rounds} rounds; \
         times from curl's -w (one process per client, -o /dev/null); upstream bytes from nginx's access log."
    );
    println!();
    println!(
        "| figure | time to last byte | MiB/s per client | vs direct | upstream bytes | daemon CPU-s per GiB sent |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| direct `curl -o /dev/null` from nginx | {direct_last:.3} s | {:.0} | 1.00 | 1x | |",
        mib / direct_last
    );
    println!(
        "| 1 client, cold | {one_last:.3} s | {:.0} | {:.2}x the time | {one_bytes:.6}x | {one_cpu:.2} |",
        mib / one_last,
        one_last / direct_last
    );
    println!(
        "| {clients} clients, cold: median client | {many_median:.3} s | {:.0} | {:.2}x | {many_bytes:.6}x (1x: {}) | {many_cpu:.2} |",
        mib / many_median,
        many_median / direct_last,
        met(worst_bytes < 1.0 + 1e-3)
    );
    println!(
        "| {clients} clients, cold: slowest client | {many_max:.3} s | {:.0} | {:.2}x | | |",
        mib / many_max,
        many_max / direct_last
    );
    println!(
        "| {clients} clients, cold: all delivered (wall) | {many_wall:.3} s | {many_aggregate:.0} in all | {:.2}x | | |",
        many_wall / direct_last
    );
    println!();
    println!("| time to first byte | median |");
    println!("|---|---|");
    println!(
        "| nginx directly (`time_starttransfer`) | {:.2} ms |",
        direct_first * 1e3
    );
    println!(
        "| glance-cached, miss, 1 client | {:.2} ms (+{:.2} ms) |",
        one_first * 1e3,
        (one_first - direct_first) * 1e3
    );
    println!(
        "| glance-cached, miss, {clients} clients (median client) | {:.2} ms |",
        many_first * 1e3
    );
    println!();
    println!(
        "Machine: {cores} cores, {date}, load {} -> {}; upstream bytes: worst round {worst_bytes:.6}x.",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        load_end
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = std::io::stdout().flush();
}
