//! Serving cached images over HTTP: the daemon's `GET /v2/images/{id}/file` against
//! nginx (`sendfile on`, one worker) serving the same files from the same disk, with
//! glance-api 33 (one gunicorn worker, serving from its own cache) beside them, in the
//! same run, rounds interleaved. Every request carries a token: ours checks it
//! (`http.serve_auth = "token"`, the token in `http.serve_token_file`), nginx compares
//! the header with a constant, glance-api runs without Keystone.
//!
//! - bulk: one 1 GiB image to `curl -o /dev/null`, and 16 concurrent curls of a 64 MiB
//!   image; throughput as curl measures it, and the server's CPU seconds per GiB served
//!   (utime + stime from `/proc` for the server's processes only);
//! - small: `wrk -t2 -c32 -d10s --latency` of a 4 KiB image, and the same with 1,000
//!   connections: requests/s, p50 and p99 latency, the server's CPU per request;
//! - ranges: `wrk -t2 -c1000` where each request asks a random 1 MiB-aligned 1 MiB range
//!   of the 1 GiB image (a Lua script written into the temp dir). glance-api is not in
//!   this run: it never serves a Range from its cache (Launchpad bug 1664709), so its
//!   figure would be its store's.
//!
//! The page cache is warmed first: what is measured is the server, not the disk.
//!
//!   cargo bench --bench serve
//!   BENCH_SMOKE=1 cargo bench --bench serve       # 64 MiB, 1 s wrk runs, one round
//!   BENCH_SERVE_MIB=4096 BENCH_WRK_SECONDS=30 cargo bench --bench serve
//!   BENCH_SERVE_PARTS=small cargo bench --bench serve   # only the 4 KiB runs
//!   BENCH_SERVE_PARTS=small BENCH_SERVE_SMALL_BYTES=65536 cargo bench --bench serve
//!   BENCH_SERVE_PARTS=bulk,ranges BENCH_SERVE_GLANCE=0 cargo bench --bench serve
//!
//! `BENCH_SERVE_PARTS` (a comma-separated list of `bulk`, `small`, `ranges`; all by
//! default) picks the runs, for an A/B of one part; the tables of the others show NaN.
//! `BENCH_SERVE_GLANCE=0` leaves glance-api out (its import and its slow small-file
//! runs take most of a run's time).
//! nginx (`apt-get install nginx-light`) and wrk (`apt-get install wrk`) are required
//! (scripts/bench installs them as root): without them the benchmark says so and stops.
//! Without the Glance virtualenv (`GLANCE_CACHED_TEST_GLANCE_PYTHON`) glance-api's rows
//! are left out, with a note. Results: tables on stdout, JSON in target/bench/serve.json.

// Test and benchmark code: a panic here is a failed run, not a crashed daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A test or benchmark binary has no API: `pub` shares its kit between its files.
#![allow(unreachable_pub)]
// Measured and real times: the clock lint is for the daemon's code.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::glance::GlanceApi;
use common::wrk::{Load, Run};

