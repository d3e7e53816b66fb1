//! Read-through (`GET /v2/images/{id}/file` of an image not cached) from the built
//! daemon: python-glanceclient's `images.data()` against the real glance-api as the
//! upstream (read through, then cached and served from the cache); and with the
//! loopback origin, which counts the bytes it sends per image: 100 concurrent curl
//! clients of one cold image (one upstream transfer, identical bytes, one cache entry),
//! a client that goes away at 10% (the fill completes), a corrupt upstream body (every
//! transfer broken, nothing cached, fetched again next time) and a read-through request
//! that joins the queue's prefetch of the same image.
//!
//! Sizes: 32 MiB for the 100-client test by default; `GLANCE_CACHED_LOAD_FULL=1` runs it
//! at the 256 MiB.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use md5::{Digest, Md5};

use crate::kit::daemon::{SOON, Setup, cached_json, eventually, queue};
use crate::kit::glance::{GlanceApi, GlanceApiOptions, glance_python};
use crate::kit::origin::{Behaviour, Origin};
use crate::kit::{free_port, md5_hex, test_bytes};

const A: &str = "f1110000-0000-4000-8000-00000000000a";
const B: &str = "f1110000-0000-4000-8000-00000000000b";
const C: &str = "f1110000-0000-4000-8000-00000000000c";
const D: &str = "f1110000-0000-4000-8000-00000000000d";
const TOKEN: &str = "a-read-through-token-of-some-length";

fn load_full() -> bool {
    std::env::var("GLANCE_CACHED_LOAD_FULL").is_ok_and(|v| v == "1")
}

/// A daemon listening on a free port, its upstream the Glance at `upstream`; `extra`
/// holds more `[http]` lines and later sections.
fn setup(upstream: &str, extra: &str) -> (Setup, u16) {
    let port = free_port();
    let s = Setup::new("");
    s.write_config(&format!(
        "[http]\nenabled = true\nlisten = [\"127.0.0.1:{port}\"]\nauth_cache_ttl = \"1h\"\n{extra}\n\
         [upstream]\nkind = \"glance\"\nurl = \"{upstream}\"\n"
    ));
    (s, port)
}

/// What one curl client got: its exit, the status, and the MD5 and length of the body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Download {
    ok: bool,
    status: String,
    md5: String,
    len: u64,
}

/// `curl` of `id` with the token, the body hashed as it arrives (100 clients of a
/// large image would not fit on disk).
fn download(port: u16, id: &str) -> Download {
    let mut child = Command::new("curl")
        .args(["-s", "-S", "-f", "-o", "-", "-H"])
        .arg(format!("X-Auth-Token: {TOKEN}"))
        .args(["-w", "%{stderr}%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}/v2/images/{id}/file"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let (mut hash, mut len, mut buf) = (Md5::new(), 0u64, vec![0u8; 1 << 20]);
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        len += n as u64;
    }
    let done = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr).into_owned();
    Download {
        ok: done.status.success(),
        status: stderr.trim().rsplit('\n').next().unwrap_or("").to_owned(),
        md5: hex::encode(hash.finalize()),
        len,
    }
}

/// `clients` downloads of `id` at once.
fn downloads(port: u16, id: &str, clients: usize) -> Vec<Download> {
    let id = id.to_owned();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let id = id.clone();
            std::thread::spawn(move || download(port, &id))
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// A slow origin transfer of `size` bytes: 256 KiB chunks, about `secs` in all.
fn slow(size: usize, secs: f64) -> Behaviour {
    let chunk = 256 << 10;
    let chunks = size.div_ceil(chunk).max(1);
    Behaviour {
        chunk_bytes: Some(chunk),
        chunk_delay: Some(Duration::from_secs_f64(secs / chunks as f64)),
        ..Default::default()
    }
}

/// The image is cached once, its file the image and its row's checksum its MD5.
fn assert_cached_once(s: &Setup, id: &str, data: &[u8]) {
    let rows = cached_json(s);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["image_id"], id);
    assert_eq!(rows[0]["checksum"], md5_hex(data), "{rows:?}");
    assert!(
        std::fs::read(s.cache(id)).unwrap() == data,
        "the cached file"
    );
}

