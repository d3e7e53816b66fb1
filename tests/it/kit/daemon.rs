//! Running the real daemon binary in tests: a `NOTIFY_SOCKET` datagram socket bound by
//! the test, real signals, the log captured in a file; `Setup`, a daemon's cache
//! directory and config file, with the CLI on them and the queue as the CLI shows it.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

use crate::kit::test_bytes;

/// The systemd side of `sd_notify`: a datagram socket read continuously by a thread
/// (as systemd would), so the daemon never finds it full.
pub struct NotifySocket {
    pub path: PathBuf,
    received: Arc<Mutex<Vec<String>>>,
    pub messages: Vec<String>,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> NotifySocket {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = dir.join(format!(
            "notify-{}.sock",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::downgrade(&received);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            // Stops once the NotifySocket is gone.
            while let Some(sink) = sink.upgrade() {
                if let Ok(n) = socket.recv(&mut buf) {
                    sink.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
        });
        NotifySocket {
            path,
            received,
            messages: Vec::new(),
        }
    }

    /// Drains, and returns the index the next message will have.
    pub fn mark(&mut self) -> usize {
        self.drain();
        self.messages.len()
    }

    /// Takes every datagram received so far into `messages`.
    pub fn drain(&mut self) {
        self.messages.append(&mut self.received.lock().unwrap());
    }

    /// Waits until a message after index `from` satisfies `pred`; returns its index.
    pub fn wait_for(
        &mut self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain();
            if let Some(i) = self.messages.iter().skip(from).position(|m| pred(m)) {
                return from + i;
            }
            assert!(
                Instant::now() < deadline,
                "no matching notification; got {:#?}",
                self.messages
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The built daemon, run with a config file and a notify socket.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
    pub notify: NotifySocket,
}

impl Daemon {
    /// Starts `glance-cached run --config CONFIG [args]` and waits for READY=1.
    pub fn start(dir: &Path, config: &Path, args: &[&str]) -> Daemon {
        let mut d = Self::spawn(dir, config, args, &[]);
        d.notify
            .wait_for(0, Duration::from_secs(30), |m| m.contains("READY=1"));
        d
    }

    pub fn spawn(dir: &Path, config: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Self::spawn_wrapped(dir, config, &[], args, env)
    }

    /// `spawn`, with the daemon run by the command `wrapper` (e.g. `unshare ...`).
    pub fn spawn_wrapped(
        dir: &Path,
        config: &Path,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let notify = NotifySocket::bind(dir);
        let log = dir.join(format!("daemon-{}.log", std::process::id()));
        let log_file = std::fs::File::create(&log).unwrap();
        let bin = crate::kit::cli::BIN;
        let mut cmd = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut cmd = Command::new(program);
                cmd.args(wrapper_args).arg(bin);
                cmd
            }
            None => Command::new(bin),
        };
        cmd.arg("--config").arg(config).arg("run").args(args);
        crate::kit::cli::scrub_env(&mut cmd);
        cmd.env("NOTIFY_SOCKET", &notify.path)
            .env("GLANCE_CACHED_LOG__FORMAT", "text")
            .env_remove("JOURNAL_STREAM")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = cmd.spawn().unwrap();
        Daemon { child, log, notify }
    }

    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(self.child.id() as i32).unwrap();
        kill_process(pid, signal).unwrap();
    }

    /// The pid of the wrapper's only child (the daemon, for `spawn_wrapped`).
    pub fn wrapped_pid(&self) -> Pid {
        let id = self.child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{id}/task/{id}/children")).unwrap_or_default();
        let pid = children
            .split_whitespace()
            .next()
            .expect("the wrapper has a child");
        Pid::from_raw(pid.parse().unwrap()).unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then requires STOPPING=1 and exit status 0.
    pub fn stop(mut self) {
        let from = self.notify.mark();
        self.signal(Signal::TERM);
        let status = self.wait_exit(Duration::from_secs(10));
        assert!(
            status.success(),
            "exit {status:?}; log:\n{}",
            self.log_text()
        );
        self.notify
            .wait_for(from, Duration::from_secs(1), |m| m.contains("STOPPING=1"));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `timeout`.
pub fn eventually(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Everything a daemon test needs on disk: a cache dir and a config file. Intervals are
/// an hour, so anything that happens within a test was driven by the watcher or a signal.
pub struct Setup {
    pub tmp: tempfile::TempDir,
    pub config: PathBuf,
}

impl Setup {
    pub fn new(extra: &str) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("glance-cached.toml");
        let s = Setup { tmp, config };
        s.write_config(extra);
        s
    }

    pub fn write_config(&self, extra: &str) {
        let text = format!(
            "[cache]\ndir = \"{}\"\nstall_time = \"1h\"\n{extra}\n[cleaner]\ninterval = \"1h\"\n[pruner]\ninterval = \"1h\"\n[daemon]\nshutdown_timeout = \"5s\"\n",
            self.cache("").display()
        );
        std::fs::write(&self.config, text).unwrap();
    }

    pub fn cache(&self, rel: &str) -> PathBuf {
        self.tmp.path().join("cache").join(rel)
    }

    pub fn start(&self) -> Daemon {
        Daemon::start(self.tmp.path(), &self.config, &[])
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        crate::kit::cli::run(&self.config, args, &[])
    }

    pub fn import(&self, id: &str, len: usize) {
        let src = self.tmp.path().join(format!("{id}.src"));
        std::fs::write(&src, test_bytes(len, len as u8)).unwrap();
        let out = self.cli(&["import", id, src.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn cached_ids(&self) -> Vec<String> {
        cached_json(self)
            .iter()
            .map(|r| r["image_id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// The daemon's SQLite database (at its default place in the cache directory),
    /// as another process reaches it.
    pub async fn db(&self) -> glance_cached::db::Db {
        let url = format!(
            "sqlite://{}",
            self.cache(glance_cached::config::DEFAULT_SQLITE_FILE)
                .display()
        );
        glance_cached::db::Db::connect(&url, &Default::default())
            .await
            .unwrap()
    }
}

/// How long a test waits for what the daemon does at once (a notification, a file
/// cleaned after a watcher event): long enough for a loaded 2-core machine.
pub const SOON: Duration = Duration::from_secs(10);

/// `glance-cached queue IDS`, which must succeed.
pub fn queue(s: &Setup, ids: &[&str]) {
    let mut args = vec!["queue"];
    args.extend_from_slice(ids);
    let out = s.cli(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The rows of `list-queued --json`, which must succeed.
pub fn queued_json(s: &Setup) -> Vec<serde_json::Value> {
    json_rows(s, "list-queued")
}

/// The rows of `list-cached --json`, which must succeed.
pub fn cached_json(s: &Setup) -> Vec<serde_json::Value> {
    json_rows(s, "list-cached")
}

fn json_rows(s: &Setup, listing: &str) -> Vec<serde_json::Value> {
    let out = s.cli(&[listing, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}
