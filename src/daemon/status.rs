//! The status board: what each loop is doing and the latest figures, shared by the
//! loops, the watchdog and the systemd STATUS line. Loops only report facts here; this
//! file is the one that sends STATUS, when the supervisor sees the board change
//! (`changed`, `publish`) and with READY.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use chrono::{DateTime, Utc};

use super::context::Task;
use super::systemd;
use crate::config::values::human_bytes;
use crate::metrics::Metrics;

#[derive(Debug, Default, Clone)]
pub(crate) struct TaskState {
    /// When the current step started; `None` while idle.
    pub(crate) in_step_since: Option<Instant>,
    pub(crate) steps: u64,
    pub(crate) consecutive_failures: u32,
    pub(crate) last_error: Option<String>,
    /// False once the task's loop has ended.
    pub(crate) alive: bool,
    /// When a step last succeeded (the lease's: when the database last answered).
    pub(crate) last_success: Option<Instant>,
}

#[derive(Debug, Default)]
struct Board {
    tasks: BTreeMap<Task, TaskState>,
    size: Option<u64>,
    images: Option<usize>,
    max_size: u64,
    queued: Option<usize>,
    /// Prefetches in progress.
    downloading: usize,
    last_prune: Option<(DateTime<Utc>, usize, u64)>,
    last_clean: Option<(DateTime<Utc>, usize, u64)>,
    config_error: Option<String>,
    /// Cache subdirectories replaced after start (not followed).
    replaced_dirs: Vec<std::path::PathBuf>,
    /// The last line sent to systemd, so unchanged lines are not sent again.
    published: String,
    /// READY was sent (the loops run).
    ready: bool,
}

/// A STATUS line of its own while the board does not exist yet (a boot phase that
/// waits).
pub(super) fn boot_phase(text: &str) {
    systemd::status(text);
}

/// Shared state behind a mutex; every change can be published as the systemd STATUS.
#[derive(Debug, Default)]
pub(crate) struct StatusBoard {
    inner: Mutex<Board>,
    /// Signalled by every change the STATUS line shows (one stored permit: changes
    /// coalesce until the publisher looks).
    changed: Notify,
    /// The Prometheus gauges that mirror the board's figures, and the steps' timings.
    metrics: Arc<Metrics>,
}

