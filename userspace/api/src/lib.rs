//! (being built)
pub mod patch;
pub mod selector;
