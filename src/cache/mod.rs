//! The cache driver: Glance's `centralized_db` driver API over the on-disk layout and the
//! database, plus prune (LRU) and clean (invalid and stalled files).

mod claims;
mod clean;
mod driver;
mod evict;
mod filling;
mod hits;
pub(crate) mod layout;
mod prune;
mod readers;
mod reconcile;
mod served;
mod writer;

use std::io;
use std::path::PathBuf;

pub use clean::CleanPolicy;
pub(crate) use clean::CleanReport;
#[cfg(test)]
pub(crate) use clean::RemovedFile;
pub(crate) use driver::CachedImage;
pub use driver::{CacheDriver, QueuedImage};
pub(crate) use filling::{FillOutcome, FillProgress, FillState, Filling};
pub use hits::{HitBook, PendingHits};
pub(crate) use layout::LayoutError;
pub use layout::{Area, CacheLayout, CachedOpen};
pub use prune::PrunePolicy;
pub use prune::PruneReport;
pub(crate) use prune::{PRUNE_STEP_ROWS, PrunePass};
pub use readers::{ReaderGuard, ReaderStats};
pub(crate) use reconcile::ReconcileReport;
pub use served::ServedImage;
pub(crate) use served::read_exact_at;
pub use writer::Expectations;
pub(crate) use writer::{ImageWriter, Published};

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

/// The total of `sizes`, saturating: a sparse file can claim up to 8 EiB (tmpfs lets
/// anyone `truncate -s 8E`), and a few of them overflow a plain sum (a panic in debug
/// builds, a wrapped total that stops pruning in release).
pub fn total_bytes(sizes: impl IntoIterator<Item = u64>) -> u64 {
    sizes.into_iter().fold(0, u64::saturating_add)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn totals_saturate_instead_of_overflowing(sizes in proptest::collection::vec(any::<u64>(), 0..64)) {
            let exact: u128 = sizes.iter().map(|&s| u128::from(s)).sum();
            let expected = u64::try_from(exact).unwrap_or(u64::MAX);
            prop_assert_eq!(total_bytes(sizes), expected);
        }
    }
}
