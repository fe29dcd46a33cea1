//! Optimistic writes (`Options::optimistic_writes`): an update of a key this
//! store wrote last is written from the cached version in one round trip,
//! and a stale cache never decides an outcome.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use metadatacache::testing::FaultyStorage;
use metadatacache::{Error, ErrorKind, MemoryStorage, Options, RetryPolicy, Storage, Store};

fn counter(storage: &Arc<dyn Storage>, optimistic: bool) -> Store<String, u64> {
    Store::new(
        Options::new(Arc::clone(storage), |k: &String| format!("{k}.json"))
            .init(|| 0)
            .retry_policy(RetryPolicy::immediate())
            .optimistic_writes(optimistic),
    )
}

async fn increment(store: &Store<String, u64>) {
    store
        .update("n".into(), true, |n| Ok::<_, Error>((n + 1, true)))
        .await
        .unwrap();
}

async fn stored(storage: &Arc<dyn Storage>) -> u64 {
    let bytes = storage.simple_download("n.json").await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Round trips that only read: conditional downloads answered either way.
fn reads(store: &Store<String, u64>) -> u64 {
    let s = store.stats();
    s.downloads + s.not_modified
}

#[tokio::test]
async fn a_key_written_here_last_costs_one_round_trip() {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let store = counter(&storage, true);
    increment(&store).await;
    let before = reads(&store);
    for _ in 0..10 {
        increment(&store).await;
    }
    assert_eq!(reads(&store), before, "no revalidation before the writes");
    assert_eq!(stored(&storage).await, 11);

    // Off, every update revalidates first.
    let store = counter(&storage, false);
    increment(&store).await;
    let before = reads(&store);
    for _ in 0..10 {
        increment(&store).await;
    }
    assert_eq!(reads(&store), before + 10);
    assert_eq!(stored(&storage).await, 22);
}

/// A storage whose refused writes do not bring back the stored version.
fn without_conflict_versions() -> Arc<dyn Storage> {
    let memory: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    Arc::new(FaultyStorage::new(memory, 1).conflict_versions(false))
}

#[tokio::test]
async fn a_stale_cache_never_loses_another_replicas_write() {
    let storage = without_conflict_versions();
    let (a, b) = (counter(&storage, true), counter(&storage, true));
    increment(&a).await;
    for _ in 0..5 {
        increment(&b).await;
    }
    // `a` caches 1 while storage holds 6: its compare-and-swap fails, it
    // revalidates and applies its increment to 6.
    increment(&a).await;
    assert_eq!(stored(&storage).await, 7);
    assert_eq!(a.stats().conflicts, 1);

    // The key was found changed elsewhere: the next update revalidates
    // first instead of risking another wasted write.
    increment(&b).await;
    let before = (reads(&a), a.stats().conflicts);
    increment(&a).await;
    assert_eq!((reads(&a), a.stats().conflicts), (before.0 + 1, before.1));
    assert_eq!(stored(&storage).await, 9);
    assert_eq!(a.get("n".into()).await.unwrap().as_deref(), Some(&9));
}

/// The refusal of a write from a stale cache brings back the version that
/// refused it (memory declares `current_on_conflict`): the update is
/// applied to it without a read, and nothing is lost.
#[tokio::test]
async fn a_refused_write_brings_back_the_version_to_apply_to() {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    assert!(storage.capabilities().current_on_conflict);
    let (a, b) = (counter(&storage, true), counter(&storage, true));
    increment(&a).await;
    for _ in 0..5 {
        increment(&b).await;
    }
    let before = (reads(&a), a.stats().uploads);
    increment(&a).await;
    assert_eq!(stored(&storage).await, 7);
    let stats = a.stats();
    assert_eq!((stats.conflicts, stats.conflict_versions), (1, 1));
    assert_eq!(
        (reads(&a), stats.uploads),
        (before.0, before.1 + 2),
        "the refused write and the one that landed, and no read between"
    );
    assert_eq!(a.get("n".into()).await.unwrap().as_deref(), Some(&7));

    // Found changed elsewhere, the key is still written from the cache
    // first: a refusal costs no more round trips than a read would.
    increment(&b).await;
    let before = (reads(&a), a.stats().uploads);
    increment(&a).await;
    assert_eq!(stored(&storage).await, 9);
    let stats = a.stats();
    assert_eq!((stats.conflicts, stats.conflict_versions), (2, 2));
    assert_eq!((reads(&a), stats.uploads), (before.0, before.1 + 2));
}

#[tokio::test]
async fn outcomes_without_a_write_are_decided_on_what_storage_holds() {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let (a, b) = (counter(&storage, true), counter(&storage, true));
    increment(&a).await;
    for _ in 0..4 {
        increment(&b).await;
    }
    // `a` caches 1, storage holds 5. A read-only update that would pass on
    // the cached value must fail on the stored one, and the other way
    // round.
    let mut seen = Vec::new();
    let err = a
        .update("n".into(), false, |n| {
            seen.push(n);
            if n < 3 {
                Ok((n, false))
            } else {
                Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("{n} is too high"),
                ))
            }
        })
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "5 is too high");
    assert_eq!(
        seen,
        [1, 5],
        "run on the cached value, then on the stored one"
    );

    // `a` writes 6, then 7 from its cache; another replica writes 8.
    increment(&a).await;
    increment(&a).await;
    increment(&b).await;
    let mut seen = Vec::new();
    a.update("n".into(), false, |n| {
        seen.push(n);
        if n == 7 {
            Err(Error::new(ErrorKind::InvalidInput, "stale"))
        } else {
            Ok((n, false))
        }
    })
    .await
    .unwrap();
    assert_eq!(seen, [7, 8]);
    assert_eq!(stored(&storage).await, 8);
}

