//! The book: the slice of state one batch needs (organizations, pools and their lots,
//! workspace consumption and life, participants), and the effects the batch produced. The store
//! loads it, the rules in the sibling modules change it, the store writes back what is
//! marked dirty.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::catalogue::Definition;
use super::commands::{Command, CommandBody, Input, RevocationTarget};
use super::ids::{EventId, OrgId, ParticipantId, Product, WorkspaceId};
use super::state::{PoolState, StateChange, WorkspaceCounts};
use super::warnings::{PoolWarning, WarningKey, WarningRecord, WarningThresholds};
use super::workspaces::{LifeUpdate, WorkspaceLife};

/// How the organization's modules are handed out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// When true, an enabled module moves from the pool by itself, like seats (rule 6),
    /// unless the catalogue gives it an assignment of its own (rule 14).
    pub modules_auto_assign: bool,
    /// The thresholds of pool warnings (rule 15).
    pub warnings: WarningThresholds,
}

/// One organization's ledger position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Organization {
    /// The sequence of the organization's last ledger entry; 0 before the first.
    pub last_sequence: i64,
    pub dirty: bool,
}

/// An organization's pool of one product: the counted units available now and the running
/// totals that explain them (`available = granted - transferred - expired - revoked`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pool {
    pub available: i64,
    pub granted_total: i64,
    pub transferred_total: i64,
    pub expired_total: i64,
    pub revoked_total: i64,
    /// An unlimited grant of the product is valid now (rule 12); the counted units and
    /// totals above are kept apart from it.
    pub unlimited: bool,
    /// The `version` of the pool's last state message (0: none yet).
    pub state_version: i64,
    /// The pool's state as stored before the batch, which its last state message carried;
    /// None for a pool not stored yet.
    pub loaded_state: Option<PoolState>,
    /// The input that last changed the pool in this batch: its state message's `caused_by`.
    pub last_cause: Option<EventId>,
    pub dirty: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LotStatus {
    /// Granted, but `valid_from` is still in the future.
    Pending,
    /// In the pool: its remaining units can be drawn.
    Active,
    /// Every unit was transferred.
    Spent,
    /// `expires_at` passed; what was left left the pool with an expiry entry.
    Expired,
    /// Revocations took every unit that was left (rule 11).
    Revoked,
}

impl LotStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LotStatus::Pending => "pending",
            LotStatus::Active => "active",
            LotStatus::Spent => "spent",
            LotStatus::Expired => "expired",
            LotStatus::Revoked => "revoked",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "pending" => LotStatus::Pending,
            "active" => LotStatus::Active,
            "spent" => LotStatus::Spent,
            "expired" => LotStatus::Expired,
            "revoked" => LotStatus::Revoked,
            _ => return None,
        })
    }
}

/// The units of one grant, with their validity window. An unlimited grant's lot counts no
/// units (`quantity`, `remaining`, `revoked` and `expired` are 0): while it is active, its
/// product has no limit, and `drawn` says how many units it gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lot {
    /// The grant's `event_id`.
    pub lot_id: EventId,
    pub org_id: OrgId,
    pub product: Product,
    pub quantity: i64,
    pub remaining: i64,
    /// Units revocations took out of the pool (rule 11); never more than the lot had left.
    pub revoked: i64,
    /// Units transferred to workspaces from this lot.
    pub drawn: i64,
    /// Units that left the pool when the lot expired.
    pub expired: i64,
    /// An unlimited grant (rule 12).
    pub unlimited: bool,
    /// The grant's `occurred_at`: a revocation of its source reaches it when it is not
    /// after the revocation's own.
    pub occurred_at: DateTime<Utc>,
    pub valid_from: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub status: LotStatus,
    pub source_kind: Option<String>,
    pub source_reference: Option<String>,
    /// True when the lot was created in this batch (the store inserts it).
    pub is_new: bool,
    pub dirty: bool,
}

/// One workspace's consumption of one product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumption {
    pub org_id: OrgId,
    /// Counted participants for seats; 1 for an enabled module.
    pub required: i64,
    /// Units transferred into the workspace; never goes down.
    pub allocated: i64,
    /// When the current shortfall opened; None while nothing is missing. Refills serve
    /// the oldest first.
    pub shortfall_since: Option<DateTime<Utc>>,
    /// The `missing` count last published on the shortfall topic (0: none open).
    pub reported_missing: i64,
    /// The `opened_at` of the open shortfall last published; None when none is open.
    pub reported_opened_at: Option<DateTime<Utc>>,
    /// How many alerts this (workspace, product) has published; part of the alert id.
    pub alert_revision: i64,
    /// The event that last changed it: the alert's `caused_by`.
    pub last_cause: Option<EventId>,
    /// The `version` of its last state message (0: none yet).
    pub state_version: i64,
    /// `required` and `allocated` as stored before the batch, which its last state message
    /// carried; None for a row not stored yet.
    pub loaded_counts: Option<WorkspaceCounts>,
    /// True when the row is not stored yet (the store inserts it rather than updating it).
    pub is_new: bool,
    pub dirty: bool,
}

