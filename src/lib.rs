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
