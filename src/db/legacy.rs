//! Glance's old per-node SQLite cache database (`image_cache_sqlite_db`, default
//! `<image_cache_dir>/cache.db`): `cached_images` keyed by image id, times as epoch
//! floats. Read here so `migrate-sqlite` can move its rows into the central database.

use std::path::Path;

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

use super::{DbError, DbTime, Dialect, NodeDb, on_pool, sql};

#[derive(Debug, Clone, PartialEq)]
pub struct LegacyRow {
    pub image_id: String,
    pub last_accessed: DateTime<Utc>,
    pub last_modified: DateTime<Utc>,
    pub size: i64,
    pub hits: i64,
    pub checksum: Option<String>,
}

fn epoch(secs: f64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros((secs * 1e6) as i64).unwrap_or_default()
}

/// Reads every row of a Glance SQLite cache database, opened read-only.
pub(crate) async fn read_glance_sqlite(path: &Path) -> Result<Vec<LegacyRow>, DbError> {
    // From the path itself: formatted into a URL, a `%41` or `?` in it would name another
    // file.
    let options = SqliteConnectOptions::new().filename(path).read_only(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .map_err(|source| DbError::Connect {
            backend: "sqlite",
            source,
        })?;
    let rows = sqlx::query(
        "SELECT image_id, last_accessed, last_modified, size, hits, checksum FROM cached_images",
    )
    .fetch_all(&pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        out.push(LegacyRow {
            image_id: r.try_get("image_id")?,
            last_accessed: epoch(r.try_get::<Option<f64>, _>("last_accessed")?.unwrap_or(0.0)),
            last_modified: epoch(r.try_get::<Option<f64>, _>("last_modified")?.unwrap_or(0.0)),
            size: r.try_get::<Option<i64>, _>("size")?.unwrap_or(0),
            hits: r.try_get::<Option<i64>, _>("hits")?.unwrap_or(0),
            checksum: r.try_get("checksum")?,
        });
    }
    pool.close().await;
    Ok(out)
}

impl NodeDb {
    /// Inserts a row with all its fields unless this node already has one for the image.
    /// Returns whether it was inserted.
    pub async fn import_cached_image(&self, row: &LegacyRow) -> Result<bool, DbError> {
        let n = on_pool!(self.db, |pool, d| {
            let q = match d {
                Dialect::MySql => {
                    "INSERT IGNORE INTO cached_images \
                     (image_id, last_accessed, last_modified, size, hits, checksum, node_reference_id) \
                     VALUES (?, ?, ?, ?, ?, ?, ?)"
                }
                _ => {
                    "INSERT INTO cached_images \
                     (image_id, last_accessed, last_modified, size, hits, checksum, node_reference_id) \
                     VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (image_id, node_reference_id) DO NOTHING"
                }
            };
            sqlx::query(sql(d, q))
                .bind(row.image_id.as_str())
                .bind(DbTime::from_utc(row.last_accessed))
                .bind(DbTime::from_utc(row.last_modified))
                .bind(row.size)
                .bind(row.hits.clamp(0, i64::from(i32::MAX)) as i32)
                .bind(row.checksum.as_deref())
                .bind(self.node.0)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(n > 0)
    }
}