#[test]
fn http_fill_a_hundred_clients_of_a_cold_image_cause_one_upstream_transfer() {
    let size = if load_full() { 256 << 20 } else { 32 << 20 };
    let origin = Origin::start();
    let data = test_bytes(size, 5);
    origin.add(A, data.clone(), slow(size, 3.0));
    let (s, port) = setup(&origin.url(), "");
    let d = s.start();
    let got = downloads(port, A, 100);
    let want = Download {
        ok: true,
        status: "200".into(),
        md5: md5_hex(&data),
        len: size as u64,
    };
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g, &want, "client {i}");
    }
    assert_eq!(
        origin.bytes_sent(A),
        size as u64,
        "the origin sent the image once"
    );
    eventually(SOON, "the image is cached", || s.cached_ids() == [A]);
    assert_cached_once(&s, A, &data);
    // And served from the cache next: nothing more from the origin.
    assert_eq!(download(port, A), want);
    assert_eq!(origin.bytes_sent(A), size as u64);
    d.stop();
}

#[test]
fn http_fill_completes_when_its_client_goes_away_at_ten_percent() {
    // Larger than the socket buffers between the daemon and its client, so that the
    // daemon sees the client go long before the fill ends.
    let size = 32 << 20;
    let origin = Origin::start();
    let data = test_bytes(size, 6);
    origin.add(B, data.clone(), slow(size, 3.0));
    let (s, port) = setup(&origin.url(), "");
    let d = s.start();
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        client,
        "GET /v2/images/{B}/file HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\n\r\n"
    )
    .unwrap();
    let mut got = vec![0u8; size / 10];
    client.read_exact(&mut got).unwrap();
    drop(client);
    assert!(
        s.cached_ids().is_empty(),
        "still filling when the client left"
    );
    eventually(SOON * 2, "the fill completes", || s.cached_ids() == [B]);
    assert_cached_once(&s, B, &data);
    assert_eq!(origin.bytes_sent(B), size as u64);
    d.stop();
}

#[test]
fn http_fill_of_a_corrupt_upstream_body_breaks_every_transfer_and_caches_nothing() {
    let size = 4 << 20;
    let origin = Origin::start();
    let data = test_bytes(size, 7);
    origin.add(
        C,
        data,
        Behaviour {
            // The body is not what Glance's digest says.
            sha512_text: Some("0".repeat(128)),
            ..slow(size, 1.0)
        },
    );
    let (s, port) = setup(&origin.url(), "");
    let d = s.start();
    for round in 1..=2u64 {
        let got = downloads(port, C, 5);
        for g in &got {
            assert!(
                !g.ok,
                "round {round}: a broken transfer, not a clean end: {g:?}"
            );
        }
        assert_eq!(
            origin.bytes_sent(C),
            round * size as u64,
            "round {round}: one fetch per round"
        );
        assert!(s.cached_ids().is_empty(), "nothing cached");
        assert!(!s.cache(C).exists());
    }
    d.stop();
}

#[test]
fn http_fill_joins_the_queues_prefetch_of_the_same_image() {
    let size = 8 << 20;
    let origin = Origin::start();
    let data = test_bytes(size, 8);
    origin.add(D, data.clone(), slow(size, 3.0));
    let (s, port) = setup(&origin.url(), "");
    let d = s.start();
    queue(&s, &[D]);
    eventually(SOON, "the prefetch is under way", || {
        origin.bytes_sent(D) > 0
    });
    let got = download(port, D);
    assert!(got.ok, "{got:?}");
    assert_eq!(got.md5, md5_hex(&data));
    eventually(SOON, "the image is cached", || s.cached_ids() == [D]);
    assert_cached_once(&s, D, &data);
    assert_eq!(origin.bytes_sent(D), size as u64, "one download");
    d.stop();
}

