//! Schema creation and migration for the three backends.
//!
//! Glance's `node_reference` and `cached_images` are created exactly as Glance's
//! migration `2024_1_expand01` creates them, and only when absent: when Glance made them,
//! they are used as they are, never altered, with one addition: our index on
//! `cached_images` for the per-node statements (`NODE_LRU_INDEX`). Our own tables carry the `glance_cached_`
//! prefix and a version row in `glance_cached_schema`. Concurrent nodes migrating one
//! shared database are serialised with an advisory lock (PostgreSQL), `GET_LOCK` (MySQL)
//! or an immediate transaction (SQLite).

use sqlx::{Connection, Row};

use super::{Db, DbError, Dialect, on_pool};

/// The version of our own tables this build writes and understands.
pub(super) const SCHEMA_VERSION: i64 = 1;

/// Advisory lock key for migrations on PostgreSQL ("gcached" in ASCII).
const PG_MIGRATION_LOCK_KEY: i64 = 0x0067_6361_6368_6564;
/// How long a MySQL node waits for another node's migration, in seconds.
const MYSQL_MIGRATION_LOCK_WAIT_SECS: i64 = 120;

const SQLITE_DDL: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS node_reference (
        node_reference_id INTEGER NOT NULL,
        node_reference_url VARCHAR(255) NOT NULL,
        PRIMARY KEY (node_reference_id),
        CONSTRAINT uq_node_reference_node_reference_url UNIQUE (node_reference_url)
    )",
    "CREATE TABLE IF NOT EXISTS cached_images (
        id INTEGER NOT NULL,
        image_id VARCHAR(36) NOT NULL,
        last_accessed DATETIME NOT NULL,
        last_modified DATETIME NOT NULL,
        size BIGINT NOT NULL,
        hits INTEGER NOT NULL,
        checksum VARCHAR(32),
        node_reference_id INTEGER NOT NULL,
        PRIMARY KEY (id),
        CONSTRAINT ix_cached_images_image_id_node_reference_id UNIQUE (image_id, node_reference_id),
        FOREIGN KEY(node_reference_id) REFERENCES node_reference (node_reference_id)
    )",
    "CREATE TABLE IF NOT EXISTS glance_cached_queue (
        node_reference_id INTEGER NOT NULL,
        image_id VARCHAR(36) NOT NULL,
        queued_at DATETIME NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DATETIME NOT NULL,
        last_error VARCHAR(1024),
        state VARCHAR(16) NOT NULL DEFAULT 'queued',
        claimed_by VARCHAR(255),
        claimed_until DATETIME,
        PRIMARY KEY (node_reference_id, image_id)
    )",
    "CREATE INDEX IF NOT EXISTS ix_glance_cached_queue_order
        ON glance_cached_queue (node_reference_id, queued_at, image_id)",
    "CREATE TABLE IF NOT EXISTS glance_cached_lease (
        node_reference_id INTEGER NOT NULL,
        holder VARCHAR(255) NOT NULL,
        heartbeat_at DATETIME NOT NULL,
        started_at DATETIME NOT NULL,
        PRIMARY KEY (node_reference_id)
    )",
];

const POSTGRES_DDL: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS node_reference (
        node_reference_id BIGSERIAL NOT NULL,
        node_reference_url VARCHAR(255) NOT NULL,
        PRIMARY KEY (node_reference_id),
        CONSTRAINT uq_node_reference_node_reference_url UNIQUE (node_reference_url)
    )",
    "CREATE TABLE IF NOT EXISTS cached_images (
        id BIGSERIAL NOT NULL,
        image_id VARCHAR(36) NOT NULL,
        last_accessed TIMESTAMP WITHOUT TIME ZONE NOT NULL,
        last_modified TIMESTAMP WITHOUT TIME ZONE NOT NULL,
        size BIGINT NOT NULL,
        hits INTEGER NOT NULL,
        checksum VARCHAR(32),
        node_reference_id BIGINT NOT NULL,
        PRIMARY KEY (id),
        CONSTRAINT ix_cached_images_image_id_node_reference_id UNIQUE (image_id, node_reference_id),
        FOREIGN KEY(node_reference_id) REFERENCES node_reference (node_reference_id)
    )",
    "CREATE TABLE IF NOT EXISTS glance_cached_queue (
        node_reference_id BIGINT NOT NULL,
        image_id VARCHAR(36) NOT NULL,
        queued_at TIMESTAMP WITHOUT TIME ZONE NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TIMESTAMP WITHOUT TIME ZONE NOT NULL,
        last_error VARCHAR(1024),
        state VARCHAR(16) NOT NULL DEFAULT 'queued',
        claimed_by VARCHAR(255),
        claimed_until TIMESTAMP WITHOUT TIME ZONE,
        PRIMARY KEY (node_reference_id, image_id)
    )",
    "CREATE INDEX IF NOT EXISTS ix_glance_cached_queue_order
        ON glance_cached_queue (node_reference_id, queued_at, image_id)",
    "CREATE TABLE IF NOT EXISTS glance_cached_lease (
        node_reference_id BIGINT NOT NULL,
        holder VARCHAR(255) NOT NULL,
        heartbeat_at TIMESTAMP WITHOUT TIME ZONE NOT NULL,
        started_at TIMESTAMP WITHOUT TIME ZONE NOT NULL,
        PRIMARY KEY (node_reference_id)
    )",
];

