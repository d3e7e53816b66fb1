//! The prefetcher through the real daemon against a real HTTP origin on loopback: each
//! upstream kind, Keystone, retries, permanent failures, verification, truncation,
//! concurrency, bandwidth, SIGTERM and kill -9 mid-download.

use std::time::{Duration, Instant};

use glance_cached::config::DEFAULT_NODE_URL;
use glance_cached::db::{DbTime, NodeDb};
use rustix::process::Signal;

use crate::kit::daemon::{Daemon, SOON, Setup, eventually, queue, queued_json};
use crate::kit::{md5_hex, sha512_hex, test_bytes};

use crate::kit::origin::{Behaviour, Origin};

const FAST_RETRY: &str =
    "[prefetcher]\nretry_delay = \"100ms\"\nmax_retry_delay = \"200ms\"\ninterval = \"1h\"\n";

fn glance_setup(origin: &Origin, extra: &str) -> Setup {
    Setup::new(&format!(
        "{FAST_RETRY}{extra}\n[upstream]\nkind = \"glance\"\nurl = \"{}\"\n",
        origin.url()
    ))
}

/// Waits until the first bytes of `id` are in `incomplete/`.
fn wait_until_downloading(s: &Setup, id: &str) {
    eventually(SOON, &format!("the download of {id} is under way"), || {
        std::fs::metadata(s.cache(&format!("incomplete/{id}"))).is_ok_and(|m| m.len() > 0)
    });
}

/// `glance-cached prefetch` in the background, its output captured.
fn spawn_prefetch_command(s: &Setup) -> std::process::Child {
    spawn_prefetch_command_with(s, &[])
}

