//! The contract's rules told as stories against the pure core, one batch at a time.

use chrono::{DateTime, Duration, Utc};

use super::*;

fn at(minute: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap() + Duration::minutes(minute)
}

/// A tiny world: one book kept across batches, the way the store keeps state.
struct World {
    book: Book,
    next_event: u64,
}

impl World {
    fn new() -> Self {
        Self::with_policy(Policy::default())
    }

    fn with_policy(policy: Policy) -> Self {
        Self {
            book: Book::new(policy),
            next_event: 0,
        }
    }

    fn event_id(&mut self) -> EventId {
        self.next_event += 1;
        EventId::parse(&format!("e-{:06}", self.next_event)).unwrap()
    }

    fn command(&mut self, org: &str, body: CommandBody, occurred_at: DateTime<Utc>) -> Command {
        Command {
            event_id: self.event_id(),
            occurred_at,
            org_id: OrgId::parse(org).unwrap(),
            body,
        }
    }

    /// Runs commands as one batch at `now`, like the store does: fresh per-batch outputs.
    fn batch(&mut self, commands: &[Command], now: DateTime<Utc>) -> Vec<Verdict> {
        let inputs: Vec<Input> = commands.iter().cloned().map(Input::Command).collect();
        self.inputs(&inputs, now)
    }

    /// Runs catalogue definitions as one batch at `now`.
    fn definitions(&mut self, definitions: &[ProductDefined], now: DateTime<Utc>) -> Vec<Verdict> {
        let inputs: Vec<Input> = definitions
            .iter()
            .cloned()
            .map(Input::ProductDefined)
            .collect();
        self.inputs(&inputs, now)
    }

    fn inputs(&mut self, inputs: &[Input], now: DateTime<Utc>) -> Vec<Verdict> {
        self.begin();
        let verdicts = inputs
            .iter()
            .map(|input| self.book.apply_input(input, now))
            .collect();
        self.book.finish(now);
        verdicts
    }

    /// A clock round at `now` for `org`, as the store runs it: no event, only time.
    fn clock(&mut self, org: &str, now: DateTime<Utc>) {
        self.begin();
        self.book.settle_time(&OrgId::parse(org).unwrap(), now);
        self.book.finish(now);
    }

    /// Clears what one batch produced and marks everything as stored, as the store's next
    /// load would see it.
    fn begin(&mut self) {
        self.book.ledger.clear();
        self.book.alerts.clear();
        self.book.states.clear();
        self.book.pool_warnings.clear();
        self.book.settled.clear();
        for lot in self.book.lots.values_mut().flatten() {
            lot.dirty = false;
            lot.is_new = false;
        }
        for record in self.book.warnings.values_mut() {
            record.dirty = false;
            record.is_new = false;
        }
        for consumption in self.book.consumption.values_mut() {
            consumption.dirty = false;
            consumption.is_new = false;
        }
        for pool in self.book.pools.values_mut() {
            pool.dirty = false;
        }
        // As the store loads them: what was stored is what the batch compares with.
        for life in self.book.workspaces.values_mut() {
            life.loaded_name = life.name.clone();
            life.loaded_live = life.live;
            life.is_new = false;
            life.dirty = false;
        }
    }

    /// A `product-defined` of `product` at `occurred_at`.
    fn define(
        &mut self,
        product: &str,
        assignment: Option<Assignment>,
        occurred_at: DateTime<Utc>,
    ) -> ProductDefined {
        ProductDefined {
            event_id: self.event_id(),
            occurred_at,
            product: Product::parse(product).unwrap(),
            name: format!("{product} ({occurred_at})"),
            description: None,
            assignment,
        }
    }

    fn consumption(&self, workspace: &str, product: &str) -> Consumption {
        self.book
            .consumption
            .get(&(
                WorkspaceId::parse(workspace).unwrap(),
                Product::parse(product).unwrap(),
            ))
            .cloned()
            .unwrap_or_else(|| Consumption::new(OrgId::parse("none").unwrap()))
    }

    fn available(&self, org: &str, product: &str) -> i64 {
        self.book
            .pool(
                &OrgId::parse(org).unwrap(),
                &Product::parse(product).unwrap(),
            )
            .available
    }
}

fn grant(product: &str, quantity: i64) -> CommandBody {
    grant_window(product, quantity, None, None)
}

fn grant_window(
    product: &str,
    quantity: i64,
    valid_from: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
) -> CommandBody {
    CommandBody::EntitlementGranted {
        product: Product::parse(product).unwrap(),
        units: GrantUnits::Counted(Quantity::parse(quantity).unwrap()),
        valid_from,
        expires_at,
        source: None,
    }
}

fn join(workspace: &str, participant: &str) -> CommandBody {
    CommandBody::ParticipantAdded {
        workspace_id: WorkspaceId::parse(workspace).unwrap(),
        participant_id: ParticipantId::parse(participant).unwrap(),
    }
}

fn cancel(workspace: &str, participant: &str, activated: bool) -> CommandBody {
    CommandBody::ParticipantCancelled {
        workspace_id: WorkspaceId::parse(workspace).unwrap(),
        participant_id: ParticipantId::parse(participant).unwrap(),
        activated,
    }
}

fn enable(workspace: &str, module: &str) -> CommandBody {
    CommandBody::ModuleEnabled {
        workspace_id: WorkspaceId::parse(workspace).unwrap(),
        module: Product::parse(module).unwrap(),
    }
}

fn transfer(workspace: &str, product: &str, quantity: i64, role: &str) -> CommandBody {
    CommandBody::TransferRequested {
        workspace_id: WorkspaceId::parse(workspace).unwrap(),
        product: Product::parse(product).unwrap(),
        quantity: Quantity::parse(quantity).unwrap(),
        requested_by: Actor {
            user_id: "u-alice".into(),
            role: role.into(),
        },
    }
}

fn refused(verdict: &Verdict) -> Option<Refusal> {
    match verdict {
        Verdict::Refused { refusal, .. } => Some(*refusal),
        _ => None,
    }
}

#[test]
fn twelve_participants_in_a_pool_of_ten_then_five_more_seats() {
    let mut world = World::new();
    let grant10 = world.command("acme", grant("seat", 10), at(0));
    world.batch(&[grant10], at(0));
    let joins: Vec<_> = (0..12)
        .map(|n| world.command("acme", join("summit", &format!("p{n}")), at(1)))
        .collect();
    world.batch(&joins, at(1));
    let summit = world.consumption("summit", "seat");
    assert_eq!(
        (summit.required, summit.allocated, summit.missing()),
        (12, 10, 2)
    );
    assert_eq!(world.available("acme", "seat"), 0);
    assert_eq!(world.book.alerts.len(), 1, "one alert for the batch");
    let alert = &world.book.alerts[0];
    assert_eq!((alert.status, alert.missing), (AlertStatus::Open, 2));
    let transferred: i64 = world.book.ledger.iter().map(|entry| entry.quantity).sum();
    assert_eq!(transferred, 10, "ten seats moved, one per participant");

    let grant5 = world.command("acme", grant("seat", 5), at(2));
    world.batch(&[grant5], at(2));
    let summit = world.consumption("summit", "seat");
    assert_eq!((summit.allocated, summit.missing()), (12, 0));
    assert_eq!(world.available("acme", "seat"), 3);
    let kinds: Vec<_> = world
        .book
        .ledger
        .iter()
        .map(|entry| (entry.kind, entry.quantity, entry.pool_available_after))
        .collect();
    assert_eq!(
        kinds,
        vec![(LedgerKind::Grant, 5, 5), (LedgerKind::Transfer, 2, 3)]
    );
    let alert = &world.book.alerts[0];
    assert_eq!((alert.status, alert.missing), (AlertStatus::Resolved, 0));
    assert_eq!(
        alert.opened_at,
        at(1),
        "the resolution names when it opened"
    );
}