const MYSQL_DDL: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS node_reference (
        node_reference_id BIGINT NOT NULL AUTO_INCREMENT,
        node_reference_url VARCHAR(255) NOT NULL,
        PRIMARY KEY (node_reference_id),
        CONSTRAINT uq_node_reference_node_reference_url UNIQUE (node_reference_url)
    ) ENGINE=InnoDB CHARSET=utf8",
    "CREATE TABLE IF NOT EXISTS cached_images (
        id BIGINT NOT NULL AUTO_INCREMENT,
        image_id VARCHAR(36) NOT NULL,
        last_accessed DATETIME NOT NULL,
        last_modified DATETIME NOT NULL,
        size BIGINT NOT NULL,
        hits INTEGER NOT NULL,
        checksum VARCHAR(32),
        node_reference_id BIGINT NOT NULL,
        PRIMARY KEY (id),
        CONSTRAINT ix_cached_images_image_id_node_reference_id UNIQUE (image_id, node_reference_id),
        FOREIGN KEY(node_reference_id) REFERENCES node_reference (node_reference_id)
    ) ENGINE=InnoDB CHARSET=utf8",
    "CREATE TABLE IF NOT EXISTS glance_cached_queue (
        node_reference_id BIGINT NOT NULL,
        image_id VARCHAR(36) NOT NULL,
        queued_at DATETIME(6) NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DATETIME(6) NOT NULL,
        last_error VARCHAR(1024),
        state VARCHAR(16) NOT NULL DEFAULT 'queued',
        claimed_by VARCHAR(255),
        claimed_until DATETIME(6),
        PRIMARY KEY (node_reference_id, image_id),
        KEY ix_glance_cached_queue_order (node_reference_id, queued_at, image_id)
    ) ENGINE=InnoDB CHARSET=utf8mb4",
    "CREATE TABLE IF NOT EXISTS glance_cached_lease (
        node_reference_id BIGINT NOT NULL,
        holder VARCHAR(255) NOT NULL,
        heartbeat_at DATETIME(6) NOT NULL,
        started_at DATETIME(6) NOT NULL,
        PRIMARY KEY (node_reference_id)
    ) ENGINE=InnoDB CHARSET=utf8mb4",
];

/// Our one addition to Glance's schema: an index on its `cached_images` for the per-node
/// statements (`WHERE node_reference_id = ?`, the LRU walk `ORDER BY last_accessed, id`,
/// counts and listings). Glance's unique index there leads with `image_id`, so on a
/// database shared by a fleet each of those statements would read every node's rows
/// (MySQL's InnoDB also indexes `node_reference_id` for the foreign key, which finds the
/// rows but not their order; it drops that index once ours can serve the key).
/// It covers every column those statements read (`SELECT_COLUMNS` in `cached_images`),
/// so they are index-only: in a shared table a node's rows lie one to a page (a node's
/// 10,000 rows on 10,000 pages of a million-row table), and reading them through an
/// index of row addresses cost one table page per row (listing 4.6x, LRU batch 2.4x the
/// node alone on PostgreSQL, 19x and 10x on MariaDB, BENCHMARKS.md). The extra columns
/// cost no extra index writes: a hit moves `last_accessed`, a key column, either way.
/// PostgreSQL (11 and later) carries them as `INCLUDE` columns, the others as trailing
/// key parts (about 300 bytes, well under MySQL's 3072-byte key limit in any charset).
/// Created when absent on every migration, under the migration lock, and never dropped
/// or altered: a database whose index an earlier version made keeps that narrower one
/// (the three key columns) until an operator drops it; a Glance migration that rebuilds
/// the table (SQLite's batch mode copies it) loses it until the next start.
const NODE_LRU_INDEX: &str = "ix_glance_cached_images_node_lru";

