//! glance-cached beside the real glance-api 33.0.0, as deployed: one cache directory,
//! one SQLite database, one node URL, glance-api's cache middleware on. Each test drives
//! glance-api over HTTP while the daemon runs.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::kit::daemon::{Daemon, Setup, eventually, queued_json};
use crate::kit::glance::{GlanceApi, GlanceApiOptions};
use crate::kit::{md5_hex, test_bytes};

/// The node both sides are: glance-api's `worker_self_reference_url`, our
/// `node.reference_url`.
const NODE: &str = "http://shared-node:9292";

/// Longer than loopback socket buffers, so a download glance-api tees into its cache
/// cannot finish unread (it did, and so hid the livelock, with small images).
const IMAGE_BYTES: usize = 12 << 20;

/// How long the prefetches of a test may take (each is well under a second here).
const PREFETCH_DEADLINE: Duration = Duration::from_secs(40);

/// A daemon's setup and a glance-api sharing its cache directory and database.
pub struct Shared {
    pub s: Setup,
    pub api: GlanceApi,
    pub database: PathBuf,
}

impl Shared {
    /// glance-api on the setup's cache directory and a database outside it; `extra` is
    /// more of glance-cached's configuration. `None` when Glance is not installed.
    pub fn start(extra: &str) -> Option<Shared> {
        Self::start_on(extra, false)
    }

    /// As `start`, on glance-cached's default database (`database.url` unset).
    pub fn start_on_default_database(extra: &str) -> Option<Shared> {
        Self::start_on(extra, true)
    }

