//! The real glance-api 33.0.0 on loopback, for interop tests over HTTP: its own config
//! directory, a database synced by `glance-manage db sync` (once per build, then copied
//! per test), its filesystem store, and gunicorn with one gthread worker (Glance keeps
//! per-process state: its cache worker thread). No Keystone: an unauthenticated
//! context and a policy that makes everyone admin. Killed with its process group on drop.
//!
//! With a cache directory it runs its cache middleware (`centralized_db` driver) on
//! that directory and keeps its cache rows in its own `[database] connection`: to share
//! a cache with glance-cached, give it the same SQLite file and the same node URL.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long glance-api may take to answer `/versions` (1-3 s here).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The Glance virtualenv's python, or `None` (with a note) when the suite runs without
/// it; under CI its absence is a failure.
pub fn glance_python() -> Option<PathBuf> {
    match std::env::var("GLANCE_CACHED_TEST_GLANCE_PYTHON") {
        Ok(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ if std::env::var_os("CI").is_some() => {
            panic!("GLANCE_CACHED_TEST_GLANCE_PYTHON is not set: run the suite with scripts/test")
        }
        _ => {
            eprintln!(
                "SKIPPED: GLANCE_CACHED_TEST_GLANCE_PYTHON is not set (scripts/test sets it up)"
            );
            None
        }
    }
}

/// What one glance-api shares with glance-cached.
pub struct GlanceApiOptions<'a> {
    /// Its `image_cache_dir`; `None` runs it without the cache middleware.
    pub cache_dir: Option<&'a Path>,
    /// Its `[database] connection`, a SQLite file (synced here when it does not exist).
    pub database: &'a Path,
    /// Its `worker_self_reference_url`: glance-cached's `node.reference_url`.
    pub node_url: &'a str,
    /// `Some`: tokens are validated by this Keystone (keystonemiddleware's `authtoken`,
    /// the kit's admin as the service user) and Glance's default policy decides;
    /// `None`: Glance's noauth flavor, every caller an admin.
    pub keystone: Option<&'a crate::kit::keystone::Keystone>,
}

pub struct GlanceApi {
    child: Child,
    pub url: String,
    pub log: PathBuf,
    client: reqwest::Client,
    _dirs: tempfile::TempDir,
}

