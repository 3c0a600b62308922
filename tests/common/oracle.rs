//! A reference model of the contract (`../shared/CONTRACT.md`: rules 1 to 9, and rules 11,
//! 12, 13 and 14 of version 2), for tests only.
//!
//! Written apart from `src/domain` and kept as naive as possible: plain strings, ordered
//! maps, one event at a time, and state recomputed from scratch where that is simpler
//! (a workspace's `required` seats are counted from the participants' latest events every
//! time they are asked for; a pool's `available` units are the sum of what is left of its
//! grants). Tests feed it the same events as the worker and compare.
//!
//! Where the contract is silent the model follows the core's observable behaviour, and
//! says so where it does:
//!
//! - a grant without `valid_from` is valid from its `occurred_at`;
//! - "oldest shortfall first" (rule 8) means the earliest `opened_at` (the time at which
//!   the shortfall opened, as published), ties by `workspace_id`;
//! - a refused manual transfer is as final as an applied one: its redelivery is a duplicate;
//! - a participant event is a duplicate when it is the participant's latest event, and
//!   stale when a newer one is known (both change nothing);
//! - a second `module-enabled` for the same (workspace, module) is a duplicate;
//! - a module counts as one unit, and a manual transfer of a module into a workspace that
//!   already holds it is refused (`already_allocated`);
//! - validity windows are brought up to `now` for an organization before each of its
//!   accepted events, and for every organization by [`Oracle::settle`] (the worker's clock):
//!   expiries first, then the grants whose time has come (a grant already past its end is
//!   credited and expired at once), then the waiting workspaces are filled;
//! - a revocation reaches the grants it names in the pool in the order of (product, grant
//!   `event_id`); a grant entering the pool meets the revocations kept for it right after
//!   its `grant` entry, oldest revocation (by `occurred_at`, then `event_id`) first;
//! - a revocation of one grant is done once it met that grant after the grant entered the
//!   pool, whatever it took;
//! - an unlimited grant's `grant`, `expiry` and `revocation` entries have quantity 1 and
//!   leave the balance as it is; while one is in the pool every product moves by itself,
//!   modules too, and a revocation ends it whatever quantity it names; transfers draw on
//!   the unlimited grant that would be drawn first among them (earliest expiry...);
//! - a `product-defined` belongs to no organization (its `org_id` here is empty); it is a
//!   duplicate when it is the product's latest definition, and stale when a later one is
//!   known (both change nothing), like a participant event;
//! - a definition that makes a module automatic first brings the validity windows of each
//!   organization waiting for it up to `now` (as before any event of that organization),
//!   then fills that organization's waiting workspaces, oldest first, caused by the
//!   definition; organizations in `org_id` order;
//! - a `workspace-updated` is a duplicate when it is the workspace's latest one, and stale
//!   when a later one is known, like a participant event; the latest replaces the whole
//!   life (a field it does not carry is not set, `archived` absent is false);
//! - whether a workspace is live is looked at (its `ends_at` against `now`) when its
//!   `workspace-updated` is applied, when an event that names it passes the tenancy check,
//!   and for every workspace by [`Oracle::settle`] (the worker's clock).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde_json::Value;

/// The quantity product; every other product handle is an advanced module.
pub const SEAT: &str = "seat";
/// The only role that may move units by hand (rule 7).
pub const MANAGER_ROLE: &str = "entitlement_manager";

/// One input event, as the input topics carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OracleEvent {
    pub event_id: String,
    pub occurred_at: DateTime<Utc>,
    pub org_id: String,
    pub body: OracleBody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OracleBody {
    ParticipantAdded {
        workspace_id: String,
        participant_id: String,
    },
    ParticipantCancelled {
        workspace_id: String,
        participant_id: String,
        activated: bool,
    },
    ModuleEnabled {
        workspace_id: String,
        module: String,
    },
    Granted {
        product: String,
        /// None for an unlimited grant (rule 12).
        quantity: Option<i64>,
        valid_from: Option<DateTime<Utc>>,
        expires_at: Option<DateTime<Utc>>,
        /// (kind, reference).
        source: Option<(String, String)>,
    },
    TransferRequested {
        workspace_id: String,
        product: String,
        quantity: i64,
        role: String,
        user_id: String,
    },
    Revoked {
        target: OracleTarget,
    },
    /// Rule 14: the catalogue's definition of a product.
    ProductDefined {
        product: String,
        name: String,
        description: Option<String>,
        /// `automatic`, `manual`, or None: `modules.auto_assign` decides.
        assignment: Option<String>,
    },
    /// Rule 13: a workspace's name, dates and archived flag.
    WorkspaceUpdated {
        workspace_id: String,
        name: Option<String>,
        starts_at: Option<DateTime<Utc>>,
        ends_at: Option<DateTime<Utc>>,
        archived: bool,
    },
}

/// What a revocation names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OracleTarget {
    Grant {
        grant_id: String,
        quantity: Option<i64>,
    },
    Source {
        kind: String,
        reference: String,
        product: Option<String>,
    },
}

/// What became of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OracleVerdict {
    Applied,
    Duplicate,
    Stale,
    /// The dead-letter reason: `tenant_mismatch`, `forbidden`, `insufficient_pool`,
    /// `already_allocated`.
    Refused(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntryKind {
    Grant,
    Transfer,
    Expiry,
    ManualTransfer,
    Revocation,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Grant => "grant",
            EntryKind::Transfer => "transfer",
            EntryKind::Expiry => "expiry",
            EntryKind::ManualTransfer => "manual_transfer",
            EntryKind::Revocation => "revocation",
        }
    }
}

