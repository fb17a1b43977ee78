//! skiff-proxy: the service proxy (issue 5).
