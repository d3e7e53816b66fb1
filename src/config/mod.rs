//! Configuration: built-in defaults < TOML file < `GLANCE_CACHED_<SECTION>__<KEY>`
//! environment variables, merged by figment, then validated into a `Config`.
//!
//! Validation walks the key table (`keys`), so every problem (unknown key, wrong type,
//! bad value, cross-field conflict) is collected and reported together, each naming the
//! key and where its value came from. Startup and SIGHUP reload share `Config::load`.

pub(crate) mod keys;
#[cfg(test)]
mod tests;
mod upstream;
mod validate;
pub(crate) mod values;

pub(crate) use upstream::KeystoneMethod;
pub use upstream::{GlanceAuth, UpstreamConfig, UpstreamKind};

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Profile, Provider};

use validate::Validator;
pub(crate) use values::{format_duration, format_size, parse_duration, parse_size};

use crate::cache::{CleanPolicy, PrunePolicy};
use crate::db::Dialect;
use crate::digest::VerifyPolicy;
use keys::{KEYS, Reload};

/// The file read when neither `--config` nor `GLANCE_CACHED_CONFIG` names one.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/glance-cached/glance-cached.toml";
/// Environment variable naming the config file.
pub const CONFIG_PATH_ENV: &str = "GLANCE_CACHED_CONFIG";
/// Prefix of the per-key environment variables.
pub const ENV_PREFIX: &str = "GLANCE_CACHED_";
/// Where Glance's packages put the cache, and so our default.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/glance/image-cache";
/// The SQLite file used when `database.url` is unset: in a directory of its own inside
/// the cache directory, which Glance never lists, counts or deletes (it skips
/// directories; at the top it would delete the `-wal` and `-shm` files). The packages
/// set a state directory outside the cache instead (see the README).
pub const DEFAULT_SQLITE_FILE: &str = ".glance-cached/glance-cached.db";
/// Node name used with the embedded SQLite database when none is configured.
pub const DEFAULT_NODE_URL: &str = "http://localhost:9292";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// journald under systemd (JOURNAL_STREAM set), text otherwise.
    Auto,
    Text,
    Json,
    Journald,
}

