//! Property tests of the configuration's pure functions: what `to_toml` prints is a
//! configuration that reads back as the same one.

use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::{Figment, Profile, Provider};
use proptest::prelude::*;

use super::keys::{Fill, KEYS, Key, Kind};
use super::validate::Validator;
use super::{Config, ConfigError, format_duration, format_size};

/// Validates `text` as a config file, without the environment.
fn parse(text: &str) -> Result<Config, ConfigError> {
    let figment = Figment::new().merge(Toml::string(text));
    let dict = figment
        .data()
        .map_err(|e| ConfigError::File {
            path: Default::default(),
            message: e.to_string(),
        })?
        .remove(&Profile::Default)
        .unwrap_or_default();
    Validator::new(&figment, None).validate(&dict)
}

/// What the round trip may change: an unset `database.url` is printed as the SQLite
/// URL it stands for, which then reads back as that URL rather than as the default file.
fn comparable(mut config: Config) -> Config {
    config.database.sqlite_file = None;
    config
}

/// `min` seconds to 100 years, in seconds or in milliseconds.
fn duration(min: u64) -> impl Strategy<Value = Duration> {
    const CENTURY: u64 = 100 * 365 * 86_400;
    prop_oneof![
        (min..=CENTURY).prop_map(Duration::from_secs),
        (min..=3_600).prop_map(Duration::from_secs),
        (min.max(1)..=CENTURY * 1_000).prop_map(Duration::from_millis),
    ]
}

/// A TOML literal for a value of `key`'s kind: the canonical spelling or another the
/// parser accepts.
fn literal(key: &Key) -> BoxedStrategy<String> {
    let quoted = |s: String| format!("{s:?}");
    match key.kind {
        Kind::Size => prop_oneof![
            any::<u64>().prop_map(move |b| quoted(format_size(b))),
            (0u64..1_000_000, 0u32..=4).prop_map(move |(n, k)| quoted(format_size(n << (10 * k)))),
            (0u64..=i64::MAX as u64).prop_map(|b| b.to_string()),
        ]
        .boxed(),
        Kind::Duration | Kind::PositiveDuration => {
            let min = u64::from(key.kind == Kind::PositiveDuration);
            prop_oneof![
                duration(min).prop_map(move |d| quoted(format_duration(d))),
                (min..=86_400 * 365).prop_map(|s| s.to_string()),
            ]
            .boxed()
        }
        Kind::Integer { min, max } => (min..=max).prop_map(|n| n.to_string()).boxed(),
        Kind::Bool => any::<bool>().prop_map(|b| b.to_string()).boxed(),
        Kind::Choice { words, .. } => proptest::sample::select(words)
            .prop_map(move |w| quoted(w.to_owned()))
            .boxed(),
        Kind::Path => "/[a-z]{1,8}(/[a-z0-9._-]{1,8}){0,3}"
            .prop_map(quoted)
            .boxed(),
        Kind::List => proptest::sample::select(
            &[
                "[]",
                "[\"127.0.0.1:9393\"]",
                "[\"[::1]:80\", \"unix:/run/glance-cached/http.sock\"]",
            ][..],
        )
        .prop_map(str::to_owned)
        .boxed(),
        // log.level: a filter.
        Kind::Text | Kind::Url | Kind::Secret => proptest::sample::select(
            &[
                "info",
                "debug",
                "warn,glance_cached=trace",
                "glance_cached=debug,sqlx=warn",
            ][..],
        )
        .prop_map(move |w| quoted(w.to_owned()))
        .boxed(),
    }
}

/// Lines of the sections the table fills key by key: each key set or left unset.
fn plain_lines() -> impl Strategy<Value = Vec<(String, Option<String>)>> {
    let per_key: Vec<_> = KEYS
        .iter()
        .filter(|k| matches!(k.fill, Fill::Set(_)))
        // Its check looks at the file (mode, type): a random path would refuse every
        // config that sets it, and the property would see half as many configs.
        .filter(|k| k.name != "http.admin_token_file" && k.name != "http.serve_token_file")
        // Its entries are networks, not the listen addresses lists are drawn from.
        .filter(|k| k.name != "http.serve_allow")
        .map(|k| {
            let name = k.name.to_owned();
            proptest::option::of(literal(k)).prop_map(move |l| (name.clone(), l))
        })
        .collect();
    per_key
}