#[test]
fn a_grant_seen_twice_is_credited_once() {
    let mut world = World::new();
    let grant10 = world.command("acme", grant("seat", 10), at(0));
    let verdicts = world.batch(&[grant10.clone(), grant10.clone()], at(0));
    assert_eq!(verdicts, vec![Verdict::Applied, Verdict::Duplicate]);
    assert_eq!(world.batch(&[grant10], at(1)), vec![Verdict::Duplicate]);
    assert_eq!(world.available("acme", "seat"), 10);
}

#[test]
fn a_participant_event_seen_twice_changes_nothing() {
    let mut world = World::new();
    let grant10 = world.command("acme", grant("seat", 10), at(0));
    let joined = world.command("acme", join("summit", "p1"), at(1));
    world.batch(&[grant10, joined.clone()], at(1));
    assert_eq!(world.batch(&[joined], at(2)), vec![Verdict::Duplicate]);
    assert!(world.book.ledger.is_empty());
    assert_eq!(world.consumption("summit", "seat").allocated, 1);
}

#[test]
fn an_older_event_arriving_late_changes_nothing() {
    let mut world = World::new();
    let cancelled = world.command("acme", cancel("summit", "p1", false), at(5));
    let joined_earlier = world.command("acme", join("summit", "p1"), at(1));
    let verdicts = world.batch(&[cancelled, joined_earlier], at(6));
    assert_eq!(verdicts, vec![Verdict::Applied, Verdict::Stale]);
    assert_eq!(world.consumption("summit", "seat").required, 0);
}

#[test]
fn a_cancelled_participant_who_never_activated_frees_a_seat_for_the_next() {
    let mut world = World::new();
    let grant1 = world.command("acme", grant("seat", 1), at(0));
    let joined = world.command("acme", join("summit", "p1"), at(1));
    let cancelled = world.command("acme", cancel("summit", "p1", false), at(2));
    let next = world.command("acme", join("summit", "p2"), at(3));
    world.batch(&[grant1, joined, cancelled, next], at(3));
    let summit = world.consumption("summit", "seat");
    assert_eq!(
        (summit.required, summit.allocated, summit.missing()),
        (1, 1, 0)
    );
    assert!(world.book.alerts.is_empty());
}

#[test]
fn a_cancelled_participant_who_activated_keeps_its_seat() {
    let mut world = World::new();
    let grant1 = world.command("acme", grant("seat", 1), at(0));
    let joined = world.command("acme", join("summit", "p1"), at(1));
    let cancelled = world.command("acme", cancel("summit", "p1", true), at(2));
    let next = world.command("acme", join("summit", "p2"), at(3));
    world.batch(&[grant1, joined, cancelled, next], at(3));
    let summit = world.consumption("summit", "seat");
    assert_eq!(
        (summit.required, summit.allocated, summit.missing()),
        (2, 1, 1)
    );
}

#[test]
fn a_workspace_claimed_by_a_second_organization_is_refused_and_costs_it_nothing() {
    let mut world = World::new();
    let acme = world.command("acme", join("summit", "p1"), at(0));
    let globex_grant = world.command("globex", grant("seat", 5), at(0));
    let globex = world.command("globex", join("summit", "p2"), at(1));
    let globex_transfer = world.command(
        "globex",
        transfer("summit", "seat", 2, "entitlement_manager"),
        at(1),
    );
    let verdicts = world.batch(&[acme, globex_grant, globex, globex_transfer], at(1));
    assert_eq!(refused(&verdicts[2]), Some(Refusal::TenantMismatch));
    assert_eq!(refused(&verdicts[3]), Some(Refusal::TenantMismatch));
    assert_eq!(world.available("globex", "seat"), 5);
    assert_eq!(world.consumption("summit", "seat").required, 1);
    assert_eq!(
        world.book.owners[&WorkspaceId::parse("summit").unwrap()].as_str(),
        "acme"
    );
}

#[test]
fn modules_wait_for_a_person_by_default() {
    let mut world = World::new();
    let grant1 = world.command("acme", grant("gamification", 1), at(0));
    let enabled = world.command("acme", enable("summit", "gamification"), at(1));
    world.batch(&[grant1, enabled], at(1));
    let module = world.consumption("summit", "gamification");
    assert_eq!((module.required, module.allocated), (1, 0));
    assert_eq!(world.available("acme", "gamification"), 1);
    assert_eq!(world.book.alerts[0].status, AlertStatus::Open);

    let by_hand = world.command(
        "acme",
        transfer("summit", "gamification", 1, "entitlement_manager"),
        at(2),
    );
    assert_eq!(world.batch(&[by_hand], at(2)), vec![Verdict::Applied]);
    let entry = &world.book.ledger[0];
    assert_eq!(entry.kind, LedgerKind::ManualTransfer);
    assert_eq!(entry.actor.as_deref(), Some("u-alice"));
    assert_eq!(world.book.alerts[0].status, AlertStatus::Resolved);
}

#[test]
fn modules_move_by_themselves_when_auto_assigned() {
    let mut world = World::with_policy(Policy {
        modules_auto_assign: true,
        ..Policy::default()
    });
    let enabled = world.command("acme", enable("summit", "live-stream"), at(0));
    world.batch(&[enabled], at(0));
    assert_eq!(world.consumption("summit", "live-stream").missing(), 1);
    let grant1 = world.command("acme", grant("live-stream", 1), at(1));
    world.batch(&[grant1], at(1));
    assert_eq!(world.consumption("summit", "live-stream").allocated, 1);
    assert_eq!(world.book.alerts[0].status, AlertStatus::Resolved);
}

#[test]
fn a_manual_transfer_needs_the_role_and_the_whole_quantity() {
    let mut world = World::new();
    let grant3 = world.command("acme", grant("seat", 3), at(0));
    world.batch(&[grant3], at(0));
    let viewer = world.command("acme", transfer("summit", "seat", 2, "viewer"), at(1));
    let too_many = world.command(
        "acme",
        transfer("summit", "seat", 4, "entitlement_manager"),
        at(1),
    );
    let verdicts = world.batch(&[viewer, too_many], at(1));
    assert_eq!(refused(&verdicts[0]), Some(Refusal::Forbidden));
    assert_eq!(refused(&verdicts[1]), Some(Refusal::InsufficientPool));
    assert_eq!(world.available("acme", "seat"), 3);
    assert!(world.book.ledger.is_empty());
    assert!(
        world.book.owners.is_empty(),
        "a refused request claims nothing"
    );
}

#[test]
fn a_refused_request_delivered_again_after_a_refill_still_changes_nothing() {
    let mut world = World::new();
    let request = world.command(
        "acme",
        transfer("summit", "seat", 2, "entitlement_manager"),
        at(0),
    );
    let verdicts = world.batch(std::slice::from_ref(&request), at(0));
    assert_eq!(refused(&verdicts[0]), Some(Refusal::InsufficientPool));
    let grant5 = world.command("acme", grant("seat", 5), at(1));
    world.batch(&[grant5], at(1));
    let verdicts = world.batch(&[request], at(2));
    assert_eq!(verdicts[0], Verdict::Duplicate);
    assert_eq!(
        world.available("acme", "seat"),
        5,
        "nothing moved the second time"
    );
    assert_eq!(world.consumption("summit", "seat").allocated, 0);
}

#[test]
fn a_second_unit_of_a_module_is_refused() {
    let mut world = World::new();
    let grant2 = world.command("acme", grant("gamification", 2), at(0));
    let first = world.command(
        "acme",
        transfer("summit", "gamification", 1, "entitlement_manager"),
        at(1),
    );
    let second = world.command(
        "acme",
        transfer("summit", "gamification", 1, "entitlement_manager"),
        at(2),
    );
    let verdicts = world.batch(&[grant2, first, second], at(2));
    assert_eq!(refused(&verdicts[2]), Some(Refusal::AlreadyAllocated));
    assert_eq!(world.available("acme", "gamification"), 1);
}

