//! The test servers themselves start, stop and start again.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpStream;

use common::servers;

fn reachable(addr: &str) -> bool {
    TcpStream::connect(addr).is_ok()
}

#[test]
fn etcd_starts_stops_and_restarts() {
    let Some(mut s) = servers::etcd() else { return };
    assert!(reachable(s.addr()));
    s.stop();
    assert!(!reachable(s.addr()));
    s.start();
    assert!(reachable(s.addr()));
}

#[test]
fn postgres_starts_stops_and_restarts() {
    let Some(mut s) = servers::postgres() else {
        return;
    };
    assert!(reachable(s.addr()));
    s.stop();
    assert!(!reachable(s.addr()));
    s.start();
    assert!(reachable(s.addr()));
}

#[test]
fn nats_starts_stops_and_restarts() {
    let Some(mut s) = servers::nats() else { return };
    assert!(reachable(s.addr()));
    s.stop();
    assert!(!reachable(s.addr()));
    s.start();
    assert!(reachable(s.addr()));
}

#[test]
fn moto_starts_and_creates_buckets() {
    let Some(s) = servers::moto() else { return };
    servers::create_bucket(s.addr(), "smoke");
    servers::create_bucket(s.addr(), "smoke");
}