/// `NODE_LRU_INDEX` on PostgreSQL.
const CREATE_NODE_LRU_INDEX_POSTGRES: &str = "CREATE INDEX IF NOT EXISTS ix_glance_cached_images_node_lru \
     ON cached_images (node_reference_id, last_accessed, id) \
     INCLUDE (image_id, last_modified, size, hits, checksum)";

/// `NODE_LRU_INDEX` on SQLite.
const CREATE_NODE_LRU_INDEX_SQLITE: &str = "CREATE INDEX IF NOT EXISTS ix_glance_cached_images_node_lru \
     ON cached_images (node_reference_id, last_accessed, id, image_id, last_modified, size, hits, checksum)";

/// `NODE_LRU_INDEX` on MySQL and MariaDB (MySQL 8's `CREATE INDEX` has no `IF NOT
/// EXISTS`, MariaDB's has): run after `MYSQL_HAS_NODE_LRU_INDEX` found none, under the
/// migration lock.
const CREATE_NODE_LRU_INDEX_MYSQL: &str = "CREATE INDEX ix_glance_cached_images_node_lru \
     ON cached_images (node_reference_id, last_accessed, id, image_id, last_modified, size, hits, checksum)";

const MYSQL_HAS_NODE_LRU_INDEX: &str = "SELECT COUNT(*) FROM information_schema.statistics \
     WHERE table_schema = DATABASE() AND table_name = 'cached_images' \
     AND index_name = 'ix_glance_cached_images_node_lru'";

/// Creates `NODE_LRU_INDEX` when absent, on the migration's connection `$conn` (which
/// holds the migration lock) of dialect `$d`. A macro, as the body is the same SQL on each
/// backend's own connection type inside `on_pool!`.
macro_rules! ensure_node_lru_index {
    ($conn:expr, $d:expr) => {
        async {
            debug_assert!(CREATE_NODE_LRU_INDEX_MYSQL.contains(NODE_LRU_INDEX));
            if $d == Dialect::MySql {
                let present: i64 = sqlx::query(MYSQL_HAS_NODE_LRU_INDEX)
                    .fetch_one(&mut *$conn)
                    .await?
                    .try_get(0)?;
                if present == 0 {
                    sqlx::query(CREATE_NODE_LRU_INDEX_MYSQL)
                        .execute(&mut *$conn)
                        .await?;
                }
            } else {
                let create = if $d == Dialect::Postgres {
                    CREATE_NODE_LRU_INDEX_POSTGRES
                } else {
                    CREATE_NODE_LRU_INDEX_SQLITE
                };
                sqlx::query(create).execute(&mut *$conn).await?;
            }
            Ok::<(), sqlx::Error>(())
        }
        .await
    };
}

const CREATE_VERSION_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS glance_cached_schema (version BIGINT NOT NULL)";

/// One row: how many of Glance's `cached_images` (`glance_tables`) and of alembic's
/// `alembic_version` (`glance_schema`) the connection's database (schema, on PostgreSQL)
/// has.
fn glance_tables_sql(d: Dialect) -> String {
    let count = |table: &str| match d {
        Dialect::Sqlite => {
            format!("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '{table}'")
        }
        Dialect::Postgres => format!(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = '{table}'"
        ),
        Dialect::MySql => format!(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = '{table}'"
        ),
    };
    format!(
        "SELECT ({}) AS glance_tables, ({}) AS glance_schema",
        count("cached_images"),
        count("alembic_version")
    )
}