#[test]
fn refills_fill_the_oldest_shortfall_first() {
    let mut world = World::new();
    let older = world.command("acme", join("older", "p1"), at(0));
    world.batch(&[older], at(0));
    let newer = world.command("acme", join("newer", "p1"), at(1));
    world.batch(&[newer], at(1));
    let grant1 = world.command("acme", grant("seat", 1), at(2));
    world.batch(&[grant1], at(2));
    assert_eq!(world.consumption("older", "seat").allocated, 1);
    assert_eq!(world.consumption("newer", "seat").allocated, 0);
}

#[test]
fn units_are_drawn_earliest_expiring_first_and_the_rest_expire() {
    let mut world = World::new();
    let forever = world.command("acme", grant("seat", 5), at(0));
    let soon = world.command("acme", grant_window("seat", 5, None, Some(at(60))), at(0));
    let later = world.command("acme", grant_window("seat", 5, None, Some(at(120))), at(0));
    world.batch(&[forever, soon, later], at(0));
    let joins: Vec<_> = (0..7)
        .map(|n| world.command("acme", join("summit", &format!("p{n}")), at(1)))
        .collect();
    world.batch(&joins, at(1));
    assert_eq!(world.available("acme", "seat"), 8);

    // The timer at minute 60: the 5 expiring soonest were drawn first, nothing left there.
    world.book.ledger.clear();
    world.book.settled.clear();
    world
        .book
        .settle_time(&OrgId::parse("acme").unwrap(), at(60));
    assert!(world.book.ledger.is_empty(), "the soonest lot was used up");
    // At minute 120 the 3 units left of the second lot expire.
    world.book.settled.clear();
    world
        .book
        .settle_time(&OrgId::parse("acme").unwrap(), at(120));
    let entry = &world.book.ledger[0];
    assert_eq!(
        (entry.kind, entry.quantity, entry.pool_available_after),
        (LedgerKind::Expiry, 3, 5)
    );
    assert_eq!(world.available("acme", "seat"), 5);
    assert_eq!(
        world.consumption("summit", "seat").allocated,
        7,
        "transferred units never expire"
    );
}

#[test]
fn units_become_available_at_valid_from_and_fill_waiting_workspaces() {
    let mut world = World::new();
    let future = world.command("acme", grant_window("seat", 4, Some(at(30)), None), at(0));
    let joined = world.command("acme", join("summit", "p1"), at(1));
    world.batch(&[future, joined], at(1));
    assert_eq!(world.available("acme", "seat"), 0);
    assert!(
        world.book.ledger.is_empty(),
        "the grant entry waits for its units"
    );
    world.book.settled.clear();
    world
        .book
        .settle_time(&OrgId::parse("acme").unwrap(), at(30));
    let kinds: Vec<_> = world
        .book
        .ledger
        .iter()
        .map(|entry| (entry.kind, entry.quantity))
        .collect();
    assert_eq!(
        kinds,
        vec![(LedgerKind::Grant, 4), (LedgerKind::Transfer, 1)]
    );
    assert_eq!(world.available("acme", "seat"), 3);
}

#[test]
fn a_grant_already_expired_is_credited_and_expired_at_once() {
    let mut world = World::new();
    let stale = world.command(
        "acme",
        grant_window("seat", 4, Some(at(0)), Some(at(10))),
        at(0),
    );
    world.batch(&[stale], at(20));
    let kinds: Vec<_> = world
        .book
        .ledger
        .iter()
        .map(|entry| (entry.kind, entry.quantity, entry.pool_available_after))
        .collect();
    assert_eq!(
        kinds,
        vec![(LedgerKind::Grant, 4, 4), (LedgerKind::Expiry, 4, 0)]
    );
}

#[test]
fn ledger_sequences_are_gapless_per_organization() {
    let mut world = World::new();
    let mut commands = Vec::new();
    for org in ["acme", "globex"] {
        commands.push(world.command(org, grant("seat", 3), at(0)));
        for n in 0..4 {
            commands.push(world.command(org, join(&format!("{org}-ws"), &format!("p{n}")), at(1)));
        }
    }
    world.batch(&commands, at(1));
    for org in ["acme", "globex"] {
        let sequences: Vec<i64> = world
            .book
            .ledger
            .iter()
            .filter(|entry| entry.org_id.as_str() == org)
            .map(|entry| entry.sequence)
            .collect();
        assert_eq!(sequences, vec![1, 2, 3, 4], "{org}");
    }
}

#[test]
fn alerts_are_published_only_when_the_shortfall_changes() {
    let mut world = World::new();
    let first = world.command("acme", join("summit", "p1"), at(0));
    world.batch(&[first], at(0));
    assert_eq!(world.book.alerts.len(), 1);
    // A cancellation by someone who activated changes nothing missing: no alert.
    let activated = world.command("acme", cancel("summit", "p1", true), at(1));
    world.batch(&[activated], at(1));
    assert!(world.book.alerts.is_empty());
    let second = world.command("acme", join("summit", "p2"), at(2));
    world.batch(&[second], at(2));
    let alert = &world.book.alerts[0];
    assert_eq!((alert.missing, alert.revision), (2, 2));
    assert_eq!(alert.opened_at, at(0));
}

// Rule 11: revocations.

fn sourced(product: &str, quantity: i64, kind: &str, reference: &str) -> CommandBody {
    CommandBody::EntitlementGranted {
        product: Product::parse(product).unwrap(),
        units: GrantUnits::Counted(Quantity::parse(quantity).unwrap()),
        valid_from: None,
        expires_at: None,
        source: Some(GrantSource {
            kind: kind.into(),
            reference: reference.into(),
        }),
    }
}

fn sourced_window(
    product: &str,
    quantity: i64,
    kind: &str,
    reference: &str,
    expires_at: DateTime<Utc>,
) -> CommandBody {
    let CommandBody::EntitlementGranted {
        product,
        units,
        valid_from,
        source,
        ..
    } = sourced(product, quantity, kind, reference)
    else {
        unreachable!("sourced() makes a grant");
    };
    CommandBody::EntitlementGranted {
        product,
        units,
        valid_from,
        expires_at: Some(expires_at),
        source,
    }
}

fn revoke_grant(grant: &Command, quantity: Option<i64>) -> CommandBody {
    CommandBody::EntitlementRevoked {
        target: RevocationTarget::Grant {
            grant_id: grant.event_id.clone(),
            quantity: quantity.map(|quantity| Quantity::parse(quantity).unwrap()),
        },
        reason: Some("support".into()),
    }
}

fn revoke_source(kind: &str, reference: &str, product: Option<&str>) -> CommandBody {
    CommandBody::EntitlementRevoked {
        target: RevocationTarget::Source {
            source: GrantSource {
                kind: kind.into(),
                reference: reference.into(),
            },
            product: product.map(|product| Product::parse(product).unwrap()),
        },
        reason: None,
    }
}

fn entries(world: &World) -> Vec<(LedgerKind, i64, i64)> {
    world
        .book
        .ledger
        .iter()
        .map(|entry| (entry.kind, entry.quantity, entry.pool_available_after))
        .collect()
}

