//! Crashes and database faults (issue 7, items 1 and 3), through the real daemon.
//!
//! Crashes: the daemon is stopped at an exact point by a failpoint
//! (`glance_cached::failpoint`, armed by environment), `kill -9`ed there, and restarted
//! plainly (it takes over the dead holder's lease). After every crash: no file in the
//! cache is partial or corrupt, `list-cached` and the files on disk agree, an image that
//! was not published is fetched again, and `incomplete/` and `invalid/` are emptied.
//!
//! Database faults: a private PostgreSQL and a private MariaDB are each stopped for 60 s
//! under a daemon with downloads in flight from a slow origin; a SQLite file is held
//! under `BEGIN EXCLUSIVE` by another process.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::process::Signal;

use crate::kit::daemon::{Daemon, SOON, Setup, eventually, queue, queued_json};
use crate::kit::origin::{Behaviour, Origin};
use crate::kit::servers::{PrivateMariadb, PrivatePostgres, lock_sqlite};
use crate::kit::test_bytes;

/// How long each database server is down.
const OUTAGE_SECS: u64 = 60;

const FAST_RETRY: &str =
    "[prefetcher]\nretry_delay = \"100ms\"\nmax_retry_delay = \"500ms\"\ninterval = \"1h\"\n";

/// The names in `dir` that are image ids (skips the SQLite files and directories).
fn ids_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .collect()
}

/// Every image file in the cache is whole: its bytes are exactly the image's.
fn assert_no_partial_image(s: &Setup, images: &BTreeMap<String, Vec<u8>>) {
    for id in ids_in(&s.cache("")) {
        let want = images
            .get(&id)
            .unwrap_or_else(|| panic!("unexpected file {id} in the cache"));
        let got = std::fs::read(s.cache(&id)).unwrap();
        assert!(
            got == *want,
            "{id} in the cache is {} bytes, not the image's {} bytes (or differs)",
            got.len(),
            want.len()
        );
    }
}

/// `list-cached` has one row per file on disk and no other; returns the ids.
fn assert_db_and_disk_agree(s: &Setup) -> BTreeSet<String> {
    let rows = s.cached_ids();
    let set: BTreeSet<String> = rows.iter().cloned().collect();
    assert_eq!(set.len(), rows.len(), "duplicate rows: {rows:?}");
    assert_eq!(set, ids_in(&s.cache("")), "rows vs files on disk");
    set
}

/// Once the work is done: the queue is empty, `incomplete/` and `invalid/` are emptied,
/// every file is whole, and exactly `images` are cached, one row each.
fn assert_settled(s: &Setup, images: &BTreeMap<String, Vec<u8>>) {
    eventually(SOON, "the queue is empty", || queued_json(s).is_empty());
    eventually(SOON, "incomplete/ and invalid/ are emptied", || {
        ids_in(&s.cache("incomplete")).is_empty() && ids_in(&s.cache("invalid")).is_empty()
    });
    assert_empty(&s.cache("incomplete"));
    assert_empty(&s.cache("invalid"));
    assert_no_partial_image(s, images);
    assert_eq!(
        assert_db_and_disk_agree(s),
        images.keys().cloned().collect()
    );
}

fn assert_empty(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{} still holds {left:?}", dir.display());
}