/// Nova's download, `images.data()`, pointed at glance-cached for an image it does not
/// have, the real glance-api upstream: the image's bytes (glanceclient checks them
/// against the Content-MD5 it is sent), then cached (row and verified file) and served
/// from the cache the second time; glance-api gave the whole image once.
#[test]
fn http_fill_glanceclient_reads_an_image_through_from_glance_api() {
    let Some(python) = glance_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let glance = GlanceApi::start(&GlanceApiOptions {
        cache_dir: None,
        database: &tmp.path().join("glance.sqlite"),
        node_url: "http://localhost:9292",
        keystone: None,
    })
    .unwrap();
    let data = test_bytes((5 << 20) + 321, 11);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let id = runtime.block_on(glance.create_image(&data));
    let glance_port: u16 = glance.url.rsplit(':').next().unwrap().parse().unwrap();
    // The daemon's upstream: glance-api behind a proxy that logs what it is asked.
    let (upstream_port, upstream_log) = crate::kit::routing_proxy(move |_| glance_port);
    let (s, port) = setup(&format!("http://127.0.0.1:{upstream_port}"), "");
    let d = s.start();
    // Nova's endpoint: downloads to glance-cached, the rest to glance-api (until the
    // daemon forwards it itself).
    let (endpoint, _) = crate::kit::routing_proxy(move |path| {
        if path.ends_with("/file") {
            port
        } else {
            glance_port
        }
    });
    let endpoint = format!("http://127.0.0.1:{endpoint}");
    let nova = |name: &str| {
        let out = tmp.path().join(name);
        let script = format!(
            "import glanceclient\n\
             c = glanceclient.Client('2', endpoint={endpoint:?}, token={TOKEN:?})\n\
             body = c.images.data({id:?})\n\
             open({out:?}, 'wb').write(b''.join(body))\n",
            out = out.display().to_string(),
        );
        let run = Command::new(&python)
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        std::fs::read(&out).unwrap()
    };
    // A range of an image not cached: glance-api's answer to the range, passed on,
    // and (http.fill_on_range) a fill in the background.
    let other = test_bytes(3 << 20, 12);
    let other_id = runtime.block_on(glance.create_image(&other));
    let range = Command::new("curl")
        .args(["-s", "-f", "-H", "Range: bytes=10-19", "-H"])
        .arg(format!("X-Auth-Token: {TOKEN}"))
        .arg(format!("http://127.0.0.1:{port}/v2/images/{other_id}/file"))
        .output()
        .unwrap();
    assert!(range.status.success(), "{range:?}");
    assert!(range.stdout == other[10..20], "the range's bytes");
    eventually(SOON, "the range started a fill", || {
        s.cached_ids() == [other_id.clone()]
    });
    assert!(std::fs::read(s.cache(&other_id)).unwrap() == other);
    let forget = s.cli(&["delete-cached", &other_id]);
    assert!(forget.status.success(), "{forget:?}");

    assert!(nova("first.img") == data, "images.data() of a miss");
    eventually(SOON, "the image is cached", || {
        s.cached_ids() == [id.clone()]
    });
    assert_cached_once(&s, &id, &data);
    assert!(nova("second.img") == data, "images.data() of a hit");
    // The second is a hit (flushed within http.hit_flush_interval); the first is one
    // too when the fill had ended before the request followed it. That the second did
    // not download again is the upstream's log below.
    eventually(SOON, "the second came from the cache", || {
        cached_json(&s)[0]["hits"]
            .as_u64()
            .is_some_and(|h| (1..=2).contains(&h))
    });
    let whole: Vec<String> = upstream_log
        .lock()
        .unwrap()
        .iter()
        .filter(|r| {
            r.starts_with(&format!("GET /v2/images/{id}/file")) && !r.ends_with("bytes=0-0")
        })
        .cloned()
        .collect();
    assert_eq!(
        whole,
        [format!("GET /v2/images/{id}/file bytes=0-")],
        "one ranged download of the whole image from glance-api"
    );
    d.stop();
}
