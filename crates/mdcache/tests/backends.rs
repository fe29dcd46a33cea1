//! `mdcache torture` with replica processes sharing each distributed
//! backend, against real servers on 127.0.0.1 (a missing server fails the
//! test, naming what to install, unless `MDCACHE_SKIP_SERVERS=1`).

#![allow(clippy::unwrap_used, dead_code, unused_imports)]

#[path = "../../metadatacache/tests/common/servers.rs"]
mod servers;
mod table;

use std::process::Command;

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
