//! Shared helpers of the integration tests.

pub mod counter;
pub mod servers;
