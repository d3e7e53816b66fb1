//! Helpers shared by the benchmarks (each bench includes this file as a module).

/// The median of `v` (the mean of the two middle values for an even count).
#[allow(dead_code)] // not every benchmark takes medians
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Where the benchmark's files go: `BENCH_DIR` (e.g. a tmpfs, to separate our cost from
/// the filesystem's), else Cargo's target tmp directory.
pub fn bench_dir() -> std::path::PathBuf {
    std::env::var_os("BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_TARGET_TMPDIR").into())
}

/// Sends SIGTERM to `child` and waits for it (no `kill` binary needed: a bare image may
/// lack procps, and a failed spawn would leave the wait hanging).
#[allow(dead_code)] // not every benchmark runs the daemon
pub fn terminate(child: &mut std::process::Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let _ = child.wait();
}
