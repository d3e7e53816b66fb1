//! The hit book: hits and `last_accessed` counted in memory and written in one
//! transaction per flush, instead of one `UPDATE` per read.
//!
//! Exactness: every hit recorded is, at any moment, in exactly one place: the pending
//! map, or the batch a flush took from it. A flush swaps the pending map out under the
//! lock (so a hit is either before the swap, in the batch, or after it, in the new
//! map), and puts a batch it could not write back by merging (hits added, the later
//! time kept) with what arrived meanwhile. Memory is one entry per image, so it is
//! bounded by the cache however long the database is away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use super::{CacheDriver, CacheError};
use crate::clock;
use crate::db::DbTime;
use crate::image_id::ImageId;

/// What is pending for one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingHits {
    pub hits: u64,
    /// The latest access recorded.
    pub last_accessed: DateTime<Utc>,
}

impl PendingHits {
    fn merge(&mut self, other: PendingHits) {
        self.hits = self.hits.saturating_add(other.hits);
        self.last_accessed = self.last_accessed.max(other.last_accessed);
    }
}

/// The hits not yet written, per image. Shared by every reader of a process (the
/// driver holds one).
#[derive(Debug, Default)]
pub struct HitBook {
    pending: Mutex<HashMap<ImageId, PendingHits>>,
    /// Notified (`notify_one`, so a permit waits for a flusher not yet waiting) when a
    /// hit is counted into an empty book: an idle flusher sleeps until then instead of
    /// waking every interval to find nothing.
    first_pending: Arc<tokio::sync::Notify>,
}

/// A batch taken out of the book by a flush: written, or given back with `restore`.
pub(super) type HitBatch = HashMap<ImageId, PendingHits>;

impl HitBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ImageId, PendingHits>> {
        // A panic while holding the lock leaves a consistent map (each critical section
        // is one insert or one swap): keep counting rather than lose the book.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one hit of `id` at `at`.
    pub fn record(&self, id: &ImageId, at: DateTime<Utc>) {
        let one = PendingHits {
            hits: 1,
            last_accessed: at,
        };
        let mut pending = self.lock();
        let was_empty = pending.is_empty();
        match pending.get_mut(id) {
            Some(p) => p.merge(one),
            None => {
                pending.insert(id.clone(), one);
            }
        }
        drop(pending);
        if was_empty {
            self.first_pending.notify_one();
        }
    }

    /// Takes everything pending, atomically: hits recorded after this go to the next
    /// batch.
    pub fn take(&self) -> HitBatch {
        std::mem::take(&mut *self.lock())
    }

    /// Puts back a batch that could not be written, merged with what was recorded
    /// since it was taken.
    pub fn restore(&self, batch: HitBatch) {
        let mut pending = self.lock();
        let was_empty = pending.is_empty() && !batch.is_empty();
        for (id, hits) in batch {
            match pending.get_mut(&id) {
                Some(p) => p.merge(hits),
                None => {
                    pending.insert(id, hits);
                }
            }
        }
        drop(pending);
        if was_empty {
            self.first_pending.notify_one();
        }
    }

    /// Images with hits pending.
    pub fn pending_images(&self) -> usize {
        self.lock().len()
    }

    /// Hits pending, all images together.
    pub fn pending_hits(&self) -> u64 {
        self.lock()
            .values()
            .fold(0, |n, p| n.saturating_add(p.hits))
    }

    /// The hits pending for `id` (0 when none).
    pub fn pending_for(&self, id: &ImageId) -> u64 {
        self.lock().get(id).map_or(0, |p| p.hits)
    }
}

impl CacheDriver {
    /// Notified when a hit is counted while none is pending: what the daemon's hit
    /// flusher waits for when it has nothing to write.
    pub(crate) fn first_pending_hit(&self) -> Arc<tokio::sync::Notify> {
        self.hit_book().first_pending.clone()
    }

    /// Counts a hit of `id` now, to be written by the next `flush_hits`.
    pub fn record_hit(&self, id: &ImageId) {
        self.hit_book().record(id, clock::now());
    }

    /// Hits counted and not written yet (images, hits).
    pub fn pending_hits(&self) -> (usize, u64) {
        let book = self.hit_book();
        (book.pending_images(), book.pending_hits())
    }

