//! Pools: grants credit them (rule 8 refills waiting workspaces), units are drawn
//! earliest-expiring first and a pool never goes negative (rule 9), units become available
//! at `valid_from` and leave the pool at `expires_at`. An unlimited grant (rule 12) is a lot
//! of no counted units: while it is active its product has no limit, transfers draw on it
//! before any counted units, and its `grant`, `expiry` and `revocation` entries mark when
//! the product became unlimited and when it stopped.

use chrono::{DateTime, Utc};

use super::book::{Book, LedgerKind, Lot, LotStatus, Movement, Verdict};
use super::commands::{Command, CommandBody, GrantUnits};
use super::ids::{EventId, OrgId, Product};

/// The quantity of the entries that mark an unlimited grant becoming valid, expiring or
/// being revoked: always positive, like every entry's, and not counted in any balance.
pub const UNLIMITED_MARK_QUANTITY: i64 = 1;

/// The order in which a pool's lots are drawn: the earliest expiry first, units that never
/// expire last; ties by start of validity, then by grant.
fn draw_order(lot: &Lot) -> impl Ord + '_ {
    (
        lot.expires_at.is_none(),
        lot.expires_at,
        lot.valid_from,
        &lot.lot_id,
    )
}

impl Book {
    /// Credits a grant to the pool: at once when it is valid now, at `valid_from` otherwise.
    pub(crate) fn grant(&mut self, command: &Command, now: DateTime<Utc>) -> Verdict {
        let CommandBody::EntitlementGranted {
            product,
            units,
            valid_from,
            expires_at,
            source,
        } = &command.body
        else {
            unreachable!("grant() is called for grants only");
        };
        let (quantity, unlimited) = match units {
            GrantUnits::Counted(quantity) => (quantity.get(), false),
            GrantUnits::Unlimited => (0, true),
        };
        let lot = Lot {
            lot_id: command.event_id.clone(),
            org_id: command.org_id.clone(),
            product: product.clone(),
            quantity,
            remaining: quantity,
            revoked: 0,
            drawn: 0,
            expired: 0,
            unlimited,
            occurred_at: command.occurred_at,
            // The decoder fills `valid_from` with `occurred_at` when the grant has none, and
            // refuses an `expires_at` that is not after it.
            valid_from: valid_from.unwrap_or(command.occurred_at),
            expires_at: *expires_at,
            status: LotStatus::Pending,
            source_kind: source.as_ref().map(|source| source.kind.clone()),
            source_reference: source.as_ref().map(|source| source.reference.clone()),
            is_new: true,
            dirty: true,
        };
        self.lots
            .entry((command.org_id.clone(), product.clone()))
            .or_default()
            .push(lot);
        // A grant not valid yet changes the pool's state too (its `pending` units).
        self.pool_mut(&command.org_id, product).last_cause = Some(command.event_id.clone());
        // Bring the new lot (and any other) up to now: activates it if it is valid.
        self.settled.remove(&command.org_id);
        self.settle_time(&command.org_id, now);
        Verdict::Applied
    }

    /// Brings an organization's lots up to `now` once per batch: expires what has expired,
    /// credits what has become valid and fills waiting workspaces with it.
    pub fn settle_time(&mut self, org_id: &OrgId, now: DateTime<Utc>) {
        if !self.settled.insert(org_id.clone()) {
            return;
        }
        let mut products: Vec<Product> = self
            .lots
            .keys()
            .filter(|(owner, _)| owner == org_id)
            .map(|(_, product)| product.clone())
            .collect();
        products.sort();
        for product in products {
            self.expire_lots(org_id, &product, now);
            if let Some(cause) = self.activate_lots(org_id, &product, now) {
                self.refill(org_id, &product, &cause, now);
            }
        }
    }

