//! Removing a cached image's file without breaking or stalling anyone: the one way the
//! pruner, the driver's deletes and the cache API's clear take an image's bytes away.
//!
//! The file is opened first (by the name, through the layout's handle), then its name
//! is unlinked under the readers table's lock, only if the name still holds that inode.
//! Holding the inode open makes the unlink quick (no blocks are freed by it). Then:
//! - readers of ours hold it: nothing more; they keep reading their open file (unlink
//!   semantics), and its bytes count as open-but-evicted until the last one closes;
//! - nobody of ours holds it: a file larger than `TRUNCATE_STEP` is truncated in
//!   steps of that much with a pause between them, so the filesystem frees its blocks a
//!   step at a time (freeing hundreds of GiB at once can hold the journal, and every
//!   other I/O of the disk, for seconds); the last step's blocks go when it closes.

use std::fs::File;
use std::io;
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
    if !held && writable {
        truncate_paced(&file, bytes, readers);
    }
    Ok(Some(Evicted { bytes, held }))
}

/// Frees an unlinked file's blocks `TRUNCATE_STEP` at a time (nothing for a file of
/// one step or less: closing it frees its blocks at once, quickly enough).
fn truncate_paced(file: &File, bytes: u64, readers: &Readers) {
    if bytes <= TRUNCATE_STEP {
        return;
    }
    let mut len = bytes;
    while len > 0 {
        len = len.saturating_sub(TRUNCATE_STEP);
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
