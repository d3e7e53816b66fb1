//! The open for serving: a cached image's open file with what a response needs (size,
//! checksum, an ETag), registered as a reader so that an eviction never breaks its
//! body (`readers`), its hit counted in memory (`hits`) rather than written, and its
//! row remembered per file (`RememberedRows`) rather than read again. A small file's
//! bytes may be read with the open (`open_to_serve_reading`). The open, its `fstat` and
//! that read are done on the calling thread when the kernel can do them from memory
//! (`CacheLayout::try_open_read_cached`, `RWF_NOWAIT`) and refuses instead of waiting on
//! the disk; otherwise in one trip to the blocking pool (`open_for_serving`).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tracing::{debug, warn};

use super::driver::blocking;
use super::layout::{Area, CacheLayout, CachedOpen};
use super::readers::ReaderGuard;
use super::{CacheDriver, CacheError};
use crate::image_id::ImageId;

/// How long an open waits for the row's checksum: a database that does not answer
/// must not hold a response the disk can give (the image is served without it).
const ROW_TIMEOUT: Duration = Duration::from_secs(1);

/// Opens for one image racing its eviction and re-caching before giving up.
const OPEN_ATTEMPTS: usize = 3;

/// The most files whose rows are remembered: past it, all are forgotten (a row is one
/// query away; the bound, some 4 MiB at most, keeps a cache of many images from growing
/// this without end, and holds a node's hot set of 10,000 images).
const MAX_REMEMBERED_ROWS: usize = 16_384;

/// The row each served file was opened with, by the file's identity (inode, mtime,
/// size). A cached file is never rewritten in place (a new copy is renamed over it) and
/// an image's bytes never change in Glance, so the same file has the same checksum: an
/// open of a remembered file asks the database nothing. That saves a database round
/// trip per request (the largest of a small image's costs) and keeps serving at full
/// speed, checksum included, while the database is slow or away. A row is remembered
/// when there is one (a file without a row yet is asked about again), with its checksum
/// when that matches the file's size, else without one (a row adopted from a file has
/// none, and the same file never gains one).
#[derive(Debug, Default)]
pub(super) struct RememberedRows {
    rows: Mutex<HashMap<ImageId, Remembered>>,
}

#[derive(Debug, Clone)]
struct Remembered {
    inode: u64,
    modified: SystemTime,
    size: u64,
    checksum: Option<String>,
    cached_at: DateTime<Utc>,
}

impl RememberedRows {
    fn lookup(
        &self,
        id: &ImageId,
        inode: u64,
        modified: SystemTime,
        size: u64,
    ) -> Option<Remembered> {
        let rows = self
            .rows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        rows.get(id)
            .filter(|r| r.inode == inode && r.modified == modified && r.size == size)
            .cloned()
    }

    fn remember(&self, id: &ImageId, row: Remembered) {
        let mut rows = self
            .rows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if rows.len() >= MAX_REMEMBERED_ROWS && !rows.contains_key(id) {
            rows.clear();
        }
        rows.insert(id.clone(), row);
    }
}

/// A cached image open for serving. The serving side keeps `guard` with the body (it
/// may `into_parts` the file and the guard into the stream) until the last byte is
/// sent or the client is gone: dropping it unregisters the reader.
#[derive(Debug)]
pub struct ServedImage {
    /// Opened through the layout's handle of the cache directory, by the validated id.
    pub file: File,
    /// The open file's size (what the kernel has: the body's length).
    pub size: u64,
    /// The row's MD5 (Glance's `Content-MD5`), only when the row's size is the file's.
    pub checksum: Option<String>,
    /// The row's `last_modified` (when the image was cached), when it could be read.
    pub cached_at: Option<DateTime<Utc>>,
    /// The open file's mtime.
    pub modified: SystemTime,
    /// The open file's inode number (with size and mtime, what tells two files of one
    /// image apart when the row has no checksum).
    pub inode: u64,
    /// The whole file, read with the open (see `open_for_serving`), when that was asked
    /// for (`open_to_serve_reading`), the file was no larger than asked and it read whole
    /// (`size` bytes); else `None`, and the bytes are the file's to read.
    pub contents: Option<Bytes>,
    pub guard: ReaderGuard,
}

impl ServedImage {
    /// A strong ETag: the checksum when the row has one (the same on every node), else
    /// the file's inode, size and mtime in hex.
    pub fn etag(&self) -> String {
        match &self.checksum {
            Some(md5) => format!("\"{md5}\""),
            None => {
                let nanos = self
                    .modified
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                format!("\"{:x}-{:x}-{nanos:x}\"", self.inode, self.size)
            }
        }
    }

    /// The file and the reader's guard, for a body stream that holds both.
    pub fn into_parts(self) -> (File, ReaderGuard) {
        (self.file, self.guard)
    }
}

