//! The real glance-api 33 for the benchmarks' baselines: gunicorn with one gthread
//! worker on loopback, no Keystone (everyone admin), its filesystem store, and with
//! `cache` its own image cache (`flavor = caching`, the `centralized_db` driver on its
//! own SQLite database), as the test kit's `tests/it/kit/glance.rs` starts it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long glance-api may take to answer `/versions` (1-3 s here, more under load).
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// The Glance virtualenv's python: `GLANCE_CACHED_TEST_GLANCE_PYTHON` (as the tests),
/// else `target/glance-venv/bin/python`; `None` when neither exists.
pub fn python() -> Option<PathBuf> {
    let p = std::env::var_os("GLANCE_CACHED_TEST_GLANCE_PYTHON")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/glance-venv/bin/python")
        });
    p.exists().then_some(p)
}

/// glance-api, killed with its process group (arbiter and worker) on drop.
pub struct GlanceApi {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl GlanceApi {
    /// Starts glance-api in `dir` (created) on `port` and waits until it answers.
    /// `cache`: run its cache middleware on `dir/image-cache`.
    pub fn start(python: &Path, dir: &Path, port: u16, cache: bool) -> GlanceApi {
        let bin = python.parent().unwrap();
        let venv = bin.parent().unwrap();
        for sub in ["conf", "staging", "store", "locks", "image-cache"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(
            dir.join("conf/policy.yaml"),
            "\"context_is_admin\": \"@\"\n\"service_api\": \"@\"\n",
        )
        .unwrap();
        let db = dir.join("glance.sqlite");
        std::fs::copy(synced_database(bin, dir), &db).unwrap();
        let d = dir.display();
        let (cache_conf, flavor) = if cache {
            (
                format!(
                    "image_cache_dir = {d}/image-cache\nimage_cache_driver = centralized_db\n\
                     image_cache_max_size = 107374182400\n"
                ),
                "flavor = caching\n",
            )
        } else {
            (String::new(), "")
        };
        std::fs::write(
            dir.join("conf/glance-api.conf"),
            format!(
                "[DEFAULT]\nworker_self_reference_url = http://127.0.0.1:{port}\n\
                 node_staging_uri = file://{d}/staging\nenabled_import_methods = [glance-direct]\n{cache_conf}\
                 [database]\nconnection = sqlite:///{db}\n\
                 [glance_store]\nstores = file\ndefault_store = file\nfilesystem_store_datadir = {d}/store\n\
                 [oslo_concurrency]\nlock_path = {d}/locks\n[oslo_policy]\npolicy_file = {d}/conf/policy.yaml\n\
                 [paste_deploy]\nconfig_file = {venv}/etc/glance/glance-api-paste.ini\n{flavor}",
                db = db.display(),
                venv = venv.display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("glance-api.log")).unwrap();
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
            .args(["glance.wsgi.api:application"])
            .env("OS_GLANCE_CONFIG_DIR", dir.join("conf"))
            // Glance turns naive UTC into epoch seconds as local time.
            .env("TZ", "UTC")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // Its own group, so drop takes the worker along with the arbiter.
            .process_group(0)
            .spawn()
            .unwrap();
        let mut api = GlanceApi {
            child,
            port,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &api.url("/versions"),
        ]) != "200"
        {
            if let Some(status) = api.child.try_wait().unwrap() {
                panic!("glance-api exited ({status}):\n{}", api.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "glance-api did not answer /versions:\n{}",
                api.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        api
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("glance-api.log")).unwrap_or_default()
    }

    /// Creates a raw image and uploads `file` into it; its id once it is `active`.
    pub fn create_image(&self, file: &Path) -> String {
        let created = curl(&[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"name": "bench", "disk_format": "raw", "container_format": "bare"}"#,
            &self.url("/v2/images"),
        ]);
        let created: serde_json::Value = serde_json::from_str(&created)
            .unwrap_or_else(|e| panic!("POST /v2/images: {e}: {created}"));
        let id = created["id"].as_str().unwrap().to_owned();
        let status = curl(&[
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
            "-T",
            file.to_str().unwrap(),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &self.url(&format!("/v2/images/{id}/file")),
        ]);
        assert_eq!(status, "204", "upload of {id}:\n{}", self.log_text());
        id
    }

    /// Downloads `id` once (its cache middleware keeps what it serves) and waits until
    /// `GET /v2/cache` lists it as cached.
    pub fn cache_image(&self, id: &str) {
        let status = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &self.url(&format!("/v2/images/{id}/file")),
        ]);
        assert_eq!(status, "200", "download of {id}:\n{}", self.log_text());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = curl(&[&self.url("/v2/cache")]);
            let state: serde_json::Value = serde_json::from_str(&state)
                .unwrap_or_else(|e| panic!("GET /v2/cache: {e}: {state}"));
            let cached = state["cached_images"]
                .as_array()
                .is_some_and(|c| c.iter().any(|i| i["image_id"] == id));
            if cached {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "glance-api did not cache {id}: {state}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
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

/// `curl -s ARGS`: its standard output.
fn curl(args: &[&str]) -> String {
    let out = Command::new("curl").arg("-s").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A database `glance-manage db sync` made, once per target directory (2 s saved per
/// run); made in `scratch` and renamed into place.
fn synced_database(bin: &Path, scratch: &Path) -> PathBuf {
    let template = Path::new(env!("CARGO_TARGET_TMPDIR")).join("glance-33.0.0-synced.sqlite");
    if template.exists() {
        return template;
    }
    let db = scratch.join("synced.sqlite");
    let conf = scratch.join("manage.conf");
    std::fs::write(
        &conf,
        format!("[database]\nconnection = sqlite:///{}\n", db.display()),
    )
    .unwrap();
    let out = Command::new(bin.join("glance-manage"))
        .arg("--config-file")
        .arg(&conf)
        .args(["db", "sync"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "glance-manage db sync: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Across filesystems (BENCH_DIR on a tmpfs) a rename fails: copy to the side first.
    let side = template.with_extension("partial");
    std::fs::copy(&db, &side).unwrap();
    std::fs::rename(&side, &template).unwrap();
    template
}
