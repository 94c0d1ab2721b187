//! Blixard's host agent, as a library.
//!
//! Dependency direction: `cli -> api -> node -> {consensus, state,
//! scheduler, reconciler -> runtime}`. Nothing below `node` knows about
//! gRPC or the CLI; `consensus` and `state` do no I/O of their own beyond
//! the `storage` they are given. See ARCHITECTURE.md for the map.

pub mod api;
pub mod backup;
pub mod certs;
pub mod cli;
pub mod clock;
pub mod config;
pub mod consensus;
pub mod daemon;
pub mod dashboard;
pub mod failpoint;
pub mod failure;
pub mod guard;
pub mod http;
pub mod join_token;
pub mod metrics;
pub mod names;
pub mod node;
pub mod pki;
pub mod properties;
pub mod reconciler;
pub mod runtime;
pub mod scheduler;
pub mod state;
pub mod storage;
pub mod trust;
