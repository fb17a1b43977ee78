//! skiff-runtime: image store and runtimes (issue 5).
