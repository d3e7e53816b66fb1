//! One database for a fleet: one node's operations on PostgreSQL and MariaDB filled with
//! 1,000,000 `cached_images` rows over 100 nodes, beside the same node alone in a
//! database of its own (the baseline, in the same run), and claims of 10 nodes at once
//! (with the CPU seconds per claim of this process and the server's, which do not
//! depend on how many cores the claimers share) and of the same 10 one after another;
//! then the listing, count and prune in the same fleet without our index.
//!
//!   scripts/bench                          # everything, with the servers started
//!   BENCH_SMOKE=1 cargo bench --bench fleet  # 10 nodes of 500 rows: proves it runs
//!
//! Needs `GLANCE_CACHED_TEST_POSTGRES_URL` / `GLANCE_CACHED_TEST_MYSQL_URL` (a backend
//! without one is skipped); each run makes databases of its own there and drops them.
//! Rows are bulk-inserted with multi-row INSERTs, not through the driver. Figures are
//! medians of `BENCH_ROUNDS` rounds (default 3; the prune, which removes what it
//! measures, runs once per database). Results: a table on stdout and JSON in
//! target/bench/fleet.json.

// Test and benchmark code: a panic here is a failed run, not a crashed daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Benchmarks measure real time: std's clock is the point here.
#![allow(clippy::disallowed_methods)]
// A benchmark has no API: its items need not be reachable.
#![allow(unreachable_pub)]

mod common;

use common::{bench_dir, median, ops_per_second, rounds, smoke};
use std::path::Path;
use std::time::{Duration, Instant};

use glance_cached::cache::{Area, CacheDriver, CacheLayout, PrunePolicy};
use glance_cached::db::{Db, DbOptions, NodeDb};
use glance_cached::image_id::ImageId;
use sqlx::Connection;

/// Nodes in the shared database, rows per node, point operations per figure, queued
/// images per claiming node, claiming nodes.
struct Sizes {
    nodes: usize,
    per_node: usize,
    ops: usize,
    queued: usize,
    claimers: usize,
}

fn sizes() -> Sizes {
    if smoke() {
        Sizes {
            nodes: 10,
            per_node: 500,
            ops: 100,
            queued: 20,
            claimers: 10,
        }
    } else {
        Sizes {
            nodes: 100,
            per_node: 10_000,
            ops: 2_000,
            // Enough claims that the CPU figures (10 ms ticks) are within a few percent.
            queued: 1_000,
            claimers: 10,
        }
    }
}

const FILE_BYTES: usize = 64;

/// Image `n` of node `node`: a valid 36-character id, distinct per node.
fn image_id(node: usize, n: usize) -> ImageId {
    ImageId::parse(&format!("{n:08x}-0000-4000-8000-{node:012x}")).unwrap()
}

fn node_url(node: usize) -> String {
    format!("http://fleet-bench-{node}:9292")
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Postgres,
    MariaDb,
}

