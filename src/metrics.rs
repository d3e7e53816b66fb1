//! The daemon's Prometheus metrics: one `Metrics` per process, made at boot, shared by
//! the loops through their `Context` (and the status board, which mirrors its figures
//! into the gauges), encoded by `prometheus-client` in the OpenMetrics text format.
//!
//! Every label is one of a few fixed values (a reason, a kind, an outcome, a loop
//! name), never an image id, so the series stay as few as they are at boot whatever
//! the cache holds. Encoding reads counters and gauges only: a scrape runs no query.
//! The HTTP listener serves `/metrics` as `Metrics::encode`'s text with `CONTENT_TYPE`
//! (from `Context::metrics`, or the `RunOptions::metrics` it was given), and the cache
//! API records its deletions as `evicted(EvictReason::Manual, ..)`.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::cache::{Area, CleanReport, PruneReport, ReconcileReport};
use crate::prefetch::PrefetchOutcome;
use crate::upstream::ErrorClass;

/// The `Content-Type` of `encode`'s text (OpenMetrics 1.0, which Prometheus asks for
/// first and parses natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every metric's name starts with `glance_cached_`.
const PREFIX: &str = "glance_cached";

/// One label with one of a fixed set of values.
type Label = [(&'static str, &'static str); 1];

/// Why images left the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictReason {
    /// The pruner, while the cache is over `cache.max_size`.
    Size,
    /// The pruner, while the disk is short of `pruner.min_free_disk`.
    FreeDisk,
    /// An operator's request (the cache API's delete and clear).
    Manual,
    /// Reconcile dropped rows whose file was gone.
    Reconcile,
}

impl EvictReason {
    const ALL: [EvictReason; 4] = [
        EvictReason::Size,
        EvictReason::FreeDisk,
        EvictReason::Manual,
        EvictReason::Reconcile,
    ];

    fn label(self) -> Label {
        [(
            "reason",
            match self {
                EvictReason::Size => "size",
                EvictReason::FreeDisk => "free_disk",
                EvictReason::Manual => "manual",
                EvictReason::Reconcile => "reconcile",
            },
        )]
    }
}

const CLEAN_KINDS: [&str; 2] = ["invalid", "stalled"];
const PREFETCH_OUTCOMES: [&str; 4] = ["ok", "retry", "permanent", "verify_failure"];
const RELOAD_OUTCOMES: [&str; 2] = ["ok", "invalid"];
const LEASE_OUTCOMES: [&str; 2] = ["ok", "failed"];
/// Forwarded requests by the upstream's status class; `error` when no answer came
/// (the client got our 502 or 504, or 408 for a body that stalled).
pub(crate) const FORWARD_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];
/// The loops' names as the daemon's `Task` shows them.
pub(crate) const LOOP_NAMES: [&str; 7] = [
    "cleaner",
    "pruner",
    "queue",
    "lease",
    "prefetcher",
    "watcher",
    "hits",
];

/// Downloads: half a second to about an hour.
fn download_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.5, 2.0, 14))
}

/// Loop steps: a millisecond to about four minutes (the watchdog's scale).
fn step_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 10))
}

/// Database operations: half a millisecond to about two minutes.
fn query_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 4.0, 10))
}

type StepFamily = Family<Label, Histogram, fn() -> Histogram>;