    /// Units left when a grant expires leave the pool with an expiry entry (rule 9).
    fn expire_lots(&mut self, org_id: &OrgId, product: &Product, now: DateTime<Utc>) {
        let key = (org_id.clone(), product.clone());
        let mut expired: Vec<(EventId, i64, bool)> = Vec::new();
        if let Some(lots) = self.lots.get_mut(&key) {
            lots.sort_by(|left, right| draw_order(left).cmp(&draw_order(right)));
            for lot in lots.iter_mut() {
                let due = lot.expires_at.is_some_and(|expires_at| expires_at <= now);
                if lot.status == LotStatus::Active && due {
                    expired.push((lot.lot_id.clone(), lot.remaining, lot.unlimited));
                    lot.expired += lot.remaining;
                    lot.remaining = 0;
                    lot.status = LotStatus::Expired;
                    lot.dirty = true;
                }
            }
        }
        for (lot_id, remaining, unlimited) in expired {
            if unlimited {
                // Rule 12: nothing moves back; counted units are drawn again from now on.
                self.refresh_unlimited(org_id, product);
                self.record(
                    org_id,
                    Movement {
                        product,
                        kind: LedgerKind::Expiry,
                        quantity: UNLIMITED_MARK_QUANTITY,
                        workspace_id: None,
                        caused_by: &lot_id,
                        grant_id: Some(&lot_id),
                        actor: None,
                        unlimited: true,
                    },
                    now,
                );
                continue;
            }
            if remaining == 0 {
                continue;
            }
            let pool = self.pool_mut(org_id, product);
            pool.available -= remaining;
            pool.expired_total += remaining;
            pool.dirty = true;
            self.record(
                org_id,
                Movement {
                    product,
                    kind: LedgerKind::Expiry,
                    quantity: remaining,
                    workspace_id: None,
                    caused_by: &lot_id,
                    grant_id: Some(&lot_id),
                    actor: None,
                    unlimited: false,
                },
                now,
            );
        }
    }

    /// Credits pending lots whose `valid_from` has come; a lot that is already past its
    /// expiry is credited and expired at once, so the ledger still explains it. Returns
    /// the last grant whose units were added to the pool, if any.
    fn activate_lots(
        &mut self,
        org_id: &OrgId,
        product: &Product,
        now: DateTime<Utc>,
    ) -> Option<EventId> {
        let key = (org_id.clone(), product.clone());
        let mut due: Vec<(EventId, i64, bool, bool)> = Vec::new();
        if let Some(lots) = self.lots.get_mut(&key) {
            lots.sort_by(|left, right| {
                (left.valid_from, &left.lot_id).cmp(&(right.valid_from, &right.lot_id))
            });
            for lot in lots.iter_mut() {
                if lot.status == LotStatus::Pending && lot.valid_from <= now {
                    let already_expired =
                        lot.expires_at.is_some_and(|expires_at| expires_at <= now);
                    lot.status = if already_expired {
                        LotStatus::Expired
                    } else {
                        LotStatus::Active
                    };
                    if already_expired {
                        lot.expired = lot.remaining;
                        lot.remaining = 0;
                    }
                    lot.dirty = true;
                    due.push((
                        lot.lot_id.clone(),
                        lot.quantity,
                        lot.unlimited,
                        already_expired,
                    ));
                }
            }
        }
        let mut credited = None;
        for (lot_id, quantity, unlimited, already_expired) in due {
            let marked = if unlimited {
                self.refresh_unlimited(org_id, product);
                UNLIMITED_MARK_QUANTITY
            } else {
                let pool = self.pool_mut(org_id, product);
                pool.available += quantity;
                pool.granted_total += quantity;
                pool.dirty = true;
                quantity
            };
            self.record(
                org_id,
                Movement {
                    product,
                    kind: LedgerKind::Grant,
                    quantity: marked,
                    workspace_id: None,
                    caused_by: &lot_id,
                    grant_id: Some(&lot_id),
                    actor: None,
                    unlimited,
                },
                now,
            );
            if already_expired {
                if !unlimited {
                    let pool = self.pool_mut(org_id, product);
                    pool.available -= quantity;
                    pool.expired_total += quantity;
                }
                self.record(
                    org_id,
                    Movement {
                        product,
                        kind: LedgerKind::Expiry,
                        quantity: marked,
                        workspace_id: None,
                        caused_by: &lot_id,
                        grant_id: Some(&lot_id),
                        actor: None,
                        unlimited,
                    },
                    now,
                );
            } else {
                // Rule 11: revocations that came first take their share at once.
                self.revoke_on_arrival(org_id, product, &lot_id, now);
                credited = Some(lot_id);
            }
        }
        credited
    }

