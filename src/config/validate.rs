//! The validator: turns the merged dictionary into a `Config` by walking the key table
//! (`keys::KEYS`), collecting every problem (unknown key, wrong type, bad value,
//! cross-field conflict) with where its value came from. The parsers here are the key
//! kinds'; the few keys whose default follows from others are filled by the functions
//! at the end.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::value::{Dict, Num, Value as Raw};
use figment::{Figment, Source};

use super::keys::{self, Field, Fill, KEYS, Key, Kind, Value};
use super::{CacheConfig, CleanerConfig, Config, ConfigError, ConfigProblem, DaemonConfig};
use super::{DEFAULT_NODE_URL, DEFAULT_SQLITE_FILE, DatabaseConfig, ENV_PREFIX, LogConfig};
use super::{HttpConfig, LogFormat, PrefetcherConfig, PrunerConfig, all_keys};
use super::{format_duration, format_size, parse_duration, parse_size};
use crate::db::{Dialect, mask_url};
use crate::digest::VerifyPolicy;

/// A whole number of any width and sign (figment parses "1000" as unsigned).
fn whole(n: Num) -> Option<i128> {
    n.to_i128()
        .or_else(|| n.to_u128().and_then(|u| i128::try_from(u).ok()))
}

/// Collects every problem while turning the merged dictionary into a `Config`.
pub(super) struct Validator<'a> {
    figment: &'a Figment,
    file: Option<&'a Path>,
    problems: Vec<ConfigProblem>,
}

impl<'a> Validator<'a> {
    pub(super) fn new(figment: &'a Figment, file: Option<&'a Path>) -> Self {
        Validator {
            figment,
            file,
            problems: Vec::new(),
        }
    }

    /// Fills every key in table order, so a key's checks see the keys before it.
    pub(super) fn validate(mut self, dict: &Dict) -> Result<Config, ConfigError> {
        self.reject_unknown_keys(dict, "");
        let mut config = blank(self.file.map(Path::to_path_buf));
        for key in KEYS {
            match key.fill {
                Fill::Set(set) => {
                    let value = self.read(key);
                    if let (Some(check), Some(v)) = (key.check, &value)
                        && let Err(message) = check(v, &config)
                    {
                        self.problem(key.name, message);
                    }
                    set(&mut config, value);
                }
                Fill::Derive(derive) => derive(&mut self, &mut config),
                Fill::WithSection => {}
            }
        }
        if !self.problems.is_empty() {
            return Err(ConfigError::Invalid(self.problems));
        }
        Ok(config)
    }

    /// `key`'s value from the file or the environment, parsed by its kind; its default
    /// when unset, and also after a problem (recorded), so later checks see a value.
    pub(super) fn read(&mut self, key: &Key) -> Option<Value> {
        let name = key.name;
        let parsed = match key.kind {
            Kind::Path => self.optional_path(name).map(Value::Path),
            Kind::Size => self.size(name).map(Value::Size),
            Kind::Duration => self.duration(name).map(Value::Duration),
            Kind::PositiveDuration => self.positive_duration(name).map(Value::Duration),
            Kind::Integer { min, max } => self.integer(name, min, max).map(Value::Integer),
            Kind::Bool => self.boolean(name).map(Value::Bool),
            Kind::Text | Kind::Url | Kind::Secret => self.string(name).map(Value::Text),
            Kind::List => self.list(name).map(Value::List),
            Kind::UrlList => self.url_list(name).map(Value::List),
            Kind::Choice { what, words } => match self.string(name) {
                Some(word) if words.contains(&word.as_str()) => Some(Value::Text(word)),
                Some(word) => {
                    self.problem(name, keys::unknown_choice(what, &word, words));
                    None
                }
                None => None,
            },
        };
        parsed.or_else(|| key.default.value(key.kind))
    }

    /// `read` for the key named `name`, as the type of its field.
    pub(super) fn get<T: Field>(&mut self, name: &str) -> Option<T> {
        let value = self.read(keys::find(name)?);
        T::from_value(value)
    }