/// Runs `statements` one by one on one connection to `url`.
async fn exec(url: &str, kind: Kind, statements: &[String]) {
    /// The same body on each backend's own connection type.
    macro_rules! run_on {
        ($connection:ty) => {{
            let mut c = <$connection>::connect(url).await.unwrap();
            for s in statements {
                sqlx::raw_sql(sqlx::AssertSqlSafe(s.clone()))
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
            c.close().await.unwrap();
        }};
    }
    match kind {
        Kind::Postgres => run_on!(sqlx::PgConnection),
        Kind::MariaDb => run_on!(sqlx::MySqlConnection),
    }
}

/// Waits until the server has written out what the fill left dirty, so that no figure
/// pays for the bulk insert's writeback (a first run's "alone" figures, measured right
/// after the fill, paid the checkpoint of the fleet's 400 MB: 3x the server's CPU per
/// claim). PostgreSQL: `CHECKPOINT` (superuser or `pg_checkpoint`, which
/// `scripts/test-services` grants). MariaDB: its dirty pages flushed with
/// `innodb_max_dirty_pages_pct` at 0 for the wait (at most a minute), then put back.
async fn settle(url: &str, kind: Kind) {
    match kind {
        Kind::Postgres => {
            let done = match sqlx::PgConnection::connect(url).await {
                Ok(mut c) => sqlx::raw_sql("CHECKPOINT").execute(&mut c).await.map(drop),
                Err(e) => Err(e),
            };
            if let Err(e) = done {
                eprintln!(
                    "postgresql: CHECKPOINT refused ({e}): figures may include the fill's writeback"
                );
            }
        }
        Kind::MariaDb => {
            let pct = "CAST(@@GLOBAL.innodb_max_dirty_pages_pct AS CHAR)";
            let was = query_text(url, kind, &format!("SELECT {pct}"))
                .await
                .join("");
            exec(
                url,
                kind,
                &["SET GLOBAL innodb_max_dirty_pages_pct = 0".to_owned()],
            )
            .await;
            let dirty = "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS \
                         WHERE VARIABLE_NAME = 'INNODB_BUFFER_POOL_PAGES_DIRTY'";
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(60) {
                let pages: u64 = query_text(url, kind, dirty)
                    .await
                    .join("")
                    .parse()
                    .unwrap_or(0);
                if pages < 100 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let was = if was.parse::<f64>().is_ok() {
                was
            } else {
                "90".to_owned()
            };
            exec(
                url,
                kind,
                &[format!("SET GLOBAL innodb_max_dirty_pages_pct = {was}")],
            )
            .await;
        }
    }
}

/// The first query's first column, as text.
async fn query_text(url: &str, kind: Kind, statement: &str) -> Vec<String> {
    use sqlx::Row;
    let q = sqlx::AssertSqlSafe(statement.to_owned());
    match kind {
        Kind::Postgres => {
            let mut c = sqlx::PgConnection::connect(url).await.unwrap();
            let rows = sqlx::query(q).fetch_all(&mut c).await.unwrap();
            rows.iter()
                .map(|r| r.try_get::<String, _>(0).unwrap())
                .collect()
        }
        Kind::MariaDb => {
            let mut c = sqlx::MySqlConnection::connect(url).await.unwrap();
            let rows = sqlx::query(q).fetch_all(&mut c).await.unwrap();
            rows.iter()
                .map(|r| {
                    r.try_get::<Option<String>, _>(0)
                        .ok()
                        .flatten()
                        .or_else(|| {
                            r.try_get::<Option<Vec<u8>>, _>(0)
                                .ok()
                                .flatten()
                                .map(|b| String::from_utf8_lossy(&b).into_owned())
                        })
                        .unwrap_or_default()
                })
                .collect()
        }
    }
}

/// Replaces the database name (the URL's last path segment).
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let cut = base.rfind('/').unwrap();
    let q = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{}/{name}{q}", &base[..cut])
}

/// A database of the benchmark's own on the server, dropped by `drop_database`.
struct BenchDb {
    admin: String,
    kind: Kind,
    name: String,
    url: String,
}

impl BenchDb {
    async fn new(admin: &str, kind: Kind, label: &str) -> BenchDb {
        let name = format!("gc_bench_fleet_{label}_{}", std::process::id());
        exec(
            admin,
            kind,
            &[
                format!("DROP DATABASE IF EXISTS {name}"),
                format!("CREATE DATABASE {name}"),
            ],
        )
        .await;
        BenchDb {
            admin: admin.into(),
            kind,
            url: with_database(admin, &name),
            name,
        }
    }

    async fn drop_database(self) {
        exec(
            &self.admin,
            self.kind,
            &[format!("DROP DATABASE IF EXISTS {}", self.name)],
        )
        .await;
    }
}

/// `nodes` nodes of `per_node` rows each in `cached_images`, interleaved (row `i` is
/// node `i % nodes`'s), as a fleet caching over time leaves them; node 0 is the measured
/// one. Its `node_reference` rows go first, so node `k` is `node_url(k)`.
async fn fill(db: &BenchDb, nodes: usize, per_node: usize) {
    let urls: Vec<String> = (0..nodes).map(|k| format!("('{}')", node_url(k))).collect();
    exec(
        &db.url,
        db.kind,
        &[format!(
            "INSERT INTO node_reference (node_reference_url) VALUES {}",
            urls.join(", ")
        )],
    )
    .await;
    let ids = query_text(
        &db.url,
        db.kind,
        "SELECT CAST(node_reference_id AS CHAR(20)) FROM node_reference ORDER BY node_reference_id",
    )
    .await;
    // PostgreSQL's CHAR(20) pads: trimmed.
    let ids: Vec<i64> = ids.iter().map(|s| s.trim().parse().unwrap()).collect();
    assert_eq!(ids.len(), nodes);
    let base = chrono::NaiveDate::from_ymd_opt(2026, 1, 1)
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap();
    const BATCH: usize = 5_000;
    let total = nodes * per_node;
    let mut statements = Vec::new();
    let mut i = 0;
    while i < total {
        let end = (i + BATCH).min(total);
        let values: Vec<String> = (i..end)
            .map(|i| {
                let (node, n) = (i % nodes, i / nodes);
                // Whole seconds, distinct per node: Glance's MySQL DATETIME keeps no fraction.
                let t = (base + chrono::Duration::seconds(n as i64)).format("%Y-%m-%d %H:%M:%S");
                format!(
                    "('{}', '{t}', '{t}', {FILE_BYTES}, 0, NULL, {})",
                    image_id(node, n),
                    ids[node]
                )
            })
            .collect();
        statements.push(format!(
            "INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits, checksum, node_reference_id) VALUES {}",
            values.join(", ")
        ));
        i = end;
    }
    // Statistics, and on PostgreSQL the visibility map autovacuum keeps (without it an
    // index-only count visits every row's page).
    statements.push(match db.kind {
        Kind::Postgres => "VACUUM ANALYZE cached_images".into(),
        Kind::MariaDb => "ANALYZE TABLE cached_images".into(),
    });
    exec(&db.url, db.kind, &statements).await;
}

/// The driver of node `node` on `db`, with a cache directory of its own under `tmp`
/// holding a file for each of its `files` first images.
async fn node_driver(db: &BenchDb, tmp: &Path, node: usize, files: usize) -> Node {
    let layout = CacheLayout::open(tmp.join(format!("cache-{node}"))).unwrap();
    let data = vec![0x42u8; FILE_BYTES];
    for n in 0..files {
        std::fs::write(layout.path(Area::Cached, &image_id(node, n)), &data).unwrap();
    }
    let options = DbOptions {
        create_glance_tables: true,
        ..DbOptions::default()
    };
    let pool = Db::connect(&db.url, &options).await.unwrap();
    let node_db = NodeDb::configure(pool, &node_url(node)).await.unwrap();
    Node {
        driver: CacheDriver::new(layout.clone(), node_db.clone()),
        db: node_db,
        layout,
    }
}

/// One node's driver, with the database and directory it was given (the queue is filled
/// behind the driver's back, in bulk).
#[derive(Clone)]
struct Node {
    driver: CacheDriver,
    db: NodeDb,
    layout: CacheLayout,
}

/// How long one count of node `node`'s rows takes, in ms, on a connection opened before.
async fn timed_count(db: &BenchDb, node: i64, expected: usize) -> f64 {
    let statement = format!("SELECT COUNT(*) FROM cached_images WHERE node_reference_id = {node}");
    macro_rules! run_on {
        ($connection:ty) => {{
            let mut c = <$connection>::connect(&db.url).await.unwrap();
            let started = Instant::now();
            let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(statement))
                .fetch_one(&mut c)
                .await
                .unwrap();
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            assert_eq!(n as usize, expected);
            c.close().await.unwrap();
            ms
        }};
    }
    match db.kind {
        Kind::Postgres => run_on!(sqlx::PgConnection),
        Kind::MariaDb => run_on!(sqlx::MySqlConnection),
    }
}

