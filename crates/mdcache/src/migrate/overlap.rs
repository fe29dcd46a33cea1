//! Whether two storage URLs of a server backend name the same place, or
//! one inside the other: a migration between them would copy the target's
//! documents into itself, one level deeper at every run.

use url::Url;

/// Where a URL's documents live: the service (scheme, servers, and what
/// else selects the space, such as a PostgreSQL table or an object store's
/// endpoint) and the path of key prefixes inside it. `None` when the URL
/// does not parse as one (several etcd endpoints, say): then nothing is
/// known.
fn location(url: &str) -> Option<(String, Vec<String>)> {
    let url = Url::parse(url.trim()).ok()?;
    let scheme = match url.scheme() {
        "postgresql" => "postgres",
        "tls" => "nats",
        other => other,
    };
    let host = url.host_str()?.to_ascii_lowercase();
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let param = |name: &str| {
        url.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let mut service = format!("{scheme}://{host}{port}");
    let mut path: Vec<String> = url
        .path_segments()
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    match scheme {
        // A database and a table: no nesting, the same or not.
        "postgres" => {
            service += &format!("/{}?table={}", path.join("/"), param("table"));
            path.clear();
        }
        "s3" | "az" | "gs" => service += &format!("?endpoint={}", param("endpoint")),
        _ => {}
    }
    Some((service, path))
}

/// An error message when `from` and `to` are the same place or one lies
/// inside the other; `None` when they are apart or it cannot be told.
pub(super) fn overlap(from: &str, to: &str) -> Option<String> {
    let (a, b) = (location(from)?, location(to)?);
    if a.0 != b.0 {
        return None;
    }
    let (short, long) = if a.1.len() <= b.1.len() {
        (&a.1, &b.1)
    } else {
        (&b.1, &a.1)
    };
    if !long.starts_with(short) {
        return None;
    }
    let (from, to) = (
        metadatacache::redact_url(from),
        metadatacache::redact_url(to),
    );
    Some(if short.len() == long.len() {
        format!("--from {from} and --to {to} name the same storage; nothing to migrate")
    } else {
        format!(
            "--from {from} and --to {to}: one lies inside the other (a migration would copy \
             the target into itself)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_and_equal_places_are_found() {
        let (inside, same) = (Some("inside"), Some("same storage"));
        let cases = [
            ("etcd://h:2379/app", "etcd://h:2379/app/v2", inside),
            ("etcd://H:2379/app/v2/", "etcd://h:2379/app", inside),
            ("s3://b/p?region=x", "s3://b/p/q", inside),
            ("nats://h:4222/bkt", "nats://h:4222/bkt/sub", inside),
            (
                "az://c?endpoint=http://e",
                "az://c/x?endpoint=http://e",
                inside,
            ),
            ("etcd://h:2379/app", "etcd://h:2379/app/", same),
            (
                "postgres://u@h/db?table=t",
                "postgresql://v@h/db?table=t&pool_size=3",
                same,
            ),
            ("s3://b/a%20b", "s3://b/a b", same),
            ("etcd://h:2379/app", "etcd://h:2379/apps", None),
            ("etcd://h:2379/app", "etcd://g:2379/app/v2", None),
            ("postgres://h/db?table=a", "postgres://h/db?table=b", None),
            (
                "s3://b/p?endpoint=http://one",
                "s3://b/p/q?endpoint=http://two",
                None,
            ),
            ("s3://b/p", "etcd://b/p", None),
            // Several endpoints: not told apart.
            ("etcd://h1:1,h2:2/app", "etcd://h1:1,h2:2/app/v2", None),
        ];
        for (from, to, says) in cases {
            let found = overlap(from, to);
            match says {
                Some(says) => {
                    let e = found.unwrap_or_else(|| panic!("{from} {to}"));
                    assert!(e.contains(says), "{e}");
                }
                None => assert_eq!(found, None, "{from} {to}"),
            }
        }
    }
}
