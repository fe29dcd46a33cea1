//! The SQL statements, with the (validated, quoted) table name spliced in.
//!
//! Prefix ranges use `path COLLATE "C" >= 'dir/' AND path COLLATE "C" < 'dir0'`
//! ('0' is the byte after '/'), which selects exactly the paths under `dir/`
//! without LIKE and its wildcards, and uses the primary key index.
//!
//! Whether anything lies in such a range is asked as "is the first path at
//! or after 'dir/' before 'dir0'", and whether a parent is a document as
//! "is there a first one" (`ORDER BY path LIMIT 1` both), not with
//! `EXISTS`: for an `EXISTS` the planner may pick a sequential scan that it
//! expects to stop at an early match, and when there is none (the usual
//! case for these checks) it reads the whole table, on every write, in the
//! plan cached per connection since the table was small. The first-path
//! form is an index lookup in every plan.

/// The limit of a NOTIFY payload, in bytes (exclusive).
pub(super) const MAX_PAYLOAD: usize = 8000;

/// The name of the trigger and of its function; the version changes with
/// the payload format or the rules of notifying.
const TRIGGER: &str = "mdcache_notify_v3";

/// The triggers of earlier versions, replaced by [`TRIGGER`] where the
/// opening role may: version 1 notifies every change; version 2 skips the
/// notification when its transaction's snapshot shows no watcher, which a
/// transaction that is not READ COMMITTED may have taken before a watcher
/// entered.
const OLD_TRIGGERS: [&str; 2] = ["mdcache_notify_v1", "mdcache_notify_v2"];

/// The table of the sessions that listen, one row per channel and session
/// (its backend's pid), in the schema of the tables.
const WATCHERS: &str = "mdcache_watchers";

/// The function a listening session calls to enter itself in [`WATCHERS`]
/// (it may not write that table itself).
pub(super) const REGISTER: &str = "mdcache_watch_v2";

/// The first key of the advisory lock that writers which do not notify
/// hold, shared, until they commit (the second: `hashtext(channel)`); a
/// listening session takes it exclusively once, after entering itself, to
/// wait out the writers that did not see it yet.
pub(super) const GATE: i32 = 0x6d64_6367;

