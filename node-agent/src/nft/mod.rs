//! Running nft: transactions through `nft -f -` sessions, listings, and the kernel's
//! notifications through `nft monitor`. What is run (tables, chains, sets, elements, the
//! transaction text) is built by the pure [`kubenft_nft`] crate and re-exported here.

mod exec;
pub mod monitor;
mod session;

pub use exec::{FakeNft, Nft, NftCli, NftError, OwnProcesses};
pub use kubenft_nft::objects::{
    AddrKey, BaseHook, Chain, Element, ElementKey, EntryChain, EntryKey, EntryKind, LbChain,
    NoEndpoint, PortKey, Rule, Scope, SetId, Slot,
};
pub use kubenft_nft::parse;
pub use kubenft_nft::transaction::{
    AnyFamily, Command, ForeignName, InvalidTableName, Listing, Op, TableName, TableObjects,
    Transaction,
};
