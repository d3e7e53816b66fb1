//! Hostile input planted while the daemon or a command runs (issue 20): extreme mtimes,
//! rows the driver cannot read, malformed checksums, environment values, paths, secrets
//! and upstreams that never end.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, SystemTime};

use chrono::{TimeZone, Utc};
use filetime::FileTime;
use glance_cached::cache::{CleanPolicy, Expectations, PrunePolicy};
use glance_cached::db::DbTime;

use crate::kit::servers::{Backend, TestCache, run_sql};
use crate::kit::{cli, id};

use crate::kit::daemon::{SOON, Setup};

/// Seconds since the epoch that tmpfs and btrfs accept and chrono cannot represent as a
/// `DateTime` (about 317,000 years ahead), and one far before the epoch.
const FAR_FUTURE: i64 = 10_000_000_000_000;
const FAR_PAST: i64 = -1_000_000_000_000;

/// Puts a file with `mtime` at `path` in one step (a rename), so the daemon never sees it
/// with another mtime.
fn plant(path: &Path, data: &[u8], mtime: i64) {
    // Staged beside the cache directory (same filesystem, outside every watched area).
    let name = path.file_name().unwrap().to_string_lossy();
    let staged = path
        .ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "cache"))
        .and_then(Path::parent)
        .unwrap_or(path.parent().unwrap())
        .join(format!(".staged-{name}"));
    std::fs::write(&staged, data).unwrap();
    filetime::set_file_mtime(&staged, FileTime::from_unix_time(mtime, 0)).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `Setup` on tmpfs (`/dev/shm`), which stores any mtime; ext4 clamps them to 2446.
fn setup_on_tmpfs(extra: &str) -> Setup {
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    let config = tmp.path().join("glance-cached.toml");
    let s = Setup { tmp, config };
    s.write_config(extra);
    let probe = s.tmp.path().join("probe");
    plant(&probe, b"", FAR_FUTURE);
    assert_eq!(
        FileTime::from_last_modification_time(&std::fs::metadata(&probe).unwrap()).unix_seconds(),
        FAR_FUTURE,
        "/dev/shm must keep far mtimes"
    );
    s
}

#[test]
fn extreme_mtimes_planted_while_running_crash_neither_the_daemon_nor_a_command() {
    let s = setup_on_tmpfs("max_size = 3000");
    let mut d = s.start();
    // The queue loop adopts the marker (its mtime is the queued time), the pruner the
    // cached file (over max_size, it adopts files without rows, aged by mtime), the
    // cleaner schedules the incomplete file (due 10^13 s from now) and the invalid one.
    plant(&s.cache("queue/far-marker"), b"", FAR_FUTURE);
    plant(&s.cache("far-cached"), &[7; 4000], FAR_FUTURE);
    plant(
        &s.cache("incomplete/far-incomplete"),
        b"partial",
        FAR_FUTURE,
    );
    plant(&s.cache("invalid/far-invalid"), b"bad", FAR_PAST);
    // The latest mtime there is: mtime + stall_time overflows `SystemTime`.
    plant(&s.cache("incomplete/last-incomplete"), b"partial", i64::MAX);
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let log = d.log_text();
        if log.contains("queue marker's mtime is out of range")
            && log.contains("cached file's mtime is out of range")
        {
            break;
        }
        assert!(d.alive(), "the daemon died; log:\n{log}");
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not adopt the marker and the file; log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.alive(), "the daemon died; log:\n{}", d.log_text());
    assert!(
        !s.cache("invalid/far-invalid").exists(),
        "an old invalid file stays"
    );

    // The same while a command runs: each finds fresh ones of its own.
    plant(&s.cache("queue/far-marker-2"), b"", FAR_FUTURE);
    let queued = ok(&s.cli(&["list-queued", "--json"]), "list-queued");
    assert!(queued.contains("far-marker-2"), "{queued}");
    assert!(queued.contains("9999-12-31"), "{queued}");
    plant(&s.cache("far-cached-2"), b"x", FAR_PAST);
    plant(
        &s.cache("incomplete/far-incomplete-2"),
        b"partial",
        i64::MAX,
    );
    ok(&s.cli(&["reconcile"]), "reconcile");
    plant(
        &s.cache("incomplete/far-incomplete-3"),
        b"partial",
        i64::MAX,
    );
    ok(&s.cli(&["clean"]), "clean");
    let cached = ok(&s.cli(&["list-cached", "--json"]), "list-cached");
    assert!(cached.contains("1000-01-01"), "{cached}");
    assert!(d.alive(), "the daemon died; log:\n{}", d.log_text());
    // Not stalled: an mtime ahead of now never comes due.
    assert!(s.cache("incomplete/far-incomplete").exists());
    d.stop();
}

