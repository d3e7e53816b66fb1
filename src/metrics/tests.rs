//! The metrics' encoding, read by a real Prometheus parser, and each one shown to move
//! with its event: in unit tests for the recording functions, and through a daemon run
//! in process (reconcile, prune, clean, queue, watcher, reload, lease, loop steps,
//! database latency).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::*;
use crate::cache::{CacheError, RemovedFile};
use crate::image_id::ImageId;
use crate::prefetch::FetchError;

/// The value of the sample written exactly as `series` (name and labels), if any.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn id(s: &str) -> ImageId {
    ImageId::parse(s).unwrap()
}

#[test]
fn every_series_is_there_at_zero_before_any_event() {
    let text = Metrics::new().encode().unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    for series in [
        r#"glance_cached_evicted_images_total{reason="size"}"#,
        r#"glance_cached_evicted_bytes_total{reason="free_disk"}"#,
        r#"glance_cached_evicted_images_total{reason="manual"}"#,
        r#"glance_cached_evicted_images_total{reason="reconcile"}"#,
        r#"glance_cached_cleaner_removed_files_total{kind="invalid"}"#,
        r#"glance_cached_cleaner_removed_bytes_total{kind="stalled"}"#,
        r#"glance_cached_prefetches_total{outcome="verify_failure"}"#,
        r#"glance_cached_loop_errors_total{loop="watcher"}"#,
        r#"glance_cached_loop_step_duration_seconds_count{loop="lease"}"#,
        r#"glance_cached_reloads_total{outcome="invalid"}"#,
        r#"glance_cached_lease_renewals_total{outcome="failed"}"#,
        r#"glance_cached_http_forwarded_requests_total{class="5xx"}"#,
        r#"glance_cached_http_forwarded_requests_total{class="error"}"#,
        "glance_cached_prefetched_bytes_total",
        "glance_cached_http_sendfile_bytes_total",
        "glance_cached_download_duration_seconds_count",
        "glance_cached_db_query_duration_seconds_count",
        "glance_cached_watcher_events_total",
        "glance_cached_watcher_overflows_total",
        "glance_cached_cache_bytes",
        "glance_cached_failed_images",
    ] {
        assert_eq!(sample(&text, series), Some(0.0), "{series} in\n{text}");
    }
    let build = format!(
        r#"glance_cached_build_info{{version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&text, &build), Some(1.0), "{text}");
}

#[test]
fn evictions_are_the_size_rules_down_to_the_target_then_the_free_disk_rules() {
    let m = Metrics::new();
    // The pass counted two evictions while over its target; the third was the disk's.
    let report = PruneReport {
        size_before: 1000,
        pruned: vec![(id("a"), 300), (id("b"), 300), (id("c"), 100)],
        evicted_for_size: 2,
        ..Default::default()
    };
    m.pruned(&report);
    let text = m.encode().unwrap();
    let get = |s: &str| sample(&text, s).unwrap();
    assert_eq!(
        get(r#"glance_cached_evicted_images_total{reason="size"}"#),
        2.0
    );
    assert_eq!(
        get(r#"glance_cached_evicted_bytes_total{reason="size"}"#),
        600.0
    );
    assert_eq!(
        get(r#"glance_cached_evicted_images_total{reason="free_disk"}"#),
        1.0
    );
    assert_eq!(
        get(r#"glance_cached_evicted_bytes_total{reason="free_disk"}"#),
        100.0
    );
    // Under max_size, every eviction is the disk's.
    m.pruned(&PruneReport {
        size_before: 100,
        pruned: vec![(id("d"), 50)],
        ..Default::default()
    });
    let text = m.encode().unwrap();
    assert_eq!(
        sample(
            &text,
            r#"glance_cached_evicted_images_total{reason="free_disk"}"#
        ),
        Some(2.0)
    );
    m.evicted(EvictReason::Manual, 1, 7);
    let text = m.encode().unwrap();
    assert_eq!(
        sample(
            &text,
            r#"glance_cached_evicted_bytes_total{reason="manual"}"#
        ),
        Some(7.0)
    );
}

#[test]
fn cleans_count_by_kind_and_reconcile_counts_its_dropped_rows() {
    let m = Metrics::new();
    let removed = |area, bytes| RemovedFile {
        area,
        image_id: id("x"),
        bytes,
    };
    let clean = CleanReport {
        removed: vec![
            removed(Area::Invalid, 10),
            removed(Area::Incomplete, 20),
            removed(Area::Incomplete, 5),
        ],
        ..Default::default()
    };
    m.cleaned(&clean);
    let reconcile = ReconcileReport {
        removed_rows: vec!["a".into(), "b".into()],
        cleaned: CleanReport {
            removed: vec![removed(Area::Invalid, 1)],
            ..Default::default()
        },
        ..Default::default()
    };
    m.reconciled(&reconcile);
    let text = m.encode().unwrap();
    let get = |s: &str| sample(&text, s).unwrap();
    assert_eq!(
        get(r#"glance_cached_cleaner_removed_files_total{kind="invalid"}"#),
        2.0
    );
    assert_eq!(
        get(r#"glance_cached_cleaner_removed_bytes_total{kind="invalid"}"#),
        11.0
    );
    assert_eq!(
        get(r#"glance_cached_cleaner_removed_files_total{kind="stalled"}"#),
        2.0
    );
    assert_eq!(
        get(r#"glance_cached_cleaner_removed_bytes_total{kind="stalled"}"#),
        25.0
    );
    assert_eq!(
        get(r#"glance_cached_evicted_images_total{reason="reconcile"}"#),
        2.0
    );
}

#[test]
fn prefetch_outcomes_are_counted_by_class() {
    let m = Metrics::new();
    let verify = || {
        FetchError::Cache(CacheError::Verification {
            image_id: id("v"),
            problem: "checksum".into(),
        })
    };
    let second = Duration::from_secs(1);
    for outcome in [
        PrefetchOutcome::Published { bytes: 4096 },
        PrefetchOutcome::Published { bytes: 1 },
        PrefetchOutcome::AlreadyCached,
        PrefetchOutcome::Interrupted,
        PrefetchOutcome::Retrying {
            error: FetchError::NoRoomBeside { reserved: 1 },
            delay: second,
        },
        PrefetchOutcome::Retrying {
            error: verify(),
            delay: second,
        },
        PrefetchOutcome::Dropped { error: verify() },
        PrefetchOutcome::Dropped {
            error: FetchError::LargerThanCache {
                size: 2,
                max_size: 1,
            },
        },
    ] {
        m.prefetch_finished(&outcome, second);
    }
    let text = m.encode().unwrap();
    let get = |s: &str| sample(&text, s).unwrap();
    assert_eq!(get(r#"glance_cached_prefetches_total{outcome="ok"}"#), 2.0);
    assert_eq!(
        get(r#"glance_cached_prefetches_total{outcome="retry"}"#),
        1.0
    );
    assert_eq!(
        get(r#"glance_cached_prefetches_total{outcome="verify_failure"}"#),
        2.0
    );
    assert_eq!(
        get(r#"glance_cached_prefetches_total{outcome="permanent"}"#),
        1.0
    );
    assert_eq!(get("glance_cached_prefetched_bytes_total"), 4097.0);
    assert_eq!(get("glance_cached_download_duration_seconds_count"), 2.0);
    assert_eq!(get("glance_cached_download_duration_seconds_sum"), 2.0);
}

#[test]
fn loops_reloads_leases_and_the_watcher_count_their_events() {
    let m = Metrics::new();
    m.loop_step("cleaner", Duration::from_millis(3), false);
    m.loop_step("cleaner", Duration::from_millis(3), true);
    m.reload(true);
    m.reload(false);
    m.reload(false);
    m.lease_renewal(true);
    m.lease_renewal(false);
    m.watcher_event();
    m.watcher_overflow();
    m.set_cache(5, 2);
    m.set_max_bytes(9);
    m.set_queue(3, 1);
    m.set_downloading(4);
    let text = m.encode().unwrap();
    let get = |s: &str| sample(&text, s).unwrap();
    assert_eq!(
        get(r#"glance_cached_loop_step_duration_seconds_count{loop="cleaner"}"#),
        2.0
    );
    assert_eq!(
        get(r#"glance_cached_loop_errors_total{loop="cleaner"}"#),
        1.0
    );
    assert_eq!(get(r#"glance_cached_reloads_total{outcome="ok"}"#), 1.0);
    assert_eq!(
        get(r#"glance_cached_reloads_total{outcome="invalid"}"#),
        2.0
    );
    assert_eq!(
        get(r#"glance_cached_lease_renewals_total{outcome="failed"}"#),
        1.0
    );
    assert_eq!(get("glance_cached_watcher_events_total"), 1.0);
    assert_eq!(get("glance_cached_watcher_overflows_total"), 1.0);
    assert_eq!(get("glance_cached_cache_bytes"), 5.0);
    assert_eq!(get("glance_cached_cache_images"), 2.0);
    assert_eq!(get("glance_cached_cache_max_bytes"), 9.0);
    assert_eq!(get("glance_cached_queued_images"), 3.0);
    assert_eq!(get("glance_cached_failed_images"), 1.0);
    assert_eq!(get("glance_cached_downloading_images"), 4.0);
}

/// The suite's Glance virtualenv's python (it has `prometheus_client`, which
/// oslo.metrics brings), or `None` with a note when the suite runs without it; under CI
/// its absence is a failure.
fn glance_python() -> Option<PathBuf> {
    match std::env::var("GLANCE_CACHED_TEST_GLANCE_PYTHON") {
        Ok(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ if std::env::var_os("CI").is_some() => {
            panic!("GLANCE_CACHED_TEST_GLANCE_PYTHON is not set: run the suite with scripts/test")
        }
        _ => {
            eprintln!("SKIPPED: GLANCE_CACHED_TEST_GLANCE_PYTHON is not set");
            None
        }
    }
}

/// Parses `text` with `prometheus_client`'s OpenMetrics parser (strict: it refuses
/// what Prometheus would) and returns each family's type and samples, by name. The
/// classic Prometheus text parser must read it too (without failing: it names a
/// counter's `_total` samples as families of their own, since that format has no
/// such suffix).
fn parse_with_prometheus_client(python: &Path, text: &str) -> BTreeMap<String, Value> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
from prometheus_client.parser import text_string_to_metric_families as prom
text = open(sys.argv[1]).read()
out = {}
for fam in om(text):
    out[fam.name] = {"type": fam.type, "samples": [[s.name, s.labels, s.value] for s in fam.samples]}
list(prom(text))
print(json.dumps(out))
"#;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, text).unwrap();
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the parser refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_real_prometheus_parser_reads_every_family_with_its_type() {
    let Some(python) = glance_python() else {
        return;
    };
    let m = Metrics::new();
    m.loop_step("pruner", Duration::from_millis(2), false);
    m.prefetch_finished(
        &PrefetchOutcome::Published { bytes: 1 },
        Duration::from_secs(2),
    );
    // The endpoint gauges exist once the daemon reports its upstream's endpoints.
    m.upstream_endpoint(0).set(1);
    let families = parse_with_prometheus_client(&python, &m.encode().unwrap());
    let expected = [
        ("glance_cached_build_info", "gauge"),
        ("glance_cached_cache_bytes", "gauge"),
        ("glance_cached_cache_max_bytes", "gauge"),
        ("glance_cached_cache_images", "gauge"),
        ("glance_cached_queued_images", "gauge"),
        ("glance_cached_failed_images", "gauge"),
        ("glance_cached_downloading_images", "gauge"),
        ("glance_cached_evicted_bytes", "counter"),
        ("glance_cached_evicted_images", "counter"),
        ("glance_cached_cleaner_removed_files", "counter"),
        ("glance_cached_cleaner_removed_bytes", "counter"),
        ("glance_cached_prefetches", "counter"),
        ("glance_cached_prefetched_bytes", "counter"),
        ("glance_cached_download_duration_seconds", "histogram"),
        ("glance_cached_loop_step_duration_seconds", "histogram"),
        ("glance_cached_loop_errors", "counter"),
        ("glance_cached_db_query_duration_seconds", "histogram"),
        ("glance_cached_watcher_events", "counter"),
        ("glance_cached_watcher_overflows", "counter"),
        ("glance_cached_reloads", "counter"),
        ("glance_cached_lease_renewals", "counter"),
        ("glance_cached_http_forwarded_requests", "counter"),
        ("glance_cached_http_sendfile_bytes", "counter"),
        ("glance_cached_open_readers", "gauge"),
        ("glance_cached_evicted_open_images", "gauge"),
        ("glance_cached_evicted_open_bytes", "gauge"),
        ("glance_cached_pending_hit_images", "gauge"),
        ("glance_cached_pending_hits", "gauge"),
        ("glance_cached_truncate_steps", "counter"),
        ("glance_cached_upstream_endpoint_up", "gauge"),
    ];
    let names: Vec<&str> = families.keys().map(String::as_str).collect();
    let mut wanted: Vec<&str> = expected.iter().map(|(n, _)| *n).collect();
    wanted.sort();
    assert_eq!(names, wanted);
    for (name, kind) in expected {
        assert_eq!(families[name]["type"], kind, "{name}: {:?}", families[name]);
    }
    // No label anywhere takes an image id: every label is one of the fixed few.
    let allowed = [
        "reason", "kind", "outcome", "loop", "version", "le", "class", "endpoint",
    ];
    for (name, family) in &families {
        for s in family["samples"].as_array().unwrap() {
            for label in s[1].as_object().unwrap().keys() {
                assert!(allowed.contains(&label.as_str()), "{name}: label {label}");
            }
        }
    }
    let download = &families["glance_cached_download_duration_seconds"]["samples"];
    let count = download
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s[0] == "glance_cached_download_duration_seconds_count")
        .unwrap();
    assert_eq!(count[2], 1.0);
}

/// Waits (up to a minute: the machine may be loaded) until `done` holds for the
/// encoded metrics; returns the last text.
async fn until(metrics: &Metrics, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = metrics.encode().unwrap();
        if done(&text) {
            return text;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn at_least(text: &str, series: &str, n: f64) -> bool {
    sample(text, series).is_some_and(|v| v >= n)
}

/// The daemon in process with a `Metrics` of the test's: each counter moves with the
/// event it counts (reconcile's clean at boot, the cleaner's, the pruner's eviction,
/// a queue marker through the watcher, the lease's heartbeats, reloads valid and not,
/// loop steps, database operations), and a real parser reads the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_in_process_moves_each_metric_with_its_event() {
    use crate::daemon::{RunOptions, SignalCommand};
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    for sub in ["incomplete", "invalid", "queue"] {
        std::fs::create_dir_all(cache.join(sub)).unwrap();
    }
    // Two images of 1000 bytes under a max_size of 1500: one is evicted for size.
    std::fs::write(cache.join("img-a"), [1u8; 1000]).unwrap();
    std::fs::write(cache.join("img-b"), [2u8; 1000]).unwrap();
    // Due at once (no grace): removed by the boot's reconcile.
    std::fs::write(cache.join("invalid/bad-1"), [0u8; 10]).unwrap();
    // The upstream has one of the two images that will be queued.
    let store = tmp.path().join("store");
    std::fs::create_dir(&store).unwrap();
    std::fs::write(store.join("img-q"), [3u8; 100]).unwrap();
    let file = tmp.path().join("glance-cached.toml");
    let text = format!(
        "[cache]\ndir = \"{}\"\nmax_size = \"1500B\"\n\
         [cleaner]\ninvalid_grace = \"0s\"\n\
         [daemon]\nshutdown_timeout = \"5s\"\nlease_ttl = \"3s\"\n\
         [upstream]\nkind = \"directory\"\npath = \"{}\"\n",
        cache.display(),
        store.display()
    );
    std::fs::write(&file, &text).unwrap();
    let config = crate::config::Config::load(Some(&file)).unwrap();
    let metrics = Arc::new(Metrics::new());
    let options = RunOptions {
        config_path: Some(file.clone()),
        metrics: metrics.clone(),
        ..RunOptions::default()
    };
    let (signals, rx) = tokio::sync::mpsc::unbounded_channel();
    let daemon = tokio::spawn(crate::daemon::run(config, options, None, rx));

    let m = &metrics;
    until(m, "boot's clean, prune and lease", |t| {
        at_least(
            t,
            r#"glance_cached_cleaner_removed_files_total{kind="invalid"}"#,
            1.0,
        ) && sample(t, r#"glance_cached_evicted_images_total{reason="size"}"#) == Some(1.0)
            && sample(t, r#"glance_cached_evicted_bytes_total{reason="size"}"#) == Some(1000.0)
            && sample(t, "glance_cached_cache_images") == Some(1.0)
            && sample(t, "glance_cached_cache_bytes") == Some(1000.0)
            && at_least(
                t,
                r#"glance_cached_lease_renewals_total{outcome="ok"}"#,
                1.0,
            )
    })
    .await;
    // Files arriving while it runs: the watcher sees them, the cleaner removes the
    // invalid one, the queue loop adopts the markers, the prefetcher fetches one image
    // and gives up on the one the upstream does not have.
    let before = sample(&m.encode().unwrap(), "glance_cached_watcher_events_total").unwrap();
    // Renamed in whole: the cleaner (no grace) could remove a file being written at
    // the size it had when listed.
    std::fs::write(tmp.path().join("bad-2"), [0u8; 20]).unwrap();
    std::fs::rename(tmp.path().join("bad-2"), cache.join("invalid/bad-2")).unwrap();
    std::fs::write(cache.join("queue/img-q"), b"").unwrap();
    std::fs::write(cache.join("queue/img-gone"), b"").unwrap();
    until(m, "the cleaner's removal and the prefetches", |t| {
        at_least(
            t,
            r#"glance_cached_cleaner_removed_bytes_total{kind="invalid"}"#,
            30.0,
        ) && at_least(t, "glance_cached_watcher_events_total", before + 3.0)
            && sample(t, r#"glance_cached_prefetches_total{outcome="ok"}"#) == Some(1.0)
            && sample(t, r#"glance_cached_prefetches_total{outcome="permanent"}"#) == Some(1.0)
            && sample(t, "glance_cached_prefetched_bytes_total") == Some(100.0)
            && sample(t, "glance_cached_download_duration_seconds_count") == Some(1.0)
            && sample(t, "glance_cached_queued_images") == Some(0.0)
            && sample(t, "glance_cached_failed_images") == Some(1.0)
            && sample(t, "glance_cached_downloading_images") == Some(0.0)
    })
    .await;
    signals.send(SignalCommand::Reload).unwrap();
    until(m, "a valid reload", |t| {
        sample(t, r#"glance_cached_reloads_total{outcome="ok"}"#) == Some(1.0)
    })
    .await;
    std::fs::write(&file, "[cache]\nmax_size = \"not a size\"\n").unwrap();
    signals.send(SignalCommand::Reload).unwrap();
    let text = until(m, "an invalid reload", |t| {
        sample(t, r#"glance_cached_reloads_total{outcome="invalid"}"#) == Some(1.0)
    })
    .await;
    signals.send(SignalCommand::Shutdown("SIGTERM")).unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(30), daemon).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");

    let get = |s: &str| sample(&text, s).unwrap();
    assert_eq!(get("glance_cached_cache_max_bytes"), 1500.0);
    assert!(
        get("glance_cached_db_query_duration_seconds_count") > 0.0,
        "{text}"
    );
    // The watcher is a task, not a stepped loop.
    for name in LOOP_NAMES.iter().filter(|n| **n != "watcher") {
        let series = format!(r#"glance_cached_loop_step_duration_seconds_count{{loop="{name}"}}"#);
        assert!(get(&series) > 0.0, "{series}: {text}");
    }
    assert_eq!(
        get(r#"glance_cached_loop_errors_total{loop="cleaner"}"#),
        0.0
    );
    assert_eq!(get("glance_cached_watcher_overflows_total"), 0.0);
    if let Some(python) = glance_python() {
        let families = parse_with_prometheus_client(&python, &text);
        assert_eq!(families["glance_cached_evicted_images"]["type"], "counter");
    }
}