impl LogFormat {
    /// The word `log.format` takes for it (`keys::LOG_FORMATS`).
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Auto => "auto",
            LogFormat::Text => "text",
            LogFormat::Json => "json",
            LogFormat::Journald => "journald",
        }
    }

    pub fn from_word(word: &str) -> Option<LogFormat> {
        [
            LogFormat::Auto,
            LogFormat::Text,
            LogFormat::Json,
            LogFormat::Journald,
        ]
        .into_iter()
        .find(|f| f.as_str() == word)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    pub dir: PathBuf,
    pub max_size: u64,
    pub stall_time: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DatabaseConfig {
    pub url: String,
    pub max_connections: u32,
    pub connect_timeout: Duration,
    /// May Glance's cache tables be created when the database has none? Set, or by
    /// default only for SQLite (see `DbOptions::create_glance_tables`).
    pub create_glance_tables: bool,
    /// The default SQLite file (in the cache directory) when `database.url` is unset,
    /// opened by path (`url` then only shows it).
    pub sqlite_file: Option<PathBuf>,
}

impl DatabaseConfig {
    /// The connection settings beyond the URL, for `Db::connect`.
    pub fn db_options(&self) -> crate::db::DbOptions {
        crate::db::DbOptions {
            max_connections: self.max_connections,
            connect_timeout: self.connect_timeout,
            create_glance_tables: self.create_glance_tables,
            read_only: false,
            sqlite_file: self.sqlite_file.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// An `EnvFilter` directive: "info", or "glance_cached=debug,sqlx=warn".
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CleanerConfig {
    pub interval: Duration,
    pub invalid_grace: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PrunerConfig {
    pub interval: Duration,
    pub low_watermark: Option<u64>,
    pub min_free_disk: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// How long shutdown waits for loops to reach a step boundary before aborting them.
    pub shutdown_timeout: Duration,
    /// A node's lease expires when not renewed for this long; it is renewed every third.
    pub lease_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PrefetcherConfig {
    /// Downloads at once.
    pub concurrency: usize,
    /// Safety-net pass over the queue (queue commands and markers wake it at once).
    pub interval: Duration,
    /// A checksum mismatch is retried until this many attempts, then the image is dropped.
    pub max_attempts: u32,
    /// First retry delay after a retryable failure; doubles per attempt up to the max.
    pub retry_delay: Duration,
    pub max_retry_delay: Duration,
    pub max_bytes_per_second: Option<u64>,
    /// A download whose upstream delivers less than this many bytes per second, over
    /// each `min_rate_window` spent waiting for it, fails (and is retried): a dripping
    /// upstream must not hold a download slot forever. `None`: no floor.
    pub min_bytes_per_second: Option<u64>,
    pub min_rate_window: Duration,
    /// Which of the upstream's digests a download computes and checks.
    pub verify: VerifyPolicy,
    /// How long a claim on a queued image lasts unless renewed: bounds how long the
    /// image of a download whose process vanished without trace waits.
    pub claim_ttl: Duration,
}

impl PrefetcherConfig {
    /// How often the claims of downloads in progress are renewed: six times per term,
    /// so a database outage of most of a term still leaves a renewal due in time.
    pub fn claim_renew_every(&self) -> Duration {
        self.claim_ttl / 6
    }
}

/// `[http]`: the optional listener (health and Glance's cache API).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    pub enabled: bool,
    /// `address:port` and `unix:/path` entries.
    pub listen: Vec<String>,
    /// How long a connection may take to send a request head, counted from when it is
    /// ready for one (so it also bounds a keep-alive connection's wait between requests).
    pub header_read_timeout: Duration,
    /// A connection on which no byte moves for this long is closed.
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_request_body: u64,
    /// How often the hits counted in memory are written to the database.
    pub hit_flush_interval: Duration,
    /// The static token the cache API requires; `None`: the cache API refuses all.
    pub admin_token_file: Option<PathBuf>,
    /// PEM certificate chain (leaf first) for TLS on the TCP listeners; with
    /// `tls_key_file`, or neither.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// A response body that cannot be written for this long (the client reads nothing)
    /// ends its connection.
    pub send_timeout: Duration,
    /// How long an upstream Glance's yes to (token, image) is remembered by the image
    /// download route; zero: asked every time.
    pub auth_cache_ttl: Duration,
    /// Who may download images when the upstream is not Glance: `"none"` (the networks
    /// in `serve_allow`) or `"token"` (`serve_token_file`); `None`: nobody.
    pub serve_auth: Option<String>,
    /// The client networks (CIDRs; `"unix"` for unix-socket clients) `serve_auth =
    /// "none"` lets download.
    pub serve_allow: Vec<String>,
    /// The static token `serve_auth = "token"` requires in `X-Auth-Token`.
    pub serve_token_file: Option<PathBuf>,
    /// Keystone roles of which a token needs one for the cache API (any, compared as
    /// oslo.policy compares roles: ignoring case).
    pub admin_roles: Vec<String>,
    /// Where `/metrics` (and health) are served instead of on `listen`; empty: on
    /// `listen`.
    pub metrics_listen: Vec<String>,
    /// Requests no route of ours answers go to the Glance upstream (`http::proxy`).
    pub forward: bool,
    /// The URL clients reach the listener by, put into forwarded version documents.
    pub public_url: Option<String>,
    /// A download of an image not cached fills the cache (once per image); false:
    /// streamed through from the upstream without caching.
    pub fill_on_miss: bool,
    /// A `Range` request on a miss (streamed through as a range) also starts a fill.
    pub fill_on_range: bool,
}

/// A validated configuration: absolute paths, parsed sizes and durations, cross-field
/// checks done.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from, if any.
    pub file: Option<PathBuf>,
    pub cache: CacheConfig,
    pub database: DatabaseConfig,
    pub node_reference_url: String,
    pub log: LogConfig,
    pub cleaner: CleanerConfig,
    pub pruner: PrunerConfig,
    pub daemon: DaemonConfig,
    pub prefetcher: PrefetcherConfig,
    pub http: HttpConfig,
    /// Where prefetched images come from; `None`: queued images wait (Glance's API or an
    /// operator caches them).
    pub upstream: Option<UpstreamConfig>,
}

/// One problem with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: String,
    /// Where the value came from: a file path or an environment variable.
    pub origin: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Some(o) => write!(f, "{} (from {o}): {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// Everything wrong with a configuration, reported at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("invalid configuration: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<ConfigProblem>),
}

impl ConfigError {
    /// Each problem on its own line, for logs and `check-config`.
    pub fn lines(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid(p) => p.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        }
    }
}

/// When `path` is not valid TOML: where and what, naming the key the way the rest of
/// the configuration errors do ("line 3: cache.max_size: ..."). The parser stops at the
/// first error, so it is the only one reported for that file.
fn describe_toml_error(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let error = toml::from_str::<toml::Table>(&text).err()?;
    let offset = error.span()?.start.min(text.len());
    let line_no = text[..offset].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let message = error.message().trim_end_matches('.');
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches(|c| c == '"' || c == '\''))
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    let Some(key) = key else {
        return Some(format!("line {line_no}: {message}: {:?}", line.trim()));
    };
    let section = text[..offset].lines().rev().skip(1).find_map(|l| {
        let header = l.trim().strip_prefix('[')?;
        Some(
            header
                .trim_start_matches('[')
                .split(']')
                .next()?
                .trim()
                .to_owned(),
        )
    });
    let name = match section {
        Some(section) => format!("{section}.{key}"),
        None => key.to_owned(),
    };
    let hint = if message.contains("too large") {
        " (TOML integers stop at 9223372036854775807; write sizes and durations as strings such as \"10GiB\" or \"30d\")"
    } else {
        ""
    };
    Some(format!("line {line_no}: {name}: {message}{hint}"))
}

/// The environment with every value as written. figment's `Env` parses values as TOML-ish
/// literals (`0123` becomes 123, `+5` becomes 5, quotes are stripped, `true` is a
/// boolean), which would change passwords and URLs; the validator already parses the
/// text of sizes, durations, numbers and booleans itself.
struct RawEnv(Env);

impl Provider for RawEnv {
    fn metadata(&self) -> figment::Metadata {
        self.0.metadata()
    }

    fn data(&self) -> Result<figment::value::Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, raw) in self.0.iter() {
            insert_nested(&mut dict, key.as_str(), Value::from(raw));
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// Puts `value` at the dotted `key` in `dict`, making the tables on the way.
fn insert_nested(dict: &mut Dict, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            dict.insert(key.to_owned(), value);
        }
        Some((head, rest)) => {
            let entry = dict
                .entry(head.to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert_nested(inner, rest, value);
            }
        }
    }
}

