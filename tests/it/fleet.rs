//! One database for a fleet: our index on Glance's `cached_images` for the per-node
//! statements, and ten daemons of ten nodes prefetching the same images through one
//! PostgreSQL.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use glance_cached::db::NodeDb;

use crate::kit::daemon::{Daemon, Setup, queue};
use crate::kit::origin::{Behaviour, Origin};
use crate::kit::servers::{
    Backend, NODE_LRU_INDEX, NODE_LRU_INDEX_COLUMNS, TestCache, TestDb, node_lru_index_columns,
    query_texts, run_sql,
};
use crate::kit::{free_port, test_bytes};

const HTTP_TOKEN: &str = "a-fleet-admin-token";

/// `GET /v2/cache/nodes/{id}` on the listener at `port`, as a set of node URLs.
fn cache_nodes(port: u16, id: &str) -> BTreeSet<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET /v2/cache/nodes/{id} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Auth-Token: {HTTP_TOKEN}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{answer}");
    serde_json::from_str::<Vec<String>>(body)
        .unwrap_or_else(|e| panic!("{e}: {body}"))
        .into_iter()
        .collect()
}

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
        // VACUUM too: an index-only scan is chosen once the visibility map is set, as
        // autovacuum keeps it on a live table.
        Backend::Postgres => "VACUUM ANALYZE cached_images",
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
    let mut lines = query_texts(url, b, &format!("{explain} {query}"), column).await;
    // MySQL says whether the index alone answers in another column.
    if b == Backend::MySql {
        lines.extend(query_texts(url, b, &format!("{explain} {query}"), "Extra").await);
    }
    lines
        .into_iter()
        .map(|line| line.unwrap_or_else(|| "(none)".into()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Our index on `cached_images` (node, last_accessed, id) is made by the migration, once
/// however often it runs, and the planner takes it for the statements that read one
/// node of many: the LRU walk's first and next batches, the count, the listing, each
/// answered from the index alone.
async fn schema_index_is_created_once_and_serves_per_node_queries(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    let columns = NODE_LRU_INDEX_COLUMNS;
    assert_eq!(node_lru_index_columns(&t.db.url, b).await, columns);
    // Every start migrates again: still the one index, no error.
    let again = NodeDb::configure(t.db.connect().await, "http://node-b:9292")
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
        // And from the index alone: in a shared table a node's rows lie one to a page.
        let index_only = match b {
            Backend::Sqlite => "USING COVERING INDEX",
            Backend::Postgres => "Index Only Scan",
            Backend::MySql => "Using index",
        };
        assert!(plan.contains(index_only), "{query}\n{plan}");
    }
    t.finish().await;
}

/// Ten daemons of ten nodes on one PostgreSQL, each queueing the same 100 images from one
/// origin: each node caches each image once (100 rows, 100 files, the right bytes; the
/// origin serves each image ten times), every claim seen in the queue is held by the
/// daemon of the row's node, Glance's `GET /v2/cache/nodes/{id}` on one node's listener
/// lists all ten nodes, and all ten stop cleanly on SIGTERM.
#[test]
fn fleet_of_ten_daemons_on_one_postgres_caches_each_image_once_per_node() {
    const NODES: usize = 10;
    const IMAGES: usize = 100;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(db) = rt.block_on(TestDb::new(Backend::Postgres)) else {
        return;
    };
    let origin = Origin::start();
    let images: Vec<(String, Vec<u8>)> = (0..IMAGES)
        .map(|n| (format!("fleet-{n:03}"), test_bytes(4096 + n * 17, n as u8)))
        .collect();
    for (id, data) in &images {
        // Two chunks 20 ms apart: a claim lives long enough to be seen.
        let behaviour = Behaviour {
            chunk_bytes: Some(data.len() / 2 + 1),
            chunk_delay: Some(Duration::from_millis(20)),
            ..Default::default()
        };
        origin.add(id, data.clone(), behaviour);
    }
    let http_port = free_port();
    let setups: Vec<Setup> = (0..NODES)
        .map(|n| {
            let extra = format!(
                "[prefetcher]\nconcurrency = 4\nretry_delay = \"100ms\"\nmax_retry_delay = \"200ms\"\ninterval = \"1h\"\n\
                 [upstream]\nkind = \"glance\"\nurl = \"{}\"\n\
                 [database]\nurl = \"{}\"\nmax_connections = 4\ncreate_glance_tables = true\n\
                 [node]\nreference_url = \"http://fleet-{n}:9292\"\n",
                origin.url(),
                db.url
            );
            let s = Setup::new(&extra);
            if n == 0 {
                // Node 0 answers Glance's cache API, for the nodes listing.
                let token = s.tmp.path().join("admin-token");
                std::fs::write(&token, format!("{HTTP_TOKEN}\n")).unwrap();
                std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))
                    .unwrap();
                s.write_config(&format!(
                    "{extra}[http]\nenabled = true\nlisten = [\"127.0.0.1:{http_port}\"]\nadmin_token_file = \"{}\"\n",
                    token.display()
                ));
            }
            s
        })
        .collect();
    // All ten start at once: their migrations meet on the lock.
    let mut daemons: Vec<Daemon> = setups
        .iter()
        .map(|s| Daemon::spawn(s.tmp.path(), &s.config, &[], &[]))
        .collect();
    for d in &mut daemons {
        d.notify
            .wait_for(0, Duration::from_secs(30), |m| m.contains("READY=1"));
    }
    let ids: Vec<&str> = images.iter().map(|(id, _)| id.as_str()).collect();
    for s in &setups {
        queue(s, &ids);
    }

    let pool = rt.block_on(sqlx::PgPool::connect(&db.url)).unwrap();
    let nodes: HashMap<i64, usize> = rt
        .block_on(
            sqlx::query_as::<_, (i64, String)>(
                "SELECT node_reference_id, node_reference_url FROM node_reference",
            )
            .fetch_all(&pool),
        )
        .unwrap()
        .into_iter()
        .map(|(id, url)| {
            let n = url
                .strip_prefix("http://fleet-")
                .and_then(|r| r.strip_suffix(":9292"))
                .unwrap();
            (id, n.parse().unwrap())
        })
        .collect();
    assert_eq!(nodes.len(), NODES);
    let holder_of: Vec<String> = daemons
        .iter()
        .map(|d| format!(" pid {} ", d.child.id()))
        .collect();
    // Polled until every node has every row and the queue is empty; every claim seen
    // on the way must be its own node's daemon's.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut claims_seen = 0usize;
    loop {
        let claims: Vec<(i64, String, String)> = rt
            .block_on(
                sqlx::query_as(
                    "SELECT node_reference_id, image_id, claimed_by FROM glance_cached_queue \
                     WHERE claimed_by IS NOT NULL",
                )
                .fetch_all(&pool),
            )
            .unwrap();
        for (node, image, holder) in &claims {
            let n = nodes[node];
            assert!(
                holder.contains(&holder_of[n]),
                "node {n}'s {image} claimed by {holder:?}, not by its daemon ({})",
                holder_of[n]
            );
        }
        claims_seen += claims.len();
        let counts: BTreeMap<i64, i64> = rt
            .block_on(
                sqlx::query_as::<_, (i64, i64)>(
                    "SELECT node_reference_id, COUNT(*) FROM cached_images GROUP BY node_reference_id",
                )
                .fetch_all(&pool),
            )
            .unwrap()
            .into_iter()
            .collect();
        let queued: i64 = rt
            .block_on(
                sqlx::query_scalar("SELECT COUNT(*) FROM glance_cached_queue").fetch_one(&pool),
            )
            .unwrap();
        if counts.len() == NODES && counts.values().all(|&c| c == IMAGES as i64) && queued == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every node cached every image in 60 s: rows {counts:?}, queued {queued}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(claims_seen > 0, "no claim was ever seen in flight");

    // Each node's directory holds each image once, with its bytes; each daemon
    // prefetched each image once; the origin served each image once per node.
    for (n, s) in setups.iter().enumerate() {
        let files: BTreeSet<String> = std::fs::read_dir(s.cache(""))
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        assert_eq!(files.len(), IMAGES, "node {n}: {files:?}");
        for (id, data) in &images {
            assert_eq!(&std::fs::read(s.cache(id)).unwrap(), data, "node {n}: {id}");
        }
        let log = daemons[n].log_text();
        let prefetched: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("prefetched image"))
            .collect();
        let distinct: BTreeSet<&str> = prefetched
            .iter()
            .filter_map(|l| l.split("image_id=").nth(1)?.split_whitespace().next())
            .collect();
        assert_eq!(prefetched.len(), IMAGES, "node {n}:\n{log}");
        assert_eq!(distinct.len(), IMAGES, "node {n}:\n{log}");
    }
    for (id, _) in &images {
        assert_eq!(origin.file_requests(id), NODES as u32, "{id}");
    }
    // Glance's listing of the nodes caching an image, from node 0's listener.
    let listed = cache_nodes(http_port, &images[0].0);
    let expected: BTreeSet<String> = (0..NODES)
        .map(|n| format!("http://fleet-{n}:9292"))
        .collect();
    assert_eq!(listed, expected);
    rt.block_on(pool.close());
    for d in daemons {
        d.stop();
    }
    rt.block_on(db.drop_database());
}