/// One ledger entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OracleEntry {
    pub org_id: String,
    pub sequence: i64,
    pub kind: EntryKind,
    pub product: String,
    pub quantity: i64,
    pub workspace_id: Option<String>,
    pub pool_available_after: i64,
    pub caused_by: String,
    /// The grant whose units moved, for grant, expiry and revocation entries.
    pub grant_id: Option<String>,
    pub actor: Option<String>,
    /// Rule 12: an unlimited grant's own entry, or a transfer that drew on one.
    pub unlimited: bool,
}

/// One pool: `available` is what is left of its grants; the totals explain it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OraclePool {
    pub available: i64,
    pub granted: i64,
    pub transferred: i64,
    pub expired: i64,
    pub revoked: i64,
    /// An unlimited grant of the product is in the pool.
    pub unlimited: bool,
}

/// An open shortfall: a (workspace, product) with `required > allocated`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OracleShortfall {
    pub org_id: String,
    pub workspace_id: String,
    pub product: String,
    pub missing: i64,
    pub opened_at: DateTime<Utc>,
}

impl OracleEvent {
    /// Builds an event from the JSON of one of the input topics; `topic_kind` is the
    /// contract's default topic name (`participant-added`, `participant-cancelled`,
    /// `module-enabled`, `entitlement-granted`, `entitlement-transfer-requested`,
    /// `entitlement-revoked`, `workspace-updated`, `product-defined`; `_` for `-` is accepted
    /// too). None when the
    /// message would not reach the core (a missing or malformed field: the worker
    /// dead-letters it as `schema_violation`).
    pub fn from_json(topic_kind: &str, value: &Value) -> Option<OracleEvent> {
        let text = |field: &str| -> Option<String> {
            let text = value.get(field)?.as_str()?;
            (1..=128)
                .contains(&text.chars().count())
                .then(|| text.to_owned())
        };
        let time = |field: &str| -> Option<Option<DateTime<Utc>>> {
            match value.get(field) {
                None | Some(Value::Null) => Some(None),
                Some(raw) => DateTime::parse_from_rfc3339(raw.as_str()?)
                    .ok()
                    .map(|at| Some(at.with_timezone(&Utc))),
            }
        };
        let handle = |field: &str| -> Option<String> {
            let handle = value.get(field)?.as_str()?;
            is_product_handle(handle).then(|| handle.to_owned())
        };
        let quantity = || -> Option<i64> {
            let quantity = value.get("quantity")?.as_i64()?;
            (1..=1_000_000).contains(&quantity).then_some(quantity)
        };
        // Some(None) for `"unlimited": true` without a quantity.
        let units = || -> Option<Option<i64>> {
            let unlimited = match value.get("unlimited") {
                None | Some(Value::Null) => false,
                Some(flag) => flag.as_bool()?,
            };
            match (
                unlimited,
                value.get("quantity").is_some_and(|q| !q.is_null()),
            ) {
                (true, false) => Some(None),
                (false, _) => Some(Some(quantity()?)),
                (true, true) => None,
            }
        };
        // `None`: absent; `Some(None)`: present but not valid.
        let optional = |field: &str| -> Option<Option<&Value>> {
            match value.get(field) {
                None | Some(Value::Null) => None,
                Some(raw) => Some(Some(raw)),
            }
        };
        let source = || -> Option<Option<(String, String)>> {
            let Some(raw) = optional("source") else {
                return Some(None);
            };
            let raw = raw?;
            let kind = raw.get("kind")?.as_str()?;
            let reference = raw.get("reference")?.as_str()?;
            let kinds = ["plan", "add_on", "subscription", "trial", "manual"];
            (kinds.contains(&kind) && (1..=256).contains(&reference.chars().count()))
                .then(|| Some((kind.to_owned(), reference.to_owned())))
        };
        let topic_kind = topic_kind.replace('_', "-");
        let event_id = text("event_id")?;
        // The catalogue belongs to no organization.
        let org_id = match topic_kind.as_str() {
            "product-defined" => String::new(),
            _ => text("org_id")?,
        };
        let occurred_at = time("occurred_at")??;
        let body = match topic_kind.as_str() {
            "participant-added" => OracleBody::ParticipantAdded {
                workspace_id: text("workspace_id")?,
                participant_id: text("participant_id")?,
            },
            "participant-cancelled" => OracleBody::ParticipantCancelled {
                workspace_id: text("workspace_id")?,
                participant_id: text("participant_id")?,
                activated: value.get("activated")?.as_bool()?,
            },
            "module-enabled" => {
                let module = handle("module")?;
                if module == SEAT {
                    return None;
                }
                OracleBody::ModuleEnabled {
                    workspace_id: text("workspace_id")?,
                    module,
                }
            }
            "entitlement-granted" => {
                let valid_from = time("valid_from")?;
                let expires_at = time("expires_at")?;
                let start = valid_from.unwrap_or(occurred_at);
                if expires_at.is_some_and(|end| end <= start) {
                    return None;
                }
                OracleBody::Granted {
                    product: handle("product")?,
                    quantity: units()?,
                    valid_from,
                    expires_at,
                    source: source()?,
                }
            }
            "entitlement-revoked" => {
                if let Some(reason) = optional("reason") {
                    if reason?.as_str()?.chars().count() > 256 {
                        return None;
                    }
                }
                let product = match optional("product") {
                    None => None,
                    Some(_) => Some(handle("product")?),
                };
                let quantity = match optional("quantity") {
                    None => None,
                    Some(_) => Some(quantity()?),
                };
                let target = match (optional("grant_id"), source()?) {
                    (Some(_), None) if product.is_none() => OracleTarget::Grant {
                        grant_id: text("grant_id")?,
                        quantity,
                    },
                    (None, Some((kind, reference))) if quantity.is_none() => OracleTarget::Source {
                        kind,
                        reference,
                        product,
                    },
                    _ => return None,
                };
                OracleBody::Revoked { target }
            }
            "product-defined" => {
                let product = handle("product")?;
                let name = value.get("name")?.as_str()?;
                if !(1..=256).contains(&name.chars().count()) {
                    return None;
                }
                let description = match optional("description") {
                    None => None,
                    Some(raw) => {
                        let description = raw?.as_str()?;
                        if description.chars().count() > 2000 {
                            return None;
                        }
                        Some(description.to_owned())
                    }
                };
                let assignment = match optional("assignment") {
                    None => None,
                    Some(raw) => {
                        let assignment = raw?.as_str()?;
                        if product == SEAT || !["automatic", "manual"].contains(&assignment) {
                            return None;
                        }
                        Some(assignment.to_owned())
                    }
                };
                OracleBody::ProductDefined {
                    product,
                    name: name.to_owned(),
                    description,
                    assignment,
                }
            }
            "workspace-updated" => {
                let name = match optional("name") {
                    None => None,
                    Some(raw) => {
                        let name = raw?.as_str()?;
                        if !(1..=256).contains(&name.chars().count()) {
                            return None;
                        }
                        Some(name.to_owned())
                    }
                };
                let starts_at = time("starts_at")?;
                let ends_at = time("ends_at")?;
                if let (Some(start), Some(end)) = (starts_at, ends_at) {
                    if end <= start {
                        return None;
                    }
                }
                let archived = match optional("archived") {
                    None => false,
                    Some(raw) => raw?.as_bool()?,
                };
                OracleBody::WorkspaceUpdated {
                    workspace_id: text("workspace_id")?,
                    name,
                    starts_at,
                    ends_at,
                    archived,
                }
            }
            "entitlement-transfer-requested" | "transfer-requested" => {
                let product = handle("product")?;
                let quantity = quantity()?;
                if product != SEAT && quantity != 1 {
                    return None;
                }
                let requested_by = value.get("requested_by")?;
                let user_id = requested_by.get("user_id")?.as_str()?;
                let role = requested_by.get("role")?.as_str()?;
                if !(1..=128).contains(&user_id.chars().count()) || role.is_empty() {
                    return None;
                }
                OracleBody::TransferRequested {
                    workspace_id: text("workspace_id")?,
                    product,
                    quantity,
                    role: role.to_owned(),
                    user_id: user_id.to_owned(),
                }
            }
            _ => return None,
        };
        Some(OracleEvent {
            event_id,
            occurred_at,
            org_id,
            body,
        })
    }

