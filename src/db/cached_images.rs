//! `cached_images`: one row per cached image per node (Glance's table).

use sqlx::Row;
use tracing::{debug, warn};

use super::{DbError, DbTime, Dialect, NodeDb, on_pool, rows_statement, sql};
use crate::image_id::ImageId;

/// A row of `cached_images` for this node whose image id is valid (validated as it is
/// read: a row named otherwise is never turned into a path).
#[derive(Debug, Clone, PartialEq)]
pub struct CachedImageRow {
    pub id: i64,
    pub image_id: ImageId,
    pub last_accessed: DbTime,
    pub last_modified: DbTime,
    pub size: i64,
    pub hits: i64,
    pub checksum: Option<String>,
}

/// Where a least-recently-accessed scan stopped: rows are visited in
/// (`last_accessed`, `id`) order, and the next batch starts after this row.
#[derive(Debug, Clone, Copy)]
pub struct LruCursor {
    pub last_accessed: DbTime,
    pub id: i64,
}

/// One batch of a least-recently-accessed scan.
#[derive(Debug, Default)]
pub struct LruBatch {
    /// The readable rows with valid image ids, in LRU order.
    pub rows: Vec<CachedImageRow>,
    /// Where the next batch starts (past the rows whose image id is not valid too);
    /// `None` at the end.
    pub next: Option<LruCursor>,
}

/// Rows per transaction when adopting many files: large enough to amortise commits,
/// small enough not to hold SQLite's write lock for long.
const ADOPT_BATCH_ROWS: usize = 1000;

/// Ids per `DELETE ... IN (...)`: well under every backend's limit on bound parameters
/// (SQLite 32766, PostgreSQL 65535, MySQL 65535).
const DELETE_BATCH_ROWS: usize = 500;

const SELECT_COLUMNS: &str = "id, image_id, last_accessed, last_modified, size, hits, checksum";

/// A row of this node that cannot be decoded (a time that does not parse, a hits or
/// size value of another type, as anyone with access to the shared database can leave):
/// what could be read of it, and why. Listings skip it; the pruner evicts it first.
#[derive(Debug, Clone, PartialEq)]
pub struct UnreadableRow {
    /// `None` when the id could not be read or is not a valid image id.
    pub image_id: Option<ImageId>,
    pub error: String,
}

/// This node's rows as read: the decoded ones and those that could not be.
#[derive(Debug, Default)]
pub struct CachedImageRows {
    pub rows: Vec<CachedImageRow>,
    pub unreadable: Vec<UnreadableRow>,
    /// The ids, as stored, of readable rows whose image id is not valid (Glance's lock
    /// file names, which earlier versions adopted, or a stranger's rows).
    pub invalid_ids: Vec<String>,
}

impl CachedImageRows {
    /// Logs the unreadable rows as one warning (one per listing, not one per row) and
    /// returns the readable ones.
    pub fn warn_and_skip_unreadable(self) -> Vec<CachedImageRow> {
        self.warn_unreadable();
        self.rows
    }

    /// Logs the unreadable rows as one warning, and those with invalid ids as another.
    pub fn warn_unreadable(&self) {
        if let Some(first) = self.unreadable.first() {
            warn!(
                rows = self.unreadable.len(),
                image_id = ?first.image_id,
                error = %first.error,
                "skipping cached_images rows that cannot be read"
            );
        }
        if !self.invalid_ids.is_empty() {
            warn!(
                rows = self.invalid_ids.len(),
                "ignoring database rows whose image id is not valid"
            );
        }
    }
}

/// A `cached_images` row as read.
enum Decoded {
    Row(CachedImageRow),
    /// Readable, but its image id is not valid: kept by its id as stored.
    InvalidId {
        raw: String,
        at: LruCursor,
    },
    Unreadable(UnreadableRow),
}