/// Which file to read: `--config`, else `GLANCE_CACHED_CONFIG`, else the default path
/// when it exists, else none (defaults and environment only).
pub fn resolve_config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(CONFIG_PATH_ENV).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let default = Path::new(DEFAULT_CONFIG_PATH);
    default.exists().then(|| default.to_path_buf())
}

impl Config {
    /// Reads and validates the configuration from `file` (if any) and the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = file {
            let meta = std::fs::metadata(path).map_err(|e| ConfigError::File {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
            if !meta.is_file() {
                return Err(ConfigError::File {
                    path: path.to_path_buf(),
                    message: "not a regular file".into(),
                });
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // Every key lives in a section, so only `GLANCE_CACHED_<SECTION>__<KEY>` can name
        // one; other variables with the prefix (`GLANCE_CACHED_CONFIG`, a test harness's)
        // are not configuration.
        figment = figment.merge(RawEnv(
            Env::prefixed(ENV_PREFIX)
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        ));
        let dict = figment
            .data()
            .map_err(|e| ConfigError::File {
                path: file.map(Path::to_path_buf).unwrap_or_default(),
                message: file
                    .and_then(describe_toml_error)
                    .unwrap_or_else(|| e.to_string().replace('\n', " ")),
            })?
            .remove(&Profile::Default)
            .unwrap_or_default();
        Validator::new(&figment, file).validate(&dict)
    }

    /// Keys whose value differs between `self` and `new` and need a restart to apply
    /// (`[upstream]` as one: "upstream").
    pub fn restart_required_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        for key in KEYS.iter().filter(|k| k.reload == Reload::Restart) {
            if (key.get)(self) != (key.get)(new) && !changed.contains(&key.applied_as()) {
                changed.push(key.applied_as());
            }
        }
        changed
    }

    /// Puts the running values of the keys that only a restart can change back into
    /// `self`, a reloaded config.
    pub fn keep_restart_only_keys(&mut self, running: &Config) {
        for key in KEYS.iter().filter(|k| k.reload == Reload::Restart) {
            (key.keep)(self, running);
        }
    }

    pub fn dialect(&self) -> Dialect {
        // A `Config` exists only after the validator accepted `database.url`'s scheme.
        #[allow(clippy::expect_used)]
        Dialect::from_url(&self.database.url).expect("validated database url")
    }

    /// When the cleaner, `clean` and reconcile remove leftovers.
    pub fn clean_policy(&self) -> CleanPolicy {
        CleanPolicy {
            stall_time: self.cache.stall_time,
            invalid_grace: self.cleaner.invalid_grace,
        }
    }

    /// How the pruner and `prune` shrink the cache.
    pub fn prune_policy(&self) -> PrunePolicy {
        PrunePolicy {
            max_size: self.cache.max_size,
            low_watermark: self.pruner.low_watermark,
            min_free_disk: self.pruner.min_free_disk,
        }
    }

    /// How often the queue loop scans `queue/` for Glance's markers: `cleaner.interval`
    /// (its doc says so), the loop that rescans the other directories Glance writes.
    pub fn queue_interval(&self) -> Duration {
        self.cleaner.interval
    }

    /// The effective configuration as TOML, with secrets masked: every key of the table
    /// in its order, section by section.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let mut keys = KEYS.iter().peekable();
        while let Some(first) = keys.next() {
            let section = first.section();
            let mut lines: Vec<String> = first.toml_line(self).into_iter().collect();
            while let Some(key) = keys.next_if(|k| k.section() == section) {
                lines.extend(key.toml_line(self));
            }
            if section == "upstream" && self.upstream.is_none() {
                out.push_str("\n# [upstream] is unset: queued images are not prefetched\n");
                continue;
            }
            if lines.is_empty() {
                continue;
            }
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(&format!("[{section}]\n"));
            for line in lines {
                out.push_str(&line);
                out.push('\n');
            }
        }
        out
    }
}

/// Every key the file and the environment may set, in every section.
pub fn all_keys() -> impl Iterator<Item = &'static str> {
    KEYS.iter().map(|k| k.name)
}