    /// The workspace the event names, if any.
    pub fn workspace_id(&self) -> Option<&str> {
        match &self.body {
            OracleBody::ParticipantAdded { workspace_id, .. }
            | OracleBody::ParticipantCancelled { workspace_id, .. }
            | OracleBody::ModuleEnabled { workspace_id, .. }
            | OracleBody::TransferRequested { workspace_id, .. }
            | OracleBody::WorkspaceUpdated { workspace_id, .. } => Some(workspace_id),
            OracleBody::Granted { .. }
            | OracleBody::Revoked { .. }
            | OracleBody::ProductDefined { .. } => None,
        }
    }

    /// Grants, transfer requests and revocations are remembered by `event_id` whatever
    /// became of them.
    fn is_final_once_seen(&self) -> bool {
        matches!(
            self.body,
            OracleBody::Granted { .. }
                | OracleBody::TransferRequested { .. }
                | OracleBody::Revoked { .. }
        )
    }
}

/// `^[a-z0-9][a-z0-9._-]{0,63}$`
fn is_product_handle(handle: &str) -> bool {
    let bytes = handle.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 64
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || matches!(byte, b'.' | b'_' | b'-')
        })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GrantState {
    /// `valid_from` has not come yet.
    Waiting,
    /// In the pool: `remaining` units can be drawn.
    InPool,
    /// Expired (or credited already past its end).
    Over,
}

#[derive(Debug, Clone)]
struct Grant {
    event_id: String,
    occurred_at: DateTime<Utc>,
    org_id: String,
    product: String,
    source: Option<(String, String)>,
    /// 0 for an unlimited grant.
    quantity: i64,
    remaining: i64,
    unlimited: bool,
    valid_from: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    state: GrantState,
}

/// A revocation, kept for the grants that enter the pool after it.
#[derive(Debug, Clone)]
struct Revocation {
    event_id: String,
    occurred_at: DateTime<Utc>,
    org_id: String,
    target: OracleTarget,
    /// A revocation of one grant met it in the pool.
    done: bool,
}

impl Revocation {
    fn reaches(&self, grant: &Grant) -> bool {
        if grant.org_id != self.org_id {
            return false;
        }
        match &self.target {
            OracleTarget::Grant { grant_id, .. } => !self.done && grant_id == &grant.event_id,
            OracleTarget::Source {
                kind,
                reference,
                product,
            } => {
                grant.source.as_ref() == Some(&(kind.clone(), reference.clone()))
                    && product
                        .as_ref()
                        .is_none_or(|product| product == &grant.product)
                    && grant.occurred_at <= self.occurred_at
            }
        }
    }

    fn limit(&self) -> i64 {
        match &self.target {
            OracleTarget::Grant {
                quantity: Some(quantity),
                ..
            } => *quantity,
            _ => i64::MAX,
        }
    }
}

/// A product's latest definition (rule 14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OracleDefinition {
    pub occurred_at: DateTime<Utc>,
    pub event_id: String,
    pub name: String,
    pub description: Option<String>,
    pub assignment: Option<String>,
}

/// A workspace's life (rule 13): its latest `workspace-updated`, and whether it was live
/// when last looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OracleLife {
    pub occurred_at: DateTime<Utc>,
    pub event_id: String,
    pub name: Option<String>,
    pub starts_at: Option<DateTime<Utc>>,
    pub ends_at: Option<DateTime<Utc>>,
    pub archived: bool,
    pub live: bool,
}

