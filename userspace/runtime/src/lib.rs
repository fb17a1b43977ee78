//! skiff-runtime: what a node needs to run pod containers.
//!
//! - [`images::ImageStore`]: the local image store (OCI and docker archives in, content-addressed
//!   blobs, unpacked root filesystems out, gc).
//! - [`runc::Runc`]: containers as OCI bundles run by the runc CLI, behind [`PodRuntime`].
//!
//! Every call is blocking; async callers wrap them in `spawn_blocking`.

pub mod digest;
pub mod images;
pub mod reference;
pub mod runc;
pub mod shim;

pub use images::{GcReport, ImageConfig, ImageInfo, ImageStore, ImportedImage, ResolvedImage};
pub use reference::Reference;
pub use runc::{
    BindMount, ContainerConfig, ContainerId, ContainerInfo, ContainerState, ExecProcess, PodRuntime, Resources, Runc,
    RuncOptions,
};

/// Errors of the runtimes.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Image(ImageError),
    #[error("invalid container config: {0}")]
    InvalidConfig(String),
    #[error("runc {command}: {message}")]
    Runc { command: String, message: String },
    #[error("container {0} not found")]
    NotFound(String),
}

/// Errors of the image store.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed image: {0}")]
    Malformed(String),
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch { what: String, expected: String, actual: String },
    #[error("unsafe path in image: {0}")]
    UnsafePath(String),
    #[error("layer {layer}: {message}")]
    Layer { layer: String, message: String },
    #[error("unsupported image: {0}")]
    Unsupported(String),
    #[error("invalid image reference {0}")]
    InvalidReference(String),
    #[error("image {0} not found")]
    NotFound(String),
}
