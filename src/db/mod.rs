//! The database layer: all SQL lives here.
//!
//! One `Db` handle wraps a pool for the configured backend (SQLite, PostgreSQL or
//! MySQL/MariaDB); a `NodeDb` binds it to one node, and the queries on that node's rows
//! hang off it. Each query is written once with `?` placeholders and run through
//! `on_pool!`, which expands the body per backend; the few statements whose syntax
//! differs (upserts, DDL, locking) branch on `Dialect`.

mod cached_images;
mod lease;
pub(crate) mod legacy;
pub(crate) mod location;
mod node;
mod queue;
mod schema;
pub(crate) mod time;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool};
use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqliteSynchronous};
use tracing::debug;

pub(crate) use cached_images::{CachedImageRow, LruCursor};
pub(crate) use lease::{LeaseHolder, LeaseOutcome};
pub use node::NodeDb;
pub(crate) use node::NodeId;
pub(crate) use queue::{QueueRow, QueueState};
pub use time::DbTime;

/// How long a SQLite statement waits for another writer (Glance's API on the same node,
/// a CLI call) before failing with "database is locked".
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Statements after which our background checkpointer copies the SQLite WAL back into
/// the database (`PRAGMA wal_checkpoint(PASSIVE)`): a commit then only appends to the
/// WAL, and the checkpoint's two fsyncs are off the request path. Counted, not timed,
/// so an idle daemon (a lease renewal every 20 s) wakes for none.
const SQLITE_CHECKPOINT_AFTER: u64 = 64;

/// The least time between two background checkpoints: a burst of writes is copied back
/// some ten times a second, not after every 64th statement.
const SQLITE_CHECKPOINT_SPACING: Duration = Duration::from_millis(100);

/// WAL pages after which a commit of ours still checkpoints inline (SQLite's
/// `wal_autocheckpoint`, 1,000 by default): a bound on the WAL (some 40 MB) should the
/// background checkpointer fall behind, never reached at its pace otherwise. Glance's own
/// connections keep SQLite's default.
const SQLITE_WAL_BOUND_PAGES: u32 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    Sqlite,
    Postgres,
    MySql,
}

impl Dialect {
    pub fn from_url(url: &str) -> Option<Dialect> {
        let scheme = url.split_once(':')?.0;
        match scheme {
            "sqlite" => Some(Dialect::Sqlite),
            "postgres" | "postgresql" => Some(Dialect::Postgres),
            "mysql" | "mariadb" => Some(Dialect::MySql),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgresql",
            Dialect::MySql => "mysql",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unsupported database url scheme in {0} (expected sqlite://, postgres:// or mysql://)")]
    UnsupportedUrl(String),
    #[error("cannot connect to the {backend} database: {source}")]
    Connect {
        backend: &'static str,
        source: sqlx::Error,
    },
    #[error("database schema migration failed: {source}")]
    Migrate { source: sqlx::Error },
    #[error(
        "database schema version {found} is newer than this glance-cached understands ({supported}); upgrade glance-cached"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    #[error(
        "the database has Glance's schema (alembic_version) but no cached_images table: upgrade it with `glance-manage db sync` (Glance 2024.1 or later) before starting glance-cached"
    )]
    GlanceSchemaTooOld,
    #[error(
        "the database has no Glance cache tables (cached_images, node_reference). If Glance shares it, run `glance-manage db sync` against it first (tables created here would make that command fail later); if it is for glance-cached alone, set database.create_glance_tables = true"
    )]
    NoGlanceTables,
    #[error(
        "the database has no cache tables yet, and a command that only reads creates none: start the daemon (or run a command that writes) first"
    )]
    NoTablesYet,
    #[error("node {url:?} could not be registered: {source}")]
    RegisterNode { url: String, source: sqlx::Error },
    #[error("database query failed: {0}")]
    Query(#[from] sqlx::Error),
}

#[derive(Clone)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
    MySql(MySqlPool),
}

/// A connection pool to this node's database.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    /// SQLite, read-write: the background checkpointer and its statement count. `None`
    /// otherwise.
    sqlite: Option<Arc<SqliteExtras>>,
    /// Whether `migrate` may create Glance's cache tables when the database has none.
    create_glance_tables: bool,
    /// Where each operation's duration goes (the daemon's metrics), if anywhere.
    query_seconds: Option<prometheus_client::metrics::histogram::Histogram>,
}

