//! `node_reference`: one row per cache node, keyed by its reference URL.

use sqlx::Row;

use super::{Db, DbError, on_pool, sql};

/// The `node_reference_id` of a node: every other query is scoped by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeId(pub i64);

impl NodeId {
    /// The id of a node with no row yet (read-only access never registers one): no
    /// `cached_images` or queue row carries it, since Glance's ids start at 1.
    pub const UNREGISTERED: NodeId = NodeId(0);
}

impl Db {
    /// Returns the id of the node named `url`, creating its row if it is missing (as
    /// Glance's `node_reference_create`, ignoring the duplicate when another process won).
    pub async fn register_node(&self, url: &str) -> Result<NodeId, DbError> {
        let wrap = |source| DbError::RegisterNode {
            url: url.to_owned(),
            source,
        };
        if let Some(id) = self.find_node(url).await? {
            return Ok(id);
        }
        on_pool!(self, |pool, d| {
            let insert = match d {
                super::Dialect::MySql => {
                    "INSERT IGNORE INTO node_reference (node_reference_url) VALUES (?)"
                }
                _ => {
                    "INSERT INTO node_reference (node_reference_url) VALUES (?) \
                     ON CONFLICT (node_reference_url) DO NOTHING"
                }
            };
            sqlx::query(sql(d, insert))
                .bind(url)
                .execute(pool)
                .await
                .map_err(wrap)?;
        });
        self.find_node(url)
            .await?
            .ok_or_else(|| wrap(sqlx::Error::RowNotFound))
    }

    /// The id of the node named `url`, if it has a row.
    pub async fn find_node(&self, url: &str) -> Result<Option<NodeId>, DbError> {
        let row = on_pool!(self, |pool, d| {
            sqlx::query(sql(
                d,
                "SELECT node_reference_id FROM node_reference WHERE node_reference_url = ?",
            ))
            .bind(url)
            .fetch_optional(pool)
            .await?
            .map(|r| r.try_get::<i64, _>(0))
            .transpose()?
        });
        Ok(row.map(NodeId))
    }
}