#[test]
fn an_add_on_revoked_after_110_joined_takes_the_10_seats_left_and_leaves_the_110() {
    let mut world = World::new();
    let plan = world.command("acme", sourced("seat", 100, "plan", "p-1"), at(0));
    let add_on = world.command("acme", sourced("seat", 20, "add_on", "a-1"), at(0));
    world.batch(&[plan, add_on.clone()], at(0));
    let joins: Vec<_> = (0..110)
        .map(|n| world.command("acme", join("summit", &format!("p{n}")), at(1)))
        .collect();
    world.batch(&joins, at(1));
    assert_eq!(world.available("acme", "seat"), 10);

    let revocation = world.command("acme", revoke_grant(&add_on, None), at(2));
    world.batch(&[revocation], at(2));
    assert_eq!(entries(&world), vec![(LedgerKind::Revocation, 10, 0)]);
    assert_eq!(world.available("acme", "seat"), 0);
    let summit = world.consumption("summit", "seat");
    assert_eq!((summit.required, summit.allocated), (110, 110));
    let pool = world.book.pool(
        &OrgId::parse("acme").unwrap(),
        &Product::parse("seat").unwrap(),
    );
    assert_eq!(
        pool.available,
        pool.granted_total - pool.transferred_total - pool.expired_total - pool.revoked_total
    );
}

#[test]
fn a_revocation_before_its_grant_leaves_the_grant_nothing_in_the_pool() {
    let mut world = World::new();
    let grant = world.command("acme", grant("seat", 30), at(1));
    let revocation = world.command("acme", revoke_grant(&grant, None), at(0));
    world.batch(&[revocation], at(0));
    assert!(
        world.book.ledger.is_empty(),
        "removing nothing writes nothing"
    );
    world.batch(&[grant], at(2));
    assert_eq!(
        entries(&world),
        vec![(LedgerKind::Grant, 30, 30), (LedgerKind::Revocation, 30, 0)]
    );
    assert_eq!(world.available("acme", "seat"), 0);
}

#[test]
fn a_revocation_of_some_units_takes_at_most_that_many_once() {
    let mut world = World::new();
    let grant = world.command("acme", grant("seat", 30), at(0));
    world.batch(std::slice::from_ref(&grant), at(0));
    let revocation = world.command("acme", revoke_grant(&grant, Some(12)), at(1));
    assert_eq!(
        world.batch(&[revocation.clone(), revocation], at(1)),
        vec![Verdict::Applied, Verdict::Duplicate]
    );
    assert_eq!(entries(&world), vec![(LedgerKind::Revocation, 12, 18)]);
    let later = world.command("acme", join("summit", "p1"), at(2));
    world.batch(&[later], at(2));
    assert_eq!(world.available("acme", "seat"), 17);
}

#[test]
fn a_source_revoked_takes_its_grants_of_every_product_but_not_a_later_regrant() {
    let mut world = World::new();
    let seats = world.command("acme", sourced("seat", 50, "subscription", "s-9"), at(0));
    let stream = world.command(
        "acme",
        sourced("live-stream", 2, "subscription", "s-9"),
        at(0),
    );
    let other = world.command("acme", sourced("seat", 5, "plan", "p-1"), at(0));
    world.batch(&[seats, stream, other], at(0));
    let revocation = world.command("acme", revoke_source("subscription", "s-9", None), at(5));
    // Arrives after the revocation, but granted before it: the revocation reaches it.
    let late = world.command("acme", sourced("seat", 7, "subscription", "s-9"), at(4));
    // Granted after the revocation: a re-grant, which it does not reach.
    let regrant = world.command("acme", sourced("seat", 9, "subscription", "s-9"), at(6));
    world.batch(&[revocation, late, regrant], at(6));
    assert_eq!(world.available("acme", "seat"), 5 + 9);
    assert_eq!(world.available("acme", "live-stream"), 0);
    let revoked: Vec<i64> = world
        .book
        .ledger
        .iter()
        .filter(|entry| entry.kind == LedgerKind::Revocation)
        .map(|entry| entry.quantity)
        .collect();
    assert_eq!(revoked.iter().sum::<i64>(), 50 + 2 + 7);
    assert_eq!(revoked.len(), 3, "one entry per grant that lost units");
}

#[test]
fn a_grant_not_yet_valid_gives_up_its_units_when_they_become_valid() {
    let mut world = World::new();
    let grant = world.command("acme", grant_window("seat", 40, Some(at(10)), None), at(0));
    world.batch(std::slice::from_ref(&grant), at(0));
    let revocation = world.command("acme", revoke_grant(&grant, Some(15)), at(1));
    world.batch(&[revocation], at(1));
    assert!(
        world.book.ledger.is_empty(),
        "its units are not in the pool yet"
    );
    let tick = world.command("acme", join("summit", "p1"), at(10));
    world.batch(&[tick], at(10));
    assert_eq!(
        entries(&world)[..2],
        [
            (LedgerKind::Grant, 40, 40),
            (LedgerKind::Revocation, 15, 25)
        ]
    );
    assert_eq!(world.available("acme", "seat"), 24);
}

// Rule 12: unlimited grants.

fn unlimited(product: &str, expires_at: Option<DateTime<Utc>>) -> CommandBody {
    CommandBody::EntitlementGranted {
        product: Product::parse(product).unwrap(),
        units: GrantUnits::Unlimited,
        valid_from: None,
        expires_at,
        source: Some(GrantSource {
            kind: "plan".into(),
            reference: "enterprise".into(),
        }),
    }
}

/// (kind, quantity, pool_available_after, unlimited) of the batch's entries.
fn marked(world: &World) -> Vec<(LedgerKind, i64, i64, bool)> {
    world
        .book
        .ledger
        .iter()
        .map(|entry| {
            (
                entry.kind,
                entry.quantity,
                entry.pool_available_after,
                entry.unlimited,
            )
        })
        .collect()
}

fn is_unlimited(world: &World, product: &str) -> bool {
    world
        .book
        .pool(
            &OrgId::parse("acme").unwrap(),
            &Product::parse(product).unwrap(),
        )
        .unlimited
}

#[test]
fn an_unlimited_grant_covers_5000_participants_and_its_end_leaves_the_counted_units() {
    let mut world = World::new();
    let plan = world.command("acme", grant("seat", 100), at(0));
    let top = world.command("acme", unlimited("seat", Some(at(10))), at(0));
    world.batch(&[plan, top], at(0));
    assert_eq!(
        marked(&world),
        [
            (LedgerKind::Grant, 100, 100, false),
            (LedgerKind::Grant, 1, 100, true)
        ],
        "the grant entry marks the product unlimited and counts nothing"
    );
    assert!(is_unlimited(&world, "seat"));
    let joins: Vec<_> = (0..5000)
        .map(|n| world.command("acme", join("summit", &format!("p{n}")), at(1)))
        .collect();
    world.batch(&joins, at(1));
    let summit = world.consumption("summit", "seat");
    assert_eq!((summit.required, summit.allocated), (5000, 5000));
    assert!(world.book.alerts.is_empty(), "no shortfall ever opened");
    assert!(world
        .book
        .ledger
        .iter()
        .all(|entry| entry.unlimited && entry.pool_available_after == 100));
    assert_eq!(
        world.book.ledger.iter().map(|e| e.quantity).sum::<i64>(),
        5000
    );
    assert_eq!(world.available("acme", "seat"), 100, "counted units kept");
    // A person's transfer draws on the unlimited grant too, whatever the counted units.
    let person = world.command(
        "acme",
        transfer("expo", "seat", 500, "entitlement_manager"),
        at(1),
    );
    assert_eq!(world.batch(&[person], at(1)), [Verdict::Applied]);
    assert_eq!(
        marked(&world),
        [(LedgerKind::ManualTransfer, 500, 100, true)]
    );

    // It expires: nothing moves back, and the next participants draw counted units.
    world.batch(&[], at(10));
    world
        .book
        .settle_time(&OrgId::parse("acme").unwrap(), at(10));
    assert_eq!(marked(&world), [(LedgerKind::Expiry, 1, 100, true)]);
    assert!(!is_unlimited(&world, "seat"));
    let late: Vec<_> = (5000..5110)
        .map(|n| world.command("acme", join("summit", &format!("p{n}")), at(11)))
        .collect();
    world.batch(&late, at(11));
    let summit = world.consumption("summit", "seat");
    assert_eq!((summit.required, summit.allocated), (5110, 5100));
    assert_eq!(world.available("acme", "seat"), 0);
    assert_eq!(
        world.book.alerts.len(),
        1,
        "a shortfall opens again: {:?}",
        world.book.alerts
    );
    assert!(world.book.ledger.iter().all(|entry| !entry.unlimited));
}