impl CacheDriver {
    /// Opens `id` for serving: `None` when it is not cached (absent, or not a regular
    /// file). The open registers a reader (see `ServedImage`) and counts a hit in the
    /// hit book, written by the next flush; no database write happens here. The row is
    /// read for the checksum; without a database the image is served without it.
    pub async fn open_to_serve(&self, id: &ImageId) -> Result<Option<ServedImage>, CacheError> {
        self.open_to_serve_reading(id, 0).await
    }

    /// `open_to_serve`, and when the file has at most `read_up_to` bytes, its contents
    /// read with the open (`ServedImage::contents`, `open_for_serving`): for a small image
    /// the trips to the blocking pool, not the bytes, are most of the cost of a response
    /// (BENCHMARKS.md), and this makes it one at most.
    pub async fn open_to_serve_reading(
        &self,
        id: &ImageId,
        read_up_to: u64,
    ) -> Result<Option<ServedImage>, CacheError> {
        for _ in 0..OPEN_ATTEMPTS {
            let guard = self.readers().register(id);
            let opened = open_for_serving(self.layout(), id, read_up_to).await;
            let (file, meta, contents) = match opened {
                Ok(opened) => opened,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => {
                    let path = self.layout().path(Area::Cached, id);
                    return Err(CacheError::io("open cached image", path)(e));
                }
            };
            if !meta.file_type().is_file() {
                warn!(image_id = %id, "refusing to serve a cache entry that is not a regular file");
                return Ok(None);
            }
            // Evicted (and perhaps cached again) between the registration and the open:
            // this registration may not be the opened file's. Open again.
            if !self.readers().is_current(&guard) {
                debug!(image_id = %id, "image evicted while being opened; opening again");
                continue;
            }
            let size = meta.len();
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if let Some(known) = self
                .remembered_rows()
                .lookup(id, meta.ino(), modified, size)
            {
                self.record_hit(id);
                return Ok(Some(ServedImage {
                    file,
                    size,
                    checksum: known.checksum,
                    cached_at: Some(known.cached_at),
                    modified,
                    inode: meta.ino(),
                    contents,
                    guard,
                }));
            }
            let row = match tokio::time::timeout(ROW_TIMEOUT, self.db().cached_image(id.as_str()))
                .await
            {
                Ok(Ok(row)) => row,
                Ok(Err(error)) => {
                    debug!(image_id = %id, %error, "serving without the row: the database failed");
                    None
                }
                Err(_) => {
                    debug!(image_id = %id, "serving without the row: the database did not answer in time");
                    None
                }
            };
            self.record_hit(id);
            let checksum = row
                .as_ref()
                .filter(|r| r.size == size as i64)
                .and_then(|r| r.checksum.clone());
            let cached_at = row.map(|r| r.last_modified.to_utc());
            if let Some(cached_at) = cached_at {
                let known = Remembered {
                    inode: meta.ino(),
                    modified,
                    size,
                    checksum: checksum.clone(),
                    cached_at,
                };
                self.remembered_rows().remember(id, known);
            }
            return Ok(Some(ServedImage {
                file,
                size,
                checksum,
                cached_at,
                modified,
                inode: meta.ino(),
                contents,
                guard,
            }));
        }
        Ok(None)
    }
}

/// Set when the cache's file system refuses `RWF_NOWAIT` reads (`EOPNOTSUPP`): the small
/// reads then go to the blocking pool without trying first (one file system holds the
/// cache).
static NOWAIT_READ_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// What one open for serving found: the file, its metadata and, when asked for, its
/// bytes (see `ServedImage::contents`).
type Opened = (File, std::fs::Metadata, Option<Bytes>);

/// Opens `id` in the cache, `fstat`s it and, when it is a regular file of 1 to
/// `read_up_to` bytes, reads it whole. On this (a runtime) thread as far as the kernel can
/// go from memory: the open from the dentry cache (`try_open_read_cached`), the `fstat`
/// of the inode the open just used, the read from the page cache (`read_cached`); each
/// refuses rather than waits on the disk, and what is left goes to the blocking pool in
/// one trip (the open and all, or just the rest of the read with the file kept open).
/// A slow disk therefore still slows only what waits on it, never a runtime thread.
async fn open_for_serving(
    layout: &CacheLayout,
    id: &ImageId,
    read_up_to: u64,
) -> std::io::Result<Opened> {
    let wanted = move |meta: &std::fs::Metadata| {
        (meta.is_file() && meta.len() > 0 && meta.len() <= read_up_to).then_some(meta.len())
    };
    let file = match layout.try_open_read_cached(Area::Cached, id)? {
        CachedOpen::Opened(file) => file,
        CachedOpen::Fallback => {
            let (layout, id) = (layout.clone(), id.clone());
            return blocking(move || {
                // O_NONBLOCK (in `open_read`) so a planted FIFO cannot hang us.
                let file = layout.open_read(Area::Cached, &id)?;
                let meta = file.metadata()?;
                let contents = wanted(&meta).and_then(|len| read_whole(&file, len));
                Ok((file, meta, contents))
            })
            .await;
        }
    };
    let meta = file.metadata()?;
    let Some(len) = wanted(&meta) else {
        return Ok((file, meta, None));
    };
    match read_cached(&file, len) {
        CachedRead::Whole(bytes) => Ok((file, meta, Some(bytes))),
        CachedRead::Failed => Ok((file, meta, None)),
        CachedRead::Partial(start) => {
            blocking(move || {
                let contents = read_rest(&file, start, len);
                Ok((file, meta, contents))
            })
            .await
        }
    }
}