impl Consumption {
    pub fn new(org_id: OrgId) -> Self {
        Self {
            org_id,
            required: 0,
            allocated: 0,
            shortfall_since: None,
            reported_missing: 0,
            reported_opened_at: None,
            alert_revision: 0,
            last_cause: None,
            state_version: 0,
            loaded_counts: None,
            is_new: true,
            dirty: false,
        }
    }

    /// `missing = required - allocated`, never below 0.
    pub fn missing(&self) -> i64 {
        (self.required - self.allocated).max(0)
    }
}

/// A participant's latest event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParticipantRecord {
    pub last_event_at: DateTime<Utc>,
    pub last_event_id: EventId,
    pub counted: bool,
    /// True when the row is not stored yet (the store inserts it rather than updating it).
    pub is_new: bool,
    pub dirty: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LedgerKind {
    Grant,
    Transfer,
    Expiry,
    ManualTransfer,
    Revocation,
}

impl LedgerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerKind::Grant => "grant",
            LedgerKind::Transfer => "transfer",
            LedgerKind::Expiry => "expiry",
            LedgerKind::ManualTransfer => "manual_transfer",
            LedgerKind::Revocation => "revocation",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "grant" => LedgerKind::Grant,
            "transfer" => LedgerKind::Transfer,
            "expiry" => LedgerKind::Expiry,
            "manual_transfer" => LedgerKind::ManualTransfer,
            "revocation" => LedgerKind::Revocation,
            _ => return None,
        })
    }
}

/// One ledger entry, as recorded and published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub org_id: OrgId,
    pub sequence: i64,
    pub product: Product,
    pub kind: LedgerKind,
    pub quantity: i64,
    pub workspace_id: Option<WorkspaceId>,
    pub pool_available_after: i64,
    pub caused_by: EventId,
    /// The grant whose units the entry moved, for `grant`, `expiry` and `revocation`
    /// entries (a revocation's `caused_by` is the revocation, not the grant).
    pub grant_id: Option<EventId>,
    pub actor: Option<String>,
    /// Rule 12: the entry is about an unlimited grant (it became valid, expired or was
    /// revoked), or the transfer drew on one. Its quantity does not count in the pool's
    /// balance, and `pool_available_after` counts counted units only.
    pub unlimited: bool,
    pub recorded_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertStatus {
    Open,
    Resolved,
}

impl AlertStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertStatus::Open => "open",
            AlertStatus::Resolved => "resolved",
        }
    }
}

/// A change of a shortfall, to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub org_id: OrgId,
    pub workspace_id: WorkspaceId,
    pub product: Product,
    pub status: AlertStatus,
    pub required: i64,
    pub allocated: i64,
    pub missing: i64,
    pub opened_at: DateTime<Utc>,
    pub occurred_at: DateTime<Utc>,
    pub caused_by: EventId,
    /// Counts the alerts of this (workspace, product), from 1: with them it makes the id.
    pub revision: i64,
}

/// Why the core refused a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The workspace belongs to another organization (rule 4).
    TenantMismatch,
    /// A manual transfer by someone without the entitlement manager role (rule 7).
    Forbidden,
    /// A manual transfer larger than the pool (rule 7).
    InsufficientPool,
    /// A manual transfer of a module the workspace already holds.
    AlreadyAllocated,
}

impl Refusal {
    /// The dead-letter `reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::TenantMismatch => "tenant_mismatch",
            Refusal::Forbidden => "forbidden",
            Refusal::InsufficientPool => "insufficient_pool",
            Refusal::AlreadyAllocated => "already_allocated",
        }
    }
}

/// What became of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Applied,
    /// The same `event_id` was already applied: nothing changes (rule 1).
    Duplicate,
    /// An older participant, definition or workspace-updated event arrived after a newer
    /// one: nothing changes (rules 2, 13 and 14).
    Stale,
    Refused {
        refusal: Refusal,
        detail: String,
    },
}

/// A revocation the book keeps (rule 11): it reaches grants that arrive, or become
/// valid, after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub event_id: EventId,
    pub org_id: OrgId,
    pub occurred_at: DateTime<Utc>,
    pub target: RevocationTarget,
    pub reason: Option<String>,
    /// For a revocation of one grant: true once it took what it could from that grant's
    /// units in the pool (it is done then, whatever it took). A revocation of a source is
    /// never done: later grants of the source may still fall under it.
    pub applied: bool,
    /// True when the revocation is not stored yet (the store inserts it).
    pub is_new: bool,
    pub dirty: bool,
}