#[test]
fn unlimited_modules_move_at_once_and_a_revoked_unlimited_grant_ends_without_taking_back() {
    let mut world = World::new();
    let top = world.command("acme", unlimited("live-stream", None), at(0));
    let counted = world.command("acme", grant("live-stream", 1), at(0));
    world.batch(&[top.clone(), counted], at(0));
    // Modules wait for a person under the default policy, but not while unlimited.
    let enabled: Vec<_> = ["a", "b"]
        .iter()
        .map(|workspace| world.command("acme", enable(workspace, "live-stream"), at(1)))
        .collect();
    world.batch(&enabled, at(1));
    assert_eq!(world.consumption("a", "live-stream").allocated, 1);
    assert_eq!(world.consumption("b", "live-stream").allocated, 1);
    assert_eq!(world.available("acme", "live-stream"), 1);
    // Rule 7 still holds while unlimited: a workspace holding the module gets no second.
    let person = world.command(
        "acme",
        transfer("a", "live-stream", 1, "entitlement_manager"),
        at(1),
    );
    assert!(matches!(
        world.batch(&[person], at(1))[0],
        Verdict::Refused {
            refusal: Refusal::AlreadyAllocated,
            ..
        }
    ));

    let revocation = world.command("acme", revoke_grant(&top, Some(3)), at(2));
    world.batch(&[revocation], at(2));
    assert_eq!(marked(&world), [(LedgerKind::Revocation, 1, 1, true)]);
    assert!(!is_unlimited(&world, "live-stream"));
    assert_eq!(
        world.consumption("a", "live-stream").allocated,
        1,
        "nothing moves back"
    );
    let more: Vec<_> = ["c", "d"]
        .iter()
        .map(|workspace| world.command("acme", enable(workspace, "live-stream"), at(3)))
        .collect();
    world.batch(&more, at(3));
    assert_eq!(
        world.consumption("c", "live-stream").allocated,
        0,
        "waits for a person again"
    );
    let person = world.command(
        "acme",
        transfer("c", "live-stream", 1, "entitlement_manager"),
        at(3),
    );
    assert_eq!(world.batch(&[person], at(3)), [Verdict::Applied]);
    let person = world.command(
        "acme",
        transfer("d", "live-stream", 1, "entitlement_manager"),
        at(3),
    );
    assert!(matches!(
        world.batch(&[person], at(3))[0],
        Verdict::Refused {
            refusal: Refusal::InsufficientPool,
            ..
        }
    ));
}

#[test]
fn an_unlimited_grant_revoked_before_it_arrives_ends_right_after_its_grant_entry() {
    let mut world = World::new();
    let top = world.command("acme", unlimited("seat", None), at(0));
    let revocation = world.command("acme", revoke_grant(&top, None), at(0));
    world.batch(&[revocation], at(0));
    world.batch(&[top], at(1));
    assert_eq!(
        marked(&world),
        [
            (LedgerKind::Grant, 1, 0, true),
            (LedgerKind::Revocation, 1, 0, true)
        ]
    );
    assert!(!is_unlimited(&world, "seat"));
    let join = world.command("acme", join("summit", "p1"), at(2));
    world.batch(&[join], at(2));
    assert_eq!(world.consumption("summit", "seat").missing(), 1);
}

// Rule 14: the catalogue.

#[test]
fn a_module_defined_automatic_fills_the_workspaces_that_were_waiting_for_it_oldest_first() {
    // Given modules that wait for a person (the default policy), 2 units of live-stream in
    // acme's pool and 1 in globex's, and four workspaces that enabled it and wait,
    let mut world = World::new();
    let acme_units = world.command("acme", grant("live-stream", 2), at(0));
    let globex_units = world.command("globex", grant("live-stream", 1), at(0));
    world.batch(&[acme_units, globex_units], at(0));
    for (minute, org, workspace) in [
        (1, "acme", "keynote"),
        (2, "acme", "summit"),
        (2, "globex", "fair"),
        (3, "acme", "expo"),
    ] {
        let enabled = world.command(org, enable(workspace, "live-stream"), at(minute));
        world.batch(&[enabled], at(minute));
    }
    assert!(world.book.ledger.is_empty(), "nothing moved by itself");
    assert_eq!(world.available("acme", "live-stream"), 2);

    // when the catalogue defines live-stream as automatic,
    let automatic = world.define("live-stream", Some(Assignment::Automatic), at(5));
    let verdicts = world.definitions(std::slice::from_ref(&automatic), at(5));
    assert_eq!(verdicts, [Verdict::Applied]);

    // then the two oldest of acme's waiting workspaces get its two units, globex's gets its
    // one, and the newest of acme's keeps waiting.
    let transfers: Vec<_> = world
        .book
        .ledger
        .iter()
        .map(|entry| {
            (
                entry.org_id.as_str(),
                entry.kind,
                entry.workspace_id.as_ref().map(WorkspaceId::as_str),
                entry.pool_available_after,
                entry.caused_by.clone(),
            )
        })
        .collect();
    let cause = automatic.event_id.clone();
    assert_eq!(
        transfers,
        [
            (
                "acme",
                LedgerKind::Transfer,
                Some("keynote"),
                1,
                cause.clone()
            ),
            (
                "acme",
                LedgerKind::Transfer,
                Some("summit"),
                0,
                cause.clone()
            ),
            (
                "globex",
                LedgerKind::Transfer,
                Some("fair"),
                0,
                cause.clone()
            ),
        ]
    );
    assert_eq!(world.consumption("expo", "live-stream").missing(), 1);
    let resolved: Vec<&str> = world
        .book
        .alerts
        .iter()
        .filter(|alert| alert.status == AlertStatus::Resolved)
        .map(|alert| alert.workspace_id.as_str())
        .collect();
    assert_eq!(resolved, ["fair", "keynote", "summit"]);
    assert!(world
        .book
        .alerts
        .iter()
        .all(|alert| alert.caused_by == cause));

    // From now on the module moves by itself: the next unit fills the last one waiting.
    let refill = world.command("acme", grant("live-stream", 1), at(6));
    world.batch(&[refill], at(6));
    assert_eq!(world.consumption("expo", "live-stream").allocated, 1);
}

#[test]
fn an_older_definition_arriving_later_is_stale() {
    let mut world = World::new();
    let newer = world.define("gamification", Some(Assignment::Automatic), at(10));
    let older = world.define("gamification", Some(Assignment::Manual), at(5));
    let verdicts = world.definitions(&[newer.clone(), older], at(10));
    assert_eq!(verdicts, [Verdict::Applied, Verdict::Stale]);
    assert_eq!(
        world.definitions(std::slice::from_ref(&newer), at(11)),
        [Verdict::Duplicate]
    );
    let gamification = Product::parse("gamification").unwrap();
    assert_eq!(world.book.name_of(&gamification), newer.name);
    assert!(world.book.moves_by_itself(&gamification), "still automatic");

    let units = world.command("acme", grant("gamification", 1), at(11));
    let enabled = world.command("acme", enable("summit", "gamification"), at(11));
    world.batch(&[units, enabled], at(11));
    assert_eq!(world.consumption("summit", "gamification").allocated, 1);
}

