//! Serving cached images over HTTP: the daemon's `GET /v2/images/{id}/file` against
//! nginx (`sendfile on`, one worker) serving the same file from the same disk, in the
//! same run. One 1 GiB image to `curl -o /dev/null`, and 16 concurrent curls of a
//! 64 MiB image; throughput as curl measures it, and the server's CPU seconds per GiB
//! served (utime + stime from `/proc` for the server's processes only). The page cache
//! is warmed first: what is measured is the server, not the disk.
//!
//!   cargo bench --bench serve
//!   BENCH_SMOKE=1 cargo bench --bench serve       # 64 MiB, one round
//!   BENCH_SERVE_MIB=4096 cargo bench --bench serve
//!
//! Without nginx installed (`apt-get install nginx-light`) it says so and reports ours
//! alone. Results: a table on stdout and JSON in target/bench/serve.json.

// Test and benchmark code: a panic here is a failed run, not a crashed daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A test or benchmark binary has no API: `pub` shares its kit between its files.
#![allow(unreachable_pub)]
// Measured and real times: the clock lint is for the daemon's code.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIG: &str = "5e7e0000-0000-4000-8000-00000000b160";
const BULK: &str = "5e7e0000-0000-4000-8000-00000000b064";
/// Concurrent clients of the bulk figure.
const CLIENTS: usize = 16;

