//! `glance_cached_queue`: our queue table, one row per (node, image) to prefetch.
//!
//! Glance keeps its queue only as marker files in `queue/`; the table adds what a marker
//! cannot hold: order, attempts, the next attempt time and the last error.

use sqlx::Row;

use super::{Db, DbError, DbTime, Dialect, NodeId, on_pool, sql};

#[derive(Debug, Clone, PartialEq)]
pub struct QueueRow {
    pub image_id: String,
    pub queued_at: DbTime,
    pub attempts: i64,
    pub next_attempt_at: DbTime,
    pub last_error: Option<String>,
}

impl Db {
    /// Queues `image_id` for this node unless it is queued already. Returns whether a
    /// row was added.
    pub async fn enqueue(
        &self,
        node: NodeId,
        image_id: &str,
        queued_at: DbTime,
    ) -> Result<bool, DbError> {
        let n = on_pool!(self, |pool, d| {
            let q = match d {
                Dialect::MySql => {
                    "INSERT IGNORE INTO glance_cached_queue \
                     (node_reference_id, image_id, queued_at, attempts, next_attempt_at) \
                     VALUES (?, ?, ?, 0, ?)"
                }
                _ => {
                    "INSERT INTO glance_cached_queue \
                     (node_reference_id, image_id, queued_at, attempts, next_attempt_at) \
                     VALUES (?, ?, ?, 0, ?) ON CONFLICT (node_reference_id, image_id) DO NOTHING"
                }
            };
            sqlx::query(sql(d, q))
                .bind(node.0)
                .bind(image_id)
                .bind(queued_at)
                .bind(queued_at)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(n > 0)
    }

    pub async fn is_queued(&self, node: NodeId, image_id: &str) -> Result<bool, DbError> {
        const Q: &str =
            "SELECT 1 FROM glance_cached_queue WHERE node_reference_id = ? AND image_id = ?";
        let found = on_pool!(self, |pool, d| {
            sqlx::query(sql(d, Q))
                .bind(node.0)
                .bind(image_id)
                .fetch_optional(pool)
                .await?
                .is_some()
        });
        Ok(found)
    }

    /// How many images this node has queued.
    pub async fn count_queued(&self, node: NodeId) -> Result<i64, DbError> {
        const Q: &str = "SELECT COUNT(*) FROM glance_cached_queue WHERE node_reference_id = ?";
        let n = on_pool!(self, |pool, d| {
            sqlx::query(sql(d, Q))
                .bind(node.0)
                .fetch_one(pool)
                .await?
                .try_get::<i64, _>(0)?
        });
        Ok(n)
    }

    /// This node's queue in order: by queued time, then image id.
    pub async fn queued_images(&self, node: NodeId) -> Result<Vec<QueueRow>, DbError> {
        const Q: &str = "SELECT image_id, queued_at, attempts, next_attempt_at, last_error \
             FROM glance_cached_queue WHERE node_reference_id = ? ORDER BY queued_at, image_id";
        let rows = on_pool!(self, |pool, d| {
            let rows = sqlx::query(sql(d, Q)).bind(node.0).fetch_all(pool).await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                out.push(QueueRow {
                    image_id: r.try_get("image_id")?,
                    queued_at: r.try_get("queued_at")?,
                    attempts: i64::from(r.try_get::<i32, _>("attempts")?),
                    next_attempt_at: r.try_get("next_attempt_at")?,
                    last_error: r.try_get("last_error")?,
                });
            }
            out
        });
        Ok(rows)
    }

    /// Removes one image from this node's queue. Returns the number of rows removed.
    pub async fn dequeue(&self, node: NodeId, image_id: &str) -> Result<u64, DbError> {
        const Q: &str =
            "DELETE FROM glance_cached_queue WHERE node_reference_id = ? AND image_id = ?";
        let n = on_pool!(self, |pool, d| {
            sqlx::query(sql(d, Q))
                .bind(node.0)
                .bind(image_id)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(n)
    }

    /// Empties this node's queue. Returns the number of rows removed.
    pub async fn dequeue_all(&self, node: NodeId) -> Result<u64, DbError> {
        const Q: &str = "DELETE FROM glance_cached_queue WHERE node_reference_id = ?";
        let n = on_pool!(self, |pool, d| {
            sqlx::query(sql(d, Q))
                .bind(node.0)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(n)
    }
}
