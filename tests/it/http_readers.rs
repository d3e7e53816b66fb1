//! Serving from the built daemon, driven over HTTP, where the driver-level tests of
//! `hits` cannot reach: a thousand whole and ranged downloads over hundreds of
//! connections while a SIGHUP reload has the pruner evict images that downloads hold
//! open (every byte right, the hits exact, the disk never over `max_size` plus the
//! open-but-evicted bytes `/metrics` reports, and those back to 0 after); `kill -9` with
//! hits not yet flushed, and after a flush; and a PostgreSQL outage during serving.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::process::Signal;
use serde_json::Value;

use crate::kit::daemon::{Daemon, SOON, Setup, cached_json, eventually};
use crate::kit::{free_port, md5_hex, test_bytes};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// A valid image id: `set` tells the test's groups of images apart.
fn image(set: u16, n: usize) -> String {
    format!("5e7e0000-0000-4000-{set:04x}-{n:012x}")
}

/// The config: `cache` lines in `[cache]`, `http` lines in `[http]` (downloads open to
/// loopback, no upstream), then `rest` (later sections).
fn write_config(s: &Setup, port: u16, cache: &str, http: &str, rest: &str) {
    s.write_config(&format!(
        "{cache}\n[http]\nenabled = true\nlisten = [\"127.0.0.1:{port}\"]\n\
         serve_auth = \"none\"\nserve_allow = [\"127.0.0.0/8\"]\n{http}\n{rest}\n"
    ));
}

