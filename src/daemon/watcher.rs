//! The watcher: inotify (through `notify`) on the cache root, `incomplete/`, `invalid/`
//! and `queue/`, turned into nudges for the loops. It only accelerates: every loop also
//! runs on its interval, so a lost event changes nothing but latency. Overflow or a
//! watcher error nudges every loop into a full pass.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use notify::event::{EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::context::Nudges;
use crate::cache::{Area, CacheLayout};
use crate::image_id::ImageId;
use crate::metrics::Metrics;

/// What a filesystem event means for the loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    Cleaner,
    Pruner,
    Queue,
    All,
}

/// Sets up the watches (errors surface at boot) and returns the actor to run.
pub(super) fn start(
    layout: &CacheLayout,
    nudges: Nudges,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> notify::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event| {
        let _ = tx.send(event);
    })?;
    let dirs = Dirs {
        root: layout.root().to_path_buf(),
        incomplete: layout.dir(Area::Incomplete),
        invalid: layout.dir(Area::Invalid),
        queue: layout.dir(Area::Queue),
    };
    for dir in [&dirs.root, &dirs.incomplete, &dirs.invalid, &dirs.queue] {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    Ok(async move {
        // The watcher stops when dropped: it lives as long as this actor.
        let _watcher: RecommendedWatcher = watcher;
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                e = rx.recv() => match e { Some(e) => e, None => break },
            };
            metrics.watcher_event();
            let wakes = match event {
                Ok(event) if event.need_rescan() => {
                    warn!("file watcher lost events; rescanning");
                    metrics.watcher_overflow();
                    vec![Wake::All]
                }
                Ok(event) => dirs.classify(&event),
                Err(error) => {
                    warn!(%error, "file watcher error; rescanning");
                    metrics.watcher_overflow();
                    vec![Wake::All]
                }
            };
            for wake in wakes {
                debug!(?wake, "watcher nudge");
                match wake {
                    Wake::Cleaner => nudges.cleaner.notify_one(),
                    Wake::Pruner => nudges.pruner.notify_one(),
                    Wake::Queue => {
                        nudges.queue.notify_one();
                        nudges.prefetcher.notify_one();
                    }
                    Wake::All => nudges.all(),
                }
            }
        }
    })
}

struct Dirs {
    root: PathBuf,
    incomplete: PathBuf,
    invalid: PathBuf,
    queue: PathBuf,
}

impl Dirs {
    fn dir(&self, area: Area) -> &Path {
        match area {
            Area::Cached => &self.root,
            Area::Incomplete => &self.incomplete,
            Area::Invalid => &self.invalid,
            Area::Queue => &self.queue,
        }
    }

    fn classify(&self, event: &notify::Event) -> Vec<Wake> {
        // Data writes into incomplete/ only push a stall later; waking for them would
        // cost a pass per write. Arrivals, renames and mtime changes matter.
        let arrival = matches!(
            event.kind,
            EventKind::Create(_)
                | EventKind::Modify(ModifyKind::Name(_))
                | EventKind::Modify(ModifyKind::Metadata(_))
        );
        if !arrival {
            return Vec::new();
        }
        let mut wakes = Vec::new();
        for path in &event.paths {
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                continue;
            };
            let wake = if same(parent, &self.root)
                && Area::SUBDIRS.iter().any(|a| same(path, self.dir(*a)))
            {
                // A subdirectory renamed or replaced: the cleaner checks the handles and
                // shows it in STATUS (the other loops find out at their next use; waking
                // them all at every event of an exchange loop would only churn).
                Wake::Cleaner
            } else if same(parent, &self.invalid) || same(parent, &self.incomplete) {
                Wake::Cleaner
            } else if same(parent, &self.queue) {
                Wake::Queue
            } else if same(parent, &self.root) && ImageId::from_file_name(name).is_some() {
                Wake::Pruner
            } else {
                continue;
            };
            if !wakes.contains(&wake) {
                wakes.push(wake);
            }
        }
        wakes
    }
}

fn same(a: &Path, b: &Path) -> bool {
    a == b
}
