//! Removing a cached image's file without breaking or stalling anyone: the one way the
//! pruner, the driver's deletes and the cache API's clear take an image's bytes away.
//!
//! The file is opened first (by the name, through the layout's handle), then its name
//! is unlinked under the readers table's lock, only if the name still holds that inode.
//! Holding the inode open makes the unlink quick (no blocks are freed by it). Then:
//! - readers of ours hold it: nothing more; they keep reading their open file (unlink
//!   semantics), and its bytes count as open-but-evicted until the last one closes;
//! - nobody holds it (no reader of ours, and no descriptor anywhere: `open_elsewhere`):
//!   a file holding more than `TRUNCATE_STEP` of blocks is truncated in steps of
//!   about that much with a pause between them, so the filesystem frees its blocks a step at a time (freeing
//!   hundreds of GiB at once can hold the journal, and every other I/O of the disk, for
//!   seconds).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use tracing::warn;

use super::layout::{Area, CacheLayout};
use super::readers::Readers;
use crate::image_id::ImageId;

/// Bytes freed per truncation step.
pub(crate) const TRUNCATE_STEP: u64 = 1 << 30;

/// The pause between two steps: long enough for the filesystem to commit a step's
/// frees and serve other I/O, short enough that a 100 GiB file goes in about a second.
const TRUNCATE_PAUSE: Duration = Duration::from_millis(10);

/// What an eviction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Evicted {
    /// The file's size.
    pub bytes: u64,
    /// Readers of ours still hold it: its bytes stay on disk until they close.
    pub held: bool,
}

/// Evicts `area/<id>` (blocking: run on the blocking pool). `None` when there is no
/// regular file there (or the name changed under us: someone else's new file stays).
pub(crate) fn evict_file(
    layout: &CacheLayout,
    readers: &Readers,
    area: Area,
    id: &ImageId,
) -> io::Result<Option<Evicted>> {
    let (file, writable) = match layout.open_to_evict(area, id) {
        Ok(opened) => opened,
        // Absent, a symlink (O_NOFOLLOW), a FIFO nobody reads (O_NONBLOCK), a
        // directory: no image file to evict, as `CacheLayout::remove` decides.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ELOOP | libc::ENXIO | libc::EISDIR)
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Ok(None);
    }
    let bytes = meta.len();
    let (removed, held) = readers.evict_with(id, bytes, || layout.unlink_own(&file, area, id))?;
    if !removed {
        return Ok(None);
    }
    // Paced by the blocks the file holds, not its length: a sparse file claiming
    // exabytes holds nothing to free, and stepping down its length a GiB at a time
    // would take billions of steps.
    let allocated = meta.blocks().saturating_mul(512);
    if !held && writable && allocated > TRUNCATE_STEP && !open_elsewhere(&file) {
        truncate_paced(&file, bytes, allocated, readers);
    }
    Ok(Some(Evicted { bytes, held }))
}

/// Whether any other descriptor, of any process, has `file`'s inode open: the kernel
/// grants a write lease (`F_SETLEASE`, `F_WRLCK`) only when there is none. Readers
/// outside our table (Glance's API serving from the cache, a `cat` command) must keep
/// their bytes as a plain unlink keeps them. Where the lease cannot be had (not the
/// file's owner without CAP_LEASE, a filesystem without leases), the answer is yes:
/// the file is then freed at once when it closes, unpaced but never under a reader.
/// The lease is given back at once: after the unlink nobody can open the file anew.
fn open_elsewhere(file: &File) -> bool {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl with F_SETLEASE only reads its integer arguments; the descriptor
    // is owned by `file`, which outlives both calls.
    let taken = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK) } == 0;
    if taken {
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
    }
    !taken
}

/// Frees an unlinked file's blocks about `TRUNCATE_STEP` at a time (callers leave a
/// file of one step or less to its close, which frees it quickly enough): as many
/// steps as `allocated` bytes take, each cutting an equal share of the length `bytes`
/// (the same as a step per GiB for a file without holes).
fn truncate_paced(file: &File, bytes: u64, allocated: u64, readers: &Readers) {
    let steps = allocated.div_ceil(TRUNCATE_STEP).max(1);
    let step = bytes.div_ceil(steps).max(1);
    let mut len = bytes;
    while len > 0 {
        len = len.saturating_sub(step);
        if let Err(error) = file.set_len(len) {
            // The rest goes when the descriptor closes, unpaced.
            warn!(%error, "cannot truncate an evicted image; its blocks are freed at once");
            return;
        }
        readers.truncate_step();
        crate::failpoint::hit("evict:truncate-step");
        if len > 0 {
            std::thread::sleep(TRUNCATE_PAUSE);
        }
    }
}
