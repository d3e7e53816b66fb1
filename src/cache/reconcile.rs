//! Reconcile: make the database and the disk agree again after a crash, an operator's
//! `rm`, or Glance's API dying between its rename and its insert.
//!
//! Files without a row get one (size from stat, both times from mtime); a row whose
//! file's size changed (copied over by hand, truncated by a disk error) gets the file's
//! size and loses its checksum, which no longer describes the bytes; rows without a
//! file are removed, unless so many are missing that the cache's filesystem is more
//! likely unmounted than emptied; `incomplete/` and `invalid/` leftovers go through the
//! clean rule.

use std::collections::HashSet;
use std::time::SystemTime;

use tracing::{debug, info, warn};

use super::layout::{Area, CacheFile};
use super::{CacheDriver, CacheError, CleanPolicy, CleanReport};
use crate::db::DbTime;
use crate::image_id::{GLANCE_LOCK_NAMES, ImageId};

#[derive(Debug, Default)]
pub struct ReconcileReport {
    /// Files that had no row and were given one.
    pub adopted: Vec<ImageId>,
    /// Rows whose file was gone, removed, by their id as stored (rows named like
    /// Glance's lock files, which are no image ids, among them).
    pub removed_rows: Vec<String>,
    /// Rows whose file has another size now: size refreshed, checksum cleared.
    pub resized: Vec<ImageId>,
    /// What the clean rule removed from `incomplete/` and `invalid/`.
    pub cleaned: CleanReport,
}

/// A cached file's mtime as the row's times, clamped to what the database stores (with a
/// warning: anyone can set any mtime).
fn mtime_as_db_time(id: &ImageId, modified: SystemTime) -> DbTime {
    DbTime::from_mtime(modified).unwrap_or_else(|clamped| {
        warn!(image_id = %id, "cached file's mtime is out of range; its row gets the nearest storable time");
        clamped
    })
}

/// Reconcile refuses to drop rows when the files of more than this share of the node's
/// rows (and of more than one row) are missing: an unmounted filesystem looks like an
/// emptied cache, and dropping every row would have the prefetcher refill the root
/// filesystem. One lost file, or a few among many, is an operator's `rm`.
pub(crate) const MAX_MISSING_SHARE_PERCENT: usize = 50;

/// Whether `missing` rows without files out of `rows` is too many to drop unasked.
fn too_many_missing(missing: usize, rows: usize) -> bool {
    missing > 1 && missing * 100 > rows * MAX_MISSING_SHARE_PERCENT
}

impl CacheDriver {
    /// Gives each of `files` that is not in `known_ids` a row, with both times set to
    /// its mtime (an orphan ages by when it was written). Returns the ids adopted.
    pub(super) async fn adopt_files_without_rows(
        &self,
        files: &[CacheFile],
        known_ids: &HashSet<&str>,
    ) -> Result<Vec<ImageId>, CacheError> {
        let orphans: Vec<(ImageId, i64, DbTime)> = files
            .iter()
            .filter(|f| !known_ids.contains(f.image_id.as_str()))
            .map(|f| {
                (
                    f.image_id.clone(),
                    f.size as i64,
                    mtime_as_db_time(&f.image_id, f.modified),
                )
            })
            .collect();
        let adopted = self.db().adopt_cached_images(&orphans).await?;
        // One line per pass, not per file: a start over 100,000 files Glance wrote must
        // not flood the journal (each id is still there at debug level).
        for id in &adopted {
            debug!(image_id = %id, "adopted a cached file without a row");
        }
        if !adopted.is_empty() {
            let examples: Vec<&str> = adopted.iter().take(5).map(ImageId::as_str).collect();
            info!(
                adopted = adopted.len(),
                examples = %examples.join(","),
                "adopted cached files without rows"
            );
        }
        Ok(adopted)
    }