#[tokio::test]
async fn a_document_deleted_elsewhere_is_not_written_back() {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let (a, b) = (counter(&storage, true), counter(&storage, true));
    increment(&a).await;
    assert!(b.remove("n".into()).await.unwrap());
    let err = a
        .update("n".into(), false, |n| Ok::<_, Error>((n + 1, true)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(
        storage.simple_download("n.json").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    // Allowed to create, it starts again from `init`.
    increment(&a).await;
    assert_eq!(stored(&storage).await, 1);
}

/// A read-only update queued behind `leader` on store `a`: records the
/// values it is given and fails on `bad`. Returns its outcome and what it
/// saw.
async fn batch_of_two(a: &Store<String, u64>, bad: u64) -> (Result<(), Error>, Vec<u64>) {
    let key = "n".to_owned();
    let held = a.lock(key.clone()).await;
    let writer = {
        let a = a.clone();
        tokio::spawn(async move { increment(&a).await })
    };
    while a.lock_users(&key) < 2 {
        tokio::task::yield_now().await;
    }
    let reader = {
        let a = a.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let res = a
                .update("n".into(), false, |n| {
                    seen.push(n);
                    if n == bad {
                        Err(Error::new(ErrorKind::InvalidInput, format!("{n} is bad")))
                    } else {
                        Ok((n, false))
                    }
                })
                .await;
            (res, seen)
        })
    };
    while a.lock_users(&key) < 3 {
        tokio::task::yield_now().await;
    }
    drop(held);
    writer.await.unwrap();
    reader.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_written_from_the_cache_confirms_its_readers_or_sends_them_to_storage() {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let (a, b) = (counter(&storage, true), counter(&storage, true));
    increment(&a).await;
    // Storage moves to 2 behind `a`'s back. The batch (writer, then the
    // reader) starts from the cached 1: the reader fails on it
    // provisionally, the write conflicts, and the reader decides again on
    // the stored 2 (after seeing the batch's 3): Ok.
    increment(&b).await;
    let (res, seen) = batch_of_two(&a, 1).await;
    res.unwrap();
    assert_eq!(seen, [2, 1, 3, 2]);
    assert_eq!(stored(&storage).await, 3);

    // Now the cache is current (a revalidation found it unchanged): the
    // batch writes 4 over the cached 3 without a read, and the reader's
    // decision on 3 stands because that write landed.
    assert_eq!(a.get("n".into()).await.unwrap().as_deref(), Some(&3));
    let before = reads(&a);
    let (res, seen) = batch_of_two(&a, 3).await;
    assert_eq!(res.unwrap_err().to_string(), "3 is bad");
    assert_eq!(seen, [4, 3]);
    assert_eq!(reads(&a), before, "no revalidation");
    assert_eq!(stored(&storage).await, 4);
}
