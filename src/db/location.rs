//! Where an embedded SQLite database may live, and the move of one left at the old
//! default place, `<cache.dir>/glance-cached.db`, before anything opens it.
//!
//! Glance lists, counts and deletes every regular file at the top of its cache directory
//! but `*.db` names: its "clear cache" deleted the database's `-wal` and `-shm` (losing
//! everything since the last checkpoint) and its cache size counted them. A database
//! in a subdirectory of the cache root, or outside it, is never touched by Glance.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use tracing::{info, warn};

use super::DbTime;

/// The database file at the old default place, at the top of the cache directory.
pub(crate) const LEGACY_SQLITE_FILE: &str = "glance-cached.db";

/// Mode of a database directory we create: the service group may read it (0750, as
/// the cache directory).
const DIR_MODE: u32 = 0o750;

#[derive(Debug, thiserror::Error)]
pub(crate) enum LocationError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the old database {path} to move it: {source}")]
    Read { path: PathBuf, source: sqlx::Error },
    #[error(
        "the database at the old place {old} is in use by {holder} (heartbeat {heartbeat}); stop it, then start again to move the database to {new}"
    )]
    InUse {
        old: PathBuf,
        new: PathBuf,
        holder: String,
        heartbeat: String,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LocationError {
    let path = path.to_path_buf();
    move |source| LocationError::Io {
        action,
        path,
        source,
    }
}

/// The file of a `sqlite://` url (`None` for other urls and in-memory databases).
pub(crate) fn sqlite_path(url: &str) -> Option<PathBuf> {
    if !url.starts_with("sqlite:") {
        return None;
    }
    let options = SqliteConnectOptions::from_str(url).ok()?;
    let path = options.get_filename();
    (path != Path::new(":memory:") && !path.as_os_str().is_empty()).then(|| path.to_path_buf())
}

/// Makes the SQLite database file `path` ready to open: creates its directory, and moves
/// a database left at `<cache_dir>/glance-cached.db` there when `path` does not exist
/// yet. `holder_is_live` tells whether a lease holder in the old database (a daemon of
/// an older version) still runs, with its heartbeat; the move waits for it to stop.
///
/// A database that Glance's API shares (it has Glance's `alembic_version`) is not
/// moved: Glance would lose it. It is used where it is, with a warning. Returns the file
/// to open (paths, never urls: a path made into a url has its `%41` decoded).
pub(crate) async fn prepare_sqlite(
    path: &Path,
    cache_dir: &Path,
    holder_is_live: impl Fn(&str, DbTime) -> bool,
) -> Result<PathBuf, LocationError> {
    let path = path.to_path_buf();
    let old = cache_dir.join(LEGACY_SQLITE_FILE);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(io("create the database directory", dir))?;
    }
    if path.exists() || !old.is_file() || same_file(&path, &old) {
        if same_file(&path, &old) {
            warn!(database = %path.display(), "the SQLite database is at the top of the cache directory, where Glance's clear-cache deletes its -wal and -shm files; move it (see README, Sharing with Glance)");
        } else if old.is_file() {
            warn!(old = %old.display(), database = %path.display(), "an old database remains at the top of the cache directory and is not used");
        }
        return Ok(path);
    }
    let kept = move_database(&old, &path, holder_is_live).await?;
    Ok(kept.unwrap_or(path))
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => a == b,
    }
}

/// What the old database allows: `None` when Glance shares it, else the move or the
/// live holder that forbids it.
type MoveCheck = Option<Result<(), (String, DbTime)>>;

/// Copies `old` (with what its WAL holds) into `new` through `VACUUM INTO` (atomic by a
/// rename; works across filesystems), then removes `old` and its `-wal` and `-shm`.
/// Returns `old` instead when Glance shares it and it must stay.
async fn move_database(
    old: &Path,
    new: &Path,
    holder_is_live: impl Fn(&str, DbTime) -> bool,
) -> Result<Option<PathBuf>, LocationError> {
    let read = |source| LocationError::Read {
        path: old.to_path_buf(),
        source,
    };
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            SqliteConnectOptions::new()
                .filename(old)
                .busy_timeout(super::SQLITE_BUSY_TIMEOUT),
        )
        .await
        .map_err(read)?;
    let outcome: Result<MoveCheck, sqlx::Error> = async {
        let table = |name: &'static str| {
            sqlx::query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?")
                .bind(name)
                .fetch_optional(&pool)
        };
        if table("alembic_version").await?.is_some() {
            return Ok(None);
        }
        if table("glance_cached_lease").await?.is_some() {
            let rows = sqlx::query("SELECT holder, heartbeat_at FROM glance_cached_lease")
                .fetch_all(&pool)
                .await?;
            for row in rows {
                let holder: String = row.try_get(0)?;
                let heartbeat: DbTime = row.try_get(1)?;
                if holder_is_live(&holder, heartbeat) {
                    return Ok(Some(Err((holder, heartbeat))));
                }
            }
        }
        let _ = std::fs::remove_file(moving(new));
        sqlx::query("VACUUM INTO ?")
            .bind(moving(new).to_string_lossy().into_owned())
            .execute(&pool)
            .await?;
        Ok(Some(Ok(())))
    }
    .await;
    pool.close().await;
    match outcome.map_err(read)? {
        None => {
            warn!(database = %old.display(), "the database at the top of the cache directory is also Glance's own ([database] connection): using it where it is; Glance's clear-cache deletes its -wal and -shm files, so stop both, move it out of the cache directory and point both at the new place (see README, Sharing with Glance)");
            return Ok(Some(old.to_path_buf()));
        }
        Some(Err((holder, heartbeat))) => {
            return Err(LocationError::InUse {
                old: old.to_path_buf(),
                new: new.to_path_buf(),
                holder,
                heartbeat: heartbeat.to_utc().to_rfc3339(),
            });
        }
        Some(Ok(())) => {}
    }
    let tmp = moving(new);
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, new).map_err(io("rename into place", new))?;
    if let Some(dir) = new.parent() {
        std::fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(io("sync", dir))?;
    }
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", old.display()));
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove the old database", &file)(e)),
        }
    }
    info!(from = %old.display(), to = %new.display(), "moved the SQLite database out of the cache directory's top, where Glance deletes files");
    Ok(None)
}

/// Where `VACUUM INTO` writes before the rename.
fn moving(new: &Path) -> PathBuf {
    PathBuf::from(format!("{}.moving", new.display()))
}
