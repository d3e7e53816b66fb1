//! Prune: evict least recently accessed images until the cache fits.
//!
//! Glance's order and stop condition (LRU by `last_accessed`, stop once size <= max),
//! plus: no loop without progress (rows are visited once, by a cursor), files without
//! rows are adopted first so they can be evicted, rows without files are dropped, an
//! optional low watermark, and an optional minimum of free disk space. A prune is a
//! `PrunePass` walked in bounded steps, and only one runs at a time per process.

use tokio::sync::OwnedMutexGuard;
use tracing::{info, warn};

use super::driver::blocking;
use super::evict::{Evicted, evict_file};
use super::layout::{Area, CacheFile, CacheLayout};
use super::readers::Readers;
use super::{CacheDriver, CacheError};
use crate::db::LruCursor;
use crate::image_id::ImageId;

/// Rows visited per step: a step stays far shorter than the watchdog (at most this many
/// unlinks and two or three statements, each bounded by the busy timeout).
pub(crate) const PRUNE_STEP_ROWS: i64 = 512;

/// Rows fetched per LRU query, then evicted over several steps. Glance's table has no
/// index on `last_accessed`, so each query scans the node's rows: fetching more per
/// query keeps a prune of 200,000 images from spending minutes re-sorting them.
const PRUNE_FETCH_ROWS: i64 = 8 * PRUNE_STEP_ROWS;

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
    /// How many of `pruned`, the first ones, were evicted while the cache was over its
    /// target (the size rule); the rest, for `min_free_disk`. Decided as they were
    /// evicted: an image readers hold leaves the size as it was (its bytes stay on
    /// disk), so the sizes in `pruned` cannot tell.
    pub evicted_for_size: usize,
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

/// One prune in progress. It holds the process's prune turn from `start_prune` until it
/// is dropped: two passes over the same LRU order would each count the other's victims
/// as rows without a file, keep their own stale size and evict further.
pub struct PrunePass {
    _turn: OwnedMutexGuard<()>,
    /// Cache size as listed at the start, lowered by every eviction since.
    size: u64,
    target: u64,
    min_free_disk: Option<u64>,
    images_listed: usize,
    /// Listed files not yet checked for a row, adopted a step's worth at a time before
    /// any eviction: files without rows would never be candidates.
    unchecked: Vec<CacheFile>,
    cursor: Option<LruCursor>,
    /// Image ids fetched in LRU order and not visited yet (first those of rows whose
    /// times cannot be read).
    fetched: std::collections::VecDeque<ImageId>,
    /// Where the search for rows that cannot be read goes on (a row id, paged in row-id
    /// order), `None` once it is over.
    unreadable_after: Option<i64>,
    /// Images readers held when the first walk reached them, in LRU order: evicted
    /// only by the second walk, when the first could not bring the cache to its target.
    held: Vec<ImageId>,
    /// The walk over `held` has begun.
    second_walk: bool,
    done: bool,
    report: PruneReport,
}

/// What one step did with its batch of rows, on the blocking thread.
struct BatchOutcome {
    size: u64,
    pruned: Vec<(ImageId, u64)>,
    /// Of `pruned`, those evicted while the size was over the target.
    for_size: usize,
    rows_without_file: u64,
    /// Rows whose file is gone now (evicted, or already missing).
    gone_rows: Vec<ImageId>,
    /// The prune reached its goal inside this batch.
    satisfied: bool,
    /// Ids not visited: the step's time ran out (paced deletions of large files).
    unvisited: Vec<ImageId>,
    /// Ids passed over because readers held them (first walk only).
    held: Vec<ImageId>,
}

/// How long one step may spend evicting: paced deletions of large files sleep between
/// their truncation steps, and a batch of many huge files must still end well within
/// the watchdog; the rest of the batch waits for the next step.
const PRUNE_STEP_TIME: std::time::Duration = std::time::Duration::from_secs(5);

impl CacheDriver {
    /// Evicts until the cache fits `policy`, waiting for any prune in progress first.
    pub async fn prune(&self, policy: PrunePolicy) -> Result<PruneReport, CacheError> {
        let mut pass = self.start_prune(policy).await?;
        while !pass.is_done() {
            pass.step(self, PRUNE_STEP_ROWS).await?;
        }
        Ok(pass.into_report())
    }

