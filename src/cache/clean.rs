//! Clean: remove `invalid/` files and stalled `incomplete/` files.
//!
//! Glance's rule, with our decisions: one failed delete never aborts the rest, files that
//! vanish meanwhile are fine, symlinks and other non-regular entries are skipped (never
//! followed, and counted in one warning per pass), a file a writer still holds in
//! `incomplete/` is never removed however long it pauses (nothing is written in
//! `invalid/`, so no lock is asked for there), a replaced subdirectory is refused (the other area is
//! still cleaned), and the report says what was removed and when the next file can stall.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use super::layout::{Area, CacheLayout, Removal, Skipped};
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
    pub skipped: Skipped,
    /// Files whose writer still holds them (a paused download): left alone.
    pub being_written: usize,
    /// The earliest time a remaining file in `incomplete/` or `invalid/` becomes due, so
    /// a loop can sleep until then instead of polling.
    pub next_due: Option<SystemTime>,
}

impl CleanReport {
    pub fn files(&self) -> usize {
        self.removed.len()
    }
    pub fn bytes(&self) -> u64 {
        super::total_bytes(self.removed.iter().map(|r| r.bytes))
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

/// Glance's rule: an `invalid/` file may go once `age_limit` has passed since its mtime,
/// an `incomplete/` file once more than that has (mtime < now - stall_time). `Err` says
/// when it becomes due instead; `Err(None)`: never, for an mtime so far ahead (anyone can
/// set one) that the time cannot be represented.
fn due(
    area: Area,
    modified: SystemTime,
    age_limit: Duration,
    now: SystemTime,
) -> Result<(), Option<SystemTime>> {
    let due_at = modified.checked_add(age_limit).ok_or(None)?;
    let due = match area {
        Area::Invalid => due_at <= now,
        _ => due_at < now,
    };
    if due { Ok(()) } else { Err(Some(due_at)) }
}

fn clean_blocking(
    layout: &CacheLayout,
    policy: CleanPolicy,
    now: SystemTime,
) -> Result<CleanReport, CacheError> {
    let mut report = CleanReport::default();
    let mut unlisted = None;
    for (area, age_limit) in [
        (Area::Invalid, policy.invalid_grace),
        (Area::Incomplete, policy.stall_time),
    ] {
        let listing = match layout.list(area) {
            Ok(l) => l,
            Err(e) => {
                // The other area is still cleaned; the first error fails the pass.
                unlisted.get_or_insert(CacheError::io("list", layout.dir(area))(e));
                continue;
            }
        };
        report.skipped.merge(listing.skipped);
        // Glance's rule (`due`), which no extreme mtime can overflow.
        let is_due = |modified: SystemTime| due(area, modified, age_limit, now).is_ok();
        for file in listing.files {
            if let Err(due_at) = due(area, file.modified, age_limit, now) {
                if let Some(due_at) = due_at {
                    report.next_due = Some(report.next_due.map_or(due_at, |t| t.min(due_at)));
                }
                continue;
            }
            match layout.remove_due(area, &file, is_due) {
                Ok(Removal::BeingWritten) => {
                    report.being_written += 1;
                    // A paused download (only `incomplete/` files have writers) is looked
                    // at again when it could next stall.
                    let due_at = now.checked_add(age_limit).unwrap_or(now);
                    report.next_due = Some(report.next_due.map_or(due_at, |t| t.min(due_at)));
                }
                Ok(Removal::Changed) => {} // vanished or replaced meanwhile
                Ok(Removal::Rewritten { modified }) => {
                    let due_at = modified.checked_add(age_limit).unwrap_or(modified);
                    report.next_due = Some(report.next_due.map_or(due_at, |t| t.min(due_at)));
                }
                Ok(Removal::Removed { bytes }) => {
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
                Err(error) => {
                    let path = layout.path(area, &file.image_id);
                    warn!(path = ?path, %error, "failed to remove cache file");
                    report.failed.push((path, error.to_string()));
                }
            }
        }
    }
    layout.report_skipped(
        "skipping cache entries that are not regular files named by an image id",
        &report.skipped,
    );
    match unlisted {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::UNIX_EPOCH;

    use crate::db::time::tests::any_mtime as any_time;

    proptest! {
        #[test]
        fn due_never_panics_and_agrees_with_glance(
            modified in any_time(),
            now in any_time(),
            age in any::<u64>(),
            incomplete in any::<bool>(),
        ) {
            let area = if incomplete { Area::Incomplete } else { Area::Invalid };
            let age = Duration::from_secs(age);
            match due(area, modified, age, now) {
                Ok(()) => prop_assert!(modified.checked_add(age).is_some_and(|t| t <= now)),
                Err(Some(at)) => prop_assert!(at >= now && Some(at) == modified.checked_add(age)),
                Err(None) => prop_assert!(modified.checked_add(age).is_none()),
            }
        }
    }

    #[test]
    fn strict_for_incomplete_files() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let age = Duration::from_secs(10);
        let modified = now - age;
        assert_eq!(due(Area::Invalid, modified, age, now), Ok(()));
        assert_eq!(due(Area::Incomplete, modified, age, now), Err(Some(now)));
    }
}
