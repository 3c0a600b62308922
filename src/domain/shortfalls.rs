//! Shortfalls: a (workspace, product) whose `required` exceeds its `allocated`. An alert is
//! published only when a shortfall opens, its `missing` count changes, or it is resolved;
//! changes within one batch are folded into one alert per (workspace, product).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::book::{Alert, AlertStatus, Book};
use super::ids::{OrgId, Product, WorkspaceId};

/// Namespace of the name-based (version 5) UUIDs the worker gives its output messages, so
/// that the same alert or ledger entry always gets the same id.
pub const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2a4e_8d3b_4c1a_9e57_b2d4_c6a8_e013);

/// The stable id of the `revision`-th alert of a (workspace, product).
pub fn alert_id(workspace_id: &WorkspaceId, product: &Product, revision: i64) -> Uuid {
    Uuid::new_v5(
        &ID_NAMESPACE,
        format!(
            "alert/{}/{}/{revision}",
            workspace_id.as_str(),
            product.as_str()
        )
        .as_bytes(),
    )
}

impl Book {
    /// Notes when a shortfall opens (the start of its wait for a refill) and when it closes.
    pub(crate) fn track_shortfall(
        &mut self,
        workspace_id: &WorkspaceId,
        product: &Product,
        org_id: &OrgId,
        now: DateTime<Utc>,
    ) {
        let consumption = self.consumption_mut(workspace_id, product, org_id);
        match (consumption.missing() > 0, consumption.shortfall_since) {
            (true, None) => {
                consumption.shortfall_since = Some(now);
                consumption.dirty = true;
            }
            (false, Some(_)) => {
                consumption.shortfall_since = None;
                consumption.dirty = true;
            }
            _ => {}
        }
    }

    /// Compares every changed (workspace, product) with what was last published and
    /// queues an alert where they differ.
    pub(crate) fn collect_alerts(&mut self, now: DateTime<Utc>) {
        let mut changed: Vec<_> = self
            .consumption
            .iter()
            .filter(|(_, consumption)| {
                consumption.dirty && consumption.missing() != consumption.reported_missing
            })
            .map(|(key, _)| key.clone())
            .collect();
        changed.sort();
        for key in changed {
            let consumption = self.consumption.get_mut(&key).expect("collected above");
            let missing = consumption.missing();
            // Consumers see one shortfall from its opening alert to its resolution: every
            // alert in between carries the instant of the opening one.
            let opened_at = consumption
                .reported_opened_at
                .or(consumption.shortfall_since)
                .unwrap_or(now);
            let status = if missing > 0 {
                AlertStatus::Open
            } else {
                AlertStatus::Resolved
            };
            consumption.alert_revision += 1;
            consumption.reported_missing = missing;
            consumption.reported_opened_at = (missing > 0).then_some(opened_at);
            let caused_by = consumption
                .last_cause
                .clone()
                .expect("a changed consumption knows its cause");
            self.alerts.push(Alert {
                org_id: consumption.org_id.clone(),
                workspace_id: key.0.clone(),
                product: key.1.clone(),
                status,
                required: consumption.required,
                allocated: consumption.allocated,
                missing,
                opened_at,
                occurred_at: now,
                caused_by,
                revision: consumption.alert_revision,
            });
        }
    }
}