    /// Gives the cached file `id` a row if it is a regular file without one (size from
    /// stat, both times from its mtime). Returns whether a row was added.
    pub(super) async fn adopt_cached_file(&self, id: &ImageId) -> Result<bool, CacheError> {
        let path = self.layout().path(Area::Cached, id);
        let Some(meta) = self
            .layout()
            .regular_file(Area::Cached, id)
            .map_err(CacheError::io("stat", &path))?
        else {
            return Ok(false);
        };
        let adopted = self
            .db()
            .adopt_cached_image(id, meta.size as i64, mtime_as_db_time(id, meta.modified))
            .await?;
        if adopted {
            info!(image_id = %id, "adopted a cached file without a row");
        }
        Ok(adopted)
    }

    /// Gives each row whose file now has another size that size, and clears its
    /// checksum. Returns the ids refreshed.
    async fn refresh_resized_rows(
        &self,
        files: &[CacheFile],
        rows: &[crate::db::CachedImageRow],
    ) -> Result<Vec<ImageId>, CacheError> {
        let sizes: std::collections::HashMap<&str, u64> = files
            .iter()
            .map(|f| (f.image_id.as_str(), f.size))
            .collect();
        let mut resized = Vec::new();
        for row in rows {
            let Some(&size) = sizes.get(row.image_id.as_str()) else {
                continue;
            };
            if u64::try_from(row.size).ok() == Some(size) {
                continue;
            }
            if self
                .db()
                .refresh_cached_image_size(row.image_id.as_str(), row.size, size as i64)
                .await?
            {
                warn!(
                    image_id = %row.image_id,
                    recorded = row.size,
                    bytes = size,
                    "reconcile: the cached file's size differs from its row; size refreshed, checksum cleared"
                );
                resized.push(row.image_id.clone());
            }
        }
        Ok(resized)
    }

    /// Repairs drift between disk and database. Fails with `FilesMissing`, changing
    /// nothing, when the rows without files are too many to drop (see
    /// [`MAX_MISSING_SHARE_PERCENT`]), unless `force_drop` says they are really gone.
    pub async fn reconcile(
        &self,
        clean: CleanPolicy,
        now: SystemTime,
        force_drop: bool,
    ) -> Result<ReconcileReport, CacheError> {
        let listing = self.list(Area::Cached).await?;
        let all = self.db().cached_images_and_unreadable().await?;
        all.warn_unreadable();
        let (rows, invalid_ids) = (all.rows, all.invalid_ids);
        let on_disk: HashSet<&ImageId> = listing.files.iter().map(|f| &f.image_id).collect();
        let in_db: HashSet<&str> = rows.iter().map(|r| r.image_id.as_str()).collect();
        // A file published between our listing and now must keep its row. Rows with ids
        // that are not ours stay (they may be Glance's), except rows named like Glance's
        // lock files: earlier versions adopted those as images.
        let ghosts: Vec<String> = rows
            .iter()
            .filter(|r| !on_disk.contains(&r.image_id) && !self.is_cached(&r.image_id))
            .map(|r| r.image_id.to_string())
            .chain(
                invalid_ids
                    .iter()
                    .filter(|raw| GLANCE_LOCK_NAMES.contains(&raw.as_str()))
                    .cloned(),
            )
            .collect();
        let row_count = rows.len() + invalid_ids.len();
        if !force_drop && too_many_missing(ghosts.len(), row_count) {
            return Err(CacheError::FilesMissing {
                missing: ghosts.len(),
                rows: row_count,
                dir: self.layout().dir(Area::Cached),
            });
        }
        let adopted = self
            .adopt_files_without_rows(&listing.files, &in_db)
            .await?;
        let resized = self.refresh_resized_rows(&listing.files, &rows).await?;
        self.db().delete_cached_images(&ghosts).await?;
        for g in &ghosts {
            info!(image_id = %g, "reconcile: removed a row whose file is gone");
        }
        Ok(ReconcileReport {
            adopted,
            removed_rows: ghosts,
            resized,
            cleaned: self.clean(clean, now).await?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::too_many_missing;

    #[test]
    fn more_than_half_and_more_than_one_missing_is_too_many() {
        assert!(!too_many_missing(0, 0));
        assert!(!too_many_missing(1, 1), "one lost file is an rm");
        assert!(too_many_missing(2, 2));
        assert!(!too_many_missing(2, 4), "half is not more than half");
        assert!(too_many_missing(3, 5));
        assert!(!too_many_missing(10, 1000));
    }
}
