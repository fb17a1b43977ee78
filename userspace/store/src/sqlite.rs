//! SQLite backend (being built).
