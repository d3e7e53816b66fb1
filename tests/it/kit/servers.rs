//! Test databases: a fresh database per test on the three backends, temporary cache
//! directories with a driver wired to both, and `on_every_backend!`; private PostgreSQL
//! and MariaDB servers a test may stop and start (outage tests), and a SQLite file
//! locked by another process.
//!
//! PostgreSQL and MariaDB come from `scripts/test-services` through
//! `GLANCE_CACHED_TEST_POSTGRES_URL` and `GLANCE_CACHED_TEST_MYSQL_URL`. Every test gets
//! its own database. Without those variables a server test fails under CI and is skipped
//! with a printed reason elsewhere.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use glance_cached::cache::{CacheDriver, CacheLayout};
use glance_cached::db::{Db, DbOptions, NodeDb};
use rustix::process::{Pid, Signal, kill_process};

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
            // Retried: a drop can be refused while the server's own worker (autovacuum,
            // say) is in the database; a database left behind costs nothing, as the
            // servers' data goes at the suite's end.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async move {
                for _ in 0..5 {
                    if run_sql(&admin, backend, &sql).await.is_ok() {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
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
        $crate::kit::servers::on_every_backend!(#[tokio::test] $($test),*);
    };
}
pub(crate) use on_every_backend;

/// A PostgreSQL cluster of one test's own, which the test may stop and start.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    /// `None` (after saying why) outside CI when PostgreSQL binaries or root are missing.
    pub fn start() -> Option<PrivatePostgres> {
        let bin = match std::env::var("GLANCE_CACHED_TEST_POSTGRES_BIN") {
            Ok(b) if !b.is_empty() && rustix::process::geteuid().is_root() => PathBuf::from(b),
            _ if std::env::var_os("CI").is_some() => {
                panic!(
                    "GLANCE_CACHED_TEST_POSTGRES_BIN unset or not root: run scripts/test as root"
                )
            }
            _ => {
                eprintln!("SKIPPED: a private PostgreSQL needs root and scripts/test");
                return None;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        run_ok(Command::new("chmod").arg("755").arg(dir.path()));
        run_ok(Command::new("chown").arg("postgres:").arg(dir.path()));
        run_ok(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join("initdb"))
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-locale",
                    "-E",
                    "UTF8",
                    "-D",
                ])
                .arg(dir.path().join("data")),
        );
        let port = crate::kit::free_port();
        let pg = PrivatePostgres { dir, bin, port };
        pg.start_server();
        Some(pg)
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) {
        run_ok(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(args),
        );
    }

    pub fn start_server(&self) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log");
        self.pg_ctl(&["-w", "-l", log.to_str().unwrap(), "-o", &opts, "start"]);
    }

    pub fn stop_server(&self) {
        self.pg_ctl(&["-w", "-m", "fast", "stop"]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-w", "-m", "immediate", "stop"])
            .output();
    }
}

/// Another process holding a SQLite lock; killed if the test fails before it ends.
pub struct Locker(pub Child);