/// The keys filled by code: the database, the node, and `[upstream]` of each kind.
fn derived_lines() -> impl Strategy<Value = Vec<(String, Option<String>)>> {
    let url = proptest::option::of(proptest::sample::select(
        &[
            "\"sqlite:///tmp/glance-cached-test.db\"",
            "\"postgres://db.example.org:5432/glance\"",
            "\"mysql://db.example.org/glance\"",
        ][..],
    ));
    let tables = proptest::option::of(any::<bool>());
    let node = proptest::option::of("[a-z0-9:/._-]{1,40}");
    let upstream = prop_oneof![
        Just(vec![]),
        Just(vec![
            ("upstream.kind", "\"directory\"".to_owned()),
            ("upstream.path", "\"/tmp\"".to_owned()),
        ]),
        (
            "[a-z]{1,8}",
            proptest::option::of("X-[A-Za-z]{1,8}"),
            duration(1)
        )
            .prop_map(|(host, header, timeout)| {
                let mut lines = vec![
                    ("upstream.kind", "\"http\"".to_owned()),
                    (
                        "upstream.url_template",
                        format!("\"https://{host}.example.org/{{image_id}}\""),
                    ),
                    (
                        "upstream.read_timeout",
                        format!("{:?}", format_duration(timeout)),
                    ),
                ];
                if let Some(h) = header {
                    lines.push(("upstream.md5_header", format!("{h:?}")));
                }
                lines
            }),
        ("[a-z]{1,8}", "[a-z]{1,8}").prop_map(|(host, user)| vec![
            ("upstream.kind", "\"glance\"".to_owned()),
            ("upstream.url", format!("\"https://{host}:9292\"")),
            (
                "upstream.keystone.auth_url",
                format!("\"https://{host}:5000/v3\"")
            ),
            ("upstream.keystone.username", format!("{user:?}")),
            ("upstream.keystone.password", "\"***\"".to_owned()),
            ("upstream.keystone.project_name", "\"service\"".to_owned()),
        ]),
    ];
    (url, tables, node, upstream).prop_map(|(url, tables, node, upstream)| {
        let mut lines = vec![
            ("database.url".to_owned(), url.map(str::to_owned)),
            (
                "database.create_glance_tables".to_owned(),
                tables.map(|b| b.to_string()),
            ),
            (
                "node.reference_url".to_owned(),
                node.map(|n| format!("{n:?}")),
            ),
        ];
        lines.extend(upstream.into_iter().map(|(k, v)| (k.to_owned(), Some(v))));
        lines
    })
}

