//! Parsers for the value kinds of the config file: byte sizes ("10GiB" or bytes) and
//! durations ("1d", "10m", "1h30m" or seconds), and their canonical spellings.

use std::time::Duration;

/// Parses a byte size: a non-negative integer (bytes) or a number with a unit. Binary
/// units (KiB, MiB, GiB, TiB, and K, M, G, T as systemd reads them) and decimal units
/// (kB/KB, MB, GB, TB) are accepted.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    if number.is_empty() {
        return Err(format!(
            "invalid size {text:?}: expected bytes or a number with a unit like \"10GiB\""
        ));
    }
    let multiplier: u64 = match unit.trim() {
        "" | "B" | "b" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "invalid size {text:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"
            ));
        }
    };
    if let Ok(whole) = number.parse::<u64>() {
        return whole
            .checked_mul(multiplier)
            .ok_or_else(|| format!("invalid size {text:?}: too large"));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid size {text:?}: {number:?} is not a number"))?;
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("invalid size {text:?}: too large"));
    }
    Ok(bytes.round() as u64)
}

/// Parses a duration: a non-negative integer (seconds) or a sequence of numbers with
/// units, e.g. "1d", "90s", "1h30m", "250ms".
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("invalid duration \"\": expected seconds or a value like \"10m\"".into());
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "invalid duration {text:?}: expected a number at {rest:?}"
            ));
        }
        let (number, after) = rest.split_at(digits);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("invalid duration {text:?}: {number:?} is too large"))?;
        let part = match unit.trim() {
            "ms" => Duration::from_millis(n),
            "s" | "sec" | "secs" => Duration::from_secs(n),
            "m" | "min" | "mins" => n
                .checked_mul(60)
                .map(Duration::from_secs)
                .unwrap_or(Duration::MAX),
            "h" => n
                .checked_mul(3_600)
                .map(Duration::from_secs)
                .unwrap_or(Duration::MAX),
            "d" => n
                .checked_mul(86_400)
                .map(Duration::from_secs)
                .unwrap_or(Duration::MAX),
            "" => {
                return Err(format!(
                    "invalid duration {text:?}: {number} needs a unit (ms, s, m, h or d)"
                ));
            }
            other => {
                return Err(format!(
                    "invalid duration {text:?}: unknown unit {other:?} (use ms, s, m, h or d)"
                ));
            }
        };
        total = total
            .checked_add(part)
            .filter(|d| *d < Duration::MAX)
            .ok_or_else(|| format!("invalid duration {text:?}: too large"))?;
        rest = next;
    }
    Ok(total)
}

/// The shortest exact spelling of a size, e.g. "10GiB" or "1500".
pub(crate) fn format_size(bytes: u64) -> String {
    for (unit, m) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if bytes >= m && bytes.is_multiple_of(m) {
            return format!("{}{unit}", bytes / m);
        }
    }
    bytes.to_string()
}

/// A rounded size for people, e.g. "1.5 GiB" or "512 B".
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The shortest exact spelling of a duration, e.g. "1d", "10m", "1h30m", "250ms".
pub(crate) fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() != 0 {
        return format!("{}ms", d.as_millis());
    }
    let mut secs = d.as_secs();
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, n) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if secs >= n {
            out.push_str(&format!("{}{unit}", secs / n));
            secs %= n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5KiB").unwrap(), 1536);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert_eq!(parse_size("0").unwrap(), 0);
        for bad in ["", "-1", "GiB", "10XB", "99999999999TiB", "1e3"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_size(10 << 30), "10GiB");
        assert_eq!(format_size(1500), "1500");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5_400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            parse_duration("86400").unwrap(),
            Duration::from_secs(86_400)
        );
        for bad in ["", "-5s", "5 parsecs", "m", "1.5h", "10 fortnights"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_duration(Duration::from_secs(5_400)), "1h30m");
        assert_eq!(format_duration(Duration::from_secs(86_400)), "1d");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
    }
}

/// Property tests of value parsing (moved from the integration tests' hostile-input file):
/// no text panics the parsers, and every size and duration survives `format_*` then
/// `parse_*`.
#[cfg(test)]
mod proptests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::image_id::proptests::proptest_config;

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn prop_parse_size_and_duration_never_panic(text in any::<String>()) {
            let _ = parse_size(&text);
            if let Ok(d) = parse_duration(&text) {
                prop_assert!(d < Duration::MAX);
            }
        }

        #[test]
        fn prop_parse_size_on_size_like_strings(
            text in r" ?[0-9.]{0,24} ?(B|b|K|k|KiB|M|MiB|G|GiB|T|TiB|kB|KB|MB|GB|TB|XB|)"
        ) {
            let _ = parse_size(&text);
        }

        #[test]
        fn prop_parse_duration_on_duration_like_strings(
            text in r"( ?[0-9]{0,22}(ms|s|sec|secs|m|min|mins|h|d|y|) ?){0,6}"
        ) {
            if let Ok(d) = parse_duration(&text) {
                prop_assert!(d < Duration::MAX);
            }
        }

        #[test]
        fn prop_sizes_round_trip(
            bytes in prop_oneof![
                any::<u64>(),
                (any::<u64>(), 1u32..=4).prop_map(|(n, k)| (n >> (10 * k)) << (10 * k)),
                (0u64..100_000, 0u32..=4).prop_map(|(n, k)| n << (10 * k)),
            ]
        ) {
            let text = format_size(bytes);
            prop_assert_eq!(parse_size(&text), Ok(bytes), "{}", text);
        }

        #[test]
        fn prop_durations_round_trip(
            d in prop_oneof![
                any::<u64>().prop_map(Duration::from_secs),
                any::<u64>().prop_map(Duration::from_millis),
                (0u64..400 * 86_400).prop_map(Duration::from_secs),
            ]
        ) {
            let text = format_duration(d);
            prop_assert_eq!(parse_duration(&text), Ok(d), "{}", text);
        }
    }
}
