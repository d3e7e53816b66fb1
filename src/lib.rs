//! glance-cached: a systemd-native daemon and CLI that keeps an OpenStack Glance
//! node-local image cache healthy, compatible with Glance's `centralized_db` driver.

// The public modules are the crate's API: what the binary (src/main.rs), the integration
// tests (tests/it) and the benches (benches/) use. Everything else is crate-private, and
// `unreachable_pub` (Cargo.toml) keeps `pub` from meaning more than that.
pub mod cache;
pub mod cli;
pub mod config;
pub mod db;
pub mod digest;
pub mod image_id;
pub mod metrics;
pub mod prefetch;
pub mod upstream;

pub(crate) mod clock;
pub(crate) mod daemon;
pub(crate) mod failpoint;
pub(crate) mod glance_config;
pub(crate) mod http;
pub(crate) mod process;
pub(crate) mod redact;
pub(crate) mod signals;
pub(crate) mod telemetry;

/// Runs `f`, a short file operation that may still wait on the disk, without holding
/// up the runtime's other tasks and, where it can, without a round trip to another
/// thread: on a multi-threaded runtime `block_in_place` runs it on this thread after
/// handing this worker's queue to another thread (the caller does not sleep and is not
/// woken, one cross-thread wake-up fewer than `blocking`'s two); on any other runtime
/// it goes to the blocking pool as `blocking` does.
pub(crate) async fn blocking_here<T, F>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(f)
    } else {
        blocking(f).await
    }
}

/// Runs `f` on tokio's blocking pool and returns its result. A panic in `f` is a bug, not
/// input: it resumes on the caller as if `f` had run inline (instead of an `expect` at
/// every call site).
pub(crate) async fn blocking<T, F>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(error) => match error.try_into_panic() {
            Ok(payload) => std::panic::resume_unwind(payload),
            // Cancelled only when the runtime shuts down, when nobody awaits this.
            Err(error) => std::panic::resume_unwind(Box::new(error)),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    /// While `blocking_here`'s closure waits, the runtime's other tasks go on: here the
    /// one task that can end the wait. On one worker, the closure run inline without
    /// the hand-off would wait out its timeout instead. Run in a spawned task: a
    /// test's own body runs outside the runtime's workers.
    async fn others_run_while_blocking_here_waits() {
        let (tx, rx) = mpsc::channel::<()>();
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(()).is_ok()
        });
        // Yield once, so the sender is started before this task blocks.
        tokio::task::yield_now().await;
        let waited = super::blocking_here(move || rx.recv_timeout(Duration::from_secs(10))).await;
        assert_eq!(waited, Ok(()), "the other task ran during the wait");
        assert!(sender.await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn blocking_here_hands_off_the_worker_on_a_multi_thread_runtime() {
        tokio::spawn(others_run_while_blocking_here_waits())
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn blocking_here_goes_to_the_pool_on_a_current_thread_runtime() {
        tokio::spawn(others_run_while_blocking_here_waits())
            .await
            .unwrap();
    }
}
