//! Shared test kit: fresh databases on the three backends, temporary cache directories,
//! and a driver wired to both.
//!
//! PostgreSQL and MariaDB come from `scripts/test-services` through
//! `GLANCE_CACHED_TEST_POSTGRES_URL` and `GLANCE_CACHED_TEST_MYSQL_URL`. Every test gets
//! its own database. Without those variables a server test fails under CI and is skipped
//! with a printed reason elsewhere.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use glance_cached::cache::{CacheDriver, CacheLayout};
use glance_cached::db::{Db, DbOptions, NodeDb};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MySql,
}

/// A database of its own for one test. Server databases are dropped when it goes away.
pub struct TestDb {
    pub url: String,
    pub backend: Backend,
    admin_url: Option<String>,
    name: String,
    _dir: Option<tempfile::TempDir>,
}

fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "t_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

/// The server URL for `backend`, or `None` (after saying why) when it is not configured
/// outside CI. Under CI a missing server is a failure, never a silent skip.
pub fn server_url(backend: Backend) -> Option<String> {
    let var = match backend {
        Backend::Sqlite => return None,
        Backend::Postgres => "GLANCE_CACHED_TEST_POSTGRES_URL",
        Backend::MySql => "GLANCE_CACHED_TEST_MYSQL_URL",
    };
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{var} is not set: run the suite with scripts/test, which starts the servers")
        }
        _ => {
            eprintln!(
                "SKIPPED: {var} is not set (run scripts/test to start PostgreSQL and MariaDB)"
            );
            None
        }
    }
}

/// Replaces the database name (last path segment) of a server URL.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let cut = base.rfind('/').expect("server url has a database path");
    let mut out = format!("{}/{name}", &base[..cut]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

impl TestDb {
    /// A fresh empty database, or `None` when the backend's server is not available
    /// outside CI.
    pub async fn new(backend: Backend) -> Option<TestDb> {
        let name = unique_name();
        if backend == Backend::Sqlite {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("test.db").display());
            return Some(TestDb {
                url,
                backend,
                admin_url: None,
                name,
                _dir: Some(dir),
            });
        }
        let admin_url = server_url(backend)?;
        admin_sql(&admin_url, backend, &format!("CREATE DATABASE {name}")).await;
        Some(TestDb {
            url: with_database(&admin_url, &name),
            backend,
            admin_url: Some(admin_url),
            name,
            _dir: None,
        })
    }

    /// A second handle on the same database that does not drop it.
    pub fn shared(&self) -> TestDb {
        TestDb {
            url: self.url.clone(),
            backend: self.backend,
            admin_url: None,
            name: self.name.clone(),
            _dir: None,
        }
    }

    pub async fn connect(&self) -> Db {
        Db::connect(&self.url, &DbOptions::default()).await.unwrap()
    }

    /// Drops a server database; call at the end of a test (best effort, never fails it).
    pub async fn drop_database(&self) {
        if let Some(admin) = &self.admin_url {
            let sql = match self.backend {
                Backend::Postgres => format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
                _ => format!("DROP DATABASE IF EXISTS {}", self.name),
            };
            let admin = admin.clone();
            let backend = self.backend;
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async move {
                admin_sql(&admin, backend, &sql).await;
            })
            .await;
        }
    }
}

/// Runs one statement on the server's administrative database.
pub async fn admin_sql(url: &str, backend: Backend, statement: &str) {
    run_sql(url, backend, statement).await.unwrap();
}

/// Runs one statement on the database at `url`, on its own connection.
pub async fn run_sql(url: &str, backend: Backend, statement: &str) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    let statement = sqlx::AssertSqlSafe(statement.to_owned());
    match backend {
        Backend::Postgres => {
            let mut c = sqlx::PgConnection::connect(url).await?;
            let done = sqlx::query(statement).execute(&mut c).await.map(drop);
            let _ = c.close().await;
            done
        }
        Backend::MySql => {
            let mut c = sqlx::MySqlConnection::connect(url).await?;
            let done = sqlx::query(statement).execute(&mut c).await.map(drop);
            let _ = c.close().await;
            done
        }
        Backend::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(url).await?;
            let done = sqlx::query(statement).execute(&mut c).await.map(drop);
            let _ = c.close().await;
            done
        }
    }
}

/// A cache directory with a driver on a test database.
pub struct TestCache {
    pub dir: tempfile::TempDir,
    pub db: TestDb,
    /// The database the driver was given, bound to its node.
    pub node_db: NodeDb,
    pub layout: CacheLayout,
    pub driver: CacheDriver,
}

impl TestCache {
    pub async fn new(backend: Backend) -> Option<TestCache> {
        let db = TestDb::new(backend).await?;
        Some(Self::on(db, "http://node-a:9292").await)
    }

    /// A cache of node `node_url` on an existing test database.
    pub async fn on(db: TestDb, node_url: &str) -> TestCache {
        let dir = tempfile::tempdir().unwrap();
        let layout = CacheLayout::open(dir.path().join("cache")).unwrap();
        let node_db = NodeDb::configure(db.connect().await, node_url)
            .await
            .unwrap();
        let driver = CacheDriver::new(layout.clone(), node_db.clone());
        TestCache {
            dir,
            db,
            node_db,
            layout,
            driver,
        }
    }

    pub fn root(&self) -> PathBuf {
        self.layout.root().to_path_buf()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    pub async fn finish(self) {
        self.node_db.db().close().await;
        self.db.drop_database().await;
    }
}

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

/// One test per backend for each named `async fn(Backend)` of the calling module (which
/// must have `Backend` in scope): modules `sqlite`, `postgres` and `mysql`, each test
/// under `#[tokio::test]` or the test attribute given first.
macro_rules! on_every_backend {
    (#[$attr:meta] $($test:ident),* $(,)?) => {
        mod sqlite { $( #[$attr] async fn $test() { super::$test(super::Backend::Sqlite).await } )* }
        mod postgres { $( #[$attr] async fn $test() { super::$test(super::Backend::Postgres).await } )* }
        mod mysql { $( #[$attr] async fn $test() { super::$test(super::Backend::MySql).await } )* }
    };
    ($($test:ident),* $(,)?) => {
        $crate::common::on_every_backend!(#[tokio::test] $($test),*);
    };
}
pub(crate) use on_every_backend;
