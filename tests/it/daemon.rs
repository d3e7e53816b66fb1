//! The daemon through the real binary: READY/STATUS/RELOADING/STOPPING on a real
//! notify socket, real signals, the watcher, the loops, reconcile, the node lease, and a
//! database outage.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use rustix::process::Signal;

use crate::common::test_bytes;
use crate::daemon_kit::{Daemon, PrivatePostgres, eventually};

/// Everything a daemon test needs on disk: a cache dir and a config file. Intervals are
/// an hour, so anything that happens within a test was driven by the watcher or a signal.
struct Setup {
    tmp: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    fn new(extra: &str) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("glance-cached.toml");
        let s = Setup { tmp, config };
        s.write_config(extra);
        s
    }

    fn write_config(&self, extra: &str) {
        let text = format!(
            "[cache]\ndir = \"{}\"\nstall_time = \"1h\"\n{extra}\n[cleaner]\ninterval = \"1h\"\n[pruner]\ninterval = \"1h\"\n[daemon]\nshutdown_timeout = \"5s\"\n",
            self.cache("").display()
        );
        std::fs::write(&self.config, text).unwrap();
    }

    fn cache(&self, rel: &str) -> PathBuf {
        self.tmp.path().join("cache").join(rel)
    }

    fn start(&self) -> Daemon {
        Daemon::start(self.tmp.path(), &self.config, &[])
    }

    fn cli(&self, args: &[&str]) -> Output {
        cli(&self.config, args)
    }

    fn import(&self, id: &str, len: usize) {
        let src = self.tmp.path().join(format!("{id}.src"));
        std::fs::write(&src, test_bytes(len, len as u8)).unwrap();
        let out = self.cli(&["import", id, src.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn cached_ids(&self) -> Vec<String> {
        let out = self.cli(&["list-cached", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r["image_id"].as_str().unwrap().to_owned())
            .collect()
    }
}

fn cli(config: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_glance-cached"));
    for (k, _) in std::env::vars() {
        if k.starts_with("GLANCE_CACHED_") && k.contains("__") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("--config").arg(config).args(args).output().unwrap()
}

const SOON: Duration = Duration::from_secs(10);

#[test]
fn ready_then_sigterm_stops_cleanly() {
    let s = Setup::new("");
    let mut d = s.start();
    let ready = d.notify.wait_for(0, SOON, |m| m.contains("READY=1"));
    assert!(
        d.notify.messages[ready].contains("STATUS="),
        "READY comes with a status line"
    );
    assert!(d.alive());
    let log = d.log_text();
    assert!(
        log.contains("reconcile done") && log.contains("ready"),
        "{log}"
    );
    d.stop();
}

#[test]
fn sigint_also_stops_cleanly() {
    let s = Setup::new("");
    let mut d = s.start();
    d.signal(Signal::INT);
    assert!(d.wait_exit(SOON).success());
}

#[test]
fn watcher_drives_cleaner_queue_and_pruner() {
    let s = Setup::new("max_size = 5000");
    let d = s.start();
    // invalid/: removed at once (grace 0), logged with id and bytes.
    std::fs::write(s.cache("invalid/broken-1"), b"12345").unwrap();
    eventually(SOON, "the invalid file is removed", || {
        !s.cache("invalid/broken-1").exists()
    });
    // incomplete/: a file whose mtime is two hours old arrives (renamed in, as a crashed
    // writer's file would be found) and is removed; a fresh one stays.
    let old = s.tmp.path().join("old-part");
    std::fs::write(&old, b"partial").unwrap();
    let past = filetime::FileTime::from_unix_time(chrono::Utc::now().timestamp() - 7200, 0);
    filetime::set_file_mtime(&old, past).unwrap();
    std::fs::write(s.cache("incomplete/fresh-part"), b"writing").unwrap();
    std::fs::rename(&old, s.cache("incomplete/old-part")).unwrap();
    eventually(SOON, "the stalled file is removed", || {
        !s.cache("incomplete/old-part").exists()
    });
    assert!(
        s.cache("incomplete/fresh-part").exists(),
        "a fresh incomplete file is kept"
    );
    // queue/: a marker (as Glance's PUT /v2/cache/{id} writes) is adopted into the queue.
    std::fs::write(s.cache("queue/from-glance"), b"").unwrap();
    eventually(SOON, "the marker is in the queue table", || {
        let out = s.cli(&["list-queued", "--json"]);
        String::from_utf8_lossy(&out.stdout).contains("from-glance")
    });
    // A new image that takes the cache over max_size is pruned, LRU first, at once.
    s.import("first", 2000);
    s.import("second", 2000);
    assert_eq!(s.cli(&["cat", "first"]).status.code(), Some(0)); // first is now recent
    s.import("third", 2000);
    eventually(SOON, "the least recently used image is pruned", || {
        !s.cache("second").exists()
    });
    assert!(s.cache("first").exists() && s.cache("third").exists());
    let log = d.log_text();
    assert!(
        log.contains("pruned cached image")
            && log.contains("image_id=second")
            && log.contains("bytes=2000"),
        "{log}"
    );
    assert!(
        log.contains("image_id=broken-1") && log.contains("bytes=5"),
        "{log}"
    );
    d.stop();
}

#[test]
fn sighup_applies_a_new_max_size() {
    let s = Setup::new("max_size = 10000");
    for id in ["h-1", "h-2", "h-3"] {
        s.import(id, 3000);
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut d = s.start();
    assert_eq!(s.cached_ids().len(), 3);
    s.write_config("max_size = 5000");
    let from = d.notify.messages.len();
    d.signal(Signal::HUP);
    let reloading = d.notify.wait_for(from, SOON, |m| m.contains("RELOADING=1"));
    assert!(
        d.notify.messages[reloading].contains("MONOTONIC_USEC="),
        "{:?}",
        d.notify.messages[reloading]
    );
    d.notify
        .wait_for(reloading + 1, SOON, |m| m.contains("READY=1"));
    eventually(SOON, "pruned to the new max_size", || {
        s.cached_ids() == ["h-3"]
    });
    assert!(d.alive());
    d.stop();
}

#[test]
fn sighup_with_a_broken_config_keeps_the_old_one() {
    let s = Setup::new("max_size = 10000");
    let mut d = s.start();
    std::fs::write(&s.config, "[cache]\nmax_size = \"lots\"\nbogus = 1\n").unwrap();
    let from = d.notify.messages.len();
    d.signal(Signal::HUP);
    let ready = d.notify.wait_for(from, SOON, |m| m.contains("READY=1"));
    assert!(
        d.notify.messages[ready].contains("reload failed"),
        "STATUS says so: {:?}",
        d.notify.messages[ready]
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(d.alive(), "still running");
    let log = d.log_text();
    assert!(
        log.contains("cache.max_size") && log.contains("cache.bogus"),
        "every error is logged: {log}"
    );
    // Still working on the old config.
    std::fs::write(s.cache("invalid/after-reload"), b"x").unwrap();
    eventually(SOON, "the invalid file is still removed", || {
        !s.cache("invalid/after-reload").exists()
    });
    // A valid config that changes a restart-only key: applied except that key.
    let other_dir = s.tmp.path().join("elsewhere");
    std::fs::write(
        &s.config,
        format!(
            "[cache]\ndir = \"{}\"\nmax_size = 10000\n",
            other_dir.display()
        ),
    )
    .unwrap();
    let from = d.notify.messages.len();
    d.signal(Signal::HUP);
    let ready = d.notify.wait_for(from, SOON, |m| m.contains("READY=1"));
    assert!(!d.notify.messages[ready].contains("reload failed"));
    assert!(d.log_text().contains("needs a restart") && d.log_text().contains("cache.dir"));
    assert!(!other_dir.exists(), "cache.dir is not switched live");
    d.stop();
}

#[test]
fn reconcile_repairs_both_kinds_of_drift() {
    let s = Setup::new("");
    s.import("keep", 100);
    s.import("ghost", 100);
    std::fs::remove_file(s.cache("ghost")).unwrap(); // a row without a file
    std::fs::write(s.cache("orphan"), b"file without a row").unwrap();
    // The CLI command reports what it changed.
    let out = s.cli(&["reconcile"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("adopted orphan") && text.contains("removed row ghost"),
        "{text}"
    );
    assert_eq!(s.cached_ids(), ["keep", "orphan"]);
    // The daemon does the same at start.
    std::fs::remove_file(s.cache("keep")).unwrap();
    std::fs::write(s.cache("orphan-2"), b"another").unwrap();
    let d = s.start();
    assert_eq!(s.cached_ids(), ["orphan", "orphan-2"]);
    assert!(
        d.log_text().contains("adopted=1 removed_rows=1"),
        "{}",
        d.log_text()
    );
    d.stop();
}

#[test]
fn a_second_daemon_for_the_same_node_is_refused_unless_forced() {
    let s = Setup::new("");
    // A short lease so the displaced daemon notices within the test.
    std::fs::write(
        &s.config,
        format!(
            "[cache]\ndir = \"{}\"\n[daemon]\nlease_ttl = \"3s\"\nshutdown_timeout = \"5s\"\n",
            s.cache("").display()
        ),
    )
    .unwrap();
    let mut first = s.start();
    let second_dir = s.tmp.path().join("second");
    std::fs::create_dir(&second_dir).unwrap();
    let mut second = Daemon::spawn(&second_dir, &s.config, &[], &[]);
    let status = second.wait_exit(SOON);
    assert_eq!(status.code(), Some(1));
    let log = second.log_text();
    assert!(
        log.contains("already served by another glance-cached") && log.contains("--force"),
        "{log}"
    );
    assert!(first.alive());
    // --force takes over; the first daemon notices it lost the lease and stops.
    let forced_dir = s.tmp.path().join("forced");
    std::fs::create_dir(&forced_dir).unwrap();
    let forced = Daemon::start(&forced_dir, &s.config, &["--force"]);
    let status = first.wait_exit(Duration::from_secs(15));
    assert!(!status.success(), "the displaced daemon exits non-zero");
    assert!(first.log_text().contains("lost the lease"));
    forced.stop();
}

#[test]
fn a_database_outage_is_survived() {
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };
    let s = Setup::new(&format!(
        "[database]\nurl = \"{}\"\nconnect_timeout = \"2s\"\n[node]\nreference_url = \"http://outage-node:9292\"",
        pg.url()
    ));
    let mut d = s.start();
    pg.stop_server();
    // Work arrives during the outage: the queue loop fails and backs off.
    std::fs::write(s.cache("queue/during-outage"), b"").unwrap();
    d.notify
        .wait_for(0, Duration::from_secs(20), |m| m.contains("queue failing"));
    assert!(d.alive(), "the daemon does not exit on a database outage");
    pg.start_server();
    eventually(
        Duration::from_secs(40),
        "the queue marker is adopted after the outage",
        || {
            let out = s.cli(&["list-queued", "--json"]);
            String::from_utf8_lossy(&out.stdout).contains("during-outage")
        },
    );
    let from = d.notify.messages.len().saturating_sub(1);
    d.notify.wait_for(from, SOON, |m| {
        m.contains("STATUS=") && !m.contains("failing")
    });
    assert!(d.log_text().contains("loop recovered"), "{}", d.log_text());
    d.stop();
}
