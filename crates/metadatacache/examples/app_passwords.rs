//! An app-password manager, as a service replica would run it.
//!
//! Each user's app passwords are one JSON document (`app-passwords/<user>.json`)
//! shared by every replica. Passwords are stored as SHA-256 hashes; a
//! successful verify records a last-used time, but writes it at most once per
//! interval, so a busy client does not turn every login into a write.
//!
//! Run it against any storage URL (two managers stand in for two replicas):
//!
//! ```text
//! cargo run --example app_passwords                    # memory:
//! cargo run --example app_passwords -- disk:/tmp/pw    # a directory
//! ```

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metadatacache::{Error, ErrorKind, Options, Storage, Store};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One app password, as stored. The secret itself is never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppPassword {
    pub label: String,
    /// Hex SHA-256 of the token.
    pub hash: String,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds of the last successful verify, updated at most once per
    /// touch interval.
    pub last_used: Option<u64>,
}

/// A user's app passwords by id.
pub type Passwords = BTreeMap<String, AppPassword>;

/// One replica's view of the app passwords.
#[derive(Debug, Clone)]
pub struct Manager {
    store: Store<String, Passwords>,
    touch_interval: Duration,
}

impl Manager {
    pub fn new(storage: Arc<dyn Storage>, touch_interval: Duration) -> Self {
        let store = Store::new(
            Options::new(storage, |user: &String| {
                format!("app-passwords/{user}.json")
            })
            .init(Passwords::new),
        );
        Manager {
            store,
            touch_interval,
        }
    }

    pub fn store(&self) -> &Store<String, Passwords> {
        &self.store
    }

    /// Creates a password; returns its id and the token to hand to the user
    /// (shown once, never stored).
    pub async fn generate(&self, user: &str, label: &str) -> Result<(String, String), Error> {
        let token = random_hex(24)?;
        let id = random_hex(8)?;
        let entry = AppPassword {
            label: label.to_owned(),
            hash: hash(&token),
            created: now(),
            last_used: None,
        };
        self.store
            .update(user.to_owned(), true, |mut passwords| {
                passwords.insert(id.clone(), entry.clone());
                Ok((passwords, true))
            })
            .await?;
        Ok((id, token))
    }

    /// The user's passwords (without secrets).
    pub async fn list(&self, user: &str) -> Result<Passwords, Error> {
        Ok(self
            .store
            .get(user.to_owned())
            .await?
            .map(|p| (*p).clone())
            .unwrap_or_default())
    }

