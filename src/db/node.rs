//! `node_reference`: one row per cache node, keyed by its reference URL.

use sqlx::Row;

use super::{Db, DbError, DbTime, on_pool, sql};

/// The `node_reference_id` of a node: every other query is scoped by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeId(pub i64);

impl NodeId {
    /// The id of a node with no row yet (read-only access never registers one): no
    /// `cached_images` or queue row carries it, since Glance's ids start at 1.
    pub const UNREGISTERED: NodeId = NodeId(0);
}

/// The database bound to one node: every query on `cached_images` and the queue hangs
/// off it and is scoped by its `node_reference_id`, so no caller passes (or mixes up) a
/// node. Cheap to clone.
#[derive(Clone)]
pub struct NodeDb {
    pub(super) db: Db,
    pub(super) node: NodeId,
    url: std::sync::Arc<str>,
}

impl NodeDb {
    /// Glance's `configure` on the database side: migrates the schema and registers the
    /// node named `url` (its row made if missing).
    pub async fn configure(db: Db, url: &str) -> Result<NodeDb, DbError> {
        db.migrate().await?;
        let node = db.register_node(url).await?;
        tracing::debug!(node_url = url, node_id = node.0, "cache node registered");
        Ok(NodeDb::bound(db, node, url))
    }

    /// For commands that only look: no schema or node row is made. A node that was
    /// never registered has nothing cached or queued, so it gets an id that no row
    /// carries.
    pub async fn open_read_only(db: Db, url: &str) -> Result<NodeDb, DbError> {
        db.check_schema().await?;
        let node = db.find_node(url).await?.unwrap_or(NodeId::UNREGISTERED);
        Ok(NodeDb::bound(db, node, url))
    }

    fn bound(db: Db, node: NodeId, url: &str) -> NodeDb {
        NodeDb {
            db,
            node,
            url: url.into(),
        }
    }

    /// The node's id (for the lease, which `Db` keeps per node).
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The node's reference URL (`node_reference_url`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs `statement`, whose placeholders are this node's id and then `texts` in
    /// order; returns how many rows it changed.
    pub(super) async fn execute(
        &self,
        statement: &'static str,
        texts: &[&str],
    ) -> Result<u64, DbError> {
        self.execute_setting(statement, None, texts).await
    }

    /// `execute` for a statement whose first placeholder is the time it sets, when
    /// `time` is given.
    pub(super) async fn execute_setting(
        &self,
        statement: &'static str,
        time: Option<DbTime>,
        texts: &[&str],
    ) -> Result<u64, DbError> {
        let n = on_pool!(self.db, |pool, d| {
            let mut q = sqlx::query(sql(d, statement));
            if let Some(time) = time {
                q = q.bind(time);
            }
            q = q.bind(self.node.0);
            for text in texts {
                q = q.bind(*text);
            }
            q.execute(pool).await?.rows_affected()
        });
        Ok(n)
    }

    /// The database itself, for what is not scoped by a node's rows (the lease, the
    /// pool's file, closing).
    pub fn db(&self) -> &Db {
        &self.db
    }
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

    /// The reference URLs of the nodes whose `cached_images` hold `image_id`, ordered
    /// (Glance's `get_cached_nodes`: every node of the shared database).
    pub async fn cached_nodes(&self, image_id: &str) -> Result<Vec<String>, DbError> {
        const Q: &str = "SELECT n.node_reference_url FROM node_reference n \
             JOIN cached_images c ON c.node_reference_id = n.node_reference_id \
             WHERE c.image_id = ? ORDER BY n.node_reference_url";
        let urls = on_pool!(self, |pool, d| {
            sqlx::query_scalar::<_, String>(sql(d, Q))
                .bind(image_id)
                .fetch_all(pool)
                .await?
        });
        Ok(urls)
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
