//! The entitlement state (version 2's `entitlement-state`): after each batch, the whole new
//! state of every workspace-product and every pool whose state the batch changed, with a
//! per-key `version` that increases with every message. A key whose state the batch left
//! as it was gets no message.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::book::{Book, LotStatus};
use super::ids::{EventId, OrgId, Product, WorkspaceId};
use super::shortfalls::ID_NAMESPACE;

/// A pool's state: counted units now, units not valid yet, whether the product is
/// unlimited now, and the running totals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolState {
    pub available: i64,
    pub pending: i64,
    pub unlimited: bool,
    pub granted: i64,
    pub transferred: i64,
    pub expired: i64,
    pub revoked: i64,
}

/// A workspace's counts of one product.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkspaceCounts {
    pub required: i64,
    pub allocated: i64,
}

impl WorkspaceCounts {
    /// `missing = required - allocated`, never below 0.
    pub fn missing(&self) -> i64 {
        (self.required - self.allocated).max(0)
    }
}

/// The key of one state message.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StateKey {
    Workspace {
        org_id: OrgId,
        workspace_id: WorkspaceId,
        product: Product,
    },
    Pool {
        org_id: OrgId,
        product: Product,
    },
}

impl StateKey {
    pub fn org_id(&self) -> &OrgId {
        match self {
            StateKey::Workspace { org_id, .. } | StateKey::Pool { org_id, .. } => org_id,
        }
    }

    /// The workspace of a workspace's key.
    pub fn workspace_id(&self) -> Option<&WorkspaceId> {
        match self {
            StateKey::Workspace { workspace_id, .. } => Some(workspace_id),
            StateKey::Pool { .. } => None,
        }
    }

    /// The message key: the JSON array `[org_id, workspace_id, product]` for a workspace,
    /// `[org_id, product]` for a pool.
    pub fn to_json(&self) -> String {
        let parts: Vec<&str> = match self {
            StateKey::Workspace {
                org_id,
                workspace_id,
                product,
            } => vec![org_id.as_str(), workspace_id.as_str(), product.as_str()],
            StateKey::Pool { org_id, product } => vec![org_id.as_str(), product.as_str()],
        };
        serde_json::to_string(&parts).expect("a list of strings serialises")
    }

    /// The stable id of the key's message of `version`: the same state always gets the
    /// same id, also when it is published again.
    pub fn state_id(&self, version: i64) -> Uuid {
        Uuid::new_v5(
            &ID_NAMESPACE,
            format!("state/{}/{version}", self.to_json()).as_bytes(),
        )
    }
}

/// What a state message says of its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateBody {
    Workspace(WorkspaceCounts),
    Pool(PoolState),
}

/// The new state of one key, to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    pub key: StateKey,
    pub body: StateBody,
    pub version: i64,
    pub updated_at: DateTime<Utc>,
    pub caused_by: EventId,
}

impl Book {
    /// A pool's state as the book holds it: its `pending` units are those of its lots not
    /// valid yet (the book holds every pending lot of its organizations).
    pub fn pool_state(&self, org_id: &OrgId, product: &Product) -> PoolState {
        let key = (org_id.clone(), product.clone());
        let pool = self.pools.get(&key).cloned().unwrap_or_default();
        let pending = self.lots.get(&key).map_or(0, |lots| {
            lots.iter()
                .filter(|lot| lot.status == LotStatus::Pending)
                .map(|lot| lot.remaining)
                .sum()
        });
        PoolState {
            available: pool.available,
            pending,
            unlimited: pool.unlimited,
            granted: pool.granted_total,
            transferred: pool.transferred_total,
            expired: pool.expired_total,
            revoked: pool.revoked_total,
        }
    }

    /// Notes the state of every pool the store loaded, which its last message carried;
    /// called once the pools and their lots are loaded.
    pub fn remember_pool_states(&mut self) {
        let keys: Vec<(OrgId, Product)> = self.pools.keys().cloned().collect();
        for (org_id, product) in keys {
            let state = self.pool_state(&org_id, &product);
            if let Some(pool) = self.pools.get_mut(&(org_id, product)) {
                pool.loaded_state = Some(state);
            }
        }
    }

    /// Compares every key the batch may have changed with its stored state and queues a
    /// message, with the key's next version, for each one that differs.
    pub(crate) fn collect_states(&mut self, now: DateTime<Utc>) {
        let mut pools: Vec<(OrgId, Product)> = self.pools.keys().cloned().collect();
        pools.sort();
        for (org_id, product) in pools {
            let state = self.pool_state(&org_id, &product);
            let pool = self
                .pools
                .get_mut(&(org_id.clone(), product.clone()))
                .expect("listed above");
            let unchanged = match &pool.loaded_state {
                Some(loaded) => loaded == &state,
                // A pool looked up but never changed is not stored: it has no state.
                None => !pool.dirty && state == PoolState::default(),
            };
            if unchanged {
                continue;
            }
            pool.state_version += 1;
            pool.loaded_state = Some(state.clone());
            pool.dirty = true;
            let caused_by = pool
                .last_cause
                .clone()
                .expect("a changed pool knows its cause");
            let version = pool.state_version;
            self.states.push(StateChange {
                key: StateKey::Pool { org_id, product },
                body: StateBody::Pool(state),
                version,
                updated_at: now,
                caused_by,
            });
        }
        // Rule 13: a workspace whose name or liveness changed has a new state for every
        // product it holds.
        let life_changed: HashMap<WorkspaceId, EventId> = self
            .life_changed()
            .map(|workspace_id| {
                let life = &self.workspaces[workspace_id];
                (workspace_id.clone(), life.last_event_id.clone())
            })
            .collect();
        let mut workspaces: Vec<(WorkspaceId, Product)> = self
            .consumption
            .iter()
            .filter(|((workspace_id, _), consumption)| {
                consumption.dirty || life_changed.contains_key(workspace_id)
            })
            .map(|(key, _)| key.clone())
            .collect();
        workspaces.sort();
        for (workspace_id, product) in workspaces {
            let consumption = self
                .consumption
                .get_mut(&(workspace_id.clone(), product.clone()))
                .expect("listed above");
            let counts = WorkspaceCounts {
                required: consumption.required,
                allocated: consumption.allocated,
            };
            let life_cause = life_changed.get(&workspace_id);
            let counts_changed = consumption.loaded_counts != Some(counts);
            if !counts_changed && life_cause.is_none() {
                continue;
            }
            consumption.state_version += 1;
            consumption.loaded_counts = Some(counts);
            consumption.dirty = true;
            // The counts' cause when they changed, else the update that changed the life.
            let caused_by = match life_cause {
                Some(cause) if !counts_changed => cause.clone(),
                _ => consumption
                    .last_cause
                    .clone()
                    .expect("a changed consumption knows its cause"),
            };
            self.states.push(StateChange {
                key: StateKey::Workspace {
                    org_id: consumption.org_id.clone(),
                    workspace_id,
                    product,
                },
                body: StateBody::Workspace(counts),
                version: consumption.state_version,
                updated_at: now,
                caused_by,
            });
        }
    }
}
