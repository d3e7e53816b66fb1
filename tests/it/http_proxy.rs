//! Forwarding (`http.forward`) and upstream failover against the built daemon: Glance's
//! own client (`glance image-*`, python-glanceclient's `Client`) pointed at glance-cached
//! with the real glance-api 33 as the upstream, each effect checked at glance-api
//! directly; a delete through us drops our copy; the headers a proxy must drop, and
//! those it adds, seen by a loopback origin of our own; version links rewritten to
//! `http.public_url`; one of two endpoints down.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::kit::daemon::{Setup, eventually, queued_json};
use crate::kit::glance::{GlanceApi, GlanceApiOptions, glance_python};
use crate::kit::origin::{Behaviour, Origin};
use crate::kit::{free_port, md5_hex, test_bytes};

/// Our cache API's admin token.
const TOKEN: &str = "an-admin-token-of-some-length";
/// What clients send glance-api (which runs without Keystone and ignores it).
const USER_TOKEN: &str = "a-user-token";
const PUBLIC: &str = "https://glance-edge.example.org:9393";

/// A daemon forwarding to the Glance endpoints `urls`, listening on a free port.
fn setup(urls: &[String], extra_http: &str, extra_upstream: &str) -> (Setup, u16) {
    let port = free_port();
    let s = Setup::new("");
    let token = s.tmp.path().join("admin-token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let urls: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    s.write_config(&format!(
        "[http]\nenabled = true\nlisten = [\"127.0.0.1:{port}\"]\nadmin_token_file = \"{}\"\nforward = true\n{extra_http}\n\
         [upstream]\nkind = \"glance\"\nurl = [{}]\n{extra_upstream}\n",
        token.display(),
        urls.join(", ")
    ));
    (s, port)
}

fn glance_api(s: &Setup) -> Option<GlanceApi> {
    let database = s.tmp.path().join("glance.db");
    GlanceApi::start(&GlanceApiOptions {
        cache_dir: None,
        database: &database,
        node_url: "http://glance-node:9292",
        keystone: None,
    })
}

struct Answer {
    status: u16,
    body: String,
}

/// One request on its own connection, its head written by the test.
fn raw(port: u16, head: &str) -> Answer {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    // The bodies asked for here are JSON, sent whole or chunked: the JSON is what is
    // between the first `{`/`[` and the last `}`/`]`.
    let body = match (body.find(['{', '[']), body.rfind(['}', ']'])) {
        (Some(a), Some(b)) if a <= b => body[a..=b].to_owned(),
        _ => body.to_owned(),
    };
    Answer { status, body }
}

fn get(port: u16, path: &str, token: &str) -> Answer {
    raw(
        port,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Auth-Token: {token}\r\nConnection: close\r\n\r\n"
        ),
    )
}

fn json(a: &Answer) -> serde_json::Value {
    serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{e}: {}", a.body))
}

/// Glance's client from the suite's virtualenv, on our listener, with a user's token.
fn glance(python: &Path, home: &Path, port: u16, args: &[&str]) -> Output {
    crate::kit::glance::glance_cli(python, home, port, USER_TOKEN, args)
}

fn ok(out: &Output) -> String {
    crate::kit::glance::succeeded(out)
}

/// The value of `field` in the client's `| field | value |` table.
fn table_field(table: &str, field: &str) -> Option<String> {
    table.lines().find_map(|l| {
        let cells: Vec<&str> = l.split('|').map(str::trim).collect();
        (cells.len() >= 3 && cells[1] == field).then(|| cells[2].to_owned())
    })
}

/// The image as glance-api itself has it: `None` once it does not know it.
async fn direct(api: &GlanceApi, id: &str) -> Option<serde_json::Value> {
    let response = reqwest::get(format!("{}/v2/images/{id}", api.url))
        .await
        .unwrap();
    if response.status() == 404 {
        return None;
    }
    assert_eq!(response.status(), 200);
    Some(response.json().await.unwrap())
}