/// One node's figures: list and count in ms, point operations per second, prune in ms,
/// claims (+ dequeue) per second of this node.
#[derive(Default)]
struct NodeFigures {
    list_ms: Vec<f64>,
    count_ms: Vec<f64>,
    hits_per_s: Vec<f64>,
    read_per_s: Vec<f64>,
    queue_per_s: Vec<f64>,
    adopt_ms: Vec<f64>,
    claim_per_s: Vec<f64>,
    claim_total_per_s: Vec<f64>,
    claim_in_turn_per_s: Vec<f64>,
    claim_in_turn_measured_per_s: Vec<f64>,
    claim_server_cpu_us: Vec<f64>,
    claim_our_cpu_us: Vec<f64>,
    prune_ms: Vec<f64>,
}

/// CPU seconds used so far by this process (every thread: the drivers' and sqlx's, and
/// the kernel's work for them, such as each dequeue's marker unlink) and by the
/// database server's processes (`postgres`, `mariadbd`), from `/proc`: the claims'
/// cost, which does not depend on how many cores share it.
fn cpu_seconds() -> CpuSeconds {
    // `/proc`'s times are in USER_HZ, 100 on every architecture Debian ships but alpha
    // and ia64 (`sysconf(_SC_CLK_TCK)`).
    const USER_HZ: f64 = 100.0;
    let mut used = CpuSeconds::default();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return used;
    };
    let me = std::process::id().to_string();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ...`: the fields after the comm's closing parenthesis.
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let comm = head.split_once(" (").map_or("", |(_, c)| c);
        let fields: Vec<&str> = rest.split(' ').collect();
        // utime and stime are the stat file's fields 14 and 15 (11 and 12 after comm).
        let seconds: f64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<f64>().ok()))
            .sum::<f64>()
            / USER_HZ;
        if pid == me {
            used.ours += seconds;
        } else if comm == "postgres" || comm == "mariadbd" {
            used.server += seconds;
        }
    }
    used
}

#[derive(Default, Clone, Copy)]
struct CpuSeconds {
    ours: f64,
    server: f64,
}

/// Queues `queued` images for each driver (markers and rows, bulk), then has each claim
/// and dequeue its own until none is left, all at once; returns each node's claims per
/// second and all of them per second.
async fn claims(
    db: &BenchDb,
    drivers: &[Node],
    queued: usize,
    round: &str,
    at_once: bool,
) -> (Vec<f64>, f64) {
    let mut statements = Vec::new();
    for (k, d) in drivers.iter().enumerate() {
        let values: Vec<String> = (0..queued)
            .map(|n| {
                let id = ImageId::parse(&format!("c{round}-{k}-{n}")).unwrap();
                std::fs::write(d.layout.path(Area::Queue, &id), b"").unwrap();
                format!(
                    "({}, '{id}', '2026-01-01 00:00:00', 0, '2026-01-01 00:00:00', 'queued')",
                    d.db.node().0
                )
            })
            .collect();
        statements.push(format!(
            "INSERT INTO glance_cached_queue (node_reference_id, image_id, queued_at, attempts, next_attempt_at, state) VALUES {}",
            values.join(", ")
        ));
    }
    // The plan PostgreSQL keeps for the claim's prepared statement follows the queue
    // table's statistics: on a table never analyzed it reads and sorts the node's whole
    // queue for each claim (3.8 ms instead of 0.16 with 10,000 rows, by `EXPLAIN
    // ANALYZE` of the generic plan) until autovacuum's ANALYZE passes, which it did
    // mid-round and at different times in the two databases (the in-turn rates of one
    // round jumped from one node to the next).
    // Analyzed here, every round of both databases claims with the statistics of what it
    // claims. InnoDB recomputes its statistics itself after a tenth of a table changed.
    if db.kind == Kind::Postgres {
        statements.push("VACUUM (ANALYZE) glance_cached_queue".to_owned());
    }
    exec(&db.url, db.kind, &statements).await;
    let claim_all = |k: usize, d: CacheDriver| async move {
        let holder = format!("bench claimer {k}");
        let t = Instant::now();
        let mut n = 0usize;
        while let Some(image) = d
            .claim_next(&holder, chrono::Utc::now(), Duration::from_secs(600))
            .await
            .unwrap()
        {
            d.delete_queued_image(&image.image_id).await.unwrap();
            n += 1;
        }
        assert_eq!(n, queued);
        n as f64 / t.elapsed().as_secs_f64()
    };
    let started = Instant::now();
    let per_node = if at_once {
        let mut tasks = tokio::task::JoinSet::new();
        for (k, d) in drivers.iter().enumerate() {
            tasks.spawn(claim_all(k, d.driver.clone()));
        }
        tasks.join_all().await
    } else {
        let mut per_node = Vec::new();
        for (k, d) in drivers.iter().enumerate() {
            per_node.push(claim_all(k, d.driver.clone()).await);
        }
        per_node
    };
    let all = (drivers.len() * queued) as f64 / started.elapsed().as_secs_f64();
    (per_node, all)
}

