//! Transfers move units from an organization's pool to a workspace and are final: rule 5
//! (seats move by themselves), rule 6 (modules wait for a person unless auto-assigned, by
//! the catalogue or by the policy: rule 14) and rule 7 (a manual transfer needs the entitlement manager role and the whole quantity).

use chrono::{DateTime, Utc};

use super::book::{Book, LedgerKind, Movement, Refusal, Verdict};
use super::commands::{Command, CommandBody};
use super::ids::{EventId, OrgId, Product, WorkspaceId};

/// The only role allowed to move units by hand.
pub const ENTITLEMENT_MANAGER_ROLE: &str = "entitlement_manager";

impl Book {
    /// Rule 5: whenever `required > allocated`, move `min(required - allocated, available)`
    /// units from the pool; records the shortfall that remains.
    pub(crate) fn top_up(
        &mut self,
        workspace_id: &WorkspaceId,
        product: &Product,
        org_id: &OrgId,
        cause: &EventId,
        now: DateTime<Utc>,
    ) {
        let missing = self
            .consumption_mut(workspace_id, product, org_id)
            .missing();
        // Rule 12: an unlimited product moves whatever is missing, on its unlimited grant.
        let unlimited = self.is_unlimited(org_id, product);
        let moved = if unlimited {
            missing
        } else {
            missing.min(self.pool(org_id, product).available)
        };
        if moved > 0 {
            if unlimited {
                self.draw_unlimited(org_id, product, moved);
            } else {
                self.draw(org_id, product, moved);
            }
            let consumption = self.consumption_mut(workspace_id, product, org_id);
            consumption.allocated += moved;
            consumption.last_cause = Some(cause.clone());
            consumption.dirty = true;
            self.record(
                org_id,
                Movement {
                    product,
                    kind: LedgerKind::Transfer,
                    quantity: moved,
                    workspace_id: Some(workspace_id),
                    caused_by: cause,
                    grant_id: None,
                    actor: None,
                    unlimited,
                },
                now,
            );
        }
        self.track_shortfall(workspace_id, product, org_id, now);
    }

    /// Rule 6: an enabled module requires one unit; it moves by itself only when it is
    /// assigned automatically (rule 14), otherwise a shortfall opens and waits for a person.
    pub(crate) fn enable_module(
        &mut self,
        command: &Command,
        workspace_id: &WorkspaceId,
        module: &Product,
        now: DateTime<Utc>,
    ) -> Verdict {
        debug_assert!(!module.is_seat(), "the decoder refuses module `seat`");
        let consumption = self.consumption_mut(workspace_id, module, &command.org_id);
        if consumption.required >= 1 {
            return Verdict::Duplicate;
        }
        consumption.required = 1;
        consumption.last_cause = Some(command.event_id.clone());
        consumption.dirty = true;
        // Rule 12: while the module is unlimited there is nothing to wait for.
        if self.moves_by_itself(module) || self.is_unlimited(&command.org_id, module) {
            self.top_up(
                workspace_id,
                module,
                &command.org_id,
                &command.event_id,
                now,
            );
        } else {
            self.track_shortfall(workspace_id, module, &command.org_id, now);
        }
        Verdict::Applied
    }

    /// Rule 7: a person's transfer is carried out whole or not at all.
    pub(crate) fn manual_transfer(&mut self, command: &Command, now: DateTime<Utc>) -> Verdict {
        let CommandBody::TransferRequested {
            workspace_id,
            product,
            quantity,
            requested_by,
        } = &command.body
        else {
            unreachable!("manual_transfer() is called for transfer requests only");
        };
        if requested_by.role != ENTITLEMENT_MANAGER_ROLE {
            return Verdict::Refused {
                refusal: Refusal::Forbidden,
                detail: format!(
                    "User {:?} has role {:?}; only an {ENTITLEMENT_MANAGER_ROLE} may transfer \
                     entitlements, so nothing moved.",
                    requested_by.user_id, requested_by.role
                ),
            };
        }
        let org_id = &command.org_id;
        let quantity = quantity.get();
        let already_held = self
            .consumption
            .get(&(workspace_id.clone(), product.clone()))
            .map_or(0, |consumption| consumption.allocated);
        if !product.is_seat() && already_held >= 1 {
            return Verdict::Refused {
                refusal: Refusal::AlreadyAllocated,
                detail: format!(
                    "Workspace {:?} already holds module {:?}; a second unit would be wasted, \
                     so nothing moved.",
                    workspace_id.as_str(),
                    product.as_str()
                ),
            };
        }
        let unlimited = self.is_unlimited(org_id, product);
        let available = self.pool(org_id, product).available;
        if !unlimited && available < quantity {
            return Verdict::Refused {
                refusal: Refusal::InsufficientPool,
                detail: format!(
                    "The {:?} pool holds {available} units, fewer than the {quantity} requested, \
                     so nothing moved.",
                    product.as_str()
                ),
            };
        }
        if unlimited {
            self.draw_unlimited(org_id, product, quantity);
        } else {
            self.draw(org_id, product, quantity);
        }
        let consumption = self.consumption_mut(workspace_id, product, org_id);
        consumption.allocated += quantity;
        consumption.last_cause = Some(command.event_id.clone());
        consumption.dirty = true;
        self.record(
            org_id,
            Movement {
                product,
                kind: LedgerKind::ManualTransfer,
                quantity,
                workspace_id: Some(workspace_id),
                caused_by: &command.event_id,
                grant_id: None,
                actor: Some(&requested_by.user_id),
                unlimited,
            },
            now,
        );
        self.track_shortfall(workspace_id, product, org_id, now);
        Verdict::Applied
    }
}
