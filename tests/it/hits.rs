//! Hits without a write per read, and eviction that never breaks a reader: the driver's
//! `open_to_serve` (what the HTTP serving route and `cat` use) against SQLite,
//! PostgreSQL and MariaDB, Glance 33's own driver reading the hits we flushed, readers
//! of images the pruner evicts, and the paced deletion of a large file.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use glance_cached::cache::{Area, CacheDriver, CacheLayout, Expectations, PrunePolicy};
use glance_cached::db::{Db, DbOptions};
use serde_json::Value;

use crate::kit::servers::{Backend, PrivateMariadb, PrivatePostgres, TestCache, lock_sqlite};
use crate::kit::{id, test_bytes};

const MIB: usize = 1 << 20;
const GIB: u64 = 1 << 30;

crate::kit::servers::on_every_backend!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    a_thousand_concurrent_opens_with_flushes_between_them_count_a_thousand_hits,
    readers_of_images_the_pruner_evicts_read_every_byte_and_their_bytes_count,
    a_flush_of_hundreds_of_images_adds_each_ones_count_and_keeps_the_later_access,
);

/// A flush of more images than one statement takes (`add_hits` batches them on SQLite
/// and PostgreSQL): each row gains its own count, its `last_accessed` becomes the later
/// of its own and the hit's, and an image without a row is not counted.
async fn a_flush_of_hundreds_of_images_adds_each_ones_count_and_keeps_the_later_access(b: Backend) {
    use chrono::{TimeZone, Utc};
    use glance_cached::db::DbTime;
    const IMAGES: usize = 600;
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    let row_time = Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, 0).unwrap();
    let (earlier, later) = (
        row_time - chrono::Duration::hours(1),
        row_time + chrono::Duration::hours(1),
    );
    let ids: Vec<String> = (0..IMAGES).map(|i| format!("img{i:04}")).collect();
    for image in &ids {
        t.node_db
            .upsert_cached_image(image, 64, None, DbTime::from_utc(row_time))
            .await
            .unwrap();
    }
    let mut hits: Vec<(&str, i64, DbTime)> = ids
        .iter()
        .enumerate()
        .map(|(i, image)| {
            let at = if i % 2 == 0 { earlier } else { later };
            (image.as_str(), (i % 7) as i64 + 1, DbTime::from_utc(at))
        })
        .collect();
    hits.push(("no-row", 5, DbTime::from_utc(later)));
    assert_eq!(t.node_db.add_hits(&hits).await.unwrap(), IMAGES as u64);
    let listed = t.driver.get_cached_images().await.unwrap();
    assert_eq!(listed.len(), IMAGES, "{b:?}");
    for (i, image) in listed.iter().enumerate() {
        assert_eq!(image.image_id.as_str(), ids[i], "{b:?}");
        assert_eq!(image.hits, (i % 7) as u64 + 1, "{b:?}: {}", ids[i]);
        let kept = if i % 2 == 0 { row_time } else { later };
        assert_eq!(image.last_accessed, kept, "{b:?}: {}", ids[i]);
    }
    // A second flush adds to what the first wrote.
    assert_eq!(t.node_db.add_hits(&hits[..300]).await.unwrap(), 300);
    let listed = t.driver.get_cached_images().await.unwrap();
    assert_eq!(listed[299].hits, 2 * ((299 % 7) as u64 + 1), "{b:?}");
    assert_eq!(listed[300].hits, (300 % 7) as u64 + 1, "{b:?}");
    t.finish().await;
}

/// Caches `data` as `image` through the driver's write path.
async fn cache(driver: &CacheDriver, image: &str, data: &[u8]) {
    let mut w = driver
        .open_for_write(&id(image), Expectations::default())
        .await
        .unwrap();
    w.write(data).unwrap();
    driver.publish(w).await.unwrap();
}