    fn reject_unknown_keys(&mut self, dict: &Dict, prefix: &str) {
        for (name, value) in dict {
            let key = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            let is_section = all_keys().any(|k| k.starts_with(&format!("{key}.")));
            match value {
                Raw::Dict(_, inner) if is_section => self.reject_unknown_keys(inner, &key),
                _ if all_keys().any(|k| k == key) => {}
                _ if is_section => self.problem(&key, "must be a table of keys".into()),
                _ => self.problem(&key, "unknown key".into()),
            }
        }
    }

    pub(super) fn problem(&mut self, key: &str, message: String) {
        let origin = self.origin(key);
        self.problems.push(ConfigProblem {
            key: key.to_owned(),
            origin,
            message,
        });
    }

    /// The file or environment variable that supplied `key`.
    fn origin(&self, key: &str) -> Option<String> {
        let value = self.figment.find_value(key).ok()?;
        let meta = self.figment.get_metadata(value.tag())?;
        match &meta.source {
            Some(Source::File(path)) => Some(path.display().to_string()),
            _ => Some(format!(
                "{ENV_PREFIX}{}",
                key.to_ascii_uppercase().replace('.', "__")
            )),
        }
    }

    /// Whether the value with `tag` came from a configuration file.
    fn came_from_file(&self, tag: figment::value::Tag) -> bool {
        self.figment
            .get_metadata(tag)
            .is_some_and(|m| matches!(m.source, Some(Source::File(_))))
    }

    fn value(&self, key: &str) -> Option<Raw> {
        self.figment.find_value(key).ok()
    }

    pub(super) fn string(&mut self, key: &str) -> Option<String> {
        match self.value(key)? {
            Raw::String(_, s) => Some(s),
            // The environment has no types: figment reads `GLANCE_CACHED_..=1234` as a
            // number, which may well be a password. A number in a file is a mistake.
            Raw::Num(tag, n) if !self.came_from_file(tag) => whole(n).map(|n| n.to_string()),
            _ => {
                self.problem(key, "must be a string".into());
                None
            }
        }
    }

    /// A list of strings; from the environment, which has no lists, comma-separated
    /// text.
    pub(super) fn list(&mut self, key: &str) -> Option<Vec<String>> {
        match self.value(key)? {
            Raw::Array(_, items) => {
                let mut out = Vec::new();
                for item in items {
                    match item {
                        Raw::String(_, s) => out.push(s),
                        _ => {
                            self.problem(key, "must be a list of strings".into());
                            return None;
                        }
                    }
                }
                Some(out)
            }
            Raw::String(tag, s) if !self.came_from_file(tag) => Some(
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
            _ => {
                self.problem(key, "must be a list of strings".into());
                None
            }
        }
    }

    /// One URL (a string) or a list of them; from the environment, comma-separated.
    pub(super) fn url_list(&mut self, key: &str) -> Option<Vec<String>> {
        match self.value(key)? {
            Raw::String(tag, s) if self.came_from_file(tag) => Some(vec![s]),
            _ => self.list(key),
        }
    }

    pub(super) fn boolean(&mut self, key: &str) -> Option<bool> {
        match self.value(key)? {
            Raw::Bool(_, b) => Some(b),
            // The environment has no types; figment passes some spellings through as text.
            Raw::String(tag, s) if !self.came_from_file(tag) => {
                match s.trim().to_ascii_lowercase().as_str() {
                    "true" | "yes" | "1" => Some(true),
                    "false" | "no" | "0" => Some(false),
                    _ => {
                        self.problem(key, format!("invalid value {s:?}: must be true or false"));
                        None
                    }
                }
            }
            _ => {
                self.problem(key, "must be true or false".into());
                None
            }
        }
    }

    pub(super) fn integer(&mut self, key: &str, min: i128, max: i128) -> Option<i128> {
        let v = self.value(key)?;
        let n = match &v {
            Raw::Num(_, n) => whole(*n),
            Raw::String(_, s) => s.trim().parse().ok(),
            _ => None,
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.problem(key, format!("must be a whole number from {min} to {max}"));
                None
            }
        }
    }

