//! Behaviour of `Store` as a user sees it, over the memory backend.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use metadatacache::testing::FaultyStorage;
use metadatacache::{
    DownloadRequest, Error, ErrorKind, MemoryStorage, Options, RetryPolicy, Storage, Store,
    UploadRequest,
};

type Doc = BTreeMap<String, u64>;

fn path(user: &String) -> String {
    format!("users/{user}.json")
}

fn store_on(storage: Arc<dyn Storage>) -> Store<String, Doc> {
    Store::new(
        Options::new(storage, path)
            .init(Doc::new)
            .retry_policy(RetryPolicy::immediate()),
    )
}

fn memory() -> Arc<dyn Storage> {
    Arc::new(MemoryStorage::new())
}

async fn stored(storage: &dyn Storage, user: &str) -> Option<Doc> {
    match storage.simple_download(&format!("users/{user}.json")).await {
        Ok(bytes) => Some(serde_json::from_slice(&bytes).expect("stored JSON")),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => panic!("download: {e}"),
    }
}

fn insert(k: &str, v: u64) -> impl FnMut(Doc) -> Result<(Doc, bool), Error> + Send {
    move |mut d| {
        d.insert(k.to_owned(), v);
        Ok((d, true))
    }
}

#[tokio::test]
async fn update_creates_with_init() {
    let storage = memory();
    let store = store_on(Arc::clone(&storage));
    store
        .update("alice".into(), true, insert("a", 1))
        .await
        .unwrap();
    assert_eq!(
        stored(storage.as_ref(), "alice").await,
        Some(Doc::from([("a".into(), 1)]))
    );
    assert_eq!(store.get("alice".into()).await.unwrap().unwrap()["a"], 1);
}

