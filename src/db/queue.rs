//! `glance_cached_queue`: our queue table, one row per (node, image) to prefetch.
//!
//! Glance keeps its queue only as marker files in `queue/`; the table adds what a marker
//! cannot hold: order, attempts, the next attempt time, the last error, a claim by the
//! worker fetching it, and a `failed` state that keeps a dropped image's reason visible
//! until an operator deletes or re-queues it.

use sqlx::Row;
use tracing::warn;

use super::{DbError, DbTime, Dialect, NodeDb, on_pool, rows_statement, sql};
use crate::image_id::ImageId;

/// `state` of a queue row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueState {
    /// Waiting for (or in) a download.
    Queued,
    /// Given up on, with `last_error` as the reason, until re-queued.
    Failed,
}

impl QueueState {
    /// The column's text (also written literally in the statements below).
    pub fn as_str(self) -> &'static str {
        match self {
            QueueState::Queued => "queued",
            QueueState::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Option<QueueState> {
        match text {
            "queued" => Some(QueueState::Queued),
            "failed" => Some(QueueState::Failed),
            _ => None,
        }
    }
}

impl std::fmt::Display for QueueState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `state` that is neither `queued` nor `failed` (someone else wrote the row).
#[derive(Debug, thiserror::Error)]
#[error("unknown queue state {0:?}")]
struct UnknownState(String);

/// Brings a `failed` row back to `queued` (attempts reset) when it failed before the
/// new request's time: `?` the time twice, the node, the image, the time.
/// Failures record their time in `next_attempt_at` (see `mark_failed`).
const REVIVE: &str = "UPDATE glance_cached_queue SET state = 'queued', attempts = 0, \
     queued_at = ?, next_attempt_at = ?, last_error = NULL, claimed_by = NULL, \
     claimed_until = NULL WHERE node_reference_id = ? AND image_id = ? \
     AND state = 'failed' AND next_attempt_at < ?";

/// Longest `last_error` kept (the column is VARCHAR(1024)).
const MAX_ERROR_CHARS: usize = 1000;

#[derive(Debug, Clone, PartialEq)]
pub struct QueueRow {
    pub image_id: ImageId,
    pub queued_at: DbTime,
    pub attempts: i64,
    pub next_attempt_at: DbTime,
    pub last_error: Option<String>,
    pub state: QueueState,
    /// Who claimed the row for a download, and until when (the claim may have run out).
    pub claimed_by: Option<String>,
    pub claimed_until: Option<DbTime>,
}

const SELECT_ROW: &str =
    "image_id, queued_at, attempts, next_attempt_at, last_error, state, claimed_by, claimed_until";

/// A queue row as read: ours, or one whose image id is not valid (never a path, never
/// fetched), kept by its id as stored.
enum Decoded {
    Row(QueueRow),
    InvalidId { raw: String, attempts: i64 },
}

fn decode<R: Row>(r: &R) -> Result<Decoded, sqlx::Error>
where
    for<'r> i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> DbTime: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    let raw: String = r.try_get("image_id")?;
    let attempts = i64::from(r.try_get::<i32, _>("attempts")?);
    let Ok(image_id) = ImageId::parse(&raw) else {
        return Ok(Decoded::InvalidId { raw, attempts });
    };
    let state: String = r.try_get("state")?;
    let state = QueueState::parse(&state).ok_or_else(|| sqlx::Error::ColumnDecode {
        index: "state".into(),
        source: Box::new(UnknownState(state)),
    })?;
    Ok(Decoded::Row(QueueRow {
        image_id,
        queued_at: r.try_get("queued_at")?,
        attempts,
        next_attempt_at: r.try_get("next_attempt_at")?,
        last_error: r.try_get("last_error")?,
        state,
        claimed_by: r.try_get("claimed_by")?,
        claimed_until: r.try_get("claimed_until")?,
    }))
}

/// The warning for rows whose image id is not valid: ignored, never turned into paths.
fn warn_invalid_ids(rows: usize) {
    if rows > 0 {
        warn!(rows, "ignoring database rows whose image id is not valid");
    }
}

fn clip(error: &str) -> String {
    error.chars().take(MAX_ERROR_CHARS).collect()
}

