//! The on-disk layout shared with Glance: `<dir>/<id>`, `incomplete/`, `invalid/`, `queue/`.
//!
//! This is the only module that turns an `ImageId` into a path. Listing and deleting go
//! through here too, so that symlinks, FIFOs, directories and names that are not image
//! ids are never followed, counted or removed.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::image_id::ImageId;

/// Directories are created 0750 and files 0640: readable by the service group (Glance
/// runs as `glance`), never by other local users.
pub const DIR_MODE: u32 = 0o750;
pub const FILE_MODE: u32 = 0o640;

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
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("cache directory {path} is not usable: {source}")]
    Unusable { path: PathBuf, source: io::Error },
    #[error("cache directory {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("{path} must be a real directory, not a symlink or other file")]
    NotARealDirectory { path: PathBuf },
    #[error("cache directory {path} is not writable: {source}")]
    NotWritable { path: PathBuf, source: io::Error },
}

/// A file found by a safe listing: a regular file whose name is a valid image id.
#[derive(Debug, Clone)]
pub struct CacheFile {
    pub image_id: ImageId,
    pub size: u64,
    pub modified: SystemTime,
}

/// The result of listing one area: the image files, and how many entries were skipped
/// because they were not regular files named by a valid id.
#[derive(Debug, Default)]
pub struct Listing {
    pub files: Vec<CacheFile>,
    pub skipped: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct CacheLayout {
    root: PathBuf,
}

impl CacheLayout {
    /// A layout rooted at `root`, which must be absolute (config validation ensures it).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        CacheLayout { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir(&self, area: Area) -> PathBuf {
        match area.subdir() {
            None => self.root.clone(),
            Some(sub) => self.root.join(sub),
        }
    }

    /// The path of `id` in `area`. Safe by construction: an `ImageId` has no separators.
    pub fn path(&self, area: Area, id: &ImageId) -> PathBuf {
        let mut p = self.dir(area);
        p.push(id.as_str());
        p
    }

