//! Revocations (rule 11): a revocation removes the units of one grant (up to a quantity),
//! or of every grant of a source, that are still in the pool; units not yet valid leave
//! when they become valid, right after their `grant` entry. Units already transferred stay
//! where they are. A revocation is kept: it reaches the grant it names whenever that grant
//! arrives, and the grants of its source whose `occurred_at` is not after its own.

use chrono::{DateTime, Utc};

use super::book::{Book, LedgerKind, LotStatus, Movement, Revocation, Verdict};
use super::commands::{Command, CommandBody, RevocationTarget};
use super::ids::{EventId, OrgId, Product};

impl Book {
    /// Applies a revocation to the lots in the pool it reaches, and keeps it for the lots
    /// that are not there yet.
    pub(crate) fn revoke(&mut self, command: &Command, now: DateTime<Utc>) -> Verdict {
        let CommandBody::EntitlementRevoked { target, reason } = &command.body else {
            unreachable!("revoke() is called for revocations only");
        };
        let mut revocation = Revocation {
            event_id: command.event_id.clone(),
            org_id: command.org_id.clone(),
            occurred_at: command.occurred_at,
            target: target.clone(),
            reason: reason.clone(),
            applied: false,
            is_new: true,
            dirty: true,
        };
        let mut reached: Vec<(Product, EventId)> = self
            .lots
            .iter()
            .filter(|((owner, _), _)| owner == &command.org_id)
            .flat_map(|((_, product), lots)| {
                lots.iter()
                    .filter(|lot| lot.status != LotStatus::Pending && revocation.reaches(lot))
                    .map(|lot| (product.clone(), lot.lot_id.clone()))
            })
            .collect();
        reached.sort();
        for (product, lot_id) in reached {
            self.take(&mut revocation, &product, &lot_id, now);
        }
        self.revocations
            .entry(command.org_id.clone())
            .or_default()
            .push(revocation);
        Verdict::Applied
    }

    /// Applies the kept revocations that reach a lot whose units just entered the pool,
    /// oldest revocation first.
    pub(crate) fn revoke_on_arrival(
        &mut self,
        org_id: &OrgId,
        product: &Product,
        lot_id: &EventId,
        now: DateTime<Utc>,
    ) {
        let Some(mut revocations) = self.revocations.remove(org_id) else {
            return;
        };
        revocations.sort_by(|left, right| {
            (left.occurred_at, &left.event_id).cmp(&(right.occurred_at, &right.event_id))
        });
        for revocation in &mut revocations {
            let reaches = self
                .lots
                .get(&(org_id.clone(), product.clone()))
                .and_then(|lots| lots.iter().find(|lot| &lot.lot_id == lot_id))
                .is_some_and(|lot| revocation.reaches(lot));
            if reaches {
                self.take(revocation, product, lot_id, now);
            }
        }
        self.revocations.insert(org_id.clone(), revocations);
    }

    /// Takes what `revocation` may take of one lot's units in the pool, with one
    /// `revocation` entry when that is more than nothing.
    fn take(
        &mut self,
        revocation: &mut Revocation,
        product: &Product,
        lot_id: &EventId,
        now: DateTime<Utc>,
    ) {
        let org_id = revocation.org_id.clone();
        let limit = revocation.limit();
        if matches!(revocation.target, RevocationTarget::Grant { .. }) {
            revocation.applied = true;
            revocation.dirty = true;
        }
        let Some(lot) = self
            .lots
            .get_mut(&(org_id.clone(), product.clone()))
            .and_then(|lots| lots.iter_mut().find(|lot| &lot.lot_id == lot_id))
        else {
            return;
        };
        let unlimited = lot.unlimited;
        let taken = if unlimited {
            // Rule 12: an unlimited grant revoked ends at once, whatever the quantity named;
            // nothing moves back.
            if lot.status != LotStatus::Active {
                return;
            }
            lot.status = LotStatus::Revoked;
            lot.dirty = true;
            super::pools::UNLIMITED_MARK_QUANTITY
        } else {
            let taken = if lot.status == LotStatus::Active {
                limit.min(lot.remaining)
            } else {
                0
            };
            if taken == 0 {
                return;
            }
            lot.remaining -= taken;
            lot.revoked += taken;
            if lot.remaining == 0 {
                lot.status = LotStatus::Revoked;
            }
            lot.dirty = true;
            let pool = self.pool_mut(&org_id, product);
            pool.available -= taken;
            pool.revoked_total += taken;
            pool.dirty = true;
            taken
        };
        if unlimited {
            self.refresh_unlimited(&org_id, product);
        }
        let caused_by = revocation.event_id.clone();
        self.record(
            &org_id,
            Movement {
                product,
                kind: LedgerKind::Revocation,
                quantity: taken,
                workspace_id: None,
                caused_by: &caused_by,
                grant_id: Some(lot_id),
                actor: None,
                unlimited,
            },
            now,
        );
    }
}
