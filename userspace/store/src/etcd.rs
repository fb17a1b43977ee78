//! etcd backend (being built).
