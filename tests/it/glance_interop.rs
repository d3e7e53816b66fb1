//! Interop with the real Glance 33.0.0 `centralized_db` driver: both sides on one SQLite
//! file and one cache directory, each checking what the other wrote.
//!
//! Glance runs from the virtualenv made by `scripts/glance-venv`, through
//! `tests/glance/glance_cache.py`; `scripts/test` exports its python as
//! `GLANCE_CACHED_TEST_GLANCE_PYTHON`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use glance_cached::cache::{CacheDriver, CacheLayout, Expectations, PrunePolicy};
use glance_cached::db::{Db, DbOptions};
use serde_json::Value;

use crate::kit::glance::{can_reach, glance_manage, glance_python};
use crate::kit::servers::{Backend, NODE_LRU_INDEX_COLUMNS, TestDb, node_lru_index_columns};
use crate::kit::{id, md5_hex, test_bytes};

const NODE: &str = "http://interop-node:9292";

/// The real Glance driver on a cache directory and database.
struct Glance {
    python: PathBuf,
    cache_dir: PathBuf,
    db_url: String,
}

impl Glance {
    fn new(cache_dir: &Path, db_url: &str) -> Option<Glance> {
        let python = crate::kit::glance::glance_python()?;
        if !crate::kit::glance::can_reach(&python, db_url) {
            return None;
        }
        Some(Glance {
            python,
            cache_dir: cache_dir.to_path_buf(),
            db_url: crate::kit::glance::sqlalchemy_url(db_url),
        })
    }

    /// One driver command, to run.
    fn command(&self, args: &[&str]) -> Command {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/glance/glance_cache.py");
        let mut cmd = Command::new(&self.python);
        cmd.arg(script)
            .arg("--cache-dir")
            .arg(&self.cache_dir)
            .args(["--db-url", &self.db_url, "--node-url", NODE])
            .args(args)
            // Glance turns naive UTC into epoch seconds as local time.
            .env("TZ", "UTC");
        cmd
    }