    pub(super) fn size(&mut self, key: &str) -> Option<u64> {
        let parsed = match self.value(key)? {
            Raw::Num(_, n) => match whole(n) {
                Some(n) if n >= 0 => u64::try_from(n).map_err(|_| "too large".to_string()),
                Some(n) => Err(format!("invalid size {n}: must not be negative")),
                None => Err("must be a whole number of bytes or a string like \"10GiB\"".into()),
            },
            Raw::String(_, s) => parse_size(&s),
            _ => Err("must be a number of bytes or a string like \"10GiB\"".into()),
        };
        parsed.map_err(|m| self.problem(key, m)).ok()
    }

    pub(super) fn duration(&mut self, key: &str) -> Option<Duration> {
        let parsed = match self.value(key)? {
            Raw::Num(_, n) => match whole(n) {
                Some(n) if n >= 0 => u64::try_from(n)
                    .map(Duration::from_secs)
                    .map_err(|_| "too large".to_string()),
                Some(n) => Err(format!("invalid duration {n}: must not be negative")),
                None => Err("must be whole seconds or a string like \"10m\"".into()),
            },
            Raw::String(_, s) => parse_duration(&s),
            _ => Err("must be seconds or a string like \"10m\"".into()),
        };
        // Anything past a century is a typo, and would overflow time arithmetic.
        const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);
        match parsed {
            Ok(d) if d > MAX_DURATION => {
                self.problem(key, "must be at most 100 years".into());
                None
            }
            other => other.map_err(|m| self.problem(key, m)).ok(),
        }
    }

    pub(super) fn positive_duration(&mut self, key: &str) -> Option<Duration> {
        let d = self.duration(key)?;
        if d.is_zero() {
            self.problem(key, "must be greater than zero".into());
            return None;
        }
        Some(d)
    }

    /// An absolute path; a relative one in a file is taken relative to that file's
    /// directory, from the environment relative to the working directory. `None` when
    /// unset (or empty, a problem).
    pub(super) fn optional_path(&mut self, key: &str) -> Option<PathBuf> {
        let raw = self.string(key)?;
        if raw.is_empty() {
            self.problem(key, "must not be empty".into());
            return None;
        }
        let p = PathBuf::from(&raw);
        if p.is_absolute() {
            return Some(p);
        }
        let from_file = self
            .figment
            .find_value(key)
            .ok()
            .and_then(|v| self.figment.get_metadata(v.tag()).cloned())
            .and_then(|m| match m.source {
                Some(Source::File(f)) => f.parent().map(Path::to_path_buf),
                _ => None,
            });
        let base = from_file.or_else(|| std::env::current_dir().ok());
        match base {
            Some(b) => Some(b.join(p)),
            None => {
                self.problem(
                    key,
                    "is relative and the working directory is unknown".into(),
                );
                Some(p)
            }
        }
    }
}

/// A `Config` with every field empty, each then filled from its key.
pub(super) fn blank(file: Option<PathBuf>) -> Config {
    Config {
        file,
        cache: CacheConfig {
            dir: PathBuf::new(),
            max_size: 0,
            stall_time: Duration::ZERO,
        },
        database: DatabaseConfig {
            url: String::new(),
            max_connections: 0,
            connect_timeout: Duration::ZERO,
            create_glance_tables: false,
            sqlite_file: None,
        },
        node_reference_url: String::new(),
        log: LogConfig {
            level: String::new(),
            format: LogFormat::Auto,
        },
        cleaner: CleanerConfig {
            interval: Duration::ZERO,
            invalid_grace: Duration::ZERO,
        },
        pruner: PrunerConfig {
            interval: Duration::ZERO,
            low_watermark: None,
            min_free_disk: None,
        },
        daemon: DaemonConfig {
            shutdown_timeout: Duration::ZERO,
            lease_ttl: Duration::ZERO,
        },
        prefetcher: PrefetcherConfig {
            concurrency: 0,
            interval: Duration::ZERO,
            max_attempts: 0,
            retry_delay: Duration::ZERO,
            max_retry_delay: Duration::ZERO,
            max_bytes_per_second: None,
            min_bytes_per_second: None,
            min_rate_window: Duration::ZERO,
            verify: VerifyPolicy::All,
            claim_ttl: Duration::ZERO,
        },
        http: HttpConfig {
            enabled: false,
            listen: Vec::new(),
            header_read_timeout: Duration::ZERO,
            idle_timeout: Duration::ZERO,
            max_connections: 0,
            max_request_body: 0,
            hit_flush_interval: Duration::ZERO,
            admin_token_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            send_timeout: Duration::ZERO,
            auth_cache_ttl: Duration::ZERO,
            serve_auth: None,
            serve_allow: Vec::new(),
            serve_token_file: None,
            admin_roles: Vec::new(),
            metrics_listen: Vec::new(),
            forward: false,
            public_url: None,
            fill_on_miss: false,
            fill_on_range: false,
        },
        upstream: None,
    }
}

