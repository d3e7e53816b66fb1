//! A full disk (issue 7, item 2): the cache directory is a tmpfs of 8 MiB mounted by the
//! test (root only), the database lives elsewhere, and the real daemon prefetches from a
//! real origin on loopback an image that does not fit.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::kit::daemon::{SOON, Setup, eventually, queued_json};
use crate::kit::origin::{Behaviour, Origin};
use crate::kit::{md5_hex, test_bytes};

const MIB: u64 = 1 << 20;

/// A tmpfs mounted for one test; unmounted when dropped, also when the test fails.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` on `dir`, or says why it could not.
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("mounting a tmpfs needs root".into());
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs refused: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }

    fn free(&self) -> u64 {
        let s = rustix::fs::statvfs(&self.dir).unwrap();
        s.f_bavail * s.f_frsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still holds it open (a process the test could not stop): detach
            // it so it goes away with that process.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

#[test]
fn a_full_disk_aborts_the_download_frees_the_space_and_the_next_one_fits() {
    let s = Setup::new("");
    let mount = match Tmpfs::mount(&s.cache(""), "8m") {
        Ok(m) => m,
        Err(reason) if std::env::var_os("CI").is_some() => {
            panic!("{reason} (CI runs as root, where mounts work)")
        }
        Err(reason) => {
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
    let origin = Origin::start();
    // Larger than the filesystem, smaller than cache.max_size: only ENOSPC stops it.
    let too_big = test_bytes(12 << 20, 1);
    let fits = test_bytes(3 << 20, 2);
    origin.add("too-big", too_big, Behaviour::default());
    origin.add("fits", fits.clone(), Behaviour::default());
    // The database is outside the tmpfs, so ENOSPC hits the image, not SQLite. Failed
    // writes wait 2 s in invalid/ so the test can see them; a failed download is
    // retried an hour later, so it does not fill the disk again during the test.
    let db_dir = s.tmp.path().join("db");
    std::fs::create_dir(&db_dir).unwrap();
    std::fs::write(
        &s.config,
        format!(
            "[cache]\ndir = \"{cache}\"\nstall_time = \"1h\"\nmax_size = \"64MiB\"\n\
             [database]\nurl = \"sqlite://{db}/glance-cached.db\"\n\
             [cleaner]\ninterval = \"1h\"\ninvalid_grace = \"2s\"\n\
             [pruner]\ninterval = \"1h\"\n\
             [daemon]\nshutdown_timeout = \"5s\"\n\
             [prefetcher]\nconcurrency = 1\ninterval = \"1h\"\nretry_delay = \"1h\"\nmax_retry_delay = \"1h\"\n\
             [upstream]\nkind = \"glance\"\nurl = \"{origin}\"\n",
            cache = s.cache("").display(),
            db = db_dir.display(),
            origin = origin.url(),
        ),
    )
    .unwrap();
    let mut d = s.start();
    assert!(
        !s.cache(".glance-cached/glance-cached.db").exists(),
        "the database is not on the tmpfs"
    );
    let empty = mount.free();
    assert!(empty > 7 * MIB && empty <= 8 * MIB, "free {empty}");

    let out = s.cli(&["queue", "too-big"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The write hits ENOSPC: the partial bytes move to invalid/ and fill the disk ...
    eventually(SOON, "the partial download is in invalid/", || {
        s.cache("invalid/too-big").exists()
    });
    let partial = std::fs::metadata(s.cache("invalid/too-big")).map_or(0, |m| m.len());
    let free_when_full = mount.free();
    assert!(
        partial > 6 * MIB && partial < 12 * MIB,
        "a partial that filled the disk: {partial} bytes"
    );
    assert!(
        free_when_full < MIB,
        "the disk was full: {free_when_full} free"
    );
    // ... until the cleaner removes them and the space is back.
    eventually(SOON, "the partial download is cleaned", || {
        !s.cache("invalid/too-big").exists()
    });
    assert_eq!(std::fs::read_dir(s.cache("incomplete")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(s.cache("invalid")).unwrap().count(), 0);
    // The kernel releases a deleted file's pages when its last reference goes, which
    // can trail the unlink by a moment.
    eventually(SOON, "the space is free again", || {
        mount.free() >= empty - 64 * 1024
    });
    // Never cached; queued again for later, with the reason; the daemon runs on.
    assert!(!s.cache("too-big").exists());
    assert!(s.cached_ids().is_empty());
    let rows = queued_json(&s);
    let row = rows.iter().find(|r| r["image_id"] == "too-big").unwrap();
    assert_eq!(row["state"], "queued", "{row}");
    assert_eq!(row["attempts"], 1, "{row}");
    let error = row["last_error"].as_str().unwrap();
    assert!(error.contains("No space left on device"), "{error}");
    assert!(d.alive(), "{}", d.log_text());

    // The next download that fits succeeds.
    let out = s.cli(&["queue", "fits"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(
        Duration::from_secs(20),
        "the image that fits is cached",
        || s.cached_ids() == ["fits"],
    );
    assert_eq!(std::fs::read(s.cache("fits")).unwrap(), fits);
    let out = s.cli(&["list-cached", "--json"]);
    let cached: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cached[0]["checksum"], md5_hex(&fits).as_str());
    assert!(mount.free() < empty - 3 * MIB + 64 * 1024);
    assert!(d.log_text().contains("No space left on device"));
    assert!(d.alive());
    d.stop();
}