    /// Waits for the prune turn and measures the cache; the returned pass is done
    /// already when nothing needs evicting. Its first steps adopt files without rows.
    pub async fn start_prune(&self, policy: PrunePolicy) -> Result<PrunePass, CacheError> {
        let turn = self.prune_turn().await;
        let listing = self.list(Area::Cached).await?;
        // The disk holds the listed files and the evicted ones readers still hold
        // open: counting only the first would let the cache fill the disk behind its
        // own accounting while images are served.
        let held = self.reader_stats().evicted_bytes;
        let size = super::total_bytes(listing.files.iter().map(|f| f.size).chain([held]));
        let target = if size > policy.max_size {
            policy
                .low_watermark
                .unwrap_or(policy.max_size)
                .min(policy.max_size)
        } else {
            size
        };
        let images_listed = listing.files.len();
        let mut pass = PrunePass {
            _turn: turn,
            size,
            target,
            min_free_disk: policy.min_free_disk,
            images_listed,
            unchecked: listing.files,
            cursor: None,
            fetched: Default::default(),
            unreadable_after: Some(i64::MIN),
            held: Vec::new(),
            second_walk: false,
            done: false,
            report: PruneReport {
                size_before: size,
                ..Default::default()
            },
        };
        let free_disk_low = match policy.min_free_disk {
            None => false,
            Some(min) => {
                let layout = self.layout().clone();
                blocking(move || free_disk(&layout) < min).await
            }
        };
        if size <= target && !free_disk_low {
            pass.done = true;
            pass.unchecked = Vec::new();
        }
        Ok(pass)
    }
}

impl PrunePass {
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Visits at most `rows` more rows in LRU order, evicting while the cache is over
    /// its target; the files are removed on a blocking thread.
    pub async fn step(&mut self, driver: &CacheDriver, rows: i64) -> Result<(), CacheError> {
        if self.done {
            return Ok(());
        }
        if !self.unchecked.is_empty() {
            return self.adopt_some(driver, rows).await;
        }
        if self.fetched.is_empty()
            && let Some(after) = self.unreadable_after
        {
            // A row whose time cannot be read counts as the oldest: evicted first. Found
            // a page per step (each page's finds evicted before the next is read), so no
            // step reads every row of a large node.
            let (page, next) = driver.db().rows_by_id(after, PRUNE_FETCH_ROWS).await?;
            page.warn_unreadable();
            self.unreadable_after = next;
            self.fetched = page
                .unreadable
                .into_iter()
                .filter_map(|u| u.image_id)
                .collect();
            return Ok(());
        }
        if self.fetched.is_empty() {
            let batch = driver
                .db()
                .least_recently_accessed(self.cursor, PRUNE_FETCH_ROWS)
                .await?;
            let Some(next) = batch.next else {
                // The first walk is over and the cache is still above its target: the
                // images it passed over because they were being read go now, oldest
                // first (their bytes are freed when their readers close).
                if !self.second_walk && !self.held.is_empty() {
                    self.second_walk = true;
                    self.fetched = std::mem::take(&mut self.held).into();
                    return Ok(());
                }
                self.done = true;
                return Ok(());
            };
            self.cursor = Some(next);
            self.fetched = batch.rows.into_iter().map(|r| r.image_id).collect();
        }
        let take = self.fetched.len().min(rows.max(1) as usize);
        let ids: Vec<ImageId> = self.fetched.drain(..take).collect();
        let walk = Walk {
            size: self.size,
            target: self.target,
            min_free_disk: self.min_free_disk,
            evict_held: self.second_walk,
        };
        let (layout, readers) = (driver.layout().clone(), driver.readers().clone());
        let outcome = blocking(move || evict_batch(&layout, &readers, &ids, walk)).await;
        driver.db().delete_cached_images(&outcome.gone_rows).await?;
        self.size = outcome.size;
        self.report.pruned.extend(outcome.pruned);
        self.report.evicted_for_size += outcome.for_size;
        self.report.rows_without_file += outcome.rows_without_file;
        self.held.extend(outcome.held);
        self.done = outcome.satisfied;
        if self.second_walk && self.fetched.is_empty() && outcome.unvisited.is_empty() {
            self.done = true;
        }
        for id in outcome.unvisited.into_iter().rev() {
            self.fetched.push_front(id);
        }
        Ok(())
    }

