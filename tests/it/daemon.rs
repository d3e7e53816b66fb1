//! The daemon through the real binary: READY/STATUS/RELOADING/STOPPING on a real
//! notify socket, real signals, the watcher, the loops, reconcile, the node lease, and a
//! database outage.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rustix::process::Signal;

use crate::kit::daemon::{Daemon, SOON, Setup, eventually};
use crate::kit::servers::{PrivatePostgres, lock_sqlite};

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
    // invalid/: removed at once (grace 0), logged with id and bytes. Written aside and
    // renamed in whole: created in place, it could be listed (and removed) still empty.
    let broken = s.tmp.path().join("broken-1");
    std::fs::write(&broken, b"12345").unwrap();
    std::fs::rename(&broken, s.cache("invalid/broken-1")).unwrap();
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
    // The log line follows the removal: wait for it too.
    eventually(SOON, "the eviction is logged", || {
        let log = d.log_text();
        log.contains("pruned cached image")
            && log.contains("image_id=second")
            && log.contains("bytes=2000")
    });
    let log = d.log_text();
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
    assert!(!d.log_text().contains("DEBUG"), "info level at start");
    s.write_config("max_size = 5000\n[log]\nlevel = \"debug\"");
    let from = d.notify.mark();
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
    let from = d.notify.mark();
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
    let from = d.notify.mark();
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

/// A config for node `node` with its cache in `dir/cache` and the database at `db`:
/// several daemons of one test share the database but never a cache directory.
fn lease_config(dir: &Path, db: &Path, extra: &str) -> PathBuf {
    let config = dir.join("glance-cached.toml");
    std::fs::write(
        &config,
        format!(
            "[cache]\ndir = \"{}\"\n[database]\nurl = \"sqlite://{}\"\n[daemon]\nlease_ttl = \"3s\"\nshutdown_timeout = \"5s\"\n{extra}",
            dir.join("cache").display(),
            db.display()
        ),
    )
    .unwrap();
    config
}

fn new_dir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir(&dir).unwrap();
    dir
}

#[test]
fn a_second_daemon_for_the_same_node_is_refused_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("shared.db");
    let first_dir = new_dir(tmp.path(), "first");
    // A short lease so the displaced daemon notices within the test.
    let mut first = Daemon::start(&first_dir, &lease_config(&first_dir, &db, ""), &[]);
    let second_dir = new_dir(tmp.path(), "second");
    let mut second = Daemon::spawn(&second_dir, &lease_config(&second_dir, &db, ""), &[], &[]);
    let status = second.wait_exit(SOON);
    assert_eq!(status.code(), Some(1));
    let log = second.log_text();
    assert!(
        log.contains("already served by another glance-cached")
            && log.contains(&format!("pid {} [", first.child.id()))
            && log.contains("--force"),
        "{log}"
    );
    assert!(first.alive());
    // --force takes over; the first daemon notices it lost the lease and stops.
    let forced_dir = new_dir(tmp.path(), "forced");
    let forced = Daemon::start(
        &forced_dir,
        &lease_config(&forced_dir, &db, ""),
        &["--force"],
    );
    let status = first.wait_exit(Duration::from_secs(15));
    assert!(!status.success(), "the displaced daemon exits non-zero");
    assert!(first.log_text().contains("lost the lease"));
    forced.stop();
}

/// Two daemons never work one cache directory, whatever their databases or nodes (each
/// has a lease of its own, so only the directory's lock can refuse the second), and
/// `--force` does not override the lock. Once the first is gone (kill -9), the lock is
/// free at once.
#[test]
fn two_daemons_never_work_one_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let config_for = |name: &str, node: &str| {
        let dir = new_dir(tmp.path(), name);
        let config = dir.join("glance-cached.toml");
        std::fs::write(
            &config,
            format!(
                "[cache]\ndir = \"{}\"\n[database]\nurl = \"sqlite://{}\"\n[node]\nreference_url = \"{node}\"\n[daemon]\nshutdown_timeout = \"5s\"\n",
                cache.display(),
                dir.join("own.db").display()
            ),
        )
        .unwrap();
        (dir, config)
    };
    let (first_dir, first_config) = config_for("first", "http://node-a:9292");
    let mut first = Daemon::start(&first_dir, &first_config, &[]);
    for (name, node) in [
        ("other-db", "http://node-a:9292"),
        ("other-node", "http://node-b:9292"),
    ] {
        let (dir, config) = config_for(name, node);
        let mut other = Daemon::spawn(&dir, &config, &["--force"], &[]);
        assert_eq!(other.wait_exit(SOON).code(), Some(1), "{name}");
        let log = other.log_text();
        assert!(
            log.contains("is in use by another glance-cached daemon on this host"),
            "{name}: {log}"
        );
    }
    assert!(first.alive());
    first.signal(Signal::KILL);
    first.wait_exit(SOON);
    let (dir, config) = config_for("after", "http://node-b:9292");
    Daemon::start(&dir, &config, &[]).stop();
}