/// `http.listen`: each entry an IP address with a port, or `unix:` and an absolute
/// path (names are not resolved: the daemon binds before anything else could).
pub(super) fn listen_addresses(v: &Value, _: &Config) -> Result<(), String> {
    let Value::List(entries) = v else {
        return Ok(());
    };
    for entry in entries {
        match entry.strip_prefix("unix:") {
            Some(path) if Path::new(path).is_absolute() => {}
            Some(_) => return Err(format!("{entry:?}: a unix socket needs an absolute path")),
            None if entry.parse::<std::net::SocketAddr>().is_ok() => {}
            None => {
                return Err(format!(
                    "{entry:?} is neither \"address:port\" (e.g. \"127.0.0.1:9393\", \"[::1]:9393\") nor \"unix:/path\""
                ));
            }
        }
    }
    Ok(())
}

/// `http.public_url`: an http:// or https:// URL (version documents link to it).
pub(super) fn public_url(v: &Value, _: &Config) -> Result<(), String> {
    match v {
        Value::Text(u) if u.starts_with("http://") || u.starts_with("https://") => Ok(()),
        Value::Text(u) => Err(format!(
            "{:?} is not an http:// or https:// URL",
            crate::redact::mask_url(u)
        )),
        _ => Ok(()),
    }
}

