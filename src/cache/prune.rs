//! Prune: evict least recently accessed images until the cache fits.
//!
//! Glance's order and stop condition (LRU by `last_accessed`, stop once size <= max),
//! plus: no loop without progress (rows are visited once, by a cursor), files without
//! rows are adopted first so they can be evicted, rows without files are dropped, an
//! optional low watermark, and an optional minimum of free disk space.

use std::collections::HashSet;

use tracing::{info, warn};

use super::layout::Area;
use super::{CacheDriver, CacheError};
use crate::db::LruCursor;
use crate::image_id::ImageId;

/// Rows fetched per LRU batch: bounded memory, few round trips.
const PRUNE_BATCH_ROWS: i64 = 512;

#[derive(Debug, Clone, Copy, Default)]
pub struct PrunePolicy {
    /// Prune once the cache is larger than this.
    pub max_size: u64,
    /// Once pruning, go down to this (must be <= max_size); default: max_size.
    pub low_watermark: Option<u64>,
    /// Also prune while the filesystem has less free space than this.
    pub min_free_disk: Option<u64>,
}

#[derive(Debug, Default, Clone)]
pub struct PruneReport {
    pub size_before: u64,
    pub size_after: u64,
    /// Images evicted, in eviction order, with the bytes each freed.
    pub pruned: Vec<(ImageId, u64)>,
    /// Rows whose file was already gone (freed 0 bytes).
    pub rows_without_file: u64,
    /// Files that had no row and were given one before choosing victims.
    pub adopted: u64,
    /// Cached images left after the prune.
    pub images_after: usize,
}

impl PruneReport {
    pub fn files(&self) -> usize {
        self.pruned.len()
    }
    pub fn bytes(&self) -> u64 {
        super::total_bytes(self.pruned.iter().map(|(_, b)| *b))
    }
}

impl CacheDriver {
    pub async fn prune(&self, policy: PrunePolicy) -> Result<PruneReport, CacheError> {
        let listing = self.list(Area::Cached).await?;
        let mut size = super::total_bytes(listing.files.iter().map(|f| f.size));
        let mut report = PruneReport {
            size_before: size,
            size_after: size,
            images_after: listing.files.len(),
            ..Default::default()
        };
        let target = if size > policy.max_size {
            policy
                .low_watermark
                .unwrap_or(policy.max_size)
                .min(policy.max_size)
        } else {
            size
        };
        let needs_pruning = |size: u64, driver: &CacheDriver| {
            size > target
                || policy
                    .min_free_disk
                    .is_some_and(|min| driver.free_disk() < min)
        };
        if !needs_pruning(size, self) {
            return Ok(report);
        }
        // Files without rows would never be candidates: give them rows, aged by mtime.
        let all = self.db().cached_images_and_unreadable(self.node()).await?;
        all.warn_unreadable();
        let crate::db::CachedImageRows { rows, unreadable } = all;
        let known: HashSet<&str> = rows
            .iter()
            .map(|r| r.image_id.as_str())
            .chain(unreadable.iter().filter_map(|u| u.image_id.as_deref()))
            .collect();
        report.adopted = self
            .adopt_files_without_rows(&listing.files, &known)
            .await?
            .len() as u64;
        // A row whose time cannot be read counts as the oldest: evicted first.
        size = self
            .evict_unreadable_rows(&unreadable, size, &mut report, |size| {
                needs_pruning(size, self)
            })
            .await?;

        let mut cursor = None;
        'batches: loop {
            let rows = self
                .db()
                .least_recently_accessed(self.node(), cursor, PRUNE_BATCH_ROWS)
                .await?;
            let Some(last) = rows.last() else { break };
            cursor = Some(LruCursor {
                last_accessed: last.last_accessed,
                id: last.id,
            });
            let mut gone_rows = Vec::with_capacity(rows.len());
            for row in &rows {
                if !needs_pruning(size, self) {
                    self.db()
                        .delete_cached_images(self.node(), &gone_rows)
                        .await?;
                    break 'batches;
                }
                let Some(id) = super::driver::valid_row_id(&row.image_id) else {
                    continue;
                };
                match self.layout().remove(Area::Cached, &id) {
                    Ok(Some(bytes)) => {
                        info!(image_id = %id, bytes, "pruned cached image");
                        size = size.saturating_sub(bytes);
                        report.pruned.push((id, bytes));
                        if gone_rows.is_empty() {
                            crate::failpoint::hit("prune:mid");
                        }
                    }
                    Ok(None) => report.rows_without_file += 1,
                    Err(error) => {
                        warn!(image_id = %id, %error, "failed to prune cached image; skipping it");
                        continue;
                    }
                }
                gone_rows.push(row.image_id.clone());
            }
            self.db()
                .delete_cached_images(self.node(), &gone_rows)
                .await?;
        }
        report.size_after = size;
        report.images_after = listing.files.len().saturating_sub(report.pruned.len());
        Ok(report)
    }

    /// Evicts the images of `unreadable` rows (those with a valid id) while `needs` holds,
    /// and drops their rows. Returns the cache size after.
    async fn evict_unreadable_rows(
        &self,
        unreadable: &[crate::db::UnreadableRow],
        mut size: u64,
        report: &mut PruneReport,
        needs: impl Fn(u64) -> bool,
    ) -> Result<u64, CacheError> {
        let mut gone_rows = Vec::new();
        for raw in unreadable.iter().filter_map(|u| u.image_id.as_deref()) {
            if !needs(size) {
                break;
            }
            let Some(id) = super::driver::valid_row_id(raw) else {
                continue;
            };
            match self.layout().remove(Area::Cached, &id) {
                Ok(Some(bytes)) => {
                    info!(image_id = %id, bytes, "pruned cached image (its row is unreadable)");
                    size = size.saturating_sub(bytes);
                    report.pruned.push((id, bytes));
                }
                Ok(None) => report.rows_without_file += 1,
                Err(error) => {
                    warn!(image_id = %id, %error, "failed to prune cached image; skipping it");
                    continue;
                }
            }
            gone_rows.push(raw.to_owned());
        }
        self.db()
            .delete_cached_images(self.node(), &gone_rows)
            .await?;
        Ok(size)
    }

    /// Free bytes on the cache filesystem for unprivileged users (`f_bavail`); u64::MAX
    /// when it cannot be read, so a failing statvfs never empties the cache.
    pub fn free_disk(&self) -> u64 {
        match rustix::fs::statvfs(self.layout().root()) {
            Ok(s) => s.f_bavail.saturating_mul(s.f_frsize),
            Err(error) => {
                warn!(%error, "cannot read free disk space of the cache filesystem");
                u64::MAX
            }
        }
    }
}
