//! The driver suite: every method and behaviour of the specification's table, written
//! once and run against SQLite, PostgreSQL and MariaDB.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, TimeZone, Utc};
use glance_cached::cache::{Area, CacheError, CleanPolicy, Expectations, PrunePolicy};
use glance_cached::cache::{CacheDriver, CacheLayout};
use glance_cached::db::{Db, DbOptions, DbTime, NodeDb};
use glance_cached::digest::HashAlgo;

use crate::kit::servers::{Backend, TestCache, TestDb, run_sql};
use crate::kit::{age_file, id, md5_hex, sha512_hex, test_bytes};

/// Caches `data` as `image` through `open_for_write`.
async fn cache(t: &TestCache, image: &str, data: &[u8]) {
    let mut w = t
        .driver
        .open_for_write(&id(image), Expectations::default())
        .await
        .unwrap();
    w.write(data).unwrap();
    t.driver.publish(w).await.unwrap();
}

/// Sets an image's `last_accessed` to `secs` after the epoch (through a hit).
async fn accessed_at(t: &TestCache, image: &str, secs: i64) {
    let when = DbTime::from_utc(Utc.timestamp_opt(secs, 0).unwrap());
    assert!(t.node_db.record_hit(image, when).await.unwrap());
}

crate::kit::servers::on_every_backend!(
    configure_creates_layout_and_is_idempotent,
    cached_being_cached_and_cacheable,
    queue_image_follows_glance_order_of_checks,
    queued_images_are_ordered_and_markers_adopted,
    queue_states_are_counted_for_the_metrics,
    delete_queued_removes_rows_and_markers,
    a_marker_removed_through_glance_dequeues_its_row,
    one_pass_adopts_hundreds_of_markers_and_revives_a_requeued_failure,
    a_request_right_after_a_failure_revives_it,
    open_for_write_publishes_verified_image,
    open_for_write_failures_never_publish,
    concurrent_writers_of_one_image,
    recache_refreshes_row,
    open_for_read_counts_hits,
    hit_count_rules,
    cached_images_are_listed_by_id,
    delete_cached_and_delete_all,
    least_recently_accessed,
    lru_batches_page_through_ties_once_in_order,
    cache_size_counts_only_images,
    prune_evicts_least_recently_accessed,
    prune_edge_cases,
    prune_low_watermark,
    clean_removes_invalid_and_stalled_only,
    clean_never_follows_symlinks,
    two_nodes_share_a_database_without_seeing_each_other,
    glance_tables_are_created_only_where_allowed,
);

async fn configure_creates_layout_and_is_idempotent(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    for sub in ["incomplete", "invalid", "queue"] {
        let meta = std::fs::symlink_metadata(t.path(sub)).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o777, 0o750, "{sub}");
    }
    // A second configure on the same database and directory finds the same node.
    let again = NodeDb::configure(t.db.connect().await, t.node_db.url())
        .await
        .unwrap();
    assert_eq!(again.node(), t.node_db.node());
    again.db().close().await;
    t.finish().await;
}

async fn cached_being_cached_and_cacheable(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    let a = id("img-a");
    assert!(!t.driver.is_cached(&a) && !t.driver.is_being_cached(&a) && t.driver.is_cacheable(&a));
    let mut w = t
        .driver
        .open_for_write(&a, Expectations::default())
        .await
        .unwrap();
    assert!(t.driver.is_being_cached(&a) && !t.driver.is_cacheable(&a) && !t.driver.is_cached(&a));
    w.write(b"data").unwrap();
    t.driver.publish(w).await.unwrap();
    assert!(t.driver.is_cached(&a) && !t.driver.is_being_cached(&a) && !t.driver.is_cacheable(&a));
    t.finish().await;
}

async fn queue_image_follows_glance_order_of_checks(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    cache(&t, "cached", b"x").await;
    assert!(!t.driver.queue_image(&id("cached")).await.unwrap());
    let _w = t
        .driver
        .open_for_write(&id("writing"), Expectations::default())
        .await
        .unwrap();
    assert!(!t.driver.queue_image(&id("writing")).await.unwrap());
    assert!(t.driver.queue_image(&id("fresh")).await.unwrap());
    assert!(
        t.path("queue/fresh").is_file(),
        "marker kept for Glance's GET /v2/cache"
    );
    assert!(t.driver.is_queued(&id("fresh")).await.unwrap());
    assert!(
        !t.driver.queue_image(&id("fresh")).await.unwrap(),
        "queued twice"
    );
    // A marker alone (Glance's PUT /v2/cache/{id}) counts as queued.
    std::fs::write(t.path("queue/by-glance"), b"").unwrap();
    assert!(t.driver.is_queued(&id("by-glance")).await.unwrap());
    assert!(!t.driver.queue_image(&id("by-glance")).await.unwrap());
    // The marker is all queue_image writes (as Glance's): the row comes from the
    // adoption of markers, which the daemon's queue loop runs.
    assert_eq!(t.node_db.count_queue_states().await.unwrap(), (0, 0));
    assert_eq!(t.driver.adopt_queue_markers().await.unwrap(), 2);
    assert_eq!(t.node_db.count_queue_states().await.unwrap(), (2, 0));
    // A row alone counts as queued too.
    std::fs::remove_file(t.path("queue/fresh")).unwrap();
    assert!(t.driver.is_queued(&id("fresh")).await.unwrap());
    drop(_w);
    t.finish().await;
}

