//! What forwarding adds: `GET /v2/images/{id}` to the real glance-api 33 (gunicorn, one
//! gthread worker, loopback) directly and through glance-cached with `http.forward =
//! true`, interleaved request by request in the same run on one keep-alive connection
//! each, so both see the same machine. The added latency is ours: the difference of the
//! two distributions' percentiles.
//!
//!   cargo bench --bench proxy
//!   BENCH_SMOKE=1 cargo bench --bench proxy
//!
//! Needs the Glance virtualenv (`GLANCE_CACHED_TEST_GLANCE_PYTHON`, as the tests; else
//! `target/glance-venv/bin/python`); without it the benchmark says so and does nothing.
//! Results: a table on stdout and JSON in target/bench/proxy.json.

// Test and benchmark code: a panic here is a failed run, not a crashed daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Measured real times: the clock lint is for the daemon's code.
#![allow(clippy::disallowed_methods)]
// A benchmark has no API: its items need not be reachable.
#![allow(unreachable_pub)]

#[allow(dead_code)]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A process group killed on drop (gunicorn's arbiter and worker, or the daemon).
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 keep-alive connection, read by `Content-Length` (both servers send it
/// for an image record).
struct Conn {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
    port: u16,
}

impl Conn {
    fn open(port: u16) -> Option<Conn> {
        let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream.set_nodelay(true).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .ok()?;
        Some(Conn {
            reader: BufReader::new(stream.try_clone().ok()?),
            stream,
            port,
        })
    }

    /// `method path` with `body`: the status and the body.
    fn request(&mut self, method: &str, path: &str, body: &str) -> Option<(u16, Vec<u8>)> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nX-Auth-Token: bench\r\nContent-Length: {}\r\n",
            self.port,
            body.len()
        );
        if !body.is_empty() {
            head.push_str("Content-Type: application/json\r\n");
        }
        head.push_str("\r\n");
        head.push_str(body);
        self.stream.write_all(head.as_bytes()).ok()?;
        let mut line = String::new();
        self.reader.read_line(&mut line).ok()?;
        let status = line.split_whitespace().nth(1)?.parse().ok()?;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h).ok()?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().ok()?;
            }
        }
        let mut out = vec![0; len];
        self.reader.read_exact(&mut out).ok()?;
        Some((status, out))
    }
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let Some(python) = common::glance::python() else {
        println!(
            "SKIPPED: no Glance virtualenv (GLANCE_CACHED_TEST_GLANCE_PYTHON, scripts/glance-venv)"
        );
        return;
    };
    let requests = if common::smoke() { 50 } else { 2000 };
    let warmup = if common::smoke() { 10 } else { 200 };
    let work = tempfile::tempdir_in(common::bench_dir()).unwrap();
    let glance_port = common::free_port();
    let _glance =
        common::glance::GlanceApi::start(&python, &work.path().join("glance"), glance_port, false);

    let port = common::free_port();
    let cache = work.path().join("cache");
    let config = work.path().join("glance-cached.toml");
    std::fs::write(
        &config,
        format!(
            "[cache]\ndir = \"{}\"\n[http]\nenabled = true\nlisten = [\"127.0.0.1:{port}\"]\nforward = true\n\
             [upstream]\nkind = \"glance\"\nurl = \"http://127.0.0.1:{glance_port}\"\n[log]\nlevel = \"warn\"\n",
            cache.display()
        ),
    )
    .unwrap();
    let daemon = Command::new(env!("CARGO_BIN_EXE_glance-cached"))
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let _daemon = Group(daemon);
    wait_until("glance-cached", Duration::from_secs(30), || {
        Conn::open(port)
            .and_then(|mut c| c.request("GET", "/readyz", ""))
            .is_some_and(|(s, _)| s == 200)
    });

    let mut direct = Conn::open(glance_port).unwrap();
    let (status, body) = direct
        .request(
            "POST",
            "/v2/images",
            r#"{"name": "bench", "disk_format": "raw", "container_format": "bare"}"#,
        )
        .unwrap();
    assert_eq!(status, 201);
    let image: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let path = format!("/v2/images/{}", image["id"].as_str().unwrap());
    let mut ours = Conn::open(port).unwrap();
    let (status, through) = ours.request("GET", &path, "").unwrap();
    assert_eq!(status, 200);
    let a: serde_json::Value = serde_json::from_slice(&through).unwrap();
    assert_eq!(a["id"], image["id"], "the same record through us");

    let mut times = [Vec::new(), Vec::new()];
    for i in 0..warmup + requests {
        // Alternate which goes first, so neither always follows the other.
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let conn = if which == 0 { &mut direct } else { &mut ours };
            let started = Instant::now();
            let (status, _) = conn.request("GET", &path, "").unwrap();
            let took = started.elapsed().as_secs_f64() * 1e3;
            assert_eq!(status, 200);
            if i >= warmup {
                times[which].push(took);
            }
        }
    }
    for t in &mut times {
        t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
    let [d, o] = &times;
    let (d50, d99, o50, o99) = (
        percentile(d, 0.5),
        percentile(d, 0.99),
        percentile(o, 0.5),
        percentile(o, 0.99),
    );
    println!("| `GET /v2/images/{{id}}`, {requests} requests each, interleaved | p50 | p99 |");
    println!("|---|---|---|");
    println!("| glance-api directly | {d50:.2} ms | {d99:.2} ms |");
    println!("| through glance-cached (forwarded) | {o50:.2} ms | {o99:.2} ms |");
    println!(
        "| added by glance-cached | **{:.2} ms** | {:.2} ms |",
        o50 - d50,
        o99 - d99
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    let json = serde_json::json!({
        "requests": requests,
        "direct_p50_ms": d50, "direct_p99_ms": d99,
        "forwarded_p50_ms": o50, "forwarded_p99_ms": o99,
        "added_p50_ms": o50 - d50, "added_p99_ms": o99 - d99,
    });
    std::fs::write(out.join("proxy.json"), json.to_string()).unwrap();
}
