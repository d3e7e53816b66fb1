//! `glance_cached_lease`: one row per node naming the daemon that serves it.
//!
//! A daemon takes the lease at start and renews it (heartbeat) while it runs. A second
//! daemon with the same `node.reference_url` finds a fresh lease held by someone else
//! and refuses to start, so two daemons never silently share one node's rows. Takeover
//! of an expired lease is a compare-and-swap on (holder, heartbeat).

use sqlx::Row;

use super::{Db, DbError, DbTime, NodeId, on_pool, sql};

/// Who holds a lease and when they last renewed it.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseHolder {
    pub holder: String,
    pub heartbeat_at: DbTime,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LeaseOutcome {
    Acquired,
    /// Someone else renewed it after `expired_before`.
    HeldBy(LeaseHolder),
}

impl Db {
    /// Takes the node's lease for `holder` unless another holder renewed it after
    /// `expired_before` (ignored when `force`).
    pub async fn acquire_lease(
        &self,
        node: NodeId,
        holder: &str,
        now: DbTime,
        expired_before: DbTime,
        force: bool,
    ) -> Result<LeaseOutcome, DbError> {
        match self.lease_holder(node).await? {
            Some(cur) if cur.holder != holder && cur.heartbeat_at > expired_before && !force => {
                return Ok(LeaseOutcome::HeldBy(cur));
            }
            Some(cur) => return self.take_over_lease(node, holder, now, &cur).await,
            None => {}
        }
        let inserted = on_pool!(self, |pool, d| {
            sqlx::query(sql(
                d,
                "INSERT INTO glance_cached_lease (node_reference_id, holder, heartbeat_at, started_at) \
                 VALUES (?, ?, ?, ?)",
            ))
            .bind(node.0)
            .bind(holder)
            .bind(now)
            .bind(now)
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
            // Another daemon inserted first: report it below as held.
            .or_else(|e| match &e {
                sqlx::Error::Database(db) if db.is_unique_violation() => Ok(0),
                _ => Err(e),
            })?
        });
        if inserted > 0 {
            return Ok(LeaseOutcome::Acquired);
        }
        match self.lease_holder(node).await? {
            Some(h) if h.holder == holder => Ok(LeaseOutcome::Acquired),
            Some(h) => Ok(LeaseOutcome::HeldBy(h)),
            None => Ok(LeaseOutcome::HeldBy(LeaseHolder {
                holder: "another daemon (released while we looked)".into(),
                heartbeat_at: now,
            })),
        }
    }

    /// Takes the lease over from `previous` only if it still holds it with the same
    /// heartbeat (it stopped renewing): a compare-and-swap, so a holder that renewed in
    /// the meantime keeps it.
    pub async fn take_over_lease(
        &self,
        node: NodeId,
        holder: &str,
        now: DbTime,
        previous: &LeaseHolder,
    ) -> Result<LeaseOutcome, DbError> {
        const Q: &str = "UPDATE glance_cached_lease SET holder = ?, heartbeat_at = ?, started_at = ? \
             WHERE node_reference_id = ? AND holder = ? AND heartbeat_at = ?";
        let changed = on_pool!(self, |pool, d| {
            sqlx::query(sql(d, Q))
                .bind(holder)
                .bind(now)
                .bind(now)
                .bind(node.0)
                .bind(previous.holder.as_str())
                .bind(previous.heartbeat_at)
                .execute(pool)
                .await?
                .rows_affected()
        });
        if changed > 0 {
            return Ok(LeaseOutcome::Acquired);
        }
        // Renewed, released or taken by someone else meanwhile: start over next time.
        Ok(LeaseOutcome::HeldBy(
            self.lease_holder(node).await?.unwrap_or(LeaseHolder {
                holder: "another daemon (released while we looked)".into(),
                heartbeat_at: now,
            }),
        ))
    }

    pub async fn lease_holder(&self, node: NodeId) -> Result<Option<LeaseHolder>, DbError> {
        const Q: &str =
            "SELECT holder, heartbeat_at FROM glance_cached_lease WHERE node_reference_id = ?";
        let row = on_pool!(self, |pool, d| {
            match sqlx::query(sql(d, Q))
                .bind(node.0)
                .fetch_optional(pool)
                .await?
            {
                Some(r) => Some(LeaseHolder {
                    holder: r.try_get("holder")?,
                    heartbeat_at: r.try_get("heartbeat_at")?,
                }),
                None => None,
            }
        });
        Ok(row)
    }

    /// Renews the lease; `false` when `holder` no longer holds it (taken over).
    pub async fn renew_lease(
        &self,
        node: NodeId,
        holder: &str,
        now: DbTime,
    ) -> Result<bool, DbError> {
        const Q: &str = "UPDATE glance_cached_lease SET heartbeat_at = ? \
             WHERE node_reference_id = ? AND holder = ?";
        let n = on_pool!(self, |pool, d| {
            sqlx::query(sql(d, Q))
                .bind(now)
                .bind(node.0)
                .bind(holder)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(n > 0)
    }

    /// Gives the lease up at a clean shutdown.
    pub async fn release_lease(&self, node: NodeId, holder: &str) -> Result<(), DbError> {
        const Q: &str =
            "DELETE FROM glance_cached_lease WHERE node_reference_id = ? AND holder = ?";
        on_pool!(self, |pool, d| {
            sqlx::query(sql(d, Q))
                .bind(node.0)
                .bind(holder)
                .execute(pool)
                .await?;
        });
        Ok(())
    }
}