/// What `read_cached` read.
#[derive(Debug)]
enum CachedRead {
    /// All of the file.
    Whole(Bytes),
    /// The bytes from the page cache up to the first page that is not in memory (or all
    /// of none, when the file system cannot tell): the rest is `read_rest`'s, on the
    /// blocking pool.
    Partial(Vec<u8>),
    /// An error, or the file ended early: as `read_whole`'s `None`.
    Failed,
}

/// The `len` bytes of `file` from the page cache only (`preadv2` with `RWF_NOWAIT`, which
/// returns `EAGAIN` or a short count rather than start a read from the disk).
fn read_cached(file: &File, len: u64) -> CachedRead {
    let Ok(len) = usize::try_from(len) else {
        return CachedRead::Failed;
    };
    if NOWAIT_READ_UNSUPPORTED.load(Ordering::Relaxed) {
        return CachedRead::Partial(Vec::with_capacity(len));
    }
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let slice = &mut [std::io::IoSliceMut::new(&mut buf[filled..])];
        match rustix::io::preadv2(
            file,
            slice,
            filled as u64,
            rustix::io::ReadWriteFlags::NOWAIT,
        ) {
            Ok(0) => return CachedRead::Failed,
            Ok(n) => filled += n,
            Err(rustix::io::Errno::AGAIN) => break,
            Err(rustix::io::Errno::OPNOTSUPP) => {
                NOWAIT_READ_UNSUPPORTED.store(true, Ordering::Relaxed);
                break;
            }
            Err(_) => return CachedRead::Failed,
        }
    }
    if filled == len {
        return CachedRead::Whole(Bytes::from(buf));
    }
    buf.truncate(filled);
    CachedRead::Partial(buf)
}

/// The `len` bytes of `file`, read into fresh (unzeroed) memory; `None` when they cannot
/// all be read (an error, or a file shorter than its `fstat` said: truncated under us).
/// Then the caller reads from the file itself, and meets what made this fail there
/// (the body of a file cut short fails, and the connection with it).
fn read_whole(file: &File, len: u64) -> Option<Bytes> {
    read_rest(file, Vec::new(), len)
}

/// `read_whole` after the first `start.len()` bytes, already read into `start`.
fn read_rest(file: &File, start: Vec<u8>, len: u64) -> Option<Bytes> {
    read_exact_at(file, start, 0, usize::try_from(len).ok()?).ok()
}

/// The `len` bytes of `file` from `offset`, of which `buf` holds the first ones already,
/// the rest read into its fresh (unzeroed) capacity: zeroing a buffer only to overwrite
/// it costs a pass over every byte served. A file that ends before them is
/// `UnexpectedEof`. The serving body's chunks are read with it too.
pub(crate) fn read_exact_at(
    file: &File,
    mut buf: Vec<u8>,
    offset: u64,
    len: usize,
) -> std::io::Result<Bytes> {
    buf.reserve_exact(len.saturating_sub(buf.len()));
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        let n = rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    // The spare capacity may have held more than asked for.
    buf.truncate(len);
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_just_written_reads_whole_from_the_page_cache() {
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&data).unwrap();
        match read_cached(&file, data.len() as u64) {
            CachedRead::Whole(bytes) => assert_eq!(&bytes[..], &data[..]),
            other => panic!("expected the whole file from memory, got {other:?}"),
        }
        // Truncated under us: as `read_whole`, no contents (the body meets the end).
        assert!(matches!(
            read_cached(&file, data.len() as u64 + 1),
            CachedRead::Failed
        ));
    }

    #[test]
    fn a_partial_read_is_finished_from_where_it_stopped() {
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        file.write_all(&data).unwrap();
        // As `read_cached` leaves it when a page past the first 4 KiB is not in memory.
        let start = data[..4096].to_vec();
        let whole = read_rest(&file, start, data.len() as u64).unwrap();
        assert_eq!(&whole[..], &data[..]);
        assert_eq!(read_rest(&file, Vec::new(), data.len() as u64 + 1), None);
    }
}
