//! The HTTP listener against the built daemon: Glance's own client (`glance cache-*`)
//! managing the cache, with each effect checked through our CLI; and the listener's
//! defences (no or a wrong token, hostile ids, wrong methods, oversized bodies, slow
//! headers), each leaving the cache unchanged and the daemon healthy.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::kit::daemon::{Daemon, SOON, Setup, eventually, queue, queued_json};
use crate::kit::{free_port, glance::glance_python};

const TOKEN: &str = "an-admin-token-of-some-length";
const NODE: &str = "http://localhost:9292";
const A: &str = "0c1d2e3f-0000-4000-8000-00000000000a";
const B: &str = "0c1d2e3f-0000-4000-8000-00000000000b";
const C: &str = "0c1d2e3f-0000-4000-8000-00000000000c";

/// A setup whose daemon listens on a free loopback port, with the admin token file;
/// `cache` and `http` are extra lines of those sections.
fn setup(cache: &str, http: &str) -> (Setup, u16) {
    let port = free_port();
    let s = Setup::new("");
    let token = s.tmp.path().join("admin-token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    s.write_config(&format!(
        "{cache}\n[http]\nenabled = true\nlisten = [\"127.0.0.1:{port}\"]\nadmin_token_file = \"{}\"\n{http}\n",
        token.display()
    ));
    (s, port)
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// One request on its own connection, as raw bytes: the test controls every byte.
fn raw(port: u16, request: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

fn call(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("Content-Length: 0\r\n\r\n");
    raw(port, request.as_bytes())
}

fn authed(port: u16, method: &str, path: &str) -> Answer {
    call(port, method, path, &[("X-Auth-Token", TOKEN)])
}

fn queued_ids(s: &Setup) -> Vec<String> {
    queued_json(s)
        .iter()
        .filter(|r| r["state"] == "queued")
        .map(|r| r["image_id"].as_str().unwrap().to_owned())
        .collect()
}

fn assert_healthy(port: u16) {
    let health = call(port, "GET", "/healthz", &[]);
    assert_eq!(health.status, 200, "{}", health.body);
    assert_eq!(health.json()["status"], "ok");
}

/// Glance's client from the suite's virtualenv, on our listener.
fn glance(python: &Path, home: &Path, port: u16, args: &[&str]) -> Output {
    crate::kit::glance::glance_cli(python, home, port, TOKEN, args)
}

fn ok(out: &Output) -> String {
    crate::kit::glance::succeeded(out)
}

#[test]
fn http_glance_client_manages_the_cache() {
    let Some(python) = glance_python() else {
        return;
    };
    let (s, port) = setup("", "");
    s.import(A, 4096);
    s.import(B, 8192);
    let d = s.start();
    let home = s.tmp.path();

    let listed = ok(&glance(&python, home, port, &["cache-list"]));
    assert!(listed.contains(A) && listed.contains(B), "{listed}");

    ok(&glance(&python, home, port, &["cache-queue", C]));
    assert_eq!(queued_ids(&s), [C]);
    let listed = ok(&glance(&python, home, port, &["cache-list"]));
    assert!(listed.contains(C) && listed.contains("queued"), "{listed}");

    let nodes = ok(&glance(&python, home, port, &["cache-nodes-list", A]));
    assert!(nodes.contains(NODE), "{nodes}");

    ok(&glance(
        &python,
        home,
        port,
        &["cache-clear", "--target", "queue"],
    ));
    assert!(queued_ids(&s).is_empty());
    assert_eq!(s.cached_ids(), [A, B], "clearing the queue keeps the cache");

    ok(&glance(&python, home, port, &["cache-delete", A]));
    assert_eq!(s.cached_ids(), [B]);
    assert!(!s.cache(A).exists());
    // An image neither cached nor queued is unknown.
    let out = glance(&python, home, port, &["cache-delete", A]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{out:?}"
    );

    let pruned = ok(&glance(&python, home, port, &["cache-prune"]));
    assert!(pruned.contains("Pruned 0 file(s), 0 byte(s)"), "{pruned}");
    ok(&glance(&python, home, port, &["cache-clean"]));

    queue(&s, &[C]);
    ok(&glance(
        &python,
        home,
        port,
        &["cache-clear", "--target", "cache"],
    ));
    assert!(s.cached_ids().is_empty());
    assert!(!s.cache(B).exists());
    assert_eq!(queued_ids(&s), [C], "clearing the cache keeps the queue");
    assert_healthy(port);
    d.stop();
}

/// `GET /v2/cache` is Glance's JSON: epoch-float times, the row id, the checksum, and
/// the queue in order; prune answers with its pass's totals.
#[test]
fn http_cache_state_and_prune_are_glances_json() {
    let (s, port) = setup("", "");
    s.import(A, 4096);
    let d = s.start();
    queue(&s, &[C]);
    queue(&s, &[B]);
    let state = authed(port, "GET", "/v2/cache");
    assert_eq!(state.status, 200, "{}", state.body);
    let v = state.json();
    let cached = v["cached_images"].as_array().unwrap();
    assert_eq!(cached.len(), 1);
    let row = &cached[0];
    assert_eq!(row["image_id"], A);
    assert_eq!(row["size"], 4096);
    assert!(row["id"].is_i64(), "{row}");
    assert!(
        row["last_accessed"].is_f64() && row["last_modified"].is_f64(),
        "{row}"
    );
    assert!(row["checksum"].is_string(), "{row}");
    assert_eq!(v["queued_images"], serde_json::json!([C, B]));

    let pruned = authed(port, "POST", "/v2/cache/prune");
    assert_eq!(pruned.status, 200, "{}", pruned.body);
    assert_eq!(
        pruned.json(),
        serde_json::json!({"total_files_pruned": 0, "total_bytes_pruned": 0})
    );
    let cleaned = authed(port, "POST", "/v2/cache/clean");
    assert_eq!((cleaned.status, cleaned.body.as_str()), (200, ""));
    let put = authed(port, "PUT", &format!("/v2/cache/{A}"));
    assert_eq!(
        put.status, 202,
        "an image already cached is accepted, not queued"
    );
    assert_eq!(queued_ids(&s), [C, B]);
    d.stop();
}

#[test]
fn http_without_the_token_nothing_is_done() {
    let (s, port) = setup("", "");
    s.import(A, 4096);
    let d = s.start();
    let wrong = [("X-Auth-Token", "an-admin-token-of-some-lengtX")];
    let short = [("X-Auth-Token", "an-admin-token")];
    let requests = [
        ("GET", "/v2/cache".to_owned()),
        ("PUT", format!("/v2/cache/{C}")),
        ("DELETE", format!("/v2/cache/{A}")),
        ("DELETE", "/v2/cache".to_owned()),
        ("POST", "/v2/cache/prune".to_owned()),
        ("POST", "/v2/cache/clean".to_owned()),
        ("GET", format!("/v2/cache/nodes/{A}")),
        ("GET", "/v2/images".to_owned()),
        ("PATCH", "/v2/cache".to_owned()),
    ];
    for (method, path) in &requests {
        for headers in [&[][..], &wrong[..], &short[..]] {
            let answer = call(port, method, path, headers);
            assert_eq!(
                answer.status, 401,
                "{method} {path} {headers:?}: {}",
                answer.body
            );
            assert!(!answer.body.contains(A), "{}", answer.body);
        }
    }
    assert_eq!(s.cached_ids(), [A]);
    assert!(s.cache(A).exists());
    assert!(queued_ids(&s).is_empty());
    // Health stays open.
    assert_healthy(port);
    assert_eq!(call(port, "GET", "/readyz", &[]).status, 200);
    d.stop();
}

#[test]
fn http_hostile_requests_get_clear_statuses_and_change_nothing() {
    let (s, port) = setup("", "max_request_body = \"1KiB\"\n");
    s.import(A, 4096);
    let d = s.start();
    let canary = s.tmp.path().join("canary");
    std::fs::write(&canary, b"keep").unwrap();
    for id in [
        "..",
        "..%2F..%2Fcanary",
        "%2e%2e",
        "glance-cache",
        "a%00b",
        &"x".repeat(37),
        "%0d%0aX-Injected:%20yes",
    ] {
        for method in ["PUT", "DELETE"] {
            let answer = authed(port, method, &format!("/v2/cache/{id}"));
            assert_eq!(answer.status, 404, "{method} {id}: {}", answer.body);
            assert!(answer.header("x-injected").is_none());
        }
        let nodes = authed(port, "GET", &format!("/v2/cache/nodes/{id}"));
        assert_eq!(nodes.status, 404, "nodes {id}");
    }
    // Paths with more segments are no route.
    assert_eq!(
        authed(port, "DELETE", &format!("/v2/cache/../{A}")).status,
        404
    );
    assert_eq!(
        authed(port, "DELETE", &format!("/v2/cache/x/{A}")).status,
        404
    );

    // Wrong methods: 405 with Glance's Allow.
    for (method, path, allow) in [
        ("POST", "/v2/cache".to_owned(), "GET, DELETE"),
        ("GET", format!("/v2/cache/{A}"), "DELETE, PUT"),
        ("GET", "/v2/cache/prune".to_owned(), "POST"),
        ("PUT", "/v2/cache/clean".to_owned(), "POST"),
        ("DELETE", format!("/v2/cache/nodes/{A}"), "GET"),
        ("POST", "/healthz".to_owned(), "GET"),
    ] {
        let answer = authed(port, method, &path);
        assert_eq!(answer.status, 405, "{method} {path}");
        assert_eq!(
            answer.header("allow").as_deref(),
            Some(allow),
            "{method} {path}"
        );
    }
    // A clear target Glance does not know.
    let bad = call(
        port,
        "DELETE",
        "/v2/cache",
        &[
            ("X-Auth-Token", TOKEN),
            ("x-image-cache-clear-target", "all"),
        ],
    );
    assert_eq!(bad.status, 400, "{}", bad.body);

    // Oversized bodies, declared and chunked.
    let declared = format!(
        "PUT /v2/cache/{C} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\nContent-Length: 1000000\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw(port, declared.as_bytes()).status, 413);
    let mut chunked = format!(
        "PUT /v2/cache/{C} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..4 {
        chunked.extend_from_slice(b"200\r\n");
        chunked.extend_from_slice(&[b'x'; 0x200]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(raw(port, &chunked).status, 413);
    // A GET with a body, as Glance's body_reject routes.
    let with_body = format!(
        "GET /v2/cache HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    assert_eq!(raw(port, with_body.as_bytes()).status, 400);
    // Garbage is a 400 from the parser, not a crash.
    assert_eq!(raw(port, b"\x16\x03\x01\x00\xa5\x01\r\n\r\n").status, 400);

    assert_eq!(std::fs::read(&canary).unwrap(), b"keep");
    assert_eq!(s.cached_ids(), [A]);
    assert!(queued_ids(&s).is_empty(), "nothing queued");
    assert_healthy(port);
    d.stop();
}

/// A client that sends its request head a byte per second is dropped at
/// `header_read_timeout`, while others are served.
#[test]
fn http_slow_headers_are_cut_at_the_header_timeout() {
    let (s, port) = setup("", "header_read_timeout = \"2s\"\n");
    let d = s.start();
    let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow.set_write_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let started = Instant::now();
    let head =
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut cut_after = None;
    for byte in head {
        if slow.write_all(&[*byte]).is_err() {
            cut_after = Some(started.elapsed());
            break;
        }
        // Served meanwhile: the slow client holds one connection, not the listener.
        assert_healthy(port);
        std::thread::sleep(Duration::from_secs(1));
        if started.elapsed() > Duration::from_secs(12) {
            break;
        }
    }
    // The server closed: a write fails (reset) or a read sees the end (or the 408 hyper
    // may send first), well before the whole head was sent.
    let elapsed = cut_after.unwrap_or_else(|| {
        let mut rest = Vec::new();
        slow.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let _ = slow.read_to_end(&mut rest);
        assert!(
            !String::from_utf8_lossy(&rest).contains("200 OK"),
            "the slow request was served"
        );
        started.elapsed()
    });
    assert!(elapsed < Duration::from_secs(12), "cut after {elapsed:?}");
    let mut rest = Vec::new();
    slow.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let read = slow.read_to_end(&mut rest);
    assert!(
        read.is_err() || !String::from_utf8_lossy(&rest).contains("200 OK"),
        "the connection is closed without an answer"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "not cut before the timeout"
    );
    assert_healthy(port);
    d.stop();
}

/// `/healthz` turns 503 and names the loop when one is stuck in a step past the
/// watchdog's timeout, as the watchdog judges it.
#[test]
fn http_health_names_a_stuck_loop() {
    let (s, port) = setup("", "");
    let mut d = Daemon::spawn(
        s.tmp.path(),
        &s.config,
        &[],
        &[
            ("WATCHDOG_USEC", "1000000"),
            ("GLANCE_CACHED_TEST_FAILPOINT", "clean:mid"),
        ],
    );
    d.notify.wait_for(0, SOON, |m| m.contains("READY=1"));
    assert_healthy(port);
    // The cleaner removes this file and then hangs in its step.
    std::fs::write(s.cache("invalid/0c1d2e3f"), b"x").unwrap();
    let mut last = None;
    eventually(SOON, "/healthz reports the stuck cleaner", || {
        let answer = call(port, "GET", "/healthz", &[]);
        let stuck = answer.status == 503;
        last = Some(answer.body);
        stuck
    });
    let v: serde_json::Value = serde_json::from_str(last.as_deref().unwrap()).unwrap();
    assert_eq!(v["status"], "unhealthy");
    assert_eq!(v["loops"]["cleaner"], "stuck");
    assert_eq!(v["loops"]["pruner"], "idle");
    assert!(d.alive());
}

/// The listener on a unix socket; `readyz` ready; a changed `listen` is not applied by
/// SIGHUP and says it needs a restart.
#[test]
fn http_unix_socket_ready_and_listen_needs_a_restart() {
    use std::os::unix::net::UnixStream;
    let (s, port) = setup("", "");
    let sock = s.tmp.path().join("http.sock");
    let text = std::fs::read_to_string(&s.config).unwrap().replace(
        &format!("listen = [\"127.0.0.1:{port}\"]"),
        &format!(
            "listen = [\"127.0.0.1:{port}\", \"unix:{}\"]",
            sock.display()
        ),
    );
    std::fs::write(&s.config, &text).unwrap();
    let d = s.start();
    let mut unix = UnixStream::connect(&sock).unwrap();
    unix.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    unix.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("{\"ready\":true}"), "{out}");

    let other = free_port();
    std::fs::write(
        &s.config,
        text.replace(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{other}")),
    )
    .unwrap();
    d.signal(rustix::process::Signal::HUP);
    eventually(SOON, "the reload names http.listen", || {
        let log = d.log_text();
        log.contains("needs a restart") && log.contains("http.listen")
    });
    assert_healthy(port);
    assert!(TcpStream::connect(("127.0.0.1", other)).is_err());
    d.stop();
    assert!(!sock.exists(), "the socket file is removed at exit");
}

/// Under systemd socket activation the daemon serves the socket it is passed
/// (`LISTEN_FDS`), not `http.listen`.
#[test]
fn http_socket_activation_serves_the_passed_socket() {
    if Command::new("systemd-socket-activate")
        .arg("--help")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: systemd-socket-activate is not installed");
        return;
    }
    let (s, configured) = setup("", "");
    let passed = free_port();
    let address = format!("127.0.0.1:{passed}");
    let d = Daemon::spawn_wrapped(
        s.tmp.path(),
        &s.config,
        // It passes on only the variables named.
        &[
            "systemd-socket-activate",
            "-l",
            &address,
            "-E",
            "NOTIFY_SOCKET",
            "-E",
            "GLANCE_CACHED_LOG__FORMAT",
        ],
        &[],
        &[],
    );
    // The socket is systemd's (here the wrapper's) from the start: the first request
    // starts the daemon and waits in the backlog until it serves.
    // Until the loops have run once, health may still say 503: poll for the 200.
    eventually(SOON, "the passed socket serves /healthz", || {
        if TcpStream::connect(("127.0.0.1", passed)).is_err() {
            return false;
        }
        call(passed, "GET", "/healthz", &[]).status == 200
    });
    assert!(
        TcpStream::connect(("127.0.0.1", configured)).is_err(),
        "http.listen is not bound"
    );
    assert!(d.log_text().contains("using the sockets systemd passed"));
    d.stop();
}

/// A request of the differential test: method, path, extra headers.
type Probe<'a> = (&'a str, String, Vec<(&'a str, &'a str)>);

/// The same requests to the real glance-api (its cache API on our directory and
/// database, `worker_self_reference_url` our node) and to the daemon give the same
/// statuses, `Allow` headers and JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_answers_as_glance_api_does() {
    use crate::kit::glance::{GlanceApi, GlanceApiOptions};
    let (s, port) = setup("", "");
    std::fs::create_dir_all(s.cache("")).unwrap();
    let database = s.tmp.path().join("state/glance-cached.db");
    std::fs::create_dir_all(database.parent().unwrap()).unwrap();
    let Some(api) = GlanceApi::start(&GlanceApiOptions {
        cache_dir: Some(&s.cache("")),
        database: &database,
        node_url: NODE,
        keystone: None,
    }) else {
        return;
    };
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        format!(
            "[database]\nurl = \"sqlite://{}\"\n[node]\nreference_url = \"{NODE}\"\n{text}",
            database.display()
        ),
    )
    .unwrap();
    // An image Glance knows, cached on this node (imported by our CLI under its id).
    let known = api.create_image(&crate::kit::test_bytes(4096, 7)).await;
    s.import(&known, 4096);
    let d = s.start();
    let glance_port: u16 = api.url.rsplit(':').next().unwrap().parse().unwrap();

    let unknown = "0c1d2e3f-0000-4000-8000-0000000000ff";
    let requests: Vec<Probe> = vec![
        ("GET", "/v2/cache".into(), vec![]),
        ("GET", format!("/v2/cache/nodes/{known}"), vec![]),
        ("POST", "/v2/cache".into(), vec![]),
        ("PATCH", "/v2/cache".into(), vec![]),
        ("GET", format!("/v2/cache/{known}"), vec![]),
        ("POST", format!("/v2/cache/{known}"), vec![]),
        ("PUT", format!("/v2/cache/nodes/{known}"), vec![]),
        ("GET", "/v2/cache/clean".into(), vec![]),
        ("GET", "/v2/cache/prune".into(), vec![]),
        (
            "DELETE",
            "/v2/cache".into(),
            vec![("x-image-cache-clear-target", "all")],
        ),
        ("DELETE", format!("/v2/cache/{unknown}"), vec![]),
        ("POST", "/v2/cache/prune".into(), vec![]),
        ("POST", "/v2/cache/clean".into(), vec![]),
        ("GET", "/v2/cache".into(), vec![]),
        ("DELETE", format!("/v2/cache/{known}"), vec![]),
        ("GET", "/v2/cache".into(), vec![]),
    ];
    let mut differences = Vec::new();
    for (method, path, extra) in &requests {
        let mut headers = vec![("X-Auth-Token", TOKEN)];
        headers.extend(extra.iter().copied());
        // Ours first: Glance answers 204 to the DELETE of an image it knows even when
        // it is no longer cached (ours, without an upstream to ask, 404).
        let ours = call(port, method, path, &headers);
        let theirs = call(glance_port, method, path, &headers);
        let json = |a: &Answer| {
            a.header("content-type")
                .is_some_and(|t| t.starts_with("application/json"))
                .then(|| a.json())
        };
        let same = theirs.status == ours.status
            && theirs.header("allow") == ours.header("allow")
            && json(&theirs) == json(&ours);
        if !same {
            differences.push(format!(
                "{method} {path}: glance {} {:?} {} / ours {} {:?} {}",
                theirs.status,
                theirs.header("allow"),
                theirs.body.trim(),
                ours.status,
                ours.header("allow"),
                ours.body.trim()
            ));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
    assert!(s.cached_ids().is_empty());
    d.stop();
}

/// With a Glance upstream, `PUT /v2/cache/{id}` asks it first, as Glance's API does:
/// 404 for an image it does not know, 400 for one not active, 202 (and prefetched)
/// for an active one; deleting an image Glance knows is 204 even when not cached; the
/// nodes listing of an image it does not know is 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_queueing_asks_the_glance_upstream() {
    use crate::kit::glance::{GlanceApi, GlanceApiOptions};
    let (s, port) = setup("", "");
    let database = s.tmp.path().join("glance.db");
    let Some(api) = GlanceApi::start(&GlanceApiOptions {
        cache_dir: None,
        database: &database,
        node_url: "http://glance-node:9292",
        keystone: None,
    }) else {
        return;
    };
    let upstream_token = s.tmp.path().join("upstream-token");
    std::fs::write(&upstream_token, "any\n").unwrap();
    std::fs::set_permissions(&upstream_token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        format!(
            "{text}[upstream]\nkind = \"glance\"\nurl = \"{}\"\ntoken_file = \"{}\"\n",
            api.url,
            upstream_token.display()
        ),
    )
    .unwrap();
    let data = crate::kit::test_bytes(4096, 9);
    let active = api.create_image(&data).await;
    // An image with no data yet: Glance's status "queued".
    let created: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v2/images", api.url))
        .json(
            &serde_json::json!({"name": "empty", "disk_format": "raw", "container_format": "bare"}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let empty = created["id"].as_str().unwrap().to_owned();
    let d = s.start();

    let unknown = authed(port, "PUT", &format!("/v2/cache/{C}"));
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    let not_active = authed(port, "PUT", &format!("/v2/cache/{empty}"));
    assert_eq!(not_active.status, 400, "{}", not_active.body);
    assert!(queued_ids(&s).is_empty(), "nothing queued");

    let queued = authed(port, "PUT", &format!("/v2/cache/{active}"));
    assert_eq!(queued.status, 202, "{}", queued.body);
    eventually(Duration::from_secs(30), "the image is prefetched", || {
        s.cached_ids() == [active.clone()]
    });
    assert_eq!(std::fs::read(s.cache(&active)).unwrap(), data);

    let known = authed(port, "DELETE", &format!("/v2/cache/{empty}"));
    assert_eq!(known.status, 204, "{}", known.body);
    let unknown = authed(port, "DELETE", &format!("/v2/cache/{C}"));
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    // The nodes listing looks the image up first, as Glance's does.
    let unknown = authed(port, "GET", &format!("/v2/cache/nodes/{C}"));
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    let listed = authed(port, "GET", &format!("/v2/cache/nodes/{active}"));
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(
        listed.json().as_array().map(Vec::len),
        Some(1),
        "{}",
        listed.body
    );
    assert_healthy(port);
    d.stop();
}

/// At SIGTERM the listener drains: an idle keep-alive connection and one in the middle
/// of its request head do not hold the exit.
#[test]
fn http_shutdown_drains_open_connections_at_once() {
    let (s, port) = setup("", "header_read_timeout = \"1m\"\nidle_timeout = \"1h\"\n");
    let mut d = s.start();
    let mut idle = TcpStream::connect(("127.0.0.1", port)).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let mut partial = TcpStream::connect(("127.0.0.1", port)).unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost:")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    d.signal(rustix::process::Signal::TERM);
    let status = d.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}: {}", d.log_text());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "exit took {:?} (shutdown_timeout is 5s)",
        started.elapsed()
    );
    assert!(
        !d.log_text().contains("did not stop in time"),
        "{}",
        d.log_text()
    );
}

/// An address that cannot be bound fails the start with a clear error (exit 1), before
/// any loop runs; a unix socket a live process listens on is not taken over.
#[test]
fn http_an_address_in_use_fails_the_start_clearly() {
    let (s, port) = setup("", "");
    let held = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let mut d = Daemon::spawn(s.tmp.path(), &s.config, &[], &[]);
    let status = d.wait_exit(SOON);
    assert_eq!(status.code(), Some(1), "{}", d.log_text());
    assert!(
        d.log_text()
            .contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{}",
        d.log_text()
    );
    drop(held);

    let sock = s.tmp.path().join("live.sock");
    let _live = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let text = std::fs::read_to_string(&s.config).unwrap().replace(
        &format!("listen = [\"127.0.0.1:{port}\"]"),
        &format!("listen = [\"unix:{}\"]", sock.display()),
    );
    std::fs::write(&s.config, text).unwrap();
    let mut d = Daemon::spawn(s.tmp.path(), &s.config, &[], &[]);
    let status = d.wait_exit(SOON);
    assert_eq!(status.code(), Some(1), "{}", d.log_text());
    assert!(
        d.log_text().contains("cannot listen on unix:"),
        "{}",
        d.log_text()
    );
    assert!(sock.exists(), "the live socket stays");
}

/// Reads one response from a keep-alive connection: its status, after its
/// `Content-Length` body.
fn read_response(stream: &mut TcpStream) -> u16 {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "closed mid-response");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// 10,000 requests over 1,000 keep-alive connections, 100 at a time (with and without
/// the token, health among them): each gets its clear status, nothing changes, and the
/// daemon stays healthy.
#[test]
fn http_ten_thousand_requests_over_a_thousand_connections() {
    let (s, port) = setup("", "max_connections = 64\n");
    s.import(A, 4096);
    let d = s.start();
    let workers: Vec<_> = (0..100)
        .map(|w| {
            std::thread::spawn(move || {
                let mut statuses = std::collections::BTreeMap::new();
                for _ in 0..10 {
                    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_secs(60)))
                        .unwrap();
                    for r in 0..10 {
                        let (path, token) = match (w + r) % 4 {
                            0 => ("/healthz", ""),
                            1 => ("/v2/cache", TOKEN),
                            2 => ("/v2/cache", "wrong"),
                            _ => ("/v2/cache/prune", ""),
                        };
                        let method = if path.ends_with("prune") {
                            "POST"
                        } else {
                            "GET"
                        };
                        let auth = if token.is_empty() {
                            String::new()
                        } else {
                            format!("X-Auth-Token: {token}\r\n")
                        };
                        let request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n");
                        stream.write_all(request.as_bytes()).unwrap();
                        let status = read_response(&mut stream);
                        *statuses
                            .entry((path, token.is_empty(), status))
                            .or_insert(0) += 1;
                    }
                }
                statuses
            })
        })
        .collect();
    let mut total = std::collections::BTreeMap::new();
    for worker in workers {
        for (key, n) in worker.join().unwrap() {
            *total.entry(key).or_insert(0) += n;
        }
    }
    let expected: std::collections::BTreeMap<_, _> = [
        (("/healthz", true, 200), 2500),
        (("/v2/cache", false, 200), 2500),
        (("/v2/cache", false, 401), 2500),
        (("/v2/cache/prune", true, 401), 2500),
    ]
    .into_iter()
    .collect();
    assert_eq!(total, expected);
    assert_eq!(s.cached_ids(), [A]);
    assert!(queued_ids(&s).is_empty());
    assert_healthy(port);
    d.stop();
}

