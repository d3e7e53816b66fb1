//! Attacks on the cache layout while the daemon or a command runs (issue 20, items 1, 2
//! and 13): subdirectories swapped for symlinks under a running daemon, a `clean`
//! command racing a RENAME_EXCHANGE loop, a paused download whose file is removed and
//! replaced by another writer, and log floods and forged log lines through file names.
//! Each keeps the canary tree of `faults_hostile` outside the cache.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::kit::canary::{Canary, make_old};
use crate::kit::cli::run_with_deadline;
use crate::kit::daemon::{SOON, Setup, eventually};
use crate::kit::origin::{Behaviour, Origin};
use crate::kit::test_bytes;

fn cli(s: &Setup, args: &[&str]) -> std::process::Output {
    run_with_deadline(&s.config, args, &[])
}

/// Two-hour-old regular files named by valid ids in `dir`, so that the stall and grace
/// rules would remove them (and a cleaner that followed a link would find the canary's
/// files just as due). Each is written and aged beside the cache and renamed in whole:
/// a running daemon's cleaner may remove it the moment it appears.
fn plant_leftovers(dir: &Path, names: &[&str]) {
    // `<tmp>/cache/<sub>`: `<tmp>` is on the same filesystem and outside the cache.
    let outside = dir.parent().and_then(Path::parent).unwrap();
    for n in names {
        let staged = outside.join(format!("staged-{n}"));
        std::fs::write(&staged, b"leftover").unwrap();
        make_old(&staged);
        std::fs::rename(&staged, dir.join(n)).unwrap();
    }
}

#[test]
fn subdirectories_swapped_under_a_running_daemon_are_never_followed() {
    let s = Setup::new("");
    let canary = Canary::new(s.tmp.path());
    let mut d = s.start();
    for sub in ["invalid", "incomplete", "queue"] {
        let dir = s.cache(sub);
        let held = s.tmp.path().join(format!("{sub}.held"));
        // The real directory moves away (still the one the daemon holds) and a symlink
        // to the canary tree takes its name; the canary's files are old and named by
        // valid ids, exactly what the cleaner and the queue would act on.
        plant_leftovers(&dir, &["real-leftover"]);
        let from = d.notify.mark();
        std::fs::rename(&dir, &held).unwrap();
        symlink(&canary.root, &dir).unwrap();
        // The watcher sees the swap in the root; the cleaner checks the handles.
        d.notify.wait_for(from, SOON, |m| {
            m.contains("STATUS=")
                && m.contains("replaced after start")
                && m.contains(&format!("/{sub}\""))
        });
        // The commands that list, remove or mark in that directory refuse it too.
        for args in [
            &["clean", "--stall-time", "1s"][..],
            &["delete-queued", "--all"],
            &["delete-queued", "victim"],
            &["reconcile"],
            &["queue", "real-b"],
        ] {
            let _ = cli(&s, args);
        }
        canary.check(&format!("with {sub}/ swapped for a symlink"));
        assert!(d.alive(), "{}", d.log_text());
        assert!(
            d.log_text()
                .contains("cache subdirectory was replaced after start"),
            "logged: {}",
            d.log_text()
        );
        // Put back, it is used again: STATUS clears and the leftover goes.
        let from = d.notify.mark();
        std::fs::remove_file(&dir).unwrap();
        std::fs::rename(&held, &dir).unwrap();
        d.notify.wait_for(from, SOON, |m| {
            m.contains("STATUS=") && !m.contains("replaced after start")
        });
        if sub != "queue" {
            let out = cli(&s, &["clean", "--stall-time", "1s"]);
            assert!(out.status.success(), "{out:?}");
            assert!(
                !dir.join("real-leftover").exists(),
                "{sub}/ is cleaned again"
            );
        }
    }
    d.stop();
    canary.finish("subdirectories swapped under the daemon");
}