fn big_mib() -> u64 {
    std::env::var("BENCH_SERVE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if common::smoke() { 64 } else { 1024 })
}

fn bulk_mib() -> u64 {
    if common::smoke() { 8 } else { 64 }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

struct Server {
    name: &'static str,
    child: Child,
    port: u16,
}

impl Server {
    fn url(&self, id: &str) -> String {
        format!("http://127.0.0.1:{}/v2/images/{id}/file", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        common::terminate(&mut self.child);
    }
}

fn write_image(path: &Path, mib: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let block: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    for n in 0..mib {
        let mut b = block.clone();
        b[0] = n as u8;
        f.write_all(&b).unwrap();
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
        child,
        port,
    }
}

fn nginx() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// nginx as an operator would put it in front of the cache: `sendfile on`, one worker
/// (as the daemon's one process), the same path.
fn start_nginx(bin: &Path, dir: &Path, cache: &Path) -> Server {
    let port = free_port();
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
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n\
               client_body_temp_path {p}/tmp;\n  proxy_temp_path {p}/tmp;\n  fastcgi_temp_path {p}/tmp;\n\
               uwsgi_temp_path {p}/tmp;\n  scgi_temp_path {p}/tmp;\n\
               default_type application/octet-stream;\n\
               server {{\n    listen 127.0.0.1:{port};\n\
                 location ~ ^/v2/images/([A-Za-z0-9_-]+)/file$ {{ alias {cache}/$1; }}\n  }}\n}}\n",
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
        child,
        port,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

/// `curl -o /dev/null` of `url`: bytes per second, as curl reports it.
fn curl_speed(url: &str, expect: u64) -> f64 {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{speed_download}",
        ])
        .arg(url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (size, speed) = text.split_once(' ').unwrap();
    assert_eq!(
        size.parse::<u64>().unwrap(),
        expect,
        "{url}: short download"
    );
    speed.trim().parse().unwrap()
}

struct Figure {
    gbps: f64,
    cpu_per_gib: f64,
}

/// One big download: throughput and the server's CPU per GiB.
fn one_big(server: &Server, bytes: u64) -> Figure {
    let cpu = cpu_seconds(server.child.id());
    let speed = curl_speed(&server.url(BIG), bytes);
    let used = cpu_seconds(server.child.id()) - cpu;
    Figure {
        gbps: speed / 1e9,
        cpu_per_gib: used / (bytes as f64 / (1u64 << 30) as f64),
    }
}

/// `CLIENTS` curls of the bulk image at once: aggregate throughput and CPU per GiB.
fn bulk(server: &Server, bytes: u64) -> Figure {
    let cpu = cpu_seconds(server.child.id());
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let url = server.url(BULK);
            std::thread::spawn(move || curl_speed(&url, bytes))
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let took = started.elapsed().as_secs_f64();
    let used = cpu_seconds(server.child.id()) - cpu;
    let total = (bytes * CLIENTS as u64) as f64;
    Figure {
        gbps: total / took / 1e9,
        cpu_per_gib: used / (total / (1u64 << 30) as f64),
    }
}

fn main() {
    let work = tempfile::tempdir_in(common::bench_dir()).unwrap();
    let dir = work.path();
    let cache = dir.join("cache");
    let config = dir.join("glance-cached.toml");
    let port = free_port();
    std::fs::write(
        &config,
        format!(
            "[cache]\ndir = \"{}\"\nmax_size = \"100GiB\"\n[pruner]\ninterval = \"1h\"\n[cleaner]\ninterval = \"1h\"\n\
             [http]\nenabled = true\nlisten = [\"127.0.0.1:{port}\"]\nserve_auth = \"none\"\nserve_allow = [\"127.0.0.1\"]\n",
            cache.display(),
        ),
    )
    .unwrap();
    let (big, small) = (big_mib() << 20, bulk_mib() << 20);
    for (id, mib) in [(BIG, big_mib()), (BULK, bulk_mib())] {
        let src = dir.join("src");
        write_image(&src, mib);
        let out = Command::new(env!("CARGO_BIN_EXE_glance-cached"))
            .args(["--config", config.to_str().unwrap(), "import", id])
            .arg(&src)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        std::fs::remove_file(&src).unwrap();
    }
    let mut servers = vec![start_daemon(dir, &config, port)];
    match nginx() {
        Some(bin) => servers.push(start_nginx(&bin, dir, &cache)),
        None => println!("nginx is not installed (apt-get install nginx-light): ours alone"),
    }
    // Warm the page cache and both servers.
    for s in &servers {
        curl_speed(&s.url(BIG), big);
        curl_speed(&s.url(BULK), small);
    }
    let rounds = common::rounds().max(1);
    let mut results: Vec<(Vec<Figure>, Vec<Figure>)> =
        servers.iter().map(|_| (vec![], vec![])).collect();
    for _ in 0..rounds {
        // Interleaved, so a noisy moment hits both servers alike.
        for (s, r) in servers.iter().zip(results.iter_mut()) {
            r.0.push(one_big(s, big));
            r.1.push(bulk(s, small));
        }
    }
    let med = |v: &[Figure], f: fn(&Figure) -> f64| common::median(v.iter().map(f).collect());
    println!(
        "| server | 1 x {} MiB GB/s | CPU s/GiB | {CLIENTS} x {} MiB GB/s | CPU s/GiB |",
        big_mib(),
        bulk_mib()
    );
    println!("|---|---|---|---|---|");
    let mut json = Vec::new();
    for (s, (one, many)) in servers.iter().zip(&results) {
        let row = (
            med(one, |f| f.gbps),
            med(one, |f| f.cpu_per_gib),
            med(many, |f| f.gbps),
            med(many, |f| f.cpu_per_gib),
        );
        println!(
            "| {} | {:.2} | {:.3} | {:.2} | {:.3} |",
            s.name, row.0, row.1, row.2, row.3
        );
        json.push(serde_json::json!({
            "server": s.name, "rounds": rounds,
            "single_mib": big_mib(), "single_gbps": row.0, "single_cpu_s_per_gib": row.1,
            "bulk_clients": CLIENTS, "bulk_mib": bulk_mib(), "bulk_gbps": row.2, "bulk_cpu_s_per_gib": row.3,
        }));
    }
    if json.len() == 2 {
        let ratio = |k: &str| json[0][k].as_f64().unwrap() / json[1][k].as_f64().unwrap();
        println!(
            "| ours / nginx | {:.2} | {:.2} | {:.2} | {:.2} |",
            ratio("single_gbps"),
            ratio("single_cpu_s_per_gib"),
            ratio("bulk_gbps"),
            ratio("bulk_cpu_s_per_gib")
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