impl Revocation {
    /// Whether the revocation reaches `lot`.
    pub fn reaches(&self, lot: &Lot) -> bool {
        if self.org_id != lot.org_id {
            return false;
        }
        match &self.target {
            RevocationTarget::Grant { grant_id, .. } => !self.applied && grant_id == &lot.lot_id,
            RevocationTarget::Source { source, product } => {
                lot.source_kind.as_deref() == Some(source.kind.as_str())
                    && lot.source_reference.as_deref() == Some(source.reference.as_str())
                    && product
                        .as_ref()
                        .is_none_or(|product| product == &lot.product)
                    && lot.occurred_at <= self.occurred_at
            }
        }
    }

    /// The most units the revocation may take from one lot.
    pub fn limit(&self) -> i64 {
        match &self.target {
            RevocationTarget::Grant {
                quantity: Some(quantity),
                ..
            } => quantity.get(),
            _ => i64::MAX,
        }
    }
}

/// The slice of state a batch works on, and what the batch produced.
#[derive(Debug, Default)]
pub struct Book {
    /// How modules are handed out; set once for the whole batch.
    pub policy: Policy,
    /// The catalogue's definitions of the products the batch names or may move (rule 14);
    /// a product missing from it was never defined.
    pub catalogue: HashMap<Product, Definition>,
    pub organizations: HashMap<OrgId, Organization>,
    pub pools: HashMap<(OrgId, Product), Pool>,
    /// Pending and active lots of the organizations in the book, by pool.
    pub lots: HashMap<(OrgId, Product), Vec<Lot>>,
    /// The revocations of the organizations in the book, in the order they were applied.
    pub revocations: HashMap<OrgId, Vec<Revocation>>,
    /// Workspace owners known before the batch.
    pub owners: HashMap<WorkspaceId, OrgId>,
    /// Workspaces first claimed in this batch; the store inserts them.
    pub new_claims: Vec<(WorkspaceId, OrgId)>,
    /// The lives of the workspaces in the book that were ever updated (rule 13); a
    /// workspace missing from it is live and has no name.
    pub workspaces: HashMap<WorkspaceId, WorkspaceLife>,
    pub consumption: HashMap<(WorkspaceId, Product), Consumption>,
    pub participants: HashMap<(WorkspaceId, ParticipantId), ParticipantRecord>,
    /// Deduplicated events already applied, stored or earlier in this batch. Event ids are
    /// the producers' choice, so they are unique only within an organization.
    pub processed: HashSet<(OrgId, EventId)>,
    /// Deduplicated events applied in this batch; the store inserts them.
    pub newly_processed: Vec<(OrgId, EventId)>,
    /// Organizations whose lots were already brought up to the batch's time.
    pub settled: HashSet<OrgId>,
    /// Organizations whose open shortfalls the store did not load, because nothing in the
    /// batch can credit their pools (no grant, no lot becoming valid). A refill needs every
    /// open shortfall of the organization, so one here is a bug in the store's choice.
    pub shortfalls_not_loaded: HashSet<OrgId>,
    /// Ledger entries of this batch, in sequence order per organization.
    pub ledger: Vec<LedgerEntry>,
    /// Shortfall changes of this batch, filled by `finish`.
    pub alerts: Vec<Alert>,
    /// The new state of every key the batch changed, filled by `finish`.
    pub states: Vec<StateChange>,
    /// The pool warnings (rule 15) of the organizations in the book as last published:
    /// every open one, every `low` one and every resolved `expiring` one whose grant still
    /// has units in the pool.
    pub warnings: HashMap<WarningKey, WarningRecord>,
    /// Pool warning changes of this batch, filled by `finish`.
    pub pool_warnings: Vec<PoolWarning>,
}

impl Book {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    /// Applies one input at the time `now` and says what became of it.
    pub fn apply_input(&mut self, input: &Input, now: DateTime<Utc>) -> Verdict {
        match input {
            Input::Command(command) => self.apply(command, now),
            Input::ProductDefined(definition) => self.define(definition, now),
        }
    }

    /// Applies one command at the time `now` and says what became of it.
    pub fn apply(&mut self, command: &Command, now: DateTime<Utc>) -> Verdict {
        let key = (command.org_id.clone(), command.event_id.clone());
        if command.needs_deduplication() && self.processed.contains(&key) {
            return Verdict::Duplicate;
        }
        let verdict = self.decide(command, now);
        // A refused request is as final as an applied one: its redelivery must not succeed
        // later, when the pool or the tenancy has changed.
        if command.needs_deduplication() && verdict != Verdict::Duplicate {
            self.processed.insert(key.clone());
            self.newly_processed.push(key);
        }
        verdict
    }