    /// Runs one driver command; returns its JSON result.
    fn run(&self, args: &[&str]) -> Value {
        let out = self.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "glance {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// Our driver on `db_url`, and the database it was given (to close it).
async fn our_driver(cache_dir: &Path, db_url: &str) -> (CacheDriver, Db) {
    let db = Db::connect(db_url, &DbOptions::default()).await.unwrap();
    let driver = CacheDriver::configure(CacheLayout::open(cache_dir).unwrap(), db.clone(), NODE)
        .await
        .unwrap();
    (driver, db)
}

#[tokio::test]
async fn glance_schema_then_both_drivers_share_rows_files_and_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let cache_dir = tmp.path().join("cache");
    let db_url = format!("sqlite://{}", tmp.path().join("glance.db").display());
    let Some(glance) = Glance::new(&cache_dir, &db_url) else {
        return;
    };
    // Glance creates its whole schema first; we use its tables as they are.
    glance.run(&["db-sync"]);
    let (ours, ours_db) = our_driver(&cache_dir, &db_url).await;

    // Glance caches an image: we see the file, the row, and can read it.
    let from_glance = test_bytes(200_000, 5);
    let src = tmp.path().join("from-glance.raw");
    std::fs::write(&src, &from_glance).unwrap();
    glance.run(&["write", "img-glance", src.to_str().unwrap()]);
    let listed = ours.get_cached_images().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].image_id.as_str(), "img-glance");
    assert_eq!(listed[0].size, from_glance.len() as u64);
    assert!(
        (chrono::Utc::now() - listed[0].last_accessed)
            .num_seconds()
            .abs()
            < 120,
        "we read Glance's times"
    );
    drop(ours.open_for_read(&id("img-glance")).await.unwrap());
    assert_eq!(ours.get_hit_count(&id("img-glance")).await.unwrap(), 1);

    // We cache an image: Glance sees the file, the row, our times and our hits.
    let from_us = test_bytes(150_000, 9);
    let mut w = ours
        .open_for_write(&id("img-ours"), Expectations::default())
        .await
        .unwrap();
    w.write(&from_us).unwrap();
    ours.publish(w).await.unwrap();
    drop(ours.open_for_read(&id("img-ours")).await.unwrap());
    assert_eq!(
        glance.run(&["read", "img-ours"]),
        Value::String(md5_hex(&from_us))
    );
    assert_eq!(glance.run(&["hits", "img-ours"]), 2, "our hit and Glance's");
    assert_eq!(
        glance.run(&["hits", "img-glance"]),
        1,
        "Glance sees the hit we counted"
    );
    let glance_list = glance.run(&["list-cached"]);
    let rows = glance_list.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let our_row = rows.iter().find(|r| r["image_id"] == "img-ours").unwrap();
    assert_eq!(our_row["size"], from_us.len() as u64);
    assert_eq!(our_row["checksum"], md5_hex(&from_us).as_str());
    let accessed = our_row["last_accessed"].as_f64().unwrap();
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(
        (now - accessed).abs() < 120.0,
        "Glance reads our times as UTC: {accessed} vs {now}"
    );
    assert_eq!(
        glance.run(&["size"]),
        (from_glance.len() + from_us.len()) as u64
    );

    // Least recently used agrees: img-glance was read before img-ours.
    assert_eq!(glance.run(&["lru"])[0], "img-glance");
    assert_eq!(
        ours.get_least_recently_accessed()
            .await
            .unwrap()
            .unwrap()
            .0
            .as_str(),
        "img-glance"
    );

    // Queue both ways: Glance's marker shows in our queue, our queue in Glance's.
    assert_eq!(glance.run(&["queue", "q-glance"]), true);
    assert!(ours.queue_image(&id("q-ours")).await.unwrap());
    let ours_queue: Vec<_> = ours
        .get_queued_images()
        .await
        .unwrap()
        .into_iter()
        .map(|q| q.image_id.to_string())
        .collect();
    assert!(
        ours_queue.contains(&"q-glance".to_string()) && ours_queue.contains(&"q-ours".to_string())
    );
    let glance_queue = glance.run(&["list-queued"]);
    assert!(
        glance_queue
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q == "q-ours"),
        "{glance_queue}"
    );
    assert_eq!(
        glance.run(&["queue", "q-ours"]),
        false,
        "Glance sees it queued"
    );

    // Our prune evicts the least recently used; Glance's view stays consistent.
    let report = ours
        .prune(PrunePolicy {
            max_size: 160_000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(report.pruned.len(), 1);
    assert_eq!(report.pruned[0].0.as_str(), "img-glance");
    assert_eq!(glance.run(&["is-cached", "img-glance"]), false);
    assert_eq!(glance.run(&["list-cached"]).as_array().unwrap().len(), 1);

    // Glance deletes; we see it gone.
    glance.run(&["delete-cached", "img-ours"]);
    assert!(ours.get_cached_images().await.unwrap().is_empty());
    assert!(!ours.is_cached(&id("img-ours")));
    ours_db.close().await;
}

#[tokio::test]
async fn glance_driver_works_on_tables_we_created() {
    let tmp = tempfile::tempdir().unwrap();
    let cache_dir = tmp.path().join("cache");
    let db_url = format!("sqlite://{}", tmp.path().join("glance-cached.db").display());
    let Some(glance) = Glance::new(&cache_dir, &db_url) else {
        return;
    };
    // We create Glance's two cache tables in our own SQLite file; Glance's driver uses
    // them without its migrations.
    let (ours, ours_db) = our_driver(&cache_dir, &db_url).await;
    let data = test_bytes(64_000, 2);
    let mut w = ours
        .open_for_write(&id("ours-first"), Expectations::default())
        .await
        .unwrap();
    w.write(&data).unwrap();
    ours.publish(w).await.unwrap();
    let src = tmp.path().join("g.raw");
    std::fs::write(&src, b"glance bytes").unwrap();
    glance.run(&["write", "glance-second", src.to_str().unwrap()]);
    let rows = glance.run(&["list-cached"]);
    assert_eq!(rows.as_array().unwrap().len(), 2, "{rows}");
    assert_eq!(
        glance.run(&["read", "ours-first"]),
        Value::String(md5_hex(&data))
    );
    let ids: Vec<_> = ours
        .get_cached_images()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.image_id.to_string())
        .collect();
    assert_eq!(ids, ["glance-second", "ours-first"]);
    assert_eq!(
        ours.get_hit_count(&id("ours-first")).await.unwrap(),
        1,
        "Glance's hit counted in our view"
    );

    // SQLAlchemy's text format on disk, so SQLite's text order is time order.
    let db = sqlx::SqlitePool::connect(&db_url).await.unwrap();
    let stamps: Vec<String> = sqlx::query_scalar("SELECT last_accessed FROM cached_images")
        .fetch_all(&db)
        .await
        .unwrap();
    for s in &stamps {
        let shape_ok = s.len() == 26
            && chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.6f").is_ok();
        assert!(shape_ok, "stored time {s:?} is not SQLAlchemy's format");
    }
    db.close().await;
    ours_db.close().await;
}