/// Runs the daemon as pid 1 of a PID namespace of its own (as in a container), under
/// the same hostname as every other such daemon. `None` without root or `unshare`.
fn spawn_in_pid_namespace(dir: &Path, config: &Path) -> Option<Daemon> {
    let unshare = Path::new("/usr/bin/unshare");
    if !rustix::process::geteuid().is_root() || !unshare.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root with util-linux's unshare"
        );
        eprintln!("SKIPPED: PID namespaces need root and unshare");
        return None;
    }
    let prefix = [
        unshare.to_str().unwrap(),
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child",
    ];
    Some(Daemon::spawn_wrapped(dir, config, &prefix, &[], &[]))
}

/// Containers share a hostname and are all pid 1: a second daemon for the node in
/// another PID namespace is refused while the first renews its lease, and takes over
/// from one that was killed (it stops renewing) without waiting for the lease to expire.
#[test]
fn daemons_in_pid_namespaces_are_told_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("shared.db");
    let first_dir = new_dir(tmp.path(), "first");
    let Some(mut first) = spawn_in_pid_namespace(&first_dir, &lease_config(&first_dir, &db, ""))
    else {
        return;
    };
    first.notify.wait_for(0, SOON, |m| m.contains("READY=1"));
    assert!(
        first.log_text().contains(" pid 1 ["),
        "{}",
        first.log_text()
    );
    let second_dir = new_dir(tmp.path(), "second");
    let mut second =
        spawn_in_pid_namespace(&second_dir, &lease_config(&second_dir, &db, "")).unwrap();
    assert_eq!(second.wait_exit(SOON).code(), Some(1));
    let log = second.log_text();
    assert!(
        log.contains("waiting to see whether it still renews it")
            && log.contains("already served by another glance-cached"),
        "{log}"
    );
    assert!(first.alive(), "{}", first.log_text());

    // The first dies without releasing its lease; the next takes over once it has seen
    // no renewal (half the 3 s TTL), before the lease would have expired.
    first.signal(Signal::KILL);
    first.wait_exit(SOON);
    let third_dir = new_dir(tmp.path(), "third");
    let mut third = spawn_in_pid_namespace(&third_dir, &lease_config(&third_dir, &db, "")).unwrap();
    third.notify.wait_for(0, SOON, |m| m.contains("READY=1"));
    assert!(
        third
            .log_text()
            .contains("taking over the lease of a daemon that stopped renewing it"),
        "{}",
        third.log_text()
    );
    rustix::process::kill_process(third.wrapped_pid(), Signal::TERM).unwrap();
    assert!(third.wait_exit(SOON).success(), "{}", third.log_text());
}

/// SIGTERM during start-up ends the phase in progress (here the lease, waiting on a
/// SQLite file another process holds locked) instead of waiting it out: a clean exit,
/// and the next start works.
#[test]
fn sigterm_during_start_up_stops_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db.sqlite");
    let config = lease_config(tmp.path(), &db, "");
    Daemon::start(tmp.path(), &config, &[]).stop();
    let locker = crate::kit::servers::lock_sqlite(&db, 30);
    let mut d = Daemon::spawn(tmp.path(), &config, &[], &[]);
    eventually(SOON, "the daemon is opening the cache", || {
        d.log_text().contains("opening the cache")
    });
    d.signal(Signal::TERM);
    // Without the lock released, only a boot that gives way to the signal exits 0: one
    // that waits for the database fails on its busy timeout.
    let status = d.wait_exit(SOON);
    let log = d.log_text();
    assert!(status.success(), "{status:?}: {log}");
    assert!(log.contains("stopped during start-up"), "{log}");
    drop(locker);
    Daemon::start(tmp.path(), &config, &[]).stop();
}

