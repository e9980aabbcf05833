//! kubenft node agent: receives its node's rule set from the controller and enforces it with
//! atomic nftables transactions on tables it owns.
//!
//! Flow: [`stream`] receives a Change → [`applier`] asks [`apply`] for a plan (element diff of
//! [`render`]ed [`model`] resources against the [`state`] mirror) → [`nft`] runs it as one
//! transaction → the state is committed and persisted. [`http`] and [`inspect`] report.
// Denied everywhere; the one exception is `memory`'s call into glibc, reviewed there.
#![deny(unsafe_code)]

pub mod addrs;
pub mod agent;
pub mod apiserver;
pub mod applier;
pub mod apply;
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
pub mod model;
pub mod nft;
pub mod proxy_counts;
pub mod render;
pub mod repair;
pub mod state;
pub mod stream;