/// `glance-cached clean` (as root, here) against a loop exchanging `invalid/` with a
/// symlink to the canary tree by `renameat2(RENAME_EXCHANGE)`, for a bounded number of
/// runs, with the daemon running: each run either cleans the real directory or refuses
/// the swapped one, nothing reaches the canary, and the daemon's log stays short.
#[test]
fn clean_racing_a_rename_exchange_loop_never_leaves_the_cache() {
    let s = Setup::new("");
    // The database and directories exist before the race starts.
    assert!(cli(&s, &["reconcile"]).status.success());
    let canary = Canary::new(s.tmp.path());
    let root = s.cache("");
    symlink(&canary.root, root.join("swap")).unwrap();
    plant_leftovers(&s.cache("invalid"), &["a1", "a2", "a3"]);
    // The daemon runs through the race too: every exchange is a watcher event.
    let mut d = s.start();
    let stop = Arc::new(AtomicBool::new(false));
    let exchanges = {
        let stop = stop.clone();
        let root = root.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    root.join("invalid"),
                    rustix::fs::CWD,
                    root.join("swap"),
                    rustix::fs::RenameFlags::EXCHANGE,
                )
                .unwrap();
                n += 1;
            }
            n
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut runs, mut refused) = (0, 0);
    while runs < 40 && Instant::now() < deadline {
        let out = cli(&s, &["clean", "--stall-time", "1s"]);
        runs += 1;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("invalid") && !err.contains("panicked"),
                "a refusal names the directory: {err}"
            );
            refused += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let exchanged = exchanges.join().unwrap();
    assert!(exchanged > 0);
    eprintln!("{runs} clean runs, {refused} refused, {exchanged} exchanges");
    assert!(d.alive(), "{}", d.log_text());
    let log = d.log_text();
    let errors = log.lines().filter(|l| l.contains(" ERROR ")).count();
    assert!(
        errors <= 2,
        "{errors} error lines for {exchanged} exchanges"
    );
    d.stop();
    canary.finish("clean racing an exchange loop");
}