    /// Writes every hit counted so far in one transaction (`NodeDb::add_hits`).
    /// Returns how many images had hits. On failure the hits go back to the book,
    /// merged with those counted meanwhile, for the next flush.
    ///
    /// A commit whose answer is lost (the connection drops after the server committed)
    /// is taken for a failure, and those hits are written twice: the one case where
    /// counts are not exact, as with any non-idempotent write.
    pub async fn flush_hits(&self) -> Result<usize, CacheError> {
        let batch = self.hit_book().take();
        if batch.is_empty() {
            return Ok(0);
        }
        let rows: Vec<(&str, i64, DbTime)> = batch
            .iter()
            .map(|(id, p)| {
                (
                    id.as_str(),
                    i64::try_from(p.hits).unwrap_or(i64::MAX),
                    DbTime::from_utc(p.last_accessed),
                )
            })
            .collect();
        match self.db().add_hits(&rows).await {
            Ok(_) => Ok(batch.len()),
            Err(e) => {
                drop(rows);
                self.hit_book().restore(batch);
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use chrono::TimeZone;

    use super::*;

    fn id(s: &str) -> ImageId {
        ImageId::parse(s).unwrap()
    }

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, 0).unwrap()
    }

    /// A pretend database: adds each batch to its totals, or refuses every third one
    /// (the batch then goes back to the book).
    #[derive(Default)]
    struct Table {
        rows: Mutex<HashMap<ImageId, PendingHits>>,
        flushes: AtomicU64,
    }

    impl Table {
        fn flush(&self, book: &HitBook) {
            let batch = book.take();
            let n = self.flushes.fetch_add(1, Ordering::SeqCst);
            if n % 3 == 2 {
                book.restore(batch);
                return;
            }
            let mut rows = self.rows.lock().unwrap();
            for (id, hits) in batch {
                match rows.get_mut(&id) {
                    Some(r) => r.merge(hits),
                    None => {
                        rows.insert(id, hits);
                    }
                }
            }
        }
    }

    #[test]
    fn concurrent_hits_with_interleaved_and_failing_flushes_are_counted_exactly_once() {
        const THREADS: u64 = 8;
        const PER_THREAD: u64 = 20_000;
        const IMAGES: u64 = 5;
        let book = Arc::new(HitBook::default());
        let table = Arc::new(Table::default());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flusher = {
            let (book, table, stop) = (book.clone(), table.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    table.flush(&book);
                    std::thread::yield_now();
                }
            })
        };
        let recorders: Vec<_> = (0..THREADS)
            .map(|t| {
                let book = book.clone();
                std::thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        let image = id(&format!("img-{}", (t + i) % IMAGES));
                        book.record(&image, at((t * PER_THREAD + i) as i64));
                    }
                })
            })
            .collect();
        for r in recorders {
            r.join().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        flusher.join().unwrap();
        // Drain what is left (a failing flush puts it back; the next ones write it).
        while book.pending_images() > 0 {
            table.flush(&book);
        }
        assert!(
            table.flushes.load(Ordering::SeqCst) > 3,
            "flushes interleaved"
        );
        let rows = table.rows.lock().unwrap();
        let total: u64 = rows.values().map(|p| p.hits).sum();
        assert_eq!(total, THREADS * PER_THREAD);
        for (image, row) in rows.iter() {
            assert_eq!(row.hits, THREADS * PER_THREAD / IMAGES, "{image}");
        }
        let latest = rows.values().map(|p| p.last_accessed).max().unwrap();
        assert_eq!(latest, at((THREADS * PER_THREAD - 1) as i64));
    }

    #[test]
    fn a_failed_flush_is_merged_back_with_what_arrived_meanwhile() {
        let book = HitBook::default();
        let a = id("a");
        book.record(&a, at(10));
        book.record(&a, at(30));
        let batch = book.take();
        assert_eq!(book.pending_images(), 0);
        // Recorded while the flush was failing, with an earlier time than the batch's.
        book.record(&a, at(20));
        book.record(&id("b"), at(5));
        book.restore(batch);
        assert_eq!(
            book.take().get(&a),
            Some(&PendingHits {
                hits: 3,
                last_accessed: at(30)
            })
        );
    }

    #[test]
    fn the_book_holds_one_entry_per_image() {
        let book = HitBook::default();
        for i in 0..10_000 {
            book.record(&id("same"), at(i));
        }
        assert_eq!(book.pending_images(), 1);
        assert_eq!(book.pending_hits(), 10_000);
    }
}
