//! Black-box tests of the operator CLI through the built binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::kit::test_bytes;

/// A temporary cache directory and config file for CLI runs.
struct CliEnv {
    tmp: tempfile::TempDir,
    config: PathBuf,
}

impl CliEnv {
    fn new(extra_toml: &str) -> CliEnv {
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("glance-cached.toml");
        std::fs::write(
            &config,
            format!(
                "[cache]\ndir = \"{}\"\n{extra_toml}",
                tmp.path().join("cache").display()
            ),
        )
        .unwrap();
        CliEnv { tmp, config }
    }

    fn cache(&self, rel: &str) -> PathBuf {
        self.tmp.path().join("cache").join(rel)
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_env(args, &[])
    }

    fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let env: Vec<(&str, &str)> = std::iter::once(NOT_A_KEY)
            .chain(env.iter().copied())
            .collect();
        crate::kit::cli::run(&self.config, args, &env)
    }

    /// Runs and requires success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and requires exit 1 with one `error: ` line; returns that line.
    fn fails(&self, args: &[&str]) -> String {
        fails(self.run(args), args)
    }
}

/// A prefixed variable that is not configuration, like the test harness's own: every
/// command here runs with it (on top of the kit's scrubbed environment), proving such
/// variables are not mistaken for configuration.
const NOT_A_KEY: (&str, &str) = ("GLANCE_CACHED_NOT_A_KEY", "ignored");

/// The binary in the kit's scrubbed environment, with `NOT_A_KEY`.
fn command() -> Command {
    let mut cmd = crate::kit::cli::command();
    cmd.env(NOT_A_KEY.0, NOT_A_KEY.1);
    cmd
}

fn fails(out: Output, what: &[&str]) -> String {
    assert_eq!(out.status.code(), Some(1), "{what:?} must exit 1");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{what:?}: one line on stderr, got {stderr:?}"
    );
    assert!(lines[0].starts_with("error: "), "{what:?}: {stderr:?}");
    lines[0].to_owned()
}

fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// Where the system's OpenSSL refuses the digests (here: only its base provider, as a
/// FIPS-only configuration refuses MD5), imports still verify with the pure-Rust
/// implementations: the right bytes are cached, wrong checksums are refused.
#[test]
fn digests_work_where_openssl_refuses_them() {
    let env = CliEnv::new("");
    let conf = write_file(
        env.tmp.path(),
        "base-only.cnf",
        b"openssl_conf = openssl_init\n[openssl_init]\nproviders = provider_sect\n\
          [provider_sect]\nbase = base_sect\n[base_sect]\nactivate = 1\n",
    );
    let openssl_conf = [("OPENSSL_CONF", conf.to_str().unwrap())];
    // The configuration does make OpenSSL refuse: otherwise this test proves nothing.
    let refused = Command::new("openssl")
        .args(["dgst", "-md5", conf.to_str().unwrap()])
        .env("OPENSSL_CONF", &conf)
        .output()
        .unwrap();
    assert!(!refused.status.success(), "OpenSSL still offers MD5");
    let data = test_bytes(1_500_000, 9);
    let src = write_file(env.tmp.path(), "image.raw", &data);
    let md5 = hex::encode(<md5::Md5 as md5::Digest>::digest(&data));
    let sha = hex::encode(<sha2::Sha512 as sha2::Digest>::digest(&data));
    let src = src.to_str().unwrap();
    let out = env.run_env(
        &["import", "fips-1", src, "--md5", &md5, "--sha512", &sha],
        &openssl_conf,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(env.cache("fips-1")).unwrap(), data);
    let wrong = "0".repeat(128);
    let out = env.run_env(
        &["import", "fips-2", src, "--md5", &md5, "--sha512", &wrong],
        &openssl_conf,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("failed verification"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!env.cache("fips-2").exists());
}

#[test]
fn import_list_cat_hits_round_trip() {
    let env = CliEnv::new("");
    let data = test_bytes(2_500_000, 3);
    let src = write_file(env.tmp.path(), "image.raw", &data);
    let md5 = hex::encode(<md5::Md5 as md5::Digest>::digest(&data));
    let sha = hex::encode(<sha2::Sha512 as sha2::Digest>::digest(&data));
    let out = env.ok(&[
        "import",
        "img-1",
        src.to_str().unwrap(),
        "--md5",
        &md5,
        "--sha512",
        &sha,
    ]);
    assert!(out.contains("cached img-1") && out.contains(&md5), "{out}");
    let listed: serde_json::Value =
        serde_json::from_str(&env.ok(&["list-cached", "--json"])).unwrap();
    let row = &listed.as_array().unwrap()[0];
    assert_eq!(row["image_id"], "img-1");
    assert_eq!(row["size"], data.len() as u64);
    assert_eq!(row["hits"], 0);
    assert_eq!(row["checksum"], md5.as_str());
    let accessed = row["last_accessed"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(accessed).is_ok() && accessed.ends_with('Z'),
        "{accessed}"
    );
    assert!(row["last_modified"].is_string());
    let text = env.ok(&["list-cached"]);
    assert!(
        text.starts_with("IMAGE ID") && text.contains("img-1"),
        "{text}"
    );
    let cat = env.run(&["cat", "img-1"]);
    assert!(cat.status.success());
    assert!(cat.stdout == data, "cat returns the exact bytes");
    assert_eq!(env.ok(&["hits", "img-1"]).trim(), "1");
    assert_eq!(env.ok(&["hits", "never-cached"]).trim(), "0");
    let size: serde_json::Value = serde_json::from_str(&env.ok(&["size", "--json"])).unwrap();
    assert_eq!(size["size"], data.len() as u64);
    assert_eq!(size["images"], 1);
    assert!(env.ok(&["size"]).contains("1 images"));
}

#[test]
fn bad_input_fails_cleanly_and_changes_nothing() {
    let env = CliEnv::new("");
    let src = write_file(env.tmp.path(), "image.raw", b"abc");
    for args in [
        vec!["queue", "../../etc/passwd"],
        vec!["import", "a/b", src.to_str().unwrap()],
        vec!["cat", ".."],
        vec!["hits", ""],
        vec!["delete-cached", "0123456789012345678901234567890123456"],
        vec!["import", "good-id", "/nonexistent/file"],
        vec!["import", "good-id", src.to_str().unwrap(), "--md5", "xyz"],
        vec!["delete-queued"],
        vec!["no-such-command"],
    ] {
        let line = env.fails(&args);
        assert!(!line.contains('\n'));
    }
    assert!(!env.cache("").exists(), "no cache directory was created");
    let line = env.fails(&["queue", "ok-id", "bad id"]);
    assert!(line.contains("invalid image id"), "{line}");
    assert!(
        !env.cache("").exists(),
        "a bad id among good ones changes nothing"
    );
}

#[test]
fn wrong_checksum_is_never_cached() {
    let env = CliEnv::new("");
    let src = write_file(env.tmp.path(), "image.raw", b"the real bytes");
    let wrong = "0".repeat(32);
    let line = env.fails(&["import", "img-x", src.to_str().unwrap(), "--md5", &wrong]);
    assert!(line.contains("md5"), "{line}");
    assert!(!env.cache("img-x").exists());
    assert!(
        env.cache("invalid/img-x").exists(),
        "bytes kept in invalid/ for the cleaner"
    );
    assert_eq!(env.ok(&["list-cached", "--json"]).trim(), "[]");
    let out = env.ok(&["clean"]);
    assert!(
        out.starts_with("removed 1 files, 14 bytes (1 invalid, 0 stalled)"),
        "{out}"
    );
}

#[test]
fn unreachable_database_is_one_clear_line() {
    let env = CliEnv::new(
        "[database]\nurl = \"postgres://u:secret@127.0.0.1:1/glance\"\nconnect_timeout = \"2s\"\n[node]\nreference_url = \"http://n1:9292\"\n",
    );
    let line = env.fails(&["list-cached"]);
    assert!(
        line.contains("cannot connect to the postgresql database"),
        "{line}"
    );
    assert!(!line.contains("secret"), "password never printed: {line}");
    assert!(!env.cache("").exists(), "nothing created on disk");
}

#[test]
fn queue_list_and_delete() {
    let env = CliEnv::new("");
    let out = env.ok(&["queue", "q-1", "q-2"]);
    assert_eq!(out, "queued q-1\nqueued q-2\n");
    assert!(env.ok(&["queue", "q-1"]).starts_with("not queued q-1"));
    std::fs::write(env.cache("queue/from-glance"), b"").unwrap();
    let listed: serde_json::Value =
        serde_json::from_str(&env.ok(&["list-queued", "--json"])).unwrap();
    let ids: Vec<_> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["image_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(ids.contains(&"from-glance".to_string()));
    for row in listed.as_array().unwrap() {
        assert_eq!(row["attempts"], 0);
        assert!(row["last_error"].is_null());
        assert!(row["downloading_by"].is_null());
        assert!(row["queued_at"].as_str().unwrap().ends_with('Z'));
    }
    // The table for people: one cell per column, each under its heading.
    let text = env.ok(&["list-queued"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    let cells: Vec<&str> = lines[1].split("  ").filter(|c| !c.is_empty()).collect();
    assert_eq!(cells.len(), 7, "{text}");
    let column = |name: &str| lines[0].find(name).unwrap();
    let q1 = lines.iter().find(|l| l.starts_with("q-1")).unwrap();
    assert_eq!(
        q1[column("STATE")..].split_whitespace().next(),
        Some("queued")
    );
    assert_eq!(
        q1[column("DOWNLOADING BY")..].split_whitespace().next(),
        Some("-")
    );
    assert_eq!(q1[column("LAST ERROR")..].trim(), "-");
    assert_eq!(
        env.ok(&["delete-queued", "q-1"]),
        "removed q-1 from the queue\n"
    );
    assert_eq!(env.ok(&["delete-queued", "q-1"]), "q-1 was not queued\n");
    assert_eq!(
        env.ok(&["delete-queued", "--all"]),
        "removed 2 images from the queue\n"
    );
    assert_eq!(env.ok(&["list-queued", "--json"]).trim(), "[]");
    assert!(env.ok(&["list-queued"]).starts_with("IMAGE ID"));
}

#[test]
fn delete_clean_and_prune() {
    let env = CliEnv::new("");
    for (name, len) in [("p-1", 1000), ("p-2", 2000), ("p-3", 3000)] {
        let src = write_file(env.tmp.path(), name, &test_bytes(len, 1));
        env.ok(&["import", name, src.to_str().unwrap()]);
    }
    // p-1 and p-2 read, p-3 not: p-3 is least recently used after the reads.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert!(env.run(&["cat", "p-1"]).status.success());
    assert!(env.run(&["cat", "p-2"]).status.success());
    let out = env.run_env(&["prune"], &[("GLANCE_CACHED_CACHE__MAX_SIZE", "3500")]);
    let out = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        out.trim(),
        "pruned 1 files, 3000 bytes; size now 3000 bytes (max 3500)"
    );
    assert!(!env.cache("p-3").exists());
    assert_eq!(
        env.ok(&["delete-cached", "p-1", "p-3"]),
        "deleted p-1\np-3 was not cached\n"
    );
    assert_eq!(
        env.ok(&["delete-cached", "--all"]),
        "deleted 1 cached images\n"
    );
    // Clean with an explicit stall time.
    std::fs::write(env.cache("incomplete/old"), b"12345").unwrap();
    let past = filetime::FileTime::from_unix_time(1_000_000, 0);
    filetime::set_file_mtime(env.cache("incomplete/old"), past).unwrap();
    std::fs::write(env.cache("incomplete/new"), b"1").unwrap();
    assert_eq!(
        env.ok(&["clean", "--stall-time", "1h"]),
        "removed 1 files, 5 bytes (0 invalid, 1 stalled)\n"
    );
    assert!(env.cache("incomplete/new").exists());
}

#[test]
fn check_config_merges_defaults_file_and_environment() {
    let env = CliEnv::new(
        "max_size = \"20GiB\"\nstall_time = 3600\n[database]\nurl = \"postgres://glance:s3cret@db:5432/glance\"\n[node]\nreference_url = \"http://n1:9292\"\n",
    );
    let out = String::from_utf8(
        env.run_env(
            &["check-config"],
            &[
                ("GLANCE_CACHED_CACHE__STALL_TIME", "2h"),
                ("GLANCE_CACHED_PRUNER__LOW_WATERMARK", "10GiB"),
            ],
        )
        .stdout,
    )
    .unwrap();
    assert!(
        out.contains("max_size = \"20GiB\""),
        "file beats default: {out}"
    );
    assert!(
        out.contains("stall_time = \"2h\""),
        "environment beats file: {out}"
    );
    assert!(out.contains("low_watermark = \"10GiB\""), "{out}");
    assert!(
        out.contains("interval = \"10m\""),
        "defaults fill the rest: {out}"
    );
    assert!(
        out.contains("postgres://glance:***@db:5432/glance") && !out.contains("s3cret"),
        "{out}"
    );
    // A server database gets Glance's tables only when asked; the environment can ask.
    assert!(out.contains("create_glance_tables = false"), "{out}");
    let asked = String::from_utf8(
        env.run_env(
            &["check-config"],
            &[("GLANCE_CACHED_DATABASE__CREATE_GLANCE_TABLES", "true")],
        )
        .stdout,
    )
    .unwrap();
    assert!(asked.contains("create_glance_tables = true"), "{asked}");
    let line = fails(
        env.run_env(
            &["check-config"],
            &[("GLANCE_CACHED_DATABASE__CREATE_GLANCE_TABLES", "maybe")],
        ),
        &["check-config"],
    );
    assert!(
        line.contains(
            "database.create_glance_tables (from GLANCE_CACHED_DATABASE__CREATE_GLANCE_TABLES)"
        ) && line.contains("true or false"),
        "{line}"
    );
    // The printed config is itself a valid config.
    let printed = write_file(
        env.tmp.path(),
        "printed.toml",
        out.replace("***", "x").as_bytes(),
    );
    let mut cmd = command();
    let again = cmd
        .args(["--config", printed.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

#[test]
fn check_config_reports_every_problem_at_once() {
    let env = CliEnv::new(
        "max_size = -1\nsurprise = true\n[pruner]\nlow_watermark = \"1XB\"\n[cleaner]\ninterval = \"soon\"\n[database]\nurl = \"mysql://h/db\"\n",
    );
    let line = fails(
        env.run_env(&["check-config"], &[("GLANCE_CACHED_LOG__FORMAT", "xml")]),
        &["check-config"],
    );
    let file = env.config.display().to_string();
    for expected in [
        format!("cache.max_size (from {file})"),
        format!("cache.surprise (from {file}): unknown key"),
        format!("pruner.low_watermark (from {file})"),
        format!("cleaner.interval (from {file})"),
        "log.format (from GLANCE_CACHED_LOG__FORMAT)".to_string(),
        "node.reference_url: is required".to_string(),
    ] {
        assert!(line.contains(&expected), "missing {expected:?} in {line}");
    }
    // A config file that is not TOML names the file.
    std::fs::write(&env.config, "[cache\n").unwrap();
    let line = env.fails(&["check-config"]);
    assert!(line.contains(&file), "{line}");
    // A number TOML cannot hold names the line and the key, and says what to write.
    std::fs::write(
        &env.config,
        "[cache]\ndir = \"/tmp/c\"\n\n[pruner]\nlow_watermark = 99999999999999999999\n",
    )
    .unwrap();
    let line = env.fails(&["check-config"]);
    assert!(
        line.contains(&file)
            && line.contains("line 5: pruner.low_watermark:")
            && line.contains("\"10GiB\""),
        "{line}"
    );
    // A missing explicit config file is an error, not silently ignored.
    let mut cmd = command();
    let line = fails(
        cmd.args(["--config", "/nonexistent.toml", "check-config"])
            .output()
            .unwrap(),
        &[],
    );
    assert!(line.contains("/nonexistent.toml"), "{line}");
}

#[test]
fn shipped_example_config_is_valid_and_documents_every_key() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/glance-cached.toml");
    let mut cmd = command();
    let out = cmd
        .args(["--config", path, "check-config"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(path).unwrap();
    for key in glance_cached::config::all_keys() {
        let (section, name) = key.rsplit_once('.').unwrap();
        assert!(text.contains(&format!("[{section}]")), "{section} missing");
        assert!(
            text.contains(&format!("\n{name} = ")) || text.contains(&format!("# {name} = ")),
            "{key} is not documented in the example config"
        );
    }
}

#[test]
fn import_glance_config_produces_a_valid_equivalent() {
    let env = CliEnv::new("");
    let api = write_file(
        env.tmp.path(),
        "glance-api.conf",
        b"[DEFAULT]\n# comment\nimage_cache_dir = /var/lib/glance/image-cache/\nimage_cache_max_size = 21474836480\nworker_self_reference_url = http://node1:9292\n[database]\nconnection = mysql+pymysql://glance:secret@db.example/glance?charset=utf8\n",
    );
    let cache = write_file(
        env.tmp.path(),
        "glance-cache.conf",
        b"[DEFAULT]\nimage_cache_stall_time = 3600\n",
    );
    let out = env.ok(&[
        "import-glance-config",
        api.to_str().unwrap(),
        "--cache-conf",
        cache.to_str().unwrap(),
    ]);
    for expected in [
        "dir = \"/var/lib/glance/image-cache/\"",
        "max_size = 21474836480",
        "stall_time = 3600",
        "url = \"mysql://glance:secret@db.example/glance\"",
        "reference_url = \"http://node1:9292\"",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in\n{out}");
    }
    let imported = write_file(env.tmp.path(), "imported.toml", out.as_bytes());
    let mut cmd = command();
    let check = cmd
        .args(["--config", imported.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let shown = String::from_utf8(check.stdout).unwrap();
    assert!(
        shown.contains("max_size = \"20GiB\"") && shown.contains("stall_time = \"1h\""),
        "{shown}"
    );
    let bad = write_file(
        env.tmp.path(),
        "bad.conf",
        b"[database]\nconnection = oracle://x\n",
    );
    assert!(
        env.fails(&["import-glance-config", bad.to_str().unwrap()])
            .contains("oracle")
    );
}

#[tokio::test]
async fn migrate_sqlite_moves_glance_rows_once() {
    let env = CliEnv::new("");
    // Glance's old per-node SQLite driver's database, as its driver creates it.
    std::fs::create_dir_all(env.cache("")).unwrap();
    let legacy = env.cache("cache.db");
    let pool = crate::kit::legacy_cache_db(&legacy).await;
    for (id, accessed, hits) in [
        ("old-a", 1_700_000_000.25, 7),
        ("old-b", 1_600_000_000.5, 2),
        ("bad/id", 1.0, 0),
    ] {
        sqlx::query("INSERT INTO cached_images VALUES (?, ?, ?, 1234, ?, 'abc')")
            .bind(id)
            .bind(accessed)
            .bind(accessed)
            .bind(hits)
            .execute(&pool)
            .await
            .unwrap();
    }
    pool.close().await;
    let out = env.ok(&["migrate-sqlite"]);
    assert!(
        out.starts_with("migrated 2 rows") && out.contains("1 with invalid ids skipped"),
        "{out}"
    );
    let again = env.ok(&["migrate-sqlite", legacy.to_str().unwrap()]);
    assert!(
        again.starts_with("migrated 0 rows") && again.contains("2 already present"),
        "{again}"
    );
    let rows: serde_json::Value =
        serde_json::from_str(&env.ok(&["list-cached", "--json"])).unwrap();
    let a = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["image_id"] == "old-a")
        .unwrap();
    assert_eq!(a["hits"], 7);
    assert_eq!(a["size"], 1234);
    assert_eq!(a["last_accessed"], "2023-11-14T22:13:20.250000Z");
    assert!(!env.cache("old-a").exists(), "files are not touched");
    assert!(
        env.fails(&["migrate-sqlite", "/nonexistent/cache.db"])
            .contains("is not a file")
    );
}

#[test]
fn man_page_and_completions() {
    let env = CliEnv::new("");
    let man = env.ok(&["man"]);
    assert!(
        man.contains(".TH glance-cached 8") && man.contains("check\\-config"),
        "{}",
        &man[..200.min(man.len())]
    );
    for shell in ["bash", "zsh", "fish"] {
        let out = env.ok(&["completions", shell]);
        assert!(out.contains("list-cached"), "{shell}");
    }
}

#[test]
fn a_number_where_a_string_belongs_is_an_error_in_a_file_but_not_from_the_environment() {
    let env = CliEnv::new("[log]\nlevel = 7\n");
    std::fs::write(&env.config, "[cache]\ndir = 5\n[log]\nlevel = 7\n").unwrap();
    let line = env.fails(&["check-config"]);
    assert!(
        line.contains("cache.dir")
            && line.contains("log.level")
            && line.contains("must be a string"),
        "{line}"
    );
    // The environment has no types: a numeric value is taken as text (a password, say).
    let env = CliEnv::new("");
    let out = env.run_env(
        &["check-config"],
        &[("GLANCE_CACHED_NODE__REFERENCE_URL", "12345")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("reference_url = \"12345\""));
}

/// Every entry under `dir` (itself included) with its owner uid, for entries whose
/// owner is not `uid`.
fn entries_not_owned_by(dir: &Path, uid: u32) -> Vec<(PathBuf, u32)> {
    use std::os::unix::fs::MetadataExt;
    let mut wrong = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.uid() != uid {
            wrong.push((path.clone(), meta.uid()));
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
        }
    }
    wrong
}

/// Item 6 of the hostile-input review: commands run as root on a cache owned by the
/// service user act as that user, so everything they create (subdirectories, the
/// SQLite database and its `-wal`/`-shm`, markers, imported images) stays usable by the
/// service. `nobody` stands in for `glance`.
#[test]
fn root_commands_act_as_the_cache_owner() {
    use std::os::unix::fs::PermissionsExt;
    if !rustix::process::geteuid().is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        eprintln!("SKIPPED: needs root");
        return;
    }
    const NOBODY: u32 = 65534;
    let env = CliEnv::new("");
    // The service user must reach its cache and read the config (as `root:glance 0640`
    // lets the glance group do); the test's own temp dir is root's 0700.
    std::fs::set_permissions(env.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::create_dir(env.cache("")).unwrap();
    rustix::fs::chown(
        env.cache(""),
        Some(rustix::process::Uid::from_raw(NOBODY)),
        Some(rustix::process::Gid::from_raw(NOBODY)),
    )
    .unwrap();
    let source = env.tmp.path().join("image.src");
    std::fs::write(&source, test_bytes(4096, 3)).unwrap();
    std::fs::set_permissions(&source, std::fs::Permissions::from_mode(0o644)).unwrap();
    env.ok(&["queue", "queued-by-root"]);
    env.ok(&["import", "imported-by-root", source.to_str().unwrap()]);
    env.ok(&["list-cached"]);
    assert!(env.cache("imported-by-root").is_file());
    assert!(env.cache("queue/queued-by-root").is_file());
    assert_eq!(entries_not_owned_by(&env.cache(""), NOBODY), []);
}

/// Commands that only look create nothing: not the cache directory when it is missing,
/// not its subdirectories, and no node row.
#[test]
fn read_only_commands_create_nothing() {
    let env = CliEnv::new("");
    for args in [&["list-cached"][..], &["size"], &["hits", "some-image"]] {
        let line = env.fails(args);
        assert!(line.contains("does not exist"), "{args:?}: {line}");
        assert!(
            !env.cache("").exists(),
            "{args:?} created the cache directory"
        );
    }
    // A cache a write made: its top level as it was, apart from SQLite's sidecars.
    env.ok(&["queue", "some-image"]);
    let listing = || {
        let mut names: Vec<String> = std::fs::read_dir(env.cache(""))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with("-wal") && !n.ends_with("-shm"))
            .collect();
        names.sort();
        names
    };
    let before = listing();
    for args in [&["list-cached"][..], &["size"], &["hits", "some-image"]] {
        env.ok(args);
    }
    assert_eq!(listing(), before);
    // A missing subdirectory is said, not made.
    std::fs::remove_dir(env.cache("invalid")).unwrap();
    for args in [&["list-cached"][..], &["size"], &["hits", "some-image"]] {
        let line = env.fails(args);
        assert!(line.contains("invalid"), "{args:?}: {line}");
    }
    let mut expected = before.clone();
    expected.retain(|n| n != "invalid");
    assert_eq!(
        listing(),
        expected,
        "read-only commands recreated a directory"
    );
    std::fs::create_dir(env.cache("invalid")).unwrap();
    // Another node's listing does not register that node.
    let other = env.run_env(
        &["list-cached", "--json"],
        &[(
            "GLANCE_CACHED_NODE__REFERENCE_URL",
            "http://never-registered:9292",
        )],
    );
    assert!(other.status.success());
    assert_eq!(String::from_utf8_lossy(&other.stdout).trim(), "[]");
    let nodes = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from node_reference').fetchone()[0])",
        ])
        .arg(env.cache(".glance-cached/glance-cached.db"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&nodes.stdout).trim(), "1");
}

/// With no configuration at all, no command creates the built-in default cache
/// directory (it would be root's, and in the wrong place if the operator meant another).
#[test]
fn without_configuration_the_default_directory_is_not_created() {
    let default_dir = Path::new("/var/lib/glance/image-cache");
    let default_config = Path::new("/etc/glance-cached/glance-cached.toml");
    if default_dir.exists() || default_config.exists() {
        eprintln!("SKIPPED: {default_dir:?} or {default_config:?} exists on this machine");
        return;
    }
    let mut cmd = command();
    let out = cmd.args(["queue", "an-image"]).output().unwrap();
    let line = fails(out, &["queue"]);
    assert!(line.contains("not creating it"), "{line}");
    assert!(!default_dir.exists());
}