crate::kit::servers::on_every_backend!(
    unreadable_rows_are_skipped_and_pruned_first,
    an_unreadable_queue_row_does_not_hold_up_the_queue,
);

/// A statement that makes `image`'s `last_accessed` unreadable for this backend: text
/// that is no time on SQLite, `infinity` on PostgreSQL, a zero date on MariaDB.
fn unreadable_time(b: Backend, table: &str, column: &str, image: &str) -> String {
    let value = match b {
        Backend::Sqlite => "'yesterday'",
        Backend::Postgres => "'infinity'",
        Backend::MySql => "'0000-00-00 00:00:00'",
    };
    let update = format!("UPDATE {table} SET {column} = {value} WHERE image_id = '{image}'");
    match b {
        Backend::MySql => format!("SET STATEMENT sql_mode = '' FOR {update}"),
        _ => update,
    }
}

async fn unreadable_rows_are_skipped_and_pruned_first(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    for (n, image) in ["good-old", "good-new", "many-hits", "bad-time"]
        .into_iter()
        .enumerate()
    {
        let mut w = t
            .driver
            .open_for_write(&id(image), Expectations::default())
            .await
            .unwrap();
        w.write(&[n as u8; 1000]).unwrap();
        t.driver.publish(w).await.unwrap();
        // Accessed in this order: bad-time is the most recently used by its last time.
        let when = DbTime::from_utc(Utc.timestamp_opt(1_000_000 * (n as i64 + 1), 0).unwrap());
        assert!(t.node_db.record_hit(image, when).await.unwrap());
    }
    let planted = unreadable_time(b, "cached_images", "last_accessed", "bad-time");
    run_sql(&t.db.url, b, &planted).await.unwrap();
    // And in the queue: the other queued image still lists.
    for image in ["queued-good", "queued-bad"] {
        assert!(t.driver.queue_image(&id(image)).await.unwrap());
    }
    assert_eq!(t.driver.adopt_queue_markers().await.unwrap(), 2);
    let planted = unreadable_time(b, "glance_cached_queue", "queued_at", "queued-bad");
    run_sql(&t.db.url, b, &planted).await.unwrap();
    let queued: Vec<String> = t
        .driver
        .get_queued_images()
        .await
        .unwrap()
        .into_iter()
        .map(|q| q.image_id.to_string())
        .collect();
    assert_eq!(queued, ["queued-good"]);
    // Only SQLite's INTEGER holds more than 32 bits (Glance's hits + 1 never stops).
    if b == Backend::Sqlite {
        let q = "UPDATE cached_images SET hits = 3000000000 WHERE image_id = 'many-hits'";
        run_sql(&t.db.url, b, q).await.unwrap();
    }

    let listed: Vec<String> = t
        .driver
        .get_cached_images()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.image_id.to_string())
        .collect();
    assert_eq!(listed, ["good-new", "good-old", "many-hits"]);
    if b == Backend::Sqlite {
        assert_eq!(
            t.driver.get_hit_count(&id("many-hits")).await.unwrap(),
            3_000_000_000
        );
    }
    let policy = CleanPolicy {
        stall_time: Duration::from_secs(3600),
        invalid_grace: Duration::ZERO,
    };
    let report = t
        .driver
        .reconcile(policy, SystemTime::now(), false)
        .await
        .unwrap();
    assert!(
        report.adopted.is_empty()
            && report.removed_rows.is_empty()
            && report.resized.is_empty()
            && report.cleaned.files() == 0,
        "{report:?}"
    );
    // The pruner's paged search finds it on any page: one row per page here.
    let (mut after, mut readable, mut unreadable) = (i64::MIN, vec![], vec![]);
    loop {
        let (page, next) = t.node_db.rows_by_id(after, 1).await.unwrap();
        readable.extend(page.rows.into_iter().map(|r| r.image_id.to_string()));
        unreadable.extend(page.unreadable.into_iter().map(|u| u.image_id));
        match next {
            Some(id) => after = id,
            None => break,
        }
    }
    readable.sort();
    assert_eq!(readable, ["good-new", "good-old", "many-hits"]);
    assert_eq!(unreadable, [Some(id("bad-time"))]);
    // Over max_size by one image: the unreadable row goes first, as the oldest.
    let report = t
        .driver
        .prune(PrunePolicy {
            max_size: 3000,
            ..Default::default()
        })
        .await
        .unwrap();
    let pruned: Vec<String> = report.pruned.iter().map(|(i, _)| i.to_string()).collect();
    assert_eq!(pruned, ["bad-time"]);
    let rows = t.node_db.cached_images_and_unreadable().await.unwrap();
    assert_eq!(
        rows.rows.len() + rows.unreadable.len() + rows.invalid_ids.len(),
        3
    );
    t.finish().await;
}