/// `daemon.shutdown_timeout` is reloadable: after a reload to 1 s, a loop busy in a
/// step that lasts longer (a statement waiting on a locked SQLite file) is aborted
/// after 1 s, not after the 30 s the daemon started with.
#[test]
fn a_reloaded_shutdown_timeout_applies() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db.sqlite");
    let config = lease_config(tmp.path(), &db, "");
    let write = |timeout: &str| {
        let text = std::fs::read_to_string(&config).unwrap();
        let text = text
            .lines()
            .filter(|l| !l.starts_with("shutdown_timeout"))
            .map(|l| {
                if l == "[daemon]" {
                    format!("[daemon]\nshutdown_timeout = \"{timeout}\"")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&config, text + "\n").unwrap();
    };
    write("30s");
    let mut d = Daemon::start(tmp.path(), &config, &[]);
    write("1s");
    let from = d.notify.mark();
    d.signal(Signal::HUP);
    d.notify.wait_for(from, SOON, |m| m.contains("READY=1"));
    let _locker = crate::kit::servers::lock_sqlite(&db, 30);
    // The watcher wakes the queue loop, whose step then waits on the lock (10 s).
    std::fs::write(tmp.path().join("cache/queue/while-locked"), b"").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    d.signal(Signal::TERM);
    d.wait_exit(Duration::from_secs(20));
    let log = d.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("loops did not stop in time") && l.contains("timeout_s=1")),
        "{log}"
    );
}

/// Adopting many files Glance wrote is one log line per pass, not one per file.
#[test]
fn adoption_at_start_is_logged_as_a_summary() {
    let s = Setup::new("");
    std::fs::create_dir_all(s.cache("")).unwrap();
    for i in 0..200 {
        std::fs::write(s.cache(&format!("orphan-{i}")), b"bytes").unwrap();
    }
    let d = s.start();
    let log = d.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("adopted")).collect();
    assert_eq!(lines.len(), 2, "{log}");
    assert!(
        lines[0].contains("adopted cached files without rows") && lines[0].contains("adopted=200"),
        "{log}"
    );
    assert!(lines[1].contains("reconcile done adopted=200"), "{log}");
    d.stop();
}