async fn queued_images_are_ordered_and_markers_adopted(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    for image in ["q-b", "q-a", "q-c"] {
        assert!(t.driver.queue_image(&id(image)).await.unwrap());
        // Distinct queued times even on second-resolution columns.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Glance's marker from an hour ago goes first, with its mtime as the queued time.
    std::fs::write(t.path("queue/old-marker"), b"").unwrap();
    age_file(&t.path("queue/old-marker"), 3600);
    // Names that are not ids, symlinks and directories in queue/ are ignored.
    std::fs::write(t.path("queue/not..an id"), b"").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", t.path("queue/link")).unwrap();
    std::fs::create_dir(t.path("queue/subdir")).unwrap();
    let queued = t.driver.get_queued_images().await.unwrap();
    let ids: Vec<_> = queued.iter().map(|q| q.image_id.to_string()).collect();
    assert_eq!(ids[0], "old-marker");
    assert_eq!(ids.len(), 4, "{ids:?}");
    // Same-second rows (MySQL-style resolution) still come out deterministically.
    let mut rest = ids[1..].to_vec();
    rest.sort();
    assert_eq!(rest, ["q-a", "q-b", "q-c"]);
    let age = Utc::now() - queued[0].queued_at;
    assert!(
        age.num_seconds() >= 3590,
        "adopted with the marker's mtime: {age}"
    );
    assert!(
        queued
            .iter()
            .all(|q| q.attempts == 0 && q.last_error.is_none())
    );
    t.finish().await;
}

/// The metrics' queued and failed gauges: one query, this node's rows only.
async fn queue_states_are_counted_for_the_metrics(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    assert_eq!(t.node_db.count_queue_states().await.unwrap(), (0, 0));
    for image in ["s-a", "s-b", "s-c"] {
        t.driver.queue_image(&id(image)).await.unwrap();
    }
    t.driver.adopt_queue_markers().await.unwrap();
    run_sql(
        &t.db.url,
        b,
        "UPDATE glance_cached_queue SET state = 'failed' WHERE image_id = 's-b'",
    )
    .await
    .unwrap();
    assert_eq!(t.node_db.count_queue_states().await.unwrap(), (2, 1));
    let other = TestCache::on(t.db.shared(), "http://node-b:9292").await;
    assert_eq!(other.node_db.count_queue_states().await.unwrap(), (0, 0));
    t.finish().await;
}

async fn delete_queued_removes_rows_and_markers(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    for image in ["d1", "d2", "d3"] {
        t.driver.queue_image(&id(image)).await.unwrap();
    }
    std::fs::write(t.path("queue/marker-only"), b"").unwrap();
    assert_eq!(t.driver.delete_queued_image(&id("d1")).await.unwrap(), 1);
    assert!(!t.path("queue/d1").exists());
    assert!(!t.driver.is_queued(&id("d1")).await.unwrap());
    assert_eq!(t.driver.delete_queued_image(&id("d1")).await.unwrap(), 0);
    assert_eq!(t.driver.delete_all_queued_images().await.unwrap(), 3);
    assert!(t.driver.get_queued_images().await.unwrap().is_empty());
    assert_eq!(std::fs::read_dir(t.path("queue")).unwrap().count(), 0);
    t.finish().await;
}

/// Queues `image` alone, claims it and records its failure at `failed_at`, as a
/// prefetcher that gave up on it would.
async fn fail_queued(t: &TestCache, image: &str, failed_at: DateTime<Utc>) {
    assert!(t.driver.queue_image(&id(image)).await.unwrap());
    assert_eq!(t.driver.adopt_queue_markers().await.unwrap(), 1);
    let claimed = t
        .driver
        .claim_next("worker", Utc::now(), Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.image_id.as_str(), image);
    t.driver
        .give_up(&id(image), 1, failed_at, "HTTP 404")
        .await
        .unwrap();
}

/// The queue loop's pass over many new markers (more than one statement's rows): each
/// gets its row with its mtime as the queued time, a failed image queued again is
/// revived, a marker of a cached image goes, and rows queued already are not counted.
async fn one_pass_adopts_hundreds_of_markers_and_revives_a_requeued_failure(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    // A failure recorded an hour ago, then queued again (a marker newer than it).
    fail_queued(&t, "gave-up", Utc::now() - chrono::Duration::hours(1)).await;
    assert_eq!(t.node_db.count_queue_states().await.unwrap(), (0, 1));
    assert!(t.driver.queue_image(&id("gave-up")).await.unwrap());
    // One queued and adopted before the pass: not counted again.
    assert!(t.driver.queue_image(&id("early")).await.unwrap());
    assert_eq!(t.driver.adopt_queue_markers().await.unwrap(), 2);
    let images: Vec<String> = (0..600).map(|i| format!("many-{i:03}")).collect();
    for image in &images {
        assert!(t.driver.queue_image(&id(image)).await.unwrap());
    }
    // Glance's marker of an image cached here: stale, never queued.
    cache(&t, "cached-here", b"c").await;
    std::fs::write(t.path("queue/cached-here"), b"").unwrap();
    // An hour-old marker keeps its time.
    age_file(&t.path("queue/many-000"), 3600);
    assert_eq!(t.driver.adopt_queue_markers().await.unwrap(), 600);
    assert!(!t.path("queue/cached-here").exists());
    assert_eq!(t.node_db.count_queue_states().await.unwrap(), (602, 0));
    let queued = t.driver.get_queued_images().await.unwrap();
    assert_eq!(queued[0].image_id.as_str(), "many-000", "its mtime first");
    assert!(queued[0].queued_at < Utc::now() - chrono::Duration::minutes(59));
    let mut ids: Vec<String> = queued.iter().map(|q| q.image_id.to_string()).collect();
    ids.sort();
    let mut expected = images.clone();
    expected.extend(["early".to_owned(), "gave-up".to_owned()]);
    expected.sort();
    assert_eq!(ids, expected);
    let revived = queued.iter().find(|q| q.image_id.as_str() == "gave-up");
    assert_eq!(
        revived.map(|q| (q.attempts, q.state.as_str())),
        Some((0, "queued"))
    );
    assert_eq!(t.driver.adopt_queue_markers().await.unwrap(), 0);
    t.finish().await;
}

/// A failed image queued again at once, by `queue_image` or by a marker Glance's way
/// (the kernel's stamp, up to a tick behind the failure's time), is revived: a marker
/// made after the failure is newer than it. Rounds, since one may fall on a tick.
async fn a_request_right_after_a_failure_revives_it(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    for round in 0..12 {
        let image = format!("again-{round:02}");
        fail_queued(&t, &image, Utc::now()).await;
        if round % 2 == 0 {
            assert!(t.driver.queue_image(&id(&image)).await.unwrap());
        } else {
            std::fs::File::create(t.path(&format!("queue/{image}"))).unwrap();
        }
        assert_eq!(
            t.driver.adopt_queue_markers().await.unwrap(),
            1,
            "round {round}: the request after the failure revives {image}"
        );
        assert_eq!(t.node_db.count_queue_states().await.unwrap(), (1, 0));
        assert!(t.driver.delete_queued_image(&id(&image)).await.unwrap() > 0);
    }
    t.finish().await;
}

/// The queue is shared both ways: a queued row whose marker Glance removed is dequeued
/// (at the next pass over the markers, or when a prefetcher claims it), unless it is
/// being downloaded or failed.
async fn a_marker_removed_through_glance_dequeues_its_row(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    for image in ["m1", "m2", "m3", "m4"] {
        assert!(t.driver.queue_image(&id(image)).await.unwrap());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    t.driver.adopt_queue_markers().await.unwrap();
    let ttl = Duration::from_secs(60);
    let claimed = t
        .driver
        .claim_next("worker", Utc::now(), ttl)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.image_id.as_str(), "m1");
    // Glance's DELETE /v2/cache/{id} on m1 (being downloaded) and m2.
    for image in ["m1", "m2"] {
        std::fs::remove_file(t.path(&format!("queue/{image}"))).unwrap();
    }
    let ids = |q: Vec<glance_cached::cache::QueuedImage>| -> Vec<String> {
        q.into_iter().map(|q| q.image_id.to_string()).collect()
    };
    assert_eq!(
        ids(t.driver.get_queued_images().await.unwrap()),
        ["m1", "m3", "m4"],
        "the claimed download keeps its row"
    );
    // Removed after the last pass: the prefetcher's claim skips it.
    std::fs::remove_file(t.path("queue/m3")).unwrap();
    let next = t
        .driver
        .claim_next("worker", Utc::now(), ttl)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.image_id.as_str(), "m4");
    assert!(!t.driver.is_queued(&id("m3")).await.unwrap());
    // A failed row loses its marker on purpose and keeps its reason.
    t.driver
        .give_up(&id("m4"), 1, Utc::now(), "HTTP 404")
        .await
        .unwrap();
    let rows = t.driver.get_queued_images().await.unwrap();
    assert!(
        rows.iter()
            .any(|q| q.image_id.as_str() == "m4" && q.state.as_str() == "failed"),
        "{rows:?}"
    );
    t.finish().await;
}