    fn decide(&mut self, command: &Command, now: DateTime<Utc>) -> Verdict {
        if let Some(workspace_id) = command.workspace_id() {
            if !self.may_name(workspace_id, &command.org_id) {
                return Verdict::Refused {
                    refusal: Refusal::TenantMismatch,
                    detail: format!(
                        "Workspace {:?} belongs to another organization, not to {:?}; \
                         the event changes nothing.",
                        workspace_id.as_str(),
                        command.org_id.as_str()
                    ),
                };
            }
        }
        self.settle_time(&command.org_id, now);
        if let Some(workspace_id) = command.workspace_id() {
            self.refresh_life(workspace_id, now);
        }
        let verdict = match &command.body {
            CommandBody::ParticipantAdded {
                workspace_id,
                participant_id,
            } => self.record_participant_event(command, workspace_id, participant_id, None, now),
            CommandBody::ParticipantCancelled {
                workspace_id,
                participant_id,
                activated,
            } => self.record_participant_event(
                command,
                workspace_id,
                participant_id,
                Some(*activated),
                now,
            ),
            CommandBody::ModuleEnabled {
                workspace_id,
                module,
            } => self.enable_module(command, workspace_id, module, now),
            CommandBody::EntitlementGranted { .. } => self.grant(command, now),
            CommandBody::TransferRequested { .. } => self.manual_transfer(command, now),
            CommandBody::EntitlementRevoked { .. } => self.revoke(command, now),
            CommandBody::WorkspaceUpdated {
                workspace_id,
                name,
                starts_at,
                ends_at,
                archived,
            } => self.update_life(
                command,
                workspace_id,
                LifeUpdate {
                    name: name.as_deref(),
                    starts_at: *starts_at,
                    ends_at: *ends_at,
                    archived: *archived,
                },
                now,
            ),
        };
        if verdict == Verdict::Applied {
            if let Some(workspace_id) = command.workspace_id() {
                self.claim(workspace_id, &command.org_id);
            }
        }
        verdict
    }

    /// Ends the batch: publishes the shortfall and pool warning changes it made and the new
    /// state of what it changed.
    pub fn finish(&mut self, now: DateTime<Utc>) {
        self.collect_alerts(now);
        self.collect_warnings(now);
        self.collect_states(now);
    }

    pub(crate) fn organization_mut(&mut self, org_id: &OrgId) -> &mut Organization {
        self.organizations.entry(org_id.clone()).or_default()
    }

    pub(crate) fn pool_mut(&mut self, org_id: &OrgId, product: &Product) -> &mut Pool {
        self.pools
            .entry((org_id.clone(), product.clone()))
            .or_default()
    }

    pub fn pool(&self, org_id: &OrgId, product: &Product) -> Pool {
        self.pools
            .get(&(org_id.clone(), product.clone()))
            .cloned()
            .unwrap_or_default()
    }

    pub(crate) fn consumption_mut(
        &mut self,
        workspace_id: &WorkspaceId,
        product: &Product,
        org_id: &OrgId,
    ) -> &mut Consumption {
        self.consumption
            .entry((workspace_id.clone(), product.clone()))
            .or_insert_with(|| Consumption::new(org_id.clone()))
    }

    /// Appends a ledger entry with the organization's next sequence number.
    pub(crate) fn record(&mut self, org_id: &OrgId, movement: Movement<'_>, now: DateTime<Utc>) {
        debug_assert!(
            movement.quantity > 0,
            "a ledger entry moves at least one unit"
        );
        let pool = self.pool_mut(org_id, movement.product);
        pool.last_cause = Some(movement.caused_by.clone());
        let pool_available_after = pool.available;
        debug_assert!(pool_available_after >= 0, "a pool never goes negative");
        let organization = self.organization_mut(org_id);
        organization.last_sequence += 1;
        organization.dirty = true;
        let sequence = organization.last_sequence;
        self.ledger.push(LedgerEntry {
            org_id: org_id.clone(),
            sequence,
            product: movement.product.clone(),
            kind: movement.kind,
            quantity: movement.quantity,
            workspace_id: movement.workspace_id.cloned(),
            pool_available_after,
            caused_by: movement.caused_by.clone(),
            grant_id: movement.grant_id.cloned(),
            actor: movement.actor.map(str::to_owned),
            unlimited: movement.unlimited,
            recorded_at: now,
        });
    }
}

/// What a ledger entry records, before it gets its sequence number.
pub(crate) struct Movement<'a> {
    pub product: &'a Product,
    pub kind: LedgerKind,
    pub quantity: i64,
    pub workspace_id: Option<&'a WorkspaceId>,
    pub caused_by: &'a EventId,
    pub grant_id: Option<&'a EventId>,
    pub actor: Option<&'a str>,
    pub unlimited: bool,
}