impl OracleLife {
    /// Live until its end has passed or it is archived.
    fn live_at(&self, now: DateTime<Utc>) -> bool {
        !self.archived && self.ends_at.is_none_or(|end| end > now)
    }
}

#[derive(Debug, Clone)]
struct Latest {
    occurred_at: DateTime<Utc>,
    event_id: String,
    counts: bool,
}

/// The pool warnings that hold at one instant (rule 15).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OracleWarnings {
    /// (org, product) -> (available, threshold).
    pub low: BTreeMap<(String, String), (i64, i64)>,
    /// (org, product, grant) -> units still in the pool.
    pub expiring: BTreeMap<(String, String, String), i64>,
}

/// The reference model.
#[derive(Debug, Clone)]
pub struct Oracle {
    auto_assign: bool,
    /// Grants and transfer requests already seen (applied or refused).
    final_ids: BTreeSet<String>,
    /// workspace -> organization.
    owners: BTreeMap<String, String>,
    /// (workspace, participant) -> latest event.
    latest: BTreeMap<(String, String), Latest>,
    /// (workspace, module) enabled.
    enabled: BTreeSet<(String, String)>,
    /// (workspace, product) -> units transferred in.
    allocated: BTreeMap<(String, String), i64>,
    /// (workspace, product) -> when its open shortfall opened.
    opened_at: BTreeMap<(String, String), DateTime<Utc>>,
    /// (org, product) -> running totals (available is computed from the grants).
    totals: BTreeMap<(String, String), OraclePool>,
    grants: Vec<Grant>,
    /// Every revocation applied, in order.
    revocations: Vec<Revocation>,
    /// product -> its latest definition.
    definitions: BTreeMap<String, OracleDefinition>,
    /// workspace -> its life, for the workspaces ever updated.
    lives: BTreeMap<String, OracleLife>,
    ledger: Vec<OracleEntry>,
    verdicts: Vec<(String, OracleVerdict)>,
}

impl Oracle {
    /// `auto_assign` is the `modules.auto_assign` policy (rule 6).
    pub fn new(auto_assign: bool) -> Self {
        Self {
            auto_assign,
            final_ids: BTreeSet::new(),
            owners: BTreeMap::new(),
            latest: BTreeMap::new(),
            enabled: BTreeSet::new(),
            allocated: BTreeMap::new(),
            opened_at: BTreeMap::new(),
            totals: BTreeMap::new(),
            grants: Vec::new(),
            revocations: Vec::new(),
            definitions: BTreeMap::new(),
            lives: BTreeMap::new(),
            ledger: Vec::new(),
            verdicts: Vec::new(),
        }
    }

    /// Applies one event at the time `now`.
    pub fn apply(&mut self, event: &OracleEvent, now: DateTime<Utc>) -> OracleVerdict {
        let verdict = self.decide(event, now);
        self.verdicts
            .push((event.event_id.clone(), verdict.clone()));
        verdict
    }

    /// Brings every organization's validity windows up to `now` (the worker's clock).
    pub fn settle(&mut self, now: DateTime<Utc>) {
        let orgs: BTreeSet<String> = self
            .grants
            .iter()
            .map(|grant| grant.org_id.clone())
            .collect();
        for org in orgs {
            self.settle_org(&org, now);
        }
        for life in self.lives.values_mut() {
            life.live = life.live_at(now);
        }
    }

    // ---- accessors ----

    /// Counted participants for seats; 1 for an enabled module.
    pub fn required(&self, workspace: &str, product: &str) -> i64 {
        if product == SEAT {
            // The participants of `workspace` are one range of the map, keyed by
            // (workspace, participant): no scan of the others.
            self.latest
                .range((workspace.to_owned(), String::new())..)
                .take_while(|((held_in, _), _)| held_in == workspace)
                .filter(|(_, latest)| latest.counts)
                .count() as i64
        } else {
            i64::from(
                self.enabled
                    .contains(&(workspace.to_owned(), product.to_owned())),
            )
        }
    }

