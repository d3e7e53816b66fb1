//! One download's `ImageWriter` on a thread of its own, fed through a bounded channel.
//! The file writes, the wait for the digest threads, the fsync and the rename never run
//! on a runtime worker thread: a slow or stuck disk slows its downloads only, never the
//! lease, the watchdog, signal handling, the watcher or the other loops.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::cache::{
    Area, CacheDriver, CacheError, Expectations, FillProgress, ImageWriter, Published,
};
use crate::image_id::ImageId;

/// Chunks queued for the writer thread: enough to keep the disk busy while the network
/// delivers, few enough that a slow disk holds back the download instead of memory
/// growing (8 x a chunk, as the digest threads' own queues).
const CHUNKS_QUEUED: usize = 8;

/// Bytes written between two reports to a fill's readers: each report wakes every
/// reader, so one per network chunk (16 KiB) would cost more than the reads.
const PROGRESS_STEP_BYTES: u64 = 256 << 10;

/// How long a shutdown waits for a writer thread to move its bytes to `invalid/`: ample
/// for a rename, short beside a disk that does not answer (whose file the cleaner's
/// stall rule removes later).
const ABANDON_WAIT: Duration = Duration::from_secs(2);

enum Op {
    Chunk(Bytes),
    Commit,
    Abort(String),
}

/// Where a commit stands, shared by both sides: queued behind chunks, taken by the
/// thread (it publishes whatever happens), or withdrawn by a shutdown before the thread
/// took it (it then aborts). One compare-and-swap each side decides which, so a
/// shutdown either waits for a publish under way or is sure none will start.
const COMMIT_QUEUED: u8 = 0;
const COMMIT_TAKEN: u8 = 1;
const COMMIT_WITHDRAWN: u8 = 2;

/// What the writer thread ended with: published, aborted (`None`), or the error.
type Ended = Result<Option<Published>, CacheError>;

/// The async side of a writer thread. Dropped unfinished, the thread drops its writer,
/// which moves the bytes to `invalid/`.
pub(super) struct WriterThread {
    ops: mpsc::Sender<Op>,
    ended: oneshot::Receiver<Ended>,
    commit: Arc<AtomicU8>,
    written: u64,
    /// `incomplete/<id>`, named when the thread is lost.
    path: PathBuf,
}