impl NodeDb {
    /// Queues `image_id` for this node as of `queued_at`: a new row, or a `failed` row
    /// brought back to `queued` (attempts reset) when it failed before `queued_at`. A
    /// queued row is left alone, and so is a failure newer than the request: a marker
    /// listed just before the prefetcher gave up must not revive the image. Returns
    /// whether the image is newly queued.
    pub async fn enqueue(&self, image_id: &str, queued_at: DbTime) -> Result<bool, DbError> {
        let queued = self.enqueue_all(&[(image_id, queued_at)]).await?;
        Ok(queued.first().copied().unwrap_or(false))
    }

    /// Queues each of `images` for this node as `enqueue` does, in one transaction: on
    /// SQLite and PostgreSQL `QUEUE_ROWS_PER_STATEMENT` new rows to a statement, on MySQL
    /// one statement a row; a row there already is revived when it failed before its
    /// image's time. The queue loop adopts every new marker of a pass this way (a commit
    /// per marker was most of what queueing cost, BENCHMARKS.md). Returns, for each of
    /// `images` in order, whether it is newly queued.
    pub async fn enqueue_all(&self, images: &[(&str, DbTime)]) -> Result<Vec<bool>, DbError> {
        // Four parameters a row: 1,024 a statement, far under SQLite's 32,766 and
        // PostgreSQL's 65,535.
        const QUEUE_ROWS_PER_STATEMENT: usize = 256;
        const INSERT_ROWS: &str = "INSERT INTO glance_cached_queue \
             (node_reference_id, image_id, queued_at, attempts, next_attempt_at, state) \
             VALUES {rows} ON CONFLICT (node_reference_id, image_id) DO NOTHING \
             RETURNING image_id";
        const INSERT_MYSQL: &str = "INSERT IGNORE INTO glance_cached_queue \
             (node_reference_id, image_id, queued_at, attempts, next_attempt_at, state) \
             VALUES (?, ?, ?, 0, ?, 'queued')";
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let queued = on_pool!(self.db, |pool, d| {
            let mut tx = pool.begin().await?;
            let mut inserted = std::collections::HashSet::new();
            if d == Dialect::MySql {
                for (image_id, at) in images {
                    let added = sqlx::query(INSERT_MYSQL)
                        .bind(self.node.0)
                        .bind(*image_id)
                        .bind(*at)
                        .bind(*at)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if added > 0 {
                        inserted.insert((*image_id).to_owned());
                    }
                }
            } else {
                for batch in images.chunks(QUEUE_ROWS_PER_STATEMENT) {
                    let text =
                        rows_statement(d, INSERT_ROWS, "(?, ?, ?, 0, ?, 'queued')", batch.len());
                    let mut q = sqlx::query(text);
                    for (image_id, at) in batch {
                        q = q.bind(self.node.0).bind(*image_id).bind(*at).bind(*at);
                    }
                    for row in q.fetch_all(&mut *tx).await? {
                        inserted.insert(row.try_get::<String, _>(0)?);
                    }
                }
            }
            let mut queued = Vec::with_capacity(images.len());
            for (image_id, at) in images {
                if inserted.contains(*image_id) {
                    queued.push(true);
                    continue;
                }
                // Failures record their time in next_attempt_at (see mark_failed).
                let revived = sqlx::query(sql(d, REVIVE))
                    .bind(*at)
                    .bind(*at)
                    .bind(self.node.0)
                    .bind(*image_id)
                    .bind(*at)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                queued.push(revived > 0);
            }
            tx.commit().await?;
            queued
        });
        Ok(queued)
    }