impl StatusBoard {
    /// A board whose figures and steps also go to `metrics`.
    pub(crate) fn with_metrics(metrics: Arc<Metrics>) -> StatusBoard {
        StatusBoard {
            inner: Mutex::default(),
            changed: Notify::new(),
            metrics,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Board) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A change the STATUS line shows.
    fn change(&self, f: impl FnOnce(&mut Board)) {
        self.with(f);
        self.changed.notify_one();
    }

    /// Resolves once the board changed since the last time it resolved.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Sends the STATUS line to systemd when it differs from the last one sent.
    pub(crate) fn publish(&self) {
        if let Some(line) = self.line_if_changed() {
            systemd::status(&line);
        }
    }

    /// Sends READY with the STATUS line (at start and after a reload).
    pub(crate) fn ready(&self) {
        let line = self.line();
        systemd::ready(&line);
        self.with(|b| {
            b.published = line;
            b.ready = true;
        });
    }

    pub(crate) fn task_started(&self, task: Task) {
        self.with(|b| {
            b.tasks.insert(
                task,
                TaskState {
                    alive: true,
                    ..Default::default()
                },
            );
        });
    }

    pub(crate) fn step_started(&self, task: Task) {
        self.with(|b| b.tasks.entry(task).or_default().in_step_since = Some(Instant::now()));
    }

    /// Records the end of a step; returns true when the task had been failing and has
    /// now recovered.
    pub(crate) fn step_finished(&self, task: Task, error: Option<String>) -> bool {
        let failed = error.is_some();
        let (recovered, shown, took) = self.with(|b| {
            let t = b.tasks.entry(task).or_default();
            let took = t.in_step_since.take().map(|s| s.elapsed());
            t.steps += 1;
            let recovered = error.is_none() && t.consecutive_failures > 0;
            let shown = error.is_some() || recovered;
            match error {
                Some(e) => {
                    t.consecutive_failures += 1;
                    t.last_error = Some(e);
                }
                None => {
                    t.consecutive_failures = 0;
                    t.last_error = None;
                    t.last_success = Some(Instant::now());
                }
            }
            (recovered, shown, took)
        });
        self.metrics
            .loop_step(task.name(), took.unwrap_or_default(), failed);
        if shown {
            self.changed.notify_one();
        }
        recovered
    }

    pub(crate) fn task_ended(&self, task: Task) {
        self.with(|b| b.tasks.entry(task).or_default().alive = false);
    }

    pub(crate) fn consecutive_failures(&self, task: Task) -> u32 {
        self.with(|b| b.tasks.get(&task).map_or(0, |t| t.consecutive_failures))
    }

    /// Tasks that are dead or stuck in one step for longer than `max_step`.
    pub(crate) fn unhealthy(&self, max_step: Duration) -> Vec<Task> {
        self.with(|b| {
            b.tasks
                .iter()
                .filter(|(_, t)| {
                    !t.alive || t.in_step_since.is_some_and(|s| s.elapsed() > max_step)
                })
                .map(|(task, _)| *task)
                .collect()
        })
    }

    /// Whether READY was sent.
    pub(crate) fn is_ready(&self) -> bool {
        self.with(|b| b.ready)
    }

    /// Every task's state, for the health endpoint.
    pub(crate) fn tasks(&self) -> Vec<(Task, TaskState)> {
        self.with(|b| b.tasks.iter().map(|(t, s)| (*t, s.clone())).collect())
    }

    /// Tasks in the middle of a step (named in the log when shutdown has to abort).
    pub(crate) fn busy(&self) -> Vec<Task> {
        self.with(|b| {
            b.tasks
                .iter()
                .filter(|(_, t)| t.alive && t.in_step_since.is_some())
                .map(|(task, _)| *task)
                .collect()
        })
    }

    /// The cache's size as a pass measured it. The limit is not taken from the pass:
    /// one that started before a reload would put the old `max_size` back; the boot and
    /// each reload set it (`set_max_size`).
    pub(crate) fn set_cache(&self, size: u64, images: usize) {
        self.change(|b| {
            b.size = Some(size);
            b.images = Some(images);
        });
        self.metrics.set_cache(size, images);
    }

    pub(crate) fn set_max_size(&self, max_size: u64) {
        self.change(|b| b.max_size = max_size);
        self.metrics.set_max_bytes(max_size);
    }

    pub(crate) fn set_queued(&self, queued: usize) {
        self.change(|b| b.queued = Some(queued));
    }

    pub(crate) fn download_started(&self) {
        self.change(|b| b.downloading += 1);
        self.metrics.set_downloading(self.with(|b| b.downloading));
    }

    pub(crate) fn download_finished(&self) {
        self.change(|b| b.downloading = b.downloading.saturating_sub(1));
        self.metrics.set_downloading(self.with(|b| b.downloading));
    }

    pub(crate) fn pruned(&self, files: usize, bytes: u64) {
        self.change(|b| b.last_prune = Some((crate::clock::now(), files, bytes)));
    }

    pub(crate) fn cleaned(&self, files: usize, bytes: u64) {
        self.change(|b| b.last_clean = Some((crate::clock::now(), files, bytes)));
    }

    pub(crate) fn set_replaced_dirs(&self, dirs: Vec<std::path::PathBuf>) {
        self.change(|b| b.replaced_dirs = dirs);
    }

    pub(crate) fn set_config_error(&self, error: Option<String>) {
        self.change(|b| b.config_error = error);
    }

    /// The status line when it differs from the one last returned by this method.
    fn line_if_changed(&self) -> Option<String> {
        let line = self.line();
        self.with(|b| {
            if b.published == line {
                None
            } else {
                b.published = line.clone();
                Some(line)
            }
        })
    }

    /// One line for `systemctl status`: size / max, images, queue, downloads, last prune
    /// and clean, and any problem (database, config).
    pub(crate) fn line(&self) -> String {
        self.with(|b| {
            let mut parts = Vec::new();
            match (b.size, b.images) {
                (Some(size), Some(images)) => parts.push(format!(
                    "{} / {}, {images} images",
                    human_bytes(size),
                    human_bytes(b.max_size)
                )),
                _ => parts.push(format!("max {}", human_bytes(b.max_size))),
            }
            if let Some(q) = b.queued {
                parts.push(format!("{q} queued"));
            }
            if b.downloading > 0 {
                parts.push(format!("{} downloading", b.downloading));
            }
            let when = |t: &DateTime<Utc>| t.format("%H:%M:%S").to_string();
            if let Some((t, files, _)) = &b.last_prune {
                parts.push(format!("last prune {} ({files} evicted)", when(t)));
            }
            if let Some((t, files, _)) = &b.last_clean {
                parts.push(format!("last clean {} ({files} removed)", when(t)));
            }
            let failing: Vec<String> = b
                .tasks
                .iter()
                .filter(|(_, t)| t.consecutive_failures > 0)
                .map(|(task, t)| {
                    format!("{task} failing: {}", t.last_error.as_deref().unwrap_or("?"))
                })
                .collect();
            parts.extend(failing);
            if let Some(e) = &b.config_error {
                parts.push(e.clone());
            }
            if !b.replaced_dirs.is_empty() {
                parts.push(format!(
                    "replaced after start, not followed: {:?}",
                    b.replaced_dirs
                ));
            }
            parts.join("; ")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prune pass started before a reload ends after it: its report must not put the
    /// old limit back on the board or in `glance_cached_cache_max_bytes`.
    #[test]
    fn a_pass_reporting_its_size_keeps_the_reloaded_limit() {
        let metrics = Arc::new(Metrics::new());
        let board = StatusBoard::with_metrics(metrics.clone());
        board.set_max_size(1000);
        board.set_max_size(500);
        board.set_cache(700, 3);
        let text = metrics.encode().unwrap();
        assert!(
            text.lines()
                .any(|l| l == "glance_cached_cache_max_bytes 500"),
            "{text}"
        );
        assert!(board.line().contains("700"), "{}", board.line());
    }
}