    /// Gives rows to the files without one among the next `rows` unchecked files.
    async fn adopt_some(&mut self, driver: &CacheDriver, rows: i64) -> Result<(), CacheError> {
        let from = self.unchecked.len().saturating_sub(rows.max(1) as usize);
        let files = self.unchecked.split_off(from);
        let ids: Vec<&str> = files.iter().map(|f| f.image_id.as_str()).collect();
        let known = driver.db().cached_ids_among(&ids).await?;
        let known: std::collections::HashSet<&str> = known.iter().map(ImageId::as_str).collect();
        self.report.adopted += driver.adopt_files_without_rows(&files, &known).await?.len() as u64;
        Ok(())
    }

    /// What the pass did (so far, if it is not done).
    pub fn into_report(mut self) -> PruneReport {
        self.report.size_after = self.size;
        self.report.images_after = self.images_listed.saturating_sub(self.report.pruned.len());
        self.report
    }
}

/// Where a batch's walk starts and what it may evict.
#[derive(Debug, Clone, Copy)]
struct Walk {
    size: u64,
    target: u64,
    min_free_disk: Option<u64>,
    /// The second walk: images readers hold are evicted too.
    evict_held: bool,
}

/// Removes the files of `ids` in order while the cache needs pruning.
///
/// The first walk passes over images readers hold: evicting one frees nothing now (its
/// bytes stay on disk, and in the size, until the readers close), so under load it
/// would only make the walk go on through every image being read, emptying a busy
/// cache. An image being read is also the most recently used, whatever its row says
/// before the next hit flush. The second walk evicts those held images, oldest first,
/// counting each one's bytes as gone (they will be once its readers close), while the
/// size is over the target; the free-disk rule does not drive it, since evicting a
/// held image gives no disk back now.
fn evict_batch(
    layout: &CacheLayout,
    readers: &Readers,
    ids: &[ImageId],
    walk: Walk,
) -> BatchOutcome {
    let Walk {
        mut size,
        target,
        min_free_disk,
        evict_held,
    } = walk;
    let needs_pruning = |size: u64| {
        size > target || (!evict_held && min_free_disk.is_some_and(|min| free_disk(layout) < min))
    };
    let mut out = BatchOutcome {
        size,
        pruned: Vec::new(),
        for_size: 0,
        rows_without_file: 0,
        gone_rows: Vec::with_capacity(ids.len()),
        satisfied: false,
        unvisited: Vec::new(),
        held: Vec::new(),
    };
    let started = tokio::time::Instant::now();
    for (n, id) in ids.iter().enumerate() {
        if !needs_pruning(size) {
            out.satisfied = true;
            break;
        }
        if started.elapsed() > PRUNE_STEP_TIME {
            out.unvisited = ids[n..].to_vec();
            break;
        }
        if !evict_held && readers.holds(id) {
            out.held.push(id.clone());
            continue;
        }
        let for_size = size > target;
        match evict_file(layout, readers, Area::Cached, id) {
            Ok(Some(Evicted { bytes, held })) => {
                info!(image_id = %id, bytes, held_by_readers = held, "pruned cached image");
                if for_size {
                    out.for_size += 1;
                }
                if !held || evict_held {
                    size = size.saturating_sub(bytes);
                }
                out.pruned.push((id.clone(), bytes));
                if out.gone_rows.is_empty() {
                    crate::failpoint::hit("prune:mid");
                }
            }
            Ok(None) => out.rows_without_file += 1,
            Err(error) => {
                warn!(image_id = %id, %error, "failed to prune cached image; skipping it");
                continue;
            }
        }
        out.gone_rows.push(id.clone());
    }
    out.size = size;
    out
}

/// Free bytes on the cache filesystem for unprivileged users (`f_bavail`); u64::MAX when
/// it cannot be read, so a failing statvfs never empties the cache. Blocking.
fn free_disk(layout: &CacheLayout) -> u64 {
    match layout.statvfs() {
        Ok(s) => s.f_bavail.saturating_mul(s.f_frsize),
        Err(error) => {
            warn!(%error, "cannot read free disk space of the cache filesystem");
            u64::MAX
        }
    }
}