/// The peak resident memory of process `pid` (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// `glance image-create`, `image-upload` (64 MiB, streamed: the daemon's peak memory
/// does not grow by the file), `image-list`, `image-show` and `image-delete` through
/// glance-cached, each landing in the real glance-api; python-glanceclient's
/// `images.get` through us equals a direct one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_glance_client_lands_in_the_real_glance() {
    let Some(python) = glance_python() else {
        return;
    };
    let s0 = Setup::new("");
    let Some(api) = glance_api(&s0) else {
        return;
    };
    let (s, port) = setup(std::slice::from_ref(&api.url), "", "");
    let d = s.start();
    let home = s.tmp.path();

    let created = ok(&glance(
        &python,
        home,
        port,
        &[
            "image-create",
            "--name",
            "through-the-edge",
            "--disk-format",
            "raw",
            "--container-format",
            "bare",
        ],
    ));
    let id = table_field(&created, "id").unwrap_or_else(|| panic!("{created}"));
    let image = direct(&api, &id).await.expect("created in glance-api");
    assert_eq!(image["name"], "through-the-edge");
    assert_eq!(image["status"], "queued");

    const SIZE: usize = 64 << 20;
    let data = test_bytes(SIZE, 3);
    let file = s.tmp.path().join("image.raw");
    std::fs::write(&file, &data).unwrap();
    let before = peak_rss(d.child.id());
    ok(&glance(
        &python,
        home,
        port,
        &["image-upload", "--file", file.to_str().unwrap(), &id],
    ));
    let grown = peak_rss(d.child.id()).saturating_sub(before);
    assert!(
        grown < (SIZE / 4) as u64,
        "the daemon's peak memory grew by {grown} bytes for a {SIZE}-byte upload"
    );
    let image = direct(&api, &id).await.unwrap();
    assert_eq!(image["status"], "active", "{image}");
    assert_eq!(image["size"], SIZE);
    assert_eq!(image["checksum"], md5_hex(&data));

    let listed = ok(&glance(&python, home, port, &["image-list"]));
    assert!(listed.contains(&id), "{listed}");
    let shown = ok(&glance(&python, home, port, &["image-show", &id]));
    assert_eq!(
        table_field(&shown, "checksum").as_deref(),
        Some(md5_hex(&data).as_str()),
        "{shown}"
    );

    // Nova's client: the image record through us is the one glance-api gives.
    let script = "import json, sys\nfrom glanceclient import Client\n\
                  ours = Client('2', endpoint=sys.argv[1], token=sys.argv[3]).images.get(sys.argv[4])\n\
                  direct = Client('2', endpoint=sys.argv[2], token=sys.argv[3]).images.get(sys.argv[4])\n\
                  print(json.dumps([dict(ours), dict(direct)]))\n";
    let out = Command::new(&python)
        .args(["-c", script, &format!("http://127.0.0.1:{port}"), &api.url])
        .args([USER_TOKEN, &id])
        .env("HOME", home)
        .output()
        .unwrap();
    let both: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(both[0], both[1]);
    assert_eq!(both[0]["id"], id.as_str());

    ok(&glance(&python, home, port, &["image-delete", &id]));
    assert!(direct(&api, &id).await.is_none(), "deleted in glance-api");

    // The upstream's version document, its links ours when public_url is set (not
    // here: they pass as glance-api wrote them).
    let versions = get(port, "/versions", USER_TOKEN);
    assert_eq!(versions.status, 200, "{}", versions.body);
    let direct_versions: serde_json::Value = reqwest::get(format!("{}/versions", api.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(json(&versions), direct_versions);
    d.stop();
}

/// Version documents (`/versions` 200, `/` 300) are glance-api's, with every link on
/// `http.public_url`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_version_links_point_at_the_public_url() {
    let s0 = Setup::new("");
    let Some(api) = glance_api(&s0) else {
        return;
    };
    let (s, port) = setup(
        std::slice::from_ref(&api.url),
        &format!("public_url = \"{PUBLIC}\""),
        "",
    );
    let d = s.start();
    let direct: serde_json::Value = reqwest::get(format!("{}/versions", api.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for (path, status) in [("/versions", 200), ("/", 300)] {
        let answer = get(port, path, USER_TOKEN);
        assert_eq!(answer.status, status, "{path}: {}", answer.body);
        let doc = json(&answer);
        let ids = |d: &serde_json::Value| -> Vec<String> {
            d["versions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v["id"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(ids(&doc), ids(&direct), "the upstream's versions");
        for v in doc["versions"].as_array().unwrap() {
            for link in v["links"].as_array().unwrap() {
                let href = link["href"].as_str().unwrap();
                assert!(href.starts_with(&format!("{PUBLIC}/v2")), "{path}: {href}");
            }
        }
    }
    d.stop();
}

/// A `DELETE /v2/images/{id}` through us that glance-api accepts removes our cached
/// copy (file and row) and our queue entry, as Glance's cache middleware does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_delete_removes_our_copy_and_queue_entry() {
    let s0 = Setup::new("");
    let Some(api) = glance_api(&s0) else {
        return;
    };
    let (s, port) = setup(std::slice::from_ref(&api.url), "", "");
    let data = test_bytes(8192, 5);
    let cached = api.create_image(&data).await;
    // An image without data (status `queued` in Glance): our queue keeps its row.
    let created: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v2/images", api.url))
        .json(&serde_json::json!({"name": "e", "disk_format": "raw", "container_format": "bare"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let empty = created["id"].as_str().unwrap().to_owned();
    let d = s.start();
    let queue = |id: &str| {
        let a = raw(
            port,
            &format!(
                "PUT /v2/cache/{id} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        );
        a.status
    };
    assert_eq!(queue(&cached), 202);
    eventually(Duration::from_secs(30), "the image is prefetched", || {
        s.cached_ids() == [cached.clone()]
    });
    crate::kit::daemon::queue(&s, &[&empty]);
    let in_queue = |id: &str| queued_json(&s).iter().any(|r| r["image_id"] == id);
    assert!(in_queue(&empty));

    let delete = |id: &str| {
        raw(
            port,
            &format!(
                "DELETE /v2/images/{id} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {USER_TOKEN}\r\nConnection: close\r\n\r\n"
            ),
        )
        .status
    };
    assert_eq!(delete(&cached), 204);
    assert!(direct(&api, &cached).await.is_none());
    assert!(s.cached_ids().is_empty(), "our row is gone");
    assert!(!s.cache(&cached).exists(), "our file is gone");
    assert_eq!(delete(&empty), 204);
    assert!(!in_queue(&empty), "our queue entry is gone");
    // A delete glance-api refuses (it knows no such image) leaves ours alone.
    let other = api.create_image(&data).await;
    assert_eq!(queue(&other), 202);
    eventually(Duration::from_secs(30), "the image is prefetched", || {
        s.cached_ids() == [other.clone()]
    });
    assert_eq!(delete("0c1d2e3f-0000-4000-8000-0000000000ff"), 404);
    assert_eq!(s.cached_ids(), [other]);
    d.stop();
}

/// Hop-by-hop headers (`Connection` and what it names, `Keep-Alive`, `TE`, `Upgrade`,
/// `Proxy-*`) do not reach the upstream; `X-Auth-Token` does; `X-Forwarded-For` gets
/// the peer appended, with `X-Forwarded-Proto` and `-Host`; `Host` is the upstream's.
#[test]
fn http_proxy_drops_hop_by_hop_headers_and_adds_forwarded_ones() {
    let origin = Origin::start();
    let id = "0c1d2e3f-0000-4000-8000-000000000001";
    origin.add(id, test_bytes(100, 1), Behaviour::default());
    let (s, port) = setup(&[origin.url()], "", "");
    let d = s.start();
    let answer = raw(
        port,
        &format!(
            "GET /v2/images/{id}?member_status=all HTTP/1.1\r\nHost: edge.example.org:{port}\r\n\
             Connection: close, X-Foo\r\nX-Foo: secret-hop\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
             Upgrade: websocket\r\nProxy-Authorization: Basic eA==\r\nX-Auth-Token: {USER_TOKEN}\r\n\
             X-Forwarded-For: 10.1.2.3\r\nX-End-To-End: kept\r\n\r\n"
        ),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(json(&answer)["id"], id);
    let (path, headers) = origin.with_stats(|st| {
        st.requests
            .iter()
            .find(|(p, _)| p.starts_with("/v2/images/"))
            .cloned()
            .unwrap()
    });
    assert_eq!(path, format!("/v2/images/{id}?member_status=all"));
    for dropped in [
        "x-foo",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(!headers.contains_key(dropped), "{dropped}: {headers:?}");
    }
    assert_ne!(
        headers.get("connection").map(String::as_str),
        Some("close, X-Foo")
    );
    assert_eq!(headers["x-auth-token"], USER_TOKEN);
    assert_eq!(headers["x-end-to-end"], "kept");
    assert_eq!(headers["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(
        headers["x-forwarded-host"],
        format!("edge.example.org:{port}")
    );
    assert_eq!(headers["host"], format!("127.0.0.1:{}", origin.port));
    d.stop();
}

/// One of two Glance endpoints down (a closed port, listed first): forwarded requests,
/// the cache API's lookups and prefetching go through the other; the metrics say which
/// endpoint is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_fails_over_to_the_endpoint_that_is_up() {
    let s0 = Setup::new("");
    let Some(api) = glance_api(&s0) else {
        return;
    };
    let closed = format!("http://127.0.0.1:{}", free_port());
    let (s, port) = setup(&[closed, api.url.clone()], "", "down_for = \"10m\"");
    let data = test_bytes(16384, 8);
    let id = api.create_image(&data).await;
    let d = s.start();
    // First the cache API's lookup and the prefetch, which find the closed port
    // themselves; then forwarded requests.
    let queued = raw(
        port,
        &format!(
            "PUT /v2/cache/{id} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(queued.status, 202, "{}", queued.body);
    eventually(Duration::from_secs(30), "the image is prefetched", || {
        s.cached_ids() == [id.clone()]
    });
    assert_eq!(std::fs::read(s.cache(&id)).unwrap(), data);
    for _ in 0..3 {
        let listed = get(port, "/v2/images", USER_TOKEN);
        assert_eq!(listed.status, 200, "{}", listed.body);
        assert!(listed.body.contains(&id), "{}", listed.body);
    }
    // A request with a body goes to the endpoint that is up.
    let body = r#"{"name": "failover", "disk_format": "raw", "container_format": "bare"}"#;
    let created = raw(
        port,
        &format!(
            "POST /v2/images HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {USER_TOKEN}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert_eq!(created.status, 201, "{}", created.body);
    let new_id = json(&created)["id"].as_str().unwrap().to_owned();
    assert!(direct(&api, &new_id).await.is_some());
    let scrape = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        scrape.contains("glance_cached_upstream_endpoint_up{endpoint=\"0\"} 0"),
        "{scrape}"
    );
    assert!(
        scrape.contains("glance_cached_upstream_endpoint_up{endpoint=\"1\"} 1"),
        "{scrape}"
    );
    assert!(
        !scrape.contains("glance_cached_http_forwarded_requests_total{class=\"2xx\"} 0"),
        "{scrape}"
    );
    d.stop();
}

/// A forwarded upload is not bounded by `http.max_request_body` but stalls out after
/// `http.idle_timeout` without a byte (408), and the daemon stays healthy.
#[test]
fn http_proxy_a_stalled_upload_is_cut_at_the_idle_timeout() {
    let origin = Origin::start();
    let (s, port) = setup(
        &[origin.url()],
        "idle_timeout = \"1s\"\nmax_request_body = \"1KiB\"",
        "",
    );
    let d = s.start();
    let id = "0c1d2e3f-0000-4000-8000-000000000002";
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // 1 MiB announced, 4 KiB sent (more than max_request_body), then nothing.
    write!(
        stream,
        "PUT /v2/images/{id}/file HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {USER_TOKEN}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: 1048576\r\n\r\n"
    )
    .unwrap();
    stream.write_all(&[7u8; 4096]).unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(&head[9..12], b"408", "{}", String::from_utf8_lossy(&head));
    let health = get(port, "/healthz", "");
    assert_eq!(health.status, 200, "{}", health.body);
    d.stop();
}

/// Two glance-apis on one database, the first stopped mid-test: forwarded requests,
/// the cache API's lookups and prefetching carry on through the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_carries_on_when_a_glance_api_stops_mid_test() {
    let s0 = Setup::new("");
    let database = s0.tmp.path().join("glance.db");
    let options = GlanceApiOptions {
        cache_dir: None,
        database: &database,
        node_url: "http://glance-node:9292",
        keystone: None,
    };
    let Some(first) = GlanceApi::start(&options) else {
        return;
    };
    let second = GlanceApi::start(&options).unwrap();
    let (s, port) = setup(
        &[first.url.clone(), second.url.clone()],
        "",
        "down_for = \"10m\"",
    );
    let d = s.start();
    let before = first.create_image(&test_bytes(4096, 1)).await;
    let listed = get(port, "/v2/images", USER_TOKEN);
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert!(listed.body.contains(&before), "{}", listed.body);

    drop(first);
    // The image's bytes are in the stopped one's store; its record is in both.
    let data = test_bytes(8192, 2);
    let after = second.create_image(&data).await;
    for _ in 0..3 {
        let listed = get(port, "/v2/images", USER_TOKEN);
        assert_eq!(listed.status, 200, "{}", listed.body);
        assert!(
            listed.body.contains(&before) && listed.body.contains(&after),
            "{}",
            listed.body
        );
    }
    let queued = raw(
        port,
        &format!(
            "PUT /v2/cache/{after} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(queued.status, 202, "{}", queued.body);
    eventually(Duration::from_secs(30), "the image is prefetched", || {
        s.cached_ids() == [after.clone()]
    });
    assert_eq!(std::fs::read(s.cache(&after)).unwrap(), data);
    let scrape = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        scrape.contains("glance_cached_upstream_endpoint_up{endpoint=\"0\"} 0"),
        "{scrape}"
    );
    d.stop();
}