/// Decodes a row, validating its image id; keeps what can be read of a row that does
/// not decode.
fn decode<R: Row>(row: &R) -> Decoded
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> DbTime: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    let fields = || -> Result<_, sqlx::Error> {
        Ok((
            row.try_get::<i64, _>("id")?,
            row.try_get::<String, _>("image_id")?,
            row.try_get::<DbTime, _>("last_accessed")?,
            row.try_get::<DbTime, _>("last_modified")?,
            row.try_get::<i64, _>("size")?,
            decode_integer(row, "hits")?,
            row.try_get::<Option<String>, _>("checksum")?,
        ))
    };
    match fields() {
        Err(error) => Decoded::Unreadable(UnreadableRow {
            image_id: row
                .try_get::<String, _>("image_id")
                .ok()
                .and_then(|raw| ImageId::parse(&raw).ok()),
            error: error.to_string(),
        }),
        Ok((id, raw, last_accessed, last_modified, size, hits, checksum)) => {
            match ImageId::parse(&raw) {
                Ok(image_id) => Decoded::Row(CachedImageRow {
                    id,
                    image_id,
                    last_accessed,
                    last_modified,
                    size,
                    hits,
                    checksum,
                }),
                Err(_) => Decoded::InvalidId {
                    raw,
                    at: LruCursor { last_accessed, id },
                },
            }
        }
    }
}

/// The rows sorted by what they turned out to be, and where the last readable one was
/// in LRU order.
fn split_rows(decoded: impl Iterator<Item = Decoded>) -> (CachedImageRows, Option<LruCursor>) {
    let mut out = CachedImageRows::default();
    let mut last = None;
    for r in decoded {
        match r {
            Decoded::Row(row) => {
                last = Some(LruCursor {
                    last_accessed: row.last_accessed,
                    id: row.id,
                });
                out.rows.push(row);
            }
            Decoded::InvalidId { raw, at } => {
                last = Some(at);
                out.invalid_ids.push(raw);
            }
            Decoded::Unreadable(bad) => out.unreadable.push(bad),
        }
    }
    (out, last)
}

/// `<verb> FROM cached_images WHERE node_reference_id = ? AND image_id IN (?, ...)` with
/// `ids` ids, its placeholders numbered for `d`. Only placeholders are formatted into
/// the statement; the node and the ids are bound.
fn among_ids(verb: &str, d: Dialect, ids: usize) -> sqlx::AssertSqlSafe<String> {
    let mark = |n: usize| match d {
        Dialect::Postgres => format!("${n}"),
        _ => "?".to_string(),
    };
    let list: Vec<String> = (2..ids + 2).map(mark).collect();
    sqlx::AssertSqlSafe(format!(
        "{verb} FROM cached_images WHERE node_reference_id = {} AND image_id IN ({})",
        mark(1),
        list.join(", ")
    ))
}

/// An integer column as i64, whatever width the backend gives it: `hits` is INTEGER, 32
/// bits on PostgreSQL and MySQL, but SQLite stores any 64-bit value there (Glance's
/// `hits = hits + 1` never stops at 2^31); `size` is BIGINT.
fn decode_integer<R: Row>(row: &R, column: &str) -> Result<i64, sqlx::Error>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    row.try_get::<i64, _>(column)
        .or_else(|_| row.try_get::<i32, _>(column).map(i64::from))
}

/// Images per statement of a hit flush on SQLite and PostgreSQL. A statement per image
/// cost a round trip each (on SQLite a hand-off to its connection's thread and back,
/// some 70 us: a flush of 10,000 images took 0.7 s, ten times the opens it counted,
/// BENCHMARKS.md); three parameters an image, far under SQLite's 32,766 and
/// PostgreSQL's 65,535.
const HITS_PER_STATEMENT: usize = 256;

/// The hit flush's statement (`add_hits`, through `rows_statement`): the rows' ids,
/// counts and times as a `VALUES` list (its columns are `column1`.. on both backends),
/// each row of the node with one of those ids updated as the one-row statement updates
/// it.
const ADD_HITS_ROWS: &str = "UPDATE cached_images SET hits = cached_images.hits + v.column2, \
     last_accessed = CASE WHEN cached_images.last_accessed IS NULL \
     OR cached_images.last_accessed < v.column3 THEN v.column3 \
     ELSE cached_images.last_accessed END \
     FROM (VALUES {rows}) AS v \
     WHERE cached_images.node_reference_id = ? AND cached_images.image_id = v.column1";