/// A config file setting `lines`, each under its section.
fn file(lines: &[(String, Option<String>)]) -> String {
    let mut out = String::new();
    let mut section = "";
    for key in KEYS {
        let Some((_, Some(literal))) = lines.iter().find(|(name, _)| name == key.name) else {
            continue;
        };
        if key.section() != section {
            section = key.section();
            out.push_str(&format!("[{section}]\n"));
        }
        out.push_str(&format!("{} = {literal}\n", key.leaf()));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// `check-config`'s output of a valid config is a config file that reads back as
    /// the same configuration, and prints the same again.
    #[test]
    fn prop_to_toml_reads_back_as_the_same_config(
        plain in plain_lines(),
        derived in derived_lines(),
    ) {
        let lines: Vec<_> = plain.into_iter().chain(derived).collect();
        let text = file(&lines);
        // Cross-key rules (a low watermark above max_size, ...) refuse some: fine.
        if let Ok(config) = parse(&text) {
            let printed = config.to_toml();
            let again = parse(&printed);
            prop_assert!(again.is_ok(), "{printed}\n{again:?}");
            let again = again.unwrap_or_else(|_| config.clone());
            prop_assert_eq!(again.to_toml(), printed.clone());
            prop_assert_eq!(comparable(again), comparable(config), "{}", printed);
        }
    }

    /// A reload that changes no restart-only key reports none, and one that changes
    /// them is told which; keeping them restores the running values exactly.
    #[test]
    fn prop_keep_restart_only_keys_undoes_the_restart_diff(
        a in plain_lines(), b in plain_lines(), da in derived_lines(), db in derived_lines(),
    ) {
        let (Ok(running), Ok(new)) = (
            parse(&file(&a.into_iter().chain(da).collect::<Vec<_>>())),
            parse(&file(&b.into_iter().chain(db).collect::<Vec<_>>())),
        ) else {
            return Ok(());
        };
        prop_assert!(running.restart_required_changes(&running).is_empty());
        let mut kept = new.clone();
        kept.keep_restart_only_keys(&running);
        prop_assert!(running.restart_required_changes(&kept).is_empty());
        // Only restart keys changed: everything reloadable is the new config's.
        let mut restored = kept.clone();
        restored.keep_restart_only_keys(&new);
        prop_assert_eq!(restored, new);
    }
}

/// `http.listen` takes IP addresses with ports and absolute unix socket paths; anything
/// else is refused with the entry named. The admin token file is checked as the
/// upstream's token file is.
#[test]
fn http_listen_entries_and_the_admin_token_file_are_checked() {
    let ok = parse("[http]\nlisten = [\"127.0.0.1:9393\", \"[::1]:80\", \"unix:/run/x.sock\"]\n")
        .unwrap();
    assert_eq!(ok.http.listen.len(), 3);
    assert!(!ok.http.enabled, "off by default");
    for bad in ["localhost:9393", "127.0.0.1", "unix:relative.sock", ":9393"] {
        let refused = parse(&format!("[http]\nlisten = [\"{bad}\"]\n")).unwrap_err();
        let lines = refused.lines().join("\n");
        assert!(
            lines.contains("http.listen") && lines.contains(bad),
            "{lines}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    let config = |mode: u32| {
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).unwrap();
        parse(&format!(
            "[http]\nadmin_token_file = \"{}\"\n",
            token.display()
        ))
    };
    assert!(config(0o600).is_ok());
    assert!(config(0o640).is_ok());
    for mode in [0o604, 0o620, 0o602] {
        let refused = config(mode).unwrap_err().lines().join("\n");
        assert!(
            refused.contains("http.admin_token_file"),
            "{mode:o}: {refused}"
        );
    }
}

/// `http.tls_cert_file` and `http.tls_key_file`: both or neither, the key not readable
/// by others, and the pair loads and matches.
#[test]
fn http_tls_files_are_both_or_neither_and_must_load() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, other_key) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("other.pem"),
    );
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(&cert, pair.cert.pem()).unwrap();
    std::fs::write(&key, pair.signing_key.serialize_pem()).unwrap();
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(&other_key, other.serialize_pem()).unwrap();
    for f in [&key, &other_key] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let config = |cert: Option<&std::path::Path>, key: Option<&std::path::Path>| {
        let mut text = String::from("[http]\n");
        if let Some(c) = cert {
            text += &format!("tls_cert_file = \"{}\"\n", c.display());
        }
        if let Some(k) = key {
            text += &format!("tls_key_file = \"{}\"\n", k.display());
        }
        parse(&text).map_err(|e| e.lines().join("\n"))
    };
    let ok = config(Some(&cert), Some(&key)).unwrap();
    assert_eq!(ok.http.tls_key_file.as_deref(), Some(key.as_path()));
    assert!(config(None, None).unwrap().http.tls_cert_file.is_none());
    let alone = config(Some(&cert), None).unwrap_err();
    assert!(
        alone.contains("http.tls_cert_file") && alone.contains("both"),
        "{alone}"
    );
    let alone = config(None, Some(&key)).unwrap_err();
    assert!(
        alone.contains("http.tls_key_file") && alone.contains("both"),
        "{alone}"
    );
    let mismatch = config(Some(&cert), Some(&other_key)).unwrap_err();
    assert!(mismatch.contains("does not belong"), "{mismatch}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o604)).unwrap();
    let readable = config(Some(&cert), Some(&key)).unwrap_err();
    assert!(readable.contains("world-readable"), "{readable}");
}
