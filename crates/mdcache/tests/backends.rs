//! `mdcache torture` with replica processes sharing each distributed
//! backend, against real servers on 127.0.0.1 (a missing server fails the
//! test, naming what to install, unless `MDCACHE_SKIP_SERVERS=1`).

#![allow(clippy::unwrap_used, dead_code, unused_imports)]

#[path = "../../metadatacache/tests/common/servers.rs"]
mod servers;
mod table;
mod tree;

use std::process::Command;
use std::time::Instant;

use table::assert_rows;

/// Runs a small torture against `url`; asserts nothing was lost.
fn torture(url: &str, env: &[(&str, &str)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mdcache"))
        .args(["--storage", url, "torture", "--check"])
        .args([
            "--replicas",
            "3",
            "--tasks",
            "3",
            "--keys",
            "2",
            "--updates",
            "120",
        ])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    assert_rows(
        &text,
        &[
            ("acknowledged", "360"),
            ("lost", "0"),
            ("history: violations", "0"),
            ("result", "OK"),
        ],
    );
    text
}

#[cfg(feature = "etcd")]
#[test]
fn torture_on_etcd_loses_nothing() {
    let Some(server) = servers::etcd() else {
        return;
    };
    torture(&format!("etcd://{}/torture", server.addr()), &[]);
}

#[cfg(feature = "postgres")]
#[test]
fn torture_on_postgres_loses_nothing() {
    let Some(server) = servers::postgres() else {
        return;
    };
    torture(
        &format!(
            "postgres://postgres@{}/postgres?table=torture",
            server.addr()
        ),
        &[],
    );
}

#[cfg(feature = "s3")]
#[test]
fn torture_on_s3_loses_nothing() {
    let Some(server) = servers::moto() else {
        return;
    };
    servers::create_bucket(server.addr(), "torture");
    torture(
        &format!(
            "s3://torture/run?endpoint=http://{}&allow_http=true&region=us-east-1",
            server.addr()
        ),
        &[
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
        ],
    );
}

/// `mdcache migrate --from FROM --to TO`; asserts it succeeded and copied
/// `copied` documents, and that `already` were there; prints its figures.
fn migrate(from: &str, to: &str, env: &[(&str, &str)], copied: usize, already: usize) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_mdcache"))
        .args(["migrate", "--from", from, "--to", to])
        .env_remove("MDCACHE_STORAGE")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{from} -> {to}: {out:?}");
    let total = copied + already;
    assert!(
        text.starts_with(&format!(
            "copied {copied}, already there {already}, differing 0, failed 0"
        )),
        "{from} -> {to}: {text}"
    );
    assert!(
        text.contains(&format!(
            "verified {total} documents: {total} identical, 0 differing, 0 missing, 0 failed"
        )),
        "{from} -> {to}: {text}"
    );
    eprintln!(
        "migrate {from} -> {to}: {:.2} s\n{text}",
        started.elapsed().as_secs_f64()
    );
}

/// Documents travel disk -> etcd -> PostgreSQL -> S3 (each hop a `migrate`
/// run against a real server), and back to a new directory: byte for byte
/// the tree they started as. A hop run twice finds them all there.
#[cfg(all(feature = "etcd", feature = "postgres", feature = "s3"))]
#[test]
fn migrate_chain_disk_etcd_postgres_s3() {
    let (Some(etcd), Some(pg), Some(moto)) =
        (servers::etcd(), servers::postgres(), servers::moto())
    else {
        return;
    };
    servers::create_bucket(moto.addr(), "migrate");
    let aws = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ];
    let (src, back) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    const N: usize = 200;
    let docs = tree::seed(src.path(), N);
    let chain = [
        format!("disk:{}", src.path().display()),
        format!("etcd://{}/migrated", etcd.addr()),
        format!("postgres://postgres@{}/postgres?table=migrated", pg.addr()),
        format!(
            "s3://migrate/chain?endpoint=http://{}&allow_http=true&region=us-east-1",
            moto.addr()
        ),
        format!("disk:{}/copy", back.path().display()),
    ];
    let started = Instant::now();
    for hop in chain.windows(2) {
        migrate(&hop[0], &hop[1], &aws, N, 0);
    }
    eprintln!(
        "chain of {N} documents: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(tree::read(&back.path().join("copy")), docs);
    // Resuming a finished hop copies nothing.
    migrate(&chain[1], &chain[2], &aws, 0, N);
}

/// On Azurite; the torture's `init` creates the container.
#[cfg(feature = "s3")]
#[test]
fn torture_on_azure_loses_nothing() {
    let Some(server) = servers::azurite() else {
        return;
    };
    let out = torture(
        &format!(
            "az://torture/run?endpoint=http://{}/{}&allow_http=true",
            server.addr(),
            servers::AZURITE_ACCOUNT
        ),
        &[("AZURE_STORAGE_ACCOUNT_KEY", servers::AZURITE_KEY)],
    );
    eprintln!("{out}");
}

#[cfg(feature = "nats")]
#[test]
fn torture_on_nats_loses_nothing() {
    let Some(server) = servers::nats() else {
        return;
    };
    torture(&format!("nats://{}/torture", server.addr()), &[]);
}

/// The NATS server is killed (SIGKILL) in the middle of a run and started
/// again: the replicas ride it out (calls wait for the connection within
/// their timeout, then fail `Unavailable`) and nothing acknowledged is lost.
#[cfg(feature = "nats")]
#[test]
fn torture_on_nats_survives_a_server_kill() {
    use std::time::{Duration, Instant};
    let Some(mut server) = servers::nats() else {
        return;
    };
    let url = format!("nats://{}/torture?timeout_ms=1000", server.addr());
    // The bucket is made first, with the default timeout: making its
    // stream on a busy machine may take longer than the run's 1 s.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let setup = format!("nats://{}/torture", server.addr());
    rt.block_on(async { metadatacache::open(&setup).await?.init("").await })
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mdcache"))
        .args(["--storage", &url, "torture", "--check"])
        .args(["--replicas", "3", "--tasks", "3", "--keys", "2"])
        .args(["--updates", "2000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the run is well under way.
    let storage = rt.block_on(metadatacache::open(&url)).unwrap();
    let count = || {
        rt.block_on(storage.simple_download("torture/key-0.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["count"].as_u64())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while count() < 200 {
        assert!(Instant::now() < deadline, "the torture never got going");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the torture ended before the kill ({status}); its error is above");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run ended before the kill"
    );
    server.kill();
    std::thread::sleep(Duration::from_secs(2));
    server.start();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}");
    assert!(out.status.success(), "{out:?}");
    assert_rows(
        &text,
        &[
            ("lost", "0"),
            ("applied twice", "0"),
            ("history: violations", "0"),
            ("result", "OK"),
        ],
    );
}