/// Every figure for node 0 of `db`, which holds `nodes` nodes of `per_node` rows.
/// `without_index`: our index is dropped once the driver is configured (its migration
/// makes it), to measure what it buys.
async fn measure(db: &BenchDb, s: &Sizes, claimers: usize, without_index: bool) -> NodeFigures {
    let tmp = tempfile::Builder::new()
        .prefix("gc-bench-fleet-")
        .tempdir_in(bench_dir())
        .unwrap();
    let node = node_driver(db, tmp.path(), 0, s.per_node).await;
    let driver = node.driver.clone();
    if without_index {
        // InnoDB dropped the foreign key's own index on node_reference_id when ours came
        // (ours serves the key) and refuses to drop ours without it: Glance's table as it was.
        let statements: &[&str] = match db.kind {
            Kind::Postgres => &["DROP INDEX ix_glance_cached_images_node_lru"],
            Kind::MariaDb => &[
                "CREATE INDEX node_reference_id ON cached_images (node_reference_id)",
                "DROP INDEX ix_glance_cached_images_node_lru ON cached_images",
                "ANALYZE TABLE cached_images",
            ],
        };
        let statements: Vec<String> = statements.iter().map(|s| s.to_string()).collect();
        exec(&db.url, db.kind, &statements).await;
    }
    let mut f = NodeFigures::default();
    for round in 0..rounds() {
        let pick = |i: usize| image_id(0, (i * 7919 + round) % s.per_node);
        let started = Instant::now();
        let listed = driver.get_cached_images().await.unwrap();
        f.list_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(listed.len(), s.per_node);
        f.count_ms
            .push(timed_count(db, node.db.node().0, s.per_node).await);
        f.hits_per_s.push(
            ops_per_second(s.ops, |i| {
                let d = driver.clone();
                async move {
                    std::hint::black_box(d.get_hit_count(&pick(i)).await.unwrap());
                }
            })
            .await,
        );
        f.read_per_s.push(
            ops_per_second(s.ops, |i| {
                let d = driver.clone();
                async move {
                    drop(d.open_for_read(&pick(i)).await.unwrap());
                }
            })
            .await,
        );
        f.queue_per_s.push(
            ops_per_second(s.ops, |i| {
                let d = driver.clone();
                async move {
                    let id = ImageId::parse(&format!("q{round}-{i}")).unwrap();
                    assert!(d.queue_image(&id).await.unwrap());
                }
            })
            .await,
        );
        // The rows of those markers, in the shared database: the queue loop's pass.
        let started = Instant::now();
        assert_eq!(driver.adopt_queue_markers().await.unwrap(), s.ops as u64);
        f.adopt_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        driver.delete_all_queued_images().await.unwrap();
    }
    // Claims: node 0 and the next nodes, at once.
    let mut drivers = vec![node.clone()];
    for k in 1..claimers {
        drivers.push(node_driver(db, tmp.path(), k, 0).await);
    }
    for round in 0..rounds() {
        let before = cpu_seconds();
        let (per_node, all) = claims(db, &drivers, s.queued, &round.to_string(), true).await;
        let (after, claimed) = (cpu_seconds(), (drivers.len() * s.queued) as f64);
        f.claim_server_cpu_us
            .push((after.server - before.server) / claimed * 1e6);
        f.claim_our_cpu_us
            .push((after.ours - before.ours) / claimed * 1e6);
        f.claim_per_s.push(median(per_node));
        f.claim_total_per_s.push(all);
        // The same nodes one after another: each claims with the fleet's queues and
        // rows in the tables, without nine other claimers on the same cores.
        let (per_node, _) = claims(db, &drivers, s.queued, &format!("t{round}"), false).await;
        eprintln!("claims in turn, per node: {per_node:.0?}");
        f.claim_in_turn_measured_per_s.push(per_node[0]);
        f.claim_in_turn_per_s.push(median(per_node));
    }
    for d in &drivers[1..] {
        d.db.db().close().await;
    }
    // The LRU prune of half the node's images: once, as it removes what it measures.
    let started = Instant::now();
    let report = driver
        .prune(PrunePolicy {
            max_size: (s.per_node * FILE_BYTES) as u64 / 2,
            ..Default::default()
        })
        .await
        .unwrap();
    f.prune_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    assert_eq!(report.files(), s.per_node / 2);
    node.db.db().close().await;
    f
}