/// Glance's cache tables are created only when the database is declared glance-cached's
/// own: made in a database Glance later syncs, they would break `glance-manage db sync`.
async fn glance_tables_are_created_only_where_allowed(b: Backend) {
    let Some(db) = TestDb::new(b).await else {
        return;
    };
    let configure = |create_glance_tables: bool| {
        let url = db.url.clone();
        async move {
            let options = DbOptions {
                create_glance_tables,
                ..DbOptions::default()
            };
            let db = Db::connect(&url, &options).await.unwrap();
            let dir = tempfile::tempdir().unwrap();
            let result = CacheDriver::configure(
                CacheLayout::open(dir.path().join("c")).unwrap(),
                db.clone(),
                "http://n:9292",
            )
            .await;
            db.close().await;
            let has_cache_table = run_sql(&url, b, "SELECT COUNT(*) FROM cached_images")
                .await
                .is_ok();
            (result, has_cache_table)
        }
    };
    // An empty database, not declared ours: refused, and nothing is created in it.
    let (result, has_cache_table) = configure(false).await;
    let err = result.err().expect("refused").to_string();
    assert!(
        err.contains("glance-manage db sync") && err.contains("create_glance_tables"),
        "{err}"
    );
    assert!(!has_cache_table, "nothing is created in a refused database");
    // Glance's schema without the cache tables (a Glance older than 2024.1): refused
    // whatever the setting, with the upgrade to run.
    run_sql(
        &db.url,
        b,
        "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)",
    )
    .await
    .unwrap();
    for allowed in [false, true] {
        let err = configure(allowed)
            .await
            .0
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("Glance 2024.1"), "{err}");
    }
    // Declared ours: created. Present, they are used whatever the setting.
    run_sql(&db.url, b, "DROP TABLE alembic_version")
        .await
        .unwrap();
    let (result, has_cache_table) = configure(true).await;
    result.unwrap();
    assert!(has_cache_table);
    configure(false).await.0.unwrap();
    db.drop_database().await;
}

async fn open_for_write_publishes_verified_image(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    let data = test_bytes(300_000, 7);
    t.driver.queue_image(&id("pub")).await.unwrap();
    let expect = Expectations {
        size: Some(data.len() as u64),
        md5: Some(md5_hex(&data)),
        os_hash: Some((HashAlgo::Sha512, sha512_hex(&data))),
        ..Default::default()
    };
    let mut w = t.driver.open_for_write(&id("pub"), expect).await.unwrap();
    for chunk in data.chunks(65_536) {
        w.write(chunk).unwrap();
    }
    let published = t.driver.publish(w).await.unwrap();
    assert_eq!(published.size, data.len() as u64);
    assert_eq!(published.md5, md5_hex(&data));
    assert_eq!(std::fs::read(t.path("pub")).unwrap(), data);
    let mode = std::fs::metadata(t.path("pub"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
    assert!(!t.path("incomplete/pub").exists());
    // Publishing takes the image off the queue: row and marker.
    assert!(!t.path("queue/pub").exists());
    assert!(!t.driver.is_queued(&id("pub")).await.unwrap());
    let images = t.driver.get_cached_images().await.unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].size, data.len() as u64);
    assert_eq!(images[0].hits, 0);
    assert_eq!(images[0].checksum.as_deref(), Some(md5_hex(&data).as_str()));
    assert!((Utc::now() - images[0].last_accessed).num_seconds().abs() < 60);
    t.finish().await;
}

