//! The cache API with Keystone tokens, against the real Keystone 30.0.0 (the kit's)
//! and Glance's real client; and the separate metrics listener.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use crate::kit::daemon::{SOON, Setup, eventually};
use crate::kit::keystone::{ADMIN_PASSWORD, Keystone};
use crate::kit::{free_port, glance::glance_python};

const STATIC_TOKEN: &str = "a-static-admin-token-of-some-length";
const A: &str = "0c1d2e3f-0000-4000-8000-00000000001a";
const B: &str = "0c1d2e3f-0000-4000-8000-00000000001b";

/// The kit's Keystone issues tokens whose roles are the ones granted, and validates
/// them as keystonemiddleware asks (`GET /v3/auth/tokens`).
#[tokio::test]
async fn keystone_kit_issues_tokens_with_the_roles_granted() {
    let Some(keystone) = Keystone::start() else {
        return;
    };
    let project = keystone.create_project("kit-project").await;
    keystone
        .create_user("kit-member", "member-secret", &project, "member")
        .await;
    let token = keystone
        .token("kit-member", "member-secret", "kit-project")
        .await;
    let admin = keystone.admin_token().await;
    let client = reqwest::Client::new();
    let validated: serde_json::Value = client
        .get(format!("{}/auth/tokens", keystone.auth_url))
        .header("X-Auth-Token", &admin)
        .header("X-Subject-Token", &token)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let roles: Vec<&str> = validated["token"]["roles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(roles.contains(&"member"), "{validated}");
    assert!(!roles.contains(&"admin"), "{validated}");
    let bogus = client
        .get(format!("{}/auth/tokens", keystone.auth_url))
        .header("X-Auth-Token", &admin)
        .header("X-Subject-Token", "gAAAAAB-not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(bogus.status(), 404, "{}", keystone.log_text());
}

/// A daemon whose upstream is a Glance (never asked here: its port is closed)
/// authenticating with `keystone`'s bootstrap admin as its service user; the listener
/// on a free port with the static admin token beside Keystone. `http` is extra lines.
fn keystone_setup(keystone: &Keystone, http: &str) -> (Setup, u16) {
    let port = free_port();
    let s = Setup::new("");
    let token = s.tmp.path().join("admin-token");
    std::fs::write(&token, format!("{STATIC_TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    s.write_config(&format!(
        "[http]\nenabled = true\nlisten = [\"127.0.0.1:{port}\"]\nadmin_token_file = \"{token}\"\n{http}\n\
         [upstream]\nkind = \"glance\"\nurl = \"http://127.0.0.1:{glance}\"\n\
         [upstream.keystone]\nauth_url = \"{auth}\"\nusername = \"admin\"\npassword = \"{password}\"\nproject_name = \"admin\"\n",
        token = token.display(),
        glance = free_port(),
        auth = keystone.auth_url,
        password = ADMIN_PASSWORD,
    ));
    std::fs::set_permissions(&s.config, std::fs::Permissions::from_mode(0o600)).unwrap();
    (s, port)
}

/// One request on its own connection; the status and body.
fn call(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let auth = token.map_or(String::new(), |t| format!("X-Auth-Token: {t}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// Glance's client from the suite's virtualenv, on our listener, with `token`.
fn glance(python: &Path, home: &Path, port: u16, token: &str, args: &[&str]) -> Output {
    crate::kit::glance::glance_cli(python, home, port, token, args)
}

fn ok(out: &Output) -> String {
    crate::kit::glance::succeeded(out)
}

/// Refused with `status`: glanceclient prints the body it was given, or for
/// `cache-delete` (which exits 0 whatever happened) its own words for a 403.
fn refused(out: &Output, status: u16) {
    let said: &[&str] = match status {
        401 => &["could not verify that you are authorized"],
        403 => &[
            "Access was denied to this resource.",
            "You are not permitted",
        ],
        503 => &["cannot check tokens now"],
        _ => panic!("no reply for {status} here"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.iter().any(|s| stderr.contains(s)),
        "expected HTTP {status}: {}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Keystone tokens through Glance's real client: an admin's works, a member's and a
/// reader's are 403 and change nothing, a bogus one and none are 401, the static token
/// still works beside Keystone; `http.admin_roles = ["member"]` on SIGHUP lets the
/// member in. No token shows in the daemon's log.
#[tokio::test(flavor = "multi_thread")]
async fn http_keystone_tokens_need_an_admin_role() {
    let Some(python) = glance_python() else {
        return;
    };
    let Some(keystone) = Keystone::start() else {
        return;
    };
    let project = keystone.create_project("demo").await;
    keystone
        .create_user("alice", "alice-secret", &project, "member")
        .await;
    keystone
        .create_user("rita", "rita-secret", &project, "reader")
        .await;
    let admin = keystone.admin_token().await;
    let member = keystone.token("alice", "alice-secret", "demo").await;
    let reader = keystone.token("rita", "rita-secret", "demo").await;
    let (s, port) = keystone_setup(&keystone, "");
    s.import(A, 4096);
    s.import(B, 4096);
    let d = s.start();
    let home = s.tmp.path();

    let listed = ok(&glance(&python, home, port, &admin, &["cache-list"]));
    assert!(listed.contains(A) && listed.contains(B), "{listed}");
    ok(&glance(&python, home, port, &admin, &["cache-delete", B]));
    assert_eq!(s.cached_ids(), [A]);

    for token in [&member, &reader] {
        refused(&glance(&python, home, port, token, &["cache-list"]), 403);
        refused(
            &glance(&python, home, port, token, &["cache-delete", A]),
            403,
        );
        refused(
            &glance(
                &python,
                home,
                port,
                token,
                &["cache-clear", "--target", "cache"],
            ),
            403,
        );
    }
    assert_eq!(s.cached_ids(), [A], "a refused request changes nothing");
    let (status, body) = call(port, "GET", "/v2/cache", Some(&member));
    assert_eq!(
        (status, body.trim()),
        (403, "Access was denied to this resource.")
    );

    refused(
        &glance(
            &python,
            home,
            port,
            "gAAAAAB-no-such-token",
            &["cache-delete", A],
        ),
        401,
    );
    assert_eq!(call(port, "DELETE", &format!("/v2/cache/{A}"), None).0, 401);
    assert_eq!(s.cached_ids(), [A]);
    ok(&glance(&python, home, port, STATIC_TOKEN, &["cache-list"]));

    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text.replace("[http]\n", "[http]\nadmin_roles = [\"member\"]\n"),
    )
    .unwrap();
    d.signal(rustix::process::Signal::HUP);
    eventually(SOON, "the reload lets the member in", || {
        call(port, "GET", "/v2/cache", Some(&member)).0 == 200
    });
    let listed = ok(&glance(&python, home, port, &member, &["cache-list"]));
    assert!(listed.contains(A), "{listed}");
    // Keystone's implied roles (admin, then member, then reader) keep the admin in.
    ok(&glance(&python, home, port, &admin, &["cache-list"]));
    refused(&glance(&python, home, port, &reader, &["cache-list"]), 403);

    let log = d.log_text();
    for token in [&admin, &member, &reader] {
        assert!(!log.contains(token.as_str()), "a token in the log:\n{log}");
    }
    assert!(!log.contains(STATIC_TOKEN), "{log}");
    assert!(log.contains("cache API request refused"), "{log}");
    d.stop();
}

/// With Keystone stopped after the daemon started: a token never validated is 503 and
/// does nothing; a token validated before keeps working from the daemon's cache (for
/// at most 5 minutes, never past its expiry), as keystonemiddleware's cache lets
/// Glance's do.
#[tokio::test(flavor = "multi_thread")]
async fn http_keystone_down_is_503_but_validated_tokens_keep_working() {
    let Some(python) = glance_python() else {
        return;
    };
    let Some(mut keystone) = Keystone::start() else {
        return;
    };
    let admin = keystone.admin_token().await;
    let project = keystone.create_project("ops").await;
    let user = keystone
        .create_user("olga", "olga-secret", &project, "admin")
        .await;
    let _ = user;
    let unvalidated = keystone.token("olga", "olga-secret", "ops").await;
    let (s, port) = keystone_setup(&keystone, "");
    s.import(A, 4096);
    s.import(B, 4096);
    let d = s.start();
    let home = s.tmp.path();
    ok(&glance(&python, home, port, &admin, &["cache-list"]));

    keystone.stop();
    let (status, body) = call(
        port,
        "DELETE",
        &format!("/v2/cache/{B}"),
        Some(&unvalidated),
    );
    assert_eq!(status, 503, "{body}");
    refused(
        &glance(&python, home, port, &unvalidated, &["cache-delete", B]),
        503,
    );
    assert_eq!(call(port, "GET", "/v2/cache", Some("gAAAAAB-bogus")).0, 503);
    assert_eq!(
        s.cached_ids(),
        [A, B],
        "nothing done without Keystone's word"
    );

    let listed = ok(&glance(&python, home, port, &admin, &["cache-list"]));
    assert!(listed.contains(A) && listed.contains(B), "{listed}");
    ok(&glance(&python, home, port, &admin, &["cache-delete", B]));
    assert_eq!(s.cached_ids(), [A]);
    ok(&glance(&python, home, port, STATIC_TOKEN, &["cache-list"]));
    assert_eq!(call(port, "GET", "/healthz", None).0, 200);
    d.stop();
}

/// `http.metrics_listen`: `/metrics` answers there and is 404 on `http.listen`; health
/// answers on both; the metrics address serves nothing else.
#[test]
fn http_metrics_listen_takes_metrics_off_the_api_port() {
    let port = free_port();
    let metrics = free_port();
    let s = Setup::new("");
    s.write_config(&format!(
        "[http]\nenabled = true\nlisten = [\"127.0.0.1:{port}\"]\nmetrics_listen = [\"127.0.0.1:{metrics}\"]\n"
    ));
    let d = s.start();
    let (status, body) = call(metrics, "GET", "/metrics", None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("glance_cached_"), "{body}");
    assert_eq!(call(port, "GET", "/metrics", None).0, 404);
    for p in [port, metrics] {
        assert_eq!(call(p, "GET", "/healthz", None).0, 200);
        assert_eq!(call(p, "GET", "/readyz", None).0, 200);
    }
    assert_eq!(call(metrics, "GET", "/v2/cache", None).0, 404);
    assert_eq!(call(metrics, "GET", "/versions", None).0, 404);
    assert_eq!(call(port, "GET", "/v2/cache", None).0, 401);

    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text.replace(
            &format!("127.0.0.1:{metrics}"),
            &format!("127.0.0.1:{}", free_port()),
        ),
    )
    .unwrap();
    d.signal(rustix::process::Signal::HUP);
    eventually(SOON, "the reload names http.metrics_listen", || {
        let log = d.log_text();
        log.contains("needs a restart") && log.contains("http.metrics_listen")
    });
    assert_eq!(call(metrics, "GET", "/metrics", None).0, 200);
    d.stop();
}
