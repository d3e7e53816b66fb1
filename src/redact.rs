//! Secrets out of everything we show: `mask_url` hides the password of a URL's userinfo
//! and the values of password-like query parameters, for configuration output, logs,
//! error texts and the rows other nodes read (`last_error`).

/// Query parameters whose values are credentials (libpq's `password` and
/// `sslpassword`, MySQL's `password`, and the usual spellings of tokens).
const SECRET_PARAMS: &[&str] = &[
    "password",
    "passwd",
    "pass",
    "pwd",
    "sslpassword",
    "secret",
    "token",
    "auth_token",
    "api_key",
];

const MASK: &str = "***";

fn is_secret_param(name: &str) -> bool {
    SECRET_PARAMS.iter().any(|s| s.eq_ignore_ascii_case(name))
}

/// `url` with its secrets replaced by `***`. Text the URL parser would read differently
/// from what was meant is ambiguous: a `/`, `?` or `#` in a password ends the authority
/// early, so the password would be shown as host and path. When an `@` follows the
/// authority, or the parser refuses the text, only the user name and what follows the
/// last `@` are shown, or nothing past the scheme when even that could be a query
/// value. Text without `://` is returned as it is.
pub(crate) fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if let Some(at) = rest.rfind('@')
        && (at > authority_end || url::Url::parse(url).is_err())
    {
        let (before, after) = (&rest[..at], &rest[at + 1..]);
        if before.contains(['=', '&']) {
            return format!("{scheme}://{MASK}");
        }
        let user = before.split(':').next().unwrap_or_default();
        return format!("{scheme}://{user}:{MASK}@{}", mask_query_text(after));
    }
    let Ok(mut parsed) = url::Url::parse(url) else {
        return mask_query_text(url);
    };
    let has_password = parsed.password().is_some();
    let has_secret_param = parsed.query_pairs().any(|(k, _)| is_secret_param(&k));
    if !has_password && !has_secret_param {
        // Unchanged, not re-serialised: a template's `{image_id}` stays readable.
        return url.to_owned();
    }
    if has_password && parsed.set_password(Some(MASK)).is_err() {
        let user = rest.split(':').next().unwrap_or_default();
        return format!("{scheme}://{user}:{MASK}@…");
    }
    if has_secret_param {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret_param(&k) {
                    MASK.to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
        // An unencoded `#` in a password starts a fragment: a fragment means nothing to a
        // database, so it goes too.
        parsed.set_fragment(None);
    }
    parsed.to_string()
}

/// Masks the secret parameters of the query in `text` (after its first `?`), by text.
fn mask_query_text(text: &str) -> String {
    let Some((head, query)) = text.split_once('?') else {
        return text.to_owned();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let masked: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if is_secret_param(k) => format!("{k}={MASK}"),
            _ => pair.to_owned(),
        })
        .collect();
    let masked = masked.join("&");
    let mut out = format!("{head}?{masked}");
    // As in `mask_url`: after a masked value, a fragment may be the rest of a password.
    if let Some(f) = fragment.filter(|_| masked == query) {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// `mask_url` for a parsed URL (reqwest's errors carry one).
pub(crate) fn mask_parsed_url(url: &url::Url) -> Option<url::Url> {
    let masked = mask_url(url.as_str());
    if masked == url.as_str() {
        return None;
    }
    url::Url::parse(&masked).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn passwords_in_userinfo_and_query_are_masked() {
        for (url, shown) in [
            (
                "postgres://glance:s3cret@db.example:5432/glance",
                "postgres://glance:***@db.example:5432/glance",
            ),
            (
                "postgres://glance@db/glance?password=s3cret&sslmode=require",
                "postgres://glance@db/glance?password=***&sslmode=require",
            ),
            (
                "postgres://db/glance?sslpassword=s3cret",
                "postgres://db/glance?sslpassword=***",
            ),
            (
                "postgres://glance:s3/cr?e#t@db:5432/glance",
                "postgres://glance:***@db:5432/glance",
            ),
            (
                "http://user:s3cret@glance.example:9292",
                "http://user:***@glance.example:9292/",
            ),
            ("sqlite:///var/x.db", "sqlite:///var/x.db"),
            ("mysql://u@h/db", "mysql://u@h/db"),
            (
                "https://images.example/{image_id}",
                "https://images.example/{image_id}",
            ),
            ("not a url", "not a url"),
        ] {
            assert_eq!(mask_url(url), shown, "{url}");
        }
    }

    proptest! {
        #[test]
        fn a_password_never_shows(
            user in "[a-z]{1,8}",
            password in "[!-~]{4,24}",
            host in "[a-z]{1,10}",
        ) {
            // Only passwords that are text of their own (not a substring of the rest).
            prop_assume!(!format!("postgres://{user}:@{host}:5432/db").contains(&password));
            let url = format!("postgres://{user}:{password}@{host}:5432/db");
            let shown = mask_url(&url);
            prop_assert!(!shown.contains(&password), "{} -> {}", url, shown);
            // In a query `&` ends the value, for the drivers as for us.
            let password = password.replace('&', "");
            prop_assume!(password.len() >= 4);
            let query = format!("postgres://{user}@{host}/db?password={password}");
            let shown = mask_url(&query);
            prop_assert!(!shown.contains(&password), "{} -> {}", query, shown);
        }
    }
}
