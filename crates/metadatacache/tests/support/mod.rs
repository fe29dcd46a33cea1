//! Shared helpers of the integration tests.

pub mod proxy;
pub mod servers;
