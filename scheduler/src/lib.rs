//! skiff-scheduler: the pod scheduler as a filter/score framework with no I/O in its core.
//!
//! Not built yet: issue 4 ("Control loops") fills this crate. It exists now so the workspace has
//! the layout DESIGN.md gives and so the next engineer knows where the scheduler lives.