async fn open_for_write_failures_never_publish(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    let data = test_bytes(10_000, 1);
    let cases: Vec<(&str, Expectations, &[u8])> = vec![
        (
            "short",
            Expectations {
                size: Some(20_000),
                ..Default::default()
            },
            &data,
        ),
        (
            "bad-md5",
            Expectations {
                md5: Some(md5_hex(b"other")),
                ..Default::default()
            },
            &data,
        ),
        (
            "bad-sha",
            Expectations {
                os_hash: Some((HashAlgo::Sha512, sha512_hex(b"other"))),
                ..Default::default()
            },
            &data,
        ),
    ];
    for (name, expect, bytes) in cases {
        let mut w = t.driver.open_for_write(&id(name), expect).await.unwrap();
        w.write(bytes).unwrap();
        let err = t.driver.publish(w).await.unwrap_err();
        assert!(
            matches!(err, CacheError::Verification { .. }),
            "{name}: {err}"
        );
        assert!(
            !t.driver.is_cached(&id(name)),
            "{name} must not be published"
        );
        assert!(!t.path(&format!("incomplete/{name}")).exists());
        assert!(
            t.path(&format!("invalid/{name}")).is_file(),
            "{name} kept in invalid/"
        );
    }
    // A body larger than declared fails on the write that overflows.
    let mut w = t
        .driver
        .open_for_write(
            &id("long"),
            Expectations {
                size: Some(100),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    w.write(&data[..60]).unwrap();
    assert!(matches!(
        w.write(&data[60..120]),
        Err(CacheError::TooLarge { .. })
    ));
    drop(w);
    assert!(!t.driver.is_cached(&id("long")) && t.path("invalid/long").is_file());
    // A writer dropped without commit (an abandoned download).
    let mut w = t
        .driver
        .open_for_write(&id("dropped"), Expectations::default())
        .await
        .unwrap();
    w.write(b"partial").unwrap();
    drop(w);
    assert!(!t.driver.is_cached(&id("dropped")) && t.path("invalid/dropped").is_file());
    assert!(t.driver.get_cached_images().await.unwrap().is_empty());
    t.finish().await;
}

async fn concurrent_writers_of_one_image(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    let mut first = t
        .driver
        .open_for_write(&id("race"), Expectations::default())
        .await
        .unwrap();
    first.write(b"first writer's bytes").unwrap();
    let second = t
        .driver
        .open_for_write(&id("race"), Expectations::default())
        .await;
    assert!(matches!(second, Err(CacheError::AlreadyBeingWritten(_))));
    // The loser touched nothing: the winner's file is intact and publishes.
    first.write(b", more").unwrap();
    t.driver.publish(first).await.unwrap();
    assert_eq!(
        std::fs::read(t.path("race")).unwrap(),
        b"first writer's bytes, more"
    );
    assert!(!t.path("invalid/race").exists());
    // Many tasks at once: exactly one wins.
    let mut tasks = Vec::new();
    for n in 0..8u8 {
        let d = t.driver.clone();
        tasks.push(tokio::spawn(async move {
            match d
                .open_for_write(&id("race2"), Expectations::default())
                .await
            {
                Ok(mut w) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    w.write(&[n; 1000]).unwrap();
                    d.publish(w).await.unwrap();
                    true
                }
                Err(CacheError::AlreadyBeingWritten(_)) => false,
                Err(e) => panic!("{e}"),
            }
        }));
    }
    let mut winners = 0;
    for task in tasks {
        winners += task.await.unwrap() as usize;
    }
    assert_eq!(winners, 1);
    let bytes = std::fs::read(t.path("race2")).unwrap();
    assert_eq!(bytes.len(), 1000);
    assert!(
        bytes.iter().all(|b| *b == bytes[0]),
        "one writer's bytes only"
    );
    t.finish().await;
}

async fn recache_refreshes_row(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    cache(&t, "again", b"small").await;
    accessed_at(&t, "again", 1_000_000).await;
    cache(&t, "again", b"a larger body").await;
    let images = t.driver.get_cached_images().await.unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].size, 13);
    assert_eq!(
        images[0].checksum.as_deref(),
        Some(md5_hex(b"a larger body").as_str())
    );
    assert!(
        images[0].last_accessed.timestamp() > 1_000_000,
        "times refreshed"
    );
    assert_eq!(std::fs::read(t.path("again")).unwrap(), b"a larger body");
    t.finish().await;
}

async fn open_for_read_counts_hits(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    cache(&t, "readme", b"hello").await;
    accessed_at(&t, "readme", 1_000_000).await; // hit 1, old access time
    let mut f = t.driver.open_for_read(&id("readme")).await.unwrap();
    let mut s = String::new();
    std::io::Read::read_to_string(&mut f, &mut s).unwrap();
    assert_eq!(s, "hello");
    assert_eq!(t.driver.get_hit_count(&id("readme")).await.unwrap(), 2);
    let img = &t.driver.get_cached_images().await.unwrap()[0];
    assert!(
        img.last_accessed.timestamp() > 1_000_000,
        "last_accessed moved to now"
    );
    // Glance counts the hit even when the read fails: the file is gone, the row stays.
    std::fs::remove_file(t.path("readme")).unwrap();
    assert!(matches!(
        t.driver.open_for_read(&id("readme")).await,
        Err(CacheError::NotCached(_))
    ));
    assert_eq!(t.node_db.hit_count("readme").await.unwrap(), 3);
    // A symlink planted as an image is refused, not followed.
    let outside = t.dir.path().join("secret");
    std::fs::write(&outside, b"secret").unwrap();
    std::os::unix::fs::symlink(&outside, t.path("planted")).unwrap();
    assert!(t.driver.open_for_read(&id("planted")).await.is_err());
    t.finish().await;
}

async fn hit_count_rules(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    cache(&t, "h", b"x").await;
    for _ in 0..3 {
        drop(t.driver.open_for_read(&id("h")).await.unwrap());
    }
    assert_eq!(t.driver.get_hit_count(&id("h")).await.unwrap(), 3);
    // No file: 0, whatever the row says.
    std::fs::rename(t.path("h"), t.dir.path().join("h.moved")).unwrap();
    assert_eq!(t.driver.get_hit_count(&id("h")).await.unwrap(), 0);
    // A file without a row: 0.
    std::fs::write(t.path("norow"), b"x").unwrap();
    assert_eq!(t.driver.get_hit_count(&id("norow")).await.unwrap(), 0);
    t.finish().await;
}

async fn cached_images_are_listed_by_id(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    for image in ["m", "c", "x", "a"] {
        cache(&t, image, image.as_bytes()).await;
    }
    let ids: Vec<_> = t
        .driver
        .get_cached_images()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.image_id.to_string())
        .collect();
    assert_eq!(ids, ["a", "c", "m", "x"]);
    t.finish().await;
}

async fn delete_cached_and_delete_all(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    for image in ["d-1", "d-2", "d-3"] {
        cache(&t, image, b"bytes").await;
    }
    assert!(t.driver.delete_cached_image(&id("d-1")).await.unwrap());
    assert!(!t.driver.is_cached(&id("d-1")));
    assert!(!t.driver.delete_cached_image(&id("d-1")).await.unwrap());
    // Lock files, the SQLite database, strays and symlinks survive delete-all.
    std::fs::write(t.path("glance-cache-prune"), b"").unwrap();
    std::fs::write(t.path("other.db"), b"db").unwrap();
    std::fs::write(t.path("stray.txt"), b"s").unwrap();
    let outside = t.dir.path().join("outside");
    std::fs::write(&outside, b"keep").unwrap();
    std::os::unix::fs::symlink(&outside, t.path("linked")).unwrap();
    assert_eq!(t.driver.delete_all_cached_images().await.unwrap(), 2);
    assert!(t.driver.get_cached_images().await.unwrap().is_empty());
    for kept in ["glance-cache-prune", "other.db", "stray.txt", "linked"] {
        assert!(
            std::fs::symlink_metadata(t.path(kept)).is_ok(),
            "{kept} kept"
        );
    }
    assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
    t.finish().await;
}