#[test]
fn a_module_defined_manual_stops_moving_by_itself_until_the_policy_decides_again() {
    // Given modules that move by themselves (modules.auto_assign) and 3 units in the pool,
    let mut world = World::with_policy(Policy {
        modules_auto_assign: true,
        ..Policy::default()
    });
    let units = world.command("acme", grant("gamification", 3), at(0));
    let keynote = world.command("acme", enable("keynote", "gamification"), at(1));
    world.batch(&[units, keynote], at(1));
    assert_eq!(world.consumption("keynote", "gamification").allocated, 1);

    // when the catalogue makes gamification manual, a workspace that enables it waits for a
    // person, and a refill moves nothing either;
    let manual = world.define("gamification", Some(Assignment::Manual), at(2));
    world.definitions(&[manual], at(2));
    let summit = world.command("acme", enable("summit", "gamification"), at(3));
    world.batch(&[summit], at(3));
    let refill = world.command("acme", grant("gamification", 1), at(4));
    world.batch(&[refill], at(4));
    assert_eq!(world.consumption("summit", "gamification").missing(), 1);
    assert_eq!(world.available("acme", "gamification"), 3);
    assert_eq!(
        entries(&world),
        [(LedgerKind::Grant, 1, 3)],
        "only the grant, no transfer"
    );

    // then a definition without an assignment hands the decision back to the policy, which
    // moves the module at once.
    let unassigned = world.define("gamification", None, at(5));
    world.definitions(&[unassigned], at(5));
    assert_eq!(world.consumption("summit", "gamification").allocated, 1);
    assert_eq!(world.available("acme", "gamification"), 2);
}

#[test]
fn a_product_never_defined_is_named_by_its_handle_and_seats_move_whatever_the_catalogue() {
    let mut world = World::new();
    let polls = Product::parse("polls").unwrap();
    assert_eq!(world.book.name_of(&polls), "polls");
    assert!(!world.book.moves_by_itself(&polls), "the policy decides");
    let seats = world.define("seat", None, at(0));
    world.definitions(std::slice::from_ref(&seats), at(0));
    assert_eq!(world.book.name_of(&Product::seat()), seats.name);
    let units = world.command("acme", grant("seat", 1), at(1));
    let joined = world.command("acme", join("summit", "p1"), at(1));
    world.batch(&[units, joined], at(1));
    assert_eq!(world.consumption("summit", "seat").allocated, 1);
}

// ---------------------------------------------------------------------------------------
// Rule 13: workspaces have a life.

fn update(
    workspace: &str,
    name: Option<&str>,
    ends_at: Option<DateTime<Utc>>,
    archived: bool,
) -> CommandBody {
    CommandBody::WorkspaceUpdated {
        workspace_id: WorkspaceId::parse(workspace).unwrap(),
        name: name.map(str::to_owned),
        starts_at: None,
        ends_at,
        archived,
    }
}

impl World {
    /// (name, live) of a workspace, as the book answers.
    fn life(&self, workspace: &str) -> (Option<String>, bool) {
        let workspace_id = WorkspaceId::parse(workspace).unwrap();
        (
            self.book.workspace_name(&workspace_id).map(str::to_owned),
            self.book.is_live(&workspace_id),
        )
    }

    fn life_changed(&self) -> Vec<String> {
        let mut changed: Vec<String> = self.book.life_changed().map(|w| w.to_string()).collect();
        changed.sort();
        changed
    }
}

#[test]
fn a_workspace_never_updated_is_live_and_has_no_name() {
    let mut world = World::new();
    let joined = world.command("acme", join("summit", "p1"), at(0));
    world.batch(&[joined], at(1));
    assert_eq!(world.life("summit"), (None, true));
    assert!(world.life_changed().is_empty());
}

#[test]
fn the_latest_update_wins_whole_and_an_older_one_arriving_late_changes_nothing() {
    let mut world = World::new();
    let first = world.command(
        "acme",
        update("summit", Some("Summit"), Some(at(600)), false),
        at(0),
    );
    // Later, and it names no end and no name: they are not set any more.
    let latest = world.command("acme", update("summit", None, None, false), at(5));
    let older = world.command(
        "acme",
        update("summit", Some("Summit 2026"), Some(at(700)), false),
        at(3),
    );
    let verdicts = world.batch(&[first.clone(), latest.clone()], at(10));
    assert_eq!(verdicts, [Verdict::Applied, Verdict::Applied]);
    assert_eq!(world.life("summit"), (None, true));
    let life = &world.book.workspaces[&WorkspaceId::parse("summit").unwrap()];
    assert_eq!(
        (life.ends_at, &life.last_event_id),
        (None, &latest.event_id)
    );
    assert!(
        world.life_changed().is_empty(),
        "named, then unnamed in the same batch: nothing to tell"
    );

    let verdicts = world.batch(&[older, latest, first], at(11));
    assert_eq!(
        verdicts,
        [Verdict::Stale, Verdict::Duplicate, Verdict::Stale],
        "an older update, and the latest again, change nothing"
    );
    assert_eq!(world.life("summit"), (None, true));
    assert!(world.life_changed().is_empty());
}

#[test]
fn updates_of_one_minute_are_ordered_by_event_id() {
    let mut world = World::new();
    let mut a = world.command("acme", update("summit", Some("A"), None, false), at(0));
    let mut b = world.command("acme", update("summit", Some("B"), None, false), at(0));
    a.event_id = EventId::parse("u-a").unwrap();
    b.event_id = EventId::parse("u-b").unwrap();
    assert_eq!(
        world.batch(&[b, a], at(1)),
        [Verdict::Applied, Verdict::Stale]
    );
    assert_eq!(world.life("summit"), (Some("B".to_owned()), true));
}

#[test]
fn an_update_under_another_organization_is_refused_and_changes_nothing() {
    let mut world = World::new();
    let claim = world.command("acme", update("summit", Some("Summit"), None, false), at(0));
    let stray = world.command("globex", update("summit", Some("Ours"), None, true), at(1));
    let verdicts = world.batch(&[claim, stray], at(2));
    assert_eq!(verdicts[0], Verdict::Applied);
    assert_eq!(refused(&verdicts[1]), Some(Refusal::TenantMismatch));
    assert_eq!(world.life("summit"), (Some("Summit".to_owned()), true));
    assert_eq!(
        world.book.new_claims,
        [(
            WorkspaceId::parse("summit").unwrap(),
            OrgId::parse("acme").unwrap()
        )],
        "the first update claims the workspace for its organization (rule 4)"
    );

    // And an update naming a workspace another organization's participant claimed.
    let mut world = World::new();
    let joined = world.command("acme", join("expo", "p1"), at(0));
    world.batch(&[joined], at(1));
    let stray = world.command("globex", update("expo", Some("Expo"), None, false), at(2));
    let verdicts = world.batch(&[stray], at(3));
    assert_eq!(refused(&verdicts[0]), Some(Refusal::TenantMismatch));
    assert_eq!(world.life("expo"), (None, true));
}

#[test]
fn a_workspace_turns_past_when_its_end_passes_and_keeps_what_it_holds() {
    let mut world = World::new();
    let grant = world.command("acme", grant("seat", 5), at(0));
    let life = world.command(
        "acme",
        update("summit", Some("Summit"), Some(at(60)), false),
        at(0),
    );
    let joined = world.command("acme", join("summit", "p1"), at(0));
    world.batch(&[grant, life, joined], at(1));
    assert_eq!(world.life("summit"), (Some("Summit".to_owned()), true));
    assert_eq!(world.life_changed(), ["summit"], "it got its name");

    // Before the end, the clock changes nothing; at the end, the workspace is past.
    let summit = WorkspaceId::parse("summit").unwrap();
    world.batch(&[], at(59));
    world.book.refresh_life(&summit, at(59));
    assert!(world.life_changed().is_empty());
    world.batch(&[], at(60));
    world.book.refresh_life(&summit, at(60));
    assert_eq!(world.life("summit"), (Some("Summit".to_owned()), false));
    assert_eq!(world.life_changed(), ["summit"]);
    assert!(world.book.workspaces[&summit].dirty);

    // Past workspaces keep what they hold and still count their participants.
    let joined = world.command("acme", join("summit", "p2"), at(61));
    world.batch(&[joined], at(61));
    let summit_seats = world.consumption("summit", "seat");
    assert_eq!((summit_seats.required, summit_seats.allocated), (2, 2));
    assert!(
        world.life_changed().is_empty(),
        "already past when the batch began"
    );
}

