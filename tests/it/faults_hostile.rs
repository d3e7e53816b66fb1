//! Hostile input (issue 7, item 4) through the real binary: ids that try to become paths,
//! marker files with hostile names, symlinks, FIFOs and directories planted in the cache,
//! broken configuration files and a lying upstream. (The property tests of id validation
//! and of config value parsing are unit tests now, in `src/image_id.rs` and
//! `src/config/values.rs`.)
//!
//! Every test keeps a canary tree (`kit::canary`) outside the cache directory.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Output;

use glance_cached::image_id::ImageId;

use crate::kit::canary::{Canary, Facts, facts, make_old, mkfifo};
use crate::kit::cli::run_with_deadline;
use crate::kit::daemon::{SOON, Setup, eventually};
use crate::kit::origin::{Behaviour, Origin};
use crate::kit::test_bytes;

fn cli(config: &Path, args: &[&str]) -> Output {
    run_with_deadline(config, args, &[])
}

fn cli_ok(config: &Path, args: &[&str]) -> String {
    let out = cli(config, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Exit 1, nothing on stdout, and exactly one line on stderr that starts with `error:`.
fn assert_one_error_line(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
    assert!(out.stdout.is_empty(), "{what}: printed {:?}", out.stdout);
    assert_eq!(stderr.lines().count(), 1, "{what}: {stderr:?}");
    assert!(stderr.starts_with("error: "), "{what}: {stderr:?}");
    stderr
}

/// Exit 1, nothing on stdout, and exactly one `error:` line on stderr, last; anything
/// before it must be a logged warning.
fn assert_refused_with_warnings(out: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
    assert!(out.stdout.is_empty(), "{what}: printed {:?}", out.stdout);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.last().is_some_and(|l| l.starts_with("error: ")),
        "{what}: {stderr:?}"
    );
    assert!(
        lines[..lines.len() - 1]
            .iter()
            .all(|l| l.contains(" WARN ")),
        "{what}: {stderr:?}"
    );
}

/// Every entry under `dir` (not following symlinks): kind, size and mtime.
fn tree(dir: &Path) -> BTreeMap<PathBuf, (u32, u64, i64, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p.clone());
            }
            out.insert(p, (m.mode(), m.len(), m.mtime(), m.mtime_nsec()));
        }
    }
    out
}

