//! Reconcile through the binary: rows refreshed when a file changed size under them, and
//! the refusal to drop most of a node's rows when their files are missing (an unmounted
//! cache filesystem), unless the operator says they are gone.

use crate::kit::daemon::{Daemon, SOON, Setup, cached_json};
use crate::kit::{md5_hex, test_bytes};

fn import(s: &Setup, id: &str, data: &[u8]) {
    let src = s.tmp.path().join(format!("{id}.src"));
    std::fs::write(&src, data).unwrap();
    let out = s.cli(&["import", id, src.to_str().unwrap(), "--md5", &md5_hex(data)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_file_replaced_in_place_gets_its_size_refreshed_and_its_checksum_cleared() {
    let s = Setup::new("");
    import(&s, "replaced", &test_bytes(100_000, 1));
    import(&s, "untouched", &test_bytes(1_000, 2));
    // Copied over by hand (same inode, new bytes), and another one truncated.
    std::fs::write(s.cache("replaced"), test_bytes(60_000, 3)).unwrap();
    let out = s.cli(&["reconcile"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("refreshed row replaced"), "{text}");
    assert!(text.contains("1 rows refreshed"), "{text}");
    let rows = cached_json(&s);
    let replaced = rows.iter().find(|r| r["image_id"] == "replaced").unwrap();
    assert_eq!(replaced["size"], 60_000, "{replaced}");
    assert!(replaced["checksum"].is_null(), "{replaced}");
    let untouched = rows.iter().find(|r| r["image_id"] == "untouched").unwrap();
    assert_eq!(
        untouched["checksum"],
        md5_hex(&test_bytes(1_000, 2)).as_str()
    );

    // The daemon's start-up reconcile does the same, and logs it.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(s.cache("untouched"))
        .unwrap();
    file.set_len(10).unwrap(); // a disk error's truncation
    let d = s.start();
    let untouched = cached_json(&s)
        .into_iter()
        .find(|r| r["image_id"] == "untouched")
        .unwrap();
    assert_eq!(untouched["size"], 10, "{untouched}");
    assert!(untouched["checksum"].is_null(), "{untouched}");
    let log = d.log_text();
    assert!(
        log.contains("size differs from its row") && log.contains("untouched"),
        "{log}"
    );
    d.stop();
}

#[test]
fn an_empty_cache_directory_does_not_empty_the_node_unless_forced() {
    let s = Setup::new("");
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        s.import(id, 1000 + i);
    }
    // The cache filesystem is not mounted: the directory below holds none of the images.
    let aside = s.tmp.path().join("aside");
    std::fs::create_dir(&aside).unwrap();
    for id in ["a", "b", "c"] {
        std::fs::rename(s.cache(id), aside.join(id)).unwrap();
    }
    let mut d = Daemon::spawn(s.tmp.path(), &s.config, &[], &[]);
    let status = d.wait_exit(SOON);
    assert_eq!(status.code(), Some(1), "{}", d.log_text());
    let log = d.log_text();
    assert!(
        log.contains("refusing to reconcile: 3 of this node's 3 cached images have no file")
            && log.contains("--force-reconcile"),
        "{log}"
    );
    assert_eq!(s.cached_ids(), ["a", "b", "c"], "no row was dropped");
    // The CLI refuses alike, and changes nothing.
    let out = s.cli(&["reconcile"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is its filesystem mounted?"), "{err}");
    assert_eq!(s.cached_ids(), ["a", "b", "c"]);

    // Mounted again: everything is there, nothing is dropped.
    std::fs::rename(aside.join("a"), s.cache("a")).unwrap();
    std::fs::rename(aside.join("b"), s.cache("b")).unwrap();
    // One of three missing is an operator's rm: dropped without asking.
    let d = s.start();
    assert_eq!(s.cached_ids(), ["a", "b"]);
    d.stop();

    // Really gone: the operator says so.
    for id in ["a", "b"] {
        std::fs::remove_file(s.cache(id)).unwrap();
    }
    let d = Daemon::start(s.tmp.path(), &s.config, &["--force-reconcile"]);
    assert!(s.cached_ids().is_empty());
    assert!(d.log_text().contains("removed_rows=2"), "{}", d.log_text());
    d.stop();
}
