//! kubenft-nft: the agent's pure core, from a node's rule set to nftables objects.
//! No I/O, no async runtime: the agent runs nft and keeps files; this crate decides what to
//! run, so every decision is a function the tests can call.
//!
//! ```text
//!  v1::Resource ──rules (validate)──▶ Spec, NodeRules
//!  Spec ──render──▶ elements, chains, rules (objects) of our table
//!  AppliedState + v1::Change ──diff──▶ Diff: one Transaction (element by element, or a full
//!                                        reconcile) and what to record once it commits
//!  AppliedState + Damage (events) ──repair──▶ the Transaction that puts back what another
//!                                        program changed
//! ```
//! A [`Transaction`] renders as nft text with `Display`; nothing user-controlled reaches that
//! text except through the typed objects, whose names and values are validated.
#![forbid(unsafe_code)]

pub mod applied;
pub mod diff;
pub mod event;
pub mod objects;
pub mod parse;
pub mod render;
pub mod repair;
pub mod rules;
pub mod trace;
pub mod transaction;

pub use objects::*;
pub use transaction::*;