fn queued_ids(config: &Path) -> Vec<String> {
    let text = cli_ok(config, &["list-queued", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["image_id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn hostile_image_ids_are_refused_by_every_command_before_anything_is_touched() {
    let s = Setup::new("");
    s.import("keep-me", 1000);
    cli_ok(&s.config, &["queue", "queued-ok"]);
    let canary = Canary::new(s.tmp.path());
    let src = s.tmp.path().join("source.img");
    std::fs::write(&src, test_bytes(100, 1)).unwrap();
    let cache_before = tree(&s.cache(""));

    let victim = canary.path("victim");
    let hostile: Vec<OsString> = [
        // Relative escapes from the cache root and from its subdirectories.
        "../canary/victim",
        "../../canary/victim",
        "queue/../../canary/victim",
        victim.to_str().unwrap(),
        "a/b",
        "/",
        ".",
        "..",
        "",
        &"x".repeat(37),
        &"y".repeat(4096),
        "ümlaut",
        "образ",
        "ａｂｃ",
        "a\u{202e}b",
        "a\nb",
        "a\tb",
        "a b",
        "a.db",
        "*",
        "~",
    ]
    .iter()
    .map(OsString::from)
    .chain([OsStr::from_bytes(b"\xff\xfe").to_owned()])
    .collect();
    for id in &hostile {
        let id = id.as_os_str();
        let commands: [Vec<&OsStr>; 8] = [
            vec!["queue".as_ref(), id],
            vec!["delete-cached".as_ref(), id],
            vec!["delete-queued".as_ref(), id],
            vec!["cat".as_ref(), id],
            vec!["hits".as_ref(), id],
            vec!["import".as_ref(), id, src.as_os_str()],
            // A valid id beside a hostile one: the whole command is refused.
            vec!["queue".as_ref(), "valid-too".as_ref(), id],
            vec!["delete-cached".as_ref(), "keep-me".as_ref(), id],
        ];
        for args in commands {
            let out = run_with_deadline(&s.config, &args, &[]);
            assert_one_error_line(&out, &format!("{args:?}"));
        }
        assert_eq!(
            tree(&s.cache("")),
            cache_before,
            "the cache changed after {id:?}"
        );
        canary.check(&format!("after the commands with {id:?}"));
    }
    // A NUL byte cannot even be passed on a command line: the kernel's argv is
    // NUL-terminated (ImageId::parse refuses it too; see its property tests).
    let err = crate::kit::cli::command()
        .args(["--config".as_ref(), s.config.as_os_str()])
        .args(["queue", "a\0b"])
        .output()
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(ImageId::parse("a\0b").is_err() && ImageId::parse("\0").is_err());

    assert_eq!(tree(&s.cache("")), cache_before);
    assert_eq!(s.cached_ids(), ["keep-me"]);
    assert_eq!(queued_ids(&s.config), ["queued-ok"]);
    assert_eq!(
        std::fs::read(s.cache("keep-me")).unwrap(),
        test_bytes(1000, 1000usize as u8)
    );
    canary.finish("hostile ids");
}

#[test]
fn hostile_queue_markers_are_never_adopted_or_followed() {
    let s = Setup::new("");
    let canary = Canary::new(s.tmp.path());
    let mut d = s.start();
    let q = s.cache("queue");
    // Names that are not image ids.
    let x37 = "x".repeat(37);
    let bad_names: Vec<&[u8]> = vec![
        b"has space",
        b"dot.ted",
        b"...",
        b".hidden",
        x37.as_bytes(),
        "ümlaut".as_bytes(),
        b"new\nline",
        b"\xff\xfe",
        b"image.db",
    ];
    for name in &bad_names {
        std::fs::write(q.join(OsStr::from_bytes(name)), b"").unwrap();
    }
    // Valid-id names that are not regular files.
    symlink(canary.path("victim"), q.join("sym-file")).unwrap();
    symlink(canary.path("dir"), q.join("sym-dir")).unwrap();
    symlink(canary.path("fifo"), q.join("sym-fifo")).unwrap();
    symlink(canary.path("not-there"), q.join("dangling")).unwrap();
    mkfifo(&q.join("fifo-marker"));
    std::fs::create_dir(q.join("dir-marker")).unwrap();
    std::fs::write(q.join("dir-marker/inner-id"), b"").unwrap();
    let planted = [
        "sym-file",
        "sym-dir",
        "sym-fifo",
        "dangling",
        "fifo-marker",
        "dir-marker",
    ];
    let before: Vec<Option<Facts>> = planted.iter().map(|n| facts(&q.join(n))).collect();
    // A valid marker next to them is still adopted, by the daemon.
    std::fs::write(q.join("good-marker"), b"").unwrap();
    eventually(SOON, "the daemon adopts the valid marker", || {
        d.log_text().contains("adopted queue markers")
    });
    assert!(d.alive(), "{}", d.log_text());
    assert_eq!(queued_ids(&s.config), ["good-marker"], "only the valid one");
    assert!(
        d.log_text().contains("adopted=1"),
        "exactly one marker adopted: {}",
        d.log_text()
    );
    // Skipped, and logged (the specification's "skipped and logged").
    assert!(
        d.log_text().contains("skipping queue entries"),
        "planted entries are logged: {}",
        d.log_text()
    );
    canary.check("after the daemon saw the markers");

    // The CLI on the planted names: nothing is queued through them, nothing is removed
    // through them, and the dangling symlink does not create its target.
    for name in planted {
        let out = cli_ok(&s.config, &["queue", name]);
        assert!(out.contains("not queued"), "{name}: {out}");
        let out = cli_ok(&s.config, &["delete-queued", name]);
        assert!(out.contains("was not queued"), "{name}: {out}");
    }
    let out = cli_ok(&s.config, &["delete-queued", "--all"]);
    assert!(out.contains("removed 1 images"), "{out}");
    assert!(queued_ids(&s.config).is_empty());
    assert!(!q.join("good-marker").exists());
    let after: Vec<Option<Facts>> = planted.iter().map(|n| facts(&q.join(n))).collect();
    assert_eq!(before, after, "planted entries are left alone");
    assert!(q.join("dir-marker/inner-id").exists());
    for name in &bad_names {
        assert!(
            q.join(OsStr::from_bytes(name)).exists(),
            "{:?} is left alone",
            String::from_utf8_lossy(name)
        );
    }
    assert!(d.alive());
    d.stop();
    canary.finish("hostile markers");
}

/// Plants, under `dir`, every kind of entry that is not a regular file, named by valid
/// ids starting with `prefix`: symlinks to a canary file, directory, FIFO and to a
/// missing canary path, a FIFO, and a directory holding a file. Returns the names.
fn plant(dir: &Path, prefix: &str, canary: &Canary) -> Vec<String> {
    let name = |n: &str| format!("{prefix}{n}");
    symlink(canary.path("victim"), dir.join(name("sym-file"))).unwrap();
    symlink(canary.path("dir"), dir.join(name("sym-dir"))).unwrap();
    symlink(canary.path("fifo"), dir.join(name("sym-fifo"))).unwrap();
    symlink(canary.path("not-there"), dir.join(name("dangling"))).unwrap();
    mkfifo(&dir.join(name("fifo")));
    std::fs::create_dir(dir.join(name("dir"))).unwrap();
    std::fs::write(dir.join(name("dir")).join("inner-id"), b"inner").unwrap();
    let names: Vec<String> = ["sym-file", "sym-dir", "sym-fifo", "dangling", "fifo", "dir"]
        .iter()
        .map(|n| name(n))
        .collect();
    // Two hours old, so the stall and grace rules would pick them if they were files.
    make_old(&dir.join(name("dir")).join("inner-id"));
    for n in &names {
        make_old(&dir.join(n));
    }
    names
}

#[test]
fn planted_symlinks_fifos_and_directories_are_never_followed() {
    let s = Setup::new("max_size = 5000");
    s.import("real-a", 2000);
    s.import("real-b", 2000);
    let canary = Canary::new(s.tmp.path());
    // A cached image whose file is swapped for a symlink to a canary file of the same
    // name: its row still says "real-b".
    std::fs::remove_file(s.cache("real-b")).unwrap();
    symlink(canary.path("real-b"), s.cache("real-b")).unwrap();
    let mut planted: Vec<PathBuf> = vec![s.cache("real-b")];
    for (area, prefix) in [("invalid", "inv-"), ("incomplete", "inc-"), ("", "root-")] {
        let dir = s.cache(area);
        planted.extend(plant(&dir, prefix, &canary).iter().map(|n| dir.join(n)));
    }
    // The daemon starts on them (startup reconcile and clean) ...
    let mut d = s.start();
    canary.check("after startup");
    // ... and more arrive while it runs (watcher events).
    for (area, prefix) in [
        ("invalid", "late-inv-"),
        ("incomplete", "late-inc-"),
        ("", "late-"),
    ] {
        let dir = s.cache(area);
        planted.extend(plant(&dir, prefix, &canary).iter().map(|n| dir.join(n)));
    }
    // A symlink in invalid/ that a failed write will land on: the write replaces the
    // link itself, never its target.
    symlink(canary.path("victim"), s.cache("invalid/trap")).unwrap();
    let before: Vec<Option<Facts>> = planted.iter().map(|p| facts(p)).collect();

    // The cleaner runs past all of them: a real invalid file and a real stalled file
    // are removed.
    std::fs::write(s.cache("invalid/sentinel"), b"bad bytes").unwrap();
    let stalled = s.tmp.path().join("stalled");
    std::fs::write(&stalled, b"partial").unwrap();
    crate::kit::age_file(&stalled, 7200);
    std::fs::rename(&stalled, s.cache("incomplete/stalled")).unwrap();
    eventually(SOON, "the real leftovers are cleaned", || {
        !s.cache("invalid/sentinel").exists() && !s.cache("incomplete/stalled").exists()
    });
    // The pruner runs past them: a new image takes the cache over max_size.
    s.import("real-c", 2000);
    s.import("real-d", 2000);
    eventually(SOON, "the least recently used real image is pruned", || {
        !s.cache("real-a").exists()
    });
    assert!(d.alive(), "{}", d.log_text());
    canary.check("after the daemon's clean and prune passes");

    // The CLI. A failed import lands on the invalid/ trap.
    let src = s.tmp.path().join("src.img");
    std::fs::write(&src, test_bytes(500, 2)).unwrap();
    let out = cli(
        &s.config,
        &[
            "import",
            "trap",
            src.to_str().unwrap(),
            "--md5",
            &"0".repeat(32),
        ],
    );
    assert_one_error_line(&out, "import with a wrong md5");
    assert!(
        !std::fs::symlink_metadata(s.cache("invalid/trap"))
            .is_ok_and(|m| m.file_type().is_symlink()),
        "the failed write replaced the symlink, not its target"
    );
    // An import over a symlink in incomplete/ is refused (O_EXCL | O_NOFOLLOW).
    let out = cli(
        &s.config,
        &["import", "inc-sym-file", src.to_str().unwrap()],
    );
    assert_one_error_line(&out, "import over incomplete/inc-sym-file");
    // Reading a planted entry: refused, never blocked by a FIFO, nothing printed.
    for name in [
        "real-b",
        "root-sym-file",
        "root-sym-dir",
        "root-sym-fifo",
        "root-fifo",
        "root-dir",
        "root-dangling",
    ] {
        let out = cli(&s.config, &["cat", name]);
        assert_refused_with_warnings(&out, &format!("cat {name}"));
        cli_ok(&s.config, &["hits", name]);
        let out = cli_ok(&s.config, &["delete-cached", name]);
        assert!(out.contains("was not cached"), "{name}: {out}");
    }
    canary.check("after cat, hits and delete-cached of planted names");
    let out = cli_ok(&s.config, &["clean", "--stall-time", "1s"]);
    assert!(out.starts_with("removed "), "{out}");
    let out = cli_ok(&s.config, &["delete-cached", "--all"]);
    assert!(
        out.contains("deleted 2 cached images"),
        "real-c and real-d: {out}"
    );
    s.import("real-e", 1000);
    let prune0 = s.tmp.path().join("prune0.toml");
    std::fs::write(
        &prune0,
        format!(
            "[cache]\ndir = \"{}\"\nmax_size = 0\n",
            s.cache("").display()
        ),
    )
    .unwrap();
    let out = cli_ok(&prune0, &["prune"]);
    assert!(out.contains("pruned 1 files, 1000 bytes"), "{out}");
    let out = cli_ok(&s.config, &["reconcile"]);
    assert!(out.contains("reconciled: 0 adopted"), "{out}");
    let size: serde_json::Value =
        serde_json::from_str(&cli_ok(&s.config, &["size", "--json"])).unwrap();
    assert_eq!(size["size"], 0, "planted entries are not counted: {size}");
    assert_eq!(size["images"], 0);
    assert!(s.cached_ids().is_empty());

    // Everything planted is still there, exactly as it was; the daemon never hung.
    let after: Vec<Option<Facts>> = planted.iter().map(|p| facts(p)).collect();
    for ((path, b), a) in planted.iter().zip(&before).zip(&after) {
        assert_eq!(b, a, "{} was changed", path.display());
    }
    for p in planted
        .iter()
        .filter(|p| p.to_string_lossy().ends_with("dir"))
    {
        if std::fs::symlink_metadata(p).unwrap().is_dir() {
            assert!(p.join("inner-id").exists(), "{} was emptied", p.display());
        }
    }
    let log = d.log_text();
    assert!(
        log.contains("skipping cache entries that are not regular files"),
        "skipped entries are logged: {log}"
    );
    assert!(d.alive(), "{log}");
    d.stop();
    canary.finish("planted entries");
}

/// check-config on `text` (and the environment `env`): exit 1, one `error:` line
/// naming every key in `keys`, and nothing created.
fn assert_config_refused(
    s: &Setup,
    canary: &Canary,
    text: &str,
    env: &[(&str, &str)],
    keys: &[&str],
) {
    let config = s.tmp.path().join("hostile.toml");
    std::fs::write(&config, text).unwrap();
    for command in ["check-config", "list-cached"] {
        let out = run_with_deadline(&config, &[OsStr::new(command)], env);
        let line = assert_one_error_line(&out, &format!("{command} on {text}"));
        for key in keys {
            assert!(line.contains(key), "{key} is not named: {line}");
        }
    }
    canary.check(&format!("after config {text:?}"));
}

#[test]
fn hostile_config_files_name_every_bad_key() {
    let s = Setup::new("");
    let canary = Canary::new(s.tmp.path());
    // The cache dir would be created inside the canary if validation let anything run.
    let dir = canary.path("dir").join("cache-here");
    let head = format!("[cache]\ndir = \"{}\"\n", dir.display());
    let from = |key: &str| {
        format!(
            "{key} (from {})",
            s.tmp.path().join("hostile.toml").display()
        )
    };

    // Wrong types.
    assert_config_refused(
        &s,
        &canary,
        &format!(
            "{head}max_size = true\nstall_time = [1, 2]\n[database]\nmax_connections = \"many\"\nurl = 5\n[cleaner]\ninterval = {{ every = 1 }}\n[log]\nformat = 3\n[pruner]\nlow_watermark = 1.5\n[daemon]\nlease_ttl = \"soon\"\n[prefetcher]\nconcurrency = false\n"
        ),
        &[],
        &[
            &from("cache.max_size"),
            &from("cache.stall_time"),
            &from("database.max_connections"),
            &from("database.url"),
            &from("cleaner.interval"),
            &from("log.format"),
            &from("pruner.low_watermark"),
            &from("daemon.lease_ttl"),
            &from("prefetcher.concurrency"),
        ],
    );
    // A section given as a value.
    assert_config_refused(
        &s,
        &canary,
        &format!("node = \"x\"\n{head}"),
        &[],
        &["node (from"],
    );
    // Negative sizes and durations.
    assert_config_refused(
        &s,
        &canary,
        &format!(
            "{head}max_size = -1\nstall_time = -30\n[pruner]\nlow_watermark = \"-5MiB\"\nmin_free_disk = -1\n[cleaner]\ninvalid_grace = \"-1s\"\n[database]\nmax_connections = -3\n[prefetcher]\nmax_bytes_per_second = -100\nclaim_ttl = \"-1s\"\n"
        ),
        &[],
        &[
            &from("cache.max_size"),
            &from("cache.stall_time"),
            &from("pruner.low_watermark"),
            &from("pruner.min_free_disk"),
            &from("cleaner.invalid_grace"),
            &from("database.max_connections"),
            &from("prefetcher.max_bytes_per_second"),
            &from("prefetcher.claim_ttl"),
        ],
    );
    // A claim term so short that renewing it would spin on the database.
    assert_config_refused(
        &s,
        &canary,
        &format!("{head}[prefetcher]\nclaim_ttl = \"500ms\"\n"),
        &[],
        &[&format!(
            "{}: must be at least 1s",
            from("prefetcher.claim_ttl")
        )],
    );
    // Unknown keys, at every level.
    assert_config_refused(
        &s,
        &canary,
        &format!(
            "surprise = 1\n{head}bogus = 1\n[cache.deeper]\ny = 2\n[nonsense]\nx = 1\n[prefetcher]\nturbo = true\n[upstream.keystone]\nregion = \"x\"\n"
        ),
        &[],
        &[
            &from("surprise"),
            &from("cache.bogus"),
            &from("cache.deeper"),
            &from("nonsense"),
            &from("prefetcher.turbo"),
            &from("upstream.keystone.region"),
        ],
    );
    // Huge values.
    assert_config_refused(
        &s,
        &canary,
        &format!(
            "{head}max_size = \"99999999999TiB\"\nstall_time = \"999999999d\"\n[cleaner]\ninterval = \"99999999999999999999s\"\ninvalid_grace = 9223372036854775807\n[pruner]\nlow_watermark = \"184467440737095516160\"\n[database]\nmax_connections = 4294967296\n[daemon]\nshutdown_timeout = \"18446744073709551615m\"\nlease_ttl = \"99999999999999999999999999999999d\"\n"
        ),
        &[],
        &[
            &from("cache.max_size"),
            &from("cache.stall_time"),
            &from("cleaner.interval"),
            &from("cleaner.invalid_grace"),
            &from("pruner.low_watermark"),
            &from("database.max_connections"),
            &from("daemon.shutdown_timeout"),
            &from("daemon.lease_ttl"),
        ],
    );
    // An integer TOML itself cannot hold: the parse error names the line and the key.
    assert_config_refused(
        &s,
        &canary,
        &format!("{head}max_size = 99999999999999999999\n"),
        &[],
        &["line 3: cache.max_size:", "number too large", "\"10GiB\""],
    );
    // The same through the environment: each problem names its variable.
    assert_config_refused(
        &s,
        &canary,
        &head,
        &[
            ("GLANCE_CACHED_CACHE__MAX_SIZE", "-1"),
            ("GLANCE_CACHED_CACHE__STALL_TIME", "999999999d"),
            ("GLANCE_CACHED_CACHE__BOGUS", "1"),
            (
                "GLANCE_CACHED_PRUNER__MIN_FREE_DISK",
                "99999999999999999999",
            ),
        ],
        &[
            "cache.max_size (from GLANCE_CACHED_CACHE__MAX_SIZE)",
            "cache.stall_time (from GLANCE_CACHED_CACHE__STALL_TIME)",
            "cache.bogus (from GLANCE_CACHED_CACHE__BOGUS)",
            "pruner.min_free_disk (from GLANCE_CACHED_PRUNER__MIN_FREE_DISK)",
        ],
    );
    assert!(!dir.exists());
    canary.finish("hostile config");
}

#[test]
fn a_lying_or_redirecting_upstream_never_gets_anything_cached() {
    let origin = Origin::start();
    let other = Origin::start();
    let s = Setup::new("");
    let canary = Canary::new(s.tmp.path());
    other.add("elsewhere", test_bytes(1000, 1), Behaviour::default());
    let redirect = |to: String| Behaviour {
        redirect_to: Some(to),
        ..Default::default()
    };
    // Another host (and port), the local filesystem, and a loop on the same origin.
    origin.add(
        "redir-host",
        test_bytes(1000, 2),
        redirect(format!(
            "http://localhost:{}/v2/images/elsewhere/file",
            other.port
        )),
    );
    origin.add(
        "redir-file",
        test_bytes(1000, 3),
        redirect(format!("file://{}", canary.path("victim").display())),
    );
    origin.add(
        "redir-loop",
        test_bytes(1000, 4),
        redirect(format!("{}/v2/images/redir-loop/file", origin.url())),
    );
    // A body far larger than the declared size.
    origin.add(
        "oversized",
        test_bytes(4 << 20, 5),
        Behaviour {
            meta_size: Some(1000),
            ..Default::default()
        },
    );
    // A Content-Length that lies: the connection closes after a third of it.
    origin.add(
        "truncated",
        test_bytes(300_000, 6),
        Behaviour {
            truncate_at: Some(100_000),
            ..Default::default()
        },
    );
    // A body shorter than the declared size.
    origin.add(
        "undersized",
        test_bytes(5000, 7),
        Behaviour {
            meta_size: Some(6000),
            ..Default::default()
        },
    );
    // Failed writes stay in invalid/ for the test to inspect.
    std::fs::write(
        &s.config,
        format!(
            "[cache]\ndir = \"{}\"\nstall_time = \"1h\"\n[cleaner]\ninterval = \"1h\"\ninvalid_grace = \"1h\"\n[pruner]\ninterval = \"1h\"\n[daemon]\nshutdown_timeout = \"5s\"\n[prefetcher]\nretry_delay = \"100ms\"\nmax_retry_delay = \"200ms\"\ninterval = \"1h\"\nmax_attempts = 2\n[upstream]\nkind = \"glance\"\nurl = \"{}\"\n",
            s.cache("").display(),
            origin.url()
        ),
    )
    .unwrap();
    let mut d = s.start();
    let ids = [
        "redir-host",
        "redir-file",
        "redir-loop",
        "oversized",
        "truncated",
        "undersized",
    ];
    let mut args = vec!["queue"];
    args.extend(ids);
    cli_ok(&s.config, &args);
    let failed = |id: &str| -> Option<String> {
        let text = cli_ok(&s.config, &["list-queued", "--json"]);
        let rows: serde_json::Value = serde_json::from_str(&text).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["image_id"] == id && r["state"] == "failed")
            .map(|r| r["last_error"].as_str().unwrap().to_owned())
    };
    let permanent = [
        "redir-host",
        "redir-file",
        "redir-loop",
        "oversized",
        "undersized",
    ];
    eventually(SOON, "every hostile image is dropped", || {
        permanent.iter().all(|id| failed(id).is_some())
    });
    eventually(SOON, "the truncated image was tried a few times", || {
        origin.file_requests("truncated") >= 3
    });
    // reqwest does not follow a redirect to a non-HTTP scheme at all: the 302 itself is
    // the answer, and a 3xx is a permanent failure.
    for (id, why) in [
        ("redir-host", "redirect to another host"),
        ("redir-file", "HTTP 302"),
        ("redir-loop", "too many redirects"),
        ("oversized", "larger than declared (1000 bytes)"),
        ("undersized", "expected 6000"),
    ] {
        let reason = failed(id).unwrap();
        assert!(reason.contains(why), "{id}: {reason}");
    }
    assert_eq!(
        other.file_requests("elsewhere"),
        0,
        "the other host is never contacted"
    );
    assert_eq!(origin.file_requests("oversized"), 2, "max_attempts");
    // Nothing was ever published, and a body larger than declared never got more than
    // the declared size onto the disk.
    assert!(s.cached_ids().is_empty());
    for id in ids {
        assert!(!s.cache(id).exists(), "{id}");
    }
    let oversized = std::fs::metadata(s.cache("invalid/oversized")).unwrap();
    assert!(oversized.len() <= 1000, "{} bytes written", oversized.len());
    let truncated = std::fs::metadata(s.cache("invalid/truncated")).unwrap();
    assert!(
        truncated.len() <= 100_000,
        "{} bytes written",
        truncated.len()
    );
    assert!(d.alive(), "{}", d.log_text());
    d.stop();
    canary.finish("hostile upstream");
}
