//! `upload_many`: each request keeps its own preconditions and result.

use super::{expect_kind, p};
use crate::error::ErrorKind;
use crate::storage::{DownloadRequest, Storage, UploadRequest, new_write_token};

/// One `upload_many` call with updates that hold, a stale etag, a missing
/// document, a create, an unconditional write, a bad path and one path
/// twice: each request is answered by its own precondition, in request
/// order, and exactly the writes answered `Ok` are stored, with the etags
/// returned. Runs twice: with and without write tokens.
pub async fn upload_many(s: &dyn Storage, dir: &str) {
    for tokens in [false, true] {
        let at = |name: &str| p(dir, &format!("many-{tokens}-{name}.json"));
        let mut seeded = Vec::new();
        for name in ["a", "b", "c", "twice"] {
            let etag = s
                .simple_upload(&at(name), "0".into())
                .await
                .expect("seed")
                .etag;
            seeded.push(etag);
        }
        let stale = seeded[1].clone();
        s.simple_upload(&at("b"), "moved".into())
            .await
            .expect("move b");
        let cas = |name: &str, etag: &str, body: &str| UploadRequest {
            if_match: Some(etag.to_owned()),
            write_token: tokens.then(new_write_token),
            ..UploadRequest::new(at(name), body.to_owned())
        };
        let reqs = vec![
            cas("a", &seeded[0], "a1"),
            cas("b", &stale, "b1"),
            cas("missing", &seeded[0], "m1"),
            UploadRequest {
                if_none_match: vec!["*".into()],
                ..UploadRequest::new(at("new"), "n1")
            },
            cas("c", &seeded[2], "c1"),
            UploadRequest::new(at("plain"), "p1"),
            cas("twice", &seeded[3], "t1"),
            cas("twice", &seeded[3], "t2"),
            UploadRequest {
                if_match: Some(seeded[0].clone()),
                ..UploadRequest::new(p(dir, "../escape.json"), "x")
            },
        ];
        let res = s.upload_many(reqs).await;
        assert_eq!(res.len(), 9, "upload_many must answer every request");
        let mut res = res.into_iter();
        let mut ok = |name: &str, body: &str, case: &str| {
            let written = res.next().unwrap_or_else(|| panic!("{case}: no result"));
            let written = written.unwrap_or_else(|e| panic!("{case}: {e}"));
            (name.to_owned(), body.to_owned(), written.etag)
        };
        let a = ok("a", "a1", "upload_many: an update that holds");
        let mut next = || res.next().expect("a result per request");
        expect_kind(
            next(),
            &[ErrorKind::PreconditionFailed],
            "upload_many: a stale etag",
        );
        expect_kind(
            next(),
            &[ErrorKind::NotFound, ErrorKind::PreconditionFailed],
            "upload_many: an update of a missing document",
        );
        let mut written = vec![a];
        for (name, body, case) in [
            ("new", "n1", "upload_many: a create"),
            ("c", "c1", "upload_many: an update after refused ones"),
            ("plain", "p1", "upload_many: an unconditional write"),
        ] {
            let r = next().unwrap_or_else(|e| panic!("{case}: {e}"));
            written.push((name.to_owned(), body.to_owned(), r.etag));
        }
        // One path twice over one etag: at most one of the two lands.
        let twice = [next(), next()];
        let landed: Vec<_> = twice.iter().filter(|r| r.is_ok()).collect();
        assert_eq!(landed.len(), 1, "upload_many: one path twice: {twice:?}");
        expect_kind(
            next(),
            &[ErrorKind::InvalidInput],
            "upload_many: a bad path",
        );
        for (name, body, etag) in written {
            let got = s
                .download(DownloadRequest::new(at(&name)))
                .await
                .expect("download a written document");
            assert_eq!(got.content, body.as_bytes(), "upload_many stored {name}");
            assert_eq!(got.etag, etag, "upload_many returned {name}'s etag");
        }
        let b = s.simple_download(&at("b")).await.expect("download b");
        assert_eq!(b, "moved", "a refused request of upload_many was written");
        expect_kind(
            s.download(DownloadRequest::new(at("missing"))).await,
            &[ErrorKind::NotFound],
            "upload_many created a document an update named",
        );
    }
}

/// One `download_many` call: a plain read, a stale and a current
/// `if_none_match`, a missing document (each at a path of its own, so a
/// backend may read them together), `*`, a bad path and one path twice,
/// each answered on its own, in request order.
pub async fn download_many(s: &dyn Storage, dir: &str) {
    let at = |name: &str| p(dir, &format!("read-many-{name}.json"));
    let mut etags = Vec::new();
    for name in ["a", "b", "c", "d", "e"] {
        let v = s.simple_upload(&at(name), name.to_owned().into()).await;
        etags.push(v.expect("seed").etag);
    }
    let stale = etags[1].clone();
    let vb = s
        .simple_upload(&at("b"), "b2".into())
        .await
        .expect("move b");
    let read = |name: &str, inm: &[&str]| DownloadRequest {
        path: at(name),
        if_none_match: inm.iter().map(|e| (*e).to_owned()).collect(),
    };
    let res = s
        .download_many(vec![
            read("a", &[]),
            read("b", &[&stale]),
            read("c", &[&etags[2]]),
            read("missing", &[]),
            read("d", &["*"]),
            DownloadRequest::new(p(dir, "../escape.json")),
            read("e", &[&etags[4]]),
            read("e", &[]),
        ])
        .await;
    assert_eq!(res.len(), 8, "download_many must answer every request");
    let mut res = res.into_iter();
    let mut next = || res.next().expect("a result per request");
    let got = next().expect("download_many: a plain read");
    assert_eq!((got.content.as_ref(), &got.etag), (&b"a"[..], &etags[0]));
    let got = next().expect("download_many: a stale etag in if_none_match");
    assert_eq!((got.content.as_ref(), &got.etag), (&b"b2"[..], &vb.etag));
    expect_kind(
        next(),
        &[ErrorKind::NotModified],
        "download_many: the current etag in if_none_match",
    );
    expect_kind(
        next(),
        &[ErrorKind::NotFound],
        "download_many: a missing document",
    );
    expect_kind(
        next(),
        &[ErrorKind::NotModified],
        "download_many: if_none_match * on a document",
    );
    expect_kind(
        next(),
        &[ErrorKind::InvalidInput],
        "download_many: a bad path",
    );
    expect_kind(
        next(),
        &[ErrorKind::NotModified],
        "download_many: one path twice, the current etag",
    );
    let got = next().expect("download_many: one path twice, a plain read");
    assert_eq!((got.content.as_ref(), &got.etag), (&b"e"[..], &etags[4]));
}