impl WriterThread {
    /// Starts the thread, which creates `incomplete/<id>`; fails as the creation does.
    /// With `progress`, the file's readers hear of it and of each write (`filling`).
    pub(super) async fn open(
        driver: &CacheDriver,
        id: &ImageId,
        expectations: Expectations,
        progress: Option<FillProgress>,
    ) -> Result<Self, CacheError> {
        let (ops, ops_rx) = mpsc::channel(CHUNKS_QUEUED);
        let (opened_tx, opened) = oneshot::channel();
        let (ended_tx, ended) = oneshot::channel();
        let commit = Arc::new(AtomicU8::new(COMMIT_QUEUED));
        let thread_commit = Arc::clone(&commit);
        let path = driver.get_image_filepath(id, Area::Incomplete);
        let (runtime, thread_driver, thread_id) = (Handle::current(), driver.clone(), id.clone());
        std::thread::Builder::new()
            .name("image-writer".into())
            .spawn(move || {
                let opened =
                    runtime.block_on(thread_driver.open_for_write(&thread_id, expectations));
                match opened {
                    Ok(writer) => {
                        // Opened before any byte is written: readers follow this inode.
                        if let Some(progress) = &progress
                            && let Ok(Some(reader)) = writer.open_reader()
                        {
                            progress.opened(reader);
                        }
                        let _ = opened_tx.send(Ok(()));
                        let ended = write_until_done(
                            &runtime,
                            &thread_driver,
                            writer,
                            ops_rx,
                            &thread_commit,
                            progress.as_ref(),
                        );
                        let _ = ended_tx.send(ended);
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                    }
                }
            })
            .map_err(CacheError::io("start a writer thread for", &path))?;
        match opened.await {
            Ok(Ok(())) => Ok(WriterThread {
                ops,
                ended,
                commit,
                written: 0,
                path,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(lost(path)),
        }
    }

    /// Bytes handed to the thread so far.
    pub(super) fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Queues `chunk`, waiting (asynchronously) while the disk is behind.
    pub(super) async fn write(&mut self, chunk: Bytes) -> Result<(), CacheError> {
        let len = chunk.len() as u64;
        if self.ops.send(Op::Chunk(chunk)).await.is_err() {
            // The thread stopped at a failed write: its error says why.
            return Err(self.failure().await);
        }
        self.written += len;
        Ok(())
    }

    /// Queues the commit behind the chunks queued before it. Once the thread takes it,
    /// it verifies and publishes (`CacheDriver::publish`: file, row, dequeue) whatever
    /// the async side does; until then a shutdown may withdraw it (see `Committing`).
    pub(super) async fn start_commit(mut self) -> Result<Committing, CacheError> {
        if self.ops.send(Op::Commit).await.is_err() {
            return Err(self.failure().await);
        }
        Ok(Committing {
            ended: self.ended,
            commit: self.commit,
            path: self.path,
        })
    }

    /// Gives up, and waits until the bytes are in `invalid/`, so a retry of the same
    /// image does not find them still in `incomplete/`.
    pub(super) async fn abort(mut self, reason: &str) {
        if self.ops.send(Op::Abort(reason.to_owned())).await.is_ok() {
            let _ = (&mut self.ended).await;
        }
    }

    /// Gives up at shutdown: the thread aborts at once (or, its queue full, once it has
    /// written what is queued), and this waits until its bytes are in `invalid/`, so a
    /// clean shutdown leaves nothing in `incomplete/`; a disk that does not answer is
    /// waited for `ABANDON_WAIT` at most.
    pub(super) async fn abandon(self, reason: &str) {
        let WriterThread {
            ops, ended, path, ..
        } = self;
        let _ = ops.try_send(Op::Abort(reason.to_owned()));
        // Closed, the channel ends the thread's loop even when the abort did not fit.
        drop(ops);
        if tokio::time::timeout(ABANDON_WAIT, ended).await.is_err() {
            warn!(
                ?path,
                "the writer did not finish in time at shutdown; its file stays in incomplete/ until found stalled"
            );
        }
    }

    async fn failure(&mut self) -> CacheError {
        match (&mut self.ended).await {
            Ok(Err(e)) => e,
            _ => lost(self.path.clone()),
        }
    }
}

/// A commit queued for the thread.
pub(super) struct Committing {
    ended: oneshot::Receiver<Ended>,
    commit: Arc<AtomicU8>,
    path: PathBuf,
}

impl Committing {
    /// At shutdown: withdraws the commit if the thread has not taken it yet (it then
    /// aborts, its bytes go to `invalid/`) and returns true; false when the thread took
    /// it and is publishing, which the caller should then wait for.
    pub(super) fn withdraw(&self) -> bool {
        self.commit
            .compare_exchange(
                COMMIT_QUEUED,
                COMMIT_WITHDRAWN,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Waits until the thread has published (file, row and dequeue) or failed.
    /// Cancel-safe: dropped, it can be called again.
    pub(super) async fn published(&mut self) -> Result<Published, CacheError> {
        match (&mut self.ended).await {
            Ok(Ok(Some(published))) => Ok(published),
            Ok(Err(e)) => Err(e),
            Ok(Ok(None)) | Err(_) => Err(lost(self.path.clone())),
        }
    }
}

/// The thread's loop: writes chunks until told to commit or abort. When the async side
/// is gone without either, the writer is dropped, which moves its bytes to `invalid/`.
fn write_until_done(
    runtime: &Handle,
    driver: &CacheDriver,
    mut writer: ImageWriter,
    mut ops: mpsc::Receiver<Op>,
    commit: &AtomicU8,
    progress: Option<&FillProgress>,
) -> Ended {
    let (mut written, mut reported) = (0, 0);
    while let Some(op) = ops.blocking_recv() {
        match op {
            Op::Chunk(chunk) => {
                crate::failpoint::hit("download:write");
                // A failed write has aborted the writer already.
                written += chunk.len() as u64;
                writer.write_bytes(chunk)?;
                if let Some(progress) = progress
                    && (reported == 0 || written - reported >= PROGRESS_STEP_BYTES)
                {
                    progress.advanced(written);
                    reported = written;
                }
            }
            Op::Commit => {
                if let Some(progress) = progress {
                    progress.advanced(written);
                }
                let taken = commit.compare_exchange(
                    COMMIT_QUEUED,
                    COMMIT_TAKEN,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                if taken.is_err() {
                    writer.abort("the download was interrupted by shutdown");
                    return Ok(None);
                }
                return runtime.block_on(driver.publish(writer)).map(Some);
            }
            Op::Abort(reason) => {
                crate::failpoint::hit("writer:abort");
                writer.abort(&reason);
                return Ok(None);
            }
        }
    }
    // Dropped here, the writer moves its bytes to `invalid/`.
    crate::failpoint::hit("writer:abort");
    Ok(None)
}

/// The thread ended without saying how (it panicked).
fn lost(path: PathBuf) -> CacheError {
    CacheError::io("write", path)(std::io::Error::other(
        "the writer thread ended unexpectedly",
    ))
}