impl Drop for Locker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Holds `BEGIN EXCLUSIVE` on a SQLite file for `secs` in another process.
pub fn lock_sqlite(db: &Path, secs: u32) -> Locker {
    let mut locker = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys, time\n\
             c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
             c.execute('BEGIN EXCLUSIVE')\n\
             print('locked', flush=True)\n\
             time.sleep(int(sys.argv[2]))\n",
        ])
        .arg(db)
        .arg(secs.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(locker.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    Locker(locker)
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A MariaDB server of one test's own (started like `scripts/test-services` does, with a
/// password user on loopback TCP), which the test may stop and start.
pub struct PrivateMariadb {
    dir: tempfile::TempDir,
    server: Mutex<Option<Child>>,
    pub port: u16,
}

impl PrivateMariadb {
    /// `None` (after saying why) outside CI when MariaDB binaries or root are missing.
    pub fn start() -> Option<PrivateMariadb> {
        let have = Path::new("/usr/sbin/mariadbd").exists()
            && Command::new("mariadb-install-db")
                .arg("--help")
                .output()
                .is_ok();
        if !have || !rustix::process::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "a private MariaDB needs root and mariadb-server: run scripts/test as root"
            );
            eprintln!("SKIPPED: a private MariaDB needs root and mariadb-server");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        run_ok(Command::new("chmod").arg("755").arg(dir.path()));
        run_ok(Command::new("chown").arg("mysql:").arg(dir.path()));
        run_ok(
            Command::new("mariadb-install-db")
                .args(["--no-defaults", "--user=mysql", "--skip-test-db"])
                .arg(format!("--datadir={}", dir.path().join("data").display())),
        );
        let port = crate::kit::free_port();
        let my = PrivateMariadb {
            dir,
            server: Mutex::new(None),
            port,
        };
        my.start_server();
        let mut sql = String::from("CREATE DATABASE glance_cached;");
        for host in ["%", "localhost", "127.0.0.1"] {
            sql += &format!(
                "CREATE USER 'glance_cached'@'{host}' IDENTIFIED BY 'glance_cached';\
                 GRANT ALL PRIVILEGES ON glance_cached.* TO 'glance_cached'@'{host}';"
            );
        }
        run_ok(
            Command::new("mariadb")
                .args(["--no-defaults", "-uroot"])
                .arg(format!("--socket={}", my.socket().display()))
                .args(["-e", &sql]),
        );
        Some(my)
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("mariadbd.sock")
    }

    pub fn url(&self) -> String {
        format!(
            "mysql://glance_cached:glance_cached@127.0.0.1:{}/glance_cached",
            self.port
        )
    }

    pub fn start_server(&self) {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("mariadbd.log"))
            .unwrap();
        let mut child = Command::new("/usr/sbin/mariadbd")
            .args(["--no-defaults", "--user=mysql"])
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!("--pid-file={}", d.join("mariadbd.pid").display()))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--port={}", self.port))
            .args([
                "--skip-name-resolve",
                "--character-set-server=utf8mb4",
                "--collation-server=utf8mb4_unicode_ci",
                "--skip-log-bin",
                "--innodb-flush-log-at-trx-commit=0",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ping = Command::new("mariadb-admin")
                .args(["--no-defaults", "-uroot"])
                .arg(format!("--socket={}", self.socket().display()))
                .arg("ping")
                .output()
                .unwrap();
            if ping.status.success() {
                break;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "mariadbd exited with {status}: {}",
                    std::fs::read_to_string(d.join("mariadbd.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "MariaDB did not answer in 60 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        *self.server.lock().unwrap() = Some(child);
    }

    /// A clean shutdown (SIGTERM), waited for.
    pub fn stop_server(&self) {
        if let Some(mut child) = self.server.lock().unwrap().take() {
            let pid = Pid::from_raw(child.id() as i32).unwrap();
            kill_process(pid, Signal::TERM).unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for PrivateMariadb {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs one query on the database at `url` and returns `column` of every row as text
/// (`None` for NULL), for the catalogue and `EXPLAIN` output tests read.
pub async fn query_texts(
    url: &str,
    backend: Backend,
    statement: &str,
    column: &str,
) -> Vec<Option<String>> {
    use sqlx::{Connection, Row};
    let statement = sqlx::AssertSqlSafe(statement.to_owned());
    // MariaDB labels some catalogue and EXPLAIN columns as binary: bytes, then text.
    fn text<R: Row>(row: &R, column: &str) -> Option<String>
    where
        for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        for<'r> Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        for<'a> &'a str: sqlx::ColumnIndex<R>,
    {
        match row.try_get::<Option<String>, _>(column) {
            Ok(v) => v,
            Err(_) => row
                .try_get::<Option<Vec<u8>>, _>(column)
                .unwrap()
                .map(|b| String::from_utf8_lossy(&b).into_owned()),
        }
    }
    match backend {
        Backend::Postgres => {
            let mut c = sqlx::PgConnection::connect(url).await.unwrap();
            let rows = sqlx::query(statement).fetch_all(&mut c).await.unwrap();
            let _ = c.close().await;
            rows.iter().map(|r| text(r, column)).collect()
        }
        Backend::MySql => {
            let mut c = sqlx::MySqlConnection::connect(url).await.unwrap();
            let rows = sqlx::query(statement).fetch_all(&mut c).await.unwrap();
            let _ = c.close().await;
            rows.iter().map(|r| text(r, column)).collect()
        }
        Backend::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
            let rows = sqlx::query(statement).fetch_all(&mut c).await.unwrap();
            let _ = c.close().await;
            rows.iter().map(|r| text(r, column)).collect()
        }
    }
}

/// The name of our index on Glance's `cached_images` (`db::schema`).
pub const NODE_LRU_INDEX: &str = "ix_glance_cached_images_node_lru";

/// What `node_lru_index_columns` reads of it on every backend: the LRU order's key, then
/// every other column the per-node statements read (the index covers them).
pub const NODE_LRU_INDEX_COLUMNS: [&str; 8] = [
    "node_reference_id",
    "last_accessed",
    "id",
    "image_id",
    "last_modified",
    "size",
    "hits",
    "checksum",
];

/// The columns of our index on `cached_images`, in order (on PostgreSQL the key columns
/// then the `INCLUDE`d ones); empty when it is absent.
pub async fn node_lru_index_columns(url: &str, backend: Backend) -> Vec<String> {
    let statement = match backend {
        Backend::Sqlite => {
            format!("SELECT name FROM pragma_index_info('{NODE_LRU_INDEX}') ORDER BY seqno")
        }
        // indexdef: "CREATE INDEX ix ON public.cached_images USING btree (a, b, c)".
        Backend::Postgres => format!(
            "SELECT indexdef AS name FROM pg_indexes WHERE schemaname = current_schema() \
             AND tablename = 'cached_images' AND indexname = '{NODE_LRU_INDEX}'"
        ),
        Backend::MySql => format!(
            "SELECT column_name AS name FROM information_schema.statistics \
             WHERE table_schema = DATABASE() AND table_name = 'cached_images' \
             AND index_name = '{NODE_LRU_INDEX}' ORDER BY seq_in_index"
        ),
    };
    let names: Vec<String> = query_texts(url, backend, &statement, "name")
        .await
        .into_iter()
        .flatten()
        .collect();
    match (backend, names.as_slice()) {
        // "... USING btree (a, b, c) INCLUDE (d, e)": the key columns, then the
        // included ones.
        (Backend::Postgres, [def]) => {
            let (_, lists) = def.split_once(" USING btree ").unwrap();
            lists
                .split(" INCLUDE ")
                .flat_map(|list| {
                    list.trim()
                        .trim_start_matches('(')
                        .trim_end_matches(')')
                        .split(',')
                })
                .map(|c| c.trim().to_owned())
                .collect()
        }
        _ => names,
    }
}
