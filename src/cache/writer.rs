//! `ImageWriter`: one image being written into `incomplete/<id>`.
//!
//! The file is created with O_EXCL so a second writer of the same id fails cleanly, and
//! locked (flock) while open so no cleaner removes it during a pause. Every chunk is
//! hashed as it is written (the digests `Expectations::plan` picks by the
//! `VerifyPolicy`: the upstream's `os_hash_algo`, MD5, or both), and `finish` verifies
//! the size and the checksums the plan checks, fsyncs, moves the very inode it wrote into
//! place (never whatever else sits at the name) and fsyncs the directory; the driver's
//! `publish` then records the row and removes the image from the queue. Anything else
//! (an error, a failed verification, a dropped writer) moves the bytes to `invalid/`.
//! The writer holds the layout only: it knows files, not the database.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;

use bytes::Bytes;
use tracing::{debug, warn};

use super::CacheError;
use super::layout::{Area, CacheLayout};
use crate::digest::{Digests, HashAlgo, VerifyPolicy};
use crate::image_id::ImageId;

/// Dirty bytes after which writeback of the written range is started. Without it the
/// whole image sits dirty in the page cache until `finish`'s fsync, which then waits for
/// all of it at once (about 0.3 s per GiB on the test machine's disk) and floods the
/// device, stalling other writers on it; started early, the disk writes while the
/// network still delivers and the final fsync only waits for the tail.
const WRITEBACK_WINDOW_BYTES: u64 = 32 << 20;

/// What the bytes must turn out to be. The size, when set, is always checked at commit;
/// which of the digests are, `verify` decides (`plan`).
#[derive(Debug, Clone, Default)]
pub struct Expectations {
    pub size: Option<u64>,
    /// Lower-case hex MD5 (Glance's `checksum`).
    pub md5: Option<String>,
    /// The image's `os_hash_algo` and lower-case hex `os_hash_value`.
    pub os_hash: Option<(HashAlgo, String)>,
    /// Which of the given digests are computed and checked (default: all of them).
    pub verify: VerifyPolicy,
}

/// Which digests a write computes, and so checks against the given ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestPlan {
    /// The MD5 is computed: to check the given one, or, when none is given, because the
    /// row's `checksum` needs it.
    pub md5: bool,
    /// The SHA-2 computed and checked.
    pub os_hash: Option<HashAlgo>,
}

impl Expectations {
    /// The digests to compute. Under `Strongest` with a SHA-2 given, the MD5 is computed
    /// only when none is given (the row's `checksum` needs one); a given MD5 is then
    /// recorded as it came, for the SHA-2 pins the bytes Glance computed both over.
    pub fn plan(&self) -> DigestPlan {
        let os_hash = self.os_hash.as_ref().map(|(algo, _)| *algo);
        let md5 = match self.verify {
            VerifyPolicy::All => true,
            VerifyPolicy::Strongest => os_hash.is_none() || self.md5.is_none(),
        };
        DigestPlan { md5, os_hash }
    }
}

/// What a successful publish published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub image_id: ImageId,
    pub size: u64,
    pub md5: String,
}

pub struct ImageWriter {
    layout: CacheLayout,
    image_id: ImageId,
    /// `None` once committed or aborted.
    file: Option<File>,
    /// `None` once committed or aborted.
    digests: Option<Digests>,
    written: u64,
    /// Bytes whose writeback has been started (see `WRITEBACK_WINDOW_BYTES`).
    writeback_started: u64,
    expectations: Expectations,
}