#[test]
fn an_event_naming_a_workspace_whose_end_passed_finds_it_past() {
    let mut world = World::new();
    let life = world.command("acme", update("summit", None, Some(at(60)), false), at(0));
    world.batch(&[life], at(1));
    let joined = world.command("acme", join("summit", "p1"), at(61));
    world.batch(&[joined], at(61));
    assert_eq!(world.life("summit"), (None, false));
    assert_eq!(world.life_changed(), ["summit"]);
}

#[test]
fn an_archived_workspace_is_past_and_a_later_update_can_bring_it_back() {
    let mut world = World::new();
    let archive = world.command("acme", update("summit", Some("Summit"), None, true), at(0));
    world.batch(&[archive], at(1));
    assert_eq!(world.life("summit"), (Some("Summit".to_owned()), false));
    assert_eq!(world.life_changed(), ["summit"]);

    let restore = world.command("acme", update("summit", Some("Summit"), None, false), at(2));
    world.batch(&[restore], at(3));
    assert_eq!(world.life("summit"), (Some("Summit".to_owned()), true));
    assert_eq!(world.life_changed(), ["summit"]);

    // An end already passed makes it past at once.
    let ended = world.command(
        "acme",
        update("summit", Some("Summit"), Some(at(2)), false),
        at(4),
    );
    world.batch(&[ended], at(5));
    assert_eq!(world.life("summit"), (Some("Summit".to_owned()), false));
}

/// The state messages of the last batch: (key as JSON, version, caused_by).
fn states(world: &World) -> Vec<(String, i64, String)> {
    world
        .book
        .states
        .iter()
        .map(|change| {
            (
                change.key.to_json(),
                change.version,
                change.caused_by.to_string(),
            )
        })
        .collect()
}