#[test]
fn a_database_outage_is_survived() {
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };
    let s = Setup::new(&format!(
        "[database]\nurl = \"{}\"\nconnect_timeout = \"2s\"\ncreate_glance_tables = true\n[node]\nreference_url = \"http://outage-node:9292\"",
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
    // The loop retries on its backoff, which grew while the server was down (at most
    // 60 s): a loaded machine stretches the outage, so wait for a whole backoff period.
    let from = d.notify.mark().saturating_sub(1);
    d.notify.wait_for(from, Duration::from_secs(70), |m| {
        m.contains("STATUS=") && !m.contains("failing")
    });
    assert!(d.log_text().contains("loop recovered"), "{}", d.log_text());
    d.stop();
}

/// Receives journald's native protocol on a socket and writes each entry as a JSON
/// line; exits after 30 s without datagrams.
const JOURNAL_RECEIVER: &str = r#"
import json, socket, sys
def parse(d):
    fields, i = {}, 0
    while i < len(d):
        nl = d.index(b"\n", i)
        line = d[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            i = nl + 1
        else:
            k, n = line, int.from_bytes(d[nl + 1:nl + 9], "little")
            v = d[nl + 9:nl + 9 + n]
            i = nl + 9 + n + 1
        fields[k.decode()] = v.decode("utf-8", "replace")
    return fields
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
s.settimeout(30)
with open(sys.argv[2], "a") as out:
    try:
        while True:
            out.write(json.dumps(parse(s.recv(1 << 20))) + "\n")
            out.flush()
    except socket.timeout:
        pass
"#;

#[test]
fn logs_natively_to_journald_under_systemd() {
    if !rustix::process::geteuid().is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        eprintln!("SKIPPED: a private mount namespace for the journal socket needs root");
        return;
    }
    let s = Setup::new("");
    let journal = s.tmp.path().join("journal.bin");
    let receiver = s.tmp.path().join("receiver.py");
    std::fs::write(&receiver, JOURNAL_RECEIVER).unwrap();
    // stderr is "the journal stream": JOURNAL_STREAM names its device and inode, as
    // systemd does, so log.format = "auto" must pick journald.
    let stderr_file = s.tmp.path().join("stderr");
    std::fs::write(&stderr_file, b"").unwrap();
    let st = rustix::fs::stat(&stderr_file).unwrap();
    let journal_stream = format!("{}:{}", st.st_dev, st.st_ino);
    // A private mount namespace with a tmpfs on /run/systemd: the daemon finds our
    // receiver at the journal's fixed socket path, and the host is untouched.
    let script = format!(
        "mount -t tmpfs tmpfs /run/systemd && mkdir -p /run/systemd/journal && \
         (python3 {receiver} /run/systemd/journal/socket {journal} </dev/null >/dev/null 2>&1 &) && \
         while [ ! -S /run/systemd/journal/socket ]; do sleep 0.02; done && \
         exec {bin} --config {config} run 2>>{stderr}",
        receiver = receiver.display(),
        journal = journal.display(),
        bin = crate::kit::cli::BIN,
        config = s.config.display(),
        stderr = stderr_file.display(),
    );
    let notify = crate::kit::daemon::NotifySocket::bind(s.tmp.path());
    let child = crate::kit::cli::scrub_env(&mut Command::new("unshare"))
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            &script,
        ])
        .env("NOTIFY_SOCKET", &notify.path)
        .env("JOURNAL_STREAM", &journal_stream)
        .env("GLANCE_CACHED_LOG__FORMAT", "auto")
        .stderr(
            std::fs::File::options()
                .append(true)
                .open(&stderr_file)
                .unwrap(),
        )
        .spawn()
        .unwrap();
    let mut d = Daemon {
        child,
        log: stderr_file.clone(),
        notify,
    };
    d.notify.wait_for(0, SOON, |m| m.contains("READY=1"));
    // Written beside and renamed in, as Glance does: the cleaner, woken by the
    // arrival, must not find it half written.
    let staged = s.tmp.path().join("journal-test");
    std::fs::write(&staged, b"12345").unwrap();
    std::fs::rename(&staged, s.cache("invalid/journal-test")).unwrap();
    eventually(SOON, "the invalid file is removed", || {
        !s.cache("invalid/journal-test").exists()
    });
    let read_journal = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&journal)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let removal = |entries: &[serde_json::Value]| {
        entries
            .iter()
            .find(|e| e["IMAGE_ID"] == "journal-test")
            .cloned()
    };
    eventually(SOON, "the removal reaches the journal", || {
        removal(&read_journal()).is_some()
    });
    d.stop();
    let entries = read_journal();
    let removal = removal(&entries).unwrap();
    assert_eq!(removal["SYSLOG_IDENTIFIER"], "glance-cached");
    assert_eq!(removal["MESSAGE"], "removed invalid cache file");
    assert_eq!(removal["BYTES"], "5");
    assert_eq!(
        removal["PRIORITY"], "6",
        "info maps to syslog informational"
    );
    assert!(
        entries.iter().any(|e| e["MESSAGE"] == "ready"),
        "{entries:?}"
    );
    let stderr = std::fs::read_to_string(&stderr_file).unwrap();
    assert!(
        !stderr.contains("removed invalid cache file"),
        "no text copy on stderr: {stderr}"
    );
}

#[test]
fn watchdog_pings_only_while_loops_are_healthy() {
    let s = Setup::new("");
    let mut d = Daemon::spawn(
        s.tmp.path(),
        &s.config,
        &[],
        &[("WATCHDOG_USEC", "1000000")],
    );
    let ready = d.notify.wait_for(0, SOON, |m| m.contains("READY=1"));
    let first = d.notify.wait_for(ready, SOON, |m| m == "WATCHDOG=1\n");
    d.notify.wait_for(first + 1, SOON, |m| m == "WATCHDOG=1\n");
    // Wedge the queue loop: another process holds the SQLite write lock, and a queue
    // marker makes the loop try to write (it waits on SQLite's busy timeout).
    let db = s.cache(".glance-cached/glance-cached.db");
    let mut locker = lock_sqlite(&db, 4);
    std::fs::write(s.cache("queue/wedge"), b"").unwrap();
    eventually(SOON, "the daemon notices the stuck loop", || {
        d.log_text().contains("withholding the watchdog ping")
    });
    // Pings stop while the loop is stuck (the lock is held for 4 s; pings would come
    // every 0.5 s).
    let stuck_from = d.notify.mark();
    std::thread::sleep(Duration::from_millis(900));
    d.notify.drain();
    let pings = d.notify.messages[stuck_from..]
        .iter()
        .filter(|m| m.as_str() == "WATCHDOG=1\n")
        .count();
    assert_eq!(pings, 0, "no watchdog ping while a loop is stuck");
    // ...and resume once it is unstuck.
    assert!(locker.0.wait().unwrap().success());
    eventually(SOON, "the marker is adopted", || {
        d.log_text().contains("adopted queue markers")
    });
    let after = d.notify.mark();
    d.notify.wait_for(after, SOON, |m| m == "WATCHDOG=1\n");
    d.stop();
}