/// A download paused past the stall time: `clean` leaves its file alone (its writer
/// holds it), and when another writer removes it and puts other bytes at its name (as
/// Glance's `open_for_write`, without O_EXCL, would), the commit publishes nothing.
#[test]
fn a_paused_download_is_never_cleaned_and_only_its_own_bytes_are_published() {
    let origin = Origin::start();
    let data = test_bytes(128 * 1024, 9);
    // Two 64 KiB chunks, five seconds apart: the pause.
    origin.add("paused", data.clone(), Behaviour::slow(5000));
    let s = Setup::new(&format!(
        "[prefetcher]\nretry_delay = \"1h\"\nmax_retry_delay = \"1h\"\ninterval = \"1h\"\n[upstream]\nkind = \"glance\"\nurl = \"{}\"\n",
        origin.url()
    ));
    let d = s.start();
    assert!(cli(&s, &["queue", "paused"]).status.success());
    let partial = s.cache("incomplete/paused");
    eventually(SOON, "the download is under way", || {
        std::fs::metadata(&partial).is_ok_and(|m| m.len() > 0)
    });
    // Stalled by every measure: two hours old, and the command's stall time is 1 s.
    make_old(&partial);
    let out = cli(&s, &["clean", "--stall-time", "1s"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        partial.exists(),
        "clean removed a file its download still writes"
    );
    // Another writer takes the name over: remove, then create 27 bytes.
    std::fs::remove_file(&partial).unwrap();
    std::fs::write(&partial, b"twenty-seven foreign bytes!").unwrap();
    eventually(Duration::from_secs(20), "the commit ends", || {
        s.cache("paused").exists()
            || d.log_text()
                .contains("by another writer; nothing published")
    });
    assert!(
        !s.cache("paused").exists(),
        "nothing was published under the verified row"
    );
    assert!(s.cached_ids().is_empty());
    assert_eq!(
        std::fs::read(&partial).unwrap(),
        b"twenty-seven foreign bytes!",
        "the other writer's file is left where it was"
    );
    d.stop();
}

/// A flood of planted symlinks in `invalid/` while the daemon runs (hundreds of watcher
/// passes) is a warning or two with a count, not a line per entry per pass, and a file
/// name with a newline cannot forge a log line.
#[test]
fn planted_entries_neither_flood_nor_forge_the_log() {
    let s = Setup::new("");
    let canary = Canary::new(s.tmp.path());
    let mut d = s.start();
    let invalid = s.cache("invalid");
    let forged = "2026-01-01T00:00:00.000000Z ERROR forged: the cache is gone";
    let name = format!("x\n{forged}");
    std::fs::write(invalid.join(OsStr::from_bytes(name.as_bytes())), b"").unwrap();
    eventually(SOON, "the hostile name is reported", || {
        d.log_text().contains("skipping")
    });
    const PLANTED: usize = 2000;
    for n in 0..PLANTED {
        symlink(canary.path("victim"), invalid.join(format!("link-{n}"))).unwrap();
    }
    // A real invalid file after them: once it is gone, passes have run over all of them.
    let staged = s.tmp.path().join("real-invalid");
    std::fs::write(&staged, b"bad").unwrap();
    std::fs::rename(&staged, invalid.join("real-invalid")).unwrap();
    eventually(SOON, "a pass after the flood", || {
        !invalid.join("real-invalid").exists()
    });
    let log = d.log_text();
    let warnings = log.lines().filter(|l| l.contains("skipping")).count();
    assert!(
        warnings <= 2,
        "{warnings} warning lines for {PLANTED} planted entries"
    );
    assert!(
        !log.lines().any(|l| l.starts_with(forged)),
        "a file name forged a log line:\n{log}"
    );
    assert!(log.contains("x\\n2026-01-01"), "the name is quoted: {log}");
    assert!(d.alive());
    d.stop();
    canary.finish("planted log flood");
}

/// The prefetcher giving up on an image while `queue/` is a symlink to the canary tree:
/// its marker is removed through the held directory or not at all, never through the
/// link (where a canary file has the image's name).
#[test]
fn a_prefetch_giving_up_through_a_swapped_queue_never_leaves_the_cache() {
    use glance_cached::db::DbTime;

    let origin = Origin::start();
    // Not active in Glance: the prefetcher gives up at once.
    origin.add(
        "victim",
        b"x".to_vec(),
        Behaviour {
            status: Some("deleted".into()),
            ..Default::default()
        },
    );
    let s = Setup::new(&format!(
        "[prefetcher]\ninterval = \"1s\"\n[upstream]\nkind = \"glance\"\nurl = \"{}\"\n",
        origin.url()
    ));
    let canary = Canary::new(s.tmp.path());
    let mut d = s.start();
    let queue = s.cache("queue");
    let from = d.notify.mark();
    std::fs::rename(&queue, s.tmp.path().join("queue.held")).unwrap();
    symlink(&canary.root, &queue).unwrap();
    d.notify.wait_for(from, SOON, |m| {
        m.contains("STATUS=") && m.contains("/queue\"")
    });
    // A queue row for an image named like a canary file, added the way another process
    // (Glance, or an earlier run) would: straight into the database.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let db = s.db().await;
        let node = glance_cached::db::NodeDb::configure(
            db.clone(),
            glance_cached::config::DEFAULT_NODE_URL,
        )
        .await
        .unwrap();
        let now = DbTime::from_utc(chrono::Utc::now());
        assert!(node.enqueue("victim", now).await.unwrap());
        db.close().await;
    });
    // The outcome is recorded; that the marker could not go is said, and is no reason
    // to treat the outcome as lost (and try the image again and again).
    eventually(Duration::from_secs(20), "the prefetcher gives up", || {
        d.log_text()
            .contains("dropped from the queue, but its marker could not be removed")
    });
    assert!(
        !d.log_text()
            .contains("could not record the prefetch outcome"),
        "{}",
        d.log_text()
    );
    assert!(d.alive(), "{}", d.log_text());
    canary.check("after the prefetcher gave up through a swapped queue/");
    d.stop();
    canary.finish("prefetch give-up through a swapped queue");
}
