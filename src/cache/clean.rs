//! Clean: remove `invalid/` files and stalled `incomplete/` files.
//!
//! Glance's rule, with our decisions: one failed delete never aborts the rest, files that
//! vanish meanwhile are fine, symlinks and other non-regular entries are skipped (never
//! followed), and the report says what was removed and when the next file can stall.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use super::layout::{Area, CacheLayout};
use super::{CacheDriver, CacheError};
use crate::image_id::ImageId;

/// When files count as leftovers.
#[derive(Debug, Clone, Copy)]
pub struct CleanPolicy {
    /// An `incomplete/` file not written for this long is removed.
    pub stall_time: Duration,
    /// An `invalid/` file is removed once it is this old (0: at once).
    pub invalid_grace: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedFile {
    pub area: Area,
    pub image_id: ImageId,
    pub bytes: u64,
}

#[derive(Debug, Default)]
pub struct CleanReport {
    pub removed: Vec<RemovedFile>,
    /// Entries that could not be removed, with the reason.
    pub failed: Vec<(PathBuf, String)>,
    /// Entries that are not regular files named by an image id: left alone.
    pub skipped: Vec<PathBuf>,
    /// The earliest time a remaining file in `incomplete/` or `invalid/` becomes due, so
    /// a loop can sleep until then instead of polling.
    pub next_due: Option<SystemTime>,
}

impl CleanReport {
    pub fn files(&self) -> usize {
        self.removed.len()
    }
    pub fn bytes(&self) -> u64 {
        self.removed.iter().map(|r| r.bytes).sum()
    }
}

impl CacheDriver {
    /// Glance's `clean`: removes every `invalid/` file past the grace and every
    /// `incomplete/` file whose mtime is older than `now - stall_time`.
    pub async fn clean(
        &self,
        policy: CleanPolicy,
        now: SystemTime,
    ) -> Result<CleanReport, CacheError> {
        let layout = self.layout().clone();
        crate::blocking(move || clean_blocking(&layout, policy, now)).await
    }
}

fn clean_blocking(
    layout: &CacheLayout,
    policy: CleanPolicy,
    now: SystemTime,
) -> Result<CleanReport, CacheError> {
    let mut report = CleanReport::default();
    for (area, age_limit) in [
        (Area::Invalid, policy.invalid_grace),
        (Area::Incomplete, policy.stall_time),
    ] {
        let listing = layout
            .list(area)
            .map_err(CacheError::io("list", layout.dir(area)))?;
        for path in &listing.skipped {
            warn!(path = %path.display(), "skipping a cache entry that is not a regular file named by an image id");
        }
        report.skipped.extend(listing.skipped);
        let cutoff = now.checked_sub(age_limit).unwrap_or(SystemTime::UNIX_EPOCH);
        for file in listing.files {
            // Glance's rule for incomplete/: remove when mtime < now - stall_time.
            let due = match area {
                Area::Invalid => file.modified <= cutoff,
                _ => file.modified < cutoff,
            };
            if !due {
                let due_at = file.modified + age_limit;
                report.next_due = Some(report.next_due.map_or(due_at, |t| t.min(due_at)));
                continue;
            }
            match layout.remove(area, &file.image_id) {
                Ok(Some(bytes)) => {
                    let what = if area == Area::Invalid {
                        "invalid"
                    } else {
                        "stalled"
                    };
                    info!(image_id = %file.image_id, bytes, kind = what, "removed {what} cache file");
                    report.removed.push(RemovedFile {
                        area,
                        image_id: file.image_id,
                        bytes,
                    });
                    if report.removed.len() == 1 {
                        crate::failpoint::hit("clean:mid");
                    }
                }
                Ok(None) => {} // vanished meanwhile, or replaced by a non-regular entry
                Err(error) => {
                    let path = layout.path(area, &file.image_id);
                    warn!(path = %path.display(), %error, "failed to remove cache file");
                    report.failed.push((path, error.to_string()));
                }
            }
        }
    }
    Ok(report)
}