const BIG: &str = "5e7e0000-0000-4000-8000-00000000b160";
const BULK: &str = "5e7e0000-0000-4000-8000-00000000b064";
const SMALL: &str = "5e7e0000-0000-4000-8000-00000000b004";
/// Concurrent clients of the bulk figure.
const CLIENTS: usize = 16;
/// The small image: a 4 KiB file, where per-request costs are all there is
/// (`BENCH_SERVE_SMALL_BYTES` sets another size, to place the in-memory limit).
fn small_bytes() -> u64 {
    std::env::var("BENCH_SERVE_SMALL_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096)
}
/// The range run's request size and alignment.
const RANGE_BYTES: u64 = 1 << 20;
/// Connections of the first small run, and of the crowded small run and the range run.
const FEW: usize = 32;
const MANY: usize = 1000;
/// wrk's threads: one per core of this 2-core machine, as the command has it.
const WRK_THREADS: usize = 2;
/// The token every request carries.
const TOKEN: &str = "bench-serve-token-7c1f";

fn big_mib() -> u64 {
    std::env::var("BENCH_SERVE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if common::smoke() { 64 } else { 1024 })
}

fn bulk_mib() -> u64 {
    if common::smoke() { 8 } else { 64 }
}

/// Seconds of each wrk run: `BENCH_WRK_SECONDS`, else 10 (1 in smoke mode).
fn wrk_seconds() -> u64 {
    std::env::var("BENCH_WRK_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if common::smoke() { 1 } else { 10 })
}

/// Whether `BENCH_SERVE_PARTS` (all when unset) names `part`.
fn runs(part: &str) -> bool {
    common::part_selected("BENCH_SERVE_PARTS", part)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The soft open-files limit raised to the hard one, for 1,000 connections on each
/// side of loopback; the servers started here inherit it.
fn raise_open_files() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct they are given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur
}

/// A required tool, or a clear stop: the figures mean nothing without the baseline
/// and the load generator. On stdout too: `scripts/bench` hides benchmarks' stderr.
fn require(tool: &str, package: &str, found: Option<PathBuf>) -> PathBuf {
    found.unwrap_or_else(|| {
        let why = format!(
            "serve benchmark: {tool} is not installed (Debian: apt-get install {package}; \
             scripts/bench installs it when run as root). Nothing was measured."
        );
        println!("{why}");
        eprintln!("{why}");
        std::process::exit(2);
    })
}

/// Clock ticks per second for `/proc/*/stat` (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// utime + stime of `pid` and its descendants, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let mut total = 0.0;
    let mut pids = vec![pid];
    while let Some(p) = pids.pop() {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            let after = stat.rsplit_once(')').unwrap().1;
            let f: Vec<&str> = after.split_whitespace().collect();
            let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
            total += ticks as f64 / TICKS_PER_SECOND;
        }
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for task in tasks.flatten() {
                let children =
                    std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                pids.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    total
}

/// Waits until `server` is idle (under 2% of a core over half a second; at most two
/// minutes) before the next server's runs: glance-api works through the requests
/// queued by `wrk -c1000` for tens of seconds after wrk has stopped (one worker, some
/// 40 ms of CPU each), and on two cores that took a core from the server measured next,
/// ours in the next round (its range ratio 0.54-0.57 in full runs against 0.88-0.94 in
/// runs without glance-api, BENCHMARKS.md).
fn settle(server: &Server) {
    let started = Instant::now();
    let mut before = cpu_seconds(server.pid());
    while started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(500));
        let now = cpu_seconds(server.pid());
        if now - before < 0.01 {
            break;
        }
        before = now;
    }
    let waited = started.elapsed().as_secs_f64();
    if waited > 2.0 {
        eprintln!("{}: still busy {waited:.0} s after its runs", server.name);
    }
}

/// The image ids one server knows the benchmark's images by (glance-api chose its own).
#[derive(Clone)]
struct Ids {
    big: String,
    bulk: String,
    small: String,
}

impl Ids {
    fn ours() -> Ids {
        Ids {
            big: BIG.into(),
            bulk: BULK.into(),
            small: SMALL.into(),
        }
    }
}

/// What keeps a server running; dropping it stops the server.
enum Process {
    Child(Child),
    Glance(GlanceApi),
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Process::Child(child) = self {
            common::terminate(child);
        }
    }
}

struct Server {
    name: &'static str,
    port: u16,
    ids: Ids,
    process: Process,
}

impl Server {
    fn url(&self, id: &str) -> String {
        format!("http://127.0.0.1:{}/v2/images/{id}/file", self.port)
    }

    fn pid(&self) -> u32 {
        match &self.process {
            Process::Child(c) => c.id(),
            Process::Glance(g) => g.child.id(),
        }
    }
}

fn write_image(path: &Path, bytes: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let block: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let mut left = bytes;
    let mut n = 0u8;
    while left > 0 {
        let mut b = block.clone();
        b[0] = n;
        n = n.wrapping_add(1);
        let take = left.min(b.len() as u64) as usize;
        f.write_all(&b[..take]).unwrap();
        left -= take as u64;
    }
    f.flush().unwrap();
}

fn start_daemon(dir: &Path, config: &Path, port: u16) -> Server {
    let sock = dir.join("notify.sock");
    let _ = std::fs::remove_file(&sock);
    let notify = UnixDatagram::bind(&sock).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
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
    // Keep reading so the daemon never finds the socket full.
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while notify.recv(&mut buf).is_ok() {}
    });
    Server {
        name: "glance-cached",
        port,
        ids: Ids::ours(),
        process: Process::Child(child),
    }
}