/// Connection settings beyond the URL.
#[derive(Debug, Clone)]
pub struct DbOptions {
    pub max_connections: u32,
    pub connect_timeout: Duration,
    /// Whether Glance's `node_reference` and `cached_images` may be created in a database
    /// that has neither them nor Glance's schema. Tables created here make a later
    /// `glance-manage db sync` on that database fail, so the daemon allows it only where
    /// the configuration says the database is glance-cached's own
    /// (`database.create_glance_tables`, default: only for SQLite).
    pub create_glance_tables: bool,
    /// Open for reading only: a SQLite file must exist and is never written (its `-wal`
    /// and `-shm` may still be made by SQLite, as for any reader).
    pub read_only: bool,
    /// The SQLite database as a file path, used instead of the `sqlite://` URL when set:
    /// a path made into a URL would have its `%41` decoded and its `?` read as options.
    pub sqlite_file: Option<std::path::PathBuf>,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            max_connections: 8,
            connect_timeout: Duration::from_secs(5),
            create_glance_tables: true,
            read_only: false,
            sqlite_file: None,
        }
    }
}

/// Runs `$body` with `$pool` bound to the backend's concrete pool and `$d` to its dialect.
macro_rules! on_pool {
    ($db:expr, |$pool:ident, $d:ident| $body:expr) => {{
        let _timer = $crate::metrics::QueryTimer::start($db.query_seconds.as_ref());
        match &$db.pool {
            $crate::db::Pool::Sqlite($pool) => {
                let $d = $crate::db::Dialect::Sqlite;
                let _ = $d;
                let value = $body;
                $db.count_sqlite_statement();
                value
            }
            $crate::db::Pool::Postgres($pool) => {
                let $d = $crate::db::Dialect::Postgres;
                let _ = $d;
                $body
            }
            $crate::db::Pool::MySql($pool) => {
                let $d = $crate::db::Dialect::MySql;
                let _ = $d;
                $body
            }
        }
    }};
}
pub(crate) use on_pool;

