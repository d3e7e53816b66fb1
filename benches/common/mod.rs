//! Helpers shared by the benchmarks (each bench includes this file as a module).

#[allow(dead_code)] // only the benchmarks with an nginx origin use it
pub mod nginx;

/// A loopback port free now (the kernel's pick), for a server a benchmark starts.
#[allow(dead_code)] // not every benchmark starts a server
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether the part `name` of a benchmark runs: every part unless the environment
/// variable `var` lists some (comma-separated), for an A/B of one part.
#[allow(dead_code)] // not every benchmark has parts
pub fn part_selected(var: &str, name: &str) -> bool {
    match std::env::var(var) {
        Ok(list) if !list.trim().is_empty() => list.split(',').any(|p| p.trim() == name),
        _ => true,
    }
}

/// `BENCH_SMOKE` set: tiny sizes, to prove a benchmark still runs.
#[allow(dead_code)] // not every benchmark has a smoke size of its own
pub fn smoke() -> bool {
    std::env::var_os("BENCH_SMOKE").is_some()
}

/// Rounds per figure: `BENCH_ROUNDS`, else 1 in smoke mode and 3 otherwise.
#[allow(dead_code)] // not every benchmark takes rounds
pub fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if smoke() { 1 } else { 3 })
}

/// Runs `op` `count` times, one after the other; returns operations per second.
#[allow(dead_code)] // not every benchmark times single operations
pub async fn ops_per_second<F, Fut>(count: usize, mut op: F) -> f64
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = std::time::Instant::now();
    for i in 0..count {
        op(i).await;
    }
    count as f64 / started.elapsed().as_secs_f64()
}

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

/// What one child process cost: wall seconds, user + system CPU seconds (its own and its
/// waited-for children's, from `wait4`), peak RSS (`ru_maxrss`), and whether it
/// succeeded.
#[allow(dead_code)] // not every benchmark runs measured commands
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub wall: f64,
    pub cpu: f64,
    pub max_rss_kib: u64,
    pub success: bool,
}

/// Runs `command` to its end and reads its cost from the kernel (`wait4`), so the
/// figure is that process's alone, not the benchmark's.
#[allow(dead_code)]
// not every benchmark runs measured commands
// Reaped by wait4 below, which std's `Child` does not know of.
#[allow(clippy::zombie_processes)]
pub fn run_measured(command: &mut std::process::Command) -> Measured {
    let started = std::time::Instant::now();
    let child = command.spawn().expect("spawning a measured command");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: wait4 fills the status and the rusage it is given, for our own child.
    let usage = unsafe {
        assert_eq!(libc::wait4(pid, &mut status, 0, usage.as_mut_ptr()), pid);
        usage.assume_init()
    };
    let wall = started.elapsed().as_secs_f64();
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Measured {
        wall,
        cpu: secs(usage.ru_utime) + secs(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss as u64,
        success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
    }
}

/// glance-api 33 from the Glance virtualenv, for baselines.
#[allow(dead_code)] // not every benchmark runs glance-api
pub mod glance;
/// wrk runs and their reports.
#[allow(dead_code)] // not every benchmark runs wrk
pub mod wrk;