    /// Revokes password `id`; `false` when there was no such password.
    pub async fn invalidate(&self, user: &str, id: &str) -> Result<bool, Error> {
        let mut removed = false;
        let res = self
            .store
            .update(user.to_owned(), false, |mut passwords| {
                removed = passwords.remove(id).is_some();
                Ok((passwords, removed))
            })
            .await;
        match res {
            Ok(()) => Ok(removed),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Checks a token. Always asks storage (a conditional download), so a
    /// password revoked on another replica is rejected at once.
    pub async fn verify(&self, user: &str, token: &str) -> Result<bool, Error> {
        let wanted = hash(token);
        let now = now();
        let interval = self.touch_interval.as_secs();
        let mut valid = false;
        let res = self
            .store
            .update(user.to_owned(), false, |mut passwords| {
                let found = passwords.values_mut().find(|p| p.hash == wanted);
                valid = found.is_some();
                let touch = match found {
                    Some(p)
                        if p.last_used
                            .is_none_or(|t| now.saturating_sub(t) >= interval) =>
                    {
                        p.last_used = Some(now);
                        true
                    }
                    _ => false,
                };
                Ok((passwords, touch))
            })
            .await;
        match res {
            Ok(()) => Ok(valid),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn random_hex(bytes: usize) -> Result<String, Error> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)
        .map_err(|e| Error::new(ErrorKind::Other, format!("no system randomness: {e}")))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let url = std::env::args().nth(1).unwrap_or_else(|| "memory:".into());
    if let Err(e) = demo(&url).await {
        eprintln!("app_passwords: {e}");
        std::process::exit(1);
    }
}

async fn demo(url: &str) -> Result<(), Error> {
    let storage = metadatacache::open(url).await?;
    let a = Manager::new(Arc::clone(&storage), Duration::from_secs(60));
    let b = Manager::new(storage, Duration::from_secs(60));

    let (id, token) = a.generate("alice", "laptop").await?;
    println!("replica A generated password {id} for alice");
    println!(
        "replica B verifies it: {}",
        b.verify("alice", &token).await?
    );
    println!(
        "replica B lists: {:?}",
        b.list("alice").await?.keys().collect::<Vec<_>>()
    );
    println!(
        "replica A revokes it: {}",
        a.invalidate("alice", &id).await?
    );
    println!(
        "replica B verifies it again: {}",
        b.verify("alice", &token).await?
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use metadatacache::MemoryStorage;

    fn replicas(interval: Duration) -> (Manager, Manager) {
        let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        (
            Manager::new(Arc::clone(&storage), interval),
            Manager::new(storage, interval),
        )
    }

    #[tokio::test]
    async fn revoked_on_one_replica_is_rejected_by_the_other_at_once() {
        let (a, b) = replicas(Duration::from_secs(60));
        let (id, token) = a.generate("alice", "phone").await.unwrap();
        // Both replicas have the password cached after a verify.
        assert!(a.verify("alice", &token).await.unwrap());
        assert!(b.verify("alice", &token).await.unwrap());
        assert!(b.invalidate("alice", &id).await.unwrap());
        // A's very next verify rejects it.
        assert!(!a.verify("alice", &token).await.unwrap());
        assert!(!a.invalidate("alice", &id).await.unwrap());
    }

    #[tokio::test]
    async fn last_used_is_written_at_most_once_per_interval() {
        let (a, _) = replicas(Duration::from_secs(3600));
        let (id, token) = a.generate("bob", "ci").await.unwrap();
        let uploads = a.store().stats().uploads;
        for _ in 0..10 {
            assert!(a.verify("bob", &token).await.unwrap());
        }
        assert_eq!(
            a.store().stats().uploads,
            uploads + 1,
            "one touch in the interval"
        );
        assert!(a.list("bob").await.unwrap()[&id].last_used.is_some());
        // A zero interval writes on every verify.
        let (c, _) = replicas(Duration::ZERO);
        let (_, token) = c.generate("bob", "ci").await.unwrap();
        let uploads = c.store().stats().uploads;
        for _ in 0..3 {
            assert!(c.verify("bob", &token).await.unwrap());
        }
        assert_eq!(c.store().stats().uploads, uploads + 3);
    }

    #[tokio::test]
    async fn unknown_tokens_and_users_are_rejected() {
        let (a, _) = replicas(Duration::from_secs(60));
        assert!(!a.verify("nobody", "x").await.unwrap());
        a.generate("carol", "x").await.unwrap();
        assert!(!a.verify("carol", "wrong").await.unwrap());
        let stored = a.list("carol").await.unwrap();
        assert_eq!(stored.len(), 1);
        assert!(
            stored.values().all(|p| p.hash.len() == 64),
            "only hashes are stored"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_generates_on_two_replicas_keep_every_password() {
        let (a, b) = replicas(Duration::from_secs(60));
        let mut tasks = Vec::new();
        for m in [a.clone(), b.clone()] {
            for i in 0..10 {
                let m = m.clone();
                tasks.push(tokio::spawn(async move {
                    m.generate("dave", &format!("device {i}")).await
                }));
            }
        }
        let mut tokens = Vec::new();
        for t in tasks {
            tokens.push(t.await.unwrap().unwrap().1);
        }
        assert_eq!(a.list("dave").await.unwrap().len(), 20);
        for t in &tokens {
            assert!(b.verify("dave", t).await.unwrap());
        }
    }
}