/// Adapts a statement written with `?` placeholders to `dialect`: PostgreSQL wants
/// `$1, $2, ...`. Converted statements are cached for the life of the process (there is a
/// fixed, small set of them), so sqlx's prepared-statement cache keys stay stable.
pub(crate) fn sql(dialect: Dialect, text: &'static str) -> &'static str {
    if dialect != Dialect::Postgres || !text.contains('?') {
        return text;
    }
    static CONVERTED: LazyLock<Mutex<HashMap<(usize, usize), &'static str>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));
    let key = (text.as_ptr() as usize, text.len());
    let mut cache = CONVERTED.lock().unwrap_or_else(|p| p.into_inner());
    cache
        .entry(key)
        .or_insert_with(|| Box::leak(numbered_placeholders(text).into_boxed_str()))
}

/// `text` with its `?` placeholders numbered as PostgreSQL wants them.
fn numbered_placeholders(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    let mut n = 0;
    for c in text.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// A statement over `rows` rows of parameters: `template` with its `{rows}` replaced by
/// `rows` copies of `row` joined by commas, in `dialect`'s placeholders. Made once per
/// template, dialect and row count and kept for the life of the process (callers cap
/// the row count, so each template has a bounded set of texts), which keeps sqlx's
/// prepared-statement cache keys stable as `sql` does.
pub(crate) fn rows_statement(
    dialect: Dialect,
    template: &'static str,
    row: &'static str,
    rows: usize,
) -> &'static str {
    type Key = (Dialect, usize, usize);
    static TEXTS: LazyLock<Mutex<HashMap<Key, &'static str>>> = LazyLock::new(Default::default);
    let key = (dialect, template.as_ptr() as usize, rows);
    let mut texts = TEXTS.lock().unwrap_or_else(|p| p.into_inner());
    texts.entry(key).or_insert_with(|| {
        let text = template.replace("{rows}", &vec![row; rows].join(", "));
        let text = match dialect {
            Dialect::Postgres => numbered_placeholders(&text),
            _ => text,
        };
        Box::leak(text.into_boxed_str())
    })
}

impl Db {
    /// Connects to `url`. A SQLite file is created if missing and put in WAL mode.
    pub async fn connect(url: &str, options: &DbOptions) -> Result<Db, DbError> {
        let dialect =
            Dialect::from_url(url).ok_or_else(|| DbError::UnsupportedUrl(mask_url(url)))?;
        let connect_err = |source| DbError::Connect {
            backend: dialect.name(),
            source,
        };
        let mut sqlite = None;
        let pool = match dialect {
            Dialect::Sqlite => {
                let opts = match &options.sqlite_file {
                    Some(path) => SqliteConnectOptions::new().filename(path),
                    None => SqliteConnectOptions::from_str(url).map_err(connect_err)?,
                };
                // NORMAL in WAL mode: a commit survives a crash of the process (the WAL
                // is written before the commit returns) and is fsynced at checkpoints.
                let mut opts = opts
                    .create_if_missing(!options.read_only)
                    .read_only(options.read_only)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(SQLITE_BUSY_TIMEOUT);
                if !options.read_only {
                    opts = opts.pragma("wal_autocheckpoint", SQLITE_WAL_BOUND_PAGES.to_string());
                }
                let pool = pool_options::<sqlx::Sqlite>(options)
                    .connect_with(opts)
                    .await
                    .map_err(connect_err)?;
                if !options.read_only {
                    let due = Arc::new(tokio::sync::Notify::new());
                    let statements = Arc::new(AtomicU64::new(0));
                    let checkpointer = tokio::spawn(checkpoint_when_due(
                        pool.clone(),
                        due.clone(),
                        statements.clone(),
                    ));
                    sqlite = Some(Arc::new(SqliteExtras {
                        statements,
                        due,
                        checkpointer,
                    }));
                }
                Pool::Sqlite(pool)
            }
            Dialect::Postgres => {
                let opts = PgConnectOptions::from_str(url)
                    .map_err(connect_err)?
                    .application_name("glance-cached");
                probe_connect::<sqlx::PgConnection>(&opts, options.connect_timeout)
                    .await
                    .map_err(connect_err)?;
                let pool = pool_options::<sqlx::Postgres>(options)
                    .connect_with(opts)
                    .await
                    .map_err(connect_err)?;
                Pool::Postgres(pool)
            }
            Dialect::MySql => {
                let opts = MySqlConnectOptions::from_str(url)
                    .map_err(connect_err)?
                    .charset("utf8mb4");
                probe_connect::<sqlx::MySqlConnection>(&opts, options.connect_timeout)
                    .await
                    .map_err(connect_err)?;
                let pool = pool_options::<sqlx::MySql>(options)
                    .connect_with(opts)
                    .await
                    .map_err(connect_err)?;
                Pool::MySql(pool)
            }
        };
        Ok(Db {
            pool,
            sqlite,
            create_glance_tables: options.create_glance_tables,
            query_seconds: None,
        })
    }

    /// Times every operation through this handle (and the clones made from it) into
    /// `histogram`: the daemon's database latency metric.
    pub(crate) fn timed_by(
        mut self,
        histogram: prometheus_client::metrics::histogram::Histogram,
    ) -> Db {
        self.query_seconds = Some(histogram);
        self
    }

    /// The file of a SQLite database (`None` for a server database).
    pub fn sqlite_file(&self) -> Option<std::path::PathBuf> {
        match &self.pool {
            Pool::Sqlite(pool) => Some(pool.connect_options().get_filename().to_path_buf()),
            _ => None,
        }
    }

    /// Closes every connection, waiting for the ones in use to be returned. A SQLite
    /// database is checkpointed first (as far as other processes' readers allow), so a
    /// short-lived command leaves no WAL behind for others to replay.
    pub async fn close(&self) {
        if let (Pool::Sqlite(pool), Some(extras)) = (&self.pool, &self.sqlite) {
            extras.checkpointer.abort();
            if let Err(error) = checkpoint(pool).await {
                debug!(%error, "SQLite checkpoint at close");
            }
        }
        on_pool!(self, |pool, _d| pool.close().await)
    }

    /// Counts one SQLite statement run to its end (after its commit, so a checkpoint
    /// that follows the count finds its pages), waking the checkpointer every
    /// `SQLITE_CHECKPOINT_AFTER` (reads count too: a checkpoint with nothing to copy is
    /// one read of the WAL index).
    pub(crate) fn count_sqlite_statement(&self) {
        if let Some(extras) = &self.sqlite {
            let n = extras.statements.fetch_add(1, AtomicOrdering::Relaxed);
            if n % SQLITE_CHECKPOINT_AFTER == SQLITE_CHECKPOINT_AFTER - 1 {
                extras.due.notify_one();
            }
        }
    }
}

/// What a read-write SQLite `Db` has besides its pool.
struct SqliteExtras {
    /// Statements run to their end, for `SQLITE_CHECKPOINT_AFTER`.
    statements: Arc<AtomicU64>,
    /// Wakes the checkpointer.
    due: Arc<tokio::sync::Notify>,
    checkpointer: tokio::task::JoinHandle<()>,
}

impl Drop for SqliteExtras {
    fn drop(&mut self) {
        // The last handle is gone: so is the checkpointer's reason to run (it holds the
        // pool, which would otherwise outlive every handle).
        self.checkpointer.abort();
    }
}

/// Checkpoints the pool's database when `due` is notified (every
/// `SQLITE_CHECKPOINT_AFTER` statements), then every `SQLITE_CHECKPOINT_SPACING` for as
/// long as statements keep coming and once after the last, so a burst's tail is copied
/// back too; until the pool closes (or the task is aborted with the last `Db` handle).
/// A failed checkpoint (the database busy with another process's) is tried again the
/// next time.
async fn checkpoint_when_due(
    pool: SqlitePool,
    due: Arc<tokio::sync::Notify>,
    statements: Arc<AtomicU64>,
) {
    loop {
        due.notified().await;
        loop {
            if pool.is_closed() {
                return;
            }
            let before = statements.load(AtomicOrdering::Relaxed);
            if let Err(error) = checkpoint(&pool).await {
                debug!(%error, "SQLite background checkpoint");
            }
            tokio::time::sleep(SQLITE_CHECKPOINT_SPACING).await;
            if statements.load(AtomicOrdering::Relaxed) == before {
                break;
            }
        }
    }
}

/// A passive checkpoint: copies back what no reader still needs, waits for no one (a
/// WAL already copied back costs a read of its index, no write, no fsync).
async fn checkpoint(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
        .execute(pool)
        .await
        .map(drop)
}

/// The pool settings every backend shares.
fn pool_options<DB: sqlx::Database>(options: &DbOptions) -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::new()
        .max_connections(options.max_connections)
        .acquire_timeout(options.connect_timeout)
        .test_before_acquire(false)
}

