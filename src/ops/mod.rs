//! Operations: what a command does, between `cli/` (parse, settings, rendering) and the
//! engines. Locking, the commit-last rule, manifest assembly, cleanup after failure and the
//! checks of restore and verify live here once, for every engine.

pub mod backup;
pub mod prune;
pub mod reencrypt;
pub mod restore;
pub mod verify;