impl NodeDb {
    /// This node's readable rows, ordered by image id (byte order, the same on every
    /// backend); unreadable ones are skipped with one warning.
    pub async fn cached_images(&self) -> Result<Vec<CachedImageRow>, DbError> {
        // Sorted here, not by the server: a node's rows come from our covering index in
        // its own order, and only a database of one node gets image id order for free
        // (from Glance's unique index on (image_id, node)). With a fleet's rows, the
        // server's sort of 10,000 was 3-4 ms of a 5.5-6.9 ms statement (2.5 ms without
        // it, `EXPLAIN ANALYZE` in a 1,000,000-row table); ours takes well under one.
        let mut rows = self
            .cached_images_and_unreadable()
            .await?
            .warn_and_skip_unreadable();
        rows.sort_unstable_by(|a, b| a.image_id.cmp(&b.image_id));
        Ok(rows)
    }

    /// This node's rows in the database's order (reconcile, which sets them against the
    /// directory, needs no other), with those that cannot be decoded apart.
    pub async fn cached_images_and_unreadable(&self) -> Result<CachedImageRows, DbError> {
        const Q: &str = "SELECT id, image_id, last_accessed, last_modified, size, hits, checksum \
             FROM cached_images WHERE node_reference_id = ?";
        debug_assert!(Q.contains(SELECT_COLUMNS));
        let rows = on_pool!(self.db, |pool, d| {
            sqlx::query(sql(d, Q))
                .bind(self.node.0)
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode)
                .collect::<Vec<_>>()
        });
        Ok(split_rows(rows.into_iter()).0)
    }

    /// Up to `limit` of this node's rows in row-id order, after row id `after`, split
    /// as `cached_images_and_unreadable` splits them, and the row id to continue after
    /// (`None` when this page was the last). The pruner pages through the node this
    /// way to find the rows that do not decode, a bounded statement per step instead
    /// of one that reads every row.
    pub async fn rows_by_id(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<(CachedImageRows, Option<i64>), DbError> {
        const Q: &str = "SELECT id, image_id, last_accessed, last_modified, size, hits, checksum \
             FROM cached_images WHERE node_reference_id = ? AND id > ? ORDER BY id LIMIT ?";
        debug_assert!(Q.contains(SELECT_COLUMNS));
        let (rows, last_id, read) = on_pool!(self.db, |pool, d| {
            let found = sqlx::query(sql(d, Q))
                .bind(self.node.0)
                .bind(after)
                .bind(limit)
                .fetch_all(pool)
                .await?;
            // The row id is the primary key, an integer on every backend: a row whose id
            // does not read ends the scan rather than looping on it.
            let last_id = found.last().and_then(|r| r.try_get::<i64, _>("id").ok());
            let read = found.len();
            (found.iter().map(decode).collect::<Vec<_>>(), last_id, read)
        });
        let next = if i64::try_from(read).unwrap_or(i64::MAX) < limit {
            None
        } else {
            last_id
        };
        Ok((split_rows(rows.into_iter()).0, next))
    }

    /// The row's hit count, 0 when there is no row.
    pub async fn hit_count(&self, image_id: &str) -> Result<i64, DbError> {
        const Q: &str =
            "SELECT hits FROM cached_images WHERE node_reference_id = ? AND image_id = ?";
        let hits = on_pool!(self.db, |pool, d| {
            sqlx::query(sql(d, Q))
                .bind(self.node.0)
                .bind(image_id)
                .fetch_optional(pool)
                .await?
                .map(|r| decode_integer(&r, "hits"))
                .transpose()?
        });
        Ok(hits.unwrap_or(0))
    }

    /// The row's size, `None` when there is no row.
    pub async fn cached_size(&self, image_id: &str) -> Result<Option<i64>, DbError> {
        const Q: &str =
            "SELECT size FROM cached_images WHERE node_reference_id = ? AND image_id = ?";
        let size = on_pool!(self.db, |pool, d| {
            sqlx::query(sql(d, Q))
                .bind(self.node.0)
                .bind(image_id)
                .fetch_optional(pool)
                .await?
                .map(|r| decode_integer(&r, "size"))
                .transpose()?
        });
        Ok(size)
    }

    /// The row's size and checksum, `None` when there is no row (the image download
    /// route's headers).
    pub async fn cached_entry(
        &self,
        image_id: &str,
    ) -> Result<Option<(i64, Option<String>)>, DbError> {
        const Q: &str = "SELECT size, checksum FROM cached_images \
             WHERE node_reference_id = ? AND image_id = ?";
        let entry = on_pool!(self.db, |pool, d| {
            match sqlx::query(sql(d, Q))
                .bind(self.node.0)
                .bind(image_id)
                .fetch_optional(pool)
                .await?
            {
                Some(r) => Some((
                    decode_integer(&r, "size")?,
                    r.try_get::<Option<String>, _>("checksum")?,
                )),
                None => None,
            }
        });
        Ok(entry)
    }

    /// Adds one hit and sets `last_accessed` (Glance's `update_hit_count`). Returns
    /// whether a row was there to update.
    pub async fn record_hit(&self, image_id: &str, now: DbTime) -> Result<bool, DbError> {
        const Q: &str = "UPDATE cached_images SET hits = hits + 1, last_accessed = ? \
             WHERE node_reference_id = ? AND image_id = ?";
        Ok(self.execute_setting(Q, Some(now), &[image_id]).await? > 0)
    }

    /// Adds hits counted in memory, `(image id, hits, latest access)` per image, in one
    /// transaction: each row's `hits` grows by its count (never set: Glance's
    /// `update_hit_count` and other nodes' writers may have added meanwhile) and its
    /// `last_accessed` becomes the later of the row's and ours. Returns how many rows
    /// were there to update (an image whose row went meanwhile loses its hits, as
    /// Glance's update of a missing row does).
    /// On SQLite and PostgreSQL the rows go `HITS_PER_STATEMENT` to a statement (see
    /// `ADD_HITS_ROWS`); MySQL, whose `VALUES` rows have other column names in
    /// MySQL and MariaDB, takes one statement per row.
    pub async fn add_hits(&self, hits: &[(&str, i64, DbTime)]) -> Result<u64, DbError> {
        const Q: &str = "UPDATE cached_images SET hits = hits + ?, \
             last_accessed = CASE WHEN last_accessed IS NULL OR last_accessed < ? THEN ? \
             ELSE last_accessed END \
             WHERE node_reference_id = ? AND image_id = ?";
        if hits.is_empty() {
            return Ok(0);
        }
        let n = on_pool!(self.db, |pool, d| {
            let mut tx = pool.begin().await?;
            let mut n = 0;
            if d == Dialect::MySql {
                for (image_id, count, at) in hits {
                    n += sqlx::query(sql(d, Q))
                        .bind(*count)
                        .bind(*at)
                        .bind(*at)
                        .bind(self.node.0)
                        .bind(*image_id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                }
            } else {
                for batch in hits.chunks(HITS_PER_STATEMENT) {
                    let text = rows_statement(d, ADD_HITS_ROWS, "(?, ?, ?)", batch.len());
                    let mut q = sqlx::query(text);
                    for (image_id, count, at) in batch {
                        q = q.bind(*image_id).bind(*count).bind(*at);
                    }
                    n += q.bind(self.node.0).execute(&mut *tx).await?.rows_affected();
                }
            }
            tx.commit().await?;
            n
        });
        Ok(n)
    }

    /// This node's row of `image_id`, if it has one that can be read.
    pub async fn cached_image(&self, image_id: &str) -> Result<Option<CachedImageRow>, DbError> {
        const Q: &str = "SELECT id, image_id, last_accessed, last_modified, size, hits, checksum \
             FROM cached_images WHERE node_reference_id = ? AND image_id = ?";
        let row = on_pool!(self.db, |pool, d| {
            sqlx::query(sql(d, Q))
                .bind(self.node.0)
                .bind(image_id)
                .fetch_optional(pool)
                .await?
                .map(|r| decode(&r))
        });
        Ok(match row {
            Some(Decoded::Row(row)) if row.image_id.as_str() == image_id => Some(row),
            _ => None,
        })
    }

    /// Records a freshly published image: a new row with 0 hits, or, when the image was
    /// cached before, the same row with refreshed size, checksum and times.
    pub async fn upsert_cached_image(
        &self,
        image_id: &str,
        size: i64,
        checksum: Option<&str>,
        now: DbTime,
    ) -> Result<(), DbError> {
        on_pool!(self.db, |pool, d| {
            let q = match d {
                Dialect::MySql => {
                    "INSERT INTO cached_images \
                     (image_id, last_accessed, last_modified, size, hits, checksum, node_reference_id) \
                     VALUES (?, ?, ?, ?, 0, ?, ?) ON DUPLICATE KEY UPDATE \
                     last_accessed = VALUES(last_accessed), last_modified = VALUES(last_modified), \
                     size = VALUES(size), checksum = VALUES(checksum)"
                }
                _ => {
                    "INSERT INTO cached_images \
                     (image_id, last_accessed, last_modified, size, hits, checksum, node_reference_id) \
                     VALUES (?, ?, ?, ?, 0, ?, ?) ON CONFLICT (image_id, node_reference_id) DO UPDATE SET \
                     last_accessed = excluded.last_accessed, last_modified = excluded.last_modified, \
                     size = excluded.size, checksum = excluded.checksum"
                }
            };
            sqlx::query(sql(d, q))
                .bind(image_id)
                .bind(now)
                .bind(now)
                .bind(size)
                .bind(checksum)
                .bind(self.node.0)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Gives a file found on disk without a row a row, with both times set to the file's
    /// mtime and 0 hits. An existing row is left alone. Returns whether a row was added.
    pub async fn adopt_cached_image(
        &self,
        image_id: &ImageId,
        size: i64,
        modified: DbTime,
    ) -> Result<bool, DbError> {
        let one = [(image_id.clone(), size, modified)];
        Ok(!self.adopt_cached_images(&one).await?.is_empty())
    }

    /// `adopt_cached_image` for many files in one transaction (a reconcile after a crash
    /// or an upgrade may find thousands). Returns the ids that got a row.
    pub async fn adopt_cached_images(
        &self,
        files: &[(ImageId, i64, DbTime)],
    ) -> Result<Vec<ImageId>, DbError> {
        let mut adopted = Vec::new();
        for batch in files.chunks(ADOPT_BATCH_ROWS) {
            on_pool!(self.db, |pool, d| {
                let q = match d {
                    Dialect::MySql => {
                        "INSERT IGNORE INTO cached_images \
                         (image_id, last_accessed, last_modified, size, hits, checksum, node_reference_id) \
                         VALUES (?, ?, ?, ?, 0, NULL, ?)"
                    }
                    _ => {
                        "INSERT INTO cached_images \
                         (image_id, last_accessed, last_modified, size, hits, checksum, node_reference_id) \
                         VALUES (?, ?, ?, ?, 0, NULL, ?) ON CONFLICT (image_id, node_reference_id) DO NOTHING"
                    }
                };
                let mut tx = pool.begin().await?;
                for (id, size, modified) in batch {
                    let n = sqlx::query(sql(d, q))
                        .bind(id.as_str())
                        .bind(*modified)
                        .bind(*modified)
                        .bind(*size)
                        .bind(self.node.0)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if n > 0 {
                        adopted.push(id.clone());
                    }
                }
                tx.commit().await?;
            });
        }
        Ok(adopted)
    }

    /// Sets the size of `image_id`'s row to `size` and clears its checksum, if the row
    /// still records `old_size` (a writer that has re-cached the image since wrote a
    /// row of its own, which stays). Returns whether the row changed.
    pub async fn refresh_cached_image_size(
        &self,
        image_id: &str,
        old_size: i64,
        size: i64,
    ) -> Result<bool, DbError> {
        const Q: &str = "UPDATE cached_images SET size = ?, checksum = NULL \
             WHERE node_reference_id = ? AND image_id = ? AND size = ?";
        let n = on_pool!(self.db, |pool, d| {
            sqlx::query(sql(d, Q))
                .bind(size)
                .bind(self.node.0)
                .bind(image_id)
                .bind(old_size)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(n > 0)
    }

    /// Deletes one row of this node. Returns the number of rows deleted.
    pub async fn delete_cached_image(&self, image_id: &str) -> Result<u64, DbError> {
        const Q: &str = "DELETE FROM cached_images WHERE node_reference_id = ? AND image_id = ?";
        self.execute(Q, &[image_id]).await
    }

    /// Deletes several rows of this node, a few hundred per statement (a prune of tens
    /// of thousands of images would otherwise spend seconds on round trips).
    pub async fn delete_cached_images(
        &self,
        image_ids: &[impl AsRef<str>],
    ) -> Result<u64, DbError> {
        let mut n = 0;
        for batch in image_ids.chunks(DELETE_BATCH_ROWS) {
            n += on_pool!(self.db, |pool, d| {
                let mut q = sqlx::query(among_ids("DELETE", d, batch.len())).bind(self.node.0);
                for id in batch {
                    q = q.bind(id.as_ref());
                }
                q.execute(pool).await?.rows_affected()
            });
        }
        Ok(n)
    }

    /// Which of `image_ids` have a row of this node (a few hundred ids per call: a
    /// bounded statement, where loading every row of a large cache is not).
    pub async fn cached_ids_among(
        &self,
        image_ids: &[&str],
    ) -> Result<std::collections::HashSet<ImageId>, DbError> {
        let mut found = std::collections::HashSet::new();
        for batch in image_ids.chunks(DELETE_BATCH_ROWS) {
            let rows: Vec<String> = on_pool!(self.db, |pool, d| {
                let mut q =
                    sqlx::query(among_ids("SELECT image_id", d, batch.len())).bind(self.node.0);
                for id in batch {
                    q = q.bind(*id);
                }
                q.fetch_all(pool)
                    .await?
                    .iter()
                    .map(|r| r.try_get::<String, _>(0))
                    .collect::<Result<_, _>>()?
            });
            // MySQL compares case-insensitively: keep exact matches only.
            found.extend(
                rows.iter()
                    .filter(|r| batch.contains(&r.as_str()))
                    .filter_map(|r| ImageId::parse(r).ok()),
            );
        }
        Ok(found)
    }

    /// Deletes every row of this node. Returns the number of rows deleted.
    pub async fn delete_all_cached_images(&self) -> Result<u64, DbError> {
        const Q: &str = "DELETE FROM cached_images WHERE node_reference_id = ?";
        self.execute(Q, &[]).await
    }

    /// Up to `limit` rows of this node in least-recently-accessed order (ties broken by
    /// row id), starting after `after`. Rows that cannot be decoded are left out (the
    /// pruner has evicted them first, from `cached_images_and_unreadable`); a batch of
    /// only such rows reads as the end. Rows whose image id is not valid are left out
    /// too, but the cursor moves past them.
    pub async fn least_recently_accessed(
        &self,
        after: Option<LruCursor>,
        limit: i64,
    ) -> Result<LruBatch, DbError> {
        const FIRST: &str = "SELECT id, image_id, last_accessed, last_modified, size, hits, checksum \
             FROM cached_images WHERE node_reference_id = ? \
             ORDER BY last_accessed, id LIMIT ?";
        // After the cursor, written so that its time bounds the index range: the plain
        // `last_accessed > ? OR (last_accessed = ? AND id > ?)` is a filter, and each
        // batch scanned the node's index entries from the start, past every row the
        // batches before had just deleted (on PostgreSQL a heap visit each, a page per
        // row where a fleet's rows interleave: 16 ms for a batch instead of 2 after a
        // first of 4,096, by `EXPLAIN ANALYZE`). This form ranges on every backend, where
        // a row-value comparison would not on MySQL (its manual advises this rewrite).
        const NEXT: &str = "SELECT id, image_id, last_accessed, last_modified, size, hits, checksum \
             FROM cached_images WHERE node_reference_id = ? \
             AND last_accessed >= ? AND (last_accessed > ? OR id > ?) \
             ORDER BY last_accessed, id LIMIT ?";
        let rows = on_pool!(self.db, |pool, d| {
            let q = match after {
                None => sqlx::query(sql(d, FIRST)).bind(self.node.0).bind(limit),
                Some(c) => sqlx::query(sql(d, NEXT))
                    .bind(self.node.0)
                    .bind(c.last_accessed)
                    .bind(c.last_accessed)
                    .bind(c.id)
                    .bind(limit),
            };
            q.fetch_all(pool)
                .await?
                .iter()
                .map(decode)
                .collect::<Vec<_>>()
        });
        let (rows, next) = split_rows(rows.into_iter());
        if !rows.unreadable.is_empty() || !rows.invalid_ids.is_empty() {
            debug!(
                unreadable = rows.unreadable.len(),
                invalid_ids = rows.invalid_ids.len(),
                "LRU batch skipped rows"
            );
        }
        Ok(LruBatch {
            rows: rows.rows,
            next,
        })
    }
}
