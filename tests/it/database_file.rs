//! The daemon's SQLite file through the binary: a database deleted or replaced under a
//! running daemon stops it with a clear error (systemd restarts it on the new file).

use std::time::Duration;

use crate::kit::daemon::{Daemon, Setup};

/// Time for two heartbeats and a clean exit.
const NOTICE: Duration = Duration::from_secs(15);

fn setup() -> (Setup, std::path::PathBuf) {
    let s = Setup::new("");
    let db = s.tmp.path().join("state/glance-cached.db");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    // A 3 s lease is renewed, and the database file checked, every second.
    std::fs::write(
        &s.config,
        format!(
            "[cache]\ndir = \"{}\"\n[database]\nurl = \"sqlite://{}\"\n\
             [daemon]\nlease_ttl = \"3s\"\nshutdown_timeout = \"5s\"\n",
            s.cache("").display(),
            db.display()
        ),
    )
    .unwrap();
    (s, db)
}

fn expect_stop(d: &mut Daemon, what: &str) {
    let status = d.wait_exit(NOTICE);
    assert_eq!(status.code(), Some(1), "{}", d.log_text());
    let log = d.log_text();
    assert!(
        log.contains(&format!(
            "glance-cached.db {what} while the daemon ran on it"
        )),
        "{log}"
    );
}

#[test]
fn a_database_deleted_or_replaced_under_the_daemon_stops_it() {
    let (s, db) = setup();
    s.import("before", 100);
    // A backup, as an operator would take one to restore later.
    let backup = s.tmp.path().join("backup.db");
    let out = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg(format!(".backup {}", backup.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut d = s.start();
    // `rm glance-cached.db*`
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    expect_stop(&mut d, "was deleted");

    // Restarted (as systemd would) on a new, empty file; then the backup is restored
    // with mv under it.
    let mut d = s.start();
    std::fs::rename(&backup, &db).unwrap();
    expect_stop(&mut d, "was replaced by another file");

    // The restart runs on the restored file.
    let d = s.start();
    assert_eq!(s.cached_ids(), ["before"]);
    d.stop();
}

#[test]
fn a_database_at_the_old_default_place_moves_once_no_daemon_holds_it() {
    let s = Setup::new("");
    let old = s.cache("glance-cached.db");
    let explicit = format!("[database]\nurl = \"sqlite://{}\"\n", old.display());
    s.write_config(&explicit);
    s.import("kept", 1234);
    let out = s.cli(&["queue", "still-queued"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A daemon of the previous version runs on it: the move waits.
    let d = s.start();
    s.write_config("");
    // (A command that writes: one that only reads moves nothing.)
    let out = s.cli(&["list-queued"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "moved under a running daemon");
    assert!(
        err.contains("is in use by") && err.contains("stop it, then start again"),
        "{err}"
    );
    assert!(old.exists());
    s.write_config(&explicit);
    d.stop();

    // Stopped: the first start on the default moves it, with all it holds.
    s.write_config("");
    let d = s.start();
    let new = s.cache(glance_cached::config::DEFAULT_SQLITE_FILE);
    assert!(new.exists());
    for suffix in ["", "-wal", "-shm"] {
        let file = format!("{}{suffix}", old.display());
        assert!(!std::path::Path::new(&file).exists(), "{file} remains");
    }
    assert!(
        d.log_text().contains("moved the SQLite database"),
        "{}",
        d.log_text()
    );
    assert_eq!(s.cached_ids(), ["kept"]);
    let out = s.cli(&["list-queued"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("still-queued"));
    d.stop();
}

#[test]
fn a_database_at_the_old_place_that_glance_shares_stays_there() {
    let s = Setup::new("");
    let old = s.cache("glance-cached.db");
    s.write_config(&format!(
        "[database]\nurl = \"sqlite://{}\"\n",
        old.display()
    ));
    s.import("kept", 1234);
    // Glance's API uses the same file as its own database.
    let out = std::process::Command::new("sqlite3")
        .arg(&old)
        .arg("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.write_config("");
    // A command that writes (one that only reads moves nothing, and says nothing).
    let out = s.cli(&["reconcile"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = s.cli(&["list-cached"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("kept"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("also Glance's own"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        old.exists(),
        "Glance's database stays where Glance opens it"
    );
    assert!(!s.cache(glance_cached::config::DEFAULT_SQLITE_FILE).exists());
}