/// Caches `data` as `id` with `glance-cached import` (the daemon may be running).
fn import(s: &Setup, id: &str, data: &[u8]) {
    let src = s.tmp.path().join(format!("{id}.src"));
    std::fs::write(&src, data).unwrap();
    let out = s.cli(&["import", id, src.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&src).unwrap();
}

/// `list-cached --json` by image id.
fn rows(s: &Setup) -> HashMap<String, Value> {
    cached_json(s)
        .into_iter()
        .map(|r| (r["image_id"].as_str().unwrap().to_owned(), r))
        .collect()
}

fn hits(rows: &HashMap<String, Value>, id: &str) -> u64 {
    rows.get(id)
        .unwrap_or_else(|| panic!("{id} is not listed"))
        .get("hits")
        .and_then(Value::as_u64)
        .unwrap()
}

/// One `GET /metrics` on its own connection: the body.
fn scrape(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The value of `series` (with its labels, as the text shows them) in a scrape.
fn sample(scrape: &str, series: &str) -> u64 {
    scrape
        .lines()
        .find_map(|l| {
            let value = l.strip_prefix(series)?.strip_prefix(' ')?;
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .unwrap_or_else(|| panic!("no {series} in\n{scrape}")) as u64
}

const OPEN_BYTES: &str = "glance_cached_evicted_open_bytes";
const OPEN_IMAGES: &str = "glance_cached_evicted_open_images";
const OPEN_READERS: &str = "glance_cached_open_readers";
const PENDING_HITS: &str = "glance_cached_pending_hits";
const PENDING_IMAGES: &str = "glance_cached_pending_hit_images";
const MAX_BYTES: &str = "glance_cached_cache_max_bytes";
/// Steps of the hit flusher, which also copies the readers table into the gauges above:
/// a scrape that counts two more steps than an earlier one shows gauges set after it.
const HIT_STEPS: &str = "glance_cached_loop_step_duration_seconds_count{loop=\"hits\"}";

/// What a download asks for.
#[derive(Debug, Clone, Copy)]
enum Want {
    Whole,
    /// `bytes=first-last`.
    Span(u64, u64),
    /// `bytes=first-`.
    From(u64),
    /// `bytes=-n`.
    Last(u64),
}

impl Want {
    /// The request number `n`'s download of an image of `size` bytes: two in five whole,
    /// the rest ranges of the three shapes, spread over the image.
    fn nth(n: usize, size: usize) -> Want {
        let size = size as u64;
        let at = (n as u64).wrapping_mul(7919) % size;
        match n % 5 {
            0 | 1 => Want::Whole,
            2 => Want::Span(at, (at + 1 + (n as u64 * 104_729) % 65_536).min(size - 1)),
            3 => Want::From(at),
            _ => Want::Last(1 + (n as u64 * 31) % size),
        }
    }

    fn range(self) -> Option<String> {
        match self {
            Want::Whole => None,
            Want::Span(a, b) => Some(format!("bytes={a}-{b}")),
            Want::From(a) => Some(format!("bytes={a}-")),
            Want::Last(n) => Some(format!("bytes=-{n}")),
        }
    }

    /// Where in an image of `len` bytes the part it asks for starts, and its length.
    fn span(self, len: usize) -> (usize, usize) {
        match self {
            Want::Whole => (0, len),
            Want::Span(a, b) => (a as usize, (b - a) as usize + 1),
            Want::From(a) => (a as usize, len - a as usize),
            Want::Last(n) => {
                let n = (n as usize).min(len);
                (len - n, n)
            }
        }
    }

    /// The bytes of `data` it asks for.
    fn part(self, data: &[u8]) -> &[u8] {
        let (first, n) = self.span(data.len());
        &data[first..first + n]
    }
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .build()
        .unwrap()
}

/// Sends the download `want` of `id` and checks the head (status, length, range,
/// `Content-MD5` when sent); the body is the caller's to read.
async fn start_get(
    client: &reqwest::Client,
    port: u16,
    id: &str,
    want: Want,
    data: &[u8],
) -> reqwest::Response {
    let mut request = client.get(format!("http://127.0.0.1:{port}/v2/images/{id}/file"));
    if let Some(range) = want.range() {
        request = request.header("Range", range);
    }
    let response = request.send().await.unwrap();
    let part = want.part(data);
    let expected = if matches!(want, Want::Whole) {
        200
    } else {
        206
    };
    assert_eq!(response.status().as_u16(), expected, "{id} {want:?}");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(header("content-length"), Some(part.len().to_string()));
    if expected == 206 {
        let (first, n) = want.span(data.len());
        let last = first + n - 1;
        assert_eq!(
            header("content-range"),
            Some(format!("bytes {first}-{last}/{}", data.len())),
            "{want:?}"
        );
    }
    // From the row: absent only while the database cannot be read.
    if let Some(md5) = header("content-md5") {
        assert_eq!(md5, md5_hex(data), "{id}");
    }
    response
}

/// Reads the body of `response` to its end and compares every byte.
async fn finish_get(response: reqwest::Response, id: &str, want: Want, data: &[u8]) {
    let body = response.bytes().await.unwrap();
    assert!(
        body[..] == *want.part(data),
        "{id} {want:?}: {} bytes, not the image's",
        body.len()
    );
}

async fn get(client: &reqwest::Client, port: u16, id: &str, want: Want, data: &[u8]) {
    let response = start_get(client, port, id, want, data).await;
    finish_get(response, id, want, data).await;
}

/// What the disk holds for the cache's images at one moment: the listed files, and the
/// unlinked ones the daemon still has open (`/proc/<pid>/fd` entries marked
/// "(deleted)"), each inode once.
#[derive(Debug, Clone, Copy, Default)]
struct Disk {
    listed: u64,
    deleted: u64,
    deleted_files: usize,
}

fn disk(dir: &Path, pid: u32, ids: &HashSet<String>) -> Disk {
    let mut seen = HashSet::new();
    let mut d = Disk::default();
    for id in ids {
        if let Ok(meta) = std::fs::metadata(dir.join(id))
            && seen.insert(meta.ino())
        {
            d.listed += meta.len();
        }
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return d;
    };
    for fd in fds.flatten() {
        // A descriptor closed meanwhile is simply not counted.
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        let Some(name) = target
            .strip_suffix(" (deleted)")
            .and_then(|t| t.strip_prefix(&format!("{}/", dir.display())))
        else {
            continue;
        };
        if ids.contains(name)
            && let Ok(meta) = std::fs::metadata(fd.path())
            && seen.insert(meta.ino())
        {
            d.deleted += meta.len();
            d.deleted_files += 1;
        }
    }
    d
}

/// One sample: the gauges of a scrape, then the disk measured after it.
#[derive(Debug, Clone, Copy)]
struct Sample {
    max_bytes: u64,
    open_bytes: u64,
    disk: Disk,
}

/// Samples until `stop`, as fast as scrapes come.
fn sampler(
    port: u16,
    pid: u32,
    dir: PathBuf,
    ids: HashSet<String>,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let text = scrape(port);
            let s = Sample {
                max_bytes: sample(&text, MAX_BYTES),
                open_bytes: sample(&text, OPEN_BYTES),
                disk: disk(&dir, pid, &ids),
            };
            samples.lock().unwrap().push(s);
            std::thread::sleep(Duration::from_millis(5));
        }
    })
}

/// The thousand downloads, released in waves: request `n` starts once `limit` is over
/// `n`. Each of the `CONNECTIONS` tasks sends its requests in sequence on the client's
/// keep-alive pool, so up to that many connections are open at once.
struct Load {
    next: AtomicUsize,
    limit: tokio::sync::watch::Sender<usize>,
    done: AtomicUsize,
    /// Downloads answered in full, per image.
    served: Vec<AtomicU64>,
}

const REQUESTS: usize = 1000;
const CONNECTIONS: usize = 250;

impl Load {
    fn run(
        self: &Arc<Self>,
        runtime: &tokio::runtime::Runtime,
        port: u16,
        images: Arc<Vec<(String, Vec<u8>)>>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let client = client();
        (0..CONNECTIONS)
            .map(|_| {
                let (load, client, images) = (self.clone(), client.clone(), images.clone());
                runtime.spawn(async move {
                    let mut limit = load.limit.subscribe();
                    loop {
                        let n = load.next.fetch_add(1, Ordering::SeqCst);
                        if n >= REQUESTS {
                            return;
                        }
                        limit.wait_for(|l| *l > n).await.unwrap();
                        let i = n % images.len();
                        let (id, data) = &images[i];
                        get(&client, port, id, Want::nth(n, data.len()), data).await;
                        load.served[i].fetch_add(1, Ordering::SeqCst);
                        load.done.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect()
    }

    fn release_until(&self, n: usize) {
        self.limit.send_replace(n);
    }

    fn wait_done(&self, n: usize) {
        eventually(
            Duration::from_secs(60),
            "the downloads are answered",
            || self.done.load(Ordering::SeqCst) >= n,
        );
    }
}

/// A thousand downloads (two in five whole, the rest `Range`s) of 24 small images over
/// 250 connections at once, while a SIGHUP lowers `cache.max_size` and the pruner
/// evicts: the cold images, in LRU order, and not two older, larger images that stalled
/// downloads (whole and ranged) hold open, since evicting an image being read frees
/// nothing now. Once the downloads are done, a second SIGHUP lowers `max_size` below
/// what the held images alone take: everything else goes, then the held images too,
/// unlinked under their readers. Every download is whole and byte-correct, the stalled
/// ones too after their images were evicted; each GET counts one hit, exactly, once
/// flushed; the disk (listed files and the daemon's descriptors of unlinked ones)
/// never holds more than `max_size` plus the open-but-evicted bytes `/metrics`
/// reports; and those gauges go back to 0 when the readers finish.
///
/// The held images are large (8 MiB) because a small body is all taken by hyper's and
/// the socket's buffers (up to 4 MiB with Linux's default `tcp_wmem`) at once, its
/// reader closed at once; the stall holds them open for as long as the test needs,
/// with no timing.
#[test]
fn http_readers_a_thousand_downloads_while_the_pruner_evicts_held_images() {
    const HOT: usize = 24;
    const HOT_SIZE: usize = 128 * KIB;
    const COLD: usize = 16;
    const COLD_SIZE: usize = 256 * KIB;
    const HELD_SIZE: usize = 8 * MIB;
    // 16 MiB held + 3 MiB hot + 4 MiB cold: 23 MiB. Lowered to 20 MiB during the
    // downloads, the pruner passes over the two held images (the oldest, but being
    // read), evicts 12 cold ones (3 MiB freed) and stops before any hot one. Lowered to
    // 6 MiB after them, it evicts the rest of the cold and the hot images (4 MiB), and
    // then both held ones (their 16 MiB freed once the stalled downloads end).
    let (max_before, max_during, max_after) = (32 * MIB as u64, 20 * MIB as u64, 6 * MIB as u64);
    let port = free_port();
    let s = Setup::new("");
    let config = |max: u64| {
        write_config(
            &s,
            port,
            &format!("max_size = \"{}MiB\"", max >> 20),
            "max_connections = 512\nhit_flush_interval = \"100ms\"",
            "",
        )
    };
    config(max_before);

    let held: Vec<(String, Vec<u8>)> = (0..2)
        .map(|n| (image(0xe1d, n), test_bytes(HELD_SIZE, 100 + n as u8)))
        .collect();
    let hot: Arc<Vec<(String, Vec<u8>)>> = Arc::new(
        (0..HOT)
            .map(|n| (image(0x407, n), test_bytes(HOT_SIZE, n as u8)))
            .collect(),
    );
    let cold: Vec<(String, Vec<u8>)> = (0..COLD)
        .map(|n| (image(0xc01d, n), test_bytes(COLD_SIZE, 50 + n as u8)))
        .collect();
    for (id, data) in held.iter().chain(hot.iter()) {
        import(&s, id, data);
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut d = s.start();
    let pid = d.child.id();

    // The stalled downloads: each image whole, from an offset, and its last bytes; the
    // head read, the body not.
    let stalled_client = client();
    let stalled: Vec<(String, Want, reqwest::Response)> = runtime.block_on(async {
        let mut stalled = Vec::new();
        for (id, data) in &held {
            let len = HELD_SIZE as u64;
            for want in [Want::Whole, Want::From(4096), Want::Last(len - 1000)] {
                let response = start_get(&stalled_client, port, id, want, data).await;
                stalled.push((id.clone(), want, response));
            }
        }
        stalled
    });
    // Their hits written: the held images' last access is now older than anything the
    // cold images (cached next) and the hot ones (read next) will have.
    eventually(SOON, "the stalled downloads' hits are written", || {
        let rows = rows(&s);
        held.iter().all(|(id, _)| hits(&rows, id) == 3)
    });
    for (id, data) in &cold {
        import(&s, id, data);
    }

    let ids: HashSet<String> = held
        .iter()
        .chain(hot.iter())
        .chain(cold.iter())
        .map(|(id, _)| id.clone())
        .collect();
    let cache_dir = s.cache("").canonicalize().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampling = sampler(
        port,
        pid,
        cache_dir.clone(),
        ids.clone(),
        stop.clone(),
        samples.clone(),
    );

    let load = Arc::new(Load {
        next: AtomicUsize::new(0),
        limit: tokio::sync::watch::channel(0).0,
        done: AtomicUsize::new(0),
        served: (0..HOT).map(|_| AtomicU64::new(0)).collect(),
    });
    let tasks = load.run(&runtime, port, hot.clone());
    let served = |load: &Load| -> Vec<u64> {
        load.served
            .iter()
            .map(|n| n.load(Ordering::SeqCst))
            .collect()
    };
    let hot_hits = |s: &Setup| -> Vec<u64> {
        let rows = rows(s);
        hot.iter().map(|(id, _)| hits(&rows, id)).collect()
    };

    // Wave 1: every hot image read, and its hits written (a later access than the cold
    // images' caching), exactly.
    load.release_until(400);
    load.wait_done(400);
    eventually(SOON, "the first wave's hits are written", || {
        hot_hits(&s) == served(&load)
    });

    // Wave 2 runs through the reload and the prune it starts.
    load.release_until(700);
    config(max_during);
    let from = d.notify.mark();
    d.signal(Signal::HUP);
    let ready = d.notify.wait_for(from, SOON, |m| m.contains("READY=1"));
    assert!(!d.notify.messages[ready].contains("reload failed"));
    eventually(SOON, "the prune pass ends", || {
        d.log_text().contains("prune pass evicted images")
    });
    let passes = d.log_text().matches("prune pass evicted images").count();

    // Wave 3, and every hit written: each download counted one, exactly.
    load.release_until(REQUESTS);
    load.wait_done(REQUESTS);
    for task in tasks {
        runtime.block_on(task).unwrap();
    }
    eventually(SOON, "every download's hit is written", || {
        hot_hits(&s) == served(&load)
    });
    assert_eq!(served(&load).iter().sum::<u64>(), REQUESTS as u64);
    // The pass took the cold images in LRU order and passed over the held ones.
    let kept = rows(&s);
    for (id, _) in &held {
        assert!(kept.contains_key(id) && s.cache(id).exists(), "{id} kept");
    }
    for (n, (id, _)) in cold.iter().enumerate() {
        let evicted = n < 12;
        assert_eq!(!kept.contains_key(id), evicted, "{id}");
        assert_eq!(!s.cache(id).exists(), evicted, "{id}");
    }

    // Below what the held images take: everything goes, they too.
    config(max_after);
    let from = d.notify.mark();
    d.signal(Signal::HUP);
    let ready = d.notify.wait_for(from, SOON, |m| m.contains("READY=1"));
    assert!(!d.notify.messages[ready].contains("reload failed"));
    eventually(SOON, "the second prune pass ends", || {
        d.log_text().matches("prune pass evicted images").count() > passes
    });
    // A scrape reads the readers' gauges as it is made; the pass may take the two held
    // images in separate steps, so the samples from the second's eviction on are of the
    // world after the pass (one sampled across the eviction could see the gauge before
    // it and the disk after).
    eventually(SOON, "both held images evicted", || {
        sample(&scrape(port), OPEN_IMAGES) == 2
    });
    let fresh_from = samples.lock().unwrap().len() + 1;
    let held_window = samples.lock().unwrap().len();
    eventually(SOON, "samples while the held images are open", || {
        samples.lock().unwrap().len() >= held_window + 20
    });
    let open = disk(&cache_dir, pid, &ids);
    let text = scrape(port);
    assert!(
        open.listed + open.deleted <= max_after + sample(&text, OPEN_BYTES),
        "{open:?} over {max_after} + {}",
        sample(&text, OPEN_BYTES)
    );
    assert_eq!(
        (sample(&text, OPEN_IMAGES), sample(&text, OPEN_BYTES)),
        (2, 2 * HELD_SIZE as u64),
        "the held images are open and evicted"
    );
    assert_eq!(
        (open.listed, open.deleted_files, open.deleted),
        (0, 2, 2 * HELD_SIZE as u64),
        "nothing listed; their bytes still on disk"
    );

    // The stalled downloads end: every byte of their evicted images.
    runtime.block_on(async {
        for (id, want, response) in stalled {
            let data = &held.iter().find(|(h, _)| *h == id).unwrap().1;
            finish_get(response, &id, want, data).await;
        }
    });
    eventually(SOON, "the readers' gauges are back to 0", || {
        let text = scrape(port);
        [
            OPEN_BYTES,
            OPEN_IMAGES,
            OPEN_READERS,
            PENDING_HITS,
            PENDING_IMAGES,
        ]
        .iter()
        .all(|g| sample(&text, g) == 0)
    });
    assert_eq!(disk(&cache_dir, pid, &ids).deleted_files, 0);
    stop.store(true, Ordering::SeqCst);
    sampling.join().unwrap();

    // The bound, at every sample whose gauges postdate the last eviction (or that came
    // before any: the old max_size).
    let samples = samples.lock().unwrap();
    let checked: Vec<&Sample> = samples
        .iter()
        .enumerate()
        .filter(|(n, s)| s.max_bytes == max_before || *n >= fresh_from)
        .map(|(_, s)| s)
        .collect();
    for s in &checked {
        assert!(
            s.disk.listed + s.disk.deleted <= s.max_bytes + s.open_bytes,
            "disk over max_size + open-but-evicted bytes: {s:?}"
        );
    }
    let while_held = samples[held_window..]
        .iter()
        .filter(|s| s.open_bytes > 0)
        .count();
    assert!(
        while_held >= 20,
        "{while_held} samples with evicted images open"
    );
    assert!(checked.len() > while_held, "samples before the reloads too");

    // Nothing left; all for the size rule (no min_free_disk), held or not.
    assert!(rows(&s).is_empty(), "every row evicted");
    let text = scrape(port);
    let evicted = |reason: &str| {
        (
            sample(
                &text,
                &format!("glance_cached_evicted_images_total{{reason=\"{reason}\"}}"),
            ),
            sample(
                &text,
                &format!("glance_cached_evicted_bytes_total{{reason=\"{reason}\"}}"),
            ),
        )
    };
    assert_eq!(
        evicted("size"),
        (
            (2 + HOT + COLD) as u64,
            (2 * HELD_SIZE + HOT * HOT_SIZE + COLD * COLD_SIZE) as u64
        )
    );
    assert_eq!(evicted("free_disk"), (0, 0));
    assert!(d.alive(), "the daemon runs; log:\n{}", d.log_text());
    d.stop();
}

/// `count` downloads (whole and ranged, request `n` of image `n % len`) at once, each
/// checked to the byte.
fn serve(
    runtime: &tokio::runtime::Runtime,
    port: u16,
    images: &Arc<Vec<(String, Vec<u8>)>>,
    count: usize,
) {
    let client = client();
    let tasks: Vec<_> = (0..count)
        .map(|n| {
            let (client, images) = (client.clone(), images.clone());
            runtime.spawn(async move {
                let (id, data) = &images[n % images.len()];
                get(&client, port, id, Want::nth(n, data.len()), data).await;
            })
        })
        .collect();
    for task in tasks {
        runtime.block_on(task).unwrap();
    }
}

/// Small images of the set `set`, of different sizes and bytes, cached by the CLI.
fn small_images(s: &Setup, set: u16, count: usize) -> Arc<Vec<(String, Vec<u8>)>> {
    let images: Vec<(String, Vec<u8>)> = (0..count)
        .map(|n| (image(set, n), test_bytes(64 * KIB + n * 1000, n as u8)))
        .collect();
    for (id, data) in &images {
        import(s, id, data);
    }
    Arc::new(images)
}

/// Every image's file holds its bytes.
fn assert_files(s: &Setup, images: &[(String, Vec<u8>)]) {
    for (id, data) in images {
        assert!(std::fs::read(s.cache(id)).unwrap() == *data, "{id}");
    }
}

/// A start after a `kill -9`: the dead daemon's lease is taken over.
fn restart(s: &Setup) -> Daemon {
    let d = s.start();
    assert!(
        d.log_text().contains("no longer running"),
        "{}",
        d.log_text()
    );
    d
}

/// `kill -9` with hits counted and not yet written (`hit_flush_interval` long, no flush
/// since the daemon's first): exactly those are lost. What was written before (by the
/// last daemon's clean stop) stays, every row and file is as it was, and the restarted
/// daemon serves and counts again.
#[test]
fn http_readers_kill_9_loses_only_the_hits_not_yet_flushed() {
    let port = free_port();
    let s = Setup::new("");
    write_config(&s, port, "", "hit_flush_interval = \"10m\"", "");
    let images = small_images(&s, 0x9a, 3);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let each = |rows: &HashMap<String, Value>| -> Vec<u64> {
        images.iter().map(|(id, _)| hits(rows, id)).collect()
    };

    let d = s.start();
    serve(&runtime, port, &images, 30);
    d.stop();
    let written = rows(&s);
    assert_eq!(each(&written), [10, 10, 10], "a clean stop writes the hits");

    let mut d = s.start();
    eventually(SOON, "the hit flusher's first step", || {
        sample(&scrape(port), HIT_STEPS) >= 1
    });
    serve(&runtime, port, &images, 45);
    let text = scrape(port);
    assert_eq!(
        sample(&text, PENDING_HITS),
        45,
        "no flush since the first: 45 hits pending"
    );
    // Idle at start, the flusher stepped again for the first hit only (to wait out the
    // ten-minute interval).
    assert_eq!(sample(&text, HIT_STEPS), 2);
    d.signal(Signal::KILL);
    d.wait_exit(SOON);
    drop(d);
    assert_eq!(
        rows(&s),
        written,
        "the 45 unflushed hits are lost, nothing else"
    );
    assert_files(&s, &images);

    let d = restart(&s);
    serve(&runtime, port, &images, 12);
    d.stop();
    assert_eq!(each(&rows(&s)), [14, 14, 14]);
}

/// A reload that shortens `http.hit_flush_interval` applies at once: the hits counted
/// under a ten-minute interval are written soon after the SIGHUP, not ten minutes on.
#[test]
fn http_readers_a_reloaded_flush_interval_applies_at_once() {
    let port = free_port();
    let s = Setup::new("");
    write_config(&s, port, "", "hit_flush_interval = \"10m\"", "");
    let images = small_images(&s, 0x9c, 2);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut d = s.start();
    eventually(SOON, "the hit flusher's first step", || {
        sample(&scrape(port), HIT_STEPS) >= 1
    });
    serve(&runtime, port, &images, 20);
    assert!(
        images.iter().all(|(id, _)| hits(&rows(&s), id) == 0),
        "nothing written under the long interval yet"
    );
    write_config(&s, port, "", "hit_flush_interval = \"200ms\"", "");
    let from = d.notify.mark();
    d.signal(Signal::HUP);
    let ready = d.notify.wait_for(from, SOON, |m| m.contains("READY=1"));
    assert!(!d.notify.messages[ready].contains("reload failed"));
    eventually(SOON, "the hits written after the reload", || {
        let rows = rows(&s);
        images.iter().all(|(id, _)| hits(&rows, id) == 10)
    });
    d.stop();
}

/// The complement: once the hit flusher has written the downloads' hits (within an
/// interval of the first), a `kill -9` loses none of them.
#[test]
fn http_readers_kill_9_after_a_flush_keeps_the_hits() {
    let port = free_port();
    let s = Setup::new("");
    write_config(&s, port, "", "hit_flush_interval = \"200ms\"", "");
    let images = small_images(&s, 0x9b, 2);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut d = s.start();
    serve(&runtime, port, &images, 40);
    eventually(SOON, "a flush after the downloads", || {
        let rows = rows(&s);
        images.iter().all(|(id, _)| hits(&rows, id) == 20)
    });
    let text = scrape(port);
    assert_eq!(
        sample(&text, "glance_cached_loop_errors_total{loop=\"hits\"}"),
        0
    );
    d.signal(Signal::KILL);
    d.wait_exit(SOON);
    drop(d);
    let after = rows(&s);
    for (id, _) in images.iter() {
        assert_eq!(hits(&after, id), 20, "{id}");
    }
    assert_files(&s, &images);
    let d = restart(&s);
    serve(&runtime, port, &images, 10);
    d.stop();
    let rows = rows(&s);
    for (id, _) in images.iter() {
        assert_eq!(hits(&rows, id), 25, "{id}");
    }
}

/// A PostgreSQL outage while serving: downloads go on from disk (every byte, with the
/// `Content-MD5` of the row read when the file was served before), the hits are kept in memory
/// (`glance_cached_pending_hits` grows with them), and once the server is back they are
/// written, each once.
#[test]
fn http_readers_serving_goes_on_through_a_postgres_outage() {
    let Some(pg) = crate::kit::servers::PrivatePostgres::start() else {
        return;
    };
    let port = free_port();
    let s = Setup::new("");
    write_config(
        &s,
        port,
        "",
        "hit_flush_interval = \"200ms\"",
        &format!(
            "[database]\nurl = \"{}\"\nconnect_timeout = \"1s\"\ncreate_glance_tables = true\n\
             [node]\nreference_url = \"http://outage-node:9292\"",
            pg.url()
        ),
    );
    let mut d = s.start();
    let images = small_images(&s, 0xdb, 2);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let each = |s: &Setup| -> Vec<u64> {
        let rows = rows(s);
        images.iter().map(|(id, _)| hits(&rows, id)).collect()
    };
    let md5 = |id: &str| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-D", "-"])
            .arg(format!("http://127.0.0.1:{port}/v2/images/{id}/file"))
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-md5")
                .then(|| v.trim().to_owned())
        })
    };
    assert_eq!(md5(&images[0].0), Some(md5_hex(&images[0].1)));
    serve(&runtime, port, &images, 20);
    eventually(SOON, "the hits are written", || each(&s) == [11, 10]);

    pg.stop_server();
    serve(&runtime, port, &images, 30);
    assert_eq!(
        md5(&images[1].0),
        Some(md5_hex(&images[1].1)),
        "the row read when this file was served before, remembered"
    );
    eventually(Duration::from_secs(30), "31 hits pending", || {
        let text = scrape(port);
        (sample(&text, PENDING_HITS), sample(&text, PENDING_IMAGES)) == (31, 2)
    });
    serve(&runtime, port, &images, 20);
    eventually(Duration::from_secs(30), "51 hits pending", || {
        sample(&scrape(port), PENDING_HITS) == 51
    });
    assert!(d.alive(), "{}", d.log_text());

    pg.start_server();
    eventually(
        Duration::from_secs(60),
        "the pending hits are written",
        || sample(&scrape(port), PENDING_HITS) == 0,
    );
    // Written before; and during the outage, 15 + 10 downloads of each and one header
    // check of the second.
    assert_eq!(each(&s), [11 + 25, 10 + 25 + 1]);
    assert_eq!(md5(&images[0].0), Some(md5_hex(&images[0].1)));
    d.stop();
}
