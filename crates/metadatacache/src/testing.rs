//! Test aids.
//!
//! - [`history`] (cargo feature `history`, implied by `testing`): record
//!   every storage call of one or more processes and check the record — one
//!   etag chain per key, fresh reads. It is evidence, not a fault, so
//!   production tools such as `mdcache torture --check` may use it.
//! - `FaultyStorage` (cargo feature `testing`): fault injection, a storage
//!   around a storage.

pub mod history;
mod recording;

#[cfg(feature = "testing")]
mod faulty;

#[cfg(feature = "testing")]
pub use faulty::{Faults, FaultyStorage};