#[tokio::test]
async fn update_without_create_is_not_found() {
    let storage = memory();
    let store = store_on(Arc::clone(&storage));
    let err = store
        .update("bob".into(), false, insert("a", 1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("bob"), "{err}");
    assert_eq!(stored(storage.as_ref(), "bob").await, None);
}

#[tokio::test]
async fn create_without_init_is_invalid_input() {
    let store: Store<String, Doc> = Store::new(Options::new(memory(), path));
    let err = store
        .update("c".into(), true, insert("a", 1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("init"), "{err}");
}

#[tokio::test]
async fn skipped_persist_writes_nothing() {
    let storage = memory();
    let store = store_on(Arc::clone(&storage));
    store
        .update("u".into(), true, insert("a", 1))
        .await
        .unwrap();
    let before = store.stats().uploads;
    let mut seen = None;
    store
        .update("u".into(), false, |mut d| {
            seen = d.get("a").copied();
            d.insert("b".into(), 2);
            Ok((d, false))
        })
        .await
        .unwrap();
    assert_eq!(seen, Some(1), "f borrowed a local and saw the value");
    assert_eq!(store.stats().uploads, before);
    assert_eq!(
        stored(storage.as_ref(), "u").await,
        Some(Doc::from([("a".into(), 1)]))
    );
    // And the change f made to its copy never reached the cache.
    assert_eq!(
        *store.get("u".into()).await.unwrap().unwrap(),
        Doc::from([("a".into(), 1)])
    );
}

#[tokio::test]
async fn second_store_reads_what_first_wrote() {
    let storage = memory();
    let a = store_on(Arc::clone(&storage));
    let b = store_on(Arc::clone(&storage));
    a.update("x".into(), true, insert("k", 7)).await.unwrap();
    assert_eq!(b.get("x".into()).await.unwrap().unwrap()["k"], 7);
    // And a change through b is seen by a, which had it cached.
    b.update("x".into(), false, insert("k", 8)).await.unwrap();
    assert_eq!(a.get("x".into()).await.unwrap().unwrap()["k"], 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_updates_keep_twenty_entries() {
    let storage = memory();
    let store = store_on(Arc::clone(&storage));
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .update("hot".into(), true, insert(&format!("e{i}"), i))
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let doc = stored(storage.as_ref(), "hot").await.unwrap();
    assert_eq!(doc.len(), 20);
    assert_eq!(store.get("hot".into()).await.unwrap().unwrap().len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_keys_do_not_wait_for_each_other() {
    let store = store_on(memory());
    let held = store.lock("a".into()).await;
    // With a's lock held, b's update completes (it would hang if keys shared
    // a lock; the timeout turns that into a failure).
    tokio::time::timeout(
        Duration::from_secs(10),
        store.update("b".into(), true, insert("x", 1)),
    )
    .await
    .expect("update of b waited for a's lock")
    .unwrap();
    // While a's update does wait.
    let pending = tokio::spawn({
        let store = store.clone();
        async move { store.update("a".into(), true, insert("x", 1)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!pending.is_finished(), "update of a ran while a was locked");
    drop(held);
    pending.await.unwrap().unwrap();
}

#[tokio::test]
async fn failing_f_leaves_cache_equal_to_storage() {
    let storage = memory();
    let store = store_on(Arc::clone(&storage));
    store
        .update("u".into(), true, insert("a", 1))
        .await
        .unwrap();
    let err = store
        .update("u".into(), false, |mut d| {
            d.insert("poison".into(), 666);
            Err(Error::invalid_input("quota exceeded"))
        })
        .await
        .unwrap_err();
    // The error comes back unchanged.
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert_eq!(err.to_string(), "quota exceeded");
    let mut g = store.lock("u".into()).await;
    assert_eq!(
        g.get().await.unwrap().as_deref(),
        stored(storage.as_ref(), "u").await.as_ref()
    );
    assert_eq!(store.stats().uploads, 1);
}

#[tokio::test]
async fn failed_upload_leaves_cache_equal_to_storage() {
    let inner = memory();
    // Every upload fails with a conflict, without reaching storage.
    let faulty: Arc<dyn Storage> =
        Arc::new(FaultyStorage::new(Arc::clone(&inner), 1).conflicts(1.0));
    let writer = store_on(Arc::clone(&inner));
    writer
        .update("u".into(), true, insert("a", 1))
        .await
        .unwrap();
    let store: Store<String, Doc> = Store::new(
        Options::new(faulty, path)
            .retries(3)
            .retry_policy(RetryPolicy::immediate()),
    );
    let mut runs = 0;
    let err = store
        .update("u".into(), false, |d| {
            runs += 1;
            insert("a", 2)(d)
        })
        .await
        .unwrap_err();
    assert_eq!(runs, 3, "f runs once per attempt");
    assert!(err.is_conflict());
    let text = err.to_string();
    assert!(
        text.contains("key u") && text.contains("3 attempts"),
        "{text}"
    );
    let s = store.stats();
    assert_eq!((s.conflicts, s.retries, s.give_ups), (3, 2, 1));
    assert_eq!(
        store.get("u".into()).await.unwrap().as_deref(),
        stored(inner.as_ref(), "u").await.as_ref()
    );
}

#[tokio::test]
async fn ambiguous_upload_is_unavailable_and_cache_catches_up() {
    // Disk keeps no write tokens: a lost reply cannot be resolved.
    let dir = tempfile::tempdir().unwrap();
    let inner: Arc<dyn Storage> = Arc::new(metadatacache::DiskStorage::open(dir.path()).unwrap());
    let faulty: Arc<dyn Storage> =
        Arc::new(FaultyStorage::new(Arc::clone(&inner), 1).ambiguous(1.0));
    let store: Store<String, Doc> = Store::new(Options::new(faulty, path).init(Doc::new));
    let err = store
        .update("u".into(), true, insert("a", 1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    // The write landed; the next read sees exactly what storage has.
    let stored_doc = stored(inner.as_ref(), "u").await;
    assert_eq!(stored_doc, Some(Doc::from([("a".into(), 1)])));
    assert_eq!(
        store.get("u".into()).await.unwrap().as_deref(),
        stored_doc.as_ref()
    );

    // Memory keeps them: the same lost reply is resolved into Ok.
    let inner = memory();
    let faulty: Arc<dyn Storage> =
        Arc::new(FaultyStorage::new(Arc::clone(&inner), 1).ambiguous(1.0));
    let store: Store<String, Doc> = Store::new(Options::new(faulty, path).init(Doc::new));
    store
        .update("u".into(), true, insert("a", 1))
        .await
        .unwrap();
    let stored_doc = stored(inner.as_ref(), "u").await;
    assert_eq!(stored_doc, Some(Doc::from([("a".into(), 1)])));
    assert_eq!(
        store.stats().downloads,
        0,
        "resolved from the token, then cached"
    );
}

#[tokio::test]
async fn exhausted_retries_name_the_key() {
    let inner = memory();
    let faulty: Arc<dyn Storage> = Arc::new(FaultyStorage::new(inner, 7).conflicts(1.0));
    let store: Store<String, Doc> = Store::new(
        Options::new(faulty, path)
            .init(Doc::new)
            .retries(5)
            .retry_policy(RetryPolicy::immediate()),
    );
    let err = store
        .update("carol".into(), true, insert("a", 1))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("carol"), "{text}");
    assert!(text.contains("5 attempts"), "{text}");
    assert!(
        text.contains("spurious conflict"),
        "names the last conflict: {text}"
    );
    assert_eq!(store.stats().give_ups, 1);
}

#[tokio::test]
async fn retry_deadline_gives_up_early() {
    let faulty: Arc<dyn Storage> = Arc::new(FaultyStorage::new(memory(), 7).conflicts(1.0));
    let store: Store<String, Doc> = Store::new(
        Options::new(faulty, path)
            .init(Doc::new)
            .retries(1_000_000)
            .retry_policy(
                RetryPolicy::default()
                    .initial_delay(Duration::from_millis(1))
                    .max_delay(Duration::from_millis(2))
                    .deadline(Some(Duration::from_millis(50))),
            ),
    );
    let err = store
        .update("d".into(), true, insert("a", 1))
        .await
        .unwrap_err();
    assert!(err.is_conflict());
    let s = store.stats();
    assert_eq!(s.give_ups, 1);
    assert!(
        s.conflicts < 1000,
        "gave up at the deadline, not after 10^6 attempts"
    );
}

#[tokio::test]
async fn lock_table_empties_after_many_keys() {
    let store = store_on(memory());
    for i in 0..10_000 {
        store
            .update(format!("k{i}"), true, insert("a", i))
            .await
            .unwrap();
    }
    assert_eq!(store.locked_keys(), 0);
    assert_eq!(store.cached_keys(), 10_000);
}

#[tokio::test]
async fn removal_on_one_replica_is_seen_by_the_other() {
    let storage = memory();
    let a = store_on(Arc::clone(&storage));
    let b = store_on(Arc::clone(&storage));
    a.update("u".into(), true, insert("pw1", 1)).await.unwrap();
    assert!(a.get("u".into()).await.unwrap().is_some());
    assert!(b.remove("u".into()).await.unwrap());
    // A's next read-only update sees the removal.
    let err = a
        .update("u".into(), false, |d| Ok((d, false)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    // And a write without create does not resurrect it.
    let err = a
        .update("u".into(), false, insert("x", 1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(stored(storage.as_ref(), "u").await, None);
    assert!(!a.remove("u".into()).await.unwrap(), "already gone");
}

#[tokio::test]
async fn entry_removed_elsewhere_is_dropped_from_cache() {
    let storage = memory();
    let a = store_on(Arc::clone(&storage));
    a.update("u".into(), true, insert("pw1", 1)).await.unwrap();
    storage.delete("users/u.json").await.unwrap();
    let mut g = a.lock("u".into()).await;
    assert!(g.is_cached());
    g.sync().await.unwrap();
    assert!(!g.is_cached());
    assert_eq!(g.get().await.unwrap(), None);
}

/// A value set on the guard of a key storage does not hold yet survives a
/// sync (the key is still absent, not deleted elsewhere) and is created by
/// persist, as the guard's documented sequence get, set, sync, persist does.
#[tokio::test]
async fn a_value_set_for_a_new_key_survives_a_sync() {
    let storage = memory();
    let store = store_on(Arc::clone(&storage));
    let mut g = store.lock("new".into()).await;
    assert_eq!(g.get().await.unwrap(), None);
    g.set(Doc::from([("a".into(), 7)]));
    g.sync().await.unwrap();
    assert!(g.is_cached(), "the set value was dropped by a sync");
    assert_eq!(g.get().await.unwrap().unwrap()["a"], 7);
    g.persist().await.unwrap();
    drop(g);
    assert_eq!(
        stored(storage.as_ref(), "new").await,
        Some(Doc::from([("a".into(), 7)]))
    );
}

/// A stored document that no longer decodes can still be removed.
#[tokio::test]
async fn remove_deletes_a_document_that_does_not_decode() {
    let storage = memory();
    let store = store_on(Arc::clone(&storage));
    storage
        .simple_upload("users/bad.json", "not json".into())
        .await
        .unwrap();
    let e = store.get("bad".into()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Codec, "{e}");
    assert!(store.remove("bad".into()).await.unwrap());
    assert_eq!(stored(storage.as_ref(), "bad").await, None);
    assert!(!store.remove("bad".into()).await.unwrap(), "already gone");
}

#[tokio::test]
async fn remove_retries_past_a_concurrent_change() {
    let inner = memory();
    let store = store_on(Arc::clone(&inner));
    store
        .update("u".into(), true, insert("a", 1))
        .await
        .unwrap();
    // A write from elsewhere changes the etag the store has cached.
    let other = store_on(Arc::clone(&inner));
    other
        .update("u".into(), false, insert("a", 2))
        .await
        .unwrap();
    let mut g = store.lock("u".into()).await;
    g.persist().await.expect_err("stale etag conflicts");
    drop(g);
    assert!(store.remove("u".into()).await.unwrap());
    assert_eq!(stored(inner.as_ref(), "u").await, None);
    assert_eq!(store.cached_keys(), 0);
}

#[tokio::test]
async fn guard_set_is_invisible_until_persisted() {
    let storage = memory();
    let store = store_on(Arc::clone(&storage));
    store
        .update("u".into(), true, insert("a", 1))
        .await
        .unwrap();
    {
        let mut g = store.lock("u".into()).await;
        g.set(Doc::from([("a".into(), 99)]));
        assert_eq!(
            g.get().await.unwrap().unwrap()["a"],
            99,
            "the guard sees its own set"
        );
        // Dropped without persist.
    }
    assert_eq!(store.get("u".into()).await.unwrap().unwrap()["a"], 1);
    let mut g = store.lock("u".into()).await;
    g.set(Doc::from([("a".into(), 5)]));
    g.persist().await.unwrap();
    drop(g);
    assert_eq!(stored(storage.as_ref(), "u").await.unwrap()["a"], 5);
    assert_eq!(store.stats().uploads, 2);
}

/// A value set on a guard was meant for the version it was set on: when a
/// sync finds the document deleted elsewhere, the value is dropped, and
/// persisting then has nothing to write (it never re-creates the
/// document from a stale intention).
#[tokio::test]
async fn a_set_value_is_dropped_when_the_document_was_deleted_elsewhere() {
    let storage = memory();
    let a = store_on(Arc::clone(&storage));
    let b = store_on(Arc::clone(&storage));
    a.update("u".into(), true, insert("a", 1)).await.unwrap();
    let mut g = a.lock("u".into()).await;
    assert!(g.get().await.unwrap().is_some());
    g.set(Doc::from([("a".into(), 2)]));
    assert!(b.remove("u".into()).await.unwrap());
    g.sync().await.unwrap();
    assert!(!g.is_cached(), "nothing cached or set after the delete");
    assert_eq!(g.get().await.unwrap(), None);
    assert_eq!(g.persist().await.unwrap_err().kind(), ErrorKind::NotFound);
    drop(g);
    assert_eq!(stored(storage.as_ref(), "u").await, None);
}

/// Clearing the cache while a guard holds a key does not pull the entry
/// from under the guard: its compare-and-swap still names the version it
/// read. Idle keys are dropped; the held one is revalidated on its next
/// read, even where a stale read would be allowed.
#[tokio::test]
async fn clearing_the_cache_leaves_held_keys_to_their_guards() {
    let storage = memory();
    let store: Store<String, Doc> = Store::new(
        Options::new(Arc::clone(&storage), path)
            .init(Doc::new)
            .max_staleness(Duration::from_secs(3600)),
    );
    store
        .update("u".into(), true, insert("a", 1))
        .await
        .unwrap();
    store
        .update("idle".into(), true, insert("a", 1))
        .await
        .unwrap();
    let mut g = store.lock("u".into()).await;
    assert!(g.get().await.unwrap().is_some());
    store.clear_cache();
    assert_eq!(store.cached_keys(), 1, "only the held key stays cached");
    g.set(Doc::from([("a".into(), 2)]));
    g.persist().await.unwrap();
    let round_trips = |s: &Store<String, Doc>| s.stats().not_modified + s.stats().downloads;
    let before = round_trips(&store);
    store.clear_cache();
    drop(g);
    store.get("u".into()).await.unwrap();
    assert_eq!(
        round_trips(&store),
        before + 1,
        "the held entry was revalidated"
    );
    store.get("u".into()).await.unwrap();
    assert_eq!(
        round_trips(&store),
        before + 1,
        "then stale reads are allowed again"
    );
    assert_eq!(stored(storage.as_ref(), "u").await.unwrap()["a"], 2);
}

#[tokio::test]
async fn persist_with_nothing_is_not_found() {
    let store = store_on(memory());
    let mut g = store.lock("none".into()).await;
    assert!(!g.is_cached());
    assert_eq!(g.persist().await.unwrap_err().kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn persist_creates_parent_directory() {
    let storage = memory();
    let store = store_on(Arc::clone(&storage));
    let mut g = store.lock("p".into()).await;
    g.set(Doc::new());
    g.persist().await.unwrap();
    assert!(storage.stat("users").await.unwrap().is_dir());
}

#[tokio::test]
async fn unchanged_reads_do_not_transfer_or_decode() {
    let storage = memory();
    let store = store_on(Arc::clone(&storage));
    store
        .update("u".into(), true, insert("a", 1))
        .await
        .unwrap();
    for _ in 0..10 {
        store.get("u".into()).await.unwrap();
    }
    let s = store.stats();
    assert_eq!(s.downloads, 0, "the cache was filled by the write");
    assert_eq!(s.not_modified, 10);
}

#[tokio::test]
async fn max_staleness_skips_round_trips() {
    let storage = memory();
    let store: Store<String, Doc> = Store::new(
        Options::new(Arc::clone(&storage), path)
            .init(Doc::new)
            .max_staleness(Duration::from_secs(3600)),
    );
    store
        .update("u".into(), true, insert("a", 1))
        .await
        .unwrap();
    for _ in 0..10 {
        store.get("u".into()).await.unwrap();
    }
    let s = store.stats();
    assert_eq!((s.hits, s.not_modified, s.downloads), (10, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_readers_share_one_revalidation() {
    let inner = memory();
    let slow: Arc<dyn Storage> =
        Arc::new(FaultyStorage::new(Arc::clone(&inner), 3).latency(Duration::from_millis(20)));
    let store = store_on(slow);
    store
        .update("u".into(), true, insert("a", 1))
        .await
        .unwrap();
    let held = store.lock("u".into()).await;
    let readers: Vec<_> = (0..10)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.get("u".into()).await })
        })
        .collect();
    // Wait until every reader has started and queued on the lock.
    while store.lock_users(&"u".to_owned()) < 11 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let before = store.stats();
    drop(held);
    for r in readers {
        assert_eq!(r.await.unwrap().unwrap().unwrap()["a"], 1);
    }
    let after = store.stats();
    let round_trips =
        (after.not_modified + after.downloads) - (before.not_modified + before.downloads);
    assert_eq!(
        round_trips, 1,
        "10 queued readers, one conditional download"
    );
    assert_eq!(after.hits - before.hits, 9);
}

#[tokio::test]
async fn reader_never_gets_data_older_than_its_call() {
    let storage = memory();
    let a = store_on(Arc::clone(&storage));
    let b = store_on(Arc::clone(&storage));
    a.update("u".into(), true, insert("v", 1)).await.unwrap();
    a.get("u".into()).await.unwrap();
    b.update("u".into(), false, insert("v", 2)).await.unwrap();
    // a's cached copy was validated before this call: it must revalidate.
    assert_eq!(a.get("u".into()).await.unwrap().unwrap()["v"], 2);
}

#[tokio::test]
async fn undecodable_document_is_a_codec_error_naming_the_path() {
    let storage = memory();
    let store = store_on(Arc::clone(&storage));
    store
        .update("u".into(), true, insert("a", 1))
        .await
        .unwrap();
    storage
        .simple_upload("users/u.json", "{not json".into())
        .await
        .unwrap();
    let err = store.get("u".into()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Codec);
    assert!(err.to_string().contains("users/u.json"), "{err}");
    let err = store
        .update("u".into(), false, insert("a", 2))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Codec);
    // Nothing was overwritten.
    assert_eq!(
        storage.simple_download("users/u.json").await.unwrap(),
        "{not json"
    );
}

#[tokio::test]
async fn corrupt_documents_keep_the_last_good_value_until_reset() {
    let storage = memory();
    let store = store_on(Arc::clone(&storage));
    store
        .update("u".into(), true, insert("a", 1))
        .await
        .unwrap();
    for garbage in ["", "{\"a\": 1", "\u{0}\u{1}binary", "[1, 2, 3]"] {
        storage
            .simple_upload("users/u.json", garbage.as_bytes().to_vec().into())
            .await
            .unwrap();
        let mut g = store.lock("u".into()).await;
        let err = g.get().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Codec, "{garbage:?}");
        assert!(err.to_string().contains("users/u.json"), "{err}");
        // The cache keeps its last good value.
        assert!(g.is_cached());
        drop(g);
        let err = store
            .update("u".into(), true, insert("b", 2))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Codec);
        assert_eq!(
            storage.simple_download("users/u.json").await.unwrap(),
            garbage.as_bytes(),
            "update never overwrites an undecodable document"
        );
    }
    // Only an explicit reset does.
    store
        .reset("u".into(), Doc::from([("fresh".into(), 1)]))
        .await
        .unwrap();
    assert_eq!(stored(storage.as_ref(), "u").await.unwrap()["fresh"], 1);
    store
        .update("u".into(), false, insert("b", 2))
        .await
        .unwrap();
    assert_eq!(stored(storage.as_ref(), "u").await.unwrap().len(), 2);
    // Reset also creates.
    store.reset("new".into(), Doc::new()).await.unwrap();
    assert_eq!(stored(storage.as_ref(), "new").await, Some(Doc::new()));
}

#[tokio::test]
async fn raw_cas_helpers_match_store_view() {
    // A document written through the raw API is what the store reads.
    let storage = memory();
    let resp = storage
        .upload(UploadRequest {
            if_none_match: vec!["*".into()],
            ..UploadRequest::new("users/r.json", r#"{"z":3}"#)
        })
        .await
        .unwrap();
    let store = store_on(Arc::clone(&storage));
    assert_eq!(store.get("r".into()).await.unwrap().unwrap()["z"], 3);
    let again = storage
        .download(DownloadRequest::if_none_match("users/r.json", resp.etag))
        .await
        .unwrap_err();
    assert_eq!(again.kind(), ErrorKind::NotModified);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_many_tasks_lose_nothing() {
    let storage = memory();
    let mut tasks = Vec::new();
    let mut stores = Vec::new();
    for r in 0..2 {
        // The default policy: jittered exponential backoff between attempts.
        let store: Store<String, Doc> =
            Store::new(Options::new(Arc::clone(&storage), path).init(Doc::new));
        stores.push(store.clone());
        for t in 0..4 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50 {
                    store
                        .update("c".into(), true, insert(&format!("{r}-{t}-{i}"), 1))
                        .await
                        .unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let doc = stored(storage.as_ref(), "c").await.unwrap();
    assert_eq!(doc.len(), 400);
    let keys: HashSet<_> = doc.keys().collect();
    assert_eq!(keys.len(), 400);
    for store in &stores {
        assert_eq!(store.stats().give_ups, 0);
    }
}

#[tokio::test]
async fn debug_output_never_shows_document_content() {
    let store = store_on(memory());
    store
        .update("u".into(), true, insert("hunter2-secret", 1))
        .await
        .unwrap();
    let g = store.lock("u".into()).await;
    for text in [
        format!("{store:?}"),
        format!("{g:?}"),
        format!("{:?}", store.stats()),
    ] {
        assert!(!text.contains("hunter2"), "{text}");
    }
}

#[tokio::test]
async fn a_million_keys_stay_within_capacity() {
    let store: Store<u32, u32> = Store::new(
        Options::new(memory(), |k: &u32| format!("k/{k}"))
            .init(|| 0)
            .capacity(1000),
    );
    for k in 0..1_000_000u32 {
        store.update(k, true, |n| Ok((n + 1, true))).await.unwrap();
    }
    assert_eq!(store.locked_keys(), 0);
    assert!(
        store.cached_keys() <= 1000,
        "{} cached",
        store.cached_keys()
    );
    // Evicted keys are read back from storage.
    assert_eq!(*store.get(7).await.unwrap().unwrap(), 1);
}

#[tokio::test]
async fn byte_capacity_bounds_cached_documents() {
    let store: Store<u32, String> = Store::new(
        Options::new(memory(), |k: &u32| format!("k/{k}"))
            .init(String::new)
            .capacity_bytes(10_000),
    );
    for k in 0..1000u32 {
        store
            .update(k, true, |_| Ok(("x".repeat(98), true)))
            .await
            .unwrap();
    }
    assert!(store.cached_bytes() <= 10_000, "{}", store.cached_bytes());
    assert_eq!(store.cached_keys(), 100);
}

#[tokio::test]
async fn injected_errors_and_applied_conflicts() {
    // `errors`: the call fails with `Other` and never reaches the storage.
    let inner = memory();
    let faulty = FaultyStorage::new(Arc::clone(&inner), 3).errors(1.0);
    let err = faulty
        .upload(UploadRequest::new("users/e.json", "{}"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Other);
    assert!(!err.is_conflict());
    assert_eq!(stored(inner.as_ref(), "e").await, None);
    assert_eq!(faulty.faults().errors, 1);

    // `applied_conflicts`: the upload lands, yet the caller hears "conflict";
    // an update that believes it and runs again is applied twice.
    let inner = memory();
    let faulty = Arc::new(FaultyStorage::new(Arc::clone(&inner), 3).applied_conflicts(1.0));
    let err = faulty
        .upload(UploadRequest::new("users/c.json", r#"{"a":1}"#))
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert_eq!(
        stored(inner.as_ref(), "c").await,
        Some(Doc::from([("a".into(), 1)]))
    );
    assert_eq!(faulty.faults().applied_conflicts, 1);
}

/// A read that meets `Unavailable` is tried again with the store's backoff,
/// up to `RetryPolicy::read_attempts`, and counted; only then returned.
#[tokio::test]
async fn transient_read_errors_are_retried_within_the_policy() {
    let inner = memory();
    store_on(Arc::clone(&inner))
        .update("u".into(), true, insert("a", 1))
        .await
        .unwrap();
    let reads = |attempts: u32, seed: u64| {
        let faulty: Arc<dyn Storage> =
            Arc::new(FaultyStorage::new(Arc::clone(&inner), seed).unavailable(0.3));
        let store: Store<String, Doc> = Store::new(
            Options::new(faulty, path)
                .init(Doc::new)
                .retry_policy(RetryPolicy::immediate().read_attempts(attempts)),
        );
        async move {
            let mut failed = 0;
            for _ in 0..200 {
                store.clear_cache();
                match store.get("u".into()).await {
                    Ok(v) => assert_eq!(v.unwrap()["a"], 1),
                    Err(e) => {
                        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
                        failed += 1;
                    }
                }
            }
            (failed, store.stats().read_retries)
        }
    };
    let (failed, retries) = reads(1, 7).await;
    assert!(failed > 20, "{failed} of 200 reads failed without retries");
    assert_eq!(retries, 0);
    let (failed, retries) = reads(12, 7).await;
    assert_eq!(failed, 0, "a read failed despite 12 tries");
    assert!(retries > 20, "{retries}");
}