async fn least_recently_accessed(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    assert_eq!(t.driver.get_least_recently_accessed().await.unwrap(), None);
    cache(&t, "new", b"12345").await;
    cache(&t, "old", b"123").await;
    accessed_at(&t, "old", 1_000_000).await;
    assert_eq!(
        t.driver.get_least_recently_accessed().await.unwrap(),
        Some((id("old"), 3))
    );
    std::fs::remove_file(t.path("old")).unwrap();
    assert_eq!(
        t.driver.get_least_recently_accessed().await.unwrap(),
        Some((id("old"), 0)),
        "a row without its file reports size 0"
    );
    t.finish().await;
}

async fn lru_batches_page_through_ties_once_in_order(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    // Ties on last_accessed across the batches' edges (batches of 2): the cursor's
    // time bounds the next batch and its row id breaks the tie.
    let times = [
        ("t-a", 20),
        ("t-b", 10),
        ("t-c", 20),
        ("t-d", 30),
        ("t-e", 20),
        ("t-f", 10),
        ("t-g", 20),
    ];
    for (image, _) in times {
        cache(&t, image, b"x").await;
    }
    for (image, secs) in times {
        accessed_at(&t, image, 1_000_000 + secs).await;
    }
    let mut expected: Vec<(i64, i64, String)> = Vec::new();
    for row in t.node_db.cached_images().await.unwrap() {
        let secs = times
            .iter()
            .find(|(image, _)| *image == row.image_id.as_str())
            .unwrap()
            .1;
        expected.push((secs, row.id, row.image_id.to_string()));
    }
    expected.sort();
    let expected: Vec<String> = expected.into_iter().map(|(_, _, image)| image).collect();
    let (mut paged, mut cursor) = (Vec::new(), None);
    loop {
        let batch = t.node_db.least_recently_accessed(cursor, 2).await.unwrap();
        paged.extend(batch.rows.iter().map(|r| r.image_id.to_string()));
        match batch.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
        assert!(paged.len() <= times.len(), "paging ends: {paged:?}");
    }
    assert_eq!(
        paged, expected,
        "every row once, in (last_accessed, id) order"
    );
    t.finish().await;
}

async fn cache_size_counts_only_images(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    cache(&t, "s1", &[0; 100]).await;
    cache(&t, "s2", &[0; 50]).await;
    std::fs::write(t.path("glance-cache-clean"), b"").unwrap();
    std::fs::write(t.path("x.db"), vec![0; 1000]).unwrap();
    std::fs::write(t.path("bad name"), vec![0; 1000]).unwrap();
    std::fs::write(t.path("incomplete/s3"), vec![0; 1000]).unwrap();
    let big = t.dir.path().join("big");
    std::fs::write(&big, vec![0; 5000]).unwrap();
    std::os::unix::fs::symlink(&big, t.path("link")).unwrap();
    assert_eq!(t.driver.get_cache_size().await.unwrap(), 150);
    t.finish().await;
}