    fn start_on(extra: &str, default_database: bool) -> Option<Shared> {
        let s = Setup::new("");
        std::fs::create_dir_all(s.cache("")).unwrap();
        let database = if default_database {
            s.cache(glance_cached::config::DEFAULT_SQLITE_FILE)
        } else {
            s.tmp.path().join("state/glance-cached.db")
        };
        std::fs::create_dir_all(database.parent().unwrap()).unwrap();
        let api = GlanceApi::start(&GlanceApiOptions {
            cache_dir: Some(&s.cache("")),
            database: &database,
            node_url: NODE,
            keystone: None,
        })?;
        let token = s.tmp.path().join("token");
        std::fs::write(&token, "any-token\n").unwrap();
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let url = if default_database {
            String::new()
        } else {
            format!("[database]\nurl = \"sqlite://{}\"\n", database.display())
        };
        s.write_config(&format!(
            "{url}[node]\nreference_url = \"{NODE}\"\n\
             [prefetcher]\nretry_delay = \"100ms\"\nmax_retry_delay = \"500ms\"\nmax_attempts = 1000\n\
             [upstream]\nkind = \"glance\"\nurl = \"{}\"\ntoken_file = \"{}\"\n{extra}",
            api.url,
            token.display()
        ));
        Some(Shared { s, api, database })
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.s.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn cached_rows(&self) -> Vec<Value> {
        serde_json::from_str::<Value>(&self.cli_ok(&["list-cached", "--json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_through_glance_api_never_triggers_its_cache() {
    let Some(sh) = Shared::start("") else {
        return;
    };
    let images: Vec<Vec<u8>> = (0..3).map(|i| test_bytes(IMAGE_BYTES, 40 + i)).collect();
    let mut ids = Vec::new();
    for data in &images {
        ids.push(sh.api.create_image(data).await);
    }
    let deleted = ids[2].clone();
    sh.api.delete_image(&deleted).await;
    let mut queue = vec!["queue"];
    queue.extend(ids.iter().map(String::as_str));
    sh.cli_ok(&queue);

    let mut d = Daemon::start(sh.s.tmp.path(), &sh.s.config, &[]);
    let mut kept: Vec<String> = ids[..2].to_vec();
    kept.sort();
    eventually(
        PREFETCH_DEADLINE,
        "two images are cached and the deleted one dropped",
        || {
            let cached: Vec<String> = sh
                .cached_rows()
                .iter()
                .map(|r| r["image_id"].as_str().unwrap().to_owned())
                .collect();
            let dropped = queued_json(&sh.s)
                .iter()
                .any(|q| q["image_id"] == deleted.as_str() && q["state"] == "failed");
            cached == kept && dropped
        },
    );
    // Our writer cached them, verified: glance-api's tee never records a checksum.
    for (id, data) in ids.iter().zip(&images).take(2) {
        assert_eq!(&std::fs::read(sh.s.cache(id)).unwrap(), data);
        let row = sh
            .cached_rows()
            .into_iter()
            .find(|r| r["image_id"] == id.as_str())
            .unwrap();
        assert_eq!(row["checksum"], md5_hex(data).as_str(), "{row}");
        assert_eq!(row["hits"], 0, "{row}");
    }
    let reason = queued_json(&sh.s)
        .into_iter()
        .find(|q| q["image_id"] == deleted.as_str())
        .unwrap()["last_error"]
        .clone();
    assert!(reason.as_str().unwrap().contains("404"), "{reason}");
    let log = d.log_text();
    assert!(!log.contains("already being written"), "{log}");

    // glance-api sees both in the shared cache, serves a download from it, and the hit
    // is counted in the shared row.
    assert_eq!(sh.api.cached_ids().await, kept);
    assert_eq!(sh.api.download(&ids[0]).await, images[0]);
    let row = sh
        .cached_rows()
        .into_iter()
        .find(|r| r["image_id"] == ids[0].as_str())
        .unwrap();
    assert_eq!(row["hits"], 1, "served from the cache: {row}");
    assert!(d.alive());
    d.stop();
}

/// The three files of a SQLite database in WAL mode.
fn database_files(db: &std::path::Path) -> Vec<PathBuf> {
    ["", "-wal", "-shm"]
        .iter()
        .map(|suffix| PathBuf::from(format!("{}{suffix}", db.display())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glance_clearing_its_cache_leaves_our_database_alone() {
    let Some(sh) = Shared::start_on_default_database("") else {
        return;
    };
    let data = test_bytes(100_000, 7);
    let id = sh.api.create_image(&data).await;
    let mut d = Daemon::start(sh.s.tmp.path(), &sh.s.config, &[]);
    // Work the daemon does after start: a queued image it fetches, one it cannot.
    sh.cli_ok(&["queue", &id, "never-there"]);
    eventually(PREFETCH_DEADLINE, "the image is cached", || {
        sh.cached_rows()
            .iter()
            .any(|r| r["image_id"] == id.as_str())
    });
    for file in database_files(&sh.database) {
        assert!(file.exists(), "{} exists before", file.display());
    }

    // Glance's clear-cache: every regular file at the top of the cache directory but
    // `*.db` is deleted, and this node's rows.
    sh.api.cache_clear("cache").await;
    assert!(!sh.s.cache(&id).exists(), "Glance deleted the image");
    for file in database_files(&sh.database) {
        assert!(file.exists(), "{} survived Glance's clear", file.display());
    }
    // Everything written since the last checkpoint is still there: the queue, the lease.
    let queued = queued_json(&sh.s);
    assert!(
        queued.iter().any(|q| q["image_id"] == "never-there"),
        "{queued:?}"
    );
    // A second daemon for the node, on the same database (another cache directory, so
    // that only the lease can refuse it): the lease survived too.
    let elsewhere = sh.s.tmp.path().join("second");
    std::fs::create_dir(&elsewhere).unwrap();
    let second_config = elsewhere.join("glance-cached.toml");
    std::fs::write(
        &second_config,
        format!(
            "[cache]\ndir = \"{}\"\n[database]\nurl = \"sqlite://{}\"\n[node]\nreference_url = \"{NODE}\"\n",
            elsewhere.join("cache").display(),
            sh.database.display()
        ),
    )
    .unwrap();
    let mut second = Daemon::spawn(&elsewhere, &second_config, &[], &[]);
    second.wait_exit(Duration::from_secs(10));
    let refusal = second.log_text();
    assert!(
        refusal.contains("already served by another glance-cached"),
        "{refusal}"
    );
    assert!(d.alive(), "{}", d.log_text());
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dequeue_through_glance_takes_the_image_off_our_queue() {
    // One download at a time, slowly: the first image holds the prefetcher while
    // Glance dequeues the next ones.
    let Some(sh) = Shared::start("") else {
        return;
    };
    let config = std::fs::read_to_string(&sh.s.config).unwrap().replace(
        "[prefetcher]\n",
        "[prefetcher]\nconcurrency = 1\nmax_bytes_per_second = \"256KiB\"\n",
    );
    std::fs::write(&sh.s.config, config).unwrap();
    let slow_data = test_bytes(1 << 20, 1);
    let slow = sh.api.create_image(&slow_data).await;
    let (a, b, last) = (
        sh.api.create_image(&test_bytes(50_000, 2)).await,
        sh.api.create_image(&test_bytes(50_000, 3)).await,
        sh.api.create_image(&test_bytes(50_000, 4)).await,
    );
    sh.cli_ok(&["queue", &slow]);
    let mut d = Daemon::start(sh.s.tmp.path(), &sh.s.config, &[]);
    eventually(PREFETCH_DEADLINE, "the slow download is under way", || {
        sh.s.cache(&format!("incomplete/{slow}")).exists()
    });
    sh.cli_ok(&["queue", &a, &b]);
    // Glance dequeues one image, then clears its whole queue (the marker of the image
    // being downloaded included).
    sh.api.cache_delete(&a).await;
    sh.api.cache_clear("queue").await;
    assert!(
        std::fs::read_dir(sh.s.cache("queue"))
            .unwrap()
            .next()
            .is_none()
    );
    // Queued after them: once it is cached, the prefetcher has passed a and b.
    sh.cli_ok(&["queue", &last]);
    eventually(PREFETCH_DEADLINE, "the last queued image is cached", || {
        sh.s.cache(&last).exists()
    });
    assert_eq!(
        std::fs::read(sh.s.cache(&slow)).unwrap(),
        slow_data,
        "a claimed download ends"
    );
    assert!(
        !sh.s.cache(&a).exists(),
        "a was dequeued through Glance, yet fetched"
    );
    assert!(
        !sh.s.cache(&b).exists(),
        "b was dequeued through Glance, yet fetched"
    );
    let log = d.log_text();
    for id in [&a, &b] {
        assert!(
            log.lines()
                .any(|l| l.contains("its queue marker was removed") && l.contains(id.as_str())),
            "{log}"
        );
    }
    assert!(queued_json(&sh.s).is_empty(), "{:?}", queued_json(&sh.s));
    assert!(d.alive());
    d.stop();
}
