//! The on-disk layout shared with Glance: `<dir>/<id>`, `incomplete/`, `invalid/`, `queue/`.
//!
//! A `CacheLayout` holds the root and its three subdirectories open (each opened once,
//! `O_DIRECTORY | O_NOFOLLOW`), and every file operation in the cache goes through those
//! handles (`openat`, `unlinkat`, `renameat`): a subdirectory swapped for a symlink after
//! start is noticed, reported and never followed. This is also the only module that turns
//! an `ImageId` into a path (for messages and the watcher, never to reach a file).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{DirBuilder, File};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags, ResolveFlags, Stat};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::image_id::{GLANCE_LOCK_NAMES, ImageId};

/// Directories are created 0750 and files 0640: readable by the service group (Glance
/// runs as `glance`), never by other local users.
pub(crate) const DIR_MODE: u32 = 0o750;
pub(crate) const FILE_MODE: u32 = 0o640;
/// Files being written are read-only for everyone: the creating descriptor still
/// writes, but nobody can open one for writing later (Glance's `open_for_write` opens
/// without O_EXCL and would truncate ours in place). Published, they get `FILE_MODE`.
pub(crate) const WRITING_MODE: u32 = 0o440;

/// How many skipped names a listing keeps as examples: enough to find them, bounded so
/// 20,000 planted entries cost one short log line, not 20,000.
const SKIPPED_EXAMPLES: usize = 3;

/// How often the same kind of skipped entries is warned about again when their count
/// changes. The watcher runs a pass per arrival, so planting 2,000 symlinks one by one
/// is hundreds of passes: one warning per pass would still be a flood. Passes in
/// between report at debug level.
const SKIPPED_WARN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// One of the four places an image file can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    /// `<dir>/<id>`: complete cached images.
    Cached,
    /// `<dir>/incomplete/<id>`: images being written.
    Incomplete,
    /// `<dir>/invalid/<id>`: failed writes waiting for the cleaner.
    Invalid,
    /// `<dir>/queue/<id>`: zero-byte "queued for caching" markers.
    Queue,
}

impl Area {
    pub const SUBDIRS: [Area; 3] = [Area::Incomplete, Area::Invalid, Area::Queue];

    fn subdir(self) -> Option<&'static str> {
        match self {
            Area::Cached => None,
            Area::Incomplete => Some("incomplete"),
            Area::Invalid => Some("invalid"),
            Area::Queue => Some("queue"),
        }
    }

    fn index(self) -> Option<usize> {
        Area::SUBDIRS.iter().position(|a| *a == self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("cache directory {path:?} is not usable: {source}")]
    Unusable { path: PathBuf, source: io::Error },
    #[error("cache directory {path:?} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("{path:?} must be a real directory, not a symlink or other file")]
    NotARealDirectory { path: PathBuf },
    #[error("cache directory {path:?} is not writable: {source}")]
    NotWritable { path: PathBuf, source: io::Error },
    #[error(
        "{path:?} was replaced after start (it no longer names the directory opened then); it is not followed"
    )]
    Replaced { path: PathBuf },
}

/// A file found by a safe listing: a regular file whose name is a valid image id.
#[derive(Debug, Clone)]
pub struct CacheFile {
    pub image_id: ImageId,
    pub size: u64,
    pub modified: SystemTime,
    /// Device and inode when listed, so a removal can tell the same file from a new one
    /// put at its name meanwhile.
    identity: (u64, u64),
}

/// What `regular_file` found at a name.
#[derive(Debug, Clone, Copy)]
pub struct FileStat {
    pub size: u64,
    pub modified: SystemTime,
}

/// What `CacheLayout::try_open_read_cached` did.
#[derive(Debug)]
pub enum CachedOpen {
    /// Opened from memory: the descriptor `open_read` would give.
    Opened(File),
    /// Not done: the kernel would have had to wait on the disk (a name not in the
    /// dentry cache), or cannot open from memory only (no `openat2`, no
    /// `RESOLVE_CACHED`), or the error is best told by `open_read`. Open with
    /// `open_read`, on the blocking pool.
    Fallback,
}

/// Set when `openat2` with `RESOLVE_CACHED` is refused as unknown (`ENOSYS`: a kernel
/// before 5.6 or a seccomp filter; `EINVAL`: before 5.12), so that every later open
/// goes straight to the blocking pool instead of failing one more syscall first.
static OPENAT2_CACHED_UNAVAILABLE: AtomicBool = AtomicBool::new(false);

/// Entries of a listing that are not regular files named by valid ids: how many, and
/// the first few as examples, so a flood of them is one log line per pass.
#[derive(Debug, Default, Clone)]
pub struct Skipped {
    pub count: usize,
    pub examples: Vec<PathBuf>,
}

impl Skipped {
    fn push(&mut self, path: PathBuf) {
        self.count += 1;
        if self.examples.len() < SKIPPED_EXAMPLES {
            self.examples.push(path);
        }
    }

