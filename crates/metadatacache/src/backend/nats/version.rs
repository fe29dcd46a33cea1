//! What the messages of a key say: put or delete, revision (the etag),
//! modification time and write token, and the headers a write carries.

use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE;
use async_nats::jetstream::message::StreamMessage;
use bytes::Bytes;

use super::requests::Scanned;
use crate::storage::{DownloadResponse, EntryKind, FileInfo};

/// The KV operation header: absent or `PUT` for a value, `DEL` or `PURGE`
/// for a tombstone (the conventions of every NATS KV client).
const KV_OPERATION: &str = "KV-Operation";
/// The size of the value, in a headers-only delivery.
const MSG_SIZE: &str = "Nats-Msg-Size";
/// The writer's modification time, in nanoseconds since the Unix epoch.
const MTIME: &str = "Mdcache-Mtime";
/// The write token of the write that stored the message.
const WRITE_TOKEN: &str = "Mdcache-Write-Token";

/// One version of a document (or a tombstone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Version {
    /// The message's stream sequence; the etag of a document.
    pub(super) revision: u64,
    /// False for a tombstone: the key was deleted or purged.
    pub(super) live: bool,
    pub(super) mtime: SystemTime,
    pub(super) write_token: Option<String>,
    pub(super) size: u64,
    pub(super) content: Bytes,
}

impl Version {
    /// The version a message of a key stores.
    pub(super) fn of_message(m: StreamMessage) -> Version {
        let published = m.time.unix_timestamp_nanos();
        Version {
            revision: m.sequence,
            live: is_put(&m.headers),
            mtime: mtime_of(&m.headers, published),
            write_token: text(&m.headers, WRITE_TOKEN).map(str::to_owned),
            size: m.payload.len() as u64,
            content: m.payload,
        }
    }

    /// The version a scan saw (no content).
    pub(super) fn of_scanned(s: &Scanned) -> Version {
        Version {
            revision: s.revision,
            live: is_put(&s.headers),
            mtime: mtime_of(&s.headers, s.published),
            write_token: text(&s.headers, WRITE_TOKEN).map(str::to_owned),
            size: text(&s.headers, MSG_SIZE)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
            content: Bytes::new(),
        }
    }

    /// The etag of this version.
    pub(super) fn etag(&self) -> String {
        etag(self.revision)
    }

    /// What a download of it returns.
    pub(super) fn response(self) -> DownloadResponse {
        DownloadResponse {
            etag: self.etag(),
            mtime: self.mtime,
            write_token: self.write_token,
            content: self.content,
        }
    }

    /// What [`Storage::stat`](crate::Storage::stat) reports about it.
    pub(super) fn file_info(&self, path: String) -> FileInfo {
        FileInfo {
            path,
            kind: EntryKind::File,
            size: self.size,
            mtime: Some(self.mtime),
            etag: Some(self.etag()),
        }
    }
}

/// The version of `message`, if it is a document (not a tombstone).
pub(super) fn live(message: Option<StreamMessage>) -> Option<Version> {
    message.map(Version::of_message).filter(|v| v.live)
}

/// True when a message holding `headers` stores a value.
pub(super) fn is_put(headers: &HeaderMap) -> bool {
    !matches!(text(headers, KV_OPERATION), Some("DEL" | "PURGE"))
}

fn text<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).map(|v| v.as_str())
}

/// The writer's time from the header, else when the server stored it (a
/// value written by another tool).
fn mtime_of(headers: &HeaderMap, published_nanos: i128) -> SystemTime {
    let nanos = text(headers, MTIME)
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| u64::try_from(published_nanos).unwrap_or(0));
    SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos)
}

/// The headers of a write of a value: its time and token, and the revision
/// it replaces (0: the key has no message) unless it writes unconditionally.
pub(super) fn put_headers(
    mtime: SystemTime,
    write_token: Option<&str>,
    expected: Option<u64>,
) -> HeaderMap {
    let mut headers = expect(expected);
    let nanos = mtime
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    headers.insert(MTIME, nanos.to_string().as_str());
    if let Some(token) = write_token {
        headers.insert(WRITE_TOKEN, token);
    }
    headers
}

/// The headers of a delete (a `DEL` tombstone) of revision `expected`.
pub(super) fn delete_headers(expected: u64) -> HeaderMap {
    let mut headers = expect(Some(expected));
    headers.insert(KV_OPERATION, "DEL");
    headers
}

fn expect(expected: Option<u64>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(rev) = expected {
        headers.insert(
            NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            rev.to_string().as_str(),
        );
    }
    headers
}

/// The etag of a revision.
pub(super) fn etag(revision: u64) -> String {
    revision.to_string()
}

/// The revision an etag names, if it is one this backend hands out (a
/// positive integer in canonical decimal form).
pub(super) fn revision(etag: &str) -> Option<u64> {
    etag.parse::<u64>()
        .ok()
        .filter(|r| *r > 0 && r.to_string() == etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags() {
        assert_eq!(revision(&etag(42)), Some(42));
        for bad in ["", "0", "-3", "007", "+7", "x", "1.0"] {
            assert_eq!(revision(bad), None, "{bad}");
        }
    }

    #[test]
    fn headers_round_trip() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let h = put_headers(t, Some("tok"), Some(7));
        assert!(is_put(&h));
        assert_eq!(mtime_of(&h, 0), t);
        assert_eq!(text(&h, WRITE_TOKEN), Some("tok"));
        assert_eq!(
            h.get(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE)
                .map(|v| v.as_str()),
            Some("7")
        );
        let d = delete_headers(9);
        assert!(!is_put(&d));
        assert_eq!(
            mtime_of(&d, 5_000),
            SystemTime::UNIX_EPOCH + Duration::from_nanos(5_000)
        );
    }
}
