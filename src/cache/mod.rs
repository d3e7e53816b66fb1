//! The cache driver: Glance's `centralized_db` driver API over the on-disk layout and the
//! database, plus prune (LRU) and clean (invalid and stalled files).

mod claims;
mod clean;
mod driver;
mod hashing;
pub mod layout;
mod prune;
mod reconcile;
mod writer;

use std::io;
use std::path::PathBuf;

pub use clean::{CleanPolicy, CleanReport, RemovedFile};
pub use driver::{CacheDriver, CachedImage, QueuedImage};
pub use layout::{Area, CacheLayout, LayoutError};
pub use prune::{PRUNE_STEP_ROWS, PrunePass, PrunePolicy, PruneReport};
pub use reconcile::{MAX_MISSING_SHARE_PERCENT, ReconcileReport};
pub use writer::{Expectations, HashAlgo, ImageWriter, Published};

use crate::db::DbError;
use crate::image_id::ImageId;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot {action} {path:?}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("image {0} is already being written to the cache")]
    AlreadyBeingWritten(ImageId),
    #[error(
        "image {0}'s file in incomplete/ was removed, replaced or changed by another writer while it was written; nothing was published"
    )]
    Replaced(ImageId),
    #[error("image {0} is not cached")]
    NotCached(ImageId),
    #[error("image {image_id} failed verification: {problem}; it was moved to invalid/")]
    Verification { image_id: ImageId, problem: String },
    #[error(
        "image {image_id} is larger than declared ({declared} bytes); it was moved to invalid/"
    )]
    TooLarge { image_id: ImageId, declared: u64 },
    #[error("image {0}: the writer was already aborted")]
    WriterAborted(ImageId),
    #[error(
        "refusing to reconcile: {missing} of this node's {rows} cached images have no file in {dir} (is its filesystem mounted?); if they are really gone, start with --force-reconcile (or run `glance-cached reconcile --force`) to drop their rows"
    )]
    FilesMissing {
        missing: usize,
        rows: usize,
        dir: PathBuf,
    },
}

impl CacheError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> CacheError {
        let path = path.into();
        move |source| CacheError::Io {
            action,
            path,
            source,
        }
    }
}
