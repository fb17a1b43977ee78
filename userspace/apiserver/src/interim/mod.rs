//! Interim stand-ins for modules of `skiff-api` that had not landed when this crate was written
//! (`registry`, `status`, `admission`, `table`, `openapi`).
//!
//! TODO(skiff-api): replace each module here with `skiff_api::<module>` as soon as it lands; the
//! names and signatures below follow the ones agreed for skiff-api so the switch is a `use` change.
//! They are deliberately small: just what the apiserver needs to serve kubectl today.

pub mod admission;
pub mod openapi;
pub mod registry;
pub mod status;
pub mod table;
