//! One database for a fleet: our index on Glance's `cached_images` for the per-node
//! statements.

use glance_cached::cache::{CacheDriver, CacheLayout};

use crate::kit::servers::{
    Backend, NODE_LRU_INDEX, TestCache, node_lru_index_columns, query_texts, run_sql,
};

crate::kit::servers::on_every_backend!(schema_index_is_created_once_and_serves_per_node_queries);

/// `nodes` nodes (ids from 1000) of `per_node` rows each, by multi-row INSERT.
async fn fill(url: &str, b: Backend, nodes: usize, per_node: usize) {
    let values: Vec<String> = (0..nodes)
        .map(|n| format!("({}, 'http://fill-{n}:9292')", 1000 + n))
        .collect();
    let statement = format!(
        "INSERT INTO node_reference (node_reference_id, node_reference_url) VALUES {}",
        values.join(", ")
    );
    run_sql(url, b, &statement).await.unwrap();
    let rows: Vec<String> = (0..nodes * per_node)
        .map(|i| {
            let (node, n) = (1000 + i % nodes, i / nodes);
            let when = format!(
                "2026-01-01 {:02}:{:02}:{:02}.000000",
                n / 3600 % 24,
                n / 60 % 60,
                n % 60
            );
            format!("('img-{n:06}', '{when}', '{when}', 1024, 0, NULL, {node})")
        })
        .collect();
    for batch in rows.chunks(1000) {
        let statement = format!(
            "INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits, checksum, node_reference_id) VALUES {}",
            batch.join(", ")
        );
        run_sql(url, b, &statement).await.unwrap();
    }
    let analyze = match b {
        Backend::Sqlite => "ANALYZE",
        Backend::Postgres => "ANALYZE cached_images",
        Backend::MySql => "ANALYZE TABLE cached_images",
    };
    run_sql(url, b, analyze).await.unwrap();
}

/// The plan `b` chooses for `query`, as text.
async fn plan(url: &str, b: Backend, query: &str) -> String {
    let (explain, column) = match b {
        Backend::Sqlite => ("EXPLAIN QUERY PLAN", "detail"),
        Backend::Postgres => ("EXPLAIN", "QUERY PLAN"),
        Backend::MySql => ("EXPLAIN", "key"),
    };
    query_texts(url, b, &format!("{explain} {query}"), column)
        .await
        .into_iter()
        .map(|line| line.unwrap_or_else(|| "(none)".into()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Our index on `cached_images` (node, last_accessed, id) is made by the migration, once
/// however often it runs, and the planner takes it for the statements that read one
/// node of many: the LRU walk's first and next batches, the count, the listing.
async fn schema_index_is_created_once_and_serves_per_node_queries(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    let columns = ["node_reference_id", "last_accessed", "id"];
    assert_eq!(node_lru_index_columns(&t.db.url, b).await, columns);
    // Every start migrates again: still the one index, no error.
    let again = CacheDriver::configure(
        CacheLayout::open(t.dir.path().join("again")).unwrap(),
        t.db.connect().await,
        "http://node-b:9292",
    )
    .await
    .unwrap();
    again.db().close().await;
    assert_eq!(node_lru_index_columns(&t.db.url, b).await, columns);

    // 100 nodes of 200 rows: one node is 1% of the table.
    fill(&t.db.url, b, 100, 200).await;
    let select = "SELECT id, image_id, last_accessed, last_modified, size, hits, checksum FROM cached_images";
    for query in [
        format!("{select} WHERE node_reference_id = 1042 ORDER BY last_accessed, id LIMIT 2048"),
        format!(
            "{select} WHERE node_reference_id = 1042 AND (last_accessed > '2026-01-01 00:01:00.000000' \
             OR (last_accessed = '2026-01-01 00:01:00.000000' AND id > 5)) ORDER BY last_accessed, id LIMIT 2048"
        ),
        "SELECT COUNT(*) FROM cached_images WHERE node_reference_id = 1042".to_string(),
        format!("{select} WHERE node_reference_id = 1042 ORDER BY image_id"),
    ] {
        let plan = plan(&t.db.url, b, &query).await;
        assert!(plan.contains(NODE_LRU_INDEX), "{query}\n{plan}");
    }
    t.finish().await;
}
