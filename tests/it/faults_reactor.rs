//! Load on the runtime and on the pruner: a stuck disk under four downloads must leave
//! the daemon responsive (watchdog, lease, SIGHUP), concurrent prunes and downloads must
//! not evict below the target, and a prune over a very large cache must never be taken
//! for a stuck loop by the watchdog.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use glance_cached::cache::{CleanPolicy, PrunePolicy};
use glance_cached::config::{UpstreamConfig, UpstreamKind};
use glance_cached::download::{DownloadBudget, FetchLimits, Fetched, fetch_into_cache};
use glance_cached::upstream::Upstream;
use tokio_util::sync::CancellationToken;

use crate::common::{Backend, TestCache, id, test_bytes};

/// Bytes of every image in the prune race: evictions come in these steps.
const RACE_IMAGE: usize = 1000;

macro_rules! backend_suite {
    ($($test:ident),* $(,)?) => {
        mod sqlite { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(super::Backend::Sqlite).await } )* }
        mod postgres { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(super::Backend::Postgres).await } )* }
        mod mysql { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(super::Backend::MySql).await } )* }
    };
}

backend_suite!(concurrent_prunes_and_downloads_stop_at_the_target);

/// Four downloads (each making room with its own prune) and a busy pruner, all at once,
/// over a cache twice its target: it must end at the target, not far below it.
async fn concurrent_prunes_and_downloads_stop_at_the_target(backend: Backend) {
    let Some(c) = TestCache::new(backend).await else {
        return;
    };
    for n in 0..120 {
        std::fs::write(c.path(&format!("old-{n}")), test_bytes(RACE_IMAGE, n as u8)).unwrap();
    }
    let policy = CleanPolicy {
        stall_time: Duration::from_secs(3600),
        invalid_grace: Duration::from_secs(3600),
    };
    c.driver.reconcile(policy, SystemTime::now()).await.unwrap();
    let origin = c.dir.path().join("origin");
    std::fs::create_dir(&origin).unwrap();
    for n in 0..4 {
        std::fs::write(origin.join(format!("new-{n}")), test_bytes(RACE_IMAGE, 7)).unwrap();
    }
    let upstream = Arc::new(
        Upstream::from_config(&UpstreamConfig {
            kind: UpstreamKind::Directory { path: origin },
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
        })
        .unwrap(),
    );
    let max_size = 60 * RACE_IMAGE as u64;
    let limits = FetchLimits {
        max_size,
        min_free_disk: None,
        max_bytes_per_second: None,
    };
    let budget = Arc::new(DownloadBudget::default());
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..4 {
        let (driver, upstream, budget) = (c.driver.clone(), upstream.clone(), budget.clone());
        tasks.spawn(async move {
            let fetched = fetch_into_cache(
                &driver,
                &upstream,
                &id(&format!("new-{n}")),
                limits,
                &CancellationToken::new(),
                &budget,
            )
            .await;
            assert!(
                matches!(fetched, Ok(Fetched::Published { .. })),
                "{fetched:?}"
            );
        });
        let driver = c.driver.clone();
        tasks.spawn(async move {
            // The pruner loop, woken by every publish.
            for _ in 0..3 {
                driver
                    .prune(PrunePolicy {
                        max_size,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let size = c.driver.get_cache_size().await.unwrap();
    assert!(size <= max_size, "{size} over {max_size}");
    // A download makes room for every reservation it saw, itself included, even those
    // published since: at most the other three images' worth below the target, then
    // its own arrives. Further down is over-eviction.
    assert!(
        size >= max_size - 4 * RACE_IMAGE as u64,
        "evicted down to {size} bytes for a target of {max_size}"
    );
    c.finish().await;
}
