//! The writes into the cache in progress in this process, by image id: what a reader
//! needs to follow one (the upstream's size and MD5, a read descriptor of its
//! `incomplete/<id>`, how many bytes are in that file so far) and how it ended
//! (published, or failed). Here in `cache`, beside the writer, because it describes a
//! cache file being written, whoever writes it: every download into the cache (a queue
//! prefetch and a read-through fill alike, see `prefetch::fill`) registers, so a
//! second download of the same image in this process is never started beside it and
//! a reader joins the one under way.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};

use crate::image_id::ImageId;

/// What a fill in progress is, as its readers see it.
#[derive(Debug, Clone, Default)]
pub(crate) struct FillState {
    /// What the upstream said of the image, once it answered.
    pub(crate) size: Option<u64>,
    /// Lower-case hex MD5, when the upstream publishes one.
    pub(crate) md5: Option<String>,
    /// `incomplete/<id>` opened for reading as soon as the writer created it (checked
    /// to be the writer's inode), so it reads the same bytes after the publish renames
    /// it.
    pub(crate) file: Option<Arc<File>>,
    /// Bytes written into `file` so far (readable by `pread`).
    pub(crate) written: u64,
    /// `None` while the download runs.
    pub(crate) outcome: Option<FillOutcome>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FillOutcome {
    /// Verified and published: `file` holds exactly `size` bytes.
    Published { size: u64 },
    /// Nothing published (verification, upstream, disk, shutdown): its readers must
    /// not take what they read for the image.
    Failed { reason: String },
}

/// The registry: one entry per image being written by this process.
#[derive(Default)]
pub(crate) struct Fills {
    entries: Mutex<HashMap<ImageId, watch::Sender<FillState>>>,
    /// Woken at every registration and end, for whoever waits for one to appear.
    changed: Notify,
}

impl std::fmt::Debug for Fills {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fills").finish_non_exhaustive()
    }
}

impl Fills {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<ImageId, watch::Sender<FillState>>> {
        match self.entries.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Follows the write of `id` in progress, if there is one.
    pub(crate) fn join(&self, id: &ImageId) -> Option<watch::Receiver<FillState>> {
        self.entries().get(id).map(watch::Sender::subscribe)
    }

    /// Registers a write of `id`, or (`Err`) follows the one already registered: of
    /// two callers exactly one gets the `Filling`.
    pub(crate) fn register(
        self: &Arc<Self>,
        id: &ImageId,
    ) -> Result<Filling, watch::Receiver<FillState>> {
        let mut entries = self.entries();
        if let Some(running) = entries.get(id) {
            return Err(running.subscribe());
        }
        let (tx, _) = watch::channel(FillState::default());
        entries.insert(id.clone(), tx.clone());
        drop(entries);
        self.changed.notify_waiters();
        Ok(Filling {
            fills: self.clone(),
            id: id.clone(),
            tx,
        })
    }

    /// Waits until a write registers or ends (or `within` passes).
    pub(crate) async fn changed_within(&self, within: std::time::Duration) {
        let _ = tokio::time::timeout(within, self.changed.notified()).await;
    }

    /// How many writes are registered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries().len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The writer's side of a registered fill: reports its progress, then its outcome, and
/// leaves the registry when dropped (a drop without an outcome is a failure, so no
/// reader ever waits forever or ends cleanly on an unfinished image).
pub(crate) struct Filling {
    fills: Arc<Fills>,
    id: ImageId,
    tx: watch::Sender<FillState>,
}

impl std::fmt::Debug for Filling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filling").field("id", &self.id).finish()
    }
}

/// A handle on a fill's progress, for the thread that writes it.
#[derive(Clone)]
pub(crate) struct FillProgress(watch::Sender<FillState>);

impl FillProgress {
    /// The writer created the file: `file` is it, opened for reading.
    pub(crate) fn opened(&self, file: File) {
        self.0.send_modify(|s| s.file = Some(Arc::new(file)));
    }

    /// `written` bytes are in the file.
    pub(crate) fn advanced(&self, written: u64) {
        self.0.send_modify(|s| s.written = written);
    }
}

impl Filling {
    /// A new reader of this fill.
    pub(crate) fn subscribe(&self) -> watch::Receiver<FillState> {
        self.tx.subscribe()
    }

    /// What the upstream said of the image.
    pub(crate) fn described(&self, size: Option<u64>, md5: Option<&str>) {
        self.tx.send_modify(|s| {
            s.size = size;
            s.md5 = md5.map(str::to_owned);
        });
    }

    pub(crate) fn progress(&self) -> FillProgress {
        FillProgress(self.tx.clone())
    }

    /// Ends the fill: published (`Ok(size)`) or failed.
    pub(crate) fn finish(self, outcome: Result<u64, String>) {
        let outcome = match outcome {
            Ok(size) => FillOutcome::Published { size },
            Err(reason) => FillOutcome::Failed { reason },
        };
        self.tx.send_modify(|s| s.outcome = Some(outcome));
    }
}

impl Drop for Filling {
    fn drop(&mut self) {
        self.tx.send_modify(|s| {
            if s.outcome.is_none() {
                s.outcome = Some(FillOutcome::Failed {
                    reason: "the download ended unfinished".into(),
                });
            }
        });
        let mut entries = self.fills.entries();
        if entries
            .get(&self.id)
            .is_some_and(|tx| tx.same_channel(&self.tx))
        {
            entries.remove(&self.id);
        }
        drop(entries);
        self.fills.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_writer_per_image_and_readers_see_its_end() {
        let fills = Arc::new(Fills::default());
        let id = ImageId::parse("a").unwrap();
        let filling = fills.register(&id).unwrap();
        let joined = fills.register(&id).unwrap_err();
        assert_eq!(fills.len(), 1);
        filling.progress().advanced(10);
        assert_eq!(joined.borrow().written, 10);
        drop(filling);
        assert!(fills.is_empty());
        assert!(matches!(
            joined.borrow().outcome,
            Some(FillOutcome::Failed { .. })
        ));
        let again = fills.register(&id).unwrap();
        let reader = again.subscribe();
        again.finish(Ok(10));
        assert_eq!(
            reader.borrow().outcome,
            Some(FillOutcome::Published { size: 10 })
        );
        assert!(fills.join(&id).is_none());
    }
}