#[test]
fn a_batch_publishes_the_new_state_of_each_key_it_changed_once_with_the_next_version() {
    let mut w = World::new();
    let g = w.command("acme", grant("seat", 2), at(0));
    w.batch(std::slice::from_ref(&g), at(0));
    assert_eq!(
        states(&w),
        [(r#"["acme","seat"]"#.to_owned(), 1, g.event_id.to_string())]
    );
    // Three joins in one batch: one message per key, whatever the events.
    let joins: Vec<Command> = (1..=3)
        .map(|n| w.command("acme", join("summit", &format!("p{n}")), at(1)))
        .collect();
    w.batch(&joins, at(1));
    let last = joins[2].event_id.to_string();
    assert_eq!(
        states(&w),
        [
            (
                r#"["acme","seat"]"#.to_owned(),
                2,
                joins[1].event_id.to_string()
            ),
            (r#"["acme","summit","seat"]"#.to_owned(), 1, last),
        ]
    );
    let StateBody::Workspace(counts) = &w.book.states[1].body else {
        panic!("a workspace's state");
    };
    assert_eq!(
        (counts.required, counts.allocated, counts.missing()),
        (3, 2, 1)
    );
}

#[test]
fn a_batch_that_changes_no_state_publishes_none() {
    let mut w = World::new();
    let g = w.command("acme", grant("seat", 5), at(0));
    let j = w.command("acme", join("summit", "p1"), at(1));
    w.batch(&[g.clone(), j.clone()], at(1));
    assert_eq!(states(&w).len(), 2);
    // The same events again, and a cancellation that still counts (rule 3).
    let still_counts = w.command("acme", cancel("summit", "p1", true), at(2));
    w.batch(&[g, j, still_counts], at(2));
    assert_eq!(states(&w), [], "nothing changed, nothing is published");
}

#[test]
fn a_grant_not_valid_yet_is_published_as_pending_and_then_as_available() {
    let mut w = World::new();
    let g = w.command("acme", grant_window("seat", 4, Some(at(10)), None), at(0));
    w.batch(std::slice::from_ref(&g), at(0));
    let StateBody::Pool(pool) = &w.book.states[0].body else {
        panic!("a pool's state");
    };
    assert_eq!((pool.pending, pool.available, pool.granted), (4, 0, 0));
    assert_eq!(w.book.states[0].caused_by, g.event_id);
    // The clock's round at 11: the units become valid.
    w.batch(&[], at(11));
    w.book.settle_time(&OrgId::parse("acme").unwrap(), at(11));
    w.book.finish(at(11));
    let StateBody::Pool(pool) = &w.book.states[0].body else {
        panic!("a pool's state");
    };
    assert_eq!((pool.pending, pool.available, pool.granted), (0, 4, 4));
    assert_eq!(w.book.states[0].version, 2);
}

/// The pool warnings of the last batch: kind, status, the numbers and the cause.
fn warnings(world: &World) -> Vec<(&'static str, AlertStatus, WarningNumbers, String)> {
    world
        .book
        .pool_warnings
        .iter()
        .map(|warning| {
            (
                warning.key.kind(),
                warning.status,
                warning.numbers,
                warning.caused_by.to_string(),
            )
        })
        .collect()
}

fn low(available: i64, threshold: i64) -> WarningNumbers {
    WarningNumbers::Low {
        available,
        threshold,
    }
}

fn joins(
    world: &mut World,
    workspace: &str,
    from: usize,
    to: usize,
    at: DateTime<Utc>,
) -> Vec<Command> {
    (from..to)
        .map(|n| world.command("acme", join(workspace, &format!("p{n}")), at))
        .collect()
}

#[test]
fn a_pool_of_100_warns_at_10_left_follows_its_numbers_and_resolves_on_a_refill() {
    let mut world = World::new();
    let plan = world.command("acme", grant("seat", 100), at(0));
    world.batch(&[plan], at(0));
    assert!(warnings(&world).is_empty(), "100 left of 100: no warning");

    let first = joins(&mut world, "summit", 0, 89, at(1));
    world.batch(&first, at(1));
    assert_eq!(world.available("acme", "seat"), 11);
    assert!(warnings(&world).is_empty(), "11 left is above 10% of 100");

    let tenth = joins(&mut world, "summit", 89, 90, at(2));
    let cause = tenth[0].event_id.to_string();
    world.batch(&tenth, at(2));
    assert_eq!(
        warnings(&world),
        vec![("low", AlertStatus::Open, low(10, 10), cause)],
        "10 left is at the threshold: the warning opens"
    );
    let opened = world.book.pool_warnings[0].clone();
    assert_eq!(opened.opened_at, at(2));

    let more = joins(&mut world, "summit", 90, 93, at(3));
    world.batch(&more, at(3));
    let changed = &world.book.pool_warnings;
    assert_eq!(
        changed.len(),
        1,
        "one message for the batch's three transfers"
    );
    assert_eq!(
        (changed[0].status, changed[0].numbers),
        (AlertStatus::Open, low(7, 10))
    );
    assert_eq!(
        changed[0].opened_at,
        at(2),
        "still the warning that opened at minute 2"
    );
    assert_ne!(
        changed[0].key.warning_id(changed[0].revision),
        opened.key.warning_id(opened.revision),
        "each message has its own id"
    );

    let nothing = world.command("acme", cancel("expo", "p0", false), at(4));
    world.batch(&[nothing], at(4));
    assert!(
        warnings(&world).is_empty(),
        "numbers unchanged: nothing published"
    );

    let add_on = world.command("acme", grant("seat", 50), at(5));
    let cause = add_on.event_id.to_string();
    world.batch(&[add_on], at(5));
    assert_eq!(
        warnings(&world),
        vec![("low", AlertStatus::Resolved, low(57, 15), cause)],
        "57 left of 150 is above 15: resolved, with the new threshold"
    );
    assert_eq!(world.book.pool_warnings[0].opened_at, at(2));
}

#[test]
fn the_low_threshold_is_the_larger_of_its_settings_in_whole_units() {
    let thresholds = WarningThresholds {
        low_percent: 10,
        low_units: 3,
        expiring_within: Duration::days(30),
    };
    assert_eq!(thresholds.low_threshold(100), 10);
    assert_eq!(thresholds.low_threshold(15), 3, "3 units, above 1.5");
    assert_eq!(
        thresholds.low_threshold(45),
        4,
        "4 units are at or below 4.5, 5 are not"
    );
    assert_eq!(thresholds.low_threshold(9), 3);
    assert_eq!(thresholds.low_threshold(0), 3);
}

#[test]
fn a_pool_with_no_valid_counted_grant_or_an_unlimited_one_does_not_warn_low() {
    let mut world = World::new();
    let pending = world.command("acme", grant_window("seat", 10, Some(at(60)), None), at(0));
    let waiting = joins(&mut world, "summit", 0, 3, at(0));
    let mut batch = vec![pending];
    batch.extend(waiting);
    world.batch(&batch, at(0));
    assert!(
        warnings(&world).is_empty(),
        "0 available, but no grant is valid yet: a shortfall, no warning"
    );
    let top = world.command("acme", unlimited("seat", None), at(1));
    world.batch(&[top], at(1));
    let spent = joins(&mut world, "summit", 3, 20, at(2));
    world.batch(&spent, at(2));
    assert!(warnings(&world).is_empty(), "unlimited: never low");
    world.clock("acme", at(60));
    assert!(
        warnings(&world).is_empty(),
        "10 counted units valid, unlimited still: no warning"
    );
}

#[test]
fn a_grant_expiring_in_20_days_warns_at_once_and_resolves_when_its_units_are_drawn() {
    let mut world = World::new();
    let plan = world.command("acme", grant("seat", 1000), at(0));
    let expires_at = at(0) + Duration::days(20);
    let trial = world.command(
        "acme",
        grant_window("seat", 30, None, Some(expires_at)),
        at(0),
    );
    let trial_id = trial.event_id.to_string();
    world.batch(&[plan, trial], at(0));
    let expiring = |units| WarningNumbers::Expiring { units, expires_at };
    assert_eq!(
        warnings(&world),
        vec![(
            "expiring",
            AlertStatus::Open,
            expiring(30),
            trial_id.clone()
        )],
        "30 units expire in 20 days, within 30: warned at once"
    );
    assert_eq!(
        world.book.pool_warnings[0]
            .key
            .grant_id
            .as_ref()
            .map(ToString::to_string),
        Some(trial_id.clone())
    );

    // The trial expires first, so it is drawn first.
    let first = joins(&mut world, "summit", 0, 10, at(1));
    let cause = first[9].event_id.to_string();
    world.batch(&first, at(1));
    assert_eq!(
        warnings(&world),
        vec![("expiring", AlertStatus::Open, expiring(20), cause)],
        "10 drawn: 20 left to expire"
    );
    let rest = joins(&mut world, "summit", 10, 35, at(2));
    // A warning names the input that last changed its pool in the batch, as alerts do.
    let cause = rest[24].event_id.to_string();
    world.batch(&rest, at(2));
    assert_eq!(
        warnings(&world),
        vec![("expiring", AlertStatus::Resolved, expiring(0), cause)],
        "all 30 drawn: nothing left to expire"
    );
    world.clock("acme", expires_at);
    assert!(world.book.ledger.is_empty(), "nothing left to expire");
    assert!(warnings(&world).is_empty());
}

#[test]
fn the_clock_raises_an_expiring_warning_as_a_grant_comes_within_range_and_resolves_it_at_expiry() {
    let mut world = World::new();
    let expires_at = at(0) + Duration::days(40);
    let add_on = world.command(
        "acme",
        grant_window("seat", 20, None, Some(expires_at)),
        at(0),
    );
    let add_on_id = add_on.event_id.to_string();
    let plan = world.command("acme", grant("seat", 100), at(0));
    world.batch(&[add_on, plan], at(0));
    assert!(warnings(&world).is_empty(), "40 days away: not yet");
    world.clock(
        "acme",
        expires_at - Duration::days(30) - Duration::minutes(1),
    );
    assert!(
        warnings(&world).is_empty(),
        "a minute before the range: not yet"
    );
    world.clock("acme", expires_at - Duration::days(30));
    let expiring = |units| WarningNumbers::Expiring { units, expires_at };
    assert_eq!(
        warnings(&world),
        vec![(
            "expiring",
            AlertStatus::Open,
            expiring(20),
            add_on_id.clone()
        )],
        "30 days before: the clock raises it, caused by the grant"
    );
    world.clock("acme", expires_at - Duration::days(1));
    assert!(
        warnings(&world).is_empty(),
        "nothing changed: nothing published"
    );
    world.clock("acme", expires_at);
    assert_eq!(
        warnings(&world),
        vec![("expiring", AlertStatus::Resolved, expiring(0), add_on_id)],
        "the units expired"
    );
    assert_eq!(world.book.ledger[0].kind, LedgerKind::Expiry);
}

#[test]
fn a_revocation_resolves_the_expiring_warning_of_what_it_took() {
    let mut world = World::new();
    let expires_at = at(0) + Duration::days(10);
    let trial = world.command(
        "acme",
        sourced_window("seat", 5, "trial", "t-1", expires_at),
        at(0),
    );
    let plan = world.command("acme", grant("seat", 100), at(0));
    world.batch(&[trial, plan], at(0));
    assert_eq!(world.book.pool_warnings.len(), 1);
    let revoke = world.command("acme", revoke_source("trial", "t-1", None), at(1));
    let cause = revoke.event_id.to_string();
    world.batch(&[revoke], at(1));
    assert_eq!(
        warnings(&world),
        vec![(
            "expiring",
            AlertStatus::Resolved,
            WarningNumbers::Expiring {
                units: 0,
                expires_at
            },
            cause
        )]
    );
}

#[test]
fn an_open_low_warning_resolves_when_the_last_valid_grant_it_counted_expires_spent() {
    let mut world = World::new();
    let expires_at = at(0) + Duration::days(90);
    let plan = world.command(
        "acme",
        grant_window("seat", 10, None, Some(expires_at)),
        at(0),
    );
    let plan_id = plan.event_id.to_string();
    world.batch(&[plan], at(0));
    let all = joins(&mut world, "summit", 0, 10, at(1));
    world.batch(&all, at(1));
    assert_eq!(
        world
            .book
            .pool_warnings
            .iter()
            .map(|warning| (warning.key.kind(), warning.status))
            .collect::<Vec<_>>(),
        vec![("low", AlertStatus::Open)],
        "0 left of 10; the grant expires in 90 days, beyond the expiring range"
    );
    world.clock("acme", expires_at);
    assert!(
        world.book.ledger.is_empty(),
        "a spent grant leaves nothing to expire"
    );
    assert_eq!(
        warnings(&world),
        vec![("low", AlertStatus::Resolved, low(0, 0), plan_id)],
        "no valid counted grant left: the warning is resolved, caused by the grant that ended"
    );
}
