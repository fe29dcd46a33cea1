//! Storage backends and opening one from a URL.

pub(crate) mod disk;
pub(crate) mod memory;
pub(crate) mod url;
