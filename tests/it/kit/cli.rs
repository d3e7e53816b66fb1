//! Running the built binary: the one rule for the environment that every command and
//! daemon of the suite runs in, and the two ways a test runs a command.
//!
//! The rule: nothing in the environment the suite runs in configures the binary. Every
//! `GLANCE_CACHED_<SECTION>__<KEY>`, `GLANCE_CACHED_CONFIG` and `RUST_LOG` is removed, so
//! a test's configuration is its config file and the variables it passes itself. Other
//! variables stay, the harness's own `GLANCE_CACHED_TEST_*` among them (the binary must
//! not mistake them for configuration).

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The built binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_glance-cached");

/// Applies the rule to `cmd`: the binary, or a wrapper that runs it (`unshare ...`).
/// Variables set on `cmd` after this call stay.
pub fn scrub_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars() {
        let config_var = k.starts_with("GLANCE_CACHED_") && k.contains("__");
        if config_var || k == "GLANCE_CACHED_CONFIG" || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// The binary with its environment scrubbed: where every run of it starts.
pub fn command() -> Command {
    let mut cmd = Command::new(BIN);
    scrub_env(&mut cmd);
    cmd
}

/// `glance-cached --config CONFIG ARGS`, with `env` set on top of the scrubbed
/// environment.
pub fn on_config<S: AsRef<OsStr>>(config: &Path, args: &[S], env: &[(&str, &str)]) -> Command {
    let mut cmd = command();
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .envs(env.iter().copied());
    cmd
}

/// Runs `on_config(config, args, env)` to its end; its output.
pub fn run<S: AsRef<OsStr>>(config: &Path, args: &[S], env: &[(&str, &str)]) -> Output {
    on_config(config, args, env).output().unwrap()
}

/// `run` with a deadline: a command that blocked on a planted FIFO (or anything
/// else) fails the test instead of hanging it.
pub fn run_with_deadline<S: AsRef<OsStr>>(
    config: &Path,
    args: &[S],
    env: &[(&str, &str)],
) -> Output {
    let args: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
    let out = tempfile::tempfile().unwrap();
    let err = tempfile::tempfile().unwrap();
    let mut child = on_config(config, &args, env)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("glance-cached {args:?} hung for 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read = |mut f: std::fs::File| {
        use std::io::{Read, Seek};
        let mut v = Vec::new();
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    };
    Output {
        status,
        stdout: read(out),
        stderr: read(err),
    }
}
