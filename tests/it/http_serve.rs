//! Image downloads from the built daemon (`GET`/`HEAD /v2/images/{id}/file`): curl
//! (whole, ranges, HEAD, conditionals) with the bytes compared to the cached file;
//! python-glanceclient's `images.data()` and `glance image-download` on an image the
//! daemon cached from the real glance-api; who may download (Glance's own answer to the
//! client's token, through a loopback origin that refuses or fails; the static modes);
//! and a client that stops reading, dropped after the send timeout.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use rustix::process::Signal;

use crate::kit::daemon::{Daemon, SOON, Setup, eventually, queue};
use crate::kit::glance::{GlanceApi, GlanceApiOptions, glance_python};
use crate::kit::origin::{Behaviour, Origin};
use crate::kit::{free_port, md5_hex};

const A: &str = "5e7e0000-0000-4000-8000-00000000000a";
const B: &str = "5e7e0000-0000-4000-8000-00000000000b";
const C: &str = "5e7e0000-0000-4000-8000-00000000000c";
const D: &str = "5e7e0000-0000-4000-8000-00000000000d";
const TOKEN: &str = "a-download-token-of-some-length";

/// A setup listening on a free loopback port; `extra` holds more `[http]` lines and
/// any later sections.
fn setup(extra: &str) -> (Setup, u16) {
    let port = free_port();
    let s = Setup::new("");
    write_config(&s, port, extra);
    (s, port)
}

fn write_config(s: &Setup, port: u16, extra: &str) {
    s.write_config(&format!(
        "[http]\nenabled = true\nlisten = [\"127.0.0.1:{port}\"]\n{extra}\n"
    ));
}

/// Rewrites the config and waits for the reload to be applied.
fn reload(s: &Setup, d: &mut Daemon, port: u16, extra: &str) {
    write_config(s, port, extra);
    let from = d.notify.mark();
    d.signal(Signal::HUP);
    let ready = d.notify.wait_for(from, SOON, |m| m.contains("READY=1"));
    assert!(
        !d.notify.messages[ready].contains("reload failed"),
        "{:?}",
        d.notify.messages[ready]
    );
}

