//! Commands run as root act as the owner of the cache.
//!
//! The configuration is `root:glance 0640`, so operators run the CLI with sudo. Files a
//! root command created in the cache (its subdirectories, the SQLite database and its
//! `-wal`/`-shm`, imported images) would be root's, and the `glance` service could then
//! neither write the database ("attempt to write a readonly database") nor read the
//! images. So before anything is touched, a root process takes the user and group of
//! the cache directory (or, while it does not exist yet, of its nearest existing
//! parent), as `runuser -u glance` would.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub(super) enum OwnerError {
    #[error("cannot look up the owner of {path:?}: {source}")]
    Stat {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot switch to the cache owner's uid {uid} and gid {gid}: {source}")]
    Switch {
        uid: u32,
        gid: u32,
        source: std::io::Error,
    },
}

/// The user and group a root process switched to, if it switched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Switched {
    pub uid: u32,
    pub gid: u32,
}

/// As root, becomes the owner of `cache_dir` (see the module doc). A process that is
/// not root, or a cache owned by root, stays as it is. Must run before the process
/// starts threads: the switch is made for the calling thread's process through libc,
/// which applies it to every thread, but threads started later simply inherit it.
pub(super) fn act_as_cache_owner(cache_dir: &Path) -> Result<Option<Switched>, OwnerError> {
    if !rustix::process::geteuid().is_root() {
        return Ok(None);
    }
    let (uid, gid) = owner_of_nearest(cache_dir)?;
    if uid == 0 {
        return Ok(None);
    }
    let failed = |source| OwnerError::Switch { uid, gid, source };
    // Group first: once the uid is dropped, the group can no longer be changed.
    // SAFETY: plain system calls on integer arguments; `groups` outlives the call.
    unsafe {
        let groups = [gid as libc::gid_t];
        if libc::setgroups(1, groups.as_ptr()) != 0 {
            return Err(failed(std::io::Error::last_os_error()));
        }
        if libc::setgid(gid as libc::gid_t) != 0 {
            return Err(failed(std::io::Error::last_os_error()));
        }
        if libc::setuid(uid as libc::uid_t) != 0 {
            return Err(failed(std::io::Error::last_os_error()));
        }
    }
    Ok(Some(Switched { uid, gid }))
}

/// The owner of `path`, or of its nearest existing parent. The path itself is not
/// followed if it is a symlink: the cache checks refuse that later with their own error.
fn owner_of_nearest(path: &Path) -> Result<(u32, u32), OwnerError> {
    let mut at = path;
    loop {
        match std::fs::symlink_metadata(at) {
            Ok(meta) => return Ok((meta.uid(), meta.gid())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match at.parent() {
                Some(parent) => at = parent,
                None => return Ok((0, 0)),
            },
            Err(source) => {
                return Err(OwnerError::Stat {
                    path: at.to_path_buf(),
                    source,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_existing_parent_names_the_owner() {
        let tmp = tempfile::tempdir().unwrap();
        let meta = std::fs::metadata(tmp.path()).unwrap();
        let deep = tmp.path().join("not/yet/there");
        assert_eq!(owner_of_nearest(&deep).unwrap(), (meta.uid(), meta.gid()));
        assert_eq!(
            owner_of_nearest(tmp.path()).unwrap(),
            (meta.uid(), meta.gid())
        );
    }
}