impl GlanceApi {
    /// Starts glance-api and waits until it answers; `None` when Glance is not installed.
    pub fn start(options: &GlanceApiOptions) -> Option<GlanceApi> {
        let python = glance_python()?;
        let bin = python
            .parent()
            .expect("the venv's bin directory")
            .to_path_buf();
        let venv = bin.parent().expect("the venv").to_path_buf();
        let dirs = tempfile::tempdir().unwrap();
        let d = dirs.path();
        for sub in ["conf", "staging", "store", "locks"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        let port = crate::kit::free_port();
        let url = format!("http://127.0.0.1:{port}");
        // Without Keystone everyone is an admin; with it, Glance's default policy.
        let policy = if options.keystone.is_none() {
            std::fs::write(
                d.join("conf/policy.yaml"),
                "\"context_is_admin\": \"@\"\n\"service_api\": \"@\"\n",
            )
            .unwrap();
            format!(
                "[oslo_policy]\npolicy_file = {}/conf/policy.yaml\n",
                d.display()
            )
        } else {
            String::new()
        };
        let cache = match options.cache_dir {
            Some(dir) => format!(
                "image_cache_dir = {}\nimage_cache_driver = centralized_db\n",
                dir.display()
            ),
            None => String::new(),
        };
        let flavor = match (options.keystone, options.cache_dir.is_some()) {
            (None, false) => String::new(),
            (None, true) => "flavor = caching\n".to_owned(),
            (Some(keystone), cached) => format!(
                "flavor = {}\n[keystone_authtoken]\nwww_authenticate_uri = {ks}\nauth_url = {ks}\n\
                 auth_type = password\nusername = admin\npassword = {pw}\nproject_name = admin\n\
                 user_domain_id = default\nproject_domain_id = default\n",
                if cached {
                    "keystone+caching"
                } else {
                    "keystone"
                },
                ks = keystone.url,
                pw = crate::kit::keystone::ADMIN_PASSWORD,
            ),
        };
        let conf = format!(
            "[DEFAULT]\nworker_self_reference_url = {node}\nnode_staging_uri = file://{d}/staging\n\
             enabled_import_methods = [glance-direct]\n{cache}\
             [database]\nconnection = sqlite:///{db}\n\
             [glance_store]\nstores = file\ndefault_store = file\nfilesystem_store_datadir = {d}/store\n\
             [oslo_concurrency]\nlock_path = {d}/locks\n{policy}\
             [paste_deploy]\nconfig_file = {venv}/etc/glance/glance-api-paste.ini\n{flavor}",
            node = options.node_url,
            d = d.display(),
            db = options.database.display(),
            venv = venv.display(),
        );
        std::fs::write(d.join("conf/glance-api.conf"), conf).unwrap();
        if !options.database.exists() {
            std::fs::copy(synced_database(&bin), options.database).unwrap();
        }
        let log = d.join("glance-api.log");
        let log_file = std::fs::File::create(&log).unwrap();
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
            .args(["--graceful-timeout", "1", "glance.wsgi.api:application"])
            .env("OS_GLANCE_CONFIG_DIR", d.join("conf"))
            // Glance turns naive UTC into epoch seconds as local time.
            .env("TZ", "UTC")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            // Its own group, so drop takes the worker along with the arbiter.
            .process_group(0)
            .spawn()
            .unwrap();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut api = GlanceApi {
            child,
            url,
            log,
            client: reqwest::Client::new(),
            _dirs: dirs,
        };
        api.wait_ready();
        Some(api)
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let versions = format!("{}/versions", self.url.trim_start_matches("http://"));
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("glance-api exited ({status}):\n{}", self.log_text());
            }
            if http_get_status(&versions) == Some(200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "glance-api did not answer /versions:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Uploads `data` as a new raw image; returns its id once it is `active`.
    pub async fn create_image(&self, data: &[u8]) -> String {
        self.create_image_as(None, data).await
    }

    /// `create_image` by the holder of `token` (its owner, with Keystone).
    pub async fn create_image_as(&self, token: Option<&str>, data: &[u8]) -> String {
        let with_token = |r: reqwest::RequestBuilder| match token {
            Some(t) => r.header("X-Auth-Token", t),
            None => r,
        };
        let created = json_answer(
            with_token(self.client.post(format!("{}/v2/images", self.url))).json(
                &serde_json::json!({"name": "t", "disk_format": "raw", "container_format": "bare"}),
            ),
        )
        .await;
        let id = created["id"].as_str().unwrap().to_owned();
        let status = with_token(self.client.put(format!("{}/v2/images/{id}/file", self.url)))
            .header("Content-Type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 204, "upload of {id}:\n{}", self.log_text());
        id
    }

    /// Deactivates `id` with an admin's `token`.
    pub async fn deactivate(&self, token: &str, id: &str) {
        let status = self
            .client
            .post(format!("{}/v2/images/{id}/actions/deactivate", self.url))
            .header("X-Auth-Token", token)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 204, "deactivate {id}:\n{}", self.log_text());
    }

    pub async fn delete_image(&self, id: &str) {
        self.expect_delete(&format!("/v2/images/{id}"), "").await;
    }

    /// `GET /v2/images/{id}/file` as Nova does it (un-ranged): the bytes.
    pub async fn download(&self, id: &str) -> Vec<u8> {
        let response = self
            .client
            .get(format!("{}/v2/images/{id}/file", self.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "download of {id}");
        response.bytes().await.unwrap().to_vec()
    }

    /// `GET /v2/cache`: `{"cached_images": [...], "queued_images": [...]}`.
    pub async fn cache_state(&self) -> Value {
        json_answer(self.client.get(format!("{}/v2/cache", self.url))).await
    }

    /// The image ids `GET /v2/cache` lists as cached.
    pub async fn cached_ids(&self) -> Vec<String> {
        let state = self.cache_state().await;
        let mut ids: Vec<String> = state["cached_images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["image_id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    }

    /// `DELETE /v2/cache/{id}`: Glance removes the image from its cache and its queue.
    pub async fn cache_delete(&self, id: &str) {
        self.expect_delete(&format!("/v2/cache/{id}"), "").await;
    }

    /// `DELETE /v2/cache` with `x-image-cache-clear-target` (`""`, `cache` or `queue`).
    pub async fn cache_clear(&self, target: &str) {
        self.expect_delete("/v2/cache", target).await;
    }

    /// `DELETE path` (with a clear target header when not empty), answered 204.
    async fn expect_delete(&self, path: &str, clear_target: &str) {
        let mut request = self.client.delete(format!("{}{path}", self.url));
        if !clear_target.is_empty() {
            request = request.header("x-image-cache-clear-target", clear_target);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status().as_u16(),
            204,
            "DELETE {path}: {}\n{}",
            response.text().await.unwrap_or_default(),
            self.log_text()
        );
    }
}

impl Drop for GlanceApi {
    fn drop(&mut self) {
        if let Some(group) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        let _ = self.child.wait();
    }
}

/// A loopback port free a moment ago (gunicorn binds it itself).
/// Sends `request`; requires a success status and returns the JSON body.
async fn json_answer(request: reqwest::RequestBuilder) -> Value {
    request
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A one-shot blocking `GET` for the readiness probe: the status, or `None`.
fn http_get_status(host_and_path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let (host, path) = host_and_path.split_once('/')?;
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// A database `glance-manage db sync` made, once per build directory (2 s saved per
/// test); concurrent test processes each may make one, the last rename wins.
fn synced_database(bin: &Path) -> PathBuf {
    let template = Path::new(env!("CARGO_TARGET_TMPDIR")).join("glance-33.0.0-synced.sqlite");
    if template.exists() {
        return template;
    }
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let db = work.path().join("glance.sqlite");
    let conf = work.path().join("glance-manage.conf");
    std::fs::write(
        &conf,
        format!("[database]\nconnection = sqlite:///{}\n", db.display()),
    )
    .unwrap();
    let out = glance_manage_with(bin, &conf, &["db", "sync"]);
    assert!(
        out.status.success(),
        "glance-manage db sync: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&db, &template).unwrap();
    template
}

/// `glance-manage --config-file CONF ARGS` of the virtualenv whose `bin` is given.
fn glance_manage_with(bin: &Path, conf: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin.join("glance-manage"))
        .arg("--config-file")
        .arg(conf)
        .args(args)
        .output()
        .unwrap()
}

/// The URL SQLAlchemy (Glance) needs for the database sqlx knows as `url`: four slashes
/// before an absolute SQLite path, a named driver for the servers.
pub fn sqlalchemy_url(url: &str) -> String {
    if let Some(path) = url.strip_prefix("sqlite://") {
        format!("sqlite:///{path}")
    } else if let Some(rest) = url.strip_prefix("postgres://") {
        format!("postgresql+psycopg2://{rest}")
    } else if let Some(rest) = url.strip_prefix("mysql://") {
        let sep = if rest.contains('?') { '&' } else { '?' };
        format!("mysql+pymysql://{rest}{sep}charset=utf8")
    } else {
        panic!("no SQLAlchemy form for {url}")
    }
}

/// Whether the Glance virtualenv can reach `url`'s backend: SQLite always, PostgreSQL
/// and MariaDB with the drivers `scripts/glance-venv` installs (psycopg2, PyMySQL);
/// without them a note, and under CI a failure.
pub fn can_reach(python: &Path, url: &str) -> bool {
    let module = match url.split_once("://").map(|(scheme, _)| scheme) {
        Some("postgres") => "psycopg2",
        Some("mysql") => "pymysql",
        _ => return true,
    };
    let found = Command::new(python)
        .args(["-c", &format!("import {module}")])
        .output()
        .unwrap()
        .status
        .success();
    assert!(
        found || std::env::var_os("CI").is_none(),
        "the Glance virtualenv lacks {module}: rerun scripts/glance-venv"
    );
    if !found {
        eprintln!("SKIPPED: the Glance virtualenv lacks {module} (rerun scripts/glance-venv)");
    }
    found
}

/// `glance-manage ARGS` of the Glance virtualenv `python` belongs to, on the database
/// sqlx knows as `url`; returns its output, whatever its status.
pub fn glance_manage(python: &Path, url: &str, args: &[&str]) -> std::process::Output {
    let bin = python.parent().expect("the venv's bin directory");
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("glance-manage.conf");
    std::fs::write(
        &conf,
        format!("[database]\nconnection = {}\n", sqlalchemy_url(url)),
    )
    .unwrap();
    glance_manage_with(bin, &conf, args)
}

/// Glance's command-line client (`glance`, python-glanceclient) from the virtualenv of
/// `python`, pointed at `http://127.0.0.1:port` with `token`, run with `args`. No
/// `OS_*` variable of ours reaches it, its home is `home`, and its stdin is closed:
/// with stdin open and not a terminal (even `/dev/null`), `image-create` would upload
/// it as the image's data. Naming the API version skips the client's version discovery, which asks for
/// image schemas a daemon without forwarding does not serve (the cache commands still
/// check `/versions`).
pub fn glance_cli(
    python: &Path,
    home: &Path,
    port: u16,
    token: &str,
    args: &[&str],
) -> std::process::Output {
    let mut cmd = Command::new(python.parent().unwrap().join("glance"));
    for (k, _) in std::env::vars() {
        if k.starts_with("OS_") {
            cmd.env_remove(k);
        }
    }
    // SAFETY: close(2) is async-signal-safe; the child closes its own descriptor.
    unsafe {
        cmd.pre_exec(|| {
            libc::close(0);
            Ok(())
        });
    }
    cmd.env("HOME", home)
        .args(["--os-image-api-version", "2"])
        .args(["--os-image-url", &format!("http://127.0.0.1:{port}")])
        .args(["--os-auth-token", token])
        .args(args)
        .output()
        .unwrap()
}

/// The stdout of a command that must have succeeded (else its output, in the panic).
pub fn succeeded(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