/// Spawns the daemon with `failpoint` armed, waits until it is reached, kills -9.
fn crash_at(s: &Setup, failpoint: &str) {
    let marker = s
        .tmp
        .path()
        .join(format!("reached-{}", failpoint.replace(':', "-")));
    let mut d = Daemon::spawn(
        s.tmp.path(),
        &s.config,
        &[],
        &[
            ("GLANCE_CACHED_TEST_FAILPOINT", failpoint),
            (
                "GLANCE_CACHED_TEST_FAILPOINT_FILE",
                marker.to_str().unwrap(),
            ),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !marker.exists() {
        assert!(
            d.alive() && Instant::now() < deadline,
            "failpoint {failpoint} not reached; log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    d.signal(Signal::KILL);
    d.wait_exit(SOON);
}

/// A plain restart after a crash: takes over the dead daemon's lease.
fn restart(s: &Setup) -> Daemon {
    let d = Daemon::start(s.tmp.path(), &s.config, &[]);
    assert!(
        d.log_text().contains("no longer running"),
        "{}",
        d.log_text()
    );
    d
}

/// Kills the daemon at `failpoint` while it prefetches one image; restarts; checks.
fn prefetch_crash(failpoint: &str, published_before_crash: bool) {
    let origin = Origin::start();
    let data = test_bytes(1 << 20, 21);
    origin.add("crash-img", data.clone(), Behaviour::default());
    let s = Setup::new(&format!(
        "{FAST_RETRY}\n[upstream]\nkind = \"glance\"\nurl = \"{}\"\n",
        origin.url()
    ));
    // An image cached before, which no crash may touch.
    s.import("kept", 5000);
    let images = BTreeMap::from([
        ("crash-img".to_owned(), data.clone()),
        ("kept".to_owned(), test_bytes(5000, 5000usize as u8)),
    ]);
    queue(&s, &["crash-img"]);
    crash_at(&s, failpoint);
    // Right after the crash: nothing partial is published.
    assert_no_partial_image(&s, &images);
    assert_eq!(
        s.cache("crash-img").exists(),
        published_before_crash,
        "published at {failpoint}?"
    );
    let d = restart(&s);
    eventually(Duration::from_secs(20), "the image is cached", || {
        s.cached_ids().iter().any(|c| c == "crash-img")
    });
    assert_settled(&s, &images);
    let requests = origin.file_requests("crash-img");
    if published_before_crash {
        assert_eq!(requests, 1, "a published image is not fetched again");
    } else {
        assert_eq!(requests, 2, "an unpublished image is fetched again");
    }
    d.stop();
}

#[test]
fn crash_when_the_upstream_has_answered() {
    prefetch_crash("download:connected", false);
}

#[test]
fn crash_with_half_the_bytes_written() {
    prefetch_crash("download:half", false);
}

#[test]
fn crash_after_fsync_before_rename() {
    prefetch_crash("writer:before-rename", false);
}

#[test]
fn crash_after_rename_before_the_row() {
    prefetch_crash("writer:before-row", true);
}

/// A SIGTERM while the writer thread publishes (its file renamed into place, the row
/// not yet written: the failpoint pauses it there): the shutdown waits for the
/// publish, so the clean stop leaves the image with its row and off the queue, not a
/// file without a row for the next start to repair.
#[test]
fn a_clean_stop_during_a_publish_leaves_the_row_and_no_queue_entry() {
    let origin = Origin::start();
    let data = test_bytes(1 << 20, 22);
    origin.add("stop-img", data.clone(), Behaviour::default());
    let s = Setup::new(&format!(
        "{FAST_RETRY}\n[upstream]\nkind = \"glance\"\nurl = \"{}\"\n",
        origin.url()
    ));
    queue(&s, &["stop-img"]);
    let marker = s.tmp.path().join("reached-before-row");
    let d = Daemon::spawn(
        s.tmp.path(),
        &s.config,
        &[],
        &[
            ("GLANCE_CACHED_TEST_FAILPOINT", "writer:before-row"),
            (
                "GLANCE_CACHED_TEST_FAILPOINT_FILE",
                marker.to_str().unwrap(),
            ),
            ("GLANCE_CACHED_TEST_FAILPOINT_PAUSE_MS", "1500"),
        ],
    );
    eventually(SOON, "the publish is under way", || marker.exists());
    d.stop();
    // Straight after the stop, before anything repairs: the row is there, the queue
    // is empty and the file is the image.
    assert_eq!(s.cached_ids(), vec!["stop-img".to_owned()]);
    assert!(queued_json(&s).is_empty(), "{:?}", queued_json(&s));
    assert_eq!(std::fs::read(s.cache("stop-img")).unwrap(), data);
}

#[test]
fn crash_in_the_middle_of_a_prune() {
    let s = Setup::new("max_size = 100000");
    let mut images = BTreeMap::new();
    for (n, id) in ["p-old", "p-mid", "p-new"].iter().enumerate() {
        s.import(id, 2000 + n);
        images.insert(id.to_string(), test_bytes(2000 + n, (2000 + n) as u8));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Two of three must go: the crash comes after the first removal, before its row.
    s.write_config("max_size = 2500");
    crash_at(&s, "prune:mid");
    assert_no_partial_image(&s, &images);
    assert!(
        !s.cache("p-old").exists(),
        "the LRU image was removed first"
    );
    let rows = s.cached_ids();
    assert!(
        rows.contains(&"p-old".to_owned()),
        "the crash left a row without a file: {rows:?}"
    );
    let d = restart(&s);
    eventually(SOON, "the prune finishes", || {
        s.cached_ids() == ["p-new"] && !s.cache("p-mid").exists()
    });
    assert_no_partial_image(&s, &images);
    assert_eq!(
        assert_db_and_disk_agree(&s),
        BTreeSet::from(["p-new".into()])
    );
    d.stop();
}

#[test]
fn crash_in_the_middle_of_a_clean() {
    let s = Setup::new("");
    s.import("c-kept", 3000);
    let images = BTreeMap::from([("c-kept".to_owned(), test_bytes(3000, 3000usize as u8))]);
    for n in 0..3 {
        std::fs::write(s.cache(&format!("invalid/bad-{n}")), b"garbage").unwrap();
    }
    let stalled = s.tmp.path().join("stalled");
    std::fs::write(&stalled, b"partial").unwrap();
    crate::kit::age_file(&stalled, 7200);
    std::fs::rename(&stalled, s.cache("incomplete/stalled")).unwrap();
    crash_at(&s, "clean:mid");
    assert_eq!(
        ids_in(&s.cache("invalid")).len() + ids_in(&s.cache("incomplete")).len(),
        3,
        "the crash came after exactly one removal"
    );
    let d = restart(&s);
    eventually(SOON, "the leftovers are removed", || {
        ids_in(&s.cache("invalid")).is_empty() && ids_in(&s.cache("incomplete")).is_empty()
    });
    assert_no_partial_image(&s, &images);
    assert_eq!(
        assert_db_and_disk_agree(&s),
        BTreeSet::from(["c-kept".into()])
    );
    d.stop();
}

/// Fails the test, with the log, if the daemon exited.
fn assert_alive(d: &mut Daemon, when: &str) {
    assert!(
        d.alive(),
        "the daemon exited {when}; log:\n{}",
        d.log_text()
    );
}

/// A database server stopped for 60 s under a daemon prefetching from a slow origin:
/// no crash, no lost queue entry, no duplicate row, and everything completes after.
fn database_outage(url: &str, stop: impl FnOnce(), start: impl FnOnce()) {
    let origin = Origin::start();
    let slow = Behaviour::slow(300);
    let mut images = BTreeMap::new();
    for n in 0..8u8 {
        let id = format!("out-{n}");
        let data = test_bytes(640 * 1024, n);
        origin.add(&id, data.clone(), slow.clone());
        images.insert(id, data);
    }
    let s = Setup::new(&format!(
        "{FAST_RETRY}concurrency = 2\n[database]\nurl = \"{url}\"\nconnect_timeout = \"2s\"\ncreate_glance_tables = true\n\
         [node]\nreference_url = \"http://outage-node:9292\"\n\
         [upstream]\nkind = \"glance\"\nurl = \"{}\"\n",
        origin.url()
    ));
    let mut d = s.start();
    queue(&s, &["out-0", "out-1", "out-2", "out-3", "out-4", "out-5"]);
    eventually(SOON, "two downloads are under way", || {
        ids_in(&s.cache("incomplete")).len() == 2
    });
    stop();
    let outage = Instant::now();
    // Work keeps arriving: queue markers (Glance's way) and invalid files.
    std::fs::write(s.cache("queue/out-6"), b"").unwrap();
    std::fs::write(s.cache("queue/out-7"), b"").unwrap();
    std::fs::write(s.cache("invalid/broken"), b"junk").unwrap();
    // The CLI fails clearly instead of hanging.
    let started = Instant::now();
    let out = s.cli(&["list-queued"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("error: "),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    eventually(
        SOON,
        "the invalid file is removed without the database",
        || !s.cache("invalid/broken").exists(),
    );
    // The outage itself, the daemon checked every second.
    while outage.elapsed() < Duration::from_secs(OUTAGE_SECS) {
        assert_alive(&mut d, "during the outage");
        std::thread::sleep(Duration::from_secs(1));
    }
    start();
    let deadline = Instant::now() + Duration::from_secs(120);
    while s.cached_ids().len() < images.len() {
        assert!(
            Instant::now() < deadline,
            "not every queued image is cached after the outage: cached {:?}, queued {:?}, \
             incomplete/ {:?}, files {:?}, invalid/ {:?}; log:\n{}",
            s.cached_ids(),
            queued_json(&s),
            ids_in(&s.cache("incomplete")),
            ids_in(&s.cache("")),
            ids_in(&s.cache("invalid")),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_settled(&s, &images);
    assert_alive(&mut d, "after the outage");
    assert!(d.log_text().contains("loop recovered"), "{}", d.log_text());
    d.stop();
}

#[test]
fn postgres_down_for_a_minute_with_downloads_in_flight() {
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };
    database_outage(&pg.url(), || pg.stop_server(), || pg.start_server());
}

#[test]
fn mariadb_down_for_a_minute_with_downloads_in_flight() {
    let Some(my) = PrivateMariadb::start() else {
        return;
    };
    database_outage(&my.url(), || my.stop_server(), || my.start_server());
}

#[test]
fn a_locked_sqlite_file_is_a_clear_error_and_retried() {
    let s = Setup::new("");
    let mut d = s.start();
    let db: PathBuf = s.cache(".glance-cached/glance-cached.db");
    let mut locker = lock_sqlite(&db, 15);
    let locked_at = Instant::now();
    // The daemon: work arriving meanwhile waits out the busy timeout, fails,
    // is logged and retried.
    std::fs::write(s.cache("queue/during-lock"), b"").unwrap();
    // The CLI: a clear error after the busy timeout (10 s), not a hang.
    let out = s.cli(&["queue", "cli-img"]);
    let took = locked_at.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("error: ") && l.contains("database is locked")),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(14), "took {took:?}");
    d.notify
        .wait_for(0, Duration::from_secs(20), |m| m.contains("queue failing"));
    assert_alive(&mut d, "while the database is locked");
    assert!(locker.0.wait().unwrap().success());
    eventually(Duration::from_secs(30), "the marker is adopted", || {
        queued_json(&s)
            .iter()
            .any(|q| q["image_id"] == "during-lock")
    });
    let from = d.notify.mark().saturating_sub(1);
    d.notify.wait_for(from, SOON, |m| {
        m.contains("STATUS=") && !m.contains("failing")
    });
    assert!(d.log_text().contains("loop recovered"), "{}", d.log_text());
    d.stop();
}