async fn prune_evicts_least_recently_accessed(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    // Five 100-byte images accessed at t=1..5 (e1 oldest), then a new one.
    for (n, image) in ["e3", "e1", "e5", "e2", "e4"].iter().enumerate() {
        cache(&t, image, &test_bytes(100, n as u8)).await;
    }
    for image in ["e1", "e2", "e3", "e4", "e5"] {
        let n: i64 = image[1..].parse().unwrap();
        accessed_at(&t, image, 1_000_000 + n * 10).await;
    }
    cache(&t, "newest", &test_bytes(100, 9)).await; // counts as just accessed
    let report = t
        .driver
        .prune(PrunePolicy {
            max_size: 350,
            ..Default::default()
        })
        .await
        .unwrap();
    let pruned: Vec<_> = report.pruned.iter().map(|(i, _)| i.to_string()).collect();
    assert_eq!(pruned, ["e1", "e2", "e3"]);
    assert_eq!(report.bytes(), 300);
    assert_eq!((report.size_before, report.size_after), (600, 300));
    let left: Vec<_> = t
        .driver
        .get_cached_images()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.image_id.to_string())
        .collect();
    assert_eq!(left, ["e4", "e5", "newest"]);
    assert_eq!(t.driver.get_cache_size().await.unwrap(), 300);
    // Under the limit: nothing to do.
    let report = t
        .driver
        .prune(PrunePolicy {
            max_size: 300,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(report.files(), 0);
    // max_size = 0 empties the cache.
    let report = t
        .driver
        .prune(PrunePolicy {
            max_size: 0,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(report.files(), 3);
    assert!(t.driver.get_cached_images().await.unwrap().is_empty());
    assert_eq!(t.driver.get_cache_size().await.unwrap(), 0);
    t.finish().await;
}

async fn prune_edge_cases(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    // No rows at all, only files that are not images: terminates, deletes nothing.
    std::fs::write(t.path("glance-cache-prune"), b"").unwrap();
    let report = t
        .driver
        .prune(PrunePolicy {
            max_size: 0,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(report.files(), 0);
    assert!(t.path("glance-cache-prune").exists());
    // A row whose file is gone frees nothing and is dropped; a file without a row is
    // adopted (aged by its mtime) and so becomes a candidate.
    cache(&t, "ghost", &[1; 100]).await;
    std::fs::remove_file(t.path("ghost")).unwrap();
    cache(&t, "kept", &[2; 100]).await;
    std::fs::write(t.path("orphan"), vec![3; 100]).unwrap();
    age_file(&t.path("orphan"), 86_400 * 365);
    let report = t
        .driver
        .prune(PrunePolicy {
            max_size: 150,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(report.adopted, 1);
    let pruned: Vec<_> = report.pruned.iter().map(|(i, _)| i.to_string()).collect();
    assert_eq!(
        pruned,
        ["orphan"],
        "the year-old orphan is least recently used"
    );
    assert!(t.driver.is_cached(&id("kept")));
    // Files the pruner cannot delete are skipped, not retried forever.
    let report = t
        .driver
        .prune(PrunePolicy {
            max_size: 0,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(report.files(), 1);
    assert_eq!(report.rows_without_file, 1);
    assert!(t.driver.get_cached_images().await.unwrap().is_empty());
    t.finish().await;
}

async fn prune_low_watermark(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    for n in 0..10u8 {
        let image = format!("w{n}");
        cache(&t, &image, &[n; 100]).await;
        accessed_at(&t, &image, 1_000_000 + i64::from(n) * 10).await;
    }
    let policy = PrunePolicy {
        max_size: 900,
        low_watermark: Some(500),
        min_free_disk: None,
    };
    let report = t.driver.prune(policy).await.unwrap();
    assert_eq!(
        report.files(),
        5,
        "down to the low watermark, not just under max"
    );
    assert_eq!(report.pruned[0].0.as_str(), "w0");
    // At or under max: the watermark alone does not start a prune.
    cache(&t, "w10", &[0; 100]).await;
    assert_eq!(t.driver.prune(policy).await.unwrap().files(), 0);
    // Free disk below the minimum prunes even under max_size (the filesystem has
    // less than u64::MAX free, so everything goes).
    let policy = PrunePolicy {
        max_size: 1 << 40,
        low_watermark: None,
        min_free_disk: Some(u64::MAX),
    };
    assert_eq!(t.driver.prune(policy).await.unwrap().files(), 6);
    t.finish().await;
}

async fn clean_removes_invalid_and_stalled_only(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    std::fs::write(t.path("invalid/inv1"), vec![0; 10]).unwrap();
    std::fs::write(t.path("invalid/inv2"), vec![0; 20]).unwrap();
    std::fs::write(t.path("incomplete/stalled"), vec![0; 30]).unwrap();
    std::fs::write(t.path("incomplete/fresh"), vec![0; 40]).unwrap();
    let now = SystemTime::now();
    age_file(&t.path("incomplete/stalled"), 7200);
    let policy = CleanPolicy {
        stall_time: Duration::from_secs(3600),
        invalid_grace: Duration::ZERO,
    };
    let report = t.driver.clean(policy, now).await.unwrap();
    let mut removed: Vec<_> = report
        .removed
        .iter()
        .map(|r| (r.area, r.image_id.to_string(), r.bytes))
        .collect();
    removed.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        removed,
        [
            (Area::Invalid, "inv1".into(), 10),
            (Area::Invalid, "inv2".into(), 20),
            (Area::Incomplete, "stalled".into(), 30)
        ]
    );
    assert!(t.path("incomplete/fresh").exists());
    assert!(report.failed.is_empty());
    // The next stall is the fresh file's mtime + stall time: the loop sleeps until then.
    let next = report.next_due.expect("fresh file will stall");
    let wait = next.duration_since(now).unwrap();
    assert!(
        wait > Duration::from_secs(3500) && wait <= Duration::from_secs(3600),
        "{wait:?}"
    );
    // Time is a parameter: two hours later, the fresh file has stalled too.
    let later = now + Duration::from_secs(7200);
    let report = t.driver.clean(policy, later).await.unwrap();
    assert_eq!(report.files(), 1);
    // A grace keeps young invalid files.
    std::fs::write(t.path("invalid/young"), b"y").unwrap();
    let graced = CleanPolicy {
        invalid_grace: Duration::from_secs(600),
        ..policy
    };
    assert_eq!(
        t.driver
            .clean(graced, SystemTime::now())
            .await
            .unwrap()
            .files(),
        0
    );
    assert_eq!(
        t.driver
            .clean(graced, SystemTime::now() + Duration::from_secs(601))
            .await
            .unwrap()
            .files(),
        1
    );
    // A file that is already gone is fine.
    assert_eq!(
        t.layout.remove(Area::Invalid, &id("never-there")).unwrap(),
        None
    );
    t.finish().await;
}

async fn clean_never_follows_symlinks(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    let canary_dir = t.dir.path().join("canary");
    std::fs::create_dir(&canary_dir).unwrap();
    std::fs::write(canary_dir.join("precious"), b"keep me").unwrap();
    std::os::unix::fs::symlink(canary_dir.join("precious"), t.path("invalid/precious")).unwrap();
    std::os::unix::fs::symlink(&canary_dir, t.path("invalid/dirlink")).unwrap();
    std::os::unix::fs::symlink(canary_dir.join("precious"), t.path("incomplete/stale-link"))
        .unwrap();
    std::fs::create_dir(t.path("invalid/adir")).unwrap();
    std::fs::write(t.path("invalid/adir/inner"), b"x").unwrap();
    let policy = CleanPolicy {
        stall_time: Duration::ZERO,
        invalid_grace: Duration::ZERO,
    };
    let report = t
        .driver
        .clean(policy, SystemTime::now() + Duration::from_secs(86_400))
        .await
        .unwrap();
    assert_eq!(report.files(), 0);
    assert_eq!(report.skipped.count, 4);
    assert_eq!(
        std::fs::read(canary_dir.join("precious")).unwrap(),
        b"keep me"
    );
    assert!(t.path("invalid/adir/inner").exists());
    t.finish().await;
}

async fn two_nodes_share_a_database_without_seeing_each_other(b: Backend) {
    let Some(db) = TestDb::new(b).await else {
        return;
    };
    let a = TestCache::on(db, "http://node-a:9292").await;
    let b = TestCache::on(a.db.shared(), "http://node-b:9292").await;
    assert_ne!(a.node_db.node(), b.node_db.node());
    cache(&a, "shared-id", b"on a").await;
    cache(&b, "shared-id", b"on b, longer").await;
    cache(&b, "only-b", b"b").await;
    a.driver.queue_image(&id("queued-a")).await.unwrap();
    let a_ids: Vec<_> = a
        .driver
        .get_cached_images()
        .await
        .unwrap()
        .into_iter()
        .map(|i| (i.image_id.to_string(), i.size))
        .collect();
    assert_eq!(a_ids, [("shared-id".to_string(), 4)]);
    assert_eq!(b.driver.get_cached_images().await.unwrap().len(), 2);
    assert!(b.driver.get_queued_images().await.unwrap().is_empty());
    assert_eq!(a.driver.get_queued_images().await.unwrap().len(), 1);
    // Pruning and deleting on one node never touches the other's rows.
    a.driver
        .prune(PrunePolicy {
            max_size: 0,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(b.driver.delete_all_cached_images().await.unwrap(), 2);
    assert!(a.driver.get_cached_images().await.unwrap().is_empty());
    assert!(b.driver.get_cached_images().await.unwrap().is_empty());
    b.node_db.db().close().await;
    a.finish().await;
}

mod claims {
    use super::*;

    async fn concurrent_claims_never_overlap(b: Backend) {
        let Some(t) = TestCache::new(b).await else {
            return;
        };
        let ids: Vec<String> = (0..40).map(|n| format!("claim-{n:02}")).collect();
        for i in &ids {
            assert!(t.driver.queue_image(&id(i)).await.unwrap());
        }
        assert_eq!(t.driver.adopt_queue_markers().await.unwrap(), 40);
        // Two workers (separate pools, as two processes would have) claim as fast as
        // they can.
        let second_db = t.db.connect().await;
        let second = glance_cached::cache::CacheDriver::configure(
            t.layout.clone(),
            second_db.clone(),
            t.node_db.url(),
        )
        .await
        .unwrap();
        let mut tasks = Vec::new();
        for (n, d) in [t.driver.clone(), second.clone()].into_iter().enumerate() {
            for k in 0..3 {
                let d = d.clone();
                tasks.push(tokio::spawn(async move {
                    let mut got = Vec::new();
                    let holder = format!("worker-{n}-{k}");
                    while let Some(q) = d
                        .claim_next(&holder, Utc::now(), Duration::from_secs(600))
                        .await
                        .unwrap()
                    {
                        got.push(q.image_id.to_string());
                    }
                    got
                }));
            }
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all.sort();
        assert_eq!(all, ids, "every image claimed exactly once");
        // Claimed images are not claimable again until released.
        assert!(
            t.driver
                .claim_next("late", Utc::now(), Duration::from_secs(600))
                .await
                .unwrap()
                .is_none()
        );
        t.driver.release_claim(&id("claim-07")).await.unwrap();
        let again = t
            .driver
            .claim_next("late", Utc::now(), Duration::from_secs(600))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.image_id.as_str(), "claim-07");
        assert_eq!(
            again.downloading_by.as_deref(),
            Some("late"),
            "the claimed row comes back with its claim"
        );
        // A retry waits for its time; giving up keeps the reason and drops the marker.
        let later = Utc::now() + chrono::Duration::hours(1);
        t.driver
            .retry_later(&id("claim-07"), 1, later, "HTTP 503")
            .await
            .unwrap();
        assert!(
            t.driver
                .claim_next("late", Utc::now(), Duration::from_secs(600))
                .await
                .unwrap()
                .is_none()
        );
        t.driver
            .give_up(&id("claim-08"), 3, Utc::now(), "HTTP 404")
            .await
            .unwrap();
        assert!(!t.path("queue/claim-08").exists());
        let queued = t.driver.get_queued_images().await.unwrap();
        let failed = queued
            .iter()
            .find(|q| q.image_id.as_str() == "claim-08")
            .unwrap();
        assert_eq!(
            (
                failed.state.as_str(),
                failed.attempts,
                failed.last_error.as_deref()
            ),
            ("failed", 3, Some("HTTP 404"))
        );
        let retried = queued
            .iter()
            .find(|q| q.image_id.as_str() == "claim-07")
            .unwrap();
        assert_eq!((retried.state.as_str(), retried.attempts), ("queued", 1));
        assert!(
            !t.driver.is_queued(&id("claim-08")).await.unwrap(),
            "a failed image is not queued"
        );
        // A marker listed before the failure (queued time older than the failure) does
        // not revive the image; a request after it does.
        let before = DbTime::from_utc(Utc::now() - chrono::Duration::minutes(5));
        assert!(!t.node_db.enqueue("claim-08", before).await.unwrap());
        assert!(!t.driver.is_queued(&id("claim-08")).await.unwrap());
        // Re-queueing a failed image revives it.
        assert!(t.driver.queue_image(&id("claim-08")).await.unwrap());
        let revived = t
            .driver
            .get_queued_images()
            .await
            .unwrap()
            .into_iter()
            .find(|q| q.image_id.as_str() == "claim-08")
            .unwrap();
        assert_eq!((revived.state.as_str(), revived.attempts), ("queued", 0));
        // At start, a dead process's claims are released and their partial files moved
        // out of the way; a running process's (a `prefetch` command's) are left alone.
        let claims = t.node_db.claims().await.unwrap();
        let holder_of = |image: &str| {
            claims
                .iter()
                .find(|(i, _)| i.as_str() == image)
                .map(|(_, h)| h.clone())
                .unwrap()
        };
        let running = holder_of("claim-09");
        let dead_image = claims
            .iter()
            .find(|(_, h)| *h != running)
            .map(|(i, _)| i.clone())
            .unwrap();
        let kept = claims.iter().filter(|(_, h)| *h == running).count();
        assert!(claims.len() >= 38 && kept >= 1, "{claims:?}");
        std::fs::write(t.path("incomplete/claim-09"), b"partial").unwrap();
        std::fs::write(t.path(&format!("incomplete/{dead_image}")), b"partial").unwrap();
        let recovered = t.driver.recover_claims(|h| h == running).await.unwrap();
        assert_eq!(recovered as usize, claims.len() - kept);
        assert!(t.path(&format!("invalid/{dead_image}")).exists());
        assert!(!t.path(&format!("incomplete/{dead_image}")).exists());
        assert!(
            t.path("incomplete/claim-09").exists() && !t.path("invalid/claim-09").exists(),
            "a running download's file stays"
        );
        let left = t.node_db.claims().await.unwrap();
        assert_eq!(left.len(), kept);
        assert!(left.iter().all(|(_, h)| *h == running), "{left:?}");
        assert!(
            t.driver
                .claim_next("fresh", Utc::now(), Duration::from_secs(600))
                .await
                .unwrap()
                .is_some()
        );
        second_db.close().await;
        t.finish().await;
    }

    /// A download longer than its claim keeps the image by renewing: a claim that has
    /// run out is taken by the next worker, a renewed one is not. Only the holder's
    /// claims move.
    async fn renewed_claims_outlast_their_first_term(b: Backend) {
        let Some(t) = TestCache::new(b).await else {
            return;
        };
        for i in ["long-1", "long-2", "other"] {
            assert!(t.driver.queue_image(&id(i)).await.unwrap());
        }
        assert_eq!(t.driver.adopt_queue_markers().await.unwrap(), 3);
        // Claims that run out at once, as a claim does once a download outlasts it.
        let claim = |holder: &'static str| {
            let d = t.driver.clone();
            async move {
                d.claim_next(holder, Utc::now(), Duration::ZERO)
                    .await
                    .unwrap()
                    .map(|q| q.image_id.to_string())
            }
        };
        assert_eq!(claim("downloader").await.as_deref(), Some("long-1"));
        // Not renewed: the next worker takes the same image (and then loses it likewise).
        assert_eq!(claim("another").await.as_deref(), Some("long-1"));
        assert_eq!(claim("downloader").await.as_deref(), Some("long-1"));
        let renewed = t
            .driver
            .renew_claims("downloader", Utc::now(), Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(renewed, 1, "only the holder's claim");
        // Renewed: other workers move past it to the rest of the queue.
        let mut next = Vec::new();
        while let Some(q) = t
            .driver
            .claim_next("third", Utc::now(), Duration::from_secs(3600))
            .await
            .unwrap()
        {
            next.push(q.image_id.to_string());
        }
        assert_eq!(next, ["long-2", "other"]);
        t.finish().await;
    }

    crate::kit::servers::on_every_backend!(
        concurrent_claims_never_overlap,
        renewed_claims_outlast_their_first_term
    );
}

/// An image much larger than the writer's writeback window (32 MiB): the early writeback
/// of each window must leave every byte where it was written, and verification and
/// publishing work as for a small image. One backend: the database plays no part.
#[tokio::test]
async fn large_image_spanning_writeback_windows_publishes_intact() {
    let Some(t) = TestCache::new(Backend::Sqlite).await else {
        return;
    };
    let data = test_bytes(72 << 20, 3);
    let expect = Expectations {
        size: Some(data.len() as u64),
        md5: Some(md5_hex(&data)),
        os_hash: None,
        ..Default::default()
    };
    let mut w = t.driver.open_for_write(&id("large"), expect).await.unwrap();
    // Uneven chunks, so window boundaries fall inside them.
    for chunk in data.chunks(1_000_003) {
        w.write(chunk).unwrap();
    }
    let published = t.driver.publish(w).await.unwrap();
    assert_eq!(published.size, data.len() as u64);
    let on_disk = std::fs::read(t.path("large")).unwrap();
    assert!(
        on_disk == data,
        "published bytes differ from the written ones"
    );
    t.finish().await;
}

/// SQLite's WAL as glance-cached leaves it: checkpointed off the request path, and at
/// close, with a queued image claimable at once by another process's pool.
mod sqlite_wal {
    use super::*;
    use std::path::{Path, PathBuf};

    /// The database file of a SQLite `TestDb`.
    fn database_file(t: &TestCache) -> PathBuf {
        PathBuf::from(t.db.url.strip_prefix("sqlite://").unwrap())
    }

    /// The WAL's last frame and how many frames are copied back into the database, from
    /// the `-shm` wal-index (`mxFrame` at byte 16 of its header, `nBackfill` at 96).
    fn wal_frames(db: &Path) -> (u32, u32) {
        let shm = std::fs::read(format!("{}-shm", db.display())).unwrap();
        let word = |at: usize| u32::from_ne_bytes(shm[at..at + 4].try_into().unwrap());
        (word(16), word(96))
    }

    /// Queues `n` images through the driver, each adopted (the queue loop's write) and
    /// then claimed through `other`.
    async fn queue_and_claim(t: &TestCache, other: &CacheDriver, prefix: &str, n: usize) {
        for i in 0..n {
            let image = format!("{prefix}-{i}");
            assert!(t.driver.queue_image(&id(&image)).await.unwrap());
            assert!(t.path(&format!("queue/{image}")).is_file());
            assert_eq!(t.driver.adopt_queue_markers().await.unwrap(), 1);
            let claimed = other
                .claim_next("other", Utc::now(), Duration::from_secs(60))
                .await
                .unwrap()
                .expect("an adopted image is claimable");
            assert_eq!(claimed.image_id.as_str(), image);
        }
    }

    /// Far fewer pages than our `wal_autocheckpoint` (10,000) are written, so no commit
    /// checkpoints: the background checkpointer copies the WAL back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_is_checkpointed_in_the_background() {
        let t = TestCache::new(Backend::Sqlite).await.unwrap();
        // Another process's pool: it claims, so it writes (and checkpoints) too.
        let other_db = t.db.connect().await;
        let other = CacheDriver::configure(t.layout.clone(), other_db.clone(), t.node_db.url())
            .await
            .unwrap();
        // More statements than the checkpointer's trigger, far fewer pages than any
        // bound that would make a commit checkpoint.
        queue_and_claim(&t, &other, "bg", 100).await;
        let db = database_file(&t);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (last, copied) = wal_frames(&db);
            if last > 0 && copied == last {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the WAL stays unchecked: {copied} of {last} frames copied back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        other_db.close().await;
        t.finish().await;
    }

    /// Closing leaves the WAL copied back even while another process keeps the database
    /// open (so SQLite's own checkpoint at the last close does not run).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_checkpoints_beside_another_process() {
        let t = TestCache::new(Backend::Sqlite).await.unwrap();
        // A reader only: it never checkpoints.
        let reader = Db::connect(
            &t.db.url,
            &DbOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let reader_node = NodeDb::open_read_only(reader.clone(), t.node_db.url())
            .await
            .unwrap();
        for i in 0..5 {
            assert!(
                t.driver
                    .queue_image(&id(&format!("close-{i}")))
                    .await
                    .unwrap()
            );
        }
        assert_eq!(t.driver.adopt_queue_markers().await.unwrap(), 5);
        let db = database_file(&t);
        t.node_db.db().close().await;
        let (last, copied) = wal_frames(&db);
        assert!(last > 0, "the reader keeps the WAL");
        assert_eq!(copied, last, "frames left in the WAL after close");
        // The reader still reads everything.
        assert_eq!(reader_node.count_queued().await.unwrap(), 5);
        reader.close().await;
        t.db.drop_database().await;
    }
}
