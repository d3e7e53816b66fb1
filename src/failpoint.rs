//! Test-only failpoints: a way for the crash tests (`tests/it/faults_crash.rs`) to stop
//! the daemon at an exact point before they `kill -9` it.
//!
//! `hit(name)` does nothing unless the environment variable `GLANCE_CACHED_TEST_FAILPOINT`
//! equals `name`. Then it creates an empty file at the path in
//! `GLANCE_CACHED_TEST_FAILPOINT_FILE` (if set), so the test knows the point is reached,
//! and blocks the calling thread forever, or for `GLANCE_CACHED_TEST_FAILPOINT_PAUSE_MS`
//! milliseconds when that is set (a slow step rather than a stuck one). It is never
//! meant to be set in production. The
//! environment is read once (cached in a `OnceLock`), so an unset failpoint costs a load
//! and a compare.

use std::sync::OnceLock;
use std::time::Duration;

struct Armed {
    name: String,
    file: Option<std::path::PathBuf>,
    pause: Option<Duration>,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let name = std::env::var("GLANCE_CACHED_TEST_FAILPOINT").ok()?;
            let file = std::env::var_os("GLANCE_CACHED_TEST_FAILPOINT_FILE").map(Into::into);
            let pause = std::env::var("GLANCE_CACHED_TEST_FAILPOINT_PAUSE_MS")
                .ok()
                .and_then(|ms| ms.parse().ok())
                .map(Duration::from_millis);
            Some(Armed { name, file, pause })
        })
        .as_ref()
}

/// Blocks the calling thread forever (or for the armed pause) when the failpoint `name`
/// is armed (test only).
pub(crate) fn hit(name: &str) {
    let Some(armed) = armed() else { return };
    if armed.name != name {
        return;
    }
    if let Some(file) = &armed.file {
        let _ = std::fs::write(file, b"");
    }
    if let Some(pause) = armed.pause {
        std::thread::sleep(pause);
        return;
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
