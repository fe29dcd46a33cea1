//! The SQL statements, with the (validated, quoted) table name spliced in.
//!
//! Prefix ranges use `path COLLATE "C" >= 'dir/' AND path COLLATE "C" < 'dir0'`
//! ('0' is the byte after '/'), which selects exactly the paths under `dir/`
//! without LIKE and its wildcards, and uses the primary key index.

/// Every statement the backend runs, for one table.
#[derive(Debug)]
pub(super) struct Sql {
    /// The schema (idempotent).
    pub(super) create_table: String,
    /// Create-only insert. $1 path, $2 content, $3 etag, $4 mtime or NULL,
    /// $5 parent paths, $6/$7 the range of paths below this one.
    pub(super) insert_new: String,
    /// Compare-and-swap update. $1..$4 as above, $5 if-match etag or NULL
    /// (any), $6 if-none-match etags, $7 if-unmodified-since or NULL.
    pub(super) update_match: String,
    /// Insert, or update when the preconditions hold. $1..$7 as
    /// `insert_new`, $8 if-none-match etags, $9 if-unmodified-since or NULL.
    pub(super) upsert: String,
    /// Why a write changed nothing: current etag and mtime (NULL when absent)
    /// and whether a parent document or a path below is in the way.
    /// $1 path, $2 parents, $3/$4 the range below.
    pub(super) probe: String,
    /// Etag, mtime and — unless the etag is in $2 — the content of $1.
    pub(super) download: String,
    /// Delete $1 when its etag is $2 (or $2 is NULL).
    pub(super) delete: String,
    /// Etag and mtime of $1.
    pub(super) head: String,
    /// Etag, mtime and size of $1 (NULL when absent) and whether anything
    /// lies in the range $2/$3 below it.
    pub(super) stat: String,
    /// Direct children of the root: name, then etag, size and mtime for a
    /// document (NULL for a directory).
    pub(super) list_root: String,
    /// Direct children of a directory: $1/$2 its range, $3 the position
    /// (in characters, 1-based) of the first character after `dir/`.
    pub(super) list_dir: String,
}

impl Sql {
    /// The statements for `table`, which must be a plain identifier.
    pub(super) fn new(table: &str) -> Sql {
        let t = format!("\"{table}\"");
        let blocked = |parents: &str, lo: &str, hi: &str| {
            format!(
                "EXISTS (SELECT 1 FROM {t} o WHERE o.path = ANY({parents}::text[]) \
                 OR (o.path COLLATE \"C\" >= {lo}::text AND o.path COLLATE \"C\" < {hi}::text))"
            )
        };
        let new_row = format!(
            "INSERT INTO {t} AS cur (path, content, etag, mtime) \
             SELECT $1::text, $2::bytea, $3::text, COALESCE($4::timestamptz, now()) \
             WHERE NOT {}",
            blocked("$5", "$6", "$7")
        );
        let children = |rows: &str, rest: &str| {
            format!(
                "SELECT name, \
                        max(etag) FILTER (WHERE NOT deep), \
                        max(size) FILTER (WHERE NOT deep), \
                        max(mtime) FILTER (WHERE NOT deep) \
                 FROM (SELECT split_part(rest, '/', 1) AS name, strpos(rest, '/') > 0 AS deep, \
                              etag, size, mtime \
                       FROM (SELECT {rest} AS rest, etag, \
                                    octet_length(content)::int8 AS size, mtime \
                             FROM {t} {rows}) AS r) AS s \
                 GROUP BY name ORDER BY name COLLATE \"C\""
            )
        };
        Sql {
            create_table: format!(
                "CREATE TABLE IF NOT EXISTS {t} (\
                     path TEXT COLLATE \"C\" PRIMARY KEY, \
                     content BYTEA NOT NULL, \
                     etag TEXT NOT NULL, \
                     mtime TIMESTAMPTZ NOT NULL)"
            ),
            insert_new: format!("{new_row} ON CONFLICT (path) DO NOTHING RETURNING mtime"),
            update_match: format!(
                "UPDATE {t} SET content = $2::bytea, etag = $3::text, \
                     mtime = COALESCE($4::timestamptz, now()) \
                 WHERE path = $1::text AND ($5::text IS NULL OR etag = $5::text) \
                   AND NOT (etag = ANY($6::text[])) \
                   AND ($7::timestamptz IS NULL OR mtime <= $7::timestamptz) \
                 RETURNING mtime"
            ),
            upsert: format!(
                "{new_row} ON CONFLICT (path) DO UPDATE \
                 SET content = EXCLUDED.content, etag = EXCLUDED.etag, mtime = EXCLUDED.mtime \
                 WHERE NOT (cur.etag = ANY($8::text[])) \
                   AND ($9::timestamptz IS NULL OR cur.mtime <= $9::timestamptz) \
                 RETURNING mtime"
            ),
            probe: format!(
                "SELECT c.etag, c.mtime, {} \
                 FROM (SELECT 1) AS one LEFT JOIN {t} c ON c.path = $1::text",
                blocked("$2", "$3", "$4")
            ),
            download: format!(
                "SELECT etag, mtime, \
                        CASE WHEN etag = ANY($2::text[]) OR '*' = ANY($2::text[]) \
                             THEN NULL ELSE content END \
                 FROM {t} WHERE path = $1::text"
            ),
            delete: format!(
                "DELETE FROM {t} WHERE path = $1::text AND ($2::text IS NULL OR etag = $2::text) \
                 RETURNING etag"
            ),
            head: format!("SELECT etag, mtime FROM {t} WHERE path = $1::text"),
            stat: format!(
                "SELECT c.etag, c.mtime, octet_length(c.content)::int8, \
                        EXISTS (SELECT 1 FROM {t} o \
                                WHERE o.path COLLATE \"C\" >= $2::text \
                                  AND o.path COLLATE \"C\" < $3::text) \
                 FROM (SELECT 1) AS one LEFT JOIN {t} c ON c.path = $1::text"
            ),
            list_root: children("", "path"),
            list_dir: children(
                "WHERE path COLLATE \"C\" >= $1::text AND path COLLATE \"C\" < $2::text",
                "substr(path, $3::int4)",
            ),
        }
    }
}

/// The range `[lo, hi)` of the paths strictly below `dir` (which is not the
/// root): `dir/` up to `dir0`.
pub(super) fn below(dir: &str) -> (String, String) {
    (format!("{dir}/"), format!("{dir}0"))
}

/// The proper ancestors of `path`: `a/b/c` → `["a", "a/b"]`.
pub(super) fn ancestors(path: &str) -> Vec<&str> {
    path.match_indices('/').map(|(i, _)| &path[..i]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_ancestors() {
        assert_eq!(below("a/b"), ("a/b/".to_owned(), "a/b0".to_owned()));
        assert_eq!(ancestors("a/b/c.json"), ["a", "a/b"]);
        assert!(ancestors("top").is_empty());
    }
}
