//! The benchmarks' Glance origin: nginx (Debian's `nginx-light`) in a process of its
//! own, serving with `sendfile`, so the origin's CPU is never in our figures. Its own
//! config in a temp dir (`daemon off`, loopback) serves images as Glance does:
//! `/v2/images/{id}` as Glance's JSON (`size`, `checksum`, `os_hash_algo` sha512,
//! `os_hash_value`) and `/v2/images/{id}/file` as the bytes (a `Range` answered 206, as
//! nginx does for a static file).

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use md5::Digest;

/// Writes `mib` MiB of incompressible bytes and returns (md5, sha512).
pub fn make_source(path: &Path, mib: u64) -> (String, String) {
    let mut file = std::fs::File::create(path).unwrap();
    let mut md5 = md5::Md5::new();
    let mut sha = sha2::Sha512::new();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for word in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&buf).unwrap();
        md5.update(&buf);
        sha.update(&buf);
    }
    file.sync_all().unwrap();
    (hex::encode(md5.finalize()), hex::encode(sha.finalize()))
}

/// nginx, or a clear stop: the benchmark's figures mean nothing with another origin.
pub fn nginx_binary() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file());
    match found {
        Some(p) => p,
        None => {
            eprintln!(
                "benchmark: nginx is not installed. The origin must be a separate \
                 process serving with sendfile (Debian: apt-get install nginx-light; \
                 scripts/bench installs it when run as root). Nothing was measured."
            );
            std::process::exit(2);
        }
    }
}

/// An image nginx serves as Glance would.
pub struct Served {
    pub id: String,
    pub file: PathBuf,
    pub json: PathBuf,
}

impl Served {
    pub fn new(dir: &Path, id: &str, mib: u64) -> Served {
        let file = dir.join(format!("{id}.raw"));
        let (md5, sha512) = make_source(&file, mib);
        let json = dir.join(format!("{id}.json"));
        let size = mib << 20;
        std::fs::write(
            &json,
            format!(
                r#"{{"id":"{id}","status":"active","size":{size},"checksum":"{md5}","os_hash_algo":"sha512","os_hash_value":"{sha512}"}}"#
            ),
        )
        .unwrap();
        Served {
            id: id.into(),
            file,
            json,
        }
    }
}

/// nginx in the foreground on a loopback port, with a config of its own in `dir`.
pub struct Nginx {
    child: Child,
    pub port: u16,
}

/// The access log's line (`Nginx::start_logging`): what a request asked and what
/// nginx sent for it, body and all.
pub const ACCESS_LOG_FORMAT: &str =
    "$msec $request_method $uri $status \"$http_range\" $body_bytes_sent $bytes_sent";

impl Nginx {
    /// No access log.
    pub fn start(dir: &Path, images: &[&Served]) -> Nginx {
        Nginx::start_with(dir, images, None)
    }

    /// One `ACCESS_LOG_FORMAT` line per request into `log`, written as each request
    /// ends (no buffer): what the origin sent, counted where it was sent.
    pub fn start_logging(dir: &Path, images: &[&Served], log: &Path) -> Nginx {
        Nginx::start_with(dir, images, Some(log))
    }

    fn start_with(dir: &Path, images: &[&Served], access_log: Option<&Path>) -> Nginx {
        let bin = nginx_binary();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.display();
        let tmp = dir.join("nginx-tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let t = tmp.display();
        let mut locations = String::new();
        for image in images {
            locations += &format!(
                "    location = /v2/images/{id} {{ default_type application/json; alias {json}; }}\n    location = /v2/images/{id}/file {{ default_type application/octet-stream; alias {file}; }}\n",
                id = image.id,
                json = image.json.display(),
                file = image.file.display()
            );
        }
        let logging = match access_log {
            Some(log) => format!(
                "  log_format counted '{ACCESS_LOG_FORMAT}';\n  access_log {} counted;\n",
                log.display()
            ),
            None => "  access_log off;\n".into(),
        };
        // As root the workers would drop to `nobody`, who cannot read our temp dir.
        let user = if rustix::process::geteuid().is_root() {
            "user root root;\n"
        } else {
            ""
        };
        let config = format!(
            "{user}daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n{logging}  sendfile on;\n  tcp_nopush on;\n  keepalive_timeout 60;\n\
             client_body_temp_path {t}/body;\n  proxy_temp_path {t}/proxy;\n  fastcgi_temp_path {t}/fastcgi;\n\
             uwsgi_temp_path {t}/uwsgi;\n  scgi_temp_path {t}/scgi;\n\
             server {{\n    listen 127.0.0.1:{port};\n{locations}  }}\n}}\n"
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config).unwrap();
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("nginx-error.log"))
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut nginx = Nginx { child, port };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("nginx-error.log")).unwrap_or_default();
                panic!("nginx exited ({status}): {log}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nginx did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: nginx's fast shutdown; its workers go with the master.
        super::terminate(&mut self.child);
    }
}
