//! The test kit: everything the tests in `tests/it/` share, so that the test files hold
//! tests only:
//! - `canary`: a watched tree outside the cache that nothing may touch;
//! - `cli`: the built binary, run in the one scrubbed environment of the suite;
//! - `daemon`: the daemon binary run with a notify socket, and a daemon's setup on disk;
//! - `glance`: the real glance-api on loopback, and the Glance virtualenv's python that
//!   it and the Glance driver of `glance_interop` run on;
//! - `keystone`: the real Keystone on loopback, its projects, users and tokens;
//! - `origin`: an HTTP origin for failure injection;
//! - `servers`: test databases on the three backends, private servers to stop and start;
//! - here: deterministic bytes, digests, ids, file ages and Glance's old SQLite database.

use std::path::Path;

pub mod canary;
pub mod cli;
pub mod daemon;
pub mod glance;
pub mod keystone;
pub mod origin;
pub mod servers;

/// Sets a file's mtime to `secs_ago` seconds before now.
pub fn age_file(path: &Path, secs_ago: u64) {
    let t = std::time::SystemTime::now() - std::time::Duration::from_secs(secs_ago);
    filetime::set_file_mtime(path, filetime::FileTime::from_system_time(t)).unwrap();
}

/// Writes `len` deterministic bytes derived from `seed`.
pub fn test_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A valid image id (test literals only).
pub fn id(s: &str) -> glance_cached::image_id::ImageId {
    glance_cached::image_id::ImageId::parse(s).unwrap()
}

pub fn md5_hex(data: &[u8]) -> String {
    hex::encode(<md5::Md5 as md5::Digest>::digest(data))
}

pub fn sha512_hex(data: &[u8]) -> String {
    hex::encode(<sha2::Sha512 as sha2::Digest>::digest(data))
}

/// Creates `path` as Glance's old per-node SQLite driver creates its `cache.db` (for
/// `migrate-sqlite`), with no rows; the pool to fill it.
pub async fn legacy_cache_db(path: &Path) -> sqlx::SqlitePool {
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    sqlx::query(
        "CREATE TABLE cached_images (image_id TEXT PRIMARY KEY, last_accessed REAL DEFAULT 0.0, \
         last_modified REAL DEFAULT 0.0, size INTEGER DEFAULT 0, hits INTEGER DEFAULT 0, checksum TEXT)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool
}

/// A loopback TCP port that was free a moment ago, for a server the kit starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A loopback HTTP proxy of one request per connection (`Connection: close` is put in
/// the head on the way): each request goes to the port `route` gives for its path, and
/// is logged as `METHOD PATH RANGE` (`-` without a `Range`). Its port and the log.
pub fn routing_proxy(
    route: impl Fn(&str) -> u16 + Send + Sync + 'static,
) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (route, requests) = (std::sync::Arc::new(route), log.clone());
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let (route, requests) = (route.clone(), requests.clone());
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let mut words = text.split_whitespace();
                let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let range = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Range: ").or(l.strip_prefix("range: ")))
                    .unwrap_or("-");
                requests
                    .lock()
                    .unwrap()
                    .push(format!("{method} {path} {}", range.trim()));
                let to = route(path);
                let mut lines: Vec<&str> = text
                    .trim_end()
                    .lines()
                    .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
                    .collect();
                lines.push("Connection: close");
                let head = format!("{}\r\n\r\n", lines.join("\r\n"));
                let Ok(mut server) = std::net::TcpStream::connect(("127.0.0.1", to)) else {
                    return;
                };
                let _ = server.write_all(head.as_bytes());
                let _ = std::io::copy(&mut server, &mut client);
            });
        }
    });
    (port, log)
}
