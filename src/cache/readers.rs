//! The table of open images: who is reading what, so that eviction never breaks or
//! stalls a reader, and the bytes of an evicted image still held open count towards the
//! cache's size until its last reader closes.
//!
//! A reader registers (`Readers::register`) before it opens the file and checks, after
//! the open, that its registration is still the image's current one (`is_current`); an
//! eviction looks at the registrations and unlinks under the same lock (`evict_with`).
//! So either the evictor sees the reader (and only unlinks: the reader keeps its open
//! file, unlink semantics) or the reader's open comes after the unlink (not found) or
//! its check fails (it retries on the image's new file). Each registration is a
//! generation: an image evicted while read and cached again has its old readers counted
//! apart from the new file's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::image_id::ImageId;

/// The readers of an image's current file.
#[derive(Debug)]
struct Current {
    generation: u64,
    readers: u64,
}

/// An evicted image some readers still hold open: its blocks stay on disk until the
/// last of them closes.
#[derive(Debug)]
struct Evicted {
    readers: u64,
    bytes: u64,
}

#[derive(Debug, Default)]
struct Table {
    next_generation: u64,
    current: HashMap<ImageId, Current>,
    evicted: HashMap<u64, Evicted>,
    open_readers: u64,
    evicted_bytes: u64,
}

/// What the table holds now (for the pruner's size, the metrics and STATUS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Open readers of every image, evicted or not.
    pub open_readers: u64,
    /// Evicted images that readers still hold open.
    pub evicted_images: u64,
    /// Their bytes, still on disk.
    pub evicted_bytes: u64,
    /// Truncation steps of paced deletions so far (see `evict`).
    pub truncate_steps: u64,
}

/// The open images of one process. Cheap to share (`Arc`).
#[derive(Debug, Default)]
pub(crate) struct Readers {
    table: Mutex<Table>,
    truncate_steps: AtomicU64,
}

/// One registered reader: dropping it unregisters it, and the last reader of an
/// evicted image releases its bytes from the accounting. The serving side holds it
/// together with the body's file, for as long as the body streams.
#[derive(Debug)]
pub struct ReaderGuard {
    readers: Arc<Readers>,
    id: ImageId,
    generation: u64,
}

impl ReaderGuard {
    pub fn image_id(&self) -> &ImageId {
        &self.id
    }
}

impl Readers {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // Every critical section leaves the table consistent (a few counter updates):
        // a panic elsewhere must not stop reads or evictions.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a reader of `id`'s current file, before it is opened.
    pub(super) fn register(self: &Arc<Self>, id: &ImageId) -> ReaderGuard {
        let mut t = self.lock();
        t.open_readers += 1;
        let generation = match t.current.get_mut(id) {
            Some(c) => {
                c.readers += 1;
                c.generation
            }
            None => {
                t.next_generation += 1;
                let generation = t.next_generation;
                t.current.insert(
                    id.clone(),
                    Current {
                        generation,
                        readers: 1,
                    },
                );
                generation
            }
        };
        ReaderGuard {
            readers: self.clone(),
            id: id.clone(),
            generation,
        }
    }

    /// Whether readers are registered for `id`'s current file.
    pub(super) fn holds(&self, id: &ImageId) -> bool {
        self.lock().current.get(id).is_some_and(|c| c.readers > 0)
    }

    /// Whether `guard` still registers a reader of its image's current file (no
    /// eviction came between its registration and now).
    pub(super) fn is_current(&self, guard: &ReaderGuard) -> bool {
        self.lock()
            .current
            .get(&guard.id)
            .is_some_and(|c| c.generation == guard.generation)
    }

    /// Runs `unlink` (which removes `id`'s file, of `bytes` bytes, and says whether it
    /// did) under the table's lock, so no reader registers or checks in between.
    /// Returns what `unlink` returned, and whether readers hold the file: then its bytes
    /// count as open-but-evicted until the last of them closes. `unlink` must be quick
    /// (a name removed while its inode is held open by the caller frees no blocks).
    pub(super) fn evict_with<E>(
        &self,
        id: &ImageId,
        bytes: u64,
        unlink: impl FnOnce() -> Result<bool, E>,
    ) -> Result<(bool, bool), E> {
        let mut t = self.lock();
        let removed = unlink()?;
        let held = t.current.get(id).is_some_and(|c| c.readers > 0);
        if removed
            && let Some(c) = t.current.remove(id)
            && c.readers > 0
        {
            t.evicted.insert(
                c.generation,
                Evicted {
                    readers: c.readers,
                    bytes,
                },
            );
            t.evicted_bytes = t.evicted_bytes.saturating_add(bytes);
        }
        Ok((removed, held && removed))
    }

    /// Counts one step of a paced deletion.
    pub(super) fn truncate_step(&self) {
        self.truncate_steps.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn stats(&self) -> ReaderStats {
        let t = self.lock();
        ReaderStats {
            open_readers: t.open_readers,
            evicted_images: t.evicted.len() as u64,
            evicted_bytes: t.evicted_bytes,
            truncate_steps: self.truncate_steps.load(Ordering::Relaxed),
        }
    }

    fn unregister(&self, id: &ImageId, generation: u64) {
        let mut t = self.lock();
        t.open_readers = t.open_readers.saturating_sub(1);
        if let Some(c) = t.current.get_mut(id)
            && c.generation == generation
        {
            c.readers = c.readers.saturating_sub(1);
            if c.readers == 0 {
                t.current.remove(id);
            }
            return;
        }
        if let Some(e) = t.evicted.get_mut(&generation) {
            e.readers = e.readers.saturating_sub(1);
            if e.readers == 0 {
                let bytes = e.bytes;
                t.evicted.remove(&generation);
                t.evicted_bytes = t.evicted_bytes.saturating_sub(bytes);
            }
        }
    }
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.readers.unregister(&self.id, self.generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ImageId {
        ImageId::parse(s).unwrap()
    }

    fn unlinked() -> Result<bool, std::convert::Infallible> {
        Ok(true)
    }

    #[test]
    fn an_evicted_image_counts_until_its_last_reader_closes() {
        let readers = Arc::new(Readers::default());
        let a = id("a");
        let first = readers.register(&a);
        let second = readers.register(&a);
        assert_eq!(readers.evict_with(&a, 100, unlinked), Ok((true, true)));
        assert!(!readers.is_current(&first));
        // Cached again and read: the new file's reader is not the evicted one's.
        let third = readers.register(&a);
        assert!(readers.is_current(&third));
        let stats = readers.stats();
        assert_eq!(
            (
                stats.open_readers,
                stats.evicted_images,
                stats.evicted_bytes
            ),
            (3, 1, 100)
        );
        drop(first);
        assert_eq!(readers.stats().evicted_bytes, 100);
        drop(second);
        assert_eq!(readers.stats().evicted_bytes, 0);
        assert_eq!(readers.stats().evicted_images, 0);
        drop(third);
        assert_eq!(readers.stats(), ReaderStats::default());
    }

    #[test]
    fn an_image_nobody_reads_is_evicted_without_accounting() {
        let readers = Arc::new(Readers::default());
        let a = id("a");
        drop(readers.register(&a));
        assert_eq!(readers.evict_with(&a, 100, unlinked), Ok((true, false)));
        assert_eq!(readers.stats(), ReaderStats::default());
        // A file that was not there (or not ours) changes nothing.
        let reader = readers.register(&a);
        assert_eq!(
            readers.evict_with(&a, 100, || Ok::<_, std::convert::Infallible>(false)),
            Ok((false, false))
        );
        assert!(readers.is_current(&reader));
    }
}
