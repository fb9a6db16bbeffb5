//! hubsync: keep one directory tree identical on several servers.
//!
//! One run, as data flows (each box is a module):
//! `lock` → `scan` (hub and every peer's `serve`, in parallel) → `reconcile` (pure)
//! → `plan` → `apply` on each replica → agreed state saved (`archive`) → unlock.
//! See ARCHITECTURE.md.

pub mod agreed;
pub mod apply;
pub mod archive;
pub mod cli;
pub mod config;
pub mod conflicts;
pub mod exclude;
pub mod hub;
pub mod lock;
pub mod merge;
pub mod pattern;
pub mod plan;
pub mod proto;
pub mod reconcile;
pub mod relpath;
pub mod report;
pub mod rules;
pub mod scan;
pub mod server;
pub mod status;
pub mod transport;
pub mod util;
pub mod version;