/// Opens and closes one connection, so that an unreachable server or a wrong password is
/// reported as such (a pool only says it timed out).
async fn probe_connect<C: sqlx::Connection>(
    options: &C::Options,
    timeout: Duration,
) -> Result<(), sqlx::Error> {
    match tokio::time::timeout(timeout, C::connect_with(options)).await {
        Ok(Ok(conn)) => conn.close().await,
        Ok(Err(e)) => Err(e),
        Err(_) => Err(sqlx::Error::PoolTimedOut),
    }
}

pub(crate) use crate::redact::mask_url;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres_only() {
        let q = "UPDATE t SET a = ? WHERE b = ? AND c = ?";
        assert_eq!(
            sql(Dialect::Postgres, q),
            "UPDATE t SET a = $1 WHERE b = $2 AND c = $3"
        );
        assert_eq!(sql(Dialect::MySql, q), q);
        assert_eq!(sql(Dialect::Sqlite, q), q);
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            mask_url("postgres://glance:s3cret@db.example:5432/glance"),
            "postgres://glance:***@db.example:5432/glance"
        );
        assert_eq!(mask_url("sqlite:///var/x.db"), "sqlite:///var/x.db");
        assert_eq!(mask_url("mysql://u@h/db"), "mysql://u@h/db");
    }
}
