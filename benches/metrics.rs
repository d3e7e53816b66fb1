//! The cost of a metrics scrape: `Metrics::encode` (what `/metrics` answers) on fresh
//! metrics and on metrics fed as by a daemon with 100,000 cached images (their size
//! and count, 100,000 evictions, prefetches and steps of every loop). The series are
//! the same few in both, so the two cost the same: the text does not grow with images.
//!
//!   cargo bench --bench metrics
//!   BENCH_SMOKE=1 cargo bench --bench metrics
//!
//! Results: a table on stdout and JSON in target/bench/metrics.json.

// Test and benchmark code: a panic here is a failed run, not a crashed daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Measured real times: the clock lint is for the daemon's code.
#![allow(clippy::disallowed_methods)]
// A benchmark has no API: its items need not be reachable.
#![allow(unreachable_pub)]

#[allow(dead_code)] // the median only
mod common;

use std::time::{Duration, Instant};

use glance_cached::cache::PruneReport;
use glance_cached::image_id::ImageId;
use glance_cached::metrics::Metrics;
use glance_cached::prefetch::PrefetchOutcome;

const IMAGES: usize = 100_000;
const IMAGE_BYTES: u64 = 10 << 20;
const LOOPS: [&str; 5] = ["cleaner", "pruner", "queue", "lease", "prefetcher"];

fn smoke() -> bool {
    std::env::var_os("BENCH_SMOKE").is_some()
}

/// Metrics as a daemon with `images` cached images leaves them: the gauges, and as
/// many evictions, prefetches and steps of each loop. Returns them and the time the
/// events took to record.
fn fed(images: usize) -> (Metrics, Duration) {
    let m = Metrics::new();
    let ids: Vec<(ImageId, u64)> = (0..images)
        .map(|i| (ImageId::parse(&format!("img-{i}")).unwrap(), IMAGE_BYTES))
        .collect();
    let started = Instant::now();
    m.set_cache(images as u64 * IMAGE_BYTES, images);
    m.set_max_bytes(2 * images as u64 * IMAGE_BYTES);
    m.set_queue(images / 10, images / 100);
    m.set_downloading(4);
    let report = PruneReport {
        size_before: 2 * images as u64 * IMAGE_BYTES,
        evicted_for_size: ids.len(),
        pruned: ids,
        ..Default::default()
    };
    m.pruned(&report);
    for i in 0..images {
        let took = Duration::from_micros(i as u64 % 5_000);
        m.prefetch_finished(
            &PrefetchOutcome::Published { bytes: IMAGE_BYTES },
            took * 1000,
        );
        for name in LOOPS {
            m.loop_step(name, took, i % 1000 == 0);
        }
        m.watcher_event();
        m.lease_renewal(true);
    }
    (m, started.elapsed())
}

struct Figures {
    median_us: f64,
    p99_us: f64,
    bytes: usize,
    lines: usize,
}

fn measure(m: &Metrics, encodes: usize) -> Figures {
    // Warm up the text's capacity and the caches.
    for _ in 0..10 {
        std::hint::black_box(m.encode().unwrap());
    }
    let mut times = Vec::with_capacity(encodes);
    let mut text = String::new();
    for _ in 0..encodes {
        let started = Instant::now();
        text = std::hint::black_box(m.encode().unwrap());
        times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Figures {
        median_us: common::median(times),
        p99_us: sorted[((sorted.len() - 1) as f64 * 0.99).round() as usize],
        bytes: text.len(),
        lines: text.lines().count(),
    }
}

fn main() {
    let (images, encodes) = if smoke() {
        (1_000, 100)
    } else {
        (IMAGES, 5_000)
    };
    let fresh = measure(&Metrics::new(), encodes);
    let (m, feeding) = fed(images);
    let full = measure(&m, encodes);
    let events = images * (1 + LOOPS.len() + 2) + 1;
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| encode, fresh metrics, median of {encodes} | {:.1} us (p99 {:.1} us), {} bytes, {} lines |",
        fresh.median_us, fresh.p99_us, fresh.bytes, fresh.lines
    );
    println!(
        "| encode, fed as with {images} images, median of {encodes} | {:.1} us (p99 {:.1} us), {} bytes, {} lines |",
        full.median_us, full.p99_us, full.bytes, full.lines
    );
    println!(
        "| recording one event (of {events}) | {:.0} ns |",
        feeding.as_secs_f64() * 1e9 / events as f64
    );
    let json = format!(
        "{{\"images\":{images},\"encodes\":{encodes},\
         \"fresh\":{{\"median_us\":{:.2},\"p99_us\":{:.2},\"bytes\":{}}},\
         \"fed\":{{\"median_us\":{:.2},\"p99_us\":{:.2},\"bytes\":{}}},\
         \"event_ns\":{:.1}}}\n",
        fresh.median_us,
        fresh.p99_us,
        fresh.bytes,
        full.median_us,
        full.p99_us,
        full.bytes,
        feeding.as_secs_f64() * 1e9 / events as f64
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("metrics.json"), json).unwrap();
}