impl Db {
    /// For access that only reads: says what `migrate` would refuse or have to create,
    /// and creates nothing.
    pub async fn check_schema(&self) -> Result<(), DbError> {
        let (glance_tables, glance_schema) = on_pool!(self, |pool, d| {
            let tables = sqlx::query(sqlx::AssertSqlSafe(glance_tables_sql(d)))
                .fetch_one(pool)
                .await?;
            (
                tables.try_get::<i64, _>("glance_tables")? > 0,
                tables.try_get::<i64, _>("glance_schema")? > 0,
            )
        });
        match (glance_tables, glance_schema) {
            (true, _) => Ok(()),
            (false, true) => Err(DbError::GlanceSchemaTooOld),
            (false, false) if self.create_glance_tables => Err(DbError::NoTablesYet),
            (false, false) => Err(DbError::NoGlanceTables),
        }
    }

    /// Creates whatever tables are missing and records our schema version. Safe to run on
    /// every start from every node at once.
    pub async fn migrate(&self) -> Result<(), DbError> {
        let wrap = |source| DbError::Migrate { source };
        on_pool!(self, |pool, d| {
            let mut conn = pool.acquire().await.map_err(wrap)?;
            let ddl = match d {
                Dialect::Sqlite => {
                    sqlx::query("BEGIN IMMEDIATE")
                        .execute(&mut *conn)
                        .await
                        .map_err(wrap)?;
                    SQLITE_DDL
                }
                Dialect::Postgres => {
                    sqlx::query("SELECT pg_advisory_lock($1)")
                        .bind(PG_MIGRATION_LOCK_KEY)
                        .execute(&mut *conn)
                        .await
                        .map_err(wrap)?;
                    POSTGRES_DDL
                }
                Dialect::MySql => {
                    sqlx::query("SELECT GET_LOCK('glance_cached_migrate', ?)")
                        .bind(MYSQL_MIGRATION_LOCK_WAIT_SECS)
                        .execute(&mut *conn)
                        .await
                        .map_err(wrap)?;
                    MYSQL_DDL
                }
            };
            let result = async {
                sqlx::query(CREATE_VERSION_TABLE)
                    .execute(&mut *conn)
                    .await?;
                let found: Option<i64> =
                    sqlx::query("SELECT MAX(version) AS v FROM glance_cached_schema")
                        .fetch_one(&mut *conn)
                        .await?
                        .try_get("v")?;
                if let Some(found) = found
                    && found > SCHEMA_VERSION
                {
                    return Ok(Err(DbError::SchemaTooNew {
                        found,
                        supported: SCHEMA_VERSION,
                    }));
                }
                let tables = sqlx::query(sqlx::AssertSqlSafe(glance_tables_sql(d)))
                    .fetch_one(&mut *conn)
                    .await?;
                let glance_tables = tables.try_get::<i64, _>("glance_tables")? > 0;
                let glance_schema = tables.try_get::<i64, _>("glance_schema")? > 0;
                // When Glance shares the database its tables come from its migrations;
                // made here, a later `glance-manage db sync` would fail on them.
                if !glance_tables && glance_schema {
                    return Ok(Err(DbError::GlanceSchemaTooOld));
                }
                if !glance_tables && !self.create_glance_tables {
                    return Ok(Err(DbError::NoGlanceTables));
                }
                for stmt in ddl {
                    sqlx::query(*stmt).execute(&mut *conn).await?;
                }
                ensure_node_lru_index!(conn, d)?;
                if found != Some(SCHEMA_VERSION) {
                    sqlx::query("DELETE FROM glance_cached_schema")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query(super::sql(
                        d,
                        "INSERT INTO glance_cached_schema (version) VALUES (?)",
                    ))
                    .bind(SCHEMA_VERSION)
                    .execute(&mut *conn)
                    .await?;
                }
                Ok::<_, sqlx::Error>(Ok(()))
            }
            .await;
            let release = match d {
                Dialect::Sqlite => {
                    if matches!(result, Ok(Ok(()))) {
                        "COMMIT"
                    } else {
                        "ROLLBACK"
                    }
                }
                Dialect::Postgres => "SELECT pg_advisory_unlock_all()",
                Dialect::MySql => "SELECT RELEASE_LOCK('glance_cached_migrate')",
            };
            let released = sqlx::query(release).execute(&mut *conn).await;
            if released.is_err() {
                // A connection still holding the lock must not go back to the pool.
                let _ = conn.detach().close().await;
            }
            result.map_err(wrap)??;
            released.map_err(wrap)?;
        });
        Ok(())
    }
}