struct Report {
    rows: Vec<String>,
    json: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    /// One figure beside its baseline: `lower_is_better` for times, else rates. The ratio
    /// is always "how many times worse in the fleet" (1.0 = same, 2.0 = the limit).
    fn add(
        &mut self,
        key: &str,
        label: &str,
        unit: &str,
        (alone, fleet): (f64, f64),
        lower_is_better: bool,
        target: &str,
    ) {
        let ratio = if lower_is_better {
            fleet / alone
        } else {
            alone / fleet
        };
        self.rows.push(format!(
            "| {label} | {alone:.1} {unit} | {fleet:.1} {unit} | {ratio:.2} | {target} |"
        ));
        self.json.insert(
            key.into(),
            serde_json::json!({"alone": alone, "fleet": fleet, "fleet_over_alone": ratio}),
        );
    }
}

/// The schema (ours included) before the fill, as a node's first start makes it.
async fn migrate(db: &BenchDb) {
    let options = DbOptions {
        create_glance_tables: true,
        ..DbOptions::default()
    };
    let pool = Db::connect(&db.url, &options).await.unwrap();
    pool.migrate().await.unwrap();
    pool.close().await;
}

async fn backend(report: &mut Report, name: &str, kind: Kind, admin: &str, s: &Sizes) {
    let alone_db = BenchDb::new(admin, kind, "alone").await;
    let fleet_db = BenchDb::new(admin, kind, "shared").await;
    for db in [&alone_db, &fleet_db] {
        migrate(db).await;
    }
    let started = Instant::now();
    fill(&alone_db, 1, s.per_node).await;
    fill(&fleet_db, s.nodes, s.per_node).await;
    eprintln!(
        "{name}: filled {} + {} rows in {:.1} s",
        s.per_node,
        s.nodes * s.per_node,
        started.elapsed().as_secs_f64()
    );
    let select = "SELECT id, image_id, last_accessed, last_modified, size, hits, checksum FROM cached_images";
    for (what, query) in [
        (
            "LRU batch",
            format!("{select} WHERE node_reference_id = 1 ORDER BY last_accessed, id LIMIT 4096"),
        ),
        (
            "listing",
            format!("{select} WHERE node_reference_id = 1 ORDER BY image_id"),
        ),
        (
            "count",
            "SELECT COUNT(*) FROM cached_images WHERE node_reference_id = 1".to_string(),
        ),
    ] {
        let explain = match kind {
            Kind::Postgres => "EXPLAIN (ANALYZE, BUFFERS)",
            Kind::MariaDb => "ANALYZE FORMAT=JSON",
        };
        let plan = query_text(&fleet_db.url, kind, &format!("{explain} {query}")).await;
        eprintln!(
            "{name}: plan of the {what} in the shared database:\n{}",
            plan.join("\n")
        );
    }
    let sizes = match kind {
        Kind::Postgres => {
            "SELECT pg_size_pretty(pg_table_size('cached_images')) || ' table, ' \
             || pg_size_pretty(pg_indexes_size('cached_images')) || ' indexes; shared_buffers ' \
             || current_setting('shared_buffers')"
        }
        Kind::MariaDb => {
            "SELECT CONCAT(ROUND(data_length / 1048576), ' MiB table, ', \
             ROUND(index_length / 1048576), ' MiB indexes; buffer pool ', \
             ROUND(@@innodb_buffer_pool_size / 1048576), ' MiB') FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name = 'cached_images'"
        }
    };
    let sizes = query_text(&fleet_db.url, kind, sizes).await.join("");
    eprintln!("{name}: shared database: {sizes}");
    report
        .json
        .insert(format!("{name}_sizes"), serde_json::json!(sizes));
    settle(&alone_db.url, kind).await;
    let alone = measure(&alone_db, s, 1, false).await;
    settle(&fleet_db.url, kind).await;
    let fleet = measure(&fleet_db, s, s.claimers, false).await;
    let k = format!("{}x{}k", s.nodes, s.per_node / 1000);
    let within = "fleet within 2x";
    let m = |v: &Vec<f64>| median(v.clone());
    report.add(
        &format!("{name}_{k}_list_ms"),
        &format!("{name}: get_cached_images ({} rows)", s.per_node),
        "ms",
        (m(&alone.list_ms), m(&fleet.list_ms)),
        true,
        within,
    );
    report.add(
        &format!("{name}_{k}_count_ms"),
        &format!("{name}: size (count_cached_images)"),
        "ms",
        (m(&alone.count_ms), m(&fleet.count_ms)),
        true,
        within,
    );
    report.add(
        &format!("{name}_{k}_get_hit_count_per_s"),
        &format!("{name}: get_hit_count"),
        "/s",
        (m(&alone.hits_per_s), m(&fleet.hits_per_s)),
        false,
        within,
    );
    report.add(
        &format!("{name}_{k}_open_for_read_per_s"),
        &format!("{name}: open_for_read + hit"),
        "/s",
        (m(&alone.read_per_s), m(&fleet.read_per_s)),
        false,
        within,
    );
    report.add(
        &format!("{name}_{k}_queue_image_per_s"),
        &format!(
            "{name}: queue_image (the marker alone: no database work, its row is the adoption's)"
        ),
        "/s",
        (m(&alone.queue_per_s), m(&fleet.queue_per_s)),
        false,
        "",
    );
    report.add(
        &format!("{name}_{k}_queue_adopt_ms"),
        &format!(
            "{name}: the queue loop's adoption of {} new markers (their rows)",
            s.ops
        ),
        "ms",
        (m(&alone.adopt_ms), m(&fleet.adopt_ms)),
        true,
        within,
    );
    report.add(
        &format!("{name}_{k}_claim_per_node_per_s"),
        &format!(
            "{name}: claim + dequeue per node (alone: 1 node; fleet: {} nodes at once)",
            s.claimers
        ),
        "/s",
        (m(&alone.claim_per_s), m(&fleet.claim_per_s)),
        false,
        within,
    );
    report.add(
        &format!("{name}_{k}_claim_all_per_s"),
        &format!("{name}: claim + dequeue, all claiming nodes together"),
        "/s",
        (m(&alone.claim_total_per_s), m(&fleet.claim_total_per_s)),
        false,
        "",
    );
    report.add(
        &format!("{name}_{k}_claim_in_turn_per_node_per_s"),
        &format!(
            "{name}: claim + dequeue per node, the nodes in turn (fleet: {} nodes one after another)",
            s.claimers
        ),
        "/s",
        (m(&alone.claim_in_turn_per_s), m(&fleet.claim_in_turn_per_s)),
        false,
        within,
    );
    report.add(
        &format!("{name}_{k}_claim_in_turn_measured_node_per_s"),
        &format!("{name}: claim + dequeue of the measured node, the nodes in turn"),
        "/s",
        (
            m(&alone.claim_in_turn_measured_per_s),
            m(&fleet.claim_in_turn_measured_per_s),
        ),
        false,
        within,
    );
    report.add(
        &format!("{name}_{k}_claim_server_cpu_us"),
        &format!(
            "{name}: the server's CPU per claim + dequeue (fleet: {} nodes at once)",
            s.claimers
        ),
        "us",
        (m(&alone.claim_server_cpu_us), m(&fleet.claim_server_cpu_us)),
        true,
        within,
    );
    report.add(
        &format!("{name}_{k}_claim_our_cpu_us"),
        &format!(
            "{name}: glance-cached's CPU per claim + dequeue, its marker's unlink in the kernel included (fleet: {} nodes at once)",
            s.claimers
        ),
        "us",
        (m(&alone.claim_our_cpu_us), m(&fleet.claim_our_cpu_us)),
        true,
        "",
    );
    report.add(
        &format!("{name}_{k}_prune_half_ms"),
        &format!(
            "{name}: LRU prune of half the node ({} images)",
            s.per_node / 2
        ),
        "ms",
        (m(&alone.prune_ms), m(&fleet.prune_ms)),
        true,
        "fleet within 2x, < 2000 ms",
    );
    fleet_db.drop_database().await;
    // The same fleet without our index: what it buys. The point operations go through
    // Glance's unique (image_id, node_reference_id) either way.
    let bare_db = BenchDb::new(admin, kind, "bare").await;
    migrate(&bare_db).await;
    fill(&bare_db, s.nodes, s.per_node).await;
    settle(&bare_db.url, kind).await;
    let bare = measure(&bare_db, s, 1, true).await;
    let without = "(without our index)";
    report.add(
        &format!("{name}_{k}_list_ms_without_index"),
        &format!("{name}: get_cached_images {without}"),
        "ms",
        (m(&alone.list_ms), m(&bare.list_ms)),
        true,
        "",
    );
    report.add(
        &format!("{name}_{k}_count_ms_without_index"),
        &format!("{name}: size (count_cached_images) {without}"),
        "ms",
        (m(&alone.count_ms), m(&bare.count_ms)),
        true,
        "",
    );
    report.add(
        &format!("{name}_{k}_prune_half_ms_without_index"),
        &format!("{name}: LRU prune of half the node {without}"),
        "ms",
        (m(&alone.prune_ms), m(&bare.prune_ms)),
        true,
        "",
    );
    bare_db.drop_database().await;
    alone_db.drop_database().await;
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = sizes();
    let mut report = Report {
        rows: vec![],
        json: serde_json::Map::new(),
    };
    runtime.block_on(async {
        for (name, kind, var) in [
            (
                "postgresql",
                Kind::Postgres,
                "GLANCE_CACHED_TEST_POSTGRES_URL",
            ),
            ("mariadb", Kind::MariaDb, "GLANCE_CACHED_TEST_MYSQL_URL"),
        ] {
            match std::env::var(var) {
                Ok(url) if !url.is_empty() => backend(&mut report, name, kind, &url, &s).await,
                _ => eprintln!("{name}: {var} not set, skipped (scripts/bench sets it)"),
            }
        }
    });
    report.json.insert(
        "date".into(),
        serde_json::json!(chrono::Utc::now().format("%Y-%m-%d").to_string()),
    );
    report.json.insert(
        "rows".into(),
        serde_json::json!({"nodes": s.nodes, "per_node": s.per_node}),
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("fleet.json"),
        serde_json::to_string_pretty(&report.json).unwrap(),
    )
    .unwrap();
    println!(
        "{} nodes x {} rows; one node measured, alone in a database vs among them\n",
        s.nodes, s.per_node
    );
    println!("| figure | alone | fleet | fleet / alone (worse) | target |\n|---|---|---|---|---|");
    for row in report.rows {
        println!("{row}");
    }
}
