//! The state of the connection, as the client's events tell it, and how
//! soon the client tries to connect again.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_nats::Event;
use tokio::sync::watch;

/// What the connection's events said: how often it was lost, whether it
/// is up, and the last error connecting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct LinkState {
    pub(super) connected: bool,
    pub(super) losses: u64,
}

/// Tracks the connection through the client's events.
#[derive(Debug, Default)]
pub(super) struct Link {
    /// Follows [`LinkState`].
    state: watch::Sender<LinkState>,
    last_error: Mutex<Option<String>>,
}

impl Link {
    /// Follows the state from now on.
    pub(super) fn subscribe(&self) -> watch::Receiver<LinkState> {
        self.state.subscribe()
    }

    /// The last error connecting (or from the server), while not connected.
    pub(super) fn last_error(&self) -> MutexGuard<'_, Option<String>> {
        // A string swap cannot be left half done.
        self.last_error.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one event of the client into account.
    pub(super) fn record(&self, event: Event) {
        match event {
            Event::Connected => {
                *self.last_error() = None;
                self.state.send_modify(|s| s.connected = true);
            }
            Event::Disconnected => self.state.send_modify(|s| {
                s.connected = false;
                s.losses += 1;
            }),
            Event::ClientError(e) => *self.last_error() = Some(e.to_string()),
            Event::ServerError(e) => *self.last_error() = Some(e.to_string()),
            _ => {}
        }
    }
}

/// The pause before reconnect attempt `attempts` (counted since the last
/// success): at once, then doubling from 100 ms to at most 1 s, so a
/// restarted server is found again soon.
pub(super) fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let doublings = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(4);
    Duration::from_millis(100 << doublings).min(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_soon_and_then_every_second() {
        let delays: Vec<u64> = (1..9)
            .map(|a| reconnect_delay(a).as_millis() as u64)
            .collect();
        assert_eq!(delays, [0, 100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(reconnect_delay(usize::MAX), Duration::from_secs(1));
    }

    #[test]
    fn losses_are_counted() {
        let link = Link::default();
        let rx = link.state.subscribe();
        link.record(Event::Connected);
        link.record(Event::ClientError(async_nats::ClientError::Other(
            "refused".into(),
        )));
        assert_eq!(link.last_error().as_deref(), Some("nats: refused"));
        link.record(Event::Disconnected);
        link.record(Event::Connected);
        assert_eq!(
            *rx.borrow(),
            LinkState {
                connected: true,
                losses: 1
            }
        );
        assert_eq!(*link.last_error(), None);
    }
}