    /// The ids this node has queued (not failed ones), each with whether it is claimed
    /// now (a claim that ran out counts), for passes over many markers.
    /// Rows whose image id is not valid are left out.
    pub async fn queued_ids(&self) -> Result<std::collections::HashMap<ImageId, bool>, DbError> {
        const Q: &str = "SELECT image_id, claimed_by FROM glance_cached_queue \
             WHERE node_reference_id = ? AND state = 'queued'";
        let ids = on_pool!(self.db, |pool, d| {
            sqlx::query(sql(d, Q))
                .bind(self.node.0)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| {
                    Ok((
                        r.try_get::<String, _>(0)?,
                        r.try_get::<Option<String>, _>(1)?.is_some(),
                    ))
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?
        });
        Ok(ids
            .into_iter()
            .filter_map(|(raw, claimed)| Some((ImageId::parse(&raw).ok()?, claimed)))
            .collect())
    }

    /// Removes `image_id` from this node's queue if it is still queued and unclaimed, or
    /// claimed by `holder` when one is given (a row failed, claimed or re-queued since it
    /// was read stays). Returns whether it went.
    pub async fn dequeue_if_idle(
        &self,
        image_id: &str,
        holder: Option<&str>,
    ) -> Result<bool, DbError> {
        const UNCLAIMED: &str = "DELETE FROM glance_cached_queue WHERE node_reference_id = ? \
             AND image_id = ? AND state = 'queued' AND claimed_by IS NULL";
        const HOLDERS: &str = "DELETE FROM glance_cached_queue WHERE node_reference_id = ? \
             AND image_id = ? AND state = 'queued' AND claimed_by = ?";
        let n = match holder {
            None => self.execute(UNCLAIMED, &[image_id]).await?,
            Some(holder) => self.execute(HOLDERS, &[image_id, holder]).await?,
        };
        Ok(n > 0)
    }

    /// Whether this node has `image_id` queued (a `failed` row does not count).
    pub async fn is_queued(&self, image_id: &str) -> Result<bool, DbError> {
        const Q: &str = "SELECT 1 FROM glance_cached_queue \
             WHERE node_reference_id = ? AND image_id = ? AND state = 'queued'";
        let found = on_pool!(self.db, |pool, d| {
            sqlx::query(sql(d, Q))
                .bind(self.node.0)
                .bind(image_id)
                .fetch_optional(pool)
                .await?
                .is_some()
        });
        Ok(found)
    }

    /// How many images this node has queued (not counting failed ones).
    pub async fn count_queued(&self) -> Result<i64, DbError> {
        const Q: &str = "SELECT COUNT(*) FROM glance_cached_queue \
             WHERE node_reference_id = ? AND state = 'queued'";
        let n = on_pool!(self.db, |pool, d| {
            sqlx::query(sql(d, Q))
                .bind(self.node.0)
                .fetch_one(pool)
                .await?
                .try_get::<i64, _>(0)?
        });
        Ok(n)
    }

    /// How many images this node has queued, and how many failed, in one query
    /// (`COUNT`: a `SUM` would come back as DECIMAL from MySQL).
    pub async fn count_queue_states(&self) -> Result<(i64, i64), DbError> {
        const Q: &str = "SELECT \
             COUNT(CASE WHEN state = 'queued' THEN 1 END), \
             COUNT(CASE WHEN state = 'failed' THEN 1 END) \
             FROM glance_cached_queue WHERE node_reference_id = ?";
        let counts = on_pool!(self.db, |pool, d| {
            let row = sqlx::query(sql(d, Q))
                .bind(self.node.0)
                .fetch_one(pool)
                .await?;
            (row.try_get::<i64, _>(0)?, row.try_get::<i64, _>(1)?)
        });
        Ok(counts)
    }

    /// This node's queue rows, queued and failed, in order: queued time, then image id.
    pub async fn queued_images(&self) -> Result<Vec<QueueRow>, DbError> {
        const Q: &str = "SELECT image_id, queued_at, attempts, next_attempt_at, last_error, state, \
             claimed_by, claimed_until \
             FROM glance_cached_queue WHERE node_reference_id = ? ORDER BY queued_at, image_id";
        debug_assert!(Q.contains(SELECT_ROW));
        let rows = on_pool!(self.db, |pool, d| {
            sqlx::query(sql(d, Q))
                .bind(self.node.0)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| decode(r).map_err(|e| (r.try_get::<String, _>("image_id").ok(), e)))
                .collect::<Vec<_>>()
        });
        // A row that does not decode (a time another writer left that is no time) is
        // skipped with one warning per listing, so the rest of the queue still shows.
        let mut good = Vec::with_capacity(rows.len());
        let mut bad = Vec::new();
        let mut invalid_ids = 0;
        for row in rows {
            match row {
                Ok(Decoded::Row(r)) => good.push(r),
                Ok(Decoded::InvalidId { .. }) => invalid_ids += 1,
                Err(e) => bad.push(e),
            }
        }
        if let Some((image_id, error)) = bad.first() {
            warn!(rows = bad.len(), image_id = ?image_id, %error, "skipping queue rows that cannot be read");
        }
        warn_invalid_ids(invalid_ids);
        Ok(good)
    }

