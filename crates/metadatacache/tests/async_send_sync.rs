//! Every public type can be shared across threads, and every public future
//! can be sent to another thread: the library is used from multi-threaded
//! runtimes, behind `Arc`s, in spawned tasks.

#![allow(clippy::unwrap_used, dead_code)]

use std::sync::Arc;

use metadatacache::testing::history::{CheckReport, Event, RecordingStorage};
use metadatacache::testing::{Faults, FaultyStorage};
use metadatacache::*;

fn send_sync<T: Send + Sync>() {}
fn send<T: Send>(_: &T) {}

#[test]
fn public_types_are_send_and_sync() {
    // The cache and its parts.
    send_sync::<Store<String, Vec<u8>>>();
    send_sync::<Options<String, Vec<u8>>>();
    send_sync::<KeyGuard<String, Vec<u8>>>();
    send_sync::<Stats>();
    send_sync::<RetryPolicy>();
    send_sync::<JsonCodec>();
    send_sync::<Arc<dyn Codec<Vec<u8>>>>();
    // Errors.
    send_sync::<Error>();
    send_sync::<ErrorKind>();
    // The storage trait and its types.
    send_sync::<Arc<dyn Storage>>();
    send_sync::<Capabilities>();
    send_sync::<UploadRequest>();
    send_sync::<UploadResponse>();
    send_sync::<DownloadRequest>();
    send_sync::<DownloadResponse>();
    send_sync::<FileInfo>();
    send_sync::<EntryKind>();
    // Backends and their configurations.
    send_sync::<MemoryStorage>();
    send_sync::<DiskStorage>();
    send_sync::<DiskOptions>();
    send_sync::<DiskStep>();
    #[cfg(feature = "etcd")]
    {
        send_sync::<EtcdStorage>();
        send_sync::<EtcdConfig>();
    }
    #[cfg(feature = "postgres")]
    {
        send_sync::<PostgresStorage>();
        send_sync::<PostgresConfig>();
    }
    #[cfg(feature = "s3")]
    {
        send_sync::<ObjectStoreStorage>();
        send_sync::<S3Config>();
        send_sync::<AzureConfig>();
        send_sync::<GcsConfig>();
        send_sync::<ObjectStoreConfig>();
    }
    #[cfg(feature = "nats")]
    {
        send_sync::<NatsStorage>();
        send_sync::<NatsConfig>();
    }
    // Test support.
    send_sync::<FaultyStorage>();
    send_sync::<Faults>();
    send_sync::<RecordingStorage>();
    send_sync::<Event>();
    send_sync::<CheckReport>();
}

#[test]
fn public_futures_are_send() {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let store: Store<String, u64> =
        Store::new(Options::new(Arc::clone(&storage), |k: &String| format!("{k}.json")).init(|| 0));
    // A closure that borrows from the caller's stack is fine.
    let mut local = 0;
    send(&store.update("k".into(), true, |n| {
        local += 1;
        Ok((n, false))
    }));
    send(&store.get("k".into()));
    send(&store.remove("k".into()));
    send(&store.reset("k".into(), 1));
    send(&store.lock("k".into()));
    send(&storage.upload(UploadRequest::new("a", "b")));
    send(&storage.download(DownloadRequest::new("a")));
    send(&metadatacache::open("memory:"));
    #[cfg(feature = "nats")]
    send(&NatsStorage::from_url("nats://127.0.0.1:4222/bucket"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut g = rt.block_on(store.lock("k".into()));
    send(&g.get());
    send(&g.sync());
    send(&g.persist());
}
