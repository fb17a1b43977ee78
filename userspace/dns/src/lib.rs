//! skiff-dns: cluster DNS (work in progress).
