//! Reconcile: make the database and the disk agree again after a crash, an operator's
//! `rm`, or Glance's API dying between its rename and its insert.
//!
//! Files without a row get one (size from stat, both times from mtime); rows without a
//! file are removed; `incomplete/` and `invalid/` leftovers go through the clean rule.

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
    pub adopted: Vec<String>,
    /// Rows whose file was gone, removed.
    pub removed_rows: Vec<String>,
    /// What the clean rule removed from `incomplete/` and `invalid/`.
    pub cleaned: CleanReport,
}

impl ReconcileReport {
    pub fn changed(&self) -> bool {
        !self.adopted.is_empty() || !self.removed_rows.is_empty() || self.cleaned.files() > 0
    }
}

/// A cached file's mtime as the row's times, clamped to what the database stores (with a
/// warning: anyone can set any mtime).
fn mtime_as_db_time(id: &ImageId, modified: SystemTime) -> DbTime {
    DbTime::from_mtime(modified).unwrap_or_else(|clamped| {
        warn!(image_id = %id, "cached file's mtime is out of range; its row gets the nearest storable time");
        clamped
    })
}

impl CacheDriver {
    /// Gives each of `files` that is not in `known_ids` a row, with both times set to
    /// its mtime (an orphan ages by when it was written). Returns the ids adopted.
    pub(super) async fn adopt_files_without_rows(
        &self,
        files: &[CacheFile],
        known_ids: &HashSet<&str>,
    ) -> Result<Vec<String>, CacheError> {
        let orphans: Vec<(String, i64, DbTime)> = files
            .iter()
            .filter(|f| !known_ids.contains(f.image_id.as_str()))
            .map(|f| {
                (
                    f.image_id.to_string(),
                    f.size as i64,
                    mtime_as_db_time(&f.image_id, f.modified),
                )
            })
            .collect();
        let adopted = self.db().adopt_cached_images(self.node(), &orphans).await?;
        // One line per pass, not per file: a start over 100,000 files Glance wrote must
        // not flood the journal (each id is still there at debug level).
        for id in &adopted {
            debug!(image_id = %id, "adopted a cached file without a row");
        }
        if !adopted.is_empty() {
            let examples: Vec<&str> = adopted.iter().take(5).map(String::as_str).collect();
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
            .adopt_cached_image(
                self.node(),
                id.as_str(),
                meta.size as i64,
                mtime_as_db_time(id, meta.modified),
            )
            .await?;
        if adopted {
            info!(image_id = %id, "adopted a cached file without a row");
        }
        Ok(adopted)
    }

    pub async fn reconcile(
        &self,
        clean: CleanPolicy,
        now: SystemTime,
    ) -> Result<ReconcileReport, CacheError> {
        let listing = self.list(Area::Cached).await?;
        let rows = self.db().cached_images(self.node()).await?;
        let on_disk: HashSet<&str> = listing.files.iter().map(|f| f.image_id.as_str()).collect();
        let in_db: HashSet<&str> = rows.iter().map(|r| r.image_id.as_str()).collect();
        let adopted = self
            .adopt_files_without_rows(&listing.files, &in_db)
            .await?;
        let ghosts: Vec<String> = rows
            .iter()
            .filter(|r| !on_disk.contains(r.image_id.as_str()))
            .map(|r| r.image_id.clone())
            .collect();
        // A file published between our listing and now must keep its row. Rows with ids
        // that are not ours stay (they may be Glance's), except rows named like Glance's
        // lock files: earlier versions adopted those as images.
        let ghosts: Vec<String> = ghosts
            .into_iter()
            .filter(|g| match ImageId::parse(g) {
                Ok(id) => !self.is_cached(&id),
                Err(_) => GLANCE_LOCK_NAMES.contains(&g.as_str()),
            })
            .collect();
        self.db().delete_cached_images(self.node(), &ghosts).await?;
        for g in &ghosts {
            info!(image_id = %g, "reconcile: removed a row whose file is gone");
        }
        Ok(ReconcileReport {
            adopted,
            removed_rows: ghosts,
            cleaned: self.clean(clean, now).await?,
        })
    }
}
