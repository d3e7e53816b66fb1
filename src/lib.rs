//! glance-cached: a systemd-native daemon and CLI that keeps an OpenStack Glance
//! node-local image cache healthy, compatible with Glance's `centralized_db` driver.

pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod db;
pub mod digest;
pub mod failpoint;
pub mod glance_config;
pub mod http;
pub mod image_id;
pub mod prefetch;
pub mod process;
pub mod redact;
pub mod signals;
pub mod telemetry;
pub mod upstream;

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