/// `list-queued --json` rows by image id.
fn queue_rows(s: &Setup) -> std::collections::HashMap<String, serde_json::Value> {
    let text = ok(&s.cli(&["list-queued", "--json"]), "list-queued");
    let rows: serde_json::Value = serde_json::from_str(&text).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| (r["image_id"].as_str().unwrap().to_owned(), r.clone()))
        .collect()
}

/// Queues `ids`, runs `prefetch` to the end, and returns each id's reason for failing;
/// none of them may be cached.
fn prefetch_all_fail(s: &Setup, ids: &[&str]) -> std::collections::HashMap<String, String> {
    let mut args = vec!["queue"];
    args.extend_from_slice(ids);
    ok(&s.cli(&args), "queue");
    // Exits 1, naming the failures; what matters is what it recorded.
    let out = s.cli(&["prefetch"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = queue_rows(s);
    let cached = ok(&s.cli(&["list-cached", "--json"]), "list-cached");
    ids.iter()
        .map(|id| {
            assert!(!s.cache(id).exists(), "{id} was cached");
            assert!(
                !cached.contains(&format!("\"{id}\"")),
                "{id} has a row: {cached}"
            );
            let row = &rows[*id];
            assert_eq!(row["state"], "failed", "{id}: {row}");
            (
                id.to_string(),
                row["last_error"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn malformed_checksums_fail_verification_instead_of_turning_it_off() {
    use crate::kit::origin::{Behaviour, Origin};
    use crate::kit::test_bytes;
    let origin = Origin::start();
    let data = test_bytes(5000, 9);
    let cases: [(&str, Behaviour); 5] = [
        (
            "short-md5",
            Behaviour {
                md5_text: Some("abc".into()),
                ..Default::default()
            },
        ),
        (
            "nonhex-md5",
            Behaviour {
                md5_text: Some("z".repeat(32)),
                ..Default::default()
            },
        ),
        (
            "empty-md5",
            Behaviour {
                md5_text: Some(String::new()),
                ..Default::default()
            },
        ),
        (
            "long-sha512",
            Behaviour {
                sha512_text: Some("a".repeat(130)),
                ..Default::default()
            },
        ),
        (
            "nonhex-sha512",
            Behaviour {
                sha512_text: Some("x".repeat(128)),
                ..Default::default()
            },
        ),
    ];
    for (id, b) in &cases {
        origin.add(id, data.clone(), b.clone());
    }
    let prefetcher = "[prefetcher]\nmax_attempts = 1\n";
    let s = Setup::new(&format!(
        "{prefetcher}[upstream]\nkind = \"glance\"\nurl = \"{}\"\n",
        origin.url()
    ));
    let ids: Vec<&str> = cases.iter().map(|(id, _)| *id).collect();
    let reasons = prefetch_all_fail(&s, &ids);
    for (id, expected) in [
        ("short-md5", "checksum \"abc\" is not 32 hex digits"),
        ("nonhex-md5", "is not 32 hex digits"),
        ("empty-md5", "checksum \"\" is not 32 hex digits"),
        ("long-sha512", "os_hash_value"),
        ("nonhex-sha512", "is not 128 hex digits"),
    ] {
        assert!(reasons[id].contains(expected), "{id}: {}", reasons[id]);
    }

    // A plain HTTP origin: a configured header missing, or malformed.
    let plain = |id: &str, b: Behaviour| origin.add(id, data.clone(), b);
    plain(
        "no-headers",
        Behaviour {
            no_checksum_headers: true,
            ..Default::default()
        },
    );
    plain(
        "bad-header",
        Behaviour {
            md5_text: Some("0x12".into()),
            ..Default::default()
        },
    );
    let s = Setup::new(&format!(
        "{prefetcher}[upstream]\nkind = \"http\"\nurl_template = \"{}/plain/{{image_id}}\"\nmd5_header = \"X-Checksum-Md5\"\nsha512_header = \"X-Checksum-Sha512\"\n",
        origin.url()
    ));
    let reasons = prefetch_all_fail(&s, &["no-headers", "bad-header"]);
    assert!(
        reasons["no-headers"].contains("no X-Checksum-Md5 header"),
        "{}",
        reasons["no-headers"]
    );
    assert!(
        reasons["bad-header"].contains("header X-Checksum-Md5 \"0x12\" is not 32 hex digits"),
        "{}",
        reasons["bad-header"]
    );
}

#[test]
fn the_environment_gives_string_keys_their_text_as_written() {
    use crate::kit::origin::{Behaviour, Origin};
    use crate::kit::test_bytes;
    let origin = Origin::start();
    origin.require_keystone(3600);
    origin.add("env-img", test_bytes(3000, 4), Behaviour::default());
    let s = Setup::new("");
    let env = [
        ("GLANCE_CACHED_NODE__REFERENCE_URL", "0123"),
        ("GLANCE_CACHED_UPSTREAM__KIND", "glance"),
        ("GLANCE_CACHED_UPSTREAM__URL", &origin.url()),
        (
            "GLANCE_CACHED_UPSTREAM__KEYSTONE__AUTH_URL",
            &format!("{}/v3", origin.url()),
        ),
        ("GLANCE_CACHED_UPSTREAM__KEYSTONE__USERNAME", "true"),
        ("GLANCE_CACHED_UPSTREAM__KEYSTONE__PASSWORD", "+05"),
        ("GLANCE_CACHED_UPSTREAM__KEYSTONE__PROJECT_NAME", "\"svc\""),
        (
            "GLANCE_CACHED_UPSTREAM__KEYSTONE__USER_DOMAIN_NAME",
            " [spaced] ",
        ),
        // Numbers, sizes and booleans are still parsed from their text.
        ("GLANCE_CACHED_CACHE__MAX_SIZE", "1000000"),
        ("GLANCE_CACHED_PREFETCHER__CONCURRENCY", "3"),
        ("GLANCE_CACHED_DATABASE__CREATE_GLANCE_TABLES", "true"),
    ];
    let shown = ok(
        &cli::run(&s.config, &["check-config"], &env),
        "check-config",
    );
    for line in [
        "reference_url = \"0123\"",
        "username = \"true\"",
        "project_name = \"\\\"svc\\\"\"",
        "user_domain_name = \" [spaced] \"",
        "max_size = \"1000000\"",
        "concurrency = 3",
    ] {
        assert!(shown.contains(line), "{line} in:\n{shown}");
    }
    // The password reaches Keystone as written.
    ok(&cli::run(&s.config, &["queue", "env-img"], &env), "queue");
    ok(&cli::run(&s.config, &["prefetch"], &env), "prefetch");
    let requests = origin.with_stats(|st| st.keystone_requests.clone());
    let body: serde_json::Value = serde_json::from_str(&requests[0]).unwrap();
    let user = &body["auth"]["identity"]["password"]["user"];
    assert_eq!(user["password"], "+05", "{body}");
    assert_eq!(user["name"], "true", "{body}");
    assert_eq!(
        body["auth"]["scope"]["project"]["name"], "\"svc\"",
        "{body}"
    );
}

#[test]
fn relative_token_and_ca_files_are_relative_to_the_config_file() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let etc = tmp.path().join("etc");
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let token = etc.join("token");
    std::fs::write(&token, "secret-token\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(etc.join("ca.pem"), ca.cert.pem()).unwrap();
    let config = etc.join("glance-cached.toml");
    std::fs::write(
        &config,
        "[cache]\ndir = \"cache\"\n[upstream]\nkind = \"glance\"\nurl = \"http://127.0.0.1:9\"\ntoken_file = \"token\"\nca_file = \"ca.pem\"\n",
    )
    .unwrap();
    let check = |dir: &Path| {
        cli::command()
            .current_dir(dir)
            .arg("--config")
            .arg(&config)
            .arg("check-config")
            .output()
            .unwrap()
    };
    // Run from another directory (systemd runs us in /): the file's neighbours count.
    let shown = ok(&check(&elsewhere), "check-config");
    for line in [
        format!("dir = {:?}", etc.join("cache").display().to_string()),
        format!("token_file = {:?}", token.display().to_string()),
        format!("ca_file = {:?}", etc.join("ca.pem").display().to_string()),
    ] {
        assert!(shown.contains(&line), "{line} in:\n{shown}");
    }
    // A token that others can read, or that anyone but its owner can replace, is refused.
    for mode in [0o604, 0o620, 0o602, 0o660] {
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = check(&elsewhere);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "mode {mode:o}: {stderr}");
        assert!(
            stderr.contains("upstream.token_file"),
            "mode {mode:o}: {stderr}"
        );
    }
}

#[tokio::test]
async fn a_cache_dir_with_url_characters_opens_its_own_database() {
    let tmp = tempfile::tempdir().unwrap();
    // Made into a URL, "%41" decodes to "A" and "?" starts the options.
    for name in ["c%41", "c?mode=ro", "c#frag"] {
        let dir = tmp.path().join(name);
        let config = tmp.path().join(format!("{}.toml", name.len()));
        std::fs::write(
            &config,
            format!("[cache]\ndir = {:?}\n", dir.display().to_string()),
        )
        .unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        // Glance's old driver's database, for migrate-sqlite to read from the same place.
        let pool = crate::kit::legacy_cache_db(&dir.join("cache.db")).await;
        sqlx::query("INSERT INTO cached_images VALUES ('old-a', 1.0, 1.0, 12, 3, NULL)")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        let run = |args: &[&str]| cli::run(&config, args, &[]);
        let migrated = ok(
            &run(&["migrate-sqlite"]),
            &format!("{name}: migrate-sqlite"),
        );
        assert!(
            migrated.starts_with("migrated 1 rows"),
            "{name}: {migrated}"
        );
        let listed = ok(
            &run(&["list-cached", "--json"]),
            &format!("{name}: list-cached"),
        );
        assert!(listed.contains("old-a"), "{name}: {listed}");
        assert!(
            dir.join(".glance-cached/glance-cached.db").is_file(),
            "{name}: no database in its dir"
        );
    }
    let mut entries: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".toml"))
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        ["c#frag", "c%41", "c?mode=ro"],
        "nothing opened elsewhere"
    );
}

/// One distinct secret per secret-bearing key; none may appear in any output.
const SECRETS: [&str; 7] = [
    "pw-db-userinfo-91",
    "pw-db-query-92",
    "slash-93",
    "pw-upstream-94",
    "tok-file-95",
    "pw-ksurl-96",
    "pw-keystone-97",
];

fn assert_no_secret(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{what} shows {secret}:\n{text}");
    }
}

fn all_output(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn no_secret_shows_in_any_output() {
    use crate::kit::daemon::Daemon;
    use crate::kit::origin::{Behaviour, Origin};
    use crate::kit::test_bytes;
    let origin = Origin::start();
    let data = test_bytes(4000, 5);
    origin.add("present-img", data.clone(), Behaviour::default());
    origin.add(
        "cut-img",
        data.clone(),
        Behaviour {
            truncate_at: Some(100),
            ..Default::default()
        },
    );
    let trace = [("GLANCE_CACHED_LOG__LEVEL", "trace"), ("RUST_LOG", "trace")];

    // Database URLs: a password in the userinfo and in the query, one with a raw `/`.
    // Nothing listens on port 1: each run fails at connect, and says so.
    let s = Setup::new("");
    for url in [
        "postgres://glance:pw-db-userinfo-91@127.0.0.1:1/glance?password=pw-db-query-92",
        "postgres://glance:pw-db/slash-93@127.0.0.1:1/glance",
        "mysql://glance:pw-db-userinfo-91@127.0.0.1:1/glance?password=pw-db-query-92",
    ] {
        let env = [
            ("GLANCE_CACHED_DATABASE__URL", url),
            ("GLANCE_CACHED_NODE__REFERENCE_URL", "http://node:9292"),
            trace[0],
            trace[1],
        ];
        let checked = cli::run(&s.config, &["check-config"], &env);
        assert!(checked.status.success(), "{}", all_output(&checked));
        assert_no_secret("check-config", &all_output(&checked));
        let mut d = Daemon::spawn(s.tmp.path(), &s.config, &[], &env);
        assert!(!d.wait_exit(SOON).success());
        assert!(d.log_text().contains("error"), "{}", d.log_text());
        assert_no_secret("run", &d.log_text());
        let listed = cli::run(&s.config, &["list-queued"], &env);
        assert_no_secret("list-queued", &all_output(&listed));
    }

    // Glance with user:password@ in its URL and a token file; a daemon at trace level.
    origin.require_token("tok-file-95");
    let token = s.tmp.path().join("token");
    std::fs::write(&token, "tok-file-95\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let upstream = origin
        .url()
        .replace("http://", "http://glance:pw-upstream-94@");
    let s = Setup::new(&format!(
        "[prefetcher]\nmax_attempts = 1\n[upstream]\nkind = \"glance\"\nurl = \"{upstream}\"\ntoken_file = {:?}\n",
        token.display().to_string()
    ));
    let checked = cli::run(&s.config, &["check-config"], &trace);
    assert!(
        all_output(&checked).contains("glance:***@"),
        "{}",
        all_output(&checked)
    );
    assert_no_secret("check-config", &all_output(&checked));
    let mut d = Daemon::spawn(s.tmp.path(), &s.config, &[], &trace);
    d.notify.wait_for(0, SOON, |m| m.contains("READY=1"));
    ok(
        &s.cli(&["queue", "present-img", "missing-img", "cut-img"]),
        "queue",
    );
    let deadline = std::time::Instant::now() + SOON;
    let rows = loop {
        let rows = queue_rows(&s);
        let failed = |id: &str| rows.get(id).is_some_and(|r| r["last_error"].is_string());
        if failed("missing-img") && failed("cut-img") && s.cache("present-img").exists() {
            break rows;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{rows:?}\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let missing = rows["missing-img"]["last_error"].as_str().unwrap();
    // The request is named by the URL it went to, which carries no credentials
    // (reqwest sends them as an Authorization header).
    assert!(
        missing.contains("/v2/images/missing-img") && !missing.contains("pw-upstream-94"),
        "{missing}"
    );
    for args in [
        &["list-queued"][..],
        &["list-queued", "--json"],
        &["list-cached"],
    ] {
        assert_no_secret("a listing", &all_output(&cli::run(&s.config, args, &trace)));
    }
    let log = d.log.clone();
    d.stop();
    assert_no_secret("run", &std::fs::read_to_string(log).unwrap());
    // What other nodes read: the database itself.
    let db = std::fs::read(s.cache(".glance-cached/glance-cached.db")).unwrap();
    assert_no_secret("the database", &String::from_utf8_lossy(&db));

    // Keystone with a password, and user:password@ in its URL; the prefetch command.
    let origin = Origin::start();
    origin.add("present-img", data.clone(), Behaviour::default());
    let s = Setup::new(&format!(
        "[prefetcher]\nmax_attempts = 1\n[upstream]\nkind = \"glance\"\nurl = \"{}\"\n[upstream.keystone]\nauth_url = \"{}/v3\"\nusername = \"u\"\npassword = \"pw-keystone-97\"\nproject_name = \"p\"\n",
        origin.url(),
        origin.url().replace("http://", "http://ks:pw-ksurl-96@"),
    ));
    origin.require_keystone(3600);
    let checked = cli::run(&s.config, &["check-config"], &trace);
    assert_no_secret("check-config", &all_output(&checked));
    ok(&s.cli(&["queue", "present-img", "missing-img"]), "queue");
    let fetched = cli::run(&s.config, &["prefetch"], &trace);
    assert!(s.cache("present-img").exists(), "{}", all_output(&fetched));
    assert_no_secret("prefetch", &all_output(&fetched));
    assert_no_secret("list-queued", &all_output(&s.cli(&["list-queued"])));
}

/// Queues `ids` and runs `prefetch`, which must end within `limit`; returns each id's
/// last error (none may be cached).
fn prefetch_within(
    s: &Setup,
    ids: &[&str],
    limit: Duration,
) -> std::collections::HashMap<String, String> {
    let mut args = vec!["queue"];
    args.extend_from_slice(ids);
    ok(&s.cli(&args), "queue");
    let mut child = cli::command()
        .arg("--config")
        .arg(&s.config)
        .arg("prefetch")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "prefetch still running after {limit:?}: {:?}",
                queue_rows(s)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let rows = queue_rows(s);
    ids.iter()
        .map(|id| {
            assert!(!s.cache(id).exists(), "{id} was cached");
            let error = rows[*id]["last_error"].as_str().unwrap_or_default();
            (id.to_string(), error.to_owned())
        })
        .collect()
}

#[test]
fn oversized_metadata_is_refused_without_reading_it_whole() {
    use crate::kit::origin::{Behaviour, Origin};
    use crate::kit::test_bytes;
    let origin = Origin::start();
    let huge = Behaviour {
        meta_padding: 3 << 20,
        ..Default::default()
    };
    origin.add("fat-meta", test_bytes(2000, 1), huge);
    let s = Setup::new(&format!(
        "[upstream]\nkind = \"glance\"\nurl = \"{}\"\n",
        origin.url()
    ));
    let errors = prefetch_within(&s, &["fat-meta"], SOON);
    assert!(
        errors["fat-meta"].contains("larger than 1048576 bytes"),
        "{errors:?}"
    );

    // Keystone's token response, the same.
    let origin = Origin::start();
    origin.require_keystone(3600);
    origin.pad_keystone(3 << 20);
    origin.add("fat-token", test_bytes(2000, 2), Behaviour::default());
    let s = Setup::new(&format!(
        "[upstream]\nkind = \"glance\"\nurl = \"{url}\"\n[upstream.keystone]\nauth_url = \"{url}/v3\"\nusername = \"u\"\npassword = \"p\"\nproject_name = \"p\"\n",
        url = origin.url()
    ));
    let errors = prefetch_within(&s, &["fat-token"], SOON);
    assert!(
        errors["fat-token"].contains("Keystone authentication: the response is larger than"),
        "{errors:?}"
    );
}

#[test]
fn a_dripping_upstream_fails_at_the_transfer_floor() {
    use crate::kit::origin::{Behaviour, Origin};
    use crate::kit::test_bytes;
    let origin = Origin::start();
    // One byte every 100 ms: 3,000 bytes would take five minutes, and no read ever
    // waits long enough for read_timeout.
    let drip = Behaviour {
        chunk_bytes: Some(1),
        chunk_delay: Some(Duration::from_millis(100)),
        ..Default::default()
    };
    origin.add("drip", test_bytes(3000, 3), drip);
    let s = Setup::new(&format!(
        "[prefetcher]\nmin_bytes_per_second = \"1KiB\"\nmin_rate_window = \"1s\"\n[upstream]\nkind = \"glance\"\nurl = \"{}\"\nread_timeout = \"5s\"\n",
        origin.url()
    ));
    let errors = prefetch_within(&s, &["drip"], SOON);
    assert!(errors["drip"].contains("upstream too slow"), "{errors:?}");
    assert_eq!(queue_rows(&s)["drip"]["state"], "queued", "retried later");
    assert!(
        !s.cache("incomplete/drip").exists(),
        "the partial file is gone"
    );
}

#[test]
fn sparse_files_claiming_exabytes_overflow_no_total() {
    let s = setup_on_tmpfs("max_size = 3000");
    let mut d = s.start();
    let stage = s.tmp.path().join(".sparse");
    let plant_sparse = |name: &str| {
        std::fs::File::create(&stage)
            .unwrap()
            .set_len(1 << 62)
            .unwrap();
        std::fs::rename(&stage, s.cache(name)).unwrap();
    };
    // Four sparse files of 2^62 bytes each under the running daemon: their total does
    // not fit in 64 bits, and the pruner sums them.
    for n in 0..4 {
        plant_sparse(&format!("sparse-{n}"));
    }
    let deadline = std::time::Instant::now() + SOON;
    while (0..4).any(|n| s.cache(&format!("sparse-{n}")).exists()) {
        assert!(d.alive(), "the daemon died; log:\n{}", d.log_text());
        assert!(
            std::time::Instant::now() < deadline,
            "not pruned:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.alive(), "the daemon died; log:\n{}", d.log_text());
    d.stop();
    // And before a command that sums what it lists.
    for n in 4..8 {
        plant_sparse(&format!("sparse-{n}"));
    }
    let sized = ok(&s.cli(&["size", "--json"]), "size");
    assert!(sized.contains(&u64::MAX.to_string()), "{sized}");
}

async fn an_unreadable_queue_row_does_not_hold_up_the_queue(b: Backend) {
    let Some(t) = TestCache::new(b).await else {
        return;
    };
    for image in ["q-bad", "q-good"] {
        assert!(t.driver.queue_image(&id(image)).await.unwrap());
    }
    assert_eq!(t.driver.adopt_queue_markers().await.unwrap(), 2);
    // A queued time that does not decode and sorts first, so it is picked first.
    let first = match b {
        Backend::Sqlite => "'0-no-time'",
        Backend::Postgres => "'-infinity'",
        Backend::MySql => "'0000-00-00 00:00:00'",
    };
    let update =
        format!("UPDATE glance_cached_queue SET queued_at = {first} WHERE image_id = 'q-bad'");
    let update = match b {
        Backend::MySql => format!("SET STATEMENT sql_mode = '' FOR {update}"),
        _ => update,
    };
    run_sql(&t.db.url, b, &update).await.unwrap();
    let claim = Duration::from_secs(3600);
    // The bad row fails its claim once; the next claim gets the good one.
    let mut claimed = None;
    for _ in 0..3 {
        if let Ok(Some(image)) = t.driver.claim_next("test holder", Utc::now(), claim).await {
            claimed = Some(image.image_id.to_string());
            break;
        }
    }
    assert_eq!(claimed.as_deref(), Some("q-good"));
    t.finish().await;
}

#[test]
fn a_token_file_made_readable_while_running_is_refused_at_use() {
    use crate::kit::origin::{Behaviour, Origin};
    use crate::kit::test_bytes;
    use std::os::unix::fs::PermissionsExt;
    let origin = Origin::start();
    origin.require_token("rotated-token");
    origin.add("tok-img", test_bytes(2000, 6), Behaviour::default());
    let token_dir = tempfile::tempdir().unwrap();
    let token = token_dir.path().join("token");
    std::fs::write(&token, "rotated-token\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = Setup::new(&format!(
        "[prefetcher]\nmax_attempts = 1\nretry_delay = \"1h\"\n[upstream]\nkind = \"glance\"\nurl = \"{}\"\ntoken_file = {:?}\n",
        origin.url(),
        token.display().to_string()
    ));
    let d = s.start();
    // A rotation leaves the new token readable by everyone, while the daemon runs.
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Queued the way Glance's API does it (the CLI refuses the configuration now).
    std::fs::write(s.cache("queue/tok-img"), b"").unwrap();
    let deadline = std::time::Instant::now() + SOON;
    let error = loop {
        let log = d.log_text();
        if let Some(line) = log.lines().find(|l| l.contains("prefetch failed")) {
            break line.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "{log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(error.contains("world-readable"), "{error}");
    assert!(!s.cache("tok-img").exists());
    d.stop();
}