/// Every statement the backend runs, for one table.
#[derive(Debug)]
pub(super) struct Sql {
    /// The schema (idempotent, safe to run from several sessions at once):
    /// the table, and the trigger that reports its changes on `channel`.
    pub(super) schema: String,
    /// The NOTIFY channel of the table.
    pub(super) channel: String,
    /// Create-only insert. $1 path, $2 content, $3 etag, $4 mtime or NULL,
    /// $5 parent paths, $6/$7 the range of paths below this one. One row:
    /// the new mtime when written; when not, NULL and the etag, mtime and
    /// content that the statement saw (NULL when it saw none), and whether
    /// a parent document or a path below is in the way, so that a refusal
    /// needs no second statement to say why.
    pub(super) insert_new: String,
    /// Compare-and-swap update. $1..$4 as above, $5 if-match etag or NULL
    /// (any), $6 if-none-match etags, $7 if-unmodified-since or NULL. One
    /// row: the new mtime when written; when not, NULL and the etag, mtime
    /// and content that the statement saw (no row when it saw none), so
    /// that a refusal needs no second statement to say why.
    pub(super) update_match: String,
    /// Compare-and-swap updates of several documents in one statement,
    /// which first locks their rows in path order, so that two such
    /// statements over the same rows never deadlock. $1 paths, $2 contents, $3 etags, $4 mtimes (NULL: now), $5 if-match
    /// etags. One row per path: its new mtime when written; when not, its
    /// current etag, mtime and content (NULL when absent), as the statement
    /// saw them.
    pub(super) update_many: String,
    /// Insert, or update when the preconditions hold. $1..$7 as
    /// `insert_new`, $8 if-none-match etags, $9 if-unmodified-since or NULL.
    /// One row, as `insert_new` returns it.
    pub(super) upsert: String,
    /// Why a write changed nothing, in the row a refused `insert_new`
    /// returns: NULL, the current etag, mtime and content (NULL when
    /// absent), and whether a parent document or a path below is in the
    /// way. $1 path, $2 parents, $3/$4 the range below.
    pub(super) probe: String,
    /// Etag, mtime and — unless the etag is in $2 — the content of $1.
    pub(super) download: String,
    /// For each of the paths $1: the path, its etag and mtime (NULL when
    /// absent) and — unless the etag is the one in $2 at the same place —
    /// its content.
    pub(super) download_many: String,
    /// Delete $1 when its etag is $2 (or $2 is NULL). One row: true when
    /// deleted; when not, false and the etag the statement saw (no row
    /// when it saw none).
    pub(super) delete: String,
    /// Etag and mtime of $1.
    pub(super) head: String,
    /// Path, etag and mtime of each of the paths $1 that exists.
    pub(super) heads: String,
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
        let occupied = |lo: &str, hi: &str| {
            format!(
                "COALESCE((SELECT o.path FROM {t} o WHERE o.path COLLATE \"C\" >= {lo}::text \
                           ORDER BY o.path COLLATE \"C\" LIMIT 1) COLLATE \"C\" < {hi}::text, \
                          false)"
            )
        };
        let blocked = |parents: &str, lo: &str, hi: &str| {
            format!(
                "((SELECT o.path FROM {t} o WHERE o.path = ANY({parents}::text[]) \
                   ORDER BY o.path COLLATE \"C\" LIMIT 1) IS NOT NULL OR {})",
                occupied(lo, hi)
            )
        };
        // The document at $1 as a refusal reports it (see `probe`).
        let seen = |parents: &str, lo: &str, hi: &str| {
            format!(
                "SELECT NULL::timestamptz, c.etag, c.mtime, c.content, {} \
                 FROM (SELECT 1) AS one LEFT JOIN {t} c ON c.path = $1::text",
                blocked(parents, lo, hi)
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
        let channel = channel(table);
        Sql {
            schema: schema(&t, &channel),
            channel,
            insert_new: format!(
                "WITH i AS ({new_row} ON CONFLICT (path) DO NOTHING RETURNING mtime) \
                 SELECT mtime, NULL::text, NULL::timestamptz, NULL::bytea, false FROM i \
                 UNION ALL {} WHERE NOT EXISTS (SELECT 1 FROM i)",
                seen("$5", "$6", "$7")
            ),
            update_match: format!(
                "WITH u AS (UPDATE {t} SET content = $2::bytea, etag = $3::text, \
                                mtime = COALESCE($4::timestamptz, now()) \
                            WHERE path = $1::text AND ($5::text IS NULL OR etag = $5::text) \
                              AND NOT (etag = ANY($6::text[])) \
                              AND ($7::timestamptz IS NULL OR mtime <= $7::timestamptz) \
                            RETURNING mtime) \
                 SELECT mtime, NULL::text, NULL::timestamptz, NULL::bytea FROM u \
                 UNION ALL \
                 SELECT NULL::timestamptz, c.etag, c.mtime, c.content FROM {t} c \
                 WHERE c.path = $1::text AND NOT EXISTS (SELECT 1 FROM u)"
            ),
            update_many: format!(
                "WITH v AS (SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], \
                                                 $4::timestamptz[], $5::text[]) \
                            AS x(path, content, etag, mtime, if_match)), \
                 l AS (SELECT o.path FROM {t} o WHERE o.path = ANY($1::text[]) \
                       ORDER BY o.path COLLATE \"C\" FOR UPDATE), \
                 u AS (UPDATE {t} d SET content = v.content, etag = v.etag, \
                              mtime = COALESCE(v.mtime, now()) \
                       FROM v, l WHERE l.path = v.path AND d.path = v.path \
                         AND d.etag = v.if_match \
                       RETURNING d.path, d.mtime) \
                 SELECT v.path, u.mtime, c.etag, c.mtime, c.content FROM v \
                 LEFT JOIN u ON u.path = v.path \
                 LEFT JOIN {t} c ON u.path IS NULL AND c.path = v.path"
            ),
            upsert: format!(
                "WITH i AS ({new_row} ON CONFLICT (path) DO UPDATE \
                   SET content = EXCLUDED.content, etag = EXCLUDED.etag, mtime = EXCLUDED.mtime \
                   WHERE NOT (cur.etag = ANY($8::text[])) \
                     AND ($9::timestamptz IS NULL OR cur.mtime <= $9::timestamptz) \
                   RETURNING mtime) \
                 SELECT mtime, NULL::text, NULL::timestamptz, NULL::bytea, false FROM i \
                 UNION ALL {} WHERE NOT EXISTS (SELECT 1 FROM i)",
                seen("$5", "$6", "$7")
            ),
            probe: seen("$2", "$3", "$4"),
            download: format!(
                "SELECT etag, mtime, \
                        CASE WHEN etag = ANY($2::text[]) OR '*' = ANY($2::text[]) \
                             THEN NULL ELSE content END \
                 FROM {t} WHERE path = $1::text"
            ),
            download_many: format!(
                "SELECT v.path, c.etag, c.mtime, \
                        CASE WHEN c.etag = v.inm THEN NULL ELSE c.content END \
                 FROM unnest($1::text[], $2::text[]) AS v(path, inm) \
                 LEFT JOIN {t} c ON c.path = v.path"
            ),
            delete: format!(
                "WITH d AS (DELETE FROM {t} \
                            WHERE path = $1::text AND ($2::text IS NULL OR etag = $2::text) \
                            RETURNING etag) \
                 SELECT true, NULL::text FROM d \
                 UNION ALL \
                 SELECT false, c.etag FROM {t} c \
                 WHERE c.path = $1::text AND NOT EXISTS (SELECT 1 FROM d)"
            ),
            head: format!("SELECT etag, mtime FROM {t} WHERE path = $1::text"),
            heads: format!("SELECT path, etag, mtime FROM {t} WHERE path = ANY($1::text[])"),
            stat: format!(
                "SELECT c.etag, c.mtime, octet_length(c.content)::int8, {} \
                 FROM (SELECT 1) AS one LEFT JOIN {t} c ON c.path = $1::text",
                occupied("$2", "$3")
            ),
            list_root: children("", "path"),
            list_dir: children(
                "WHERE path COLLATE \"C\" >= $1::text AND path COLLATE \"C\" < $2::text",
                "substr(path, $3::int4)",
            ),
        }
    }
}

/// The NOTIFY channel of `table`: `mdcache_<table>`, or, where that would
/// pass PostgreSQL's 63-byte limit on names, the table's first 38 bytes
/// and a hash of the whole name (names are truncated, not refused, and two
/// tables must not share a channel).
pub(super) fn channel(table: &str) -> String {
    let plain = format!("mdcache_{table}");
    if plain.len() <= 63 {
        return plain;
    }
    let hash = xxhash_rust::xxh3::xxh3_64(table.as_bytes());
    // `table` is ASCII (a plain identifier), so any byte is a boundary.
    format!("mdcache_{}_{hash:016x}", &table[..38])
}

/// The schema statements for the quoted table `t`, run in one implicit
/// transaction: an advisory lock serialises the sessions that run them at
/// once (concurrent `CREATE OR REPLACE` of one function or trigger can fail
/// on the catalog), and the table and its trigger are created only when
/// missing, so that a role that may write the table but may not create
/// tables, nor owns it, can still open it.
///
/// The trigger reports the row changes of a transaction at its commit with
/// `pg_notify(channel, payload)` — but only while a session listens on the
/// channel (a writer whose transaction is not READ COMMITTED always
/// notifies: its snapshot, which the lookup of watchers reads, may be older
/// than the entry of a watcher that is already in sync). PostgreSQL serialises the commits of all transactions that
/// notified, database-wide, up to their WAL flush, so a notification that
/// nobody reads is not free: writers that notify cannot share a flush.
/// Listening sessions enter themselves in [`WATCHERS`] (dead sessions'
/// rows are cleared by the next one to enter), and a writer that finds none
/// for its channel does not notify. Such a writer holds the [`GATE`] lock,
/// shared, from before it looked until it commits; a session that entered
/// takes the lock exclusively once before it reports being in sync, so a
/// write it could miss has committed by then, and any later one sees the
/// row. Both functions run as their owner (`SECURITY DEFINER`, with the
/// schema's path pinned), so writers and watchers need no rights on
/// [`WATCHERS`].
///
/// The payload is JSON: `{"path": …, "etag": …}` for an insert or update,
/// `{"path": …}` for a delete (and for a write whose etag does not fit),
/// `{"reset": why}` for a `TRUNCATE` (always sent) or a path too long for
/// NOTIFY's limit, which the listener turns into a gap.
///
/// A table with the trigger of an earlier version moves to this one when
/// the opening role may change it; a role that may not keeps the old one
/// (version 1 notifies every change: right, only slower; version 2 misses
/// the writes of transactions that are not READ COMMITTED and began before
/// a watch entered).
fn schema(t: &str, channel: &str) -> String {
    let table_literal = t.replace('\'', "''");
    let has_trigger = |name: &str| {
        format!(
            "EXISTS (SELECT 1 FROM pg_catalog.pg_trigger \
                     WHERE tgrelid = '{table_literal}'::regclass AND tgname = '{name}')"
        )
    };
    let current = has_trigger(TRIGGER);
    let old = OLD_TRIGGERS.map(has_trigger).join(" OR ");
    let drop_old: String = OLD_TRIGGERS
        .iter()
        .map(|name| {
            format!("DROP TRIGGER IF EXISTS {name} ON {t}; DROP TRIGGER IF EXISTS {name}_truncate ON {t}; ")
        })
        .collect();
    // Sends `msg` as `set_msg` sets it, or a reset where that is too long
    // for a notification.
    let notify = |set_msg: &str| {
        format!(
            "{set_msg} \
             IF octet_length(msg) >= {MAX_PAYLOAD} THEN \
               msg := '{{\"reset\": \"path too long for a notification\"}}'; \
             END IF; \
             PERFORM pg_notify(TG_ARGV[0], msg);"
        )
    };
    let notify_old = notify("msg := json_build_object('path', OLD.path)::text;");
    // Without the etag where the two do not fit together.
    let notify_new = notify(&format!(
        "msg := json_build_object('path', NEW.path, 'etag', NEW.etag)::text; \
         IF octet_length(msg) >= {MAX_PAYLOAD} THEN \
           msg := json_build_object('path', NEW.path)::text; \
         END IF;"
    ));
    format!(
        "SELECT pg_advisory_xact_lock(hashtext('metadatacache schema')); \
         DO $mdcache$ BEGIN \
         IF to_regclass('{table_literal}') IS NULL THEN \
         CREATE TABLE IF NOT EXISTS {t} (\
             path TEXT COLLATE \"C\" PRIMARY KEY, \
             content BYTEA NOT NULL, \
             etag TEXT NOT NULL, \
             mtime TIMESTAMPTZ NOT NULL); \
         END IF; \
         IF NOT {current} THEN \
         BEGIN \
         PERFORM set_config('search_path', \
           format('%I, pg_catalog, pg_temp', current_schema()), true); \
         CREATE TABLE IF NOT EXISTS {WATCHERS} (\
             channel TEXT COLLATE \"C\" NOT NULL, \
             pid INT NOT NULL, \
             PRIMARY KEY (channel, pid)); \
         CREATE OR REPLACE FUNCTION {REGISTER}(ch TEXT) RETURNS void LANGUAGE sql \
           SECURITY DEFINER SET search_path FROM CURRENT AS $body$ \
           DELETE FROM {WATCHERS} w \
             WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = w.pid); \
           INSERT INTO {WATCHERS} (channel, pid) VALUES (ch, pg_backend_pid()) \
             ON CONFLICT DO NOTHING; \
         $body$; \
         CREATE OR REPLACE FUNCTION {TRIGGER}() RETURNS trigger LANGUAGE plpgsql \
           SECURITY DEFINER SET search_path FROM CURRENT AS $body$ \
         DECLARE msg text; \
         BEGIN \
           IF TG_OP = 'TRUNCATE' THEN \
             PERFORM pg_notify(TG_ARGV[0], '{{\"reset\": \"truncate\"}}'); \
             RETURN NULL; \
           END IF; \
           PERFORM pg_advisory_xact_lock_shared({GATE}, hashtext(TG_ARGV[0])); \
           IF current_setting('transaction_isolation') = 'read committed' \
              AND NOT EXISTS (SELECT 1 FROM {WATCHERS} WHERE channel = TG_ARGV[0]) THEN \
             RETURN NULL; \
           END IF; \
           IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND OLD.path IS DISTINCT FROM NEW.path) THEN \
             {notify_old} \
           END IF; \
           IF TG_OP <> 'DELETE' THEN \
             {notify_new} \
           END IF; \
           RETURN NULL; \
         END $body$; \
         CREATE OR REPLACE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON {t} \
           FOR EACH ROW EXECUTE FUNCTION {TRIGGER}('{channel}'); \
         CREATE OR REPLACE TRIGGER {TRIGGER}_truncate AFTER TRUNCATE ON {t} \
           FOR EACH STATEMENT EXECUTE FUNCTION {TRIGGER}('{channel}'); \
         {drop_old}\
         EXCEPTION WHEN insufficient_privilege THEN \
           IF NOT ({old}) THEN RAISE; END IF; \
         END; \
         END IF; \
         END $mdcache$"
    )
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

    #[test]
    fn channels_fit_and_differ() {
        assert_eq!(channel("docs"), "mdcache_docs");
        let long_a = format!("{}a", "t".repeat(62));
        let long_b = format!("{}b", "t".repeat(62));
        for table in [&"t".repeat(55), &"t".repeat(56), &long_a] {
            assert!(channel(table).len() <= 63, "{table}");
        }
        assert_ne!(channel(&long_a), channel(&long_b));
    }
}
