//! wrk (Debian's `wrk` package) as the load generator: one run, its requests/s and
//! latency percentiles (`--latency`) and what went wrong, parsed from its report.

use std::path::{Path, PathBuf};
use std::process::Command;

/// wrk on `PATH`, or `None`.
pub fn binary() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("wrk"))
        .find(|p| p.is_file())
}

/// One wrk run's figures.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Requests answered with a status outside 2xx and 3xx.
    pub non_2xx: u64,
    /// Connect, read and write errors.
    pub socket_errors: u64,
    /// Requests not answered within wrk's `--timeout` (not in the percentiles).
    pub timeouts: u64,
}

/// What to run: `wrk -t threads -c connections -d seconds --latency`, with `headers`
/// and an optional Lua `script`.
pub struct Run<'a> {
    pub bin: &'a Path,
    pub url: &'a str,
    pub threads: usize,
    pub connections: usize,
    pub seconds: u64,
    pub timeout_s: u64,
    pub headers: &'a [String],
    pub script: Option<&'a Path>,
}

impl Run<'_> {
    pub fn go(&self) -> Load {
        let mut cmd = Command::new(self.bin);
        cmd.arg(format!("-t{}", self.threads))
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{}s", self.seconds))
            .arg(format!("--timeout={}s", self.timeout_s))
            .arg("--latency");
        for h in self.headers {
            cmd.arg("-H").arg(h);
        }
        if let Some(s) = self.script {
            cmd.arg("-s").arg(s);
        }
        let out = cmd.arg(self.url).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "wrk {}: {}\n{text}",
            self.url,
            String::from_utf8_lossy(&out.stderr)
        );
        parse(&text).unwrap_or_else(|| panic!("cannot read wrk's report:\n{text}"))
    }
}

/// Milliseconds of a wrk duration (`812.00us`, `1.25ms`, `2.01s`, `1.00m`).
fn millis(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let n: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => n / 1e3,
        "ms" => n,
        "s" => n * 1e3,
        "m" => n * 60e3,
        "h" => n * 3600e3,
        _ => return None,
    })
}

fn parse(text: &str) -> Option<Load> {
    let mut load = Load {
        requests_per_s: f64::NAN,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        non_2xx: 0,
        socket_errors: 0,
        timeouts: 0,
    };
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            load.requests_per_s = v.trim().parse().ok()?;
        } else if let Some(v) = line.strip_prefix("50%") {
            load.p50_ms = millis(v.trim())?;
        } else if let Some(v) = line.strip_prefix("99%") {
            load.p99_ms = millis(v.trim())?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            load.non_2xx = v.trim().parse().ok()?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for part in v.split(',') {
                let (what, n) = part.trim().split_once(' ')?;
                let n: u64 = n.trim().parse().ok()?;
                if what == "timeout" {
                    load.timeouts = n;
                } else {
                    load.socket_errors += n;
                }
            }
        }
    }
    (!load.requests_per_s.is_nan()).then_some(load)
}
