//! kubenft node agent: receives its node's rule set from the controller and enforces it with
//! atomic nftables transactions on tables it owns.
//!
//! The agent is the I/O shell around [`kubenft_nft`], which decides what to run.
//! Flow: [`stream`] receives a Change → [`applier`] asks `kubenft_nft::diff` for one
//! transaction (element diff of rendered resources against the [`state`] mirror) → [`nft`]
//! runs it → the state is committed, the change ACKed, and the state file written after
//! ([`persist`]). [`drift`] watches for other programs
//! touching our tables and has `kubenft_nft::repair` put them back. [`http`] and [`inspect`]
//! report.
// Denied everywhere; the two exceptions, reviewed where they are: `memory`'s call into glibc,
// and the parent-death signal `nft::monitor` arms in its child.
#![deny(unsafe_code)]

pub mod addrs;
pub mod agent;
pub mod apiserver;
pub mod applier;
pub mod certs;
pub mod cli;
pub mod conntrack;
pub mod discovery;
pub mod drift;
pub mod hcport;
pub mod health;
pub mod http;
pub mod inspect;
pub mod lock;
pub mod memory;
pub mod metrics;
pub mod migrate;
pub mod nft;
pub mod persist;
pub mod proxy_counts;
pub mod state;
pub mod stream;