#[test]
fn json_log_format_writes_json_lines() {
    let s = Setup::new("[log]\nformat = \"json\"");
    let mut d = Daemon::spawn(
        s.tmp.path(),
        &s.config,
        &[],
        &[("GLANCE_CACHED_LOG__FORMAT", "json")],
    );
    d.notify.wait_for(0, SOON, |m| m.contains("READY=1"));
    // Written beside and renamed in, as Glance does: the cleaner, woken by the
    // arrival, must not find it half written.
    let staged = s.tmp.path().join("json-test");
    std::fs::write(&staged, b"123").unwrap();
    std::fs::rename(&staged, s.cache("invalid/json-test")).unwrap();
    eventually(SOON, "the removal is logged", || {
        d.log_text().contains("json-test")
    });
    let log = d.log_text();
    let entry: serde_json::Value = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("every line is JSON"))
        .find(|e| e["fields"]["image_id"] == "json-test")
        .unwrap();
    assert_eq!(entry["fields"]["bytes"], 3);
    assert_eq!(entry["level"], "INFO");
    d.stop();
}

#[test]
fn a_service_manager_that_stops_reading_never_stalls_the_daemon() {
    let s = Setup::new("");
    // A notify socket nobody drains after READY: its queue fills up.
    let path = s.tmp.path().join("unread.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    let mut cmd = crate::kit::cli::command();
    let child = cmd
        .args(["--config", s.config.to_str().unwrap(), "run"])
        .env("NOTIFY_SOCKET", &path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    /// Kills the daemon if the test fails before it exits.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut guard = KillOnDrop(child);
    let child = &mut guard.0;
    let mut buf = [0u8; 4096];
    socket.set_read_timeout(Some(SOON)).unwrap();
    loop {
        let n = socket.recv(&mut buf).unwrap();
        if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
            break;
        }
    }
    // Far more notifications than the socket queues (Linux queues 10 datagrams by
    // default): every reload sends RELOADING=1 and READY=1.
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    for _ in 0..30 {
        rustix::process::kill_process(pid, Signal::HUP).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    for n in 0..50 {
        std::fs::write(s.cache(&format!("invalid/f{n}")), b"x").unwrap();
    }
    eventually(SOON, "the daemon keeps working", || {
        std::fs::read_dir(s.cache("invalid")).unwrap().count() == 0
    });
    rustix::process::kill_process(pid, Signal::TERM).unwrap();
    let deadline = std::time::Instant::now() + SOON;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon stalled on a full notify socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
}

/// Pointed at an empty shared database, neither the daemon nor the CLI creates Glance's
/// tables unasked (a later `glance-manage db sync` there would fail on them): they stop
/// and say what to do. With `create_glance_tables = true` the same database is set up.
#[test]
fn an_empty_shared_database_gets_glance_tables_only_when_asked() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(db) = rt.block_on(crate::kit::servers::TestDb::new(
        crate::kit::servers::Backend::Postgres,
    )) else {
        return;
    };
    let config = |extra: &str| {
        format!(
            "[database]\nurl = \"{}\"\n{extra}[node]\nreference_url = \"http://empty-db:9292\"\n",
            db.url
        )
    };
    let s = Setup::new(&config(""));
    let mut daemon = crate::kit::cli::command()
        .args(["--config", s.config.to_str().unwrap(), "run"])
        .env_remove("NOTIFY_SOCKET")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > SOON {
            let _ = daemon.kill();
            panic!("the daemon kept running on an empty shared database");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut daemon.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("glance-manage db sync") && stderr.contains("create_glance_tables"),
        "{stderr}"
    );
    let out = s.cli(&["list-cached"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("create_glance_tables"));
    s.write_config(&config("create_glance_tables = true\n"));
    // A command that only reads creates no table, and says so.
    let out = s.cli(&["list-cached"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no cache tables yet"));
    let out = s.cli(&["queue", "creates-the-tables"]);
    assert!(out.status.success());
    let out = s.cli(&["list-cached"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rt.block_on(db.drop_database());
}