fn nginx() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// nginx as an operator would put it in front of the cache: `sendfile on`, one worker
/// (as the daemon's one process), the same path, the token compared with a constant
/// (a stand-in for ours, so neither skips the header), connections kept alive for as
/// many requests as a run makes, and room for the crowded runs' connections.
fn start_nginx(bin: &Path, dir: &Path, cache: &Path) -> Server {
    let port = common::free_port();
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs")).unwrap();
    let conf = prefix.join("nginx.conf");
    let user = if rustix::process::getuid().is_root() {
        "user root;\n"
    } else {
        ""
    };
    std::fs::write(
        &conf,
        format!(
            "{user}worker_processes 1;\ndaemon off;\npid {p}/nginx.pid;\nerror_log {p}/logs/error.log;\n\
             worker_rlimit_nofile 8192;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 1000000;\n\
               client_body_temp_path {p}/tmp;\n  proxy_temp_path {p}/tmp;\n  fastcgi_temp_path {p}/tmp;\n\
               uwsgi_temp_path {p}/tmp;\n  scgi_temp_path {p}/tmp;\n\
               default_type application/octet-stream;\n\
               server {{\n    listen 127.0.0.1:{port} backlog=4096;\n\
                 location ~ ^/v2/images/([A-Za-z0-9_-]+)/file$ {{\n\
                   if ($http_x_auth_token != \"{TOKEN}\") {{ return 401; }}\n\
                   alias {cache}/$1;\n    }}\n  }}\n}}\n",
            p = prefix.display(),
            cache = cache.display(),
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .args(["-p", prefix.to_str().unwrap(), "-c", conf.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server {
        name: "nginx",
        port,
        ids: Ids::ours(),
        process: Process::Child(child),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

/// glance-api with its cache on, the benchmark's images uploaded to its store and
/// cached by one download each; `None` (with a note) without the Glance virtualenv.
fn start_glance(dir: &Path, sources: &[(&Path, u64); 3]) -> Option<Server> {
    let Some(python) = common::glance::python() else {
        println!(
            "glance-api: not measured (no Glance virtualenv: GLANCE_CACHED_TEST_GLANCE_PYTHON, scripts/glance-venv)"
        );
        return None;
    };
    let port = common::free_port();
    let api = GlanceApi::start(&python, &dir.join("glance"), port, true);
    let ids: Vec<String> = sources
        .iter()
        .map(|(file, _)| {
            let id = api.create_image(file);
            api.cache_image(&id);
            id
        })
        .collect();
    let [big, bulk, small] = <[String; 3]>::try_from(ids).unwrap();
    Some(Server {
        name: "glance-api",
        port,
        ids: Ids { big, bulk, small },
        process: Process::Glance(api),
    })
}

/// `curl -o /dev/null` of `url` with the token: bytes per second, as curl reports it.
fn curl_speed(url: &str, expect: u64) -> f64 {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-H",
            &format!("X-Auth-Token: {TOKEN}"),
            "-w",
            "%{http_code} %{size_download} %{speed_download}",
        ])
        .arg(url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut f = text.split_whitespace();
    let (status, size, speed) = (f.next(), f.next(), f.next());
    assert_eq!(status, Some("200"), "{url}: {text}");
    assert_eq!(
        size.and_then(|s| s.parse::<u64>().ok()),
        Some(expect),
        "{url}: short download"
    );
    speed.unwrap().parse().unwrap()
}

struct Figure {
    gbps: f64,
    cpu_per_gib: f64,
}

/// One big download: throughput and the server's CPU per GiB.
fn one_big(server: &Server, bytes: u64) -> Figure {
    let cpu = cpu_seconds(server.pid());
    let speed = curl_speed(&server.url(&server.ids.big), bytes);
    let used = cpu_seconds(server.pid()) - cpu;
    Figure {
        gbps: speed / 1e9,
        cpu_per_gib: used / (bytes as f64 / (1u64 << 30) as f64),
    }
}

/// `CLIENTS` curls of the bulk image at once: aggregate throughput and CPU per GiB.
fn bulk(server: &Server, bytes: u64) -> Figure {
    let cpu = cpu_seconds(server.pid());
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let url = server.url(&server.ids.bulk);
            std::thread::spawn(move || curl_speed(&url, bytes))
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let took = started.elapsed().as_secs_f64();
    let used = cpu_seconds(server.pid()) - cpu;
    let total = (bytes * CLIENTS as u64) as f64;
    Figure {
        gbps: total / took / 1e9,
        cpu_per_gib: used / (total / (1u64 << 30) as f64),
    }
}

/// One wrk run and the server's CPU microseconds per request answered.
struct Loaded {
    load: Load,
    cpu_us_per_request: f64,
}

fn loaded(
    server: &Server,
    wrk: &Path,
    connections: usize,
    script: Option<&Path>,
    id: &str,
) -> Loaded {
    let headers = [format!("X-Auth-Token: {TOKEN}")];
    let url = server.url(id);
    let cpu = cpu_seconds(server.pid());
    let load = Run {
        bin: wrk,
        url: &url,
        threads: WRK_THREADS,
        connections,
        seconds: wrk_seconds(),
        // Past the run's length: a slow server's latencies are measured, not dropped.
        timeout_s: wrk_seconds() + 5,
        headers: &headers,
        script,
    }
    .go();
    let used = cpu_seconds(server.pid()) - cpu;
    let answered = load.requests_per_s * wrk_seconds() as f64;
    Loaded {
        load,
        cpu_us_per_request: used * 1e6 / answered.max(1.0),
    }
}

/// The range run's script: every request a random aligned `RANGE_BYTES` range of an
/// image of `chunks` of them, each wrk thread seeded apart.
fn range_script(dir: &Path, chunks: u64) -> PathBuf {
    let path = dir.join("ranges.lua");
    std::fs::write(
        &path,
        format!(
            "local chunks, size = {chunks}, {RANGE_BYTES}\n\
             local counter = 0\n\
             function setup(thread)\n  counter = counter + 1\n  thread:set(\"seed\", counter)\nend\n\
             function init(args)\n  math.randomseed(seed * 7919 + os.time())\nend\n\
             function request()\n  local first = math.random(0, chunks - 1) * size\n\
               wrk.headers[\"Range\"] = string.format(\"bytes=%d-%d\", first, first + size - 1)\n\
               return wrk.format()\nend\n"
        ),
    )
    .unwrap();
    path
}

/// Every figure of one server: a `Vec` per figure, one entry per round.
#[derive(Default)]
struct Rounds {
    one: Vec<Figure>,
    many: Vec<Figure>,
    small_few: Vec<Loaded>,
    small_many: Vec<Loaded>,
    ranges: Vec<Loaded>,
}

fn med<T>(v: &[T], f: impl Fn(&T) -> f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    common::median(v.iter().map(f).collect())
}

/// The medians of a server's wrk runs, and what went wrong in all of them.
fn load_json(v: &[Loaded]) -> serde_json::Value {
    if v.is_empty() {
        return serde_json::Value::Null;
    }
    serde_json::json!({
        "requests_per_s": med(v, |l| l.load.requests_per_s),
        "p50_ms": med(v, |l| l.load.p50_ms),
        "p99_ms": med(v, |l| l.load.p99_ms),
        "cpu_us_per_request": med(v, |l| l.cpu_us_per_request),
        "non_2xx": v.iter().map(|l| l.load.non_2xx).sum::<u64>(),
        "socket_errors": v.iter().map(|l| l.load.socket_errors).sum::<u64>(),
        "timeouts": v.iter().map(|l| l.load.timeouts).sum::<u64>(),
        "rounds": v.iter().map(|l| serde_json::json!([l.load.requests_per_s, l.load.p50_ms, l.load.p99_ms])).collect::<Vec<_>>(),
    })
}

fn write_config(dir: &Path, cache: &Path, port: u16) -> PathBuf {
    let token = dir.join("serve-token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.join("glance-cached.toml");
    // Room for the crowded runs' 1,000 connections (and wrk's reconnects).
    std::fs::write(
        &config,
        format!(
            "[cache]\ndir = \"{}\"\nmax_size = \"100GiB\"\n[pruner]\ninterval = \"1h\"\n[cleaner]\ninterval = \"1h\"\n\
             [http]\nenabled = true\nlisten = [\"127.0.0.1:{port}\"]\nmax_connections = 4096\n\
             serve_auth = \"token\"\nserve_token_file = \"{}\"\n",
            cache.display(),
            token.display(),
        ),
    )
    .unwrap();
    config
}

fn import(config: &Path, id: &str, src: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_glance-cached"))
        .args(["--config", config.to_str().unwrap(), "import", id])
        .arg(src)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn main() {
    let nginx_bin = require("nginx", "nginx-light", nginx());
    let wrk = require("wrk", "wrk", common::wrk::binary());
    let open_files = raise_open_files();
    assert!(
        open_files >= 2 * MANY as u64 + 256,
        "RLIMIT_NOFILE's hard limit {open_files} is too low for {MANY} connections"
    );
    let started_load = load_average();
    let work = tempfile::tempdir_in(common::bench_dir()).unwrap();
    let dir = work.path();
    let cache = dir.join("cache");
    let port = common::free_port();
    let config = write_config(dir, &cache, port);
    let (big, small) = (big_mib() << 20, bulk_mib() << 20);
    let sources = [
        (dir.join("src-big"), big),
        (dir.join("src-bulk"), small),
        (dir.join("src-small"), small_bytes()),
    ];
    for ((src, bytes), id) in sources.iter().zip([BIG, BULK, SMALL]) {
        write_image(src, *bytes);
        import(&config, id, src);
    }
    let mut servers = vec![
        start_daemon(dir, &config, port),
        start_nginx(&nginx_bin, dir, &cache),
    ];
    let glance_sources = [
        (sources[0].0.as_path(), big),
        (sources[1].0.as_path(), small),
        (sources[2].0.as_path(), small_bytes()),
    ];
    if std::env::var("BENCH_SERVE_GLANCE").as_deref() == Ok("0") {
        println!("glance-api: not measured (BENCH_SERVE_GLANCE=0)");
    } else {
        servers.extend(start_glance(dir, &glance_sources));
    }
    for (src, _) in &sources {
        std::fs::remove_file(src).unwrap();
    }
    // Warm the page cache and every server.
    for s in &servers {
        curl_speed(&s.url(&s.ids.big), big);
        curl_speed(&s.url(&s.ids.bulk), small);
        curl_speed(&s.url(&s.ids.small), small_bytes());
    }
    let script = range_script(dir, big / RANGE_BYTES);
    let rounds = common::rounds().max(1);
    let mut results: Vec<Rounds> = servers.iter().map(|_| Rounds::default()).collect();
    for _ in 0..rounds {
        // Interleaved, so a noisy moment hits every server alike.
        for (s, r) in servers.iter().zip(results.iter_mut()) {
            if runs("bulk") {
                r.one.push(one_big(s, big));
                r.many.push(bulk(s, small));
            }
            if runs("small") {
                r.small_few.push(loaded(s, &wrk, FEW, None, &s.ids.small));
                r.small_many.push(loaded(s, &wrk, MANY, None, &s.ids.small));
            }
            if runs("ranges") && !matches!(s.process, Process::Glance(_)) {
                r.ranges
                    .push(loaded(s, &wrk, MANY, Some(&script), &s.ids.big));
            }
            settle(s);
        }
    }
    let ended_load = load_average();
    report(&servers, &results, rounds, &started_load, &ended_load);
}

fn report(servers: &[Server], results: &[Rounds], rounds: usize, started: &str, ended: &str) {
    println!(
        "load average (1, 5, 15 min): {started} at the start, {ended} at the end; {rounds} rounds, medians"
    );
    println!();
    println!(
        "| server | 1 x {} MiB GB/s | CPU s/GiB | {CLIENTS} x {} MiB GB/s | CPU s/GiB |",
        big_mib(),
        bulk_mib()
    );
    println!("|---|---|---|---|---|");
    let mut json = Vec::new();
    for (s, r) in servers.iter().zip(results) {
        println!(
            "| {} | {:.2} | {:.3} | {:.2} | {:.3} |",
            s.name,
            med(&r.one, |f| f.gbps),
            med(&r.one, |f| f.cpu_per_gib),
            med(&r.many, |f| f.gbps),
            med(&r.many, |f| f.cpu_per_gib)
        );
        json.push(serde_json::json!({
            "server": s.name, "rounds": rounds,
            "single_mib": big_mib(), "single_gbps": med(&r.one, |f| f.gbps),
            "single_cpu_s_per_gib": med(&r.one, |f| f.cpu_per_gib),
            "bulk_clients": CLIENTS, "bulk_mib": bulk_mib(), "bulk_gbps": med(&r.many, |f| f.gbps),
            "bulk_cpu_s_per_gib": med(&r.many, |f| f.cpu_per_gib),
            "small_bytes": small_bytes(), "wrk_seconds": wrk_seconds(),
            "small_few": load_json(&r.small_few), "small_many": load_json(&r.small_many),
            "range_bytes": RANGE_BYTES, "ranges": load_json(&r.ranges),
        }));
    }
    // A part not run is null in the JSON (NaN has no JSON form): NaN in the tables.
    let ratio =
        |k: &str| json[0][k].as_f64().unwrap_or(f64::NAN) / json[1][k].as_f64().unwrap_or(f64::NAN);
    println!(
        "| ours / nginx | {:.2} | {:.2} | {:.2} | {:.2} |",
        ratio("single_gbps"),
        ratio("single_cpu_s_per_gib"),
        ratio("bulk_gbps"),
        ratio("bulk_cpu_s_per_gib")
    );
    println!();
    let secs = wrk_seconds();
    println!(
        "| `wrk -t{WRK_THREADS} -d{secs}s --latency`, {} B image | -c{FEW} req/s | p50 ms | p99 ms | CPU us/req | -c{MANY} req/s | p50 ms | p99 ms | CPU us/req | non-2xx, errors, timeouts |",
        small_bytes()
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let row = |j: &serde_json::Value| {
        format!(
            "{:.0} | {:.2} | {:.2} | {:.1}",
            j["requests_per_s"].as_f64().unwrap_or(f64::NAN),
            j["p50_ms"].as_f64().unwrap_or(f64::NAN),
            j["p99_ms"].as_f64().unwrap_or(f64::NAN),
            j["cpu_us_per_request"].as_f64().unwrap_or(f64::NAN)
        )
    };
    let trouble = |js: &[&serde_json::Value]| {
        let sum = |k: &str| js.iter().map(|j| j[k].as_u64().unwrap_or(0)).sum::<u64>();
        format!(
            "{}, {}, {}",
            sum("non_2xx"),
            sum("socket_errors"),
            sum("timeouts")
        )
    };
    for (s, j) in servers.iter().zip(&json) {
        println!(
            "| {} | {} | {} | {} |",
            s.name,
            row(&j["small_few"]),
            row(&j["small_many"]),
            trouble(&[&j["small_few"], &j["small_many"]])
        );
    }
    let rps = |i: usize, k: &str| json[i][k]["requests_per_s"].as_f64().unwrap_or(f64::NAN);
    println!(
        "| ours / nginx (req/s) | **{:.2}** | | | | **{:.2}** | | | | |",
        rps(0, "small_few") / rps(1, "small_few"),
        rps(0, "small_many") / rps(1, "small_many")
    );
    if json.len() > 2 {
        println!(
            "| glance-api / nginx (req/s) | {:.3} | | | | {:.3} | | | | |",
            rps(2, "small_few") / rps(1, "small_few"),
            rps(2, "small_many") / rps(1, "small_many")
        );
    }
    println!();
    println!(
        "| `wrk -t{WRK_THREADS} -c{MANY} -d{secs}s --latency`, random aligned {} MiB ranges of {} MiB | req/s | GB/s | p50 ms | p99 ms | CPU us/req | non-2xx, errors, timeouts |",
        RANGE_BYTES >> 20,
        big_mib()
    );
    println!("|---|---|---|---|---|---|---|");
    for (s, j) in servers.iter().zip(&json).take(2) {
        let r = &j["ranges"];
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} | {:.0} | {:.2} | {:.1} | {:.1} | {:.1} | {} |",
            s.name,
            f("requests_per_s"),
            f("requests_per_s") * RANGE_BYTES as f64 / 1e9,
            f("p50_ms"),
            f("p99_ms"),
            f("cpu_us_per_request"),
            trouble(&[r])
        );
    }
    println!(
        "| ours / nginx (req/s) | **{:.2}** | | | | | |",
        rps(0, "ranges") / rps(1, "ranges")
    );
    if json.len() > 2 {
        println!(
            "| glance-api | not run: it never serves a Range from its cache (bug 1664709) | | | | | |"
        );
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("serve.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
}