async fn a_thousand_concurrent_opens_with_flushes_between_them_count_a_thousand_hits(b: Backend) {
    // Opens come in waves of concurrent tasks while a flusher runs beside them; the waves
    // go on until at least a thousand opens were made and the flusher finished flushes
    // while they ran, so the flushes interleave with the opens on a machine of any speed.
    const WAVE: usize = 100;
    const MIN_OPENS: usize = 1000;
    const MIN_FLUSHES_DURING: u32 = 3;
    const MAX_WAVES: usize = 10_000;
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    cache(&t.driver, "popular", &test_bytes(4096, 1)).await;
    // Another writer of the row (Glance's own `update_hit_count`) adds to it too: ours
    // add, never set.
    assert!(t.driver.open_for_read(&id("popular")).await.is_ok());
    let stop = Arc::new(AtomicBool::new(false));
    let flushes = Arc::new(AtomicU32::new(0));
    let flusher = {
        let (driver, stop, flushes) = (t.driver.clone(), stop.clone(), flushes.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                driver.flush_hits().await.unwrap();
                flushes.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let flushes_before = flushes.load(Ordering::SeqCst);
    let mut opens = 0;
    let mut waves = 0;
    while opens < MIN_OPENS || flushes.load(Ordering::SeqCst) - flushes_before < MIN_FLUSHES_DURING
    {
        assert!(
            waves < MAX_WAVES,
            "the flusher made no progress beside the opens"
        );
        let wave: Vec<_> = (0..WAVE)
            .map(|_| {
                let driver = t.driver.clone();
                tokio::spawn(async move {
                    let served = driver.open_to_serve(&id("popular")).await.unwrap().unwrap();
                    assert_eq!(served.size, 4096);
                })
            })
            .collect();
        for open in wave {
            open.await.unwrap();
        }
        opens += WAVE;
        waves += 1;
    }
    stop.store(true, Ordering::SeqCst);
    flusher.await.unwrap();
    t.driver.flush_hits().await.unwrap();
    assert_eq!(t.driver.pending_hits(), (0, 0));
    let hits = t.driver.get_hit_count(&id("popular")).await.unwrap();
    assert_eq!(hits, opens as u64 + 1, "{b:?}: {waves} waves");
    t.finish().await;
}

async fn readers_of_images_the_pruner_evicts_read_every_byte_and_their_bytes_count(b: Backend) {
    const IMAGES: usize = 12;
    const SIZE: usize = MIB;
    let max_size = (4 * SIZE) as u64;
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    let policy = PrunePolicy {
        max_size,
        ..Default::default()
    };
    let mut readers = Vec::new();
    for n in 0..IMAGES {
        let image = format!("img-{n:02}");
        let data = test_bytes(SIZE, n as u8);
        cache(&t.driver, &image, &data).await;
        // A reader holds every image, half read.
        let served = t.driver.open_to_serve(&id(&image)).await.unwrap().unwrap();
        let (mut file, guard) = served.into_parts();
        let mut head = vec![0; SIZE / 2];
        file.read_exact(&mut head).unwrap();
        assert_eq!(head, data[..SIZE / 2]);
        readers.push((file, guard, data));
        let open_before = t.driver.reader_stats().evicted_bytes;
        let listed_before = t.driver.get_cache_size().await.unwrap();
        t.driver.prune(policy).await.unwrap();
        // Every image is held: the pruner evicts them oldest first, counting the bytes
        // of those evicted before (still open, still on disk) in the size, and each
        // one it evicts now as gone (it will be once its reader closes): the listed
        // files fit beside the bytes already held open, and no more was evicted than
        // that takes.
        let listed = t.driver.get_cache_size().await.unwrap();
        let stats = t.driver.reader_stats();
        assert!(
            listed + open_before <= max_size || listed == 0,
            "{b:?}: {listed} listed + {open_before} open but evicted before > {max_size}"
        );
        assert!(
            listed_before + open_before <= max_size
                || listed == 0
                || listed + open_before + SIZE as u64 > max_size,
            "{b:?}: evicted more than needed: {listed} listed + {open_before} open before"
        );
        assert_eq!(stats.evicted_bytes, stats.evicted_images * SIZE as u64);
        assert_eq!(deleted_fds(&t.root()), stats.evicted_images as usize);
    }
    assert!(
        t.driver.reader_stats().evicted_images > 0,
        "the pruner evicted held images"
    );
    // Every reader reads the rest of its image, evicted or not.
    for (file, _, data) in &mut readers {
        let mut rest = Vec::new();
        file.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, data[SIZE / 2..]);
    }
    assert_eq!(t.driver.reader_stats().open_readers, IMAGES as u64);
    drop(readers);
    let stats = t.driver.reader_stats();
    assert_eq!(
        (
            stats.open_readers,
            stats.evicted_images,
            stats.evicted_bytes
        ),
        (0, 0, 0)
    );
    assert_eq!(deleted_fds(&t.root()), 0);
    t.finish().await;
}

/// This process's descriptors of unlinked files under `root`.
fn deleted_fds(root: &Path) -> usize {
    let prefix = root.to_string_lossy().into_owned();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .filter(|target| target.starts_with(&prefix) && target.ends_with(" (deleted)"))
        .count()
}

/// A multi-GiB image (its blocks allocated, not written) deleted while nobody reads it
/// is truncated a GiB per step, and a sparse one of the same length at once;
/// one a reader holds, ours or another process's (Glance's API serving from the cache),
/// is only unlinked, and the reader still sees all of it.
#[tokio::test]
async fn a_large_file_is_deleted_in_paced_steps_unless_a_reader_holds_it() {
    let Some(t) = TestCache::new(Backend::Sqlite).await else {
        return;
    };
    let size = 3 * GIB + 1;
    for image in ["big-idle", "big-read", "big-elsewhere", "big-sparse"] {
        let file = std::fs::File::create(t.path(image)).unwrap();
        file.set_len(size).unwrap();
        if image == "big-idle" {
            rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, size).unwrap();
        }
    }

    let before = t.driver.reader_stats().truncate_steps;
    assert!(t.driver.delete_cached_image(&id("big-idle")).await.unwrap());
    let steps = t.driver.reader_stats().truncate_steps - before;
    assert_eq!(steps, 4, "one step per GiB, the last partial");
    assert!(
        t.driver
            .delete_cached_image(&id("big-sparse"))
            .await
            .unwrap()
    );
    assert_eq!(
        t.driver.reader_stats().truncate_steps - before,
        steps,
        "a sparse file holds nothing to pace"
    );

    let served = t
        .driver
        .open_to_serve(&id("big-read"))
        .await
        .unwrap()
        .unwrap();
    assert!(t.driver.delete_cached_image(&id("big-read")).await.unwrap());
    assert_eq!(
        t.driver.reader_stats().truncate_steps - before,
        steps,
        "not truncated"
    );
    assert_eq!(t.driver.reader_stats().evicted_bytes, size);
    let (mut file, guard) = served.into_parts();
    assert_eq!(file.metadata().unwrap().len(), size);
    file.seek(SeekFrom::Start(size - 1)).unwrap();
    let mut last = [1u8];
    file.read_exact(&mut last).unwrap();
    assert_eq!(last, [0]);
    assert!(!t.path("big-read").exists());
    drop((file, guard));
    assert_eq!(t.driver.reader_stats().evicted_bytes, 0);

    // Another process reads it: not in our table, and still never truncated.
    let other = Command::new("sh")
        .arg("-c")
        .arg("exec sleep 120 < \"$0\"")
        .arg(t.path("big-elsewhere"))
        .spawn()
        .unwrap();
    let other = KillOnDrop(other);
    let held = PathBuf::from(format!("/proc/{}/fd/0", other.0.id()));
    crate::kit::daemon::eventually(Duration::from_secs(10), "the reader has it open", || {
        std::fs::metadata(&held).is_ok_and(|m| m.len() == size)
    });
    assert!(
        t.driver
            .delete_cached_image(&id("big-elsewhere"))
            .await
            .unwrap()
    );
    assert_eq!(
        t.driver.reader_stats().truncate_steps - before,
        steps,
        "not truncated"
    );
    assert_eq!(std::fs::metadata(&held).unwrap().len(), size);
    drop(other);
    t.finish().await;
}