/// The process's metrics. Cheap to update from any task (atomics, and a lock per
/// histogram observation).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    cache_bytes: Gauge,
    cache_max_bytes: Gauge,
    cache_images: Gauge,
    queued_images: Gauge,
    failed_images: Gauge,
    downloading_images: Gauge,
    evicted_bytes: Family<Label, Counter>,
    evicted_images: Family<Label, Counter>,
    cleaner_removed_files: Family<Label, Counter>,
    cleaner_removed_bytes: Family<Label, Counter>,
    prefetches: Family<Label, Counter>,
    prefetched_bytes: Counter,
    download_duration: Histogram,
    loop_step_duration: StepFamily,
    loop_errors: Family<Label, Counter>,
    db_query_duration: Histogram,
    watcher_events: Counter,
    watcher_overflows: Counter,
    reloads: Family<Label, Counter>,
    lease_renewals: Family<Label, Counter>,
    open_readers: Gauge,
    evicted_open_images: Gauge,
    evicted_open_bytes: Gauge,
    pending_hit_images: Gauge,
    pending_hits: Gauge,
    truncate_steps: Counter,
    forwarded: Family<Label, Counter>,
    http_sendfile_bytes: Counter,
    /// By the endpoint's index in `upstream.url` (a URL may carry a secret).
    upstream_endpoint_up: Family<[(&'static str, String); 1], Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A family with a series for each of `values` from the start, so every series shows
/// (at zero) before its first event.
fn family(key: &'static str, values: &[&'static str]) -> Family<Label, Counter> {
    let family = Family::<Label, Counter>::default();
    for value in values {
        let _ = family.get_or_create(&[(key, value)]);
    }
    family
}

fn clamp(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Metrics {
    pub fn new() -> Metrics {
        let reasons: Vec<&'static str> = EvictReason::ALL.iter().map(|r| r.label()[0].1).collect();
        let loop_step_duration = StepFamily::new_with_constructor(step_buckets as fn() -> _);
        for name in LOOP_NAMES {
            let _ = loop_step_duration.get_or_create(&[("loop", name)]);
        }
        let mut m = Metrics {
            registry: Registry::with_prefix(PREFIX),
            cache_bytes: Gauge::default(),
            cache_max_bytes: Gauge::default(),
            cache_images: Gauge::default(),
            queued_images: Gauge::default(),
            failed_images: Gauge::default(),
            downloading_images: Gauge::default(),
            evicted_bytes: family("reason", &reasons),
            evicted_images: family("reason", &reasons),
            cleaner_removed_files: family("kind", &CLEAN_KINDS),
            cleaner_removed_bytes: family("kind", &CLEAN_KINDS),
            prefetches: family("outcome", &PREFETCH_OUTCOMES),
            prefetched_bytes: Counter::default(),
            download_duration: download_buckets(),
            loop_step_duration,
            loop_errors: family("loop", &LOOP_NAMES),
            db_query_duration: query_buckets(),
            watcher_events: Counter::default(),
            watcher_overflows: Counter::default(),
            reloads: family("outcome", &RELOAD_OUTCOMES),
            lease_renewals: family("outcome", &LEASE_OUTCOMES),
            open_readers: Gauge::default(),
            evicted_open_images: Gauge::default(),
            evicted_open_bytes: Gauge::default(),
            pending_hit_images: Gauge::default(),
            pending_hits: Gauge::default(),
            truncate_steps: Counter::default(),
            forwarded: family("class", &FORWARD_CLASSES),
            http_sendfile_bytes: Counter::default(),
            upstream_endpoint_up: Family::default(),
        };
        m.register();
        m
    }

    /// Names every metric in the registry (the handles share their values with it).
    fn register(&mut self) {
        let r = &mut self.registry;
        let build_info = Family::<[(&'static str, &'static str); 1], Gauge>::default();
        build_info
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        r.register(
            "build_info",
            "Always 1, labelled with the version running",
            build_info,
        );
        r.register(
            "cache_bytes",
            "Bytes of complete images in the cache, as the last prune pass measured",
            self.cache_bytes.clone(),
        );
        r.register(
            "cache_max_bytes",
            "cache.max_size in force",
            self.cache_max_bytes.clone(),
        );
        r.register(
            "cache_images",
            "Complete images in the cache, as the last prune pass counted",
            self.cache_images.clone(),
        );
        r.register(
            "queued_images",
            "Images of this node queued for prefetching",
            self.queued_images.clone(),
        );
        r.register(
            "failed_images",
            "Images of this node given up on (queue rows kept as failed)",
            self.failed_images.clone(),
        );
        r.register(
            "downloading_images",
            "Prefetches in progress",
            self.downloading_images.clone(),
        );
        r.register(
            "evicted_bytes",
            "Bytes of images evicted, by reason",
            self.evicted_bytes.clone(),
        );
        r.register(
            "evicted_images",
            "Images evicted, by reason",
            self.evicted_images.clone(),
        );
        r.register(
            "cleaner_removed_files",
            "Files the cleaner removed, by kind (invalid/, stalled incomplete/)",
            self.cleaner_removed_files.clone(),
        );
        r.register(
            "cleaner_removed_bytes",
            "Bytes the cleaner removed, by kind",
            self.cleaner_removed_bytes.clone(),
        );
        r.register(
            "prefetches",
            "Prefetches finished, by outcome",
            self.prefetches.clone(),
        );
        r.register(
            "prefetched_bytes",
            "Bytes of images prefetched and published",
            self.prefetched_bytes.clone(),
        );
        r.register(
            "download_duration_seconds",
            "Time from start to publish of each successful prefetch",
            self.download_duration.clone(),
        );
        r.register(
            "loop_step_duration_seconds",
            "Duration of each step of a loop",
            self.loop_step_duration.clone(),
        );
        r.register(
            "loop_errors",
            "Failed steps, by loop",
            self.loop_errors.clone(),
        );
        r.register("db_query_duration_seconds", "Duration of each database operation (a statement, or a transaction with its statements)", self.db_query_duration.clone());
        r.register(
            "watcher_events",
            "File system events the watcher received",
            self.watcher_events.clone(),
        );
        r.register(
            "watcher_overflows",
            "Times the watcher lost events (queue overflow or error) and every loop rescanned",
            self.watcher_overflows.clone(),
        );
        r.register(
            "reloads",
            "Configuration reloads, by outcome",
            self.reloads.clone(),
        );
        r.register(
            "lease_renewals",
            "Node lease renewals, by outcome",
            self.lease_renewals.clone(),
        );
        r.register(
            "open_readers",
            "Cached images open for serving (readers), evicted or not",
            self.open_readers.clone(),
        );
        r.register(
            "evicted_open_images",
            "Evicted images that readers still hold open",
            self.evicted_open_images.clone(),
        );
        r.register(
            "evicted_open_bytes",
            "Bytes of evicted images still held open by readers: on disk until they close, counted in the pruner's size",
            self.evicted_open_bytes.clone(),
        );
        r.register(
            "pending_hit_images",
            "Images whose hits are counted in memory and not yet written to the database",
            self.pending_hit_images.clone(),
        );
        r.register(
            "pending_hits",
            "Hits counted in memory and not yet written to the database",
            self.pending_hits.clone(),
        );
        r.register(
            "truncate_steps",
            "Steps of paced deletions of large evicted images (one per 1 GiB freed)",
            self.truncate_steps.clone(),
        );
        r.register(
            "http_forwarded_requests",
            "Requests forwarded to the Glance upstream, by the status class of its answer (error: none came)",
            self.forwarded.clone(),
        );
        r.register(
            "http_sendfile_bytes",
            "Bytes of image bodies sent with sendfile (plain TCP; TLS and unix sockets send from buffers)",
            self.http_sendfile_bytes.clone(),
        );
        r.register(
            "upstream_endpoint_up",
            "1 while the Glance upstream endpoint (by its index in upstream.url) is up, 0 while it is passed over after a failure",
            self.upstream_endpoint_up.clone(),
        );
    }

    /// The metrics in the OpenMetrics text format (ending with `# EOF`), served with
    /// `CONTENT_TYPE`. Reads only what the loops recorded.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// The readers table and the hit book, as the hit flusher sees them at each step.
    pub(crate) fn set_readers(
        &self,
        stats: &crate::cache::ReaderStats,
        pending_images: usize,
        pending_hits: u64,
    ) {
        self.open_readers.set(clamp(stats.open_readers));
        self.evicted_open_images.set(clamp(stats.evicted_images));
        self.evicted_open_bytes.set(clamp(stats.evicted_bytes));
        self.pending_hit_images.set(clamp(pending_images as u64));
        self.pending_hits.set(clamp(pending_hits));
        // The table counts steps since start; the counter catches up with it.
        let seen = self.truncate_steps.get();
        if stats.truncate_steps > seen {
            self.truncate_steps.inc_by(stats.truncate_steps - seen);
        }
    }

    pub fn set_cache(&self, bytes: u64, images: usize) {
        self.cache_bytes.set(clamp(bytes));
        self.cache_images.set(clamp(images as u64));
    }

    pub fn set_max_bytes(&self, bytes: u64) {
        self.cache_max_bytes.set(clamp(bytes));
    }

    pub fn set_queue(&self, queued: usize, failed: usize) {
        self.queued_images.set(clamp(queued as u64));
        self.failed_images.set(clamp(failed as u64));
    }

    pub fn set_downloading(&self, downloading: usize) {
        self.downloading_images.set(clamp(downloading as u64));
    }

    /// `images` evicted for `reason`, freeing `bytes`.
    pub fn evicted(&self, reason: EvictReason, images: u64, bytes: u64) {
        let label = reason.label();
        self.evicted_images.get_or_create(&label).inc_by(images);
        self.evicted_bytes.get_or_create(&label).inc_by(bytes);
    }

    /// A finished prune pass: its first evictions are the size rule's (as many as the
    /// pass counted while over its target), the rest the free disk rule's.
    pub fn pruned(&self, report: &PruneReport) {
        let for_size = report.evicted_for_size.min(report.pruned.len());
        let (by_size, by_disk) = report.pruned.split_at(for_size);
        for (reason, evicted) in [
            (EvictReason::Size, by_size),
            (EvictReason::FreeDisk, by_disk),
        ] {
            let bytes = evicted.iter().fold(0u64, |n, (_, b)| n.saturating_add(*b));
            self.evicted(reason, evicted.len() as u64, bytes);
        }
    }

    /// A clean pass: `invalid/` files and stalled `incomplete/` ones.
    pub fn cleaned(&self, report: &CleanReport) {
        for removed in &report.removed {
            let kind = match removed.area {
                Area::Invalid => "invalid",
                _ => "stalled",
            };
            self.cleaner_removed_files
                .get_or_create(&[("kind", kind)])
                .inc();
            self.cleaner_removed_bytes
                .get_or_create(&[("kind", kind)])
                .inc_by(removed.bytes);
        }
    }

    /// The start-up reconcile: rows of missing files dropped (no bytes freed: the files
    /// were gone) and what its clean removed.
    pub fn reconciled(&self, report: &ReconcileReport) {
        self.evicted(EvictReason::Reconcile, report.removed_rows.len() as u64, 0);
        self.cleaned(&report.cleaned);
    }

    /// A download that ended with `outcome` after `took`. Verification failures count
    /// as such whether retried or given up; one stopped by shutdown, or that found the
    /// image cached already, counts as no prefetch.
    pub fn prefetch_finished(&self, outcome: &PrefetchOutcome, took: Duration) {
        let outcome = match outcome {
            PrefetchOutcome::Published { bytes } => {
                self.prefetched_bytes.inc_by(*bytes);
                self.download_duration.observe(took.as_secs_f64());
                "ok"
            }
            PrefetchOutcome::AlreadyCached | PrefetchOutcome::Interrupted => return,
            PrefetchOutcome::Retrying { error, .. } | PrefetchOutcome::Dropped { error }
                if error.class() == ErrorClass::Verify =>
            {
                "verify_failure"
            }
            PrefetchOutcome::Retrying { .. } => "retry",
            PrefetchOutcome::Dropped { .. } => "permanent",
        };
        self.prefetches.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// One step of the loop named `name` (one of `LOOP_NAMES`).
    pub fn loop_step(&self, name: &'static str, took: Duration, failed: bool) {
        let label = [("loop", name)];
        self.loop_step_duration
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        if failed {
            self.loop_errors.get_or_create(&label).inc();
        }
    }

    pub fn watcher_event(&self) {
        self.watcher_events.inc();
    }

    pub fn watcher_overflow(&self) {
        self.watcher_overflows.inc();
    }

    /// A SIGHUP reload: applied, or refused for an invalid configuration.
    pub fn reload(&self, applied: bool) {
        let outcome = if applied { "ok" } else { "invalid" };
        self.reloads.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// A heartbeat of the node lease: renewed, or failed (an error, or the lease lost).
    pub fn lease_renewal(&self, renewed: bool) {
        let outcome = if renewed { "ok" } else { "failed" };
        self.lease_renewals
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }

    /// The histogram the database pool's operations are timed into (`Db::timed_by`).
    /// The counter of bytes sent with sendfile, for the connections to add to (a
    /// clone is the same counter).
    pub(crate) fn sendfile_bytes(&self) -> Counter {
        self.http_sendfile_bytes.clone()
    }

    /// A forwarded request's answer: `status` from the upstream, `None` when none came.
    pub(crate) fn forwarded(&self, status: Option<u16>) {
        let class = match status {
            Some(100..=199) => "1xx",
            Some(200..=299) => "2xx",
            Some(300..=399) => "3xx",
            Some(400..=499) => "4xx",
            Some(_) => "5xx",
            None => "error",
        };
        self.forwarded.get_or_create(&[("class", class)]).inc();
    }

    /// The up/down gauge of the upstream endpoint at `index` (shares its value with
    /// the registry).
    pub(crate) fn upstream_endpoint(&self, index: usize) -> Gauge {
        self.upstream_endpoint_up
            .get_or_create(&[("endpoint", index.to_string())])
            .clone()
    }

    pub(crate) fn db_queries(&self) -> Histogram {
        self.db_query_duration.clone()
    }
}

/// Times one database operation into its histogram when dropped, so an operation that
/// returns early with an error is timed too.
pub(crate) struct QueryTimer<'a> {
    histogram: Option<&'a Histogram>,
    started: Instant,
}

impl<'a> QueryTimer<'a> {
    pub(crate) fn start(histogram: Option<&'a Histogram>) -> QueryTimer<'a> {
        QueryTimer {
            histogram,
            started: Instant::now(),
        }
    }
}

impl Drop for QueryTimer<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.histogram {
            h.observe(self.started.elapsed().as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests;