impl ImageWriter {
    pub(super) fn create(
        layout: CacheLayout,
        image_id: ImageId,
        expectations: Expectations,
    ) -> Result<Self, CacheError> {
        let path = layout.path(Area::Incomplete, &image_id);
        let file = layout
            .create_new(Area::Incomplete, &image_id)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    CacheError::AlreadyBeingWritten(image_id.clone())
                } else {
                    CacheError::io("create", &path)(e)
                }
            })?;
        match layout.lock_for_writing(&file) {
            Ok(true) => {}
            Ok(false) => {
                warn!(image_id = %image_id, "the cache filesystem has no file locks: a cleaner may remove this download's file during a pause (its commit then publishes nothing)");
            }
            Err(e) => {
                // Someone else holds a lock on our new file: give it up now. It is ours
                // (just created), so it moves by inode like any failed write.
                move_to_invalid(&layout, &image_id, &file, "could not lock");
                return Err(CacheError::io("lock", &path)(e));
            }
        }
        let plan = expectations.plan();
        let digests = Digests::start(plan.md5, plan.os_hash)
            .map_err(CacheError::io("start hashing for", &path))?;
        debug!(image_id = %image_id, "writing image into incomplete/");
        Ok(ImageWriter {
            digests: Some(digests),
            layout,
            image_id,
            file: Some(file),
            written: 0,
            writeback_started: 0,
            expectations,
        })
    }

    /// `incomplete/<id>` opened for reading through the layout, for the readers of a
    /// fill in progress (`filling`); `None` unless it is this writer's own inode.
    pub(crate) fn open_reader(&self) -> std::io::Result<Option<File>> {
        let Some(own) = self.file.as_ref() else {
            return Ok(None);
        };
        let reader = self.layout.open_read(Area::Incomplete, &self.image_id)?;
        let (a, b) = (rustix::fs::fstat(own)?, rustix::fs::fstat(&reader)?);
        Ok((a.st_dev == b.st_dev && a.st_ino == b.st_ino).then_some(reader))
    }

    /// Appends `data`, hashing it. See `write_bytes`, which avoids a copy.
    pub fn write(&mut self, data: &[u8]) -> Result<(), CacheError> {
        self.write_bytes(Bytes::copy_from_slice(data))
    }

    /// Appends `chunk`: written to the file here, hashed on the digest threads. A write
    /// past the expected size fails at once (the writer is aborted), so a body larger
    /// than declared never fills the disk.
    pub fn write_bytes(&mut self, chunk: Bytes) -> Result<(), CacheError> {
        if let Some(declared) = self.expectations.size
            && self.written + chunk.len() as u64 > declared
        {
            self.abort("more bytes than the declared size");
            return Err(CacheError::TooLarge {
                image_id: self.image_id.clone(),
                declared,
            });
        }
        let (Some(file), Some(digests)) = (self.file.as_mut(), self.digests.as_ref()) else {
            return Err(CacheError::WriterAborted(self.image_id.clone()));
        };
        if let Err(e) = file.write_all(&chunk).and_then(|()| digests.feed(&chunk)) {
            let path = self.layout.path(Area::Incomplete, &self.image_id);
            self.abort("write failed");
            return Err(CacheError::io("write", path)(e));
        }
        self.written += chunk.len() as u64;
        if self.written - self.writeback_started >= WRITEBACK_WINDOW_BYTES {
            self.start_writeback();
        }
        Ok(())
    }

    /// Asks the kernel to start writing the not-yet-started range to disk, without
    /// waiting for it. Durability still comes from `finish`'s fsync; this only spreads
    /// the disk work over the download, so a failure here is not an error.
    fn start_writeback(&mut self) {
        let Some(file) = self.file.as_ref() else {
            return;
        };
        let (offset, len) = (
            self.writeback_started,
            self.written - self.writeback_started,
        );
        // SAFETY: sync_file_range only reads its integer arguments; the descriptor is
        // owned by `file`, which outlives the call.
        let rc = unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if rc != 0 {
            debug!(image_id = %self.image_id, error = %std::io::Error::last_os_error(), "could not start writeback early; the commit fsync will do it");
        }
        self.writeback_started = self.written;
    }

    /// Verifies, makes durable and moves the image into place (the file only: the row
    /// and the dequeue are `CacheDriver::publish`'s, which calls this); on a failed
    /// verification the bytes go to `invalid/` and nothing is published.
    pub(super) async fn finish(mut self) -> Result<Published, CacheError> {
        let Some(digests) = self.digests.take() else {
            return Err(CacheError::WriterAborted(self.image_id.clone()));
        };
        let finished = crate::blocking(move || digests.finish()).await;
        let finished = match finished {
            Ok(f) => f,
            Err(e) => {
                let path = self.layout.path(Area::Incomplete, &self.image_id);
                self.abort("hashing failed");
                return Err(CacheError::io("hash", path)(e));
            }
        };
        let (md5, os_hash) = (finished.md5, finished.os_hash);
        if let Some(problem) = self.verification_problem(md5.as_deref(), os_hash.as_deref()) {
            self.abort(&problem);
            return Err(CacheError::Verification {
                image_id: self.image_id.clone(),
                problem,
            });
        }
        // Not computed only when the upstream gave it (`plan`) and its SHA-2 matched.
        let Some(md5) = md5.or_else(|| self.expectations.md5.clone()) else {
            return Err(CacheError::WriterAborted(self.image_id.clone()));
        };
        let layout = self.layout.clone();
        let incomplete = layout.path(Area::Incomplete, &self.image_id);
        let Some(file) = self.file.take() else {
            return Err(CacheError::WriterAborted(self.image_id.clone()));
        };
        let id = self.image_id.clone();
        let written = self.written;
        let durable = crate::blocking(move || -> Result<(), CacheError> {
            let failed = |e: CacheError| {
                move_to_invalid(&layout, &id, &file, "publish failed");
                e
            };
            file.sync_all()
                .map_err(CacheError::io("fsync", &incomplete))
                .map_err(failed)?;
            // Someone who could still open it (root, or its owner after a chmod) and
            // truncated or extended it changed its size: not the verified bytes.
            let size = layout
                .open_file_size(&file)
                .map_err(CacheError::io("stat", &incomplete))
                .map_err(failed)?;
            if size != written {
                return Err(failed(CacheError::Replaced(id.clone())));
            }
            layout
                .set_published_mode(&file)
                .map_err(CacheError::io("chmod", &incomplete))
                .map_err(failed)?;
            crate::failpoint::hit("writer:before-rename");
            // The file stays open (and locked) until it is in place: the move checks by
            // its inode that what it publishes is what was written and verified here.
            let moved = layout
                .move_own(&file, Area::Incomplete, Area::Cached, &id)
                .map_err(CacheError::io("publish", &incomplete))
                .map_err(failed)?;
            if !moved {
                return Err(CacheError::Replaced(id));
            }
            drop(file);
            layout
                .sync_dir(Area::Cached)
                .map_err(CacheError::io("fsync", layout.root()))
        })
        .await;
        if let Err(e) = durable {
            if matches!(e, CacheError::Replaced(_)) {
                warn!(image_id = %self.image_id, "the file being written was removed, replaced or changed by another writer; nothing published");
            }
            return Err(e);
        }
        Ok(Published {
            image_id: self.image_id.clone(),
            size: self.written,
            md5,
        })
    }

    /// What is wrong with the bytes: the size, then each digest computed (`None`: not
    /// computed, so not checked) against the one given.
    fn verification_problem(&self, md5: Option<&str>, os_hash: Option<&str>) -> Option<String> {
        if let Some(size) = self.expectations.size
            && size != self.written
        {
            return Some(format!("size {} bytes, expected {size}", self.written));
        }
        if let (Some(want), Some(md5)) = (&self.expectations.md5, md5)
            && !want.eq_ignore_ascii_case(md5)
        {
            return Some(format!("md5 {md5}, expected {want}"));
        }
        if let (Some((algo, want)), Some(got)) = (&self.expectations.os_hash, os_hash)
            && !want.eq_ignore_ascii_case(got)
        {
            return Some(format!("{} {got}, expected {want}", algo.name()));
        }
        None
    }

    /// Gives up on this image: its bytes move to `invalid/` for the cleaner. The row is
    /// left alone: an uncached image has none, and a failed re-cache keeps the previous
    /// complete image and its row.
    pub fn abort(&mut self, reason: &str) {
        // Dropping the senders ends the digest threads.
        self.digests = None;
        if let Some(file) = self.file.take() {
            move_to_invalid(&self.layout, &self.image_id, &file, reason);
        }
    }
}

