//! Listing a directory page by page: every request is bounded, a deeper
//! subtree is skipped with one jump of the range start, and every page is
//! read at the revision of the first, so the listing is one snapshot.
//!
//! Pages grow from [`FIRST_PAGE`] to [`MAX_PAGE`] keys: etcd 3.4 walks its
//! index over the whole rest of the range for every limited request (to
//! count it), so each page costs time in proportion to the keys after it,
//! and fewer, larger pages list a big directory several times faster
//! (100 000 documents: about 15 s in pages of 500).

use std::collections::{BTreeMap, HashMap};

use etcd_client::{GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse};

use super::client::Conn;
use super::layout::{Layout, META_DIR, file_info};
use crate::error::Result;
use crate::storage::{FileInfo, join};

/// Keys in the first request: small directories take one small one.
const FIRST_PAGE: i64 = 500;

/// Keys per request at most, doubling from [`FIRST_PAGE`].
const MAX_PAGE: i64 = 4000;

/// Bytes a page should stay under, judged by the pages before it: far
/// below the response limit of the client (64 MiB), and little memory.
const PAGE_BYTES: usize = 8 << 20;

/// Tries of a listing whose snapshot revision was compacted away between
/// two of its pages.
const COMPACTED_TRIES: usize = 3;

/// The first key after every key that starts with `prefix` (etcd's range
/// end of a prefix); empty (no end) when there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

/// One entry of a walk: the direct child's name below the walked prefix,
/// whether the key lies deeper (in the child's subtree), and the key.
pub(super) struct Entry<'k> {
    pub(super) child: &'k str,
    pub(super) deeper: bool,
    pub(super) kv: &'k KeyValue,
}

/// Walks the keys starting with `under` at `revision` (0: now; set to the
/// revision read), page by page. `visit` sees each key but those in a
/// subtree it took: when it answers `true` for a deeper entry, the rest of
/// that child's subtree is skipped. Keys that are no UTF-8 are passed over.
async fn walk(
    conn: &Conn,
    path: &str,
    under: &str,
    revision: &mut i64,
    mut visit: impl FnMut(Entry<'_>) -> bool,
) -> Result<()> {
    let end = prefix_end(under.as_bytes());
    let mut start = if under.is_empty() {
        vec![0]
    } else {
        under.as_bytes().to_vec()
    };
    let mut page_size = FIRST_PAGE;
    loop {
        let mut options = GetOptions::new().with_limit(page_size);
        options = if end.is_empty() {
            options.with_from_key()
        } else {
            options.with_range(end.clone())
        };
        if *revision > 0 {
            options = options.with_revision(*revision);
        }
        let txn = Txn::new().and_then([TxnOp::get(start.clone(), Some(options))]);
        let resp = conn.txn(path, txn, false).await?;
        if *revision == 0 {
            *revision = resp.header().map_or(0, |h| h.revision());
        }
        let Some(TxnOpResponse::Get(page)) = resp.op_responses().into_iter().next() else {
            return Ok(());
        };
        let bytes: usize = page
            .kvs()
            .iter()
            .map(|kv| kv.key().len() + kv.value().len())
            .sum();
        let per_key = bytes / page.kvs().len().max(1);
        let fits = i64::try_from(PAGE_BYTES / per_key.max(1)).unwrap_or(MAX_PAGE);
        page_size = (page_size * 2).min(MAX_PAGE).min(fits.max(10));
        let mut skip_until: Option<Vec<u8>> = None;
        for kv in page.kvs() {
            if skip_until.as_deref().is_some_and(|s| kv.key() < s) {
                continue;
            }
            let Some(rest) = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|k| k.strip_prefix(under))
            else {
                continue;
            };
            let (child, deeper) = match rest.split_once('/') {
                Some((child, _)) => (child, true),
                None => (rest, false),
            };
            if visit(Entry { child, deeper, kv }) && deeper {
                // Past every key of "<under><child>/": '0' follows '/'.
                skip_until = Some(format!("{under}{child}0").into_bytes());
            }
        }
        if !page.more() {
            return Ok(());
        }
        let Some(last) = page.kvs().last() else {
            return Ok(());
        };
        let mut next = last.key().to_vec();
        next.push(0);
        start = match skip_until {
            Some(skip) if skip > next => skip,
            _ => next,
        };
    }
}

/// The entries of directory `path`, sorted: documents with their sizes,
/// modification times and etags, and directories (any document below).
pub(super) async fn list_dir(conn: &Conn, layout: &Layout, path: &str) -> Result<Vec<FileInfo>> {
    let mut tries = 0;
    loop {
        tries += 1;
        match snapshot(conn, layout, path).await {
            Err(e) if tries < COMPACTED_TRIES && compacted(&e) => {
                tracing::debug!(error = %e, path, "etcd: listing compacted away; listing again");
            }
            done => return done,
        }
    }
}

/// True when a page's revision was compacted away.
fn compacted(e: &crate::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(e) = next {
        if e.to_string()
            .contains("required revision has been compacted")
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// One listing at one revision.
async fn snapshot(conn: &Conn, layout: &Layout, path: &str) -> Result<Vec<FileInfo>> {
    let mut revision = 0;
    // The metadata of the direct children (mtimes, write tokens).
    let mut metas: HashMap<String, KeyValue> = HashMap::new();
    walk(conn, path, &layout.meta_under(path), &mut revision, |e| {
        if !e.deeper {
            metas.insert(e.child.to_owned(), e.kv.clone());
        }
        true
    })
    .await?;
    let under = layout.under(path);
    let mut out = BTreeMap::new();
    walk(conn, path, &under, &mut revision, |e| {
        if path.is_empty() && e.child == META_DIR {
            return true;
        }
        // Keys that are no valid path are no entries.
        if layout.path_of(e.kv.key()).is_none() {
            return false;
        }
        let child_path = join(path, e.child);
        if e.deeper {
            out.entry(child_path.clone())
                .or_insert_with(|| FileInfo::dir(child_path));
        } else {
            let info = file_info(child_path.clone(), e.kv, metas.get(e.child));
            out.insert(child_path, info);
        }
        true
    })
    .await?;
    Ok(out.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"a/"), b"a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"");
        assert_eq!(prefix_end(b""), b"");
    }
}