    /// Claims the next due, unclaimed queued image for `holder` until `claim_until`.
    /// Safe with several workers and several processes: on PostgreSQL and MySQL the row
    /// is locked with `FOR UPDATE SKIP LOCKED`, on SQLite the single statement runs under
    /// the database's write lock.
    ///
    /// A claimed row whose image id is not valid can never be fetched: it is given up
    /// (`failed`, "invalid image id") and the next one claimed.
    pub async fn claim_next(
        &self,
        holder: &str,
        now: DbTime,
        claim_until: DbTime,
    ) -> Result<Option<QueueRow>, DbError> {
        loop {
            match self.claim_one(holder, now, claim_until).await? {
                None => return Ok(None),
                Some(Decoded::Row(row)) => return Ok(Some(row)),
                Some(Decoded::InvalidId { raw, attempts }) => {
                    warn_invalid_ids(1);
                    self.settle_attempt(
                        &raw,
                        QueueState::Failed,
                        attempts,
                        now,
                        "invalid image id",
                    )
                    .await?;
                }
            }
        }
    }

    async fn claim_one(
        &self,
        holder: &str,
        now: DbTime,
        claim_until: DbTime,
    ) -> Result<Option<Decoded>, DbError> {
        const PICK_LOCKED: &str = "SELECT image_id, queued_at, attempts, next_attempt_at, \
             last_error, state, claimed_by, claimed_until FROM glance_cached_queue \
             WHERE node_reference_id = ? AND state = 'queued' AND next_attempt_at <= ? \
             AND (claimed_until IS NULL OR claimed_until < ?) \
             ORDER BY queued_at, image_id LIMIT 1 FOR UPDATE SKIP LOCKED";
        const MARK: &str = "UPDATE glance_cached_queue SET claimed_by = ?, claimed_until = ? \
             WHERE node_reference_id = ? AND image_id = ?";
        /// The claim as one statement, `$lock` closing its subquery's pick.
        macro_rules! claim_statement {
            ($lock:literal) => {
                concat!(
                    "UPDATE glance_cached_queue SET claimed_by = ?, claimed_until = ? \
                     WHERE node_reference_id = ? AND image_id = (SELECT image_id FROM glance_cached_queue \
                     WHERE node_reference_id = ? AND state = 'queued' AND next_attempt_at <= ? \
                     AND (claimed_until IS NULL OR claimed_until < ?) \
                     ORDER BY queued_at, image_id LIMIT 1",
                    $lock,
                    ") RETURNING image_id, queued_at, attempts, next_attempt_at, last_error, \
                     state, claimed_by, claimed_until"
                )
            };
        }
        // SQLite: one statement, so it takes the write lock up front (a read-then-write
        // transaction could fail with SQLITE_BUSY without waiting).
        const SQLITE_CLAIM: &str = claim_statement!("");
        // PostgreSQL: the same statement, the row locked by its subquery: one round trip
        // instead of BEGIN, pick, mark and COMMIT (measured: 1.8x the claims a second for
        // 0.6x the server's CPU each). MySQL cannot update the table it selects from, nor
        // return what an UPDATE wrote: it keeps the transaction.
        const POSTGRES_CLAIM: &str = claim_statement!(" FOR UPDATE SKIP LOCKED");
        let claimed = on_pool!(self.db, |pool, d| {
            let single = match d {
                Dialect::Sqlite => Some(SQLITE_CLAIM),
                Dialect::Postgres => Some(POSTGRES_CLAIM),
                Dialect::MySql => None,
            };
            if let Some(statement) = single {
                sqlx::query(sql(d, statement))
                    .bind(holder)
                    .bind(claim_until)
                    .bind(self.node.0)
                    .bind(self.node.0)
                    .bind(now)
                    .bind(now)
                    .fetch_optional(pool)
                    .await?
                    .as_ref()
                    .map(decode)
                    .transpose()?
            } else {
                let mut tx = pool.begin().await?;
                let raw = sqlx::query(sql(d, PICK_LOCKED))
                    .bind(self.node.0)
                    .bind(now)
                    .bind(now)
                    .fetch_optional(&mut *tx)
                    .await?;
                let picked = raw.as_ref().map(decode).transpose();
                // The claim is written even when the row does not decode (as SQLite's
                // single statement does): the error is reported once per claim term, and
                // the next pick moves on instead of choosing the same row forever.
                let image_id = match (&picked, &raw) {
                    (Ok(Some(Decoded::Row(row))), _) => Some(row.image_id.to_string()),
                    (Ok(Some(Decoded::InvalidId { raw, .. })), _) => Some(raw.clone()),
                    (Err(_), Some(r)) => r.try_get::<String, _>("image_id").ok(),
                    _ => None,
                };
                if let Some(image_id) = &image_id {
                    sqlx::query(sql(d, MARK))
                        .bind(holder)
                        .bind(claim_until)
                        .bind(self.node.0)
                        .bind(image_id.as_str())
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                let picked = picked?;
                // The row as it was picked, with the claim just written.
                picked.map(|row| match row {
                    Decoded::Row(row) => Decoded::Row(QueueRow {
                        claimed_by: Some(holder.to_owned()),
                        claimed_until: Some(claim_until),
                        ..row
                    }),
                    invalid => invalid,
                })
            }
        });
        Ok(claimed)
    }

    /// This node's claims: (image id, holder) of every claimed row, whether the claim
    /// has run out or not. Rows whose image id is not valid are left out (`claim_next`
    /// gives them up as soon as it claims one).
    pub async fn claims(&self) -> Result<Vec<(ImageId, String)>, DbError> {
        const Q: &str = "SELECT image_id, claimed_by FROM glance_cached_queue \
             WHERE node_reference_id = ? AND claimed_by IS NOT NULL";
        let claims = on_pool!(self.db, |pool, d| {
            sqlx::query(sql(d, Q))
                .bind(self.node.0)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?)))
                .collect::<Result<Vec<_>, sqlx::Error>>()?
        });
        Ok(claims
            .into_iter()
            .filter_map(|(raw, holder)| Some((ImageId::parse(&raw).ok()?, holder)))
            .collect())
    }

    /// Claims the queued row of `image_id` for `holder` until `claim_until`, whatever
    /// its next attempt time (a client is asking for it now), unless a claim that has not
    /// run out by `now` holds it. The row as claimed, or `Err` with who holds it
    /// (`None`: no queued row).
    pub async fn claim_image(
        &self,
        image_id: &str,
        holder: &str,
        now: DbTime,
        claim_until: DbTime,
    ) -> Result<Result<QueueRow, Option<String>>, DbError> {
        // One statement: atomic on its row on every backend, so of two claimants one
        // changes the row and the other finds it held.
        const MARK: &str = "UPDATE glance_cached_queue SET claimed_by = ?, claimed_until = ? \
             WHERE node_reference_id = ? AND image_id = ? AND state = 'queued' \
             AND (claimed_until IS NULL OR claimed_until < ?)";
        const READ: &str = "SELECT image_id, queued_at, attempts, next_attempt_at, last_error, \
             state, claimed_by, claimed_until FROM glance_cached_queue \
             WHERE node_reference_id = ? AND image_id = ?";
        let (marked, row) = on_pool!(self.db, |pool, d| {
            let marked = sqlx::query(sql(d, MARK))
                .bind(holder)
                .bind(claim_until)
                .bind(self.node.0)
                .bind(image_id)
                .bind(now)
                .execute(pool)
                .await?
                .rows_affected();
            let row = sqlx::query(sql(d, READ))
                .bind(self.node.0)
                .bind(image_id)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(decode)
                .transpose()?;
            (marked, row)
        });
        Ok(match row {
            Some(Decoded::Row(row)) if row.state == QueueState::Queued => {
                if marked > 0 && row.claimed_by.as_deref() == Some(holder) {
                    Ok(row)
                } else {
                    Err(row.claimed_by)
                }
            }
            _ => Err(None),
        })
    }

    /// Moves every claim `holder` has on this node's rows to `claim_until`, so downloads
    /// that outlast a claim keep it. Returns how many claims were renewed.
    pub async fn renew_claims(&self, holder: &str, claim_until: DbTime) -> Result<u64, DbError> {
        const Q: &str = "UPDATE glance_cached_queue SET claimed_until = ? \
             WHERE node_reference_id = ? AND claimed_by = ?";
        self.execute_setting(Q, Some(claim_until), &[holder]).await
    }

    /// Drops the claim on `image_id`, or only `holder`'s claim on it when a holder is
    /// given (so a claim taken since by someone else stays). Returns whether one went.
    pub async fn release_claim(
        &self,
        image_id: &str,
        holder: Option<&str>,
    ) -> Result<bool, DbError> {
        const ANY: &str = "UPDATE glance_cached_queue SET claimed_by = NULL, claimed_until = NULL \
             WHERE node_reference_id = ? AND image_id = ? AND claimed_by IS NOT NULL";
        const HOLDERS: &str = "UPDATE glance_cached_queue SET claimed_by = NULL, claimed_until = NULL \
             WHERE node_reference_id = ? AND image_id = ? AND claimed_by = ?";
        let n = match holder {
            None => self.execute(ANY, &[image_id]).await?,
            Some(holder) => self.execute(HOLDERS, &[image_id, holder]).await?,
        };
        Ok(n > 0)
    }

    /// Records a failed attempt to be retried at `next_attempt_at`; releases the claim.
    pub async fn record_retry(
        &self,
        image_id: &str,
        attempts: i64,
        next_attempt_at: DbTime,
        error: &str,
    ) -> Result<(), DbError> {
        self.settle_attempt(
            image_id,
            QueueState::Queued,
            attempts,
            next_attempt_at,
            error,
        )
        .await
    }

    /// Gives up on an image: the row stays, `failed`, with the reason, and is never
    /// claimed again until re-queued. The failure time goes in `next_attempt_at`.
    pub async fn mark_failed(
        &self,
        image_id: &str,
        attempts: i64,
        now: DbTime,
        error: &str,
    ) -> Result<(), DbError> {
        self.settle_attempt(image_id, QueueState::Failed, attempts, now, error)
            .await
    }

    /// Ends an attempt: sets the state, attempts, time and error, and releases the claim.
    async fn settle_attempt(
        &self,
        image_id: &str,
        state: QueueState,
        attempts: i64,
        at: DbTime,
        error: &str,
    ) -> Result<(), DbError> {
        const Q: &str = "UPDATE glance_cached_queue SET state = ?, attempts = ?, \
             next_attempt_at = ?, last_error = ?, claimed_by = NULL, claimed_until = NULL \
             WHERE node_reference_id = ? AND image_id = ?";
        on_pool!(self.db, |pool, d| {
            sqlx::query(sql(d, Q))
                .bind(state.as_str())
                .bind(attempts as i32)
                .bind(at)
                .bind(clip(error))
                .bind(self.node.0)
                .bind(image_id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The earliest next attempt among this node's queued, unclaimed rows.
    pub async fn next_queue_due(&self) -> Result<Option<DbTime>, DbError> {
        const Q: &str = "SELECT MIN(next_attempt_at) FROM glance_cached_queue \
             WHERE node_reference_id = ? AND state = 'queued' AND claimed_by IS NULL";
        let t = on_pool!(self.db, |pool, d| {
            sqlx::query(sql(d, Q))
                .bind(self.node.0)
                .fetch_one(pool)
                .await?
                .try_get::<Option<DbTime>, _>(0)?
        });
        Ok(t)
    }

    /// Removes one image from this node's queue. Returns the number of rows removed.
    pub async fn dequeue(&self, image_id: &str) -> Result<u64, DbError> {
        const Q: &str =
            "DELETE FROM glance_cached_queue WHERE node_reference_id = ? AND image_id = ?";
        self.execute(Q, &[image_id]).await
    }

    /// Empties this node's queue. Returns the number of rows removed.
    pub async fn dequeue_all(&self) -> Result<u64, DbError> {
        const Q: &str = "DELETE FROM glance_cached_queue WHERE node_reference_id = ?";
        self.execute(Q, &[]).await
    }
}