    pub fn allocated(&self, workspace: &str, product: &str) -> i64 {
        self.allocated
            .get(&(workspace.to_owned(), product.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    pub fn missing(&self, workspace: &str, product: &str) -> i64 {
        (self.required(workspace, product) - self.allocated(workspace, product)).max(0)
    }

    /// Every (workspace, product) that requires or holds something: (required, allocated).
    pub fn holdings(&self) -> BTreeMap<(String, String), (i64, i64)> {
        let mut keys: BTreeSet<(String, String)> = self.allocated.keys().cloned().collect();
        keys.extend(self.enabled.iter().cloned());
        // One key per workspace with participants (the map is ordered by workspace first):
        // this runs after every event, so no copy per participant.
        let mut previous: Option<&str> = None;
        for (workspace, _) in self.latest.keys() {
            if previous != Some(workspace.as_str()) {
                keys.insert((workspace.clone(), SEAT.to_owned()));
                previous = Some(workspace);
            }
        }
        keys.into_iter()
            .map(|(workspace, product)| {
                let pair = (
                    self.required(&workspace, &product),
                    self.allocated(&workspace, &product),
                );
                ((workspace, product), pair)
            })
            .filter(|(_, (required, allocated))| *required != 0 || *allocated != 0)
            .collect()
    }

    pub fn pool(&self, org: &str, product: &str) -> OraclePool {
        let mut pool = self
            .totals
            .get(&(org.to_owned(), product.to_owned()))
            .copied()
            .unwrap_or_default();
        pool.available = self
            .grants
            .iter()
            .filter(|grant| {
                grant.org_id == org && grant.product == product && grant.state == GrantState::InPool
            })
            .map(|grant| grant.remaining)
            .sum();
        pool.unlimited = self.is_unlimited(org, product);
        pool
    }

    /// Rule 12: an unlimited grant of the product is in the pool.
    pub fn is_unlimited(&self, org: &str, product: &str) -> bool {
        self.grants.iter().any(|grant| {
            grant.org_id == org
                && grant.product == product
                && grant.unlimited
                && grant.state == GrantState::InPool
        })
    }

    /// Every pool that ever received a grant, by (org, product).
    pub fn pools(&self) -> BTreeMap<(String, String), OraclePool> {
        self.totals
            .keys()
            .map(|(org, product)| ((org.clone(), product.clone()), self.pool(org, product)))
            .collect()
    }

    /// Rule 15 at `now`, computed from the grants: the pools whose `low` warning holds,
    /// with (available, threshold), and the grants whose `expiring` warning holds, with
    /// their units in the pool. The threshold is the larger of `low_units` and
    /// `low_percent` % of the units of the valid counted grants (spent ones included,
    /// revoked units not), in whole units.
    pub fn warnings(
        &self,
        now: DateTime<Utc>,
        low_percent: i64,
        low_units: i64,
        within: chrono::Duration,
    ) -> OracleWarnings {
        let mut revoked: BTreeMap<(&str, &str), i64> = BTreeMap::new();
        for entry in &self.ledger {
            if entry.kind == EntryKind::Revocation && !entry.unlimited {
                if let Some(grant) = &entry.grant_id {
                    *revoked
                        .entry((entry.org_id.as_str(), grant.as_str()))
                        .or_default() += entry.quantity;
                }
            }
        }
        let mut warnings = OracleWarnings::default();
        for (org, product) in self.totals.keys() {
            let grants = || {
                self.grants.iter().filter(move |grant| {
                    &grant.org_id == org
                        && &grant.product == product
                        && !grant.unlimited
                        && grant.state == GrantState::InPool
                })
            };
            let basis: i64 = grants()
                .filter(|grant| {
                    grant.valid_from <= now && grant.expires_at.is_none_or(|end| end > now)
                })
                .map(|grant| {
                    grant.quantity
                        - revoked
                            .get(&(org.as_str(), grant.event_id.as_str()))
                            .copied()
                            .unwrap_or(0)
                })
                .sum();
            let pool = self.pool(org, product);
            let threshold = low_units.max(basis * low_percent / 100);
            if basis > 0 && !pool.unlimited && pool.available <= threshold {
                warnings
                    .low
                    .insert((org.clone(), product.clone()), (pool.available, threshold));
            }
            for grant in grants() {
                if grant.remaining > 0 && grant.expires_at.is_some_and(|end| end - within <= now) {
                    warnings.expiring.insert(
                        (org.clone(), product.clone(), grant.event_id.clone()),
                        grant.remaining,
                    );
                }
            }
        }
        warnings
    }

    /// The whole ledger, in recording order (per organization: sequence order).
    pub fn ledger(&self) -> &[OracleEntry] {
        &self.ledger
    }

    pub fn open_shortfalls(&self) -> Vec<OracleShortfall> {
        self.opened_at
            .iter()
            .map(|((workspace, product), opened_at)| OracleShortfall {
                org_id: self.owners.get(workspace).cloned().unwrap_or_default(),
                workspace_id: workspace.clone(),
                product: product.clone(),
                missing: self.missing(workspace, product),
                opened_at: *opened_at,
            })
            .collect()
    }

    /// Every event applied so far, in order, with its verdict.
    pub fn verdicts(&self) -> &[(String, OracleVerdict)] {
        &self.verdicts
    }

    pub fn owner(&self, workspace: &str) -> Option<&str> {
        self.owners.get(workspace).map(String::as_str)
    }

    pub fn owners(&self) -> &BTreeMap<String, String> {
        &self.owners
    }

    /// workspace -> its life (rule 13), for the workspaces ever updated; any other is live
    /// and has no name.
    pub fn lives(&self) -> &BTreeMap<String, OracleLife> {
        &self.lives
    }

    /// The catalogue: product -> its latest definition.
    pub fn definitions(&self) -> &BTreeMap<String, OracleDefinition> {
        &self.definitions
    }

    /// The product's name: its latest definition's, or its handle.
    pub fn name_of(&self, product: &str) -> String {
        self.definitions
            .get(product)
            .map_or_else(|| product.to_owned(), |definition| definition.name.clone())
    }

    /// Rules 5, 6 and 14: whether units of `product` move from the pool by themselves.
    pub fn automatic(&self, product: &str) -> bool {
        let assignment = self
            .definitions
            .get(product)
            .and_then(|definition| definition.assignment.as_deref());
        self.automatic_with(product, assignment)
    }

    /// Whether `product` moves by itself with `assignment`.
    fn automatic_with(&self, product: &str, assignment: Option<&str>) -> bool {
        match assignment {
            _ if product == SEAT => true,
            Some(assignment) => assignment == "automatic",
            None => self.auto_assign,
        }
    }

    // ---- the rules ----

    fn decide(&mut self, event: &OracleEvent, now: DateTime<Utc>) -> OracleVerdict {
        if let OracleBody::ProductDefined { .. } = &event.body {
            return self.define(event, now);
        }
        // Rule 1 for grants and transfer requests: once seen, final.
        if event.is_final_once_seen() && !self.final_ids.insert(event.event_id.clone()) {
            return OracleVerdict::Duplicate;
        }
        // Rule 4: the workspace belongs to the first organization whose event was accepted.
        if let Some(workspace) = event.workspace_id() {
            if self
                .owners
                .get(workspace)
                .is_some_and(|owner| owner != &event.org_id)
            {
                return OracleVerdict::Refused("tenant_mismatch");
            }
            if let Some(life) = self.lives.get_mut(workspace) {
                life.live = life.live_at(now);
            }
        }
        let org = event.org_id.as_str();
        self.settle_org(org, now);
        match &event.body {
            OracleBody::ParticipantAdded {
                workspace_id,
                participant_id,
            } => self.participant(event, workspace_id, participant_id, true, now),
            OracleBody::ParticipantCancelled {
                workspace_id,
                participant_id,
                activated,
            } => self.participant(event, workspace_id, participant_id, *activated, now),
            OracleBody::ModuleEnabled {
                workspace_id,
                module,
            } => {
                let key = (workspace_id.clone(), module.clone());
                if self.enabled.contains(&key) {
                    return OracleVerdict::Duplicate;
                }
                self.claim(workspace_id, org);
                self.enabled.insert(key);
                self.track(now);
                self.fill(org, module, &event.event_id, now);
                OracleVerdict::Applied
            }
            OracleBody::Granted {
                product,
                quantity,
                valid_from,
                expires_at,
                source,
            } => {
                self.grants.push(Grant {
                    event_id: event.event_id.clone(),
                    occurred_at: event.occurred_at,
                    org_id: org.to_owned(),
                    product: product.clone(),
                    source: source.clone(),
                    quantity: quantity.unwrap_or(0),
                    remaining: 0,
                    unlimited: quantity.is_none(),
                    valid_from: valid_from.unwrap_or(event.occurred_at),
                    expires_at: *expires_at,
                    state: GrantState::Waiting,
                });
                self.totals
                    .entry((org.to_owned(), product.clone()))
                    .or_default();
                self.settle_org(org, now);
                OracleVerdict::Applied
            }
            OracleBody::TransferRequested {
                workspace_id,
                product,
                quantity,
                role,
                user_id,
            } => {
                // Rule 7: the role, then the whole quantity.
                if role != MANAGER_ROLE {
                    return OracleVerdict::Refused("forbidden");
                }
                if product != SEAT && self.allocated(workspace_id, product) >= 1 {
                    return OracleVerdict::Refused("already_allocated");
                }
                let unlimited = self.is_unlimited(org, product);
                if !unlimited && self.pool(org, product).available < *quantity {
                    return OracleVerdict::Refused("insufficient_pool");
                }
                self.claim(workspace_id, org);
                if !unlimited {
                    self.draw(org, product, *quantity);
                }
                *self
                    .allocated
                    .entry((workspace_id.clone(), product.clone()))
                    .or_default() += quantity;
                self.record(
                    org,
                    EntryKind::ManualTransfer,
                    product,
                    *quantity,
                    Some(workspace_id),
                    &event.event_id,
                    None,
                    Some(user_id),
                );
                self.mark_unlimited(unlimited);
                self.track(now);
                OracleVerdict::Applied
            }
            OracleBody::ProductDefined { .. } => unreachable!("decided by define() above"),
            OracleBody::WorkspaceUpdated {
                workspace_id,
                name,
                starts_at,
                ends_at,
                archived,
            } => {
                if let Some(life) = self.lives.get(workspace_id) {
                    if life.event_id == event.event_id {
                        return OracleVerdict::Duplicate;
                    }
                    if (event.occurred_at, &event.event_id) < (life.occurred_at, &life.event_id) {
                        return OracleVerdict::Stale;
                    }
                }
                self.claim(workspace_id, org);
                let mut life = OracleLife {
                    occurred_at: event.occurred_at,
                    event_id: event.event_id.clone(),
                    name: name.clone(),
                    starts_at: *starts_at,
                    ends_at: *ends_at,
                    archived: *archived,
                    live: true,
                };
                life.live = life.live_at(now);
                self.lives.insert(workspace_id.clone(), life);
                OracleVerdict::Applied
            }
            OracleBody::Revoked { target } => {
                self.revocations.push(Revocation {
                    event_id: event.event_id.clone(),
                    occurred_at: event.occurred_at,
                    org_id: org.to_owned(),
                    target: target.clone(),
                    done: false,
                });
                let revocation = self.revocations.len() - 1;
                let mut reached: Vec<(String, String, usize)> = self
                    .grants
                    .iter()
                    .enumerate()
                    .filter(|(_, grant)| {
                        grant.state != GrantState::Waiting
                            && self.revocations[revocation].reaches(grant)
                    })
                    .map(|(index, grant)| (grant.product.clone(), grant.event_id.clone(), index))
                    .collect();
                reached.sort();
                for (_, _, grant) in reached {
                    self.take(revocation, grant);
                }
                OracleVerdict::Applied
            }
        }
    }

    /// Rule 14: the latest definition by (`occurred_at`, `event_id`) wins; a module that
    /// becomes automatic fills the waiting workspaces of every organization.
    fn define(&mut self, event: &OracleEvent, now: DateTime<Utc>) -> OracleVerdict {
        let OracleBody::ProductDefined {
            product,
            name,
            description,
            assignment,
        } = &event.body
        else {
            unreachable!("define() is called for definitions only");
        };
        if let Some(latest) = self.definitions.get(product) {
            if latest.event_id == event.event_id {
                return OracleVerdict::Duplicate;
            }
            if (event.occurred_at, &event.event_id) < (latest.occurred_at, &latest.event_id) {
                return OracleVerdict::Stale;
            }
        }
        let becomes_automatic =
            !self.automatic(product) && self.automatic_with(product, assignment.as_deref());
        let waiting: BTreeSet<String> = if becomes_automatic {
            self.open_shortfalls()
                .into_iter()
                .filter(|shortfall| &shortfall.product == product)
                .map(|shortfall| shortfall.org_id)
                .collect()
        } else {
            BTreeSet::new()
        };
        // Time first, under the module's old assignment, as before any event of theirs.
        for org in &waiting {
            self.settle_org(org, now);
        }
        self.definitions.insert(
            product.clone(),
            OracleDefinition {
                occurred_at: event.occurred_at,
                event_id: event.event_id.clone(),
                name: name.clone(),
                description: description.clone(),
                assignment: assignment.clone(),
            },
        );
        for org in &waiting {
            self.fill(org, product, &event.event_id, now);
        }
        OracleVerdict::Applied
    }

    /// Rule 11: what `revocation` may take of what `grant` has left in the pool, with one
    /// `revocation` entry when that is more than nothing.
    fn take(&mut self, revocation: usize, grant: usize) {
        let limit = self.revocations[revocation].limit();
        if matches!(
            self.revocations[revocation].target,
            OracleTarget::Grant { .. }
        ) {
            self.revocations[revocation].done = true;
        }
        if self.grants[grant].unlimited {
            // Rule 12: a revoked unlimited grant ends, whatever the quantity named.
            if self.grants[grant].state != GrantState::InPool {
                return;
            }
            self.grants[grant].state = GrantState::Over;
            let (org, product, grant_id) = {
                let grant = &self.grants[grant];
                (
                    grant.org_id.clone(),
                    grant.product.clone(),
                    grant.event_id.clone(),
                )
            };
            let cause = self.revocations[revocation].event_id.clone();
            self.record(
                &org,
                EntryKind::Revocation,
                &product,
                1,
                None,
                &cause,
                Some(&grant_id),
                None,
            );
            self.mark_unlimited(true);
            return;
        }
        let taken = if self.grants[grant].state == GrantState::InPool {
            limit.min(self.grants[grant].remaining)
        } else {
            0
        };
        if taken == 0 {
            return;
        }
        self.grants[grant].remaining -= taken;
        let (org, product, grant_id) = {
            let grant = &self.grants[grant];
            (
                grant.org_id.clone(),
                grant.product.clone(),
                grant.event_id.clone(),
            )
        };
        self.total(&org, &product).revoked += taken;
        let cause = self.revocations[revocation].event_id.clone();
        self.record(
            &org,
            EntryKind::Revocation,
            &product,
            taken,
            None,
            &cause,
            Some(&grant_id),
            None,
        );
    }

    /// The revocations kept for a grant that just entered the pool, oldest first.
    fn revoke_on_arrival(&mut self, grant: usize) {
        let mut kept: Vec<(DateTime<Utc>, String, usize)> = self
            .revocations
            .iter()
            .enumerate()
            .filter(|(_, revocation)| revocation.org_id == self.grants[grant].org_id)
            .map(|(index, revocation)| (revocation.occurred_at, revocation.event_id.clone(), index))
            .collect();
        kept.sort();
        for (_, _, revocation) in kept {
            if self.revocations[revocation].reaches(&self.grants[grant]) {
                self.take(revocation, grant);
            }
        }
    }

    /// Rules 2 and 3: the latest event by (`occurred_at`, `event_id`) decides; a participant
    /// counts unless that event is a cancellation without activation.
    fn participant(
        &mut self,
        event: &OracleEvent,
        workspace: &str,
        participant: &str,
        counts: bool,
        now: DateTime<Utc>,
    ) -> OracleVerdict {
        let key = (workspace.to_owned(), participant.to_owned());
        if let Some(latest) = self.latest.get(&key) {
            if latest.event_id == event.event_id {
                return OracleVerdict::Duplicate;
            }
            if (event.occurred_at, &event.event_id) < (latest.occurred_at, &latest.event_id) {
                return OracleVerdict::Stale;
            }
        }
        self.claim(workspace, &event.org_id);
        self.latest.insert(
            key,
            Latest {
                occurred_at: event.occurred_at,
                event_id: event.event_id.clone(),
                counts,
            },
        );
        self.track(now);
        self.fill(&event.org_id, SEAT, &event.event_id, now);
        OracleVerdict::Applied
    }

    fn claim(&mut self, workspace: &str, org: &str) {
        self.owners
            .entry(workspace.to_owned())
            .or_insert_with(|| org.to_owned());
    }

    /// Rule 9 and the validity windows, for one organization: expiries, then grants whose
    /// time has come, then a refill with what they brought (rule 8).
    fn settle_org(&mut self, org: &str, now: DateTime<Utc>) {
        let products: BTreeSet<String> = self
            .grants
            .iter()
            .filter(|grant| grant.org_id == org)
            .map(|grant| grant.product.clone())
            .collect();
        for product in products {
            let mut ending: Vec<usize> = (0..self.grants.len())
                .filter(|&index| {
                    let grant = &self.grants[index];
                    grant.org_id == org
                        && grant.product == product
                        && grant.state == GrantState::InPool
                        && grant.expires_at.is_some_and(|end| end <= now)
                })
                .collect();
            ending.sort_by_key(|&index| self.draw_key(index));
            for index in ending {
                let left = self.grants[index].remaining;
                self.grants[index].remaining = 0;
                self.grants[index].state = GrantState::Over;
                if self.grants[index].unlimited {
                    let cause = self.grants[index].event_id.clone();
                    self.record(
                        org,
                        EntryKind::Expiry,
                        &product,
                        1,
                        None,
                        &cause,
                        Some(&cause),
                        None,
                    );
                    self.mark_unlimited(true);
                } else if left > 0 {
                    self.total(org, &product).expired += left;
                    let cause = self.grants[index].event_id.clone();
                    self.record(
                        org,
                        EntryKind::Expiry,
                        &product,
                        left,
                        None,
                        &cause,
                        Some(&cause),
                        None,
                    );
                }
            }

            let mut starting: Vec<usize> = (0..self.grants.len())
                .filter(|&index| {
                    let grant = &self.grants[index];
                    grant.org_id == org
                        && grant.product == product
                        && grant.state == GrantState::Waiting
                        && grant.valid_from <= now
                })
                .collect();
            starting.sort_by_key(|&index| {
                let grant = &self.grants[index];
                (grant.valid_from, grant.event_id.clone())
            });
            let mut credited = None;
            for index in starting {
                let unlimited = self.grants[index].unlimited;
                // An unlimited grant's entries move 1 unit that no balance counts.
                let quantity = if unlimited {
                    1
                } else {
                    self.grants[index].quantity
                };
                let cause = self.grants[index].event_id.clone();
                self.grants[index].state = GrantState::InPool;
                if !unlimited {
                    self.grants[index].remaining = quantity;
                    self.total(org, &product).granted += quantity;
                }
                self.record(
                    org,
                    EntryKind::Grant,
                    &product,
                    quantity,
                    None,
                    &cause,
                    Some(&cause),
                    None,
                );
                self.mark_unlimited(unlimited);
                if self.grants[index].expires_at.is_some_and(|end| end <= now) {
                    self.grants[index].state = GrantState::Over;
                    self.grants[index].remaining = 0;
                    if !unlimited {
                        self.total(org, &product).expired += quantity;
                    }
                    self.record(
                        org,
                        EntryKind::Expiry,
                        &product,
                        quantity,
                        None,
                        &cause,
                        Some(&cause),
                        None,
                    );
                    self.mark_unlimited(unlimited);
                } else {
                    // Rule 11: revocations that came first take their share at once.
                    self.revoke_on_arrival(index);
                    credited = Some(cause);
                }
            }
            if let Some(cause) = credited {
                self.fill(org, &product, &cause, now);
            }
        }
    }

    /// Rule 5 (and 6 and 14 when the module is automatic): every waiting workspace of the
    /// organization gets `min(missing, available)`, oldest shortfall first.
    fn fill(&mut self, org: &str, product: &str, cause: &str, now: DateTime<Utc>) {
        let unlimited = self.is_unlimited(org, product);
        if !self.automatic(product) && !unlimited {
            return;
        }
        self.track(now);
        let mut waiting: Vec<(DateTime<Utc>, String)> = self
            .opened_at
            .iter()
            .filter(|((workspace, held), _)| {
                held == product && self.owners.get(workspace).map(String::as_str) == Some(org)
            })
            .map(|((workspace, _), opened_at)| (*opened_at, workspace.clone()))
            .collect();
        waiting.sort();
        for (_, workspace) in waiting {
            let missing = self.missing(&workspace, product);
            let moved = if unlimited {
                missing
            } else {
                missing.min(self.pool(org, product).available)
            };
            if moved == 0 {
                continue;
            }
            if !unlimited {
                self.draw(org, product, moved);
            }
            *self
                .allocated
                .entry((workspace.clone(), product.to_owned()))
                .or_default() += moved;
            self.record(
                org,
                EntryKind::Transfer,
                product,
                moved,
                Some(&workspace),
                cause,
                None,
                None,
            );
            self.mark_unlimited(unlimited);
        }
        self.track(now);
    }

    /// Opens a shortfall where something is missing, closes it where nothing is.
    fn track(&mut self, now: DateTime<Utc>) {
        let holdings = self.holdings();
        for ((workspace, product), (required, allocated)) in holdings {
            let key = (workspace, product);
            if required > allocated {
                self.opened_at.entry(key).or_insert(now);
            } else {
                self.opened_at.remove(&key);
            }
        }
        let still_missing: Vec<(String, String)> = self
            .opened_at
            .keys()
            .filter(|(workspace, product)| self.missing(workspace, product) == 0)
            .cloned()
            .collect();
        for key in still_missing {
            self.opened_at.remove(&key);
        }
    }

    /// Earliest expiry first, units that never expire last; then by start, then by grant.
    fn draw_key(&self, index: usize) -> (bool, Option<DateTime<Utc>>, DateTime<Utc>, String) {
        let grant = &self.grants[index];
        (
            grant.expires_at.is_none(),
            grant.expires_at,
            grant.valid_from,
            grant.event_id.clone(),
        )
    }

    fn draw(&mut self, org: &str, product: &str, quantity: i64) {
        assert!(
            quantity <= self.pool(org, product).available,
            "the oracle never draws more than the pool holds"
        );
        let mut order: Vec<usize> = (0..self.grants.len())
            .filter(|&index| {
                let grant = &self.grants[index];
                grant.org_id == org && grant.product == product && grant.state == GrantState::InPool
            })
            .collect();
        order.sort_by_key(|&index| self.draw_key(index));
        let mut left = quantity;
        for index in order {
            let take = left.min(self.grants[index].remaining);
            self.grants[index].remaining -= take;
            left -= take;
        }
        assert_eq!(left, 0);
        self.total(org, product).transferred += quantity;
    }

    fn total(&mut self, org: &str, product: &str) -> &mut OraclePool {
        self.totals
            .entry((org.to_owned(), product.to_owned()))
            .or_default()
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        org: &str,
        kind: EntryKind,
        product: &str,
        quantity: i64,
        workspace: Option<&str>,
        cause: &str,
        grant: Option<&str>,
        actor: Option<&str>,
    ) {
        let sequence = self
            .ledger
            .iter()
            .filter(|entry| entry.org_id == org)
            .count() as i64
            + 1;
        let pool_available_after = self.pool(org, product).available;
        self.ledger.push(OracleEntry {
            org_id: org.to_owned(),
            sequence,
            kind,
            product: product.to_owned(),
            quantity,
            workspace_id: workspace.map(str::to_owned),
            pool_available_after,
            caused_by: cause.to_owned(),
            grant_id: grant.map(str::to_owned),
            actor: actor.map(str::to_owned),
            unlimited: false,
        });
    }

    /// Rule 12: marks the entry just recorded as an unlimited grant's, or as a transfer
    /// that drew on one.
    fn mark_unlimited(&mut self, unlimited: bool) {
        if let Some(entry) = self.ledger.last_mut() {
            entry.unlimited |= unlimited;
        }
    }
}