/// Glance keeps oslo lock files in the cache root (its driver sets oslo's lock_path to
/// the cache directory). Taken by the real Glance while the daemon runs, they are never
/// adopted, listed, counted, pruned or deleted.
#[test]
fn glance_lock_files_taken_while_the_daemon_runs_are_never_images() {
    use crate::kit::daemon::eventually;
    use crate::kit::daemon::{SOON, Setup};

    let s = Setup::new("max_size = 3000");
    let db_url = format!(
        "sqlite://{}",
        s.cache(".glance-cached/glance-cached.db").display()
    );
    let Some(glance) = Glance::new(&s.cache(""), &db_url) else {
        return;
    };
    s.import("real-a", 1000);
    let d = s.start();
    let ready = s.tmp.path().join("locked");
    let release = s.tmp.path().join("release");
    // Glance lets go when the test ends, whether it passes or not.
    struct Release<'a>(&'a std::path::Path);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            let _ = std::fs::write(self.0, b"");
        }
    }
    let _release = Release(&release);
    let holder = glance
        .command(&[
            "hold-locks",
            ready.to_str().unwrap(),
            release.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(60), "Glance holds its locks", || {
        ready.exists()
    });
    let locks = [
        "glance-cache",
        "glance-cache-clean",
        "glance-cache-prune",
        "tasks",
    ];
    for lock in locks {
        assert!(s.cache(lock).is_file(), "Glance made {lock}");
        // Older than every image: the first victim if it were taken for one.
        crate::kit::age_file(&s.cache(lock), 7200);
    }
    // The daemon's pruner runs past them: two imports take the cache over max_size.
    s.import("real-b", 1000);
    s.import("real-c", 1500);
    eventually(SOON, "the least recently used image is pruned", || {
        !s.cache("real-a").exists()
    });
    for lock in locks {
        assert!(s.cache(lock).is_file(), "the pruner left {lock} alone");
    }
    // The commands.
    let out = s.cli(&["reconcile"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("reconciled: 0 adopted"), "{text}");
    assert_eq!(s.cached_ids(), ["real-b", "real-c"]);
    let out = s.cli(&["size", "--json"]);
    let size: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(size["images"], 2, "{size}");
    assert_eq!(size["size"], 2500, "{size}");
    for lock in locks {
        let out = s.cli(&["delete-cached", lock]);
        assert!(!out.status.success(), "{lock} is refused as an image id");
    }
    let out = s.cli(&["delete-cached", "--all"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("deleted 2 cached images"), "{text}");
    for lock in locks {
        assert!(s.cache(lock).is_file(), "{lock} is still there");
    }
    std::fs::write(&release, b"").unwrap();
    let out = holder.wait_with_output().unwrap();
    assert!(out.status.success());
    // Glance sees no rows for them either.
    assert_eq!(glance.run(&["list-cached"]), serde_json::json!([]));
    d.stop();
}

crate::kit::servers::on_every_backend!(our_index_survives_glance_migrations_run_after_it);

/// Our one addition to Glance's schema, the per-node index on `cached_images`, is made
/// on the table Glance's migrations made, and outlives the migrations Glance runs after
/// it (a rolling upgrade's `db sync` after its expand, then `db upgrade`, `db sync` and
/// `db check` again); Glance's driver works on the table that has it.
async fn our_index_survives_glance_migrations_run_after_it(b: Backend) {
    let Some(db) = TestDb::new(b).await else {
        return;
    };
    let Some(python) = glance_python() else {
        return;
    };
    if !can_reach(&python, &db.url) {
        return;
    }
    let manage = |args: &[&str]| {
        let out = glance_manage(&python, &db.url, args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "glance-manage {args:?}: {text}");
        text
    };
    // Glance's cache tables and none of its later migrations, as after a rolling
    // upgrade's expand: the oldest Glance schema we start on.
    manage(&["db", "upgrade", "--version", "2024_1_expand01"]);
    let tmp = tempfile::tempdir().unwrap();
    let cache_dir = tmp.path().join("cache");
    let (ours, ours_db) = our_driver(&cache_dir, &db.url).await;
    let columns = NODE_LRU_INDEX_COLUMNS;
    assert_eq!(node_lru_index_columns(&db.url, b).await, columns);

    // The rest of Glance's migrations run after ours, and again.
    manage(&["db", "sync"]);
    let heads = crate::kit::servers::query_texts(
        &db.url,
        b,
        "SELECT version_num FROM alembic_version",
        "version_num",
    )
    .await;
    assert!(
        heads.contains(&Some("2024_1_contract01".into())),
        "{heads:?}"
    );
    manage(&["db", "upgrade"]);
    assert!(manage(&["db", "sync"]).contains("up to date"));
    // `db check` refuses PostgreSQL (Glance's rolling upgrades are MySQL and SQLite only).
    if b != Backend::Postgres {
        assert!(manage(&["db", "check"]).contains("up to date"));
    }
    assert_eq!(node_lru_index_columns(&db.url, b).await, columns);

    // Glance's driver and ours on the table with the index; our next start finds it.
    let glance = Glance::new(&cache_dir, &db.url).unwrap();
    let src = tmp.path().join("g.raw");
    std::fs::write(&src, test_bytes(10_000, 4)).unwrap();
    glance.run(&["write", "img-glance", src.to_str().unwrap()]);
    assert_eq!(glance.run(&["list-cached"]).as_array().unwrap().len(), 1);
    let listed = ours.get_cached_images().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].image_id.as_str(), "img-glance");
    ours_db.close().await;
    let (_again, again_db) = our_driver(&cache_dir, &db.url).await;
    assert_eq!(node_lru_index_columns(&db.url, b).await, columns);
    again_db.close().await;
    db.drop_database().await;
}
