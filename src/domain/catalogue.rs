//! Rule 14, the catalogue: `product-defined` gives a product its name and description and,
//! for a module, its assignment, the policy that decides whether the module moves from the
//! pool by itself (rule 6 made per module). The latest definition by (`occurred_at`, then
//! `event_id`) wins; a module that becomes automatic fills its open shortfalls at once, in
//! every organization, oldest first; a product never defined keeps working, its handle
//! its name.

use chrono::{DateTime, Utc};

use super::book::{Book, Policy, Verdict};
use super::commands::{Assignment, ProductDefined};
use super::ids::{EventId, OrgId, Product};

/// A product's entry in the catalogue: its latest definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    pub name: String,
    pub description: Option<String>,
    /// None: `modules.auto_assign` decides (and always for `seat`, which moves by itself).
    pub assignment: Option<Assignment>,
    /// The definition that decided the entry: only a later one by (`occurred_at`, then
    /// `event_id`) replaces it.
    pub occurred_at: DateTime<Utc>,
    pub event_id: EventId,
    pub dirty: bool,
}

/// Rules 5, 6 and 14 in one place: whether units of `product` move from the pool by
/// themselves. Seats always do; a module does when its assignment says `automatic`, does
/// not when it says `manual`, and follows `modules.auto_assign` without one.
pub fn moves_by_itself(product: &Product, assignment: Option<Assignment>, policy: Policy) -> bool {
    if product.is_seat() {
        return true;
    }
    match assignment {
        Some(Assignment::Automatic) => true,
        Some(Assignment::Manual) => false,
        None => policy.modules_auto_assign,
    }
}

impl Book {
    /// Whether units of `product` move from the pool by themselves now (rule 14 over rule 6).
    pub fn moves_by_itself(&self, product: &Product) -> bool {
        let assignment = self
            .catalogue
            .get(product)
            .and_then(|definition| definition.assignment);
        moves_by_itself(product, assignment, self.policy)
    }

    /// The product's name in the catalogue; its handle when it was never defined.
    pub fn name_of<'a>(&'a self, product: &'a Product) -> &'a str {
        self.catalogue
            .get(product)
            .map_or(product.as_str(), |definition| definition.name.as_str())
    }

    /// Applies a definition that is later than the product's current one. When it makes a
    /// module automatic, every organization's open shortfalls of it are filled from that
    /// organization's pool, oldest first, caused by the definition.
    pub fn define(&mut self, event: &ProductDefined, now: DateTime<Utc>) -> Verdict {
        debug_assert!(
            !(event.product.is_seat() && event.assignment.is_some()),
            "the decoder refuses an assignment for `seat`"
        );
        if let Some(current) = self.catalogue.get(&event.product) {
            if current.event_id == event.event_id {
                return Verdict::Duplicate;
            }
            if (event.occurred_at, &event.event_id) <= (current.occurred_at, &current.event_id) {
                return Verdict::Stale;
            }
        }
        let becomes_automatic = !self.moves_by_itself(&event.product)
            && moves_by_itself(&event.product, event.assignment, self.policy);
        let waiting = if becomes_automatic {
            self.organizations_waiting_for(&event.product)
        } else {
            Vec::new()
        };
        // Time comes first, as before any event of an organization: what expired has left
        // the pool, what became valid is in it.
        for org_id in &waiting {
            self.settle_time(org_id, now);
        }
        self.catalogue.insert(
            event.product.clone(),
            Definition {
                name: event.name.clone(),
                description: event.description.clone(),
                assignment: event.assignment,
                occurred_at: event.occurred_at,
                event_id: event.event_id.clone(),
                dirty: true,
            },
        );
        for org_id in &waiting {
            self.refill(org_id, &event.product, &event.event_id, now);
        }
        Verdict::Applied
    }

    /// The organizations with open shortfalls of `product` in the book, in `org_id` order.
    /// The store loads every open shortfall of a module a batch defines.
    fn organizations_waiting_for(&self, product: &Product) -> Vec<OrgId> {
        let mut orgs: Vec<OrgId> = self
            .consumption
            .iter()
            .filter(|((_, held), consumption)| held == product && consumption.missing() > 0)
            .map(|(_, consumption)| consumption.org_id.clone())
            .collect();
        orgs.sort();
        orgs.dedup();
        orgs
    }
}