struct Got {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Got {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// curl on the download path of `id`, with `args` before the URL.
fn curl(port: u16, id: &str, args: &[&str]) -> Got {
    let dir = tempfile::tempdir().unwrap();
    let (head, body) = (dir.path().join("head"), dir.path().join("body"));
    let out = Command::new("curl")
        .args(["-s", "-D"])
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(args)
        .arg(format!("http://127.0.0.1:{port}/v2/images/{id}/file"))
        .output()
        .unwrap();
    assert!(out.status.success(), "curl: {out:?}");
    let head = std::fs::read_to_string(&head).unwrap();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    Got {
        status,
        head,
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

fn with_token<'a>(token: &'a str, args: &[&'a str]) -> Vec<String> {
    let mut all = vec!["-H".to_owned(), format!("X-Auth-Token: {token}")];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    all
}

fn curl_token(port: u16, id: &str, token: &str, args: &[&str]) -> Got {
    let all = with_token(token, args);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    curl(port, id, &all)
}

fn assert_healthy(port: u16) {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}/healthz"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
}

/// An image across chunk boundaries (1 MiB chunks), not a multiple of any.
const SIZE: usize = (2 << 20) + 12_345;

#[test]
fn http_serve_curl_whole_ranges_head_and_conditionals() {
    let (s, port) = setup("serve_auth = \"none\"\nserve_allow = [\"127.0.0.0/8\"]");
    s.import(A, SIZE);
    let file = std::fs::read(s.cache(A)).unwrap();
    assert_eq!(file.len(), SIZE);
    let d = s.start();

    let whole = curl(port, A, &[]);
    assert_eq!(whole.status, 200, "{}", whole.head);
    assert!(whole.body == file, "the whole body is the cached file");
    assert_eq!(whole.header("content-length"), Some(SIZE.to_string()));
    assert_eq!(
        whole.header("content-type").as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(whole.header("content-md5"), Some(md5_hex(&file)));
    assert_eq!(whole.header("accept-ranges").as_deref(), Some("bytes"));
    let etag = whole.header("etag").expect("an ETag");
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");

    let size = SIZE as u64;
    for (range, first, last) in [
        ("0-0", 0, 0),
        ("100-1048675", 100, 1_048_675),
        ("1048576-", 1 << 20, size - 1),
        ("-5000", size - 5000, size - 1),
        ("10-99999999", 10, size - 1),
    ] {
        let part = curl(port, A, &["-H", &format!("Range: bytes={range}")]);
        assert_eq!(part.status, 206, "{range}: {}", part.head);
        assert_eq!(
            part.header("content-range"),
            Some(format!("bytes {first}-{last}/{size}")),
            "{range}"
        );
        assert_eq!(
            part.header("content-length"),
            Some((last - first + 1).to_string())
        );
        assert!(
            part.body == file[first as usize..=last as usize],
            "{range}: the bytes of the range"
        );
        // glance-api sends the image's checksum on ranges too.
        assert_eq!(part.header("content-md5"), Some(md5_hex(&file)));
    }

    for range in [
        format!("{size}-"),
        format!("{}-{}", size + 5, size + 9),
        "-0".into(),
    ] {
        let refused = curl(port, A, &["-H", &format!("Range: bytes={range}")]);
        assert_eq!(refused.status, 416, "{range}: {}", refused.head);
        assert_eq!(
            refused.header("content-range"),
            Some(format!("bytes */{size}"))
        );
    }

    // Several ranges: the whole image, as nginx answers them.
    let several = curl(port, A, &["-H", "Range: bytes=0-9,20-29"]);
    assert_eq!(several.status, 200);
    assert!(several.body == file);

    let head = curl(port, A, &["-I"]);
    assert_eq!(head.status, 200, "{}", head.head);
    assert_eq!(head.header("content-length"), Some(SIZE.to_string()));
    assert_eq!(head.header("etag"), Some(etag.clone()));
    // curl -I writes the head where the body would go: nothing else came.
    assert_eq!(head.body, head.head.as_bytes());

    let not_modified = curl(port, A, &["-H", &format!("If-None-Match: {etag}")]);
    assert_eq!(not_modified.status, 304, "{}", not_modified.head);
    assert!(not_modified.body.is_empty());
    let other = curl(port, A, &["-H", "If-None-Match: \"something-else\""]);
    assert_eq!(other.status, 200);
    assert!(other.body == file);

    let same = curl(
        port,
        A,
        &["-H", "Range: bytes=5-9", "-H", &format!("If-Range: {etag}")],
    );
    assert_eq!(same.status, 206);
    assert!(same.body == file[5..=9]);
    let changed = curl(
        port,
        A,
        &[
            "-H",
            "Range: bytes=5-9",
            "-H",
            "If-Range: \"an-older-copy\"",
        ],
    );
    assert_eq!(changed.status, 200, "a changed image is sent whole");
    assert!(changed.body == file);

    // Not cached, or not an id: Glance's 404; other methods: 405.
    assert_eq!(curl(port, B, &[]).status, 404);
    assert_eq!(curl(port, "..%2F..%2Fetc", &[]).status, 404);
    let put = curl(port, A, &["-X", "PUT"]);
    assert_eq!(put.status, 405);
    assert_eq!(put.header("allow").as_deref(), Some("GET, HEAD"));
    assert_healthy(port);
    d.stop();
}

/// Images up to 64 KiB are read whole at their open and sent from memory (no
/// `sendfile`): the same bytes, ranges, `ETag`, `If-Range` and 304 as a streamed body.
/// One byte more and the body streams again (`sendfile` on plain TCP).
#[test]
fn http_serve_small_images_from_memory_answer_as_streamed_ones() {
    let (s, port) = setup("serve_auth = \"none\"\nserve_allow = [\"127.0.0.0/8\"]");
    let (small, limit, over) = (5000, 64 << 10, (64 << 10) + 1);
    s.import(A, small);
    s.import(B, limit);
    s.import(C, over);
    let d = s.start();
    let before = sendfile_bytes(&scrape(port));
    for (id, size) in [(A, small), (B, limit)] {
        let file = std::fs::read(s.cache(id)).unwrap();
        let whole = curl(port, id, &[]);
        assert_eq!(whole.status, 200, "{}", whole.head);
        assert!(whole.body == file, "{size}: the whole body is the file");
        assert_eq!(whole.header("content-length"), Some(size.to_string()));
        assert_eq!(whole.header("content-md5"), Some(md5_hex(&file)));
        let etag = whole.header("etag").expect("an ETag");
        let size = size as u64;
        for (range, first, last) in [
            ("0-0", 0, 0),
            ("100-199", 100, 199),
            ("-100", size - 100, size - 1),
            ("4990-", 4990, size - 1),
            ("10-99999999", 10, size - 1),
        ] {
            let part = curl(port, id, &["-H", &format!("Range: bytes={range}")]);
            assert_eq!(part.status, 206, "{size} {range}: {}", part.head);
            assert_eq!(
                part.header("content-range"),
                Some(format!("bytes {first}-{last}/{size}"))
            );
            assert!(
                part.body == file[first as usize..=last as usize],
                "{size} {range}: the bytes of the range"
            );
        }
        let refused = curl(port, id, &["-H", &format!("Range: bytes={size}-")]);
        assert_eq!(refused.status, 416);
        let same = curl(
            port,
            id,
            &["-H", "Range: bytes=5-9", "-H", &format!("If-Range: {etag}")],
        );
        assert_eq!(same.status, 206);
        assert!(same.body == file[5..=9]);
        let changed = curl(
            port,
            id,
            &[
                "-H",
                "Range: bytes=5-9",
                "-H",
                "If-Range: \"an-older-copy\"",
            ],
        );
        assert_eq!(changed.status, 200);
        assert!(changed.body == file);
        let not_modified = curl(port, id, &["-H", &format!("If-None-Match: {etag}")]);
        assert_eq!(not_modified.status, 304);
        assert!(not_modified.body.is_empty());
        let head = curl(port, id, &["-I"]);
        assert_eq!(head.header("content-length"), Some(size.to_string()));
        assert_eq!(head.body, head.head.as_bytes());
    }
    assert_eq!(
        sendfile_bytes(&scrape(port)),
        before,
        "bodies up to 64 KiB go from memory, not by sendfile"
    );
    let file = std::fs::read(s.cache(C)).unwrap();
    let streamed = curl(port, C, &[]);
    assert_eq!(streamed.status, 200);
    assert!(streamed.body == file);
    assert_eq!(
        sendfile_bytes(&scrape(port)) - before,
        over as u64,
        "past 64 KiB the body streams by sendfile"
    );
    assert_healthy(port);
    d.stop();
}

/// `glance_cached_http_sendfile_bytes_total` from the daemon's `/metrics`.
pub(crate) fn sendfile_bytes(scrape: &str) -> u64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix("glance_cached_http_sendfile_bytes_total "))
        .unwrap_or_else(|| panic!("no sendfile counter in {scrape}"))
        .trim()
        .parse()
        .unwrap()
}

fn scrape(port: u16) -> String {
    let out = Command::new("curl")
        .args(["-s", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// On plain TCP the bodies go out with `sendfile` (the counter moves by exactly the
/// bytes of the bodies), right, on one keep-alive connection carrying whole images,
/// ranges across chunk boundaries and answers without a body in between (curl's
/// `--next` reuses the connection: one connect in all).
#[test]
fn http_serve_sendfile_carries_bodies_over_one_keep_alive_connection() {
    let (s, port) = setup("serve_auth = \"none\"\nserve_allow = [\"127.0.0.0/8\"]");
    s.import(A, SIZE);
    let file = std::fs::read(s.cache(A)).unwrap();
    let d = s.start();
    let before = sendfile_bytes(&scrape(port));

    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/v2/images/{A}/file");
    let (first, last) = (1_000_000, 2_100_000);
    let requests: [(&[&str], u16); 7] = [
        (&[], 200),
        (&["-I"], 200),
        (&["-H", "Range: bytes=1000000-2100000"], 206),
        (&["-H", "Range: bytes=99999999-"], 416),
        (&["-H", "If-None-Match: *"], 304),
        (&[], 200),
        (&["-H", "Range: bytes=-5"], 206),
    ];
    let mut cmd = Command::new("curl");
    for (i, (args, _)) in requests.iter().enumerate() {
        if i > 0 {
            cmd.arg("--next");
        }
        cmd.args(["-s", "-w", "%{http_code} %{num_connects}\\n", "-o"])
            .arg(dir.path().join(i.to_string()))
            .args(*args)
            .arg(&url);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "curl: {out:?}");
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let wanted: Vec<String> = requests
        .iter()
        .enumerate()
        .map(|(i, (_, status))| format!("{status} {}", u8::from(i == 0)))
        .collect();
    assert_eq!(lines, wanted, "statuses, and one connection for all");
    let body = |i: usize| std::fs::read(dir.path().join(i.to_string())).unwrap();
    assert!(body(0) == file, "the whole image");
    assert!(body(2) == file[first..=last], "the range");
    assert!(body(5) == file, "the whole image again");
    assert!(body(6) == file[SIZE - 5..], "the last bytes");

    let sent = sendfile_bytes(&scrape(port)) - before;
    let bodies = 2 * SIZE + (last - first + 1) + 5;
    assert_eq!(sent, bodies as u64, "sendfile carried every body byte");
    assert_healthy(port);
    d.stop();
}

/// A file cut shorter on disk while a slow client downloads it ends the transfer with
/// an error (curl's 18, a partial file), never a clean short body; the daemon serves on.
#[test]
fn http_serve_cuts_the_connection_when_the_file_shrinks_mid_transfer() {
    let (s, port) = setup("serve_auth = \"none\"\nserve_allow = [\"127.0.0.0/8\"]");
    // More than the socket buffers of both ends hold: the daemon is still sending.
    let size = 64 << 20;
    s.import(A, size);
    let d = s.start();
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    let mut slow = Command::new("curl")
        .args(["-s", "--limit-rate", "2M", "-o"])
        .arg(&body)
        .arg(format!("http://127.0.0.1:{port}/v2/images/{A}/file"))
        .spawn()
        .unwrap();
    eventually(SOON, "the download started", || {
        std::fs::metadata(&body).is_ok_and(|m| m.len() > 1 << 20)
    });
    std::fs::OpenOptions::new()
        .write(true)
        .open(s.cache(A))
        .unwrap()
        .set_len(size as u64 / 8)
        .unwrap();
    let status = slow.wait().unwrap();
    assert_eq!(status.code(), Some(18), "curl saw a partial file");
    let got = std::fs::metadata(&body).unwrap().len();
    assert!(got < size as u64, "{got} of {size} bytes");
    assert_healthy(port);
    d.stop();
}

/// Without a Glance upstream: nobody downloads until `serve_auth` says who (fail
/// closed); `token` wants the static token; `none` the client's network.
#[test]
fn http_serve_static_modes_refuse_whom_they_should() {
    let (s, port) = setup("");
    s.import(A, 5000);
    let file = std::fs::read(s.cache(A)).unwrap();
    let token_file = s.tmp.path().join("serve-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut d = s.start();
    assert_eq!(curl(port, A, &[]).status, 403, "nothing configured: 403");
    assert_eq!(curl_token(port, A, TOKEN, &[]).status, 403);

    reload(
        &s,
        &mut d,
        port,
        &format!(
            "serve_auth = \"token\"\nserve_token_file = \"{}\"",
            token_file.display()
        ),
    );
    let none = curl(port, A, &[]);
    assert_eq!(none.status, 401);
    assert!(none.body != file);
    assert_eq!(curl_token(port, A, &format!("{TOKEN}x"), &[]).status, 401);
    assert_eq!(curl_token(port, A, "a-download-token", &[]).status, 401);
    let good = curl_token(port, A, TOKEN, &[]);
    assert_eq!(good.status, 200);
    assert!(good.body == file);

    reload(
        &s,
        &mut d,
        port,
        "serve_auth = \"none\"\nserve_allow = [\"10.0.0.0/8\", \"::1/128\", \"unix\"]",
    );
    assert_eq!(curl(port, A, &[]).status, 403, "127.0.0.1 is not allowed");
    reload(
        &s,
        &mut d,
        port,
        "serve_auth = \"none\"\nserve_allow = [\"10.0.0.0/8\", \"127.0.0.1\"]",
    );
    let allowed = curl(port, A, &[]);
    assert_eq!(allowed.status, 200);
    assert!(allowed.body == file);
    d.stop();
}

/// With a Glance upstream, Glance's answer to the client's own token decides: asked for
/// one byte with a range, its refusals passed on, its failures 503, its yes remembered
/// until `auth_cache_ttl` (reloaded shorter) runs out.
#[test]
fn http_serve_asks_the_glance_upstream_with_the_clients_token() {
    let origin = Origin::start();
    origin.require_token(TOKEN);
    let data = crate::kit::test_bytes(70_000, 3);
    origin.add(A, data.clone(), Behaviour::default());
    let refusing = |status| Behaviour {
        fail_times: u32::MAX,
        fail_status: status,
        ..Default::default()
    };
    origin.add(B, data.clone(), refusing(403));
    origin.add(C, data.clone(), refusing(500));
    let upstream = format!(
        "[upstream]\nkind = \"glance\"\nurl = \"{}\"\n",
        origin.url()
    );
    let (s, port) = setup(&format!("auth_cache_ttl = \"1h\"\n{upstream}"));
    for id in [A, B, C, D] {
        s.import(id, 70_000);
    }
    let file = std::fs::read(s.cache(A)).unwrap();
    let mut d = s.start();

    let none = curl(port, A, &[]);
    assert_eq!(none.status, 401, "no token: 401 before anything");
    assert_eq!(
        origin.file_requests(A),
        0,
        "without a token Glance is not asked"
    );
    let wrong = curl_token(port, A, "not-the-token", &[]);
    assert_eq!(wrong.status, 401, "the upstream's 401 passed on");
    assert!(wrong.body != file);
    assert_eq!(curl_token(port, B, TOKEN, &[]).status, 403, "its 403");
    assert_eq!(curl_token(port, D, TOKEN, &[]).status, 404, "its 404");
    assert_eq!(curl_token(port, C, TOKEN, &[]).status, 503, "its 500: 503");
    for id in [B, C, D] {
        assert_eq!(
            curl_token(port, id, TOKEN, &["-I"]).status,
            curl_token(port, id, TOKEN, &[]).status
        );
    }

    let good = curl_token(port, A, TOKEN, &[]);
    assert_eq!(good.status, 200, "{}", good.head);
    assert!(good.body == file);
    let asked = origin.file_requests(A);
    let again = curl_token(port, A, TOKEN, &["-H", "Range: bytes=1-2"]);
    assert_eq!(again.status, 206);
    assert_eq!(origin.file_requests(A), asked, "the yes is remembered");

    // The upstream changes its mind (the token is revoked): remembered for the TTL,
    // seen once a reload shortens it.
    origin.require_token("another-token");
    assert_eq!(curl_token(port, A, TOKEN, &[]).status, 200);
    reload(
        &s,
        &mut d,
        port,
        &format!("auth_cache_ttl = \"1s\"\n{upstream}"),
    );
    std::thread::sleep(Duration::from_millis(1100));
    let revoked = curl_token(port, A, TOKEN, &[]);
    assert_eq!(revoked.status, 401, "{}", revoked.head);
    assert!(revoked.body != file);

    // An upstream that is gone: 503, no byte.
    drop(origin);
    let gone = curl_token(port, A, "another-token", &[]);
    assert_eq!(gone.status, 503);
    assert_healthy(port);
    d.stop();
}

/// A client that asks for a large image and reads nothing is dropped after
/// `send_timeout` (well before the idle timeout); the daemon serves others meanwhile.
#[test]
fn http_serve_drops_a_client_that_stops_reading() {
    let (s, port) = setup(
        "serve_auth = \"none\"\nserve_allow = [\"127.0.0.1\"]\nsend_timeout = \"1s\"\nidle_timeout = \"10m\"",
    );
    let size = 64 << 20;
    s.import(A, size);
    let d = s.start();
    let mut stalled = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stalled,
        "GET /v2/images/{A}/file HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert_healthy(port);
    stalled
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut got = Vec::new();
    let _ = stalled.read_to_end(&mut got);
    assert!(
        got.len() < size,
        "the stalled client was dropped ({} bytes of {size} reached it)",
        got.len()
    );
    assert_eq!(curl(port, A, &["-H", "Range: bytes=0-9"]).status, 206);
    assert_healthy(port);
    d.stop();
}

/// A stand-in for the forwarding of what this daemon does not serve, until it lands:
/// `/v2/images/{id}/file` goes to glance-cached, everything else to glance-api, one
/// request per connection (`Connection: close` is added on the way).
fn split_proxy(cached: u16, glance: u16) -> u16 {
    crate::kit::routing_proxy(move |path| {
        if path.ends_with("/file") {
            cached
        } else {
            glance
        }
    })
    .0
}

/// Nova's download (`images.data()`) and `glance image-download`, pointed at
/// glance-cached, of an image it cached from the real glance-api: the bytes are the
/// image's, and glanceclient's own checks of them (os_hash_value, Content-MD5) pass.
#[test]
fn http_serve_glance_clients_download_from_the_cache() {
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
    let data = crate::kit::test_bytes((3 << 20) + 777, 9);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let id = runtime.block_on(glance.create_image(&data));
    let (s, port) = setup(&format!(
        "[upstream]\nkind = \"glance\"\nurl = \"{}\"\n",
        glance.url
    ));
    let d = s.start();
    queue(&s, &[&id]);
    eventually(SOON * 3, "the image is cached from glance-api", || {
        s.cached_ids() == [id.clone()]
    });
    let cached = std::fs::read(s.cache(&id)).unwrap();
    assert!(cached == data);
    let glance_port: u16 = glance.url.rsplit(':').next().unwrap().parse().unwrap();
    let endpoint = format!("http://127.0.0.1:{}", split_proxy(port, glance_port));

    let out = tmp.path().join("nova.img");
    let script = format!(
        "import glanceclient\n\
         c = glanceclient.Client('2', endpoint={endpoint:?}, token='any-token')\n\
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
    assert!(std::fs::read(&out).unwrap() == data, "images.data() bytes");

    let cli_out = tmp.path().join("cli.img");
    let bin = python.parent().unwrap().join("glance");
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars() {
        if k.starts_with("OS_") {
            cmd.env_remove(k);
        }
    }
    let run = cmd
        .env("HOME", tmp.path())
        .args(["--os-image-api-version", "2", "--os-image-url", &endpoint])
        .args(["--os-auth-token", "any-token", "image-download", "--file"])
        .arg(&cli_out)
        .arg(&id)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        std::fs::read(&cli_out).unwrap() == data,
        "image-download bytes"
    );

    // Both came from the cache: each counted a hit there, written within
    // http.hit_flush_interval.
    eventually(SOON, "two hits written", || {
        crate::kit::daemon::cached_json(&s)[0]["hits"].as_u64() == Some(2)
    });
    assert!(no_token_leak(&d.log_text()), "no token in the daemon's log");
    d.stop();
}

fn no_token_leak(log: &str) -> bool {
    !log.contains("any-token") && !log.contains(TOKEN)
}

/// Real RBAC: glance-api behind Keystone decides, with each client's own token. The
/// owner's member downloads; another project's member gets glance-api's 404, an
/// invalid token its 401, and no byte; once the image is deactivated the owner (not an
/// admin) gets its 403 while an admin still downloads, as glance-api answers them.
#[test]
fn http_serve_keystone_rbac_decides_as_glance_api() {
    if glance_python().is_none() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Some(keystone) = crate::kit::keystone::Keystone::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let database = tmp.path().join("glance.sqlite");
    let glance = GlanceApi::start(&GlanceApiOptions {
        cache_dir: None,
        database: &database,
        node_url: "http://localhost:9292",
        keystone: Some(&keystone),
    })
    .unwrap();
    let (owner, other, admin) = runtime.block_on(async {
        let p = keystone.create_project("serve-owner").await;
        let q = keystone.create_project("serve-other").await;
        keystone
            .create_user("serve-owner", "owner-secret", &p, "member")
            .await;
        keystone
            .create_user("serve-other", "other-secret", &q, "member")
            .await;
        (
            keystone
                .token("serve-owner", "owner-secret", "serve-owner")
                .await,
            keystone
                .token("serve-other", "other-secret", "serve-other")
                .await,
            keystone.admin_token().await,
        )
    });
    // The bytes `Setup::import` caches for this length.
    let len = 90_000;
    let data = crate::kit::test_bytes(len, len as u8);
    let id = runtime.block_on(glance.create_image_as(Some(&owner), &data));
    let (s, port) = setup(&format!(
        "auth_cache_ttl = \"0s\"\n[upstream]\nkind = \"glance\"\nurl = \"{}\"\n",
        glance.url
    ));
    s.import(&id, len);
    let d = s.start();

    let mine = curl_token(port, &id, &owner, &[]);
    assert_eq!(mine.status, 200, "{}\n{}", mine.head, glance.log_text());
    assert!(mine.body == data);
    let theirs = curl_token(port, &id, &other, &[]);
    assert_eq!(theirs.status, 404, "another project's private image");
    assert!(theirs.body != data);
    let invalid = curl_token(port, &id, "not-a-keystone-token", &[]);
    assert_eq!(invalid.status, 401);

    runtime.block_on(glance.deactivate(&admin, &id));
    let deactivated = curl_token(port, &id, &owner, &[]);
    assert_eq!(
        deactivated.status, 403,
        "deactivated: refused to non-admins"
    );
    assert!(deactivated.body != data);
    let by_admin = curl_token(port, &id, &admin, &[]);
    assert_eq!(by_admin.status, 200, "an admin still downloads it");
    assert!(by_admin.body == data);
    assert!(
        !d.log_text().contains(&owner) && !d.log_text().contains(&admin),
        "no token in the daemon's log"
    );
    d.stop();
}