/// The value of the sample `name` (with its labels, as the text shows them) in a scrape.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let value = l.strip_prefix(name)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// `/metrics` is open (no token), in the OpenMetrics text format a real Prometheus
/// parser reads, answers only GET, and moves with what the daemon does: here a reload
/// and an image deleted through the cache API (a manual eviction).
#[test]
fn http_metrics_are_served_open_and_move_with_the_daemon() {
    let (s, port) = setup("", "");
    s.import(A, 4096);
    let d = s.start();
    let scrape = call(port, "GET", "/metrics", &[]);
    assert_eq!(scrape.status, 200, "{}", scrape.body);
    assert!(
        scrape
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{}",
        scrape.head
    );
    assert!(scrape.body.ends_with("# EOF\n"), "{}", scrape.body);
    let reloads = r#"glance_cached_reloads_total{outcome="ok"}"#;
    let before = sample(&scrape.body, reloads).unwrap_or_else(|| panic!("{}", scrape.body));
    if let Some(python) = glance_python() {
        let mut parse = Command::new(python)
            .args([
                "-c",
                "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as f\nprint(len(list(f(sys.stdin.read()))))",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        parse
            .stdin
            .take()
            .unwrap()
            .write_all(scrape.body.as_bytes())
            .unwrap();
        let families = ok(&parse.wait_with_output().unwrap());
        assert!(families.trim().parse::<usize>().unwrap() > 20, "{families}");
    }
    assert_eq!(call(port, "POST", "/metrics", &[]).status, 405);

    d.signal(rustix::process::Signal::HUP);
    eventually(SOON, "the reload counted in /metrics", || {
        let now = call(port, "GET", "/metrics", &[]);
        sample(&now.body, reloads) == Some(before + 1.0)
    });

    let bytes = r#"glance_cached_evicted_bytes_total{reason="manual"}"#;
    let images = r#"glance_cached_evicted_images_total{reason="manual"}"#;
    let scrape = call(port, "GET", "/metrics", &[]).body;
    let (bytes_before, images_before) = (sample(&scrape, bytes), sample(&scrape, images));
    assert_eq!(
        authed(port, "DELETE", &format!("/v2/cache/{A}")).status,
        204
    );
    let scrape = call(port, "GET", "/metrics", &[]).body;
    assert_eq!(sample(&scrape, bytes), bytes_before.map(|b| b + 4096.0));
    assert_eq!(sample(&scrape, images), images_before.map(|n| n + 1.0));
    assert_healthy(port);
    d.stop();
}

/// A CA and a `localhost` server certificate it signed, as PEM.
struct Pki {
    ca: String,
    cert: String,
    key: String,
}

fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Names of their own: with rcgen's one default name, OpenSSL (curl) would take the
    // server's certificate for a self-signed one.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "a test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &issuer).unwrap();
    Pki {
        ca: ca_cert.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// A daemon with TLS from `tls/cert.pem` and `tls/key.pem`, given relative to the
/// config file; returns the CA file of the pair it starts with.
fn tls_setup() -> (Setup, u16, Pki) {
    tls_setup_with("")
}

/// `tls_setup` with more `[http]` lines.
fn tls_setup_with(http: &str) -> (Setup, u16, Pki) {
    let (s, port) = setup(
        "",
        &format!("tls_cert_file = \"tls/cert.pem\"\ntls_key_file = \"tls/key.pem\"\n{http}"),
    );
    std::fs::create_dir(s.tmp.path().join("tls")).unwrap();
    let pair = pki();
    install_pair(&s, &pair);
    (s, port, pair)
}

fn install_pair(s: &Setup, pair: &Pki) {
    let dir = s.tmp.path().join("tls");
    std::fs::write(dir.join("cert.pem"), &pair.cert).unwrap();
    let key = dir.join("key.pem");
    std::fs::write(&key, &pair.key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// `curl --cacert` of `ca` on `/healthz` over a new connection: the status, or the
/// failure curl reports.
fn curl_https(s: &Setup, port: u16, ca: &str) -> Result<u16, String> {
    let ca_file = s.tmp.path().join(format!("ca-{}.pem", free_port()));
    std::fs::write(&ca_file, ca).unwrap();
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--cacert")
        .arg(&ca_file)
        .arg("--resolve")
        .arg(format!("localhost:{port}:127.0.0.1"))
        .arg(format!("https://localhost:{port}/healthz"))
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse().unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// With `tls_cert_file` and `tls_key_file` the TCP listener speaks TLS to a real
/// client (curl, verifying against the CA), and plain HTTP on it gets no answer.
#[test]
fn http_tls_serves_https_and_refuses_plain_http() {
    let (s, port, pair) = tls_setup();
    let d = s.start();
    assert_eq!(curl_https(&s, port, &pair.ca), Ok(200));
    assert!(
        curl_https(&s, port, &pki().ca).is_err(),
        "another CA does not verify it"
    );
    let plain = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://127.0.0.1:{port}/healthz"))
        .output()
        .unwrap();
    assert!(
        !plain.status.success(),
        "plain HTTP answered: {}",
        String::from_utf8_lossy(&plain.stdout)
    );
    assert_eq!(curl_https(&s, port, &pair.ca), Ok(200), "still serving");
    d.stop();
}

/// Over TLS an image is served from buffers (rustls encrypts them): the body is the
/// file, and the sendfile counter does not move.
#[test]
fn http_tls_serves_images_without_sendfile() {
    let (s, port, pair) = tls_setup_with("serve_auth = \"none\"\nserve_allow = [\"127.0.0.0/8\"]");
    let size = (2 << 20) + 777;
    s.import(A, size);
    let file = std::fs::read(s.cache(A)).unwrap();
    let d = s.start();
    let ca = s.tmp.path().join("ca.pem");
    std::fs::write(&ca, &pair.ca).unwrap();
    let get = |path: &str| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "60", "--cacert"])
            .arg(&ca)
            .arg("--resolve")
            .arg(format!("localhost:{port}:127.0.0.1"))
            .arg(format!("https://localhost:{port}{path}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        out.stdout
    };
    let counter =
        |scrape: Vec<u8>| crate::http_serve::sendfile_bytes(&String::from_utf8(scrape).unwrap());
    let before = counter(get("/metrics"));
    assert!(get(&format!("/v2/images/{A}/file")) == file, "the image");
    assert_eq!(counter(get("/metrics")), before, "no sendfile under TLS");
    d.stop();
}

/// SIGHUP re-reads the pair: new connections get the new certificate (its CA verifies
/// it, the old one no longer does); a broken key is refused by the reload, which says
/// so, and the running certificate stays.
#[test]
fn http_tls_reload_swaps_the_certificate_and_keeps_it_on_a_broken_key() {
    let (s, port, old) = tls_setup();
    let d = s.start();
    assert_eq!(curl_https(&s, port, &old.ca), Ok(200));

    let new = pki();
    install_pair(&s, &new);
    d.signal(rustix::process::Signal::HUP);
    eventually(SOON, "the new certificate presented", || {
        curl_https(&s, port, &new.ca) == Ok(200)
    });
    assert!(
        curl_https(&s, port, &old.ca).is_err(),
        "the old one is gone"
    );

    let key = s.tmp.path().join("tls/key.pem");
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    d.signal(rustix::process::Signal::HUP);
    eventually(SOON, "the reload refused, naming the key", || {
        let log = d.log_text();
        log.contains("configuration reload rejected") && log.contains("http.tls_key_file")
    });
    assert_eq!(
        curl_https(&s, port, &new.ca),
        Ok(200),
        "the running pair stays"
    );
    assert!(curl_https(&s, port, &old.ca).is_err());

    // A mismatched pair (the old key with the new certificate) is refused as well.
    let mismatched = Pki {
        ca: String::new(),
        cert: new.cert.clone(),
        key: old.key.clone(),
    };
    install_pair(&s, &mismatched);
    d.signal(rustix::process::Signal::HUP);
    eventually(SOON, "the mismatched pair refused", || {
        d.log_text().contains("does not belong to the certificate")
    });
    assert_eq!(curl_https(&s, port, &new.ca), Ok(200));
    d.stop();
}

/// One keep-alive request on an open TLS connection: the status.
fn tls_request(tls: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>) -> u16 {
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tls.read(&mut chunk).unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().unwrap())
                })
                .unwrap_or_else(|| panic!("no length: {head}"));
            if body.len() >= length {
                return head.split_whitespace().nth(1).unwrap().parse().unwrap();
            }
        }
    }
}

/// A connection opened before a certificate reload keeps the certificate it began
/// with and goes on being served; new connections get the new one.
#[test]
fn http_tls_open_connection_keeps_its_certificate_across_a_reload() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (s, port, old) = tls_setup();
    let d = s.start();
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for ca in rustls::pki_types::CertificateDer::pem_slice_iter(old.ca.as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(client), name).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    assert_eq!(tls_request(&mut tls), 200);
    let first = tls.conn.peer_certificates().unwrap()[0].clone();

    let new = pki();
    install_pair(&s, &new);
    d.signal(rustix::process::Signal::HUP);
    eventually(SOON, "the new certificate presented", || {
        curl_https(&s, port, &new.ca) == Ok(200)
    });
    assert_eq!(
        tls_request(&mut tls),
        200,
        "the open connection is still served"
    );
    assert_eq!(tls.conn.peer_certificates().unwrap()[0], first);
    d.stop();
}