    /// Creates the root (if missing) and the three subdirectories, and checks that the
    /// root is a writable directory and the subdirectories are real directories.
    pub fn ensure(&self) -> Result<(), LayoutError> {
        let unusable = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LayoutError::Unusable { path, source }
        };
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&self.root)
            .map_err(unusable(&self.root))?;
        let meta = fs::metadata(&self.root).map_err(unusable(&self.root))?;
        if !meta.is_dir() {
            return Err(LayoutError::NotADirectory {
                path: self.root.clone(),
            });
        }
        rustix::fs::access(
            &self.root,
            rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
        )
        .map_err(|e| LayoutError::NotWritable {
            path: self.root.clone(),
            source: e.into(),
        })?;
        for area in Area::SUBDIRS {
            let dir = self.dir(area);
            match DirBuilder::new().mode(DIR_MODE).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(unusable(&dir)(e)),
            }
            // A planted `invalid -> /etc` symlink would make the cleaner delete files
            // outside the cache: refuse to run on anything but a real directory.
            let meta = fs::symlink_metadata(&dir).map_err(unusable(&dir))?;
            if !meta.is_dir() {
                return Err(LayoutError::NotARealDirectory { path: dir });
            }
        }
        Ok(())
    }

    /// Lists the regular files named by valid ids in `area`, without following symlinks.
    /// Entries that vanish while listing are ignored.
    pub fn list(&self, area: Area) -> io::Result<Listing> {
        let mut listing = Listing::default();
        for entry in fs::read_dir(self.dir(area))? {
            let entry = match entry {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let name = entry.file_name();
            // The three subdirectories, Glance's lock files and the SQLite database are
            // expected in the root: not images, and not worth a warning.
            if area == Area::Cached && is_own_entry(&name) {
                continue;
            }
            let Some(image_id) = ImageId::from_file_name(&name) else {
                listing.skipped.push(entry.path());
                continue;
            };
            // `DirEntry::metadata` does not follow symlinks.
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if !meta.file_type().is_file() {
                listing.skipped.push(entry.path());
                continue;
            }
            listing.files.push(CacheFile {
                image_id,
                size: meta.len(),
                modified: meta.modified()?,
            });
        }
        Ok(listing)
    }

    /// Metadata of `id` in `area` if it is a regular file; `None` if it is absent or is
    /// something else (a symlink, a directory, a FIFO).
    pub fn regular_file(&self, area: Area, id: &ImageId) -> io::Result<Option<fs::Metadata>> {
        match fs::symlink_metadata(self.path(area, id)) {
            Ok(m) if m.file_type().is_file() => Ok(Some(m)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether anything at all exists at `id` in `area` (Glance's `os.path.exists`).
    pub fn exists(&self, area: Area, id: &ImageId) -> bool {
        fs::symlink_metadata(self.path(area, id)).is_ok()
    }

    /// Removes `id` from `area` if it is a regular file. Returns the bytes freed, or
    /// `None` if there was nothing (or nothing regular) to remove.
    pub fn remove(&self, area: Area, id: &ImageId) -> io::Result<Option<u64>> {
        let Some(meta) = self.regular_file(area, id)? else {
            return Ok(None);
        };
        match fs::remove_file(self.path(area, id)) {
            Ok(()) => Ok(Some(meta.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates the zero-byte queue marker for `id` (kept for Glance's `GET /v2/cache`).
    pub fn touch_marker(&self, id: &ImageId) -> io::Result<()> {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(self.path(Area::Queue, id))
            .map(drop)
    }

    /// Moves `id` from one area to another by rename (same filesystem).
    pub fn rename(&self, from: Area, to: Area, id: &ImageId) -> io::Result<()> {
        fs::rename(self.path(from, id), self.path(to, id))
    }

    /// fsyncs the directory of `area`, making a rename into it durable.
    pub fn sync_dir(&self, area: Area) -> io::Result<()> {
        fs::File::open(self.dir(area))?.sync_all()
    }
}

/// Lock files that Glance's API creates in the cache root through oslo.concurrency
/// (`@lockutils.synchronized('glance-cache-clean', external=True)`). Their names are valid
/// ids, but they are not images: never listed, counted, adopted or pruned.
pub const GLANCE_LOCK_FILES: [&str; 2] = ["glance-cache-clean", "glance-cache-prune"];

/// Entries of the cache root that belong to the layout, to Glance's locks or to a SQLite
/// database (the default one's directory `.glance-cached` included) and are expected,
/// so they are not reported as skipped.
fn is_own_entry(name: &std::ffi::OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    GLANCE_LOCK_FILES.contains(&name)
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

    #[test]
    fn paths_stay_inside_the_cache_dir() {
        let layout = CacheLayout::new("/var/cache/x");
        let id = ImageId::parse("abc").unwrap();
        assert_eq!(
            layout.path(Area::Cached, &id),
            Path::new("/var/cache/x/abc")
        );
        assert_eq!(
            layout.path(Area::Invalid, &id),
            Path::new("/var/cache/x/invalid/abc")
        );
    }

    #[test]
    fn listing_skips_symlinks_directories_and_non_ids() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = CacheLayout::new(tmp.path().join("c"));
        layout.ensure().unwrap();
        let root = layout.root().to_path_buf();
        fs::write(root.join("img1"), b"12345").unwrap();
        fs::write(root.join("cache.db"), b"x").unwrap();
        fs::write(root.join("bad.name"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link1")).unwrap();
        fs::create_dir(root.join("dir1")).unwrap();
        let listing = layout.list(Area::Cached).unwrap();
        let ids: Vec<_> = listing.files.iter().map(|f| f.image_id.as_str()).collect();
        assert_eq!(ids, ["img1"]);
        assert_eq!(listing.files[0].size, 5);
        assert_eq!(listing.skipped.len(), 3, "{:?}", listing.skipped);
        // Removing a symlink's id is refused: the link and its target stay.
        let link = ImageId::parse("link1").unwrap();
        assert_eq!(layout.remove(Area::Cached, &link).unwrap(), None);
        assert!(fs::symlink_metadata(root.join("link1")).is_ok());
    }

    #[test]
    fn ensure_refuses_a_symlinked_subdirectory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("c");
        fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink(tmp.path(), root.join("invalid")).unwrap();
        let err = CacheLayout::new(&root).ensure().unwrap_err();
        assert!(
            matches!(err, LayoutError::NotARealDirectory { .. }),
            "{err}"
        );
    }
}