    pub fn merge(&mut self, other: Skipped) {
        self.count += other.count;
        for p in other.examples {
            if self.examples.len() < SKIPPED_EXAMPLES {
                self.examples.push(p);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// The result of listing one area: the image files, and the entries skipped because
/// they were not regular files named by a valid id.
#[derive(Debug, Default)]
pub struct Listing {
    pub files: Vec<CacheFile>,
    pub skipped: Skipped,
}

/// What `remove_due` did with one listed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Removed {
        bytes: u64,
    },
    /// Gone already, or its name now holds another file (or a non-regular entry), or it
    /// was written since it was listed: left alone.
    Changed,
    /// A writer holds its lock (an `ImageWriter` of this or another process): left alone.
    BeingWritten,
    /// Written to since it was listed, so not due now: left alone until `modified` makes
    /// it due.
    Rewritten {
        modified: SystemTime,
    },
}

/// The layout with its directories held open. Cheap to clone (shared handles).
#[derive(Debug, Clone)]
pub struct CacheLayout {
    inner: Arc<Held>,
}

#[derive(Debug)]
struct Held {
    root_path: PathBuf,
    root: OwnedFd,
    /// In `Area::SUBDIRS` order.
    subdirs: [HeldDir; 3],
    /// Per kind of listing (by its message): when skipped entries were last warned
    /// about, and how many there were.
    skip_warnings: Mutex<HashMap<&'static str, (Instant, usize)>>,
}

#[derive(Debug)]
struct HeldDir {
    fd: OwnedFd,
    dev: u64,
    ino: u64,
    /// Whether the name was last seen naming something else.
    replaced: AtomicBool,
    /// When a change of `replaced` was last logged at its own level (see `loud`).
    logged_at: Mutex<Option<Instant>>,
}

impl HeldDir {
    /// Whether a change of state is logged at its own level (error, info) or at debug:
    /// a loop exchanging the directory with a symlink many times a second must not
    /// flood the log, so changes within `SKIPPED_WARN_INTERVAL` of the last loud one
    /// are quiet (STATUS still shows the state).
    fn loud(&self) -> bool {
        let now = Instant::now();
        let mut at = self.logged_at.lock().unwrap_or_else(|p| p.into_inner());
        let loud = at.is_none_or(|t| now.duration_since(t) >= SKIPPED_WARN_INTERVAL);
        if loud {
            *at = Some(now);
        }
        loud
    }
}

/// `dir/<id>`: the one place an image id becomes a path (the cache's own paths, shown
/// in messages, and the directory upstream's files). Safe by construction: an `ImageId`
/// has no separators, so the path names an entry of `dir` itself.
pub(crate) fn file_in(dir: &Path, id: &ImageId) -> PathBuf {
    dir.join(id.as_str())
}

impl CacheLayout {
    /// Creates the root (if missing) and the three subdirectories, checks that the root
    /// is a writable directory and the subdirectories are real directories, and holds
    /// all four open. `root` must be absolute (config validation ensures it).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, LayoutError> {
        Self::open_with(root.into(), true)
    }

    /// Holds an existing layout open without creating or needing to write anything, for
    /// commands that only look: a missing root or subdirectory is an error.
    pub fn open_existing(root: impl Into<PathBuf>) -> Result<Self, LayoutError> {
        Self::open_with(root.into(), false)
    }

    fn open_with(root_path: PathBuf, create: bool) -> Result<Self, LayoutError> {
        let unusable = |path: &Path| {
            let path = path.to_path_buf();
            move |e: io::Error| LayoutError::Unusable { path, source: e }
        };
        if create {
            DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(&root_path)
                .map_err(unusable(&root_path))?;
        }
        // The root may be a symlink the operator made; it is resolved once, here.
        let root = rustix::fs::open(
            &root_path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            rustix::io::Errno::NOTDIR => LayoutError::NotADirectory {
                path: root_path.clone(),
            },
            e => unusable(&root_path)(e.into()),
        })?;
        if create {
            rustix::fs::accessat(
                &root,
                ".",
                rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
                AtFlags::empty(),
            )
            .map_err(|e| LayoutError::NotWritable {
                path: root_path.clone(),
                source: e.into(),
            })?;
        }
        let open_sub = |area: Area| -> Result<HeldDir, LayoutError> {
            let name = area.subdir().unwrap_or(".");
            let path = root_path.join(name);
            if create {
                match rustix::fs::mkdirat(&root, name, Mode::from_raw_mode(DIR_MODE)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(unusable(&path)(e.into())),
                }
            }
            // A planted `invalid -> /etc` symlink would make the cleaner delete files
            // outside the cache: only a real directory is held (O_NOFOLLOW refuses the
            // link itself, O_DIRECTORY anything else).
            let fd = rustix::fs::openat(
                &root,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| match e {
                rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => {
                    LayoutError::NotARealDirectory { path: path.clone() }
                }
                e => unusable(&path)(e.into()),
            })?;
            let st = rustix::fs::fstat(&fd).map_err(|e| unusable(&path)(e.into()))?;
            Ok(HeldDir {
                fd,
                dev: st.st_dev,
                ino: st.st_ino,
                replaced: AtomicBool::new(false),
                logged_at: Mutex::new(None),
            })
        };
        let subdirs = [
            open_sub(Area::Incomplete)?,
            open_sub(Area::Invalid)?,
            open_sub(Area::Queue)?,
        ];
        Ok(CacheLayout {
            inner: Arc::new(Held {
                root_path,
                root,
                subdirs,
                skip_warnings: Mutex::default(),
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root_path
    }

    /// The path of `area`, for messages and the watcher; files are reached through the
    /// held handles, never through this path.
    pub fn dir(&self, area: Area) -> PathBuf {
        match area.subdir() {
            None => self.inner.root_path.clone(),
            Some(sub) => self.inner.root_path.join(sub),
        }
    }

    /// The path of `id` in `area`, for messages only (see `file_in`).
    pub fn path(&self, area: Area, id: &ImageId) -> PathBuf {
        file_in(&self.dir(area), id)
    }

    /// The held handle of `area`, after checking that its name still names it. A
    /// replaced subdirectory is logged (once per change) and refused: its handle still
    /// reaches the original directory safely, but Glance, which works by path, no longer
    /// sees it, so acting on it would only hide the problem.
    fn fd(&self, area: Area) -> io::Result<BorrowedFd<'_>> {
        let Some(i) = area.index() else {
            return Ok(self.inner.root.as_fd());
        };
        let held = &self.inner.subdirs[i];
        const BACK: &str = "cache subdirectory is back in place";
        const REPLACED: &str = "cache subdirectory was replaced after start (a symlink or another directory has its name); it is not followed, and its work stops until it is restored or glance-cached restarts";
        if self.names_held(area, held) {
            if held.replaced.swap(false, Ordering::Relaxed) {
                let path = self.dir(area);
                if held.loud() {
                    info!(path = ?path, "{BACK}");
                } else {
                    debug!(path = ?path, "{BACK}");
                }
            }
            return Ok(held.fd.as_fd());
        }
        let path = self.dir(area);
        if !held.replaced.swap(true, Ordering::Relaxed) {
            if held.loud() {
                error!(path = ?path, "{REPLACED}");
            } else {
                debug!(path = ?path, "{REPLACED}");
            }
        }
        Err(io::Error::other(LayoutError::Replaced { path }))
    }

    fn names_held(&self, area: Area, held: &HeldDir) -> bool {
        let name = area.subdir().unwrap_or(".");
        match rustix::fs::statat(&self.inner.root, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st.st_dev == held.dev && st.st_ino == held.ino,
            Err(_) => false,
        }
    }

    /// The subdirectories whose names no longer name the directories held since start
    /// (each logged once when first noticed).
    pub fn replaced_dirs(&self) -> Vec<PathBuf> {
        Area::SUBDIRS
            .iter()
            .filter(|a| self.fd(**a).is_err())
            .map(|a| self.dir(*a))
            .collect()
    }

    /// Logs a pass's skipped entries as one line: a warning the first time, and again
    /// when their count has changed and `SKIPPED_WARN_INTERVAL` has passed; debug
    /// otherwise. Names are quoted, so a name with a newline cannot forge a log line.
    pub fn report_skipped(&self, message: &'static str, skipped: &Skipped) {
        if skipped.is_empty() {
            return;
        }
        let now = Instant::now();
        let warn_now = {
            let mut last = self
                .inner
                .skip_warnings
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let due = match last.get(message) {
                None => true,
                Some((at, count)) => {
                    *count != skipped.count && now.duration_since(*at) >= SKIPPED_WARN_INTERVAL
                }
            };
            if due {
                last.insert(message, (now, skipped.count));
            }
            due
        };
        if warn_now {
            warn!(count = skipped.count, examples = ?skipped.examples, "{message}");
        } else {
            debug!(count = skipped.count, examples = ?skipped.examples, "{message}");
        }
    }

    /// Lists the regular files named by valid ids in `area`, without following symlinks.
    /// Entries that vanish while listing are ignored.
    pub fn list(&self, area: Area) -> io::Result<Listing> {
        let dir_fd = self.fd(area)?;
        let mut listing = Listing::default();
        // Reads through a fresh descriptor of the held directory (`openat(fd, ".")`),
        // never through its path.
        for entry in rustix::fs::Dir::read_from(dir_fd)? {
            let entry = entry?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            // The three subdirectories, Glance's lock files and the SQLite database are
            // expected in the root: not images, and not worth a warning.
            if area == Area::Cached && is_own_entry(name) {
                continue;
            }
            let Some(image_id) = ImageId::from_file_name(name) else {
                listing.skipped.push(self.dir(area).join(name));
                continue;
            };
            let st = match rustix::fs::statat(dir_fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                listing.skipped.push(self.dir(area).join(name));
                continue;
            }
            listing.files.push(CacheFile {
                image_id,
                size: st.st_size.max(0) as u64,
                modified: mtime(&st),
                identity: (st.st_dev, st.st_ino),
            });
        }
        Ok(listing)
    }

    fn stat(&self, area: Area, id: &ImageId) -> io::Result<Option<Stat>> {
        match rustix::fs::statat(self.fd(area)?, id.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Size and mtime of `id` in `area` if it is a regular file; `None` if it is absent
    /// or is something else (a symlink, a directory, a FIFO).
    pub fn regular_file(&self, area: Area, id: &ImageId) -> io::Result<Option<FileStat>> {
        Ok(self
            .stat(area, id)?
            .filter(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile)
            .map(|st| FileStat {
                size: st.st_size.max(0) as u64,
                modified: mtime(&st),
            }))
    }

    /// Whether anything at all exists at `id` in `area` (Glance's `os.path.exists`). A
    /// replaced or unreadable area answers yes: callers then leave the image alone.
    pub fn exists(&self, area: Area, id: &ImageId) -> bool {
        !matches!(self.stat(area, id), Ok(None))
    }

    /// Removes `id` from `area` if it is a regular file. Returns the bytes freed, or
    /// `None` if there was nothing (or nothing regular) to remove.
    pub fn remove(&self, area: Area, id: &ImageId) -> io::Result<Option<u64>> {
        let Some(meta) = self.regular_file(area, id)? else {
            return Ok(None);
        };
        // `unlinkat` without AT_REMOVEDIR removes a name, never a directory, and never
        // what a symlink points to.
        match rustix::fs::unlinkat(self.fd(area)?, id.as_str(), AtFlags::empty()) {
            Ok(()) => Ok(Some(meta.size)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The cleaner's removal of a listed leftover: only the very file that was listed,
    /// only while `still_due` holds for its mtime now, and in `incomplete/` never while a
    /// writer holds its lock (`lock_for_writing`), whatever its age.
    pub fn remove_due(
        &self,
        area: Area,
        file: &CacheFile,
        still_due: impl Fn(SystemTime) -> bool,
    ) -> io::Result<Removal> {
        let dir = self.fd(area)?;
        let name = file.image_id.as_str();
        // No write goes on in `invalid/`: writers create and write in `incomplete/`, and
        // only one that gave up moves its own file here (`move_own`), done with it: it
        // publishes nothing from here, and its close follows. So there is no lock to
        // honour there, and no descriptor to open for one.
        let fd = if area == Area::Invalid {
            None
        } else {
            // O_NONBLOCK: a FIFO swapped in meanwhile cannot block us; O_NOFOLLOW: nor
            // can a symlink lead us out.
            match rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY
                    | OFlags::NOFOLLOW
                    | OFlags::NONBLOCK
                    | OFlags::NOCTTY
                    | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => Some(fd),
                Err(rustix::io::Errno::NOENT | rustix::io::Errno::LOOP) => {
                    return Ok(Removal::Changed);
                }
                // A file we may not read cannot be one of our writers' (they create 0640
                // files as this user): it cannot hold a lock we would honour.
                Err(rustix::io::Errno::ACCESS) => None,
                Err(e) => return Err(e.into()),
            }
        };
        let st = match &fd {
            Some(fd) => rustix::fs::fstat(fd)?,
            None => match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(rustix::io::Errno::NOENT) => return Ok(Removal::Changed),
                Err(e) => return Err(e.into()),
            },
        };
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile
            || (st.st_dev, st.st_ino) != file.identity
        {
            return Ok(Removal::Changed);
        }
        if !still_due(mtime(&st)) {
            return Ok(Removal::Rewritten {
                modified: mtime(&st),
            });
        }
        if let Some(fd) = &fd {
            match rustix::fs::flock(fd, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(rustix::io::Errno::WOULDBLOCK) => return Ok(Removal::BeingWritten),
                Err(e) => return Err(e.into()),
            }
            // Still the same file at the name, just before it goes (without a
            // descriptor, the name's stat above was that check).
            match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(now) if (now.st_dev, now.st_ino) == file.identity => {}
                Ok(_) | Err(rustix::io::Errno::NOENT) => return Ok(Removal::Changed),
                Err(e) => return Err(e.into()),
            }
        }
        match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) => Ok(Removal::Removed {
                bytes: st.st_size.max(0) as u64,
            }),
            Err(rustix::io::Errno::NOENT) => Ok(Removal::Changed),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates `id` in `area` for writing, failing with `AlreadyExists` if anything has
    /// that name (O_EXCL; a symlink counts and is never followed). The file is created
    /// `WRITING_MODE`: only the returned descriptor can write to it.
    pub fn create_new(&self, area: Area, id: &ImageId) -> io::Result<File> {
        let fd = rustix::fs::openat(
            self.fd(area)?,
            id.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(WRITING_MODE),
        )?;
        Ok(File::from(fd))
    }

    /// Gives a written file its published mode (`FILE_MODE`), through its descriptor.
    pub fn set_published_mode(&self, file: &File) -> io::Result<()> {
        rustix::fs::fchmod(file, Mode::from_raw_mode(FILE_MODE)).map_err(Into::into)
    }

    /// The size of the open `file` now (what the kernel has, not what a writer counted).
    pub fn open_file_size(&self, file: &File) -> io::Result<u64> {
        Ok(rustix::fs::fstat(file)?.st_size.max(0) as u64)
    }

    /// Marks `file` as being written, for as long as it stays open: no glance-cached
    /// cleaner (daemon or command) removes it, however long the writer pauses. Returns
    /// `false` when the filesystem has no file locks (some network or FUSE
    /// filesystems): the write then goes on unprotected, and its commit still publishes
    /// only its own inode. A lock someone else keeps is an error.
    pub fn lock_for_writing(&self, file: &File) -> io::Result<bool> {
        // A cleaner checking a file that was just created under a listed name holds
        // its lock for a moment; whoever holds it longer is not a cleaner.
        const ATTEMPTS: u32 = 50;
        const PAUSE: Duration = Duration::from_millis(1);
        for _ in 0..ATTEMPTS {
            match rustix::fs::flock(file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(true),
                Err(rustix::io::Errno::WOULDBLOCK) => std::thread::sleep(PAUSE),
                Err(
                    rustix::io::Errno::NOLCK
                    | rustix::io::Errno::OPNOTSUPP
                    | rustix::io::Errno::INVAL,
                ) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        Err(rustix::io::Errno::WOULDBLOCK.into())
    }

    /// Opens `id` in `area` for reading, refusing symlinks; O_NONBLOCK so a planted FIFO
    /// cannot hang the caller (callers check that it is a regular file).
    pub fn open_read(&self, area: Area, id: &ImageId) -> io::Result<File> {
        let fd = rustix::fs::openat(
            self.fd(area)?,
            id.as_str(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(File::from(fd))
    }

    /// `open_read`, but only when the kernel can do it without waiting on the disk, so
    /// that an async caller may call it on a runtime thread: `openat2` with
    /// `RESOLVE_CACHED` fails with `EAGAIN` instead of reading a directory block or an
    /// inode (every component must be in the dentry cache; io_uring opens inline the
    /// same way). Then, or when the kernel has no such open, `CachedOpen::Fallback`.
    /// Only `Area::Cached`: its handle is the root's, returned by `fd` with no syscall,
    /// while a subdirectory's handle is checked with a `statat` that could wait.
    /// Not found and a symlink (`ELOOP`) are answered here, as `open_read` would (the
    /// dentry cache knows a name is absent only when it has a negative entry for it).
    /// A FIFO opens at once (`O_NONBLOCK`), as with `open_read`; callers refuse what
    /// is not a regular file.
    pub fn try_open_read_cached(&self, area: Area, id: &ImageId) -> io::Result<CachedOpen> {
        if area.subdir().is_some() || OPENAT2_CACHED_UNAVAILABLE.load(Ordering::Relaxed) {
            return Ok(CachedOpen::Fallback);
        }
        let opened = rustix::fs::openat2(
            self.fd(area)?,
            id.as_str(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
            // The id is one validated name: BENEATH and NO_SYMLINKS hold anyway, and
            // say so to the kernel too.
            ResolveFlags::CACHED | ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
        );
        cached_open_outcome(opened, &OPENAT2_CACHED_UNAVAILABLE)
    }

    /// `exists(Area::Cached, id)` answered from memory, so that an async caller may ask
    /// on a runtime thread: an `O_PATH` open with `RESOLVE_CACHED` (see
    /// `try_open_read_cached`), which reads no directory block and no inode. `None` when
    /// the kernel would have had to wait on the disk (or has no such open): ask `exists`
    /// on the blocking pool. As `exists`, a symlink exists (`O_PATH | O_NOFOLLOW` opens
    /// the link itself, never its target).
    pub fn try_cached_exists(&self, id: &ImageId) -> Option<bool> {
        if OPENAT2_CACHED_UNAVAILABLE.load(Ordering::Relaxed) {
            return None;
        }
        let opened = rustix::fs::openat2(
            &self.inner.root,
            id.as_str(),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::CACHED | ResolveFlags::BENEATH,
        );
        match opened {
            Ok(_) => Some(true),
            Err(rustix::io::Errno::NOENT) => Some(false),
            // Anything else `exists` tells better (it counts an error as existing);
            // `cached_open_outcome` remembers a kernel without the open.
            Err(e) => {
                let _ = cached_open_outcome(Err(e), &OPENAT2_CACHED_UNAVAILABLE);
                None
            }
        }
    }

    /// Opens `id` in `area` for an eviction: for writing when we may (so its blocks can
    /// be freed in paced steps), else for reading (so the unlink stays quick: the blocks
    /// go when this descriptor closes). Never follows a symlink or blocks on a FIFO.
    pub fn open_to_evict(&self, area: Area, id: &ImageId) -> io::Result<(File, bool)> {
        let flags = OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        let dir = self.fd(area)?;
        match rustix::fs::openat(dir, id.as_str(), OFlags::WRONLY | flags, Mode::empty()) {
            Ok(fd) => Ok((File::from(fd), true)),
            Err(rustix::io::Errno::ACCESS | rustix::io::Errno::PERM) => {
                let fd =
                    rustix::fs::openat(dir, id.as_str(), OFlags::RDONLY | flags, Mode::empty())?;
                Ok((File::from(fd), false))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Unlinks `area/<id>` if that name still holds the open `file`'s inode; returns
    /// whether it did.
    pub fn unlink_own(&self, file: &File, area: Area, id: &ImageId) -> io::Result<bool> {
        let ours = rustix::fs::fstat(file)?;
        match self.stat(area, id)? {
            Some(st) if st.st_dev == ours.st_dev && st.st_ino == ours.st_ino => {}
            _ => return Ok(false),
        }
        match rustix::fs::unlinkat(self.fd(area)?, id.as_str(), AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates the zero-byte queue marker for `id` (kept for Glance's `GET /v2/cache`),
    /// stamped by the kernel as Glance's are. Returns `false`, creating nothing, when
    /// anything already has its name (O_EXCL: a marker, or a symlink, never followed):
    /// the queued check and the marker in one call, and two callers racing for one
    /// image cannot both make it.
    ///
    /// The stamp (the kernel's coarse clock) becomes the row's queued time when the
    /// marker is adopted, and a failed image is revived only by a marker newer than its
    /// failure: `give_up` removes the marker only once that clock has passed the
    /// failure's time, so any marker made after it is newer. Setting the time here
    /// instead cost a second journalled inode update per call (1,505 against 2,346
    /// `queue_image` calls a second on one disk) and did nothing for Glance's markers.
    pub fn create_marker(&self, id: &ImageId) -> io::Result<bool> {
        let queue = self.fd(Area::Queue)?;
        // `mknodat` of a regular file: an exclusive create that never follows a symlink,
        // without the descriptor an `openat` would make and close.
        match rustix::fs::mknodat(
            queue,
            id.as_str(),
            FileType::RegularFile,
            Mode::from_raw_mode(FILE_MODE),
            0,
        ) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::EXIST) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Moves whatever is at `id` from one area to another (same filesystem). Only for
    /// leftovers of dead writers; a live writer moves its own file with `move_own`.
    pub fn rename(&self, from: Area, to: Area, id: &ImageId) -> io::Result<()> {
        rustix::fs::renameat(self.fd(from)?, id.as_str(), self.fd(to)?, id.as_str())
            .map_err(Into::into)
    }

    /// Moves the file open as `file` from `from/<id>` to `to/<id>`, and only that file.
    /// Returns `false`, having moved nothing of anyone else's, when the name no longer
    /// holds it (removed, or replaced by another writer). The check before the rename
    /// avoids moving a stranger's file; the check after catches a swap in between,
    /// which is rolled back into `invalid/`.
    pub fn move_own(&self, file: &File, from: Area, to: Area, id: &ImageId) -> io::Result<bool> {
        let ours = rustix::fs::fstat(file)?;
        let is_ours = |st: &Stat| st.st_dev == ours.st_dev && st.st_ino == ours.st_ino;
        match self.stat(from, id)? {
            Some(st) if is_ours(&st) => {}
            _ => return Ok(false),
        }
        self.rename(from, to, id)?;
        match self.stat(to, id)? {
            Some(st) if is_ours(&st) => Ok(true),
            None => Ok(false),
            Some(_) => {
                if to != Area::Invalid {
                    self.rename(to, Area::Invalid, id)?;
                }
                Ok(false)
            }
        }
    }

    /// fsyncs the directory of `area`, making a rename into it durable.
    pub fn sync_dir(&self, area: Area) -> io::Result<()> {
        rustix::fs::fsync(self.fd(area)?).map_err(Into::into)
    }

    /// The cache filesystem's statistics, through the held root.
    pub fn statvfs(&self) -> io::Result<rustix::fs::StatVfs> {
        rustix::fs::fstatvfs(&self.inner.root).map_err(Into::into)
    }
}

/// What an `openat2(RESOLVE_CACHED)` result means for `try_open_read_cached` (apart, so
/// that the errors a test cannot provoke on a shared machine, such as a name out of the
/// dentry cache, are tested): `EAGAIN` falls back; `ENOSYS` and `EINVAL` fall back and
/// set `unavailable`; not found and a symlink are `open_read`'s errors; any other error
/// falls back, so that callers see the error the ordinary open gives.
fn cached_open_outcome(
    opened: rustix::io::Result<OwnedFd>,
    unavailable: &AtomicBool,
) -> io::Result<CachedOpen> {
    match opened {
        Ok(fd) => Ok(CachedOpen::Opened(File::from(fd))),
        Err(e @ (rustix::io::Errno::NOENT | rustix::io::Errno::LOOP)) => Err(e.into()),
        Err(rustix::io::Errno::NOSYS | rustix::io::Errno::INVAL) => {
            unavailable.store(true, Ordering::Relaxed);
            Ok(CachedOpen::Fallback)
        }
        Err(_) => Ok(CachedOpen::Fallback),
    }
}

/// A stat's mtime as a `SystemTime`, clamped to the epoch on either side of the range
/// `SystemTime` can hold (never a panic on a hostile timestamp).
fn mtime(st: &Stat) -> SystemTime {
    let nanos = u32::try_from(st.st_mtime_nsec)
        .unwrap_or(0)
        .min(999_999_999);
    if st.st_mtime >= 0 {
        SystemTime::UNIX_EPOCH
            .checked_add(Duration::new(st.st_mtime as u64, nanos))
            .unwrap_or(SystemTime::UNIX_EPOCH)
    } else {
        SystemTime::UNIX_EPOCH
            .checked_sub(Duration::new(st.st_mtime.unsigned_abs(), 0))
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// Entries of the cache root that belong to the layout, to Glance's locks or to a SQLite
/// database (the default one's directory `.glance-cached` included) and are expected,
/// so they are not reported as skipped.
fn is_own_entry(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    GLANCE_LOCK_NAMES.contains(&name)
        || Area::SUBDIRS.iter().any(|a| a.subdir() == Some(name))
        || name == ".glance-cached"
        || name.ends_with(".db")
        || name.ends_with(".db-wal")
        || name.ends_with(".db-shm")
        || name.ends_with(".db-journal")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn opened(outcome: io::Result<CachedOpen>) -> File {
        match outcome {
            Ok(CachedOpen::Opened(file)) => file,
            other => panic!("expected an open from memory, got {other:?}"),
        }
    }

    #[test]
    fn the_cached_open_finds_a_new_file_and_refuses_what_open_read_refuses() {
        use std::io::Read;
        let tmp = tempfile::tempdir().unwrap();
        let layout = CacheLayout::open(tmp.path().join("c")).unwrap();
        let root = layout.root().to_path_buf();
        // Just created: its dentry and inode are in memory.
        fs::write(root.join("img1"), b"the image's bytes").unwrap();
        let id = ImageId::parse("img1").unwrap();
        let mut bytes = Vec::new();
        opened(layout.try_open_read_cached(Area::Cached, &id))
            .read_to_end(&mut bytes)
            .unwrap();
        assert_eq!(bytes, b"the image's bytes");

        // A symlink is refused, not followed, as by `open_read`.
        fs::write(tmp.path().join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), root.join("link1")).unwrap();
        let link = ImageId::parse("link1").unwrap();
        let e = layout
            .try_open_read_cached(Area::Cached, &link)
            .unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(rustix::io::Errno::LOOP.raw_os_error())
        );
        assert!(layout.open_read(Area::Cached, &link).is_err());

        // A FIFO opens at once (O_NONBLOCK) and is no regular file, as with `open_read`.
        rustix::fs::mkfifoat(&layout.inner.root, "fifo1", Mode::from_raw_mode(0o600)).unwrap();
        let fifo = ImageId::parse("fifo1").unwrap();
        let file = opened(layout.try_open_read_cached(Area::Cached, &fifo));
        assert!(!file.metadata().unwrap().is_file());

        // Absent (a negative dentry after the failed lookup): not found, as `open_read`.
        let absent = ImageId::parse("absent1").unwrap();
        let e = layout.open_read(Area::Cached, &absent).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let e = layout
            .try_open_read_cached(Area::Cached, &absent)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);

        // The subdirectories' handles are checked with a syscall that may wait: never
        // opened this way.
        fs::write(root.join("incomplete/img1"), b"x").unwrap();
        assert!(matches!(
            layout.try_open_read_cached(Area::Incomplete, &id),
            Ok(CachedOpen::Fallback)
        ));
    }

    #[test]
    fn the_cached_exists_answers_from_memory_as_exists_does() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = CacheLayout::open(tmp.path().join("c")).unwrap();
        let root = layout.root().to_path_buf();
        let id = |name: &str| ImageId::parse(name).unwrap();
        // Just created: its dentry is in memory.
        fs::write(root.join("img1"), b"bytes").unwrap();
        assert_eq!(layout.try_cached_exists(&id("img1")), Some(true));
        // A symlink exists, as for `exists`, whatever it points at.
        std::os::unix::fs::symlink(tmp.path().join("nowhere"), root.join("link1")).unwrap();
        assert_eq!(layout.try_cached_exists(&id("link1")), Some(true));
        assert!(layout.exists(Area::Cached, &id("link1")));
        // Absent, once a lookup left a negative dentry.
        assert!(!layout.exists(Area::Cached, &id("absent1")));
        assert_eq!(layout.try_cached_exists(&id("absent1")), Some(false));
        // Removed: absent at once.
        fs::remove_file(root.join("img1")).unwrap();
        assert_eq!(layout.try_cached_exists(&id("img1")), Some(false));
        // A name never looked up is not in memory: asked on the blocking pool.
        fs::write(root.join("incomplete/img2"), b"x").unwrap();
        assert_eq!(layout.try_cached_exists(&id("img2")), None);
        // A subdirectory's entry is not an image.
        assert!(!layout.exists(Area::Cached, &id("img2")));
        assert_eq!(layout.try_cached_exists(&id("img2")), Some(false));
    }

    #[test]
    fn a_name_the_kernel_cannot_open_from_memory_falls_back_and_an_old_kernel_is_remembered() {
        use rustix::io::Errno;
        let unavailable = AtomicBool::new(false);
        // EAGAIN: not in the dentry cache; fall back, try from memory again next time.
        assert!(matches!(
            cached_open_outcome(Err(Errno::AGAIN), &unavailable),
            Ok(CachedOpen::Fallback)
        ));
        assert!(!unavailable.load(Ordering::Relaxed));
        // Other errors are left to `open_read` to tell.
        assert!(matches!(
            cached_open_outcome(Err(Errno::ACCESS), &unavailable),
            Ok(CachedOpen::Fallback)
        ));
        assert!(!unavailable.load(Ordering::Relaxed));
        // Not found and a symlink are answered as `open_read` answers them.
        let e = cached_open_outcome(Err(Errno::NOENT), &unavailable).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(cached_open_outcome(Err(Errno::LOOP), &unavailable).is_err());
        // No openat2 (ENOSYS) or no RESOLVE_CACHED (EINVAL): fall back, and remember.
        for errno in [Errno::NOSYS, Errno::INVAL] {
            let unavailable = AtomicBool::new(false);
            assert!(matches!(
                cached_open_outcome(Err(errno), &unavailable),
                Ok(CachedOpen::Fallback)
            ));
            assert!(unavailable.load(Ordering::Relaxed), "{errno:?}");
        }
    }

    #[test]
    fn paths_stay_inside_the_cache_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = CacheLayout::open(tmp.path().join("x")).unwrap();
        let id = ImageId::parse("abc").unwrap();
        assert_eq!(layout.path(Area::Cached, &id), tmp.path().join("x/abc"));
        assert_eq!(
            layout.path(Area::Invalid, &id),
            tmp.path().join("x/invalid/abc")
        );
    }

    #[test]
    fn listing_skips_symlinks_directories_and_non_ids() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = CacheLayout::open(tmp.path().join("c")).unwrap();
        let root = layout.root().to_path_buf();
        fs::write(root.join("img1"), b"12345").unwrap();
        fs::write(root.join("cache.db"), b"x").unwrap();
        fs::write(root.join("glance-cache"), b"").unwrap();
        fs::write(root.join("bad.name"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link1")).unwrap();
        fs::create_dir(root.join("dir1")).unwrap();
        let listing = layout.list(Area::Cached).unwrap();
        let ids: Vec<_> = listing.files.iter().map(|f| f.image_id.as_str()).collect();
        assert_eq!(ids, ["img1"]);
        assert_eq!(listing.files[0].size, 5);
        assert_eq!(listing.skipped.count, 3, "{:?}", listing.skipped);
        // Removing a symlink's id is refused: the link and its target stay.
        let link = ImageId::parse("link1").unwrap();
        assert_eq!(layout.remove(Area::Cached, &link).unwrap(), None);
        assert!(fs::symlink_metadata(root.join("link1")).is_ok());
    }

    #[test]
    fn a_flood_of_skipped_entries_keeps_a_count_and_a_few_examples() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = CacheLayout::open(tmp.path().join("c")).unwrap();
        for n in 0..50 {
            std::os::unix::fs::symlink(
                "/etc/passwd",
                layout.dir(Area::Invalid).join(format!("l{n}")),
            )
            .unwrap();
        }
        let listing = layout.list(Area::Invalid).unwrap();
        assert_eq!(listing.skipped.count, 50);
        assert_eq!(listing.skipped.examples.len(), SKIPPED_EXAMPLES);
    }

    #[test]
    fn open_refuses_a_symlinked_subdirectory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("c");
        fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink(tmp.path(), root.join("invalid")).unwrap();
        let err = CacheLayout::open(&root).unwrap_err();
        assert!(
            matches!(err, LayoutError::NotARealDirectory { .. }),
            "{err}"
        );
    }

    #[test]
    fn a_subdirectory_swapped_after_open_is_refused_and_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("victim"), b"keep").unwrap();
        let layout = CacheLayout::open(tmp.path().join("c")).unwrap();
        let invalid = layout.dir(Area::Invalid);
        fs::rename(&invalid, tmp.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(&outside, &invalid).unwrap();
        let victim = ImageId::parse("victim").unwrap();
        assert!(layout.list(Area::Invalid).is_err());
        assert!(layout.remove(Area::Invalid, &victim).is_err());
        assert_eq!(layout.replaced_dirs(), std::slice::from_ref(&invalid));
        assert_eq!(fs::read(outside.join("victim")).unwrap(), b"keep");
        // Put back, it is used again.
        fs::remove_file(&invalid).unwrap();
        fs::rename(tmp.path().join("moved"), &invalid).unwrap();
        assert!(layout.replaced_dirs().is_empty());
        assert!(layout.list(Area::Invalid).unwrap().files.is_empty());
    }

    #[test]
    fn a_file_being_written_cannot_be_opened_for_writing_even_by_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let layout = CacheLayout::open(tmp.path().join("c")).unwrap();
        let id = ImageId::parse("w").unwrap();
        let mut ours = layout.create_new(Area::Incomplete, &id).unwrap();
        std::io::Write::write_all(&mut ours, b"ours").unwrap();
        let path = layout.path(Area::Incomplete, &id);
        // Root ignores modes: a thread whose filesystem uid owns the file plays the
        // other writer (Glance's `open(path, 'wb')` as the same service user).
        let owner = if rustix::process::geteuid().is_root() {
            const OTHER_UID: u32 = 65534;
            fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
            std::os::unix::fs::chown(&path, Some(OTHER_UID), None).unwrap();
            Some(OTHER_UID)
        } else {
            None
        };
        let opened = std::thread::spawn(move || {
            if let Some(uid) = owner {
                // SAFETY: setfsuid only changes this thread's filesystem uid (and drops
                // its filesystem capabilities); the thread ends right after.
                unsafe { libc::setfsuid(uid) };
            }
            fs::OpenOptions::new().write(true).open(&path).map(drop)
        })
        .join()
        .unwrap();
        assert_eq!(
            opened.map_err(|e| e.kind()),
            Err(io::ErrorKind::PermissionDenied)
        );
        layout.set_published_mode(&ours).unwrap();
        let mode = rustix::fs::fstat(&ours).unwrap().st_mode & 0o777;
        assert_eq!(mode, FILE_MODE);
    }

    #[test]
    fn a_locked_file_is_never_removed_as_due() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = CacheLayout::open(tmp.path().join("c")).unwrap();
        let id = ImageId::parse("w").unwrap();
        let file = layout.create_new(Area::Incomplete, &id).unwrap();
        assert!(layout.lock_for_writing(&file).unwrap());
        let listed = layout.list(Area::Incomplete).unwrap().files.remove(0);
        assert_eq!(
            layout
                .remove_due(Area::Incomplete, &listed, |_| true)
                .unwrap(),
            Removal::BeingWritten
        );
        drop(file);
        assert_eq!(
            layout
                .remove_due(Area::Incomplete, &listed, |_| true)
                .unwrap(),
            Removal::Removed { bytes: 0 }
        );
    }

    /// In `invalid/` no lock is taken (no writer writes there): a file a failed writer
    /// moved there and still holds goes, but only the listed file, and only while due.
    #[test]
    fn an_invalid_file_goes_without_its_lock_but_only_as_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = CacheLayout::open(tmp.path().join("c")).unwrap();
        let id = ImageId::parse("w").unwrap();
        let file = layout.create_new(Area::Incomplete, &id).unwrap();
        assert!(layout.lock_for_writing(&file).unwrap());
        assert!(
            layout
                .move_own(&file, Area::Incomplete, Area::Invalid, &id)
                .unwrap()
        );
        let listed = layout.list(Area::Invalid).unwrap().files.remove(0);
        // Written since the listing: not due now.
        assert!(matches!(
            layout
                .remove_due(Area::Invalid, &listed, |_| false)
                .unwrap(),
            Removal::Rewritten { .. }
        ));
        // Another file swapped in at the name after the listing stays.
        let invalid = layout.dir(Area::Invalid);
        fs::rename(invalid.join("w"), invalid.join("aside")).unwrap();
        fs::write(invalid.join("w"), b"other").unwrap();
        assert_eq!(
            layout.remove_due(Area::Invalid, &listed, |_| true).unwrap(),
            Removal::Changed
        );
        assert_eq!(fs::read(invalid.join("w")).unwrap(), b"other");
        // The listed file, back at its name and still held by its writer, goes.
        fs::rename(invalid.join("aside"), invalid.join("w")).unwrap();
        assert_eq!(
            layout.remove_due(Area::Invalid, &listed, |_| true).unwrap(),
            Removal::Removed { bytes: 0 }
        );
        assert!(!invalid.join("w").exists());
        drop(file);
    }
}
