//! Running the real daemon binary in tests: a `NOTIFY_SOCKET` datagram socket bound by
//! the test, real signals, the log captured in a file, and a private PostgreSQL cluster
//! for outage tests.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

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
        let bin = env!("CARGO_BIN_EXE_glance-cached");
        let mut cmd = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut cmd = Command::new(program);
                cmd.args(wrapper_args).arg(bin);
                cmd
            }
            None => Command::new(bin),
        };
        cmd.arg("--config").arg(config).arg("run").args(args);
        for (k, _) in std::env::vars() {
            if k.starts_with("GLANCE_CACHED_") && k.contains("__") {
                cmd.env_remove(k);
            }
        }
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

/// A PostgreSQL cluster of one test's own, which the test may stop and start.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    /// `None` (after saying why) outside CI when PostgreSQL binaries or root are missing.
    pub fn start() -> Option<PrivatePostgres> {
        let bin = match std::env::var("GLANCE_CACHED_TEST_POSTGRES_BIN") {
            Ok(b) if !b.is_empty() && rustix::process::geteuid().is_root() => PathBuf::from(b),
            _ if std::env::var_os("CI").is_some() => {
                panic!(
                    "GLANCE_CACHED_TEST_POSTGRES_BIN unset or not root: run scripts/test as root"
                )
            }
            _ => {
                eprintln!("SKIPPED: a private PostgreSQL needs root and scripts/test");
                return None;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        run_ok(Command::new("chmod").arg("755").arg(dir.path()));
        run_ok(Command::new("chown").arg("postgres:").arg(dir.path()));
        run_ok(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join("initdb"))
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-locale",
                    "-E",
                    "UTF8",
                    "-D",
                ])
                .arg(dir.path().join("data")),
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = PrivatePostgres { dir, bin, port };
        pg.start_server();
        Some(pg)
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) {
        run_ok(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(args),
        );
    }

    pub fn start_server(&self) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log");
        self.pg_ctl(&["-w", "-l", log.to_str().unwrap(), "-o", &opts, "start"]);
    }

    pub fn stop_server(&self) {
        self.pg_ctl(&["-w", "-m", "fast", "stop"]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-w", "-m", "immediate", "stop"])
            .output();
    }
}

/// Another process holding a SQLite lock; killed if the test fails before it ends.
pub struct Locker(pub Child);

impl Drop for Locker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Holds `BEGIN EXCLUSIVE` on a SQLite file for `secs` in another process.
pub fn lock_sqlite(db: &Path, secs: u32) -> Locker {
    let mut locker = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys, time\n\
             c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
             c.execute('BEGIN EXCLUSIVE')\n\
             print('locked', flush=True)\n\
             time.sleep(int(sys.argv[2]))\n",
        ])
        .arg(db)
        .arg(secs.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(locker.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    Locker(locker)
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A MariaDB server of one test's own (started like `scripts/test-services` does, with a
/// password user on loopback TCP), which the test may stop and start.
pub struct PrivateMariadb {
    dir: tempfile::TempDir,
    server: Mutex<Option<Child>>,
    pub port: u16,
}

impl PrivateMariadb {
    /// `None` (after saying why) outside CI when MariaDB binaries or root are missing.
    pub fn start() -> Option<PrivateMariadb> {
        let have = Path::new("/usr/sbin/mariadbd").exists()
            && Command::new("mariadb-install-db")
                .arg("--help")
                .output()
                .is_ok();
        if !have || !rustix::process::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "a private MariaDB needs root and mariadb-server: run scripts/test as root"
            );
            eprintln!("SKIPPED: a private MariaDB needs root and mariadb-server");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        run_ok(Command::new("chmod").arg("755").arg(dir.path()));
        run_ok(Command::new("chown").arg("mysql:").arg(dir.path()));
        run_ok(
            Command::new("mariadb-install-db")
                .args(["--no-defaults", "--user=mysql", "--skip-test-db"])
                .arg(format!("--datadir={}", dir.path().join("data").display())),
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let my = PrivateMariadb {
            dir,
            server: Mutex::new(None),
            port,
        };
        my.start_server();
        let mut sql = String::from("CREATE DATABASE glance_cached;");
        for host in ["%", "localhost", "127.0.0.1"] {
            sql += &format!(
                "CREATE USER 'glance_cached'@'{host}' IDENTIFIED BY 'glance_cached';\
                 GRANT ALL PRIVILEGES ON glance_cached.* TO 'glance_cached'@'{host}';"
            );
        }
        run_ok(
            Command::new("mariadb")
                .args(["--no-defaults", "-uroot"])
                .arg(format!("--socket={}", my.socket().display()))
                .args(["-e", &sql]),
        );
        Some(my)
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("mariadbd.sock")
    }

    pub fn url(&self) -> String {
        format!(
            "mysql://glance_cached:glance_cached@127.0.0.1:{}/glance_cached",
            self.port
        )
    }

    pub fn start_server(&self) {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("mariadbd.log"))
            .unwrap();
        let mut child = Command::new("/usr/sbin/mariadbd")
            .args(["--no-defaults", "--user=mysql"])
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!("--pid-file={}", d.join("mariadbd.pid").display()))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--port={}", self.port))
            .args([
                "--skip-name-resolve",
                "--character-set-server=utf8mb4",
                "--collation-server=utf8mb4_unicode_ci",
                "--skip-log-bin",
                "--innodb-flush-log-at-trx-commit=0",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ping = Command::new("mariadb-admin")
                .args(["--no-defaults", "-uroot"])
                .arg(format!("--socket={}", self.socket().display()))
                .arg("ping")
                .output()
                .unwrap();
            if ping.status.success() {
                break;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "mariadbd exited with {status}: {}",
                    std::fs::read_to_string(d.join("mariadbd.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "MariaDB did not answer in 60 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        *self.server.lock().unwrap() = Some(child);
    }

    /// A clean shutdown (SIGTERM), waited for.
    pub fn stop_server(&self) {
        if let Some(mut child) = self.server.lock().unwrap().take() {
            let pid = Pid::from_raw(child.id() as i32).unwrap();
            kill_process(pid, Signal::TERM).unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for PrivateMariadb {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
