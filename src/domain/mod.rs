//! The domain core: every rule of the contract, as plain Rust with no I/O and no async.
//!
//! | rule | place |
//! | --- | --- |
//! | 1, exactly once (duplicate `event_id`s) | [`book::Book::apply`] |
//! | 2, order does not matter; 3, who counts | [`participants`] |
//! | 4, tenancy | [`tenancy`] |
//! | 5, seats move by themselves; 6, modules wait; 7, manual transfers | [`transfers`] |
//! | 8, refills oldest first; 9, earliest expiry, never negative, expiry | [`pools`] |
//! | 11, revocations, also of grants that arrive later | [`revocations`] |
//! | 13, workspaces have a life: live, then past | [`workspaces`] |
//! | 14, the catalogue: names, and each module's assignment | [`catalogue`] |
//! | 15, pool warnings: `low` and `expiring`, before shortfalls | [`warnings`] |
//! | alerts only on change | [`shortfalls`] |
//! | the state of each key the batch changed, with its version | [`state`] |
//!
//! The store loads a [`book::Book`] with the state a batch needs, the batch's commands are
//! applied one by one, and the store writes back what changed with the ledger entries and
//! alerts the book collected.

pub mod book;
pub mod catalogue;
pub mod commands;
pub mod ids;
pub mod participants;
pub mod pools;
pub mod revocations;
pub mod shortfalls;
pub mod state;
pub mod tenancy;
pub mod transfers;
pub mod warnings;
pub mod workspaces;

pub use book::{
    Alert, AlertStatus, Book, Consumption, LedgerEntry, LedgerKind, Lot, LotStatus, Organization,
    ParticipantRecord, Policy, Pool, Refusal, Revocation, Verdict,
};
pub use catalogue::Definition;
pub use commands::{
    Actor, Assignment, Command, CommandBody, GrantSource, GrantUnits, Input, ProductDefined,
    RevocationTarget,
};
pub use ids::{EventId, IdError, OrgId, ParticipantId, Product, Quantity, WorkspaceId};
pub use state::{PoolState, StateBody, StateChange, StateKey, WorkspaceCounts};
pub use warnings::{PoolWarning, WarningKey, WarningNumbers, WarningRecord, WarningThresholds};
pub use workspaces::WorkspaceLife;

#[cfg(test)]
mod tests;