/// `spawn_prefetch_command` with `env` set on top of the scrubbed environment.
fn spawn_prefetch_command_with(s: &Setup, env: &[(&str, &str)]) -> std::process::Child {
    crate::kit::cli::on_config(&s.config, &["prefetch"], env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `id` is cached and checks its bytes and recorded checksum.
fn assert_cached(s: &Setup, id: &str, data: &[u8]) {
    eventually(Duration::from_secs(20), &format!("{id} is cached"), || {
        s.cached_ids().iter().any(|c| c == id)
    });
    assert_eq!(std::fs::read(s.cache(id)).unwrap(), data, "{id} bytes");
    let out = s.cli(&["list-cached", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["image_id"] == id)
        .unwrap();
    assert_eq!(row["checksum"], md5_hex(data).as_str());
}

#[test]
fn glance_upstream_with_keystone_prefetches_queued_images() {
    let origin = Origin::start();
    origin.require_keystone(2); // short-lived tokens: renewed during the test
    let images: Vec<(String, Vec<u8>)> = (0..3)
        .map(|n| (format!("img-{n}"), test_bytes(300_000 + n * 1000, n as u8)))
        .collect();
    for (id, data) in &images {
        origin.add(id, data.clone(), Behaviour::default());
    }
    let s = Setup::new(&format!(
        "{FAST_RETRY}\n[upstream]\nkind = \"glance\"\nurl = \"{url}\"\n[upstream.keystone]\nauth_url = \"{url}/v3\"\nusername = \"u\"\npassword = \"p\"\nproject_name = \"service\"\n",
        url = origin.url()
    ));
    let d = s.start();
    queue(&s, &["img-0", "img-1"]);
    for (id, data) in &images[..2] {
        assert_cached(&s, id, data);
    }
    assert!(
        queued_json(&s).is_empty(),
        "published images leave the queue"
    );
    assert!(!s.cache("queue/img-0").exists(), "and their markers");
    // Past half the token's life a new one is issued.
    std::thread::sleep(Duration::from_millis(1200));
    queue(&s, &["img-2"]);
    assert_cached(&s, "img-2", &images[2].1);
    assert!(
        origin.with_stats(|st| st.tokens_issued) >= 2,
        "the token was renewed"
    );
    // An image already cached is not downloaded again.
    queue(&s, &["img-0"]);
    std::fs::write(s.cache("queue/img-1"), b"").unwrap(); // Glance re-queues it by marker
    eventually(SOON, "the re-queued marker is dropped", || {
        !s.cache("queue/img-1").exists()
    });
    assert_eq!(origin.file_requests("img-0"), 1);
    assert_eq!(origin.file_requests("img-1"), 1);
    eventually(SOON, "the prefetch is logged", || {
        let log = d.log_text();
        log.contains("prefetched image") && log.contains("image_id=img-0")
    });
    d.stop();
}

#[test]
fn glance_upstream_with_a_token_file() {
    let origin = Origin::start();
    origin.require_token("static-secret");
    let data = test_bytes(50_000, 9);
    origin.add("tok-img", data.clone(), Behaviour::default());
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "static-secret\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let s = glance_setup(&origin, "");
    let upstream_line = format!("token_file = \"{}\"\n", token.display());
    std::fs::write(
        &s.config,
        std::fs::read_to_string(&s.config).unwrap().replace(
            "kind = \"glance\"\n",
            &format!("kind = \"glance\"\n{upstream_line}"),
        ),
    )
    .unwrap();
    // A world-readable token file is refused.
    let out = s.cli(&["check-config"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("world-readable"));
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let d = s.start();
    queue(&s, &["tok-img"]);
    assert_cached(&s, "tok-img", &data);
    d.stop();
}

#[test]
fn http_and_directory_upstreams() {
    let origin = Origin::start();
    let data = test_bytes(200_000, 4);
    origin.add("plain-1", data.clone(), Behaviour::default());
    let s = Setup::new(&format!(
        "{FAST_RETRY}\n[upstream]\nkind = \"http\"\nurl_template = \"{}/plain/{{image_id}}\"\nmd5_header = \"X-Checksum-Md5\"\nsha512_header = \"X-Checksum-Sha512\"\n",
        origin.url()
    ));
    let d = s.start();
    queue(&s, &["plain-1"]);
    assert_cached(&s, "plain-1", &data);
    d.stop();

    let store = tempfile::tempdir().unwrap();
    let file_data = test_bytes(700_000, 6);
    std::fs::write(store.path().join("dir-img"), &file_data).unwrap();
    let s = Setup::new(&format!(
        "{FAST_RETRY}\n[upstream]\nkind = \"directory\"\npath = \"{}\"\n",
        store.path().display()
    ));
    let d = s.start();
    queue(&s, &["dir-img", "missing-img"]);
    assert_cached(&s, "dir-img", &file_data);
    eventually(SOON, "the missing image is dropped", || {
        queued_json(&s)
            .iter()
            .any(|q| q["image_id"] == "missing-img" && q["state"] == "failed")
    });
    d.stop();
}

#[test]
fn retryable_failures_are_retried_then_succeed() {
    let origin = Origin::start();
    let data = test_bytes(100_000, 2);
    origin.add(
        "flaky",
        data.clone(),
        Behaviour {
            fail_times: 2,
            fail_status: 503,
            ..Default::default()
        },
    );
    origin.add(
        "limited",
        data.clone(),
        Behaviour {
            fail_times: 1,
            fail_status: 429,
            ..Default::default()
        },
    );
    let s = glance_setup(&origin, "");
    let d = s.start();
    queue(&s, &["flaky", "limited"]);
    assert_cached(&s, "flaky", &data);
    assert_cached(&s, "limited", &data);
    assert_eq!(origin.file_requests("flaky"), 3);
    assert!(d.log_text().contains("will retry"));
    d.stop();
}

#[test]
fn permanent_failures_are_dropped_with_their_reason() {
    let origin = Origin::start();
    origin.add(
        "queued-img",
        vec![1; 10],
        Behaviour {
            status: Some("queued".into()),
            ..Default::default()
        },
    );
    origin.add("too-big", vec![1; 5000], Behaviour::default());
    let other = Origin::start();
    other.add("elsewhere", vec![1; 10], Behaviour::default());
    origin.add(
        "redirected",
        vec![1; 10],
        Behaviour {
            redirect_to: Some(format!("{}/v2/images/elsewhere/file", other.url())),
            ..Default::default()
        },
    );
    let s = glance_setup(&origin, "");
    std::fs::write(
        &s.config,
        std::fs::read_to_string(&s.config).unwrap().replace(
            "stall_time = \"1h\"",
            "stall_time = \"1h\"\nmax_size = 1000",
        ),
    )
    .unwrap();
    let d = s.start();
    queue(&s, &["not-there", "queued-img", "too-big", "redirected"]);
    eventually(SOON, "all four are dropped", || {
        queued_json(&s)
            .iter()
            .filter(|q| q["state"] == "failed")
            .count()
            == 4
    });
    let rows = queued_json(&s);
    let reason = |id: &str| {
        rows.iter().find(|q| q["image_id"] == id).unwrap()["last_error"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(
        reason("not-there").contains("404"),
        "{}",
        reason("not-there")
    );
    assert!(
        reason("queued-img").contains("not active"),
        "{}",
        reason("queued-img")
    );
    assert!(
        reason("too-big").contains("larger than cache.max_size"),
        "{}",
        reason("too-big")
    );
    assert!(
        reason("redirected").contains("redirect to another host"),
        "{}",
        reason("redirected")
    );
    assert_eq!(
        other.file_requests("elsewhere"),
        0,
        "the other host was never contacted"
    );
    assert!(
        !s.cache("queue/not-there").exists(),
        "a dropped image's marker goes"
    );
    assert!(s.cached_ids().is_empty());
    // Re-queueing a failed image brings it back.
    origin.add("queued-img", vec![7; 10], Behaviour::default());
    queue(&s, &["queued-img"]);
    assert_cached(&s, "queued-img", &[7; 10]);
    assert!(d.log_text().contains("dropped from the queue"));
    d.stop();
}

#[test]
fn bad_bytes_are_never_cached() {
    let origin = Origin::start();
    let data = test_bytes(300_000, 8);
    origin.add(
        "bad-md5",
        data.clone(),
        Behaviour {
            wrong_md5: true,
            ..Default::default()
        },
    );
    origin.add(
        "truncated",
        data.clone(),
        Behaviour {
            truncate_at: Some(100_000),
            ..Default::default()
        },
    );
    origin.add(
        "oversized",
        data.clone(),
        Behaviour {
            meta_size: Some(1000),
            ..Default::default()
        },
    );
    // Under `all` the MD5 is checked beside the correct SHA-512 (under the default,
    // `strongest`, see `strongest_caches_an_image_whose_sha512_matches_despite_a_wrong_md5`).
    let s = glance_setup(&origin, "max_attempts = 2\nverify = \"all\"\n");
    let d = s.start();
    queue(&s, &["bad-md5", "truncated", "oversized"]);
    eventually(
        SOON,
        "the checksum mismatch is dropped after max_attempts",
        || {
            queued_json(&s)
                .iter()
                .any(|q| q["image_id"] == "bad-md5" && q["state"] == "failed")
        },
    );
    eventually(SOON, "the truncated image was tried a few times", || {
        origin.file_requests("truncated") >= 3
    });
    eventually(SOON, "the oversized image was tried twice", || {
        queued_json(&s)
            .iter()
            .any(|q| q["image_id"] == "oversized" && q["state"] == "failed")
    });
    let rows = queued_json(&s);
    let bad = rows.iter().find(|q| q["image_id"] == "bad-md5").unwrap();
    assert_eq!(bad["attempts"], 2);
    assert!(bad["last_error"].as_str().unwrap().contains("md5"));
    let truncated = rows.iter().find(|q| q["image_id"] == "truncated").unwrap();
    assert_eq!(
        truncated["state"], "queued",
        "a network failure is retried, not dropped"
    );
    assert_eq!(origin.file_requests("bad-md5"), 2);
    assert!(s.cached_ids().is_empty(), "nothing was published");
    for id in ["bad-md5", "truncated", "oversized"] {
        assert!(!s.cache(id).exists());
    }
    d.stop();
}

/// Waits until `id` has been dropped as failed after `max_attempts = 2`, and checks that
/// its last error names `digest`, that it was fetched twice and that nothing was cached.
fn assert_refused(s: &Setup, origin: &Origin, id: &str, digest: &str) {
    eventually(SOON, &format!("{id} is dropped after max_attempts"), || {
        queued_json(s)
            .iter()
            .any(|q| q["image_id"] == id && q["state"] == "failed")
    });
    let rows = queued_json(s);
    let row = rows.iter().find(|q| q["image_id"] == id).unwrap();
    assert_eq!(row["attempts"], 2, "{id}");
    let error = row["last_error"].as_str().unwrap();
    assert!(error.contains(digest), "{id}: {error}");
    assert_eq!(origin.file_requests(id), 2, "{id}");
    assert!(s.cached_ids().is_empty(), "{id}: nothing was published");
    assert!(!s.cache(id).exists(), "{id}");
}

/// The SHA-512 is what pins the bytes: a wrong one is refused (retried, then dropped,
/// nothing cached) whichever `prefetcher.verify` is set, the MD5 being right.
#[test]
fn a_wrong_sha512_is_refused_under_both_policies() {
    let origin = Origin::start();
    for policy in ["strongest", "all"] {
        let id = format!("bad-sha-{policy}");
        origin.add(
            &id,
            test_bytes(300_000, 9),
            Behaviour {
                sha512_text: Some(sha512_hex(b"other bytes")),
                ..Default::default()
            },
        );
        let s = glance_setup(
            &origin,
            &format!("max_attempts = 2\nverify = \"{policy}\"\n"),
        );
        let d = s.start();
        queue(&s, &[&id]);
        assert_refused(&s, &origin, &id, "sha512");
        d.stop();
    }
}

/// With no stronger digest published (an HTTP upstream giving only the MD5 header), the
/// default `strongest` checks the MD5: a wrong one is refused.
#[test]
fn a_wrong_md5_is_refused_under_strongest_when_nothing_stronger_is_published() {
    let origin = Origin::start();
    let data = test_bytes(300_000, 10);
    origin.add(
        "md5-only",
        data,
        Behaviour {
            wrong_md5: true,
            ..Default::default()
        },
    );
    let s = Setup::new(&format!(
        "{FAST_RETRY}max_attempts = 2\n\n[upstream]\nkind = \"http\"\nurl_template = \"{}/plain/{{image_id}}\"\nmd5_header = \"X-Checksum-Md5\"\n",
        origin.url()
    ));
    let d = s.start();
    queue(&s, &["md5-only"]);
    assert_refused(&s, &origin, "md5-only", "md5");
    d.stop();
}

/// The point of the default `prefetcher.verify = "strongest"`: with a SHA-512 published
/// the MD5 is neither computed nor checked, so an image whose SHA-512 matches is cached
/// even though its advertised MD5 is wrong, and its row's `checksum` is the MD5 the
/// upstream gave (Glance computed both over one upload; the SHA-512 pins the bytes).
/// Under `all` the same image is refused (`bad_bytes_are_never_cached`).
#[test]
fn strongest_caches_an_image_whose_sha512_matches_despite_a_wrong_md5() {
    let origin = Origin::start();
    let data = test_bytes(300_000, 11);
    origin.add(
        "sha-pins",
        data.clone(),
        Behaviour {
            wrong_md5: true,
            ..Default::default()
        },
    );
    let s = glance_setup(&origin, "max_attempts = 2\n");
    let d = s.start();
    queue(&s, &["sha-pins"]);
    eventually(Duration::from_secs(20), "sha-pins is cached", || {
        s.cached_ids().iter().any(|c| c == "sha-pins")
    });
    assert_eq!(std::fs::read(s.cache("sha-pins")).unwrap(), data);
    let out = s.cli(&["list-cached", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["image_id"] == "sha-pins")
        .unwrap();
    assert_eq!(
        row["checksum"],
        "0".repeat(32).as_str(),
        "the row holds the upstream's MD5"
    );
    assert_eq!(origin.file_requests("sha-pins"), 1, "fetched once");
    d.stop();
}

/// `prefetcher.verify` is reloadable: an image refused under `all` for its wrong MD5 is
/// cached once a SIGHUP has switched the daemon to `strongest` and it is queued again.
#[test]
fn a_reload_changes_the_verification_policy() {
    let origin = Origin::start();
    let data = test_bytes(200_000, 12);
    origin.add(
        "reverify",
        data.clone(),
        Behaviour {
            wrong_md5: true,
            ..Default::default()
        },
    );
    let config = |policy: &str| {
        format!(
            "{FAST_RETRY}max_attempts = 1\nverify = \"{policy}\"\n\n[upstream]\nkind = \"glance\"\nurl = \"{}\"\n",
            origin.url()
        )
    };
    let s = Setup::new(&config("all"));
    let mut d = s.start();
    queue(&s, &["reverify"]);
    eventually(SOON, "refused under all", || {
        queued_json(&s)
            .iter()
            .any(|q| q["image_id"] == "reverify" && q["state"] == "failed")
    });
    s.write_config(&config("strongest"));
    let from = d.notify.mark();
    d.signal(Signal::HUP);
    let reloading = d.notify.wait_for(from, SOON, |m| m.contains("RELOADING=1"));
    d.notify
        .wait_for(reloading + 1, SOON, |m| m.contains("READY=1"));
    queue(&s, &["reverify"]);
    eventually(Duration::from_secs(20), "cached under strongest", || {
        s.cached_ids().iter().any(|c| c == "reverify")
    });
    assert_eq!(std::fs::read(s.cache("reverify")).unwrap(), data);
    d.stop();
}

#[test]
fn concurrency_is_limited() {
    let origin = Origin::start();
    let slow = Behaviour::slow(40);
    let ids: Vec<String> = (0..6).map(|n| format!("c-{n}")).collect();
    for id in &ids {
        origin.add(id, test_bytes(256 * 1024, 3), slow.clone());
    }
    let s = glance_setup(&origin, "concurrency = 2\n");
    let mut d = s.start();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    queue(&s, &refs);
    // `systemctl status` shows the downloads in progress, and none once they are done.
    let busy = d.notify.wait_for(0, SOON, |m| {
        m.contains("STATUS=") && m.contains("2 downloading")
    });
    eventually(Duration::from_secs(30), "all six are cached", || {
        s.cached_ids().len() == 6
    });
    assert_eq!(origin.with_stats(|st| st.max_in_flight), 2);
    d.notify.wait_for(busy + 1, SOON, |m| {
        m.contains("STATUS=") && m.contains("0 queued") && !m.contains("downloading")
    });
    d.stop();
}

#[test]
fn bandwidth_is_capped() {
    let origin = Origin::start();
    let data = test_bytes(2 << 20, 5);
    origin.add("paced", data.clone(), Behaviour::default());
    let s = glance_setup(&origin, "max_bytes_per_second = \"1MiB\"\n");
    let d = s.start();
    let started = Instant::now();
    queue(&s, &["paced"]);
    assert_cached(&s, "paced", &data);
    // 2 MiB at 1 MiB/s cannot take less than about 2 s (the first chunk is free).
    assert!(
        started.elapsed() >= Duration::from_millis(1800),
        "{:?}",
        started.elapsed()
    );
    d.stop();
}

#[test]
fn sigterm_mid_download_publishes_nothing_and_keeps_the_image_queued() {
    let origin = Origin::start();
    let slow = Behaviour::slow(100);
    origin.add("big-slow", test_bytes(4 << 20, 1), slow);
    let s = glance_setup(&origin, "");
    let mut d = s.start();
    queue(&s, &["big-slow"]);
    wait_until_downloading(&s, "big-slow");
    // `list-queued` names the process downloading it.
    let downloading_by = queued_json(&s)[0]["downloading_by"].clone();
    assert!(
        downloading_by
            .as_str()
            .is_some_and(|h| h.contains(&format!("pid {} [", d.child.id()))),
        "{downloading_by}"
    );
    let from = d.notify.mark();
    let stopping = Instant::now();
    d.signal(Signal::TERM);
    assert!(d.wait_exit(SOON).success());
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "stopped within the deadline"
    );
    d.notify
        .wait_for(from, Duration::from_secs(1), |m| m.contains("STOPPING=1"));
    assert!(!s.cache("big-slow").exists(), "nothing published");
    assert!(
        !s.cache("incomplete/big-slow").exists(),
        "the partial file went to invalid/"
    );
    let rows = queued_json(&s);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["state"], "queued");
    assert!(
        rows[0]["downloading_by"].is_null(),
        "the claim was released"
    );
}

#[test]
fn kill_9_mid_download_then_restart_fetches_it_again() {
    let origin = Origin::start();
    let data = test_bytes(3 << 20, 11);
    origin.add("crashy", data.clone(), Behaviour::slow(30));
    let s = glance_setup(&origin, "");
    let mut d = s.start();
    queue(&s, &["crashy"]);
    eventually(SOON, "the download is under way", || {
        std::fs::metadata(s.cache("incomplete/crashy")).is_ok_and(|m| m.len() > 100_000)
    });
    d.signal(Signal::KILL);
    d.wait_exit(SOON);
    drop(d);
    assert!(!s.cache("crashy").exists());
    assert!(
        s.cache("incomplete/crashy").exists(),
        "the crash left a partial file"
    );
    // The killed daemon's lease is still fresh, but its process is gone: a plain restart
    // (what systemd does) takes it over.
    let d = Daemon::start(s.tmp.path(), &s.config, &[]);
    assert!(
        d.log_text().contains("no longer running"),
        "{}",
        d.log_text()
    );
    assert_cached(&s, "crashy", &data);
    assert!(!s.cache("incomplete/crashy").exists());
    assert_eq!(origin.file_requests("crashy"), 2);
    d.stop();
}

/// A queued image whose file was published but whose row was lost (a database outage
/// between the two): the prefetcher finds it cached, does not download it again, and
/// gives the file its row before taking it off the queue.
#[test]
fn a_queued_image_found_cached_gets_its_row_before_leaving_the_queue() {
    let origin = Origin::start();
    let s = Setup::new(&format!(
        "[prefetcher]\ninterval = \"1s\"\n[upstream]\nkind = \"glance\"\nurl = \"{}\"\n",
        origin.url()
    ));
    let d = s.start();
    // The state such an outage leaves: the file in place, the queue row, no image row.
    // Planted after start, so the startup reconcile cannot be what repairs it.
    std::fs::write(s.cache("lost-row"), b"published before the outage").unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let db = s.db().await;
        let db = NodeDb::configure(db, DEFAULT_NODE_URL).await.unwrap();
        let now = DbTime::from_utc(chrono::Utc::now());
        assert!(db.enqueue("lost-row", now).await.unwrap());
        db.db().close().await;
    });
    eventually(SOON, "the queue entry is settled", || {
        queued_json(&s).is_empty()
    });
    assert_eq!(s.cached_ids(), ["lost-row"], "the file got its row");
    assert_eq!(
        origin.file_requests("lost-row"),
        0,
        "nothing was downloaded"
    );
    assert!(d.log_text().contains("already cached; taken off the queue"));
    d.stop();
}

/// Two downloads that each fit in the cache alone but not together: the second waits
/// for room, so cached plus partly downloaded bytes never exceed `cache.max_size` (the
/// pruner acting only after both are published would be too late).
#[test]
fn concurrent_downloads_make_room_for_each_other() {
    downloads_stay_within_max_size(Behaviour::slow(40));
}

/// The same when the upstream tells no size (Glance's metadata without `size`, a body
/// without `Content-Length`): such a download reserves room step by step as its bytes
/// arrive, instead of none.
#[test]
fn downloads_of_unknown_size_stay_within_max_size() {
    downloads_stay_within_max_size(Behaviour {
        no_size: true,
        ..Behaviour::slow(40)
    });
}

fn downloads_stay_within_max_size(behaviour: Behaviour) {
    let origin = Origin::start();
    let (a, b) = (test_bytes(600 * 1024, 1), test_bytes(600 * 1024, 2));
    origin.add("room-a", a.clone(), behaviour.clone());
    origin.add("room-b", b.clone(), behaviour);
    let s = Setup::new(&format!(
        "max_size = \"1000KiB\"\n{FAST_RETRY}concurrency = 2\n[upstream]\nkind = \"glance\"\nurl = \"{}\"\n",
        origin.url()
    ));
    let d = s.start();
    // Samples the bytes of both images wherever they are (cached or being written).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, root) = (stop.clone(), s.cache(""));
        std::thread::spawn(move || {
            let mut peak = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut total = 0;
                for dir in [root.clone(), root.join("incomplete")] {
                    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                        if entry.file_name().to_string_lossy().starts_with("room-") {
                            total += entry.metadata().map(|m| m.len()).unwrap_or(0);
                        }
                    }
                }
                peak = peak.max(total);
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        })
    };
    queue(&s, &["room-a", "room-b"]);
    eventually(Duration::from_secs(30), "both were downloaded", || {
        origin.file_requests("room-a") >= 1
            && origin.file_requests("room-b") >= 1
            && queued_json(&s).is_empty()
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    assert!(peak > 0, "the sampler saw the downloads");
    assert!(
        peak <= 1000 * 1024,
        "cached + in-progress bytes peaked at {peak}, above max_size"
    );
    // Only one fits: the later one, the earlier evicted to make room for it.
    let cached = s.cached_ids();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let data = if cached[0] == "room-a" { &a } else { &b };
    assert_eq!(&std::fs::read(s.cache(&cached[0])).unwrap(), data);
    d.stop();
}

/// `glance-cached prefetch` without a daemon, as Glance's cron prefetcher is used: it
/// drains what is due (queued rows and Glance's markers), records each outcome as the
/// daemon would, says what happened to each image, and exits 1 while any failed.
#[test]
fn the_prefetch_command_drains_the_queue_once() {
    let origin = Origin::start();
    let (one, two) = (test_bytes(200_000, 4), test_bytes(150_000, 5));
    origin.add("cli-one", one.clone(), Behaviour::default());
    origin.add("cli-two", two.clone(), Behaviour::default());
    let s = glance_setup(&origin, "");
    queue(&s, &["cli-one", "cli-gone"]);
    // A marker as Glance's PUT /v2/cache/{id} leaves it.
    std::fs::write(s.cache("queue/cli-two"), b"").unwrap();
    let out = s.cli(&["prefetch"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    for expected in [
        "prefetched cli-one (200000 bytes)",
        "prefetched cli-two (150000 bytes)",
        "failed cli-gone for good:",
        "prefetched 2 images (0 already cached), 1 failed",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in {stdout}"
        );
    }
    assert!(stderr.contains("error: 1 images failed"), "{stderr}");
    assert_cached(&s, "cli-one", &one);
    assert_cached(&s, "cli-two", &two);
    let queued = queued_json(&s);
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert_eq!(
        (queued[0]["image_id"].as_str(), queued[0]["state"].as_str()),
        (Some("cli-gone"), Some("failed"))
    );
    // Nothing due: a clean run, and nothing downloaded again.
    let out = s.cli(&["prefetch"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(origin.file_requests("cli-one"), 1);
    // Without an upstream there is nothing to prefetch from: one clear line.
    let bare = Setup::new("");
    let out = bare.cli(&["prefetch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no [upstream] section"));
}

/// SIGTERM to `glance-cached prefetch` mid-download: it stops at once, publishes
/// nothing, leaves the image queued and nothing in `incomplete/`, and says so. The
/// writer thread is made slow to move the bytes away (half a second at the
/// `writer:abort` failpoint): the command waits for it before it exits.
#[test]
fn sigterm_stops_the_prefetch_command_cleanly() {
    let origin = Origin::start();
    let slow = Behaviour::slow(100);
    origin.add("cli-slow", test_bytes(4 << 20, 6), slow);
    let s = glance_setup(&origin, "");
    queue(&s, &["cli-slow"]);
    let child = spawn_prefetch_command_with(
        &s,
        &[
            ("GLANCE_CACHED_TEST_FAILPOINT", "writer:abort"),
            ("GLANCE_CACHED_TEST_FAILPOINT_PAUSE_MS", "500"),
        ],
    );
    wait_until_downloading(&s, "cli-slow");
    let stopping = Instant::now();
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, Signal::TERM).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "stopped at once"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("interrupted cli-slow; it stays queued"),
        "{stdout}"
    );
    assert!(!s.cache("cli-slow").exists(), "nothing published");
    assert!(!s.cache("incomplete/cli-slow").exists());
    let rows = queued_json(&s);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["state"], "queued");
    // Its claim was released: the next run takes it at once.
    let data = test_bytes(4 << 20, 6);
    origin.add("cli-slow", data.clone(), Behaviour::default());
    let out = s.cli(&["prefetch"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_cached(&s, "cli-slow", &data);
}

/// A daemon started while `glance-cached prefetch` downloads (an operator's one-off run,
/// or the daemon's first start after an upgrade from the cron tools) leaves the
/// command's claim and partial file alone: the command publishes, and the image is
/// downloaded once.
#[test]
fn a_daemon_starting_beside_the_prefetch_command_leaves_its_download_alone() {
    let origin = Origin::start();
    // 64 chunks of 64 KiB, 80 ms apart: about 5 s, well beyond the daemon's start.
    let data = test_bytes(4 << 20, 8);
    origin.add("beside", data.clone(), Behaviour::slow(80));
    let s = glance_setup(&origin, "");
    queue(&s, &["beside"]);
    let command = spawn_prefetch_command(&s);
    wait_until_downloading(&s, "beside");
    let mut d = s.start();
    d.notify.wait_for(0, SOON, |m| m.contains("READY=1"));
    assert!(
        s.cache("incomplete/beside").exists() && !s.cache("invalid/beside").exists(),
        "the daemon left the partial file where it was"
    );
    let rows = queued_json(&s);
    assert!(
        rows[0]["downloading_by"]
            .as_str()
            .is_some_and(|h| h.starts_with("prefetch on ")),
        "the command still holds its claim: {rows:?}"
    );
    let out = command.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("prefetched beside (4194304 bytes)"),
        "{stdout}"
    );
    assert_cached(&s, "beside", &data);
    assert_eq!(origin.file_requests("beside"), 1, "downloaded once");
    assert!(d.log_text().contains("still running in another process"));
    assert!(d.alive());
    d.stop();
}

/// A `prefetch` command killed beside a running daemon leaves a claim that would hold
/// its image for `prefetcher.claim_ttl`: the daemon sees at its next queue pass that the
/// holder is gone, moves the partial file away and fetches the image itself.
#[test]
fn the_daemon_recovers_the_claim_of_a_prefetch_command_killed_beside_it() {
    let origin = Origin::start();
    let data = test_bytes(3 << 20, 10);
    origin.add("orphan", data.clone(), Behaviour::slow(80));
    // The queue pass every second is what finds the dead holder.
    let s = Setup::new(&format!(
        "[prefetcher]\ninterval = \"1s\"\nretry_delay = \"100ms\"\nmax_retry_delay = \"200ms\"\n\n[upstream]\nkind = \"glance\"\nurl = \"{}\"\n",
        origin.url()
    ));
    queue(&s, &["orphan"]);
    let mut command = spawn_prefetch_command(&s);
    wait_until_downloading(&s, "orphan");
    let mut d = s.start();
    d.notify.wait_for(0, SOON, |m| m.contains("READY=1"));
    command.kill().unwrap();
    command.wait().unwrap();
    assert_cached(&s, "orphan", &data);
    assert_eq!(origin.file_requests("orphan"), 2, "fetched again once");
    assert!(
        d.log_text()
            .contains("released the claims of a process that is no longer running"),
        "{}",
        d.log_text()
    );
    assert!(!s.cache("incomplete/orphan").exists());
    assert!(queued_json(&s).is_empty());
    d.stop();
}

/// A download that outlasts its claim keeps it: the daemon renews the claims of its
/// downloads in progress six times per `prefetcher.claim_ttl`, so its second worker
/// never claims the image again beside the first.
#[test]
fn a_download_longer_than_its_claim_is_not_claimed_again() {
    let origin = Origin::start();
    // 48 chunks, 80 ms apart: about 4 s, more than three claim terms.
    let data = test_bytes(3 << 20, 12);
    origin.add("long", data.clone(), Behaviour::slow(80));
    let s = glance_setup(&origin, "concurrency = 2\nclaim_ttl = \"1200ms\"\n");
    let d = s.start();
    queue(&s, &["long"]);
    wait_until_downloading(&s, "long");
    let started = Instant::now();
    assert_cached(&s, "long", &data);
    assert!(
        started.elapsed() > Duration::from_millis(1200),
        "the download outlasted its first claim term"
    );
    assert_eq!(origin.file_requests("long"), 1, "claimed and fetched once");
    d.stop();
}

/// The `prefetch` command renews its claims too: a second command started after the
/// first claim term has run out finds nothing to do, and the image is fetched once.
#[test]
fn the_prefetch_command_renews_its_claims() {
    let origin = Origin::start();
    // 48 chunks, 80 ms apart: about 4 s, more than three claim terms.
    let data = test_bytes(3 << 20, 13);
    origin.add("cli-long", data.clone(), Behaviour::slow(80));
    let s = glance_setup(&origin, "claim_ttl = \"1200ms\"\n");
    queue(&s, &["cli-long"]);
    let first = spawn_prefetch_command(&s);
    wait_until_downloading(&s, "cli-long");
    std::thread::sleep(Duration::from_millis(1500));
    let second = s.cli(&["prefetch"]);
    let second_out = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success(), "{second_out}");
    assert!(
        second_out.contains("prefetched 0 images"),
        "the second command found the image claimed: {second_out}"
    );
    let out = first.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("prefetched cli-long (3145728 bytes)"),
        "{stdout}"
    );
    assert_cached(&s, "cli-long", &data);
    assert_eq!(origin.file_requests("cli-long"), 1, "fetched once");
}

/// The Glance upstream asks for `bytes=0-`: a `206` is taken only when its
/// `Content-Range` is the whole image; a part of it is refused with a clear reason.
#[test]
fn a_ranged_answer_must_cover_the_whole_image() {
    let origin = Origin::start();
    let data = test_bytes(100_000, 9);
    let partial = |first, last| Behaviour {
        partial: Some((first, last)),
        ..Default::default()
    };
    origin.add("whole-206", data.clone(), partial(0, 99_999));
    origin.add("half-206", data.clone(), partial(0, 49_999));
    let s = glance_setup(&origin, "");
    let d = s.start();
    queue(&s, &["whole-206", "half-206"]);
    eventually(SOON, "one is cached and the other dropped", || {
        s.cached_ids() == ["whole-206"]
            && queued_json(&s)
                .iter()
                .any(|q| q["image_id"] == "half-206" && q["state"] == "failed")
    });
    assert_eq!(std::fs::read(s.cache("whole-206")).unwrap(), data);
    let rows = queued_json(&s);
    let reason = rows.iter().find(|q| q["image_id"] == "half-206").unwrap()["last_error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        reason.contains("bytes 0-49999/100000") && reason.contains("not the whole image"),
        "{reason}"
    );
    d.stop();
}