    /// Takes `quantity` units out of the pool, earliest-expiring lots first. The caller has
    /// checked that the pool holds them.
    pub(crate) fn draw(&mut self, org_id: &OrgId, product: &Product, quantity: i64) {
        let pool = self.pool_mut(org_id, product);
        assert!(
            quantity <= pool.available,
            "a pool never goes negative: drawing {quantity} from {}",
            pool.available
        );
        pool.available -= quantity;
        pool.transferred_total += quantity;
        pool.dirty = true;
        let mut left = quantity;
        let lots = self
            .lots
            .get_mut(&(org_id.clone(), product.clone()))
            .expect("a pool with units has lots");
        lots.sort_by(|left, right| draw_order(left).cmp(&draw_order(right)));
        for lot in lots
            .iter_mut()
            .filter(|lot| lot.status == LotStatus::Active)
        {
            if left == 0 {
                break;
            }
            let take = left.min(lot.remaining);
            lot.remaining -= take;
            lot.drawn += take;
            left -= take;
            if lot.remaining == 0 {
                lot.status = LotStatus::Spent;
            }
            lot.dirty = true;
        }
        assert_eq!(left, 0, "the pool's available units match its lots");
    }

    /// Rule 12: whether an unlimited grant of the product is valid now.
    pub(crate) fn is_unlimited(&self, org_id: &OrgId, product: &Product) -> bool {
        self.pools
            .get(&(org_id.clone(), product.clone()))
            .is_some_and(|pool| pool.unlimited)
    }

    /// Rule 12: records `quantity` units transferred from the active unlimited grant that
    /// is drawn first (the earliest to expire); the counted units stay in the pool.
    pub(crate) fn draw_unlimited(
        &mut self,
        org_id: &OrgId,
        product: &Product,
        quantity: i64,
    ) -> EventId {
        let lots = self
            .lots
            .get_mut(&(org_id.clone(), product.clone()))
            .expect("an unlimited pool has its lot");
        lots.sort_by(|left, right| draw_order(left).cmp(&draw_order(right)));
        let lot = lots
            .iter_mut()
            .find(|lot| lot.unlimited && lot.status == LotStatus::Active)
            .expect("an unlimited pool has an active unlimited lot");
        lot.drawn += quantity;
        lot.dirty = true;
        lot.lot_id.clone()
    }

    /// Sets the pool's `unlimited` from its lots: true while an unlimited lot is active.
    pub(crate) fn refresh_unlimited(&mut self, org_id: &OrgId, product: &Product) {
        let unlimited = self
            .lots
            .get(&(org_id.clone(), product.clone()))
            .is_some_and(|lots| {
                lots.iter()
                    .any(|lot| lot.unlimited && lot.status == LotStatus::Active)
            });
        let pool = self.pool_mut(org_id, product);
        if pool.unlimited != unlimited {
            pool.unlimited = unlimited;
            pool.dirty = true;
        }
    }

    /// Rule 8: new units fill the organization's open shortfalls of the product at once,
    /// oldest shortfall first. Modules are filled only when they are assigned automatically
    /// (rule 14).
    pub(crate) fn refill(
        &mut self,
        org_id: &OrgId,
        product: &Product,
        cause: &EventId,
        now: DateTime<Utc>,
    ) {
        let unlimited = self.is_unlimited(org_id, product);
        if !self.moves_by_itself(product) && !unlimited {
            return;
        }
        assert!(
            !self.shortfalls_not_loaded.contains(org_id),
            "a refill of {org_id:?} needs its open shortfalls, which were not loaded"
        );
        let mut waiting: Vec<_> = self
            .consumption
            .iter()
            .filter(|((_, held), consumption)| {
                held == product && &consumption.org_id == org_id && consumption.missing() > 0
            })
            .map(|((workspace_id, _), consumption)| {
                (consumption.shortfall_since, workspace_id.clone())
            })
            .collect();
        waiting.sort();
        for (_, workspace_id) in waiting {
            if self.pool(org_id, product).available == 0 && !unlimited {
                break;
            }
            self.top_up(&workspace_id, product, org_id, cause, now);
        }
    }
}