/// Moves the bytes written through `file` to `invalid/`, and only those: a file another
/// writer put at the name stays. Logged at debug level: the caller gets the error and
/// reports it (a writer dropped unfinished logs a warning in `Drop`).
fn move_to_invalid(layout: &CacheLayout, id: &ImageId, file: &File, reason: &str) {
    match layout.move_own(file, Area::Incomplete, Area::Invalid, id) {
        Ok(true) => debug!(image_id = %id, reason, "cache write failed, moved to invalid/"),
        Ok(false) => {
            debug!(image_id = %id, reason, "cache write failed; its file was already gone")
        }
        Err(error) => {
            warn!(image_id = %id, reason, %error, "cache write failed and could not be moved to invalid/; the stall rule will remove it")
        }
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            warn!(image_id = %self.image_id, bytes = self.written, "cache write abandoned before commit, moving it to invalid/");
            self.abort("writer dropped before commit");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect(md5: bool, sha: Option<HashAlgo>, verify: VerifyPolicy) -> Expectations {
        Expectations {
            size: Some(1),
            md5: md5.then(|| "0".repeat(32)),
            os_hash: sha.map(|a| (a, "0".repeat(a.hex_len()))),
            verify,
        }
    }

    /// `All` computes every given digest (and the MD5 always); `Strongest` computes the
    /// SHA-2 alone when the upstream gave it and an MD5, the MD5 alone when no SHA-2 is
    /// given, and both only when the row would otherwise have no MD5.
    #[test]
    fn the_plan_computes_the_digests_the_policy_checks() {
        use VerifyPolicy::{All, Strongest};
        for algo in [HashAlgo::Sha256, HashAlgo::Sha384, HashAlgo::Sha512] {
            let cases = [
                (true, Some(algo), All, true, Some(algo)),
                (true, Some(algo), Strongest, false, Some(algo)),
                (false, Some(algo), All, true, Some(algo)),
                (false, Some(algo), Strongest, true, Some(algo)),
                (true, None, All, true, None),
                (true, None, Strongest, true, None),
                (false, None, All, true, None),
                (false, None, Strongest, true, None),
            ];
            for (md5, sha, verify, want_md5, want_sha) in cases {
                let plan = expect(md5, sha, verify).plan();
                assert_eq!(
                    plan,
                    DigestPlan {
                        md5: want_md5,
                        os_hash: want_sha
                    },
                    "md5 given: {md5}, sha: {sha:?}, {verify:?}"
                );
            }
        }
    }

    /// The default checks everything given: `import --md5 --sha512` means both.
    #[test]
    fn expectations_verify_all_by_default() {
        assert_eq!(Expectations::default().verify, VerifyPolicy::All);
    }
}
