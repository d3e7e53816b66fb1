//! The real Keystone 30.0.0 (the OpenStack release of Glance 33.0.0) on loopback, for
//! tests of Keystone tokens: its own directory, `keystone.conf` with a SQLite database,
//! Fernet and credential keys, the `admin` user and project made by `keystone-manage
//! bootstrap` (with the roles `admin`, `member`, `reader`, ...), served by gunicorn with
//! one gthread worker from the Glance virtualenv. Ready when `GET /v3` answers 200.
//! Killed with its process group on drop (or `stop`, to test an unreachable Keystone).
//! Passwords are hashed with bcrypt's fewest rounds (each check costs little here).
//!
//! `db_sync`, `fernet_setup`, `credential_setup` and `bootstrap` take 3-4 s each here
//! (mostly Python imports): they run once per build directory into a template that
//! each Keystone copies, with its public endpoint then pointed at its own port.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How long Keystone may take to answer `GET /v3` (about 2 s here).
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// The bootstrap admin's password (a test credential).
pub const ADMIN_PASSWORD: &str = "kit-admin-secret";

/// Keystone's own domain, where bootstrap puts the admin and where users are made.
const DOMAIN: &str = "default";

/// The WSGI module gunicorn loads: Keystone's application parses the process's
/// arguments with oslo.config and refuses gunicorn's, so they are hidden from it first.
const WSGI_SHIM: &str = "import sys\nsys.argv = sys.argv[:1]\nfrom keystone.wsgi.api import application  # noqa: E402,F401\n";

pub struct Keystone {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// `http://127.0.0.1:PORT/v3`, what `[upstream.keystone] auth_url` takes.
    pub auth_url: String,
    pub log: PathBuf,
    client: reqwest::Client,
    /// The bootstrap admin's token, issued once (each issue checks a password hash).
    admin_token: tokio::sync::OnceCell<String>,
    _dir: tempfile::TempDir,
}

/// The Keystone binaries (`keystone-manage`, `gunicorn`) of the Glance virtualenv, or
/// `None` (with a note) without it; under CI a virtualenv without Keystone fails.
fn keystone_bin() -> Option<PathBuf> {
    let python = crate::kit::glance::glance_python()?;
    let found = Command::new(&python)
        .args([
            "-c",
            "import importlib.metadata as m; assert m.version('keystone') == '30.0.0'",
        ])
        .output()
        .unwrap()
        .status
        .success();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "the Glance virtualenv lacks keystone 30.0.0: rerun scripts/glance-venv"
        );
        eprintln!(
            "SKIPPED: the Glance virtualenv lacks keystone 30.0.0 (rerun scripts/glance-venv)"
        );
        return None;
    }
    Some(
        python
            .parent()
            .expect("the venv's bin directory")
            .to_path_buf(),
    )
}

/// `keystone.conf` for a Keystone whose state is in `state`, logging to `log`.
fn conf(state: &Path, log: &Path) -> String {
    format!(
        "[DEFAULT]\nlog_file = {log}\n\
         [database]\nconnection = sqlite:///{s}/keystone.sqlite\n\
         [fernet_tokens]\nkey_repository = {s}/fernet-keys\n\
         [fernet_receipts]\nkey_repository = {s}/fernet-keys\n\
         [credential]\nkey_repository = {s}/credential-keys\n\
         [token]\nexpiration = 3600\n\
         [identity]\npassword_hash_rounds = 4\n",
        s = state.display(),
        log = log.display(),
    )
}