/// A file holding a credential: a regular file that others cannot read and only its
/// owner can write (the checks `upstream.token_file` gets, and that every read of it
/// repeats).
pub(super) fn secret_file(v: &Value, _: &Config) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let Value::Path(path) = v else {
        return Ok(());
    };
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Err(format!("{} is not a regular file", path.display())),
        Ok(m) if m.permissions().mode() & 0o004 != 0 => Err(format!(
            "{} is world-readable: chmod o-r it (a token is a credential)",
            path.display()
        )),
        Ok(m) if m.permissions().mode() & 0o022 != 0 => Err(format!(
            "{} is writable by its group or others: chmod go-w it (whoever can write it chooses the token)",
            path.display()
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// `http.serve_allow`: each entry an IP network (`10.0.0.0/8`, `::1/128`, an address
/// alone for one host) or `unix` (clients on the unix sockets).
pub(super) fn serve_networks(v: &Value, _: &Config) -> Result<(), String> {
    let Value::List(entries) = v else {
        return Ok(());
    };
    for entry in entries {
        if entry != "unix" && crate::http::Network::parse(entry).is_none() {
            return Err(format!(
                "{entry:?} is neither a network (\"10.0.0.0/8\", \"::1/128\", an address alone) nor \"unix\""
            ));
        }
    }
    Ok(())
}

/// `http.tls_key_file`: both TLS files or neither; the key a secret file; the pair
/// loaded once (a reload with a pair that does not load is refused, the running one
/// stays).
pub(super) fn tls_key_file(v: &mut Validator<'_>, c: &mut Config) {
    const KEY: &str = "http.tls_key_file";
    let key = v.get::<PathBuf>(KEY);
    c.http.tls_key_file = key.clone();
    match (&c.http.tls_cert_file, key) {
        (None, None) => {}
        (None, Some(_)) => v.problem(
            KEY,
            "is set without http.tls_cert_file: set both or neither".into(),
        ),
        (Some(_), None) => v.problem(
            "http.tls_cert_file",
            "is set without http.tls_key_file: set both or neither".into(),
        ),
        (Some(cert), Some(key)) => {
            if let Err(message) = secret_file(&Value::Path(key.clone()), c) {
                v.problem(KEY, message);
            } else if let Err(e) = crate::http::load_tls_pair(cert, &key) {
                v.problem(KEY, e.to_string());
            }
        }
    }
}

/// `database.url`; unset: SQLite in the cache directory, opened by path (the URL only
/// shows it).
pub(super) fn database_url(v: &mut Validator<'_>, c: &mut Config) {
    const KEY: &str = "database.url";
    let (url, sqlite_file) = match v.get::<String>(KEY) {
        Some(url) => (url, None),
        None => {
            let file = c.cache.dir.join(DEFAULT_SQLITE_FILE);
            (format!("sqlite://{}", file.display()), Some(file))
        }
    };
    if Dialect::from_url(&url).is_none() {
        v.problem(
            KEY,
            format!(
                "unsupported url {:?}: expected sqlite://, postgres:// or mysql://",
                mask_url(&url)
            ),
        );
    }
    c.database.url = url;
    c.database.sqlite_file = sqlite_file;
}

/// `database.create_glance_tables`; unset: only for SQLite.
pub(super) fn create_glance_tables(v: &mut Validator<'_>, c: &mut Config) {
    let sqlite = matches!(Dialect::from_url(&c.database.url), Some(Dialect::Sqlite));
    c.database.create_glance_tables = v.get("database.create_glance_tables").unwrap_or(sqlite);
}

/// `node.reference_url`; unset: required with a server database, else the embedded
/// default.
pub(super) fn node_reference_url(v: &mut Validator<'_>, c: &mut Config) {
    const KEY: &str = "node.reference_url";
    let server = matches!(
        Dialect::from_url(&c.database.url),
        Some(Dialect::Postgres | Dialect::MySql)
    );
    c.node_reference_url = match v.get::<String>(KEY) {
        Some(u) if u.trim().is_empty() || u.len() > 255 => {
            v.problem(KEY, "must be 1 to 255 characters".into());
            u
        }
        Some(u) => u,
        None if server => {
            v.problem(
                KEY,
                "is required with a shared PostgreSQL or MySQL database: set it to this node's Glance worker_self_reference_url".into(),
            );
            String::new()
        }
        None => DEFAULT_NODE_URL.to_owned(),
    };
}

/// `log.level` must be a tracing filter.
pub(super) fn log_filter(v: &Value, _: &Config) -> Result<(), String> {
    match v {
        Value::Text(level) => tracing_subscriber::EnvFilter::builder()
            .parse(level)
            .map(drop)
            .map_err(|e| format!("invalid level {level:?}: {e}")),
        _ => Ok(()),
    }
}

/// `pruner.low_watermark` must not be above `cache.max_size`.
pub(super) fn not_above_max_size(v: &Value, c: &Config) -> Result<(), String> {
    match v {
        Value::Size(low) if *low > c.cache.max_size => Err(format!(
            "{} is larger than cache.max_size ({})",
            format_size(*low),
            format_size(c.cache.max_size)
        )),
        _ => Ok(()),
    }
}

/// `prefetcher.max_retry_delay` must not be shorter than `prefetcher.retry_delay`.
pub(super) fn not_below_retry_delay(v: &Value, c: &Config) -> Result<(), String> {
    match v {
        Value::Duration(d) if *d < c.prefetcher.retry_delay => {
            Err("must not be shorter than prefetcher.retry_delay".into())
        }
        _ => Ok(()),
    }
}

/// A duration of at least `min`.
pub(super) fn at_least(v: &Value, min: Duration) -> Result<(), String> {
    match v {
        Value::Duration(d) if *d < min => Err(format!("must be at least {}", format_duration(min))),
        _ => Ok(()),
    }
}

/// A limit whose "none" is leaving it unset, not 0.
pub(super) fn not_zero(v: &Value, _: &Config) -> Result<(), String> {
    match v {
        Value::Size(0) => Err("must be greater than zero (leave it unset for no limit)".into()),
        _ => Ok(()),
    }
}