/// A child process killed when the test ends, failed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `n` concurrent opens of `image`, each served (from disk, without the row's checksum
/// during an outage).
async fn serve_many(driver: &CacheDriver, image: &str, n: u64) {
    let opens: Vec<_> = (0..n)
        .map(|_| {
            let (driver, image) = (driver.clone(), id(image));
            tokio::spawn(async move {
                let served = driver.open_to_serve(&image).await.unwrap().unwrap();
                assert_eq!(served.size, 4096);
            })
        })
        .collect();
    for open in opens {
        open.await.unwrap();
    }
}

/// Counts hits of `image` while `fail` has the database refuse the flush, and more
/// after a flush failed (they merge with the batch it gave back); once `restore`
/// ends the outage, the flush that succeeds writes each hit once.
async fn hits_outlive(
    driver: &CacheDriver,
    image: &str,
    n: u64,
    fail: impl FnOnce(),
    restore: impl FnOnce(),
) {
    fail();
    serve_many(driver, image, n).await;
    assert!(
        driver.flush_hits().await.is_err(),
        "the flush fails during the outage"
    );
    serve_many(driver, image, n).await;
    assert_eq!(driver.pending_hits(), (1, 2 * n), "kept, once each");
    restore();
    let mut written = false;
    for _ in 0..30 {
        if driver.flush_hits().await.is_ok() {
            written = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(written, "a flush succeeds once the database is back");
    assert_eq!(driver.pending_hits(), (0, 0));
    assert_eq!(driver.get_hit_count(&id(image)).await.unwrap(), 2 * n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_survive_a_locked_sqlite_file() {
    let Some(t) = TestCache::new(Backend::Sqlite).await else {
        return;
    };
    cache(&t.driver, "img", &test_bytes(4096, 3)).await;
    let file = PathBuf::from(t.db.url.trim_start_matches("sqlite://"));
    let locker = std::sync::Mutex::new(None);
    hits_outlive(
        &t.driver,
        "img",
        25,
        || *locker.lock().unwrap() = Some(lock_sqlite(&file, 120)),
        || drop(locker.lock().unwrap().take()),
    )
    .await;
    t.finish().await;
}

/// A driver on a private server at `url` (stopped and started by the test).
async fn private_driver(dir: &Path, url: &str) -> (CacheDriver, Db) {
    let options = DbOptions {
        connect_timeout: Duration::from_secs(2),
        ..DbOptions::default()
    };
    let db = Db::connect(url, &options).await.unwrap();
    let layout = CacheLayout::open(dir.join("cache")).unwrap();
    let driver = CacheDriver::configure(layout, db.clone(), "http://outage-node:9292")
        .await
        .unwrap();
    (driver, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_survive_a_postgres_outage() {
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (driver, db) = private_driver(tmp.path(), &pg.url()).await;
    cache(&driver, "img", &test_bytes(4096, 4)).await;
    hits_outlive(
        &driver,
        "img",
        40,
        || pg.stop_server(),
        || pg.start_server(),
    )
    .await;
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_survive_a_mariadb_outage() {
    let Some(my) = PrivateMariadb::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (driver, db) = private_driver(tmp.path(), &my.url()).await;
    cache(&driver, "img", &test_bytes(4096, 5)).await;
    hits_outlive(
        &driver,
        "img",
        40,
        || my.stop_server(),
        || my.start_server(),
    )
    .await;
    db.close().await;
}

/// Glance 33's own `centralized_db` driver, on the same SQLite file and directory, reads
/// the hits we counted once they are flushed (what the daemon does every
/// `http.hit_flush_interval`), and its own hit adds to ours.
#[tokio::test]
async fn glance_reads_the_flushed_hit_count() {
    const NODE: &str = "http://hits-node:9292";
    let Some(python) = crate::kit::glance::glance_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cache_dir = tmp.path().join("cache");
    let db_url = format!("sqlite://{}", tmp.path().join("glance.db").display());
    let glance = |args: &[&str]| -> Value {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/glance/glance_cache.py");
        let out = Command::new(&python)
            .arg(script)
            .arg("--cache-dir")
            .arg(&cache_dir)
            .args(["--db-url", &crate::kit::glance::sqlalchemy_url(&db_url)])
            .args(["--node-url", NODE])
            .args(args)
            .env("TZ", "UTC")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "glance {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    glance(&["db-sync"]);
    let db = Db::connect(&db_url, &DbOptions::default()).await.unwrap();
    let ours = CacheDriver::configure(CacheLayout::open(&cache_dir).unwrap(), db.clone(), NODE)
        .await
        .unwrap();
    cache(&ours, "shared", &test_bytes(10_000, 6)).await;
    for _ in 0..7 {
        drop(ours.open_to_serve(&id("shared")).await.unwrap().unwrap());
    }
    assert_eq!(
        glance(&["hits", "shared"]),
        0,
        "not written before the flush"
    );
    ours.flush_hits().await.unwrap();
    assert_eq!(glance(&["hits", "shared"]), 7);
    // Glance's read counts its hit at once; ours add to it.
    glance(&["read", "shared"]);
    drop(ours.open_to_serve(&id("shared")).await.unwrap().unwrap());
    ours.flush_hits().await.unwrap();
    assert_eq!(glance(&["hits", "shared"]), 9);
    assert!(
        ours.get_image_filepath(&id("shared"), Area::Cached)
            .exists()
    );
    db.close().await;
}

/// An open remembers the row of the file it opened: a later open of the same file
/// needs no database (the checksum is there with the database closed), and a new file
/// under the same id is never given the old file's checksum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opened_files_row_is_remembered_for_that_file_only() {
    let Some(t) = TestCache::new(Backend::Sqlite).await else {
        return;
    };
    // Sizes apart: a reused inode within one clock tick, same size, would look like
    // the same file (Glance never changes an image's bytes, so only tests do that).
    let (first, second) = (test_bytes(4096, 1), test_bytes(8192, 2));
    cache(&t.driver, "img", &first).await;
    let opened = t.driver.open_to_serve(&id("img")).await.unwrap().unwrap();
    assert_eq!(opened.checksum, Some(crate::kit::md5_hex(&first)));
    drop(opened);
    assert!(t.driver.delete_cached_image(&id("img")).await.unwrap());
    cache(&t.driver, "img", &second).await;
    let opened = t.driver.open_to_serve(&id("img")).await.unwrap().unwrap();
    assert_eq!(
        opened.checksum,
        Some(crate::kit::md5_hex(&second)),
        "the new file's row, not the remembered one"
    );
    drop(opened);
    t.finish().await;

    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    let (driver, db) = private_driver(dir.path(), &url).await;
    cache(&driver, "img", &first).await;
    drop(driver.open_to_serve(&id("img")).await.unwrap().unwrap());
    // A row without a checksum (as one adopted from a file has) is remembered too.
    cache(&driver, "bare", &second).await;
    let q = "UPDATE cached_images SET checksum = NULL WHERE image_id = 'bare'";
    crate::kit::servers::run_sql(&url, Backend::Sqlite, q)
        .await
        .unwrap();
    let bare = driver.open_to_serve(&id("bare")).await.unwrap().unwrap();
    assert_eq!(bare.checksum, None);
    assert!(bare.cached_at.is_some());
    drop(bare);
    db.close().await;
    let opened = driver.open_to_serve(&id("img")).await.unwrap().unwrap();
    assert_eq!(
        opened.checksum,
        Some(crate::kit::md5_hex(&first)),
        "a remembered file's checksum, without the database"
    );
    let bare = driver.open_to_serve(&id("bare")).await.unwrap().unwrap();
    assert!(
        bare.cached_at.is_some() && bare.checksum.is_none(),
        "a remembered row without a checksum, without the database"
    );
}