/// `keystone-manage --config-file CONF ARGS`, which must succeed.
fn manage(bin: &Path, conf: &Path, args: &[&str]) {
    let out = Command::new(bin.join("keystone-manage"))
        .arg("--config-file")
        .arg(conf)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keystone-manage {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A synced and bootstrapped Keystone state (database, Fernet and credential keys),
/// made once per build directory; concurrent test processes may each make one, the
/// first rename wins.
fn template(bin: &Path) -> PathBuf {
    let template = Path::new(env!("CARGO_TARGET_TMPDIR")).join("keystone-30.0.0-bootstrapped");
    if template.join("keystone.sqlite").exists() {
        return template;
    }
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state = work.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let conf_path = work.path().join("keystone.conf");
    std::fs::write(&conf_path, conf(&state, &work.path().join("manage.log"))).unwrap();
    let user = rustix::process::getuid().as_raw().to_string();
    let group = rustix::process::getgid().as_raw().to_string();
    manage(bin, &conf_path, &["db_sync"]);
    for setup in ["fernet_setup", "credential_setup"] {
        manage(
            bin,
            &conf_path,
            &[setup, "--keystone-user", &user, "--keystone-group", &group],
        );
    }
    // The endpoint's port is each copy's own (`point_endpoints`).
    let placeholder = "http://127.0.0.1:1/v3";
    manage(
        bin,
        &conf_path,
        &[
            "bootstrap",
            "--bootstrap-password",
            ADMIN_PASSWORD,
            "--bootstrap-admin-url",
            placeholder,
            "--bootstrap-public-url",
            placeholder,
            "--bootstrap-internal-url",
            placeholder,
            "--bootstrap-region-id",
            "RegionOne",
        ],
    );
    if std::fs::rename(&state, &template).is_err() {
        // Another process made it first (a directory is not replaced).
        assert!(template.join("keystone.sqlite").exists());
    }
    template
}

/// Copies the template's files into `to` (two levels: the database, the key dirs).
fn copy_state(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir(&target).unwrap();
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).unwrap();
            for key in std::fs::read_dir(entry.path()).unwrap() {
                let key = key.unwrap();
                std::fs::copy(key.path(), target.join(key.file_name())).unwrap();
            }
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

impl Keystone {
    /// Starts Keystone and waits until it answers; `None` when the virtualenv (or
    /// Keystone in it) is not there.
    pub fn start() -> Option<Keystone> {
        let bin = keystone_bin()?;
        let template = template(&bin);
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let state = d.join("state");
        copy_state(&template, &state);
        let port = crate::kit::free_port();
        let url = format!("http://127.0.0.1:{port}");
        let auth_url = format!("{url}/v3");
        // The catalogue's endpoints name this Keystone (the bootstrap's placeholder).
        let point = Command::new(bin.join("python"))
            .args([
                "-c",
                "import sqlite3, sys\ndb = sqlite3.connect(sys.argv[1])\n\
                 db.execute('UPDATE endpoint SET url = ?', (sys.argv[2],))\ndb.commit()\n",
            ])
            .arg(state.join("keystone.sqlite"))
            .arg(&auth_url)
            .output()
            .unwrap();
        assert!(
            point.status.success(),
            "pointing the endpoints: {}",
            String::from_utf8_lossy(&point.stderr)
        );
        let log = d.join("keystone.log");
        std::fs::write(d.join("keystone.conf"), conf(&state, &log)).unwrap();
        std::fs::write(d.join("kit_keystone_wsgi.py"), WSGI_SHIM).unwrap();
        let out = std::fs::File::create(d.join("gunicorn.log")).unwrap();
        let child = Command::new(bin.join("gunicorn"))
            .args([
                "--workers",
                "1",
                "--worker-class",
                "gthread",
                "--threads",
                "4",
            ])
            .args(["--bind", &format!("127.0.0.1:{port}")])
            .arg("--pythonpath")
            .arg(d)
            .args(["--graceful-timeout", "1", "kit_keystone_wsgi:application"])
            .env("OS_KEYSTONE_CONFIG_DIR", d)
            .env("TZ", "UTC")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            // Its own group, so stop and drop take the worker along with the arbiter.
            .process_group(0)
            .spawn()
            .unwrap();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut keystone = Keystone {
            child: Some(child),
            url,
            auth_url,
            log,
            client: reqwest::Client::new(),
            admin_token: tokio::sync::OnceCell::new(),
            _dir: dir,
        };
        keystone.wait_ready();
        Some(keystone)
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let host = self.url.trim_start_matches("http://").to_owned();
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().unwrap() {
                panic!("keystone exited ({status}):\n{}", self.log_text());
            }
            if http_get_status(&host, "/v3") == Some(200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "keystone did not answer /v3:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Keystone's log and gunicorn's output.
    pub fn log_text(&self) -> String {
        let gunicorn = self.log.with_file_name("gunicorn.log");
        format!(
            "{}\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(gunicorn).unwrap_or_default()
        )
    }

    /// Kills Keystone (its port then refuses connections).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(group) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            }
            let _ = child.wait();
        }
    }

    /// A token of `user` (in Keystone's default domain) scoped to `project`, from
    /// `POST /v3/auth/tokens` (its `X-Subject-Token`).
    pub async fn token(&self, user: &str, password: &str, project: &str) -> String {
        let body = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": user, "domain": {"id": DOMAIN}, "password": password}}},
            "scope": {"project": {"name": project, "domain": {"id": DOMAIN}}},
        }});
        let response = self
            .client
            .post(format!("{}/auth/tokens", self.auth_url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            201,
            "token for {user}: {}",
            response.text().await.unwrap_or_default()
        );
        response
            .headers()
            .get("X-Subject-Token")
            .expect("X-Subject-Token")
            .to_str()
            .unwrap()
            .to_owned()
    }

    /// A token of the bootstrap admin (role `admin` on project `admin`), issued once.
    pub async fn admin_token(&self) -> String {
        self.admin_token
            .get_or_init(|| self.token("admin", ADMIN_PASSWORD, "admin"))
            .await
            .clone()
    }

    /// `request` with the admin's token; requires a success status, returns the JSON
    /// (`Null` for an empty body).
    async fn admin(&self, request: reqwest::RequestBuilder) -> Value {
        let response = request
            .header("X-Auth-Token", self.admin_token().await)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(status.is_success(), "keystone answered {status}: {text}");
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        }
    }

    /// Creates a project in the default domain; its id.
    pub async fn create_project(&self, name: &str) -> String {
        let created = self
            .admin(
                self.client
                    .post(format!("{}/projects", self.auth_url))
                    .json(&json!({"project": {"name": name, "domain_id": DOMAIN}})),
            )
            .await;
        created["project"]["id"].as_str().unwrap().to_owned()
    }

    /// Creates a user in the default domain with `role` (`member`, `reader`, `admin`,
    /// ...) on the project `project_id`; its id.
    pub async fn create_user(
        &self,
        name: &str,
        password: &str,
        project_id: &str,
        role: &str,
    ) -> String {
        let created = self
            .admin(self.client.post(format!("{}/users", self.auth_url)).json(
                &json!({"user": {"name": name, "password": password, "domain_id": DOMAIN,
                         "default_project_id": project_id}}),
            ))
            .await;
        let user = created["user"]["id"].as_str().unwrap().to_owned();
        self.grant(&user, project_id, role).await;
        user
    }

    /// Gives `user_id` the role named `role` on `project_id`.
    pub async fn grant(&self, user_id: &str, project_id: &str, role: &str) {
        let roles = self
            .admin(
                self.client
                    .get(format!("{}/roles?name={role}", self.auth_url)),
            )
            .await;
        let role_id = roles["roles"][0]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no role {role}: {roles}"))
            .to_owned();
        self.admin(self.client.put(format!(
            "{}/projects/{project_id}/users/{user_id}/roles/{role_id}",
            self.auth_url
        )))
        .await;
    }
}

impl Drop for Keystone {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A one-shot blocking `GET` for the readiness probe: the status, or `None`.
fn http_get_status(host: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}
