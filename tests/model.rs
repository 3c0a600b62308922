//! Property tests: the domain core against the reference model in `common/oracle.rs`, on
//! random event sequences delivered with random duplication, in random order and in
//! random batches, the way the store drives the core (a batch of commands, then `finish`;
//! now and then a clock round that brings validity windows up to date).
//!
//! The number of cases is 256 unless `PROPTEST_CASES` says otherwise. Failures are not
//! persisted to a regressions file: a failing case is printed, shrunk, and belongs as a
//! story test in `src/domain/tests.rs`.

#[path = "common/oracle.rs"]
mod oracle;

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};
use entitlement_worker::domain::{
    Actor, AlertStatus, Assignment, Book, Command, CommandBody, EventId, GrantSource, GrantUnits,
    Input, LedgerEntry, LedgerKind, LotStatus, OrgId, ParticipantId, Policy, Product,
    ProductDefined, Quantity, RevocationTarget, Verdict, WarningKey, WarningNumbers,
    WarningThresholds, WorkspaceId, WorkspaceLife,
};
use oracle::{
    EntryKind, Oracle, OracleBody, OracleDefinition, OracleEntry, OracleEvent, OracleLife,
    OracleTarget, OracleVerdict, OracleWarnings, SEAT,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

// ---------------------------------------------------------------------------------------
// The universe: few names, small numbers, a handful of minutes, so that ties, stale events,
// scarcity, tenancy conflicts and expiries all happen often.

const ORGS: [&str; 3] = ["o1", "o2", "o3"];
/// Each workspace's usual organization; now and then another one names it.
const WORKSPACES: [(&str, usize); 6] = [
    ("w1", 0),
    ("w2", 0),
    ("w3", 1),
    ("w4", 1),
    ("w5", 2),
    ("w6", 2),
];
const MODULES: [&str; 2] = ["gamification", "live-stream"];
const PARTICIPANTS: usize = 10;
const USERS: [&str; 2] = ["u1", "u2"];
/// Where grants come from: few enough that a revocation of a source often reaches several.
const SOURCES: [(&str, &str); 3] = [("plan", "basic"), ("add_on", "extra"), ("trial", "t1")];
/// A revocation of one grant names it by a number: [`name_events`] turns it into the
/// `event_id` of one of the case's grants (before or after the revocation), or, one time
/// in ten, of no grant at all.
const UNRESOLVED_GRANT: &str = "pick";
/// What the catalogue calls a product: few names, so that a definition often changes only
/// the assignment.
const NAMES: [&str; 2] = ["Engage", "Broadcast"];
/// What the event platform calls a workspace: few names, so that an update often changes
/// only the dates or the flag.
const WORKSPACE_NAMES: [&str; 2] = ["Summit", "Expo"];

fn minute(minute: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap() + Duration::minutes(minute)
}

/// The first batch's `now`; events occur at minutes 0 to 6, so some are in its future.
const FIRST_BATCH_MINUTE: i64 = 3;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Strategies.

/// An organization and a workspace it names: its own nine times in ten.
fn named_workspace() -> impl Strategy<Value = (String, String)> + Clone {
    (
        0..WORKSPACES.len(),
        prop::option::weighted(0.1, 0..ORGS.len()),
    )
        .prop_map(|(workspace, stray)| {
            let (name, home) = WORKSPACES[workspace];
            (ORGS[stray.unwrap_or(home)].to_owned(), name.to_owned())
        })
}

fn home_workspace() -> impl Strategy<Value = (String, String)> + Clone {
    (0..WORKSPACES.len()).prop_map(|workspace| {
        let (name, home) = WORKSPACES[workspace];
        (ORGS[home].to_owned(), name.to_owned())
    })
}

fn product() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => Just(SEAT.to_owned()),
        1 => Just(MODULES[0].to_owned()),
        1 => Just(MODULES[1].to_owned()),
    ]
}

fn participant() -> impl Strategy<Value = String> {
    (0..PARTICIPANTS).prop_map(|n| format!("p{n}"))
}

/// An event without its id: (occurred minute, org, body).
type Draft = (i64, String, OracleBody);

fn participant_draft(
    workspace: impl Strategy<Value = (String, String)> + Clone,
) -> impl Strategy<Value = Draft> {
    prop_oneof![
        3 => (0..=6i64, workspace.clone(), participant()).prop_map(
            |(at, (org, workspace_id), participant_id)| {
                (at, org, OracleBody::ParticipantAdded { workspace_id, participant_id })
            }
        ),
        2 => (0..=6i64, workspace, participant(), any::<bool>()).prop_map(
            |(at, (org, workspace_id), participant_id, activated)| {
                (
                    at,
                    org,
                    OracleBody::ParticipantCancelled { workspace_id, participant_id, activated },
                )
            }
        ),
    ]
}

fn draft() -> impl Strategy<Value = Draft> {
    let module = (0..=6i64, named_workspace(), 0..MODULES.len()).prop_map(
        |(at, (org, workspace_id), module)| {
            (
                at,
                org,
                OracleBody::ModuleEnabled {
                    workspace_id,
                    module: MODULES[module].to_owned(),
                },
            )
        },
    );
    let grant = (
        0..=6i64,
        0..ORGS.len(),
        prop_oneof![3 => Just(SEAT.to_owned()), 1 => Just(MODULES[0].to_owned()), 1 => Just(MODULES[1].to_owned())],
        // One grant in eight is unlimited (rule 12).
        prop::option::weighted(0.875, 1..=6i64),
        prop::option::weighted(0.5, 0..=30i64),
        prop::option::weighted(0.5, 1..=25i64),
        prop::option::weighted(0.6, 0..SOURCES.len()),
    )
        .prop_map(|(at, org, product, quantity, start, length, source)| {
            let valid_from = start.map(minute);
            let begins = valid_from.unwrap_or(minute(at));
            (
                at,
                ORGS[org].to_owned(),
                OracleBody::Granted {
                    product,
                    quantity,
                    valid_from,
                    expires_at: length.map(|length| begins + Duration::minutes(length)),
                    source: source.map(|source| {
                        let (kind, reference) = SOURCES[source];
                        (kind.to_owned(), reference.to_owned())
                    }),
                },
            )
        });
    let revocation = (
        0..=6i64,
        0..ORGS.len(),
        prop_oneof![
            (0..1000usize, prop::option::weighted(0.4, 1..=6i64)).prop_map(|(pick, quantity)| {
                OracleTarget::Grant {
                    grant_id: format!("{UNRESOLVED_GRANT}{pick}"),
                    quantity,
                }
            }),
            (0..SOURCES.len(), prop::option::weighted(0.3, product())).prop_map(
                |(source, product)| {
                    let (kind, reference) = SOURCES[source];
                    OracleTarget::Source {
                        kind: kind.to_owned(),
                        reference: reference.to_owned(),
                        product,
                    }
                }
            ),
        ],
    )
        .prop_map(|(at, org, target)| (at, ORGS[org].to_owned(), OracleBody::Revoked { target }));
    let transfer = (
        0..=6i64,
        named_workspace(),
        product(),
        1..=4i64,
        prop::bool::weighted(0.8),
        0..USERS.len(),
    )
        .prop_map(|(at, (org, workspace_id), product, seats, manager, user)| {
            let quantity = if product == SEAT { seats } else { 1 };
            (
                at,
                org,
                OracleBody::TransferRequested {
                    workspace_id,
                    product,
                    quantity,
                    role: if manager {
                        "entitlement_manager"
                    } else {
                        "viewer"
                    }
                    .to_owned(),
                    user_id: USERS[user].to_owned(),
                },
            )
        });
    // Rule 14: a module's definition now and then, automatic, manual or neither, at a
    // random time, so that later ones arrive first and modules change their assignment
    // while workspaces wait; seats are defined too, never with an assignment.
    let definition = (
        0..=6i64,
        prop_oneof![1 => Just(SEAT.to_owned()), 2 => Just(MODULES[0].to_owned()), 2 => Just(MODULES[1].to_owned())],
        0..NAMES.len(),
        prop::option::weighted(0.3, Just("Shown in the report.".to_owned())),
        prop_oneof![
            1 => Just(None),
            2 => Just(Some("automatic".to_owned())),
            2 => Just(Some("manual".to_owned())),
        ],
    )
        .prop_map(|(at, product, name, description, assignment)| {
            let assignment = if product == SEAT { None } else { assignment };
            (
                at,
                String::new(),
                OracleBody::ProductDefined {
                    product,
                    name: NAMES[name].to_owned(),
                    description,
                    assignment,
                },
            )
        });
    // Rule 13: a workspace's life now and then, at a random time, so that later updates
    // arrive first; its end is often within the minutes the batches cover, so the clock
    // and later batches see it pass; one in five is archived.
    let life = (
        0..=6i64,
        named_workspace(),
        prop::option::weighted(0.7, 0..WORKSPACE_NAMES.len()),
        prop::option::weighted(0.5, 0..=10i64),
        prop::option::weighted(0.6, 1..=30i64),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(at, (org, workspace_id), name, start, end, archived)| {
            let starts_at = start.map(minute);
            // After the start when there is one, as the decoder demands.
            let ends_at = end.map(|end| minute(start.unwrap_or(0) + end));
            (
                at,
                org,
                OracleBody::WorkspaceUpdated {
                    workspace_id,
                    name: name.map(|name| WORKSPACE_NAMES[name].to_owned()),
                    starts_at,
                    ends_at,
                    archived,
                },
            )
        });
    prop_oneof![
        5 => participant_draft(named_workspace()),
        1 => module,
        2 => grant,
        2 => transfer,
        1 => revocation,
        1 => definition,
        1 => life,
    ]
}

fn name_events(drafts: Vec<Draft>) -> Vec<OracleEvent> {
    let id = |index: usize| format!("e{index:03}");
    let grants: Vec<usize> = drafts
        .iter()
        .enumerate()
        .filter(|(_, (_, _, body))| matches!(body, OracleBody::Granted { .. }))
        .map(|(index, _)| index)
        .collect();
    drafts
        .into_iter()
        .enumerate()
        .map(|(index, (at, org_id, mut body))| {
            if let OracleBody::Revoked {
                target: OracleTarget::Grant { grant_id, .. },
            } = &mut body
            {
                let pick: usize = grant_id[UNRESOLVED_GRANT.len()..].parse().unwrap();
                *grant_id = match grants.len() {
                    0 => "no-such-grant".to_owned(),
                    _ if pick % 10 == 0 => "no-such-grant".to_owned(),
                    count => id(grants[pick % count]),
                };
            }
            OracleEvent {
                event_id: id(index),
                occurred_at: minute(at),
                org_id,
                body,
            }
        })
        .collect()
}

/// How many times an event is delivered.
fn copies() -> impl Strategy<Value = usize> {
    prop_oneof![6 => Just(1usize), 2 => Just(2usize), 1 => Just(3usize)]
}

/// One batch: how many messages, how many minutes pass before it, and whether the clock
/// runs first.
#[derive(Debug, Clone, Copy)]
struct Step {
    size: usize,
    advance: i64,
    clock: bool,
}

fn plan() -> impl Strategy<Value = Vec<Step>> {
    vec(
        (1..=12usize, 0..=3i64, prop::bool::weighted(0.3)).prop_map(|(size, advance, clock)| {
            Step {
                size,
                advance,
                clock,
            }
        }),
        1..30,
    )
}

/// Events, and the delivery: indices into `events`, duplicated and shuffled.
#[derive(Debug, Clone)]
struct Case {
    auto_assign: bool,
    events: Vec<OracleEvent>,
    delivery: Vec<usize>,
    plan: Vec<Step>,
}

fn duplicated(copies: &[usize]) -> Vec<usize> {
    copies
        .iter()
        .enumerate()
        .flat_map(|(index, &count)| std::iter::repeat_n(index, count))
        .collect()
}

fn case() -> impl Strategy<Value = Case> {
    (any::<bool>(), vec(draft(), 1..200), plan())
        .prop_flat_map(|(auto_assign, drafts, plan)| {
            let count = drafts.len();
            (
                Just(auto_assign),
                Just(drafts),
                vec(copies(), count),
                Just(plan),
            )
        })
        .prop_flat_map(|(auto_assign, drafts, copies, plan)| {
            (
                Just(auto_assign),
                Just(name_events(drafts)),
                Just(duplicated(&copies)).prop_shuffle(),
                Just(plan),
            )
        })
        .prop_map(|(auto_assign, events, delivery, plan)| Case {
            auto_assign,
            events,
            delivery,
            plan,
        })
}

/// Participant events only, each workspace named by its own organization: two deliveries
/// of the same duplicated events in two orders and two batchings. (Rule 4 makes a
/// workspace's owner the organization whose event came first, so when two organizations
/// name it the order may matter; the contract promises order independence only within
/// one tenancy. Without grants there is no scarcity, so nothing else depends on order.)
#[derive(Debug, Clone)]
struct TwoOrders {
    events: Vec<OracleEvent>,
    first: Vec<usize>,
    second: Vec<usize>,
    first_plan: Vec<Step>,
    second_plan: Vec<Step>,
}

fn two_orders() -> impl Strategy<Value = TwoOrders> {
    (
        vec(participant_draft(home_workspace()), 1..200),
        plan(),
        plan(),
    )
        .prop_flat_map(|(drafts, first_plan, second_plan)| {
            let count = drafts.len();
            (
                Just(drafts),
                vec(copies(), count),
                Just(first_plan),
                Just(second_plan),
            )
        })
        .prop_flat_map(|(drafts, copies, first_plan, second_plan)| {
            let delivery = duplicated(&copies);
            (
                Just(name_events(drafts)),
                Just(delivery.clone()).prop_shuffle(),
                Just(delivery).prop_shuffle(),
                Just(first_plan),
                Just(second_plan),
            )
        })
        .prop_map(
            |(events, first, second, first_plan, second_plan)| TwoOrders {
                events,
                first,
                second,
                first_plan,
                second_plan,
            },
        )
}

// ---------------------------------------------------------------------------------------
// Driving the core the way the store does.

fn input(event: &OracleEvent) -> Input {
    let workspace = |id: &str| WorkspaceId::parse(id).unwrap();
    let product = |handle: &str| Product::parse(handle).unwrap();
    let body = match &event.body {
        OracleBody::ProductDefined {
            product: handle,
            name,
            description,
            assignment,
        } => {
            return Input::ProductDefined(ProductDefined {
                event_id: EventId::parse(&event.event_id).unwrap(),
                occurred_at: event.occurred_at,
                product: product(handle),
                name: name.clone(),
                description: description.clone(),
                assignment: assignment
                    .as_deref()
                    .map(|assignment| Assignment::parse(assignment).unwrap()),
            })
        }
        OracleBody::ParticipantAdded {
            workspace_id,
            participant_id,
        } => CommandBody::ParticipantAdded {
            workspace_id: workspace(workspace_id),
            participant_id: ParticipantId::parse(participant_id).unwrap(),
        },
        OracleBody::ParticipantCancelled {
            workspace_id,
            participant_id,
            activated,
        } => CommandBody::ParticipantCancelled {
            workspace_id: workspace(workspace_id),
            participant_id: ParticipantId::parse(participant_id).unwrap(),
            activated: *activated,
        },
        OracleBody::ModuleEnabled {
            workspace_id,
            module,
        } => CommandBody::ModuleEnabled {
            workspace_id: workspace(workspace_id),
            module: product(module),
        },
        OracleBody::Granted {
            product: handle,
            quantity,
            valid_from,
            expires_at,
            source,
        } => CommandBody::EntitlementGranted {
            product: product(handle),
            units: match quantity {
                Some(quantity) => GrantUnits::Counted(Quantity::parse(*quantity).unwrap()),
                None => GrantUnits::Unlimited,
            },
            // As the decoder does: no `valid_from` means valid from `occurred_at`.
            valid_from: Some(valid_from.unwrap_or(event.occurred_at)),
            expires_at: *expires_at,
            source: source.as_ref().map(grant_source),
        },
        OracleBody::Revoked { target } => CommandBody::EntitlementRevoked {
            target: match target {
                OracleTarget::Grant { grant_id, quantity } => RevocationTarget::Grant {
                    grant_id: EventId::parse(grant_id).unwrap(),
                    quantity: quantity.map(|quantity| Quantity::parse(quantity).unwrap()),
                },
                OracleTarget::Source {
                    kind,
                    reference,
                    product: handle,
                } => RevocationTarget::Source {
                    source: grant_source(&(kind.clone(), reference.clone())),
                    product: handle.as_deref().map(product),
                },
            },
            reason: Some("support".to_owned()),
        },
        OracleBody::WorkspaceUpdated {
            workspace_id,
            name,
            starts_at,
            ends_at,
            archived,
        } => CommandBody::WorkspaceUpdated {
            workspace_id: workspace(workspace_id),
            name: name.clone(),
            starts_at: *starts_at,
            ends_at: *ends_at,
            archived: *archived,
        },
        OracleBody::TransferRequested {
            workspace_id,
            product: handle,
            quantity,
            role,
            user_id,
        } => CommandBody::TransferRequested {
            workspace_id: workspace(workspace_id),
            product: product(handle),
            quantity: Quantity::parse(*quantity).unwrap(),
            requested_by: Actor {
                user_id: user_id.clone(),
                role: role.clone(),
            },
        },
    };
    Input::Command(Command {
        event_id: EventId::parse(&event.event_id).unwrap(),
        occurred_at: event.occurred_at,
        org_id: OrgId::parse(&event.org_id).unwrap(),
        body,
    })
}

fn grant_source((kind, reference): &(String, String)) -> GrantSource {
    GrantSource {
        kind: kind.clone(),
        reference: reference.clone(),
    }
}

fn verdict_kind(verdict: &Verdict) -> OracleVerdict {
    match verdict {
        Verdict::Applied => OracleVerdict::Applied,
        Verdict::Duplicate => OracleVerdict::Duplicate,
        Verdict::Stale => OracleVerdict::Stale,
        Verdict::Refused { refusal, .. } => OracleVerdict::Refused(refusal.reason()),
    }
}

/// One book kept across batches (as the store keeps its state), and what was published.
struct Core {
    book: Book,
    /// Every ledger entry of every batch and clock round, in recording order.
    ledger: Vec<LedgerEntry>,
    /// (workspace, product) -> the `missing` of the last alert published for it.
    published: BTreeMap<(String, String), i64>,
    /// (workspace, product) -> allocated after the previous round.
    allocated_before: BTreeMap<(String, String), i64>,
    /// workspace -> (name, live) at the start of the round, as the store loaded them.
    lives_before: BTreeMap<String, (Option<String>, bool)>,
}

impl Core {
    fn new(auto_assign: bool) -> Self {
        Self {
            book: Book::new(Policy {
                modules_auto_assign: auto_assign,
                warnings: WARNINGS,
            }),
            ledger: Vec::new(),
            published: BTreeMap::new(),
            allocated_before: BTreeMap::new(),
            lives_before: BTreeMap::new(),
        }
    }

    /// Clears what one batch produced, as a fresh load by the store would.
    fn start_round(&mut self) {
        let book = &mut self.book;
        book.ledger.clear();
        book.alerts.clear();
        book.pool_warnings.clear();
        for record in book.warnings.values_mut() {
            record.dirty = false;
            record.is_new = false;
        }
        book.settled.clear();
        book.newly_processed.clear();
        book.new_claims.clear();
        for consumption in book.consumption.values_mut() {
            consumption.dirty = false;
        }
        for pool in book.pools.values_mut() {
            pool.dirty = false;
        }
        for organization in book.organizations.values_mut() {
            organization.dirty = false;
        }
        for record in book.participants.values_mut() {
            record.dirty = false;
        }
        for lot in book.lots.values_mut().flatten() {
            lot.dirty = false;
            lot.is_new = false;
        }
        for definition in book.catalogue.values_mut() {
            definition.dirty = false;
        }
        self.lives_before.clear();
        for (workspace_id, life) in &mut book.workspaces {
            life.dirty = false;
            life.is_new = false;
            life.loaded_name = life.name.clone();
            life.loaded_live = life.live;
            self.lives_before
                .insert(workspace_id.to_string(), (life.name.clone(), life.live));
        }
    }

    fn batch(&mut self, inputs: &[Input], now: DateTime<Utc>) -> Vec<Verdict> {
        self.start_round();
        let verdicts = inputs
            .iter()
            .map(|input| self.book.apply_input(input, now))
            .collect();
        self.book.finish(now);
        self.ledger.extend(self.book.ledger.iter().cloned());
        verdicts
    }

    /// The store's clock: settles the organizations with units due to start or end.
    fn clock(&mut self, now: DateTime<Utc>) {
        self.start_round();
        let due: BTreeSet<OrgId> = self
            .book
            .lots
            .values()
            .flatten()
            .filter(|lot| {
                (lot.status == LotStatus::Pending && lot.valid_from <= now)
                    || (lot.status == LotStatus::Active
                        && lot.expires_at.is_some_and(|end| end <= now))
            })
            .map(|lot| lot.org_id.clone())
            .collect();
        // And, as the store's clock, the pools whose warnings change by time alone: a
        // grant's units coming within range with no open warning, or a grant an open low
        // warning counts expiring.
        let warned = &self.book.warnings;
        let due: BTreeSet<OrgId> = due
            .into_iter()
            .chain(
                self.book
                    .lots
                    .values()
                    .flatten()
                    .filter(|lot| {
                        lot.status == LotStatus::Active
                            && !lot.unlimited
                            && lot.remaining > 0
                            && lot
                                .expires_at
                                .is_some_and(|end| end - WARNINGS.expiring_within <= now)
                            && !warned
                                .get(&WarningKey {
                                    org_id: lot.org_id.clone(),
                                    product: lot.product.clone(),
                                    grant_id: Some(lot.lot_id.clone()),
                                })
                                .is_some_and(|record| record.open)
                    })
                    .map(|lot| lot.org_id.clone()),
            )
            .chain(
                warned
                    .iter()
                    .filter(|(_, record)| record.recheck.as_ref().is_some_and(|(at, _)| *at <= now))
                    .map(|(key, _)| key.org_id.clone()),
            )
            .collect();
        for org in &due {
            self.book.settle_time(org, now);
        }
        // The store's clock loads the live workspaces whose end has passed; refreshing the
        // others changes nothing.
        let workspaces: Vec<WorkspaceId> = self.book.workspaces.keys().cloned().collect();
        for workspace_id in &workspaces {
            self.book.refresh_life(workspace_id, now);
        }
        self.book.finish(now);
        self.ledger.extend(self.book.ledger.iter().cloned());
    }

    fn holdings(&self) -> BTreeMap<(String, String), (i64, i64)> {
        self.book
            .consumption
            .iter()
            .filter(|(_, consumption)| consumption.required != 0 || consumption.allocated != 0)
            .map(|((workspace, product), consumption)| {
                (
                    (workspace.to_string(), product.to_string()),
                    (consumption.required, consumption.allocated),
                )
            })
            .collect()
    }

    /// (org, product) -> (available, granted, transferred, expired), pools that saw a grant.
    fn pools(&self) -> BTreeMap<(String, String), PoolState> {
        self.book
            .pools
            .iter()
            .filter(|(_, pool)| pool.granted_total != 0 || pool.unlimited)
            .map(|((org, product), pool)| {
                (
                    (org.to_string(), product.to_string()),
                    (
                        pool.available,
                        pool.granted_total,
                        pool.transferred_total,
                        pool.expired_total,
                        pool.revoked_total,
                        pool.unlimited,
                    ),
                )
            })
            .collect()
    }

    /// Everything a redelivery must leave as it is.
    fn snapshot(&self) -> String {
        let book = &self.book;
        let mut lines = Vec::new();
        let consumption: BTreeMap<_, _> = book
            .consumption
            .iter()
            .map(|(key, c)| {
                (
                    key.clone(),
                    (
                        c.org_id.clone(),
                        c.required,
                        c.allocated,
                        c.shortfall_since,
                        c.reported_missing,
                        c.alert_revision,
                    ),
                )
            })
            .collect();
        lines.push(format!("{consumption:?}"));
        let pools: BTreeMap<_, _> = book
            .pools
            .iter()
            .map(|(key, p)| {
                (
                    key.clone(),
                    (
                        p.available,
                        p.granted_total,
                        p.transferred_total,
                        p.expired_total,
                        p.revoked_total,
                        p.unlimited,
                    ),
                )
            })
            .collect();
        lines.push(format!("{pools:?}"));
        let lots: BTreeMap<_, _> = book
            .lots
            .values()
            .flatten()
            .map(|lot| {
                (
                    lot.lot_id.clone(),
                    (
                        lot.remaining,
                        lot.revoked,
                        lot.drawn,
                        lot.expired,
                        lot.status,
                    ),
                )
            })
            .collect();
        lines.push(format!("{lots:?}"));
        let revocations: BTreeMap<_, _> = book
            .revocations
            .values()
            .flatten()
            .map(|revocation| (revocation.event_id.clone(), revocation.applied))
            .collect();
        lines.push(format!("{revocations:?}"));
        let participants: BTreeMap<_, _> = book
            .participants
            .iter()
            .map(|(key, r)| (key.clone(), (r.last_event_id.clone(), r.counted)))
            .collect();
        lines.push(format!("{participants:?}"));
        let owners: BTreeMap<_, _> = book.owners.iter().collect();
        lines.push(format!("{owners:?}"));
        let sequences: BTreeMap<_, _> = book
            .organizations
            .iter()
            .map(|(org, o)| (org.clone(), o.last_sequence))
            .collect();
        lines.push(format!("{sequences:?}"));
        let mut processed: Vec<_> = book.processed.iter().collect();
        processed.sort();
        lines.push(format!("{processed:?}"));
        let catalogue: BTreeMap<_, _> = book.catalogue.iter().collect();
        lines.push(format!("{catalogue:?}"));
        let lives: BTreeMap<_, _> = book
            .workspaces
            .iter()
            .map(|(workspace_id, life)| (workspace_id.clone(), life_of(life)))
            .collect();
        lines.push(format!("{lives:?}"));
        lines.join("\n")
    }
}

// ---------------------------------------------------------------------------------------
// The properties, checked after every batch and every clock round.

/// A pool's available units and its totals: granted, transferred, expired, revoked.
type Totals = (i64, i64, i64, i64, i64);
/// With whether the product is unlimited now.
type PoolState = (i64, i64, i64, i64, i64, bool);

fn sign(kind: LedgerKind) -> i64 {
    match kind {
        LedgerKind::Grant => 1,
        LedgerKind::Transfer
        | LedgerKind::ManualTransfer
        | LedgerKind::Expiry
        | LedgerKind::Revocation => -1,
    }
}

/// Invariants of the core alone.
fn check_core(core: &mut Core) -> Result<(), TestCaseError> {
    let book = &core.book;

    // Rule 9: a pool never goes negative, and its totals explain it.
    for ((org, product), pool) in &book.pools {
        prop_assert!(
            pool.available >= 0,
            "pool {org}/{product} is negative: {pool:?}"
        );
        prop_assert_eq!(
            pool.available,
            pool.granted_total - pool.transferred_total - pool.expired_total - pool.revoked_total,
            "pool {}/{}: available != granted - transferred - expired - revoked",
            org,
            product
        );
    }

    // Rule 5: allocated never goes down.
    let allocated: BTreeMap<(String, String), i64> = book
        .consumption
        .iter()
        .map(|((workspace, product), c)| {
            ((workspace.to_string(), product.to_string()), c.allocated)
        })
        .collect();
    for (key, before) in &core.allocated_before {
        let now = allocated.get(key).copied().unwrap_or(0);
        prop_assert!(
            now >= *before,
            "allocated of {key:?} went down from {before} to {now}"
        );
    }
    core.allocated_before = allocated;

    // Rule 13: the round says which workspaces' name or liveness it changed, compared with
    // what it started from (a workspace never updated is live and has no name); an
    // archived workspace is past.
    let mut changed: Vec<String> = book.life_changed().map(ToString::to_string).collect();
    changed.sort();
    let mut expected: Vec<String> = book
        .workspaces
        .iter()
        .filter(|(workspace_id, life)| {
            let before = core
                .lives_before
                .get(workspace_id.as_str())
                .cloned()
                .unwrap_or((None, true));
            before != (life.name.clone(), life.live)
        })
        .map(|(workspace_id, _)| workspace_id.to_string())
        .collect();
    expected.sort();
    prop_assert_eq!(changed, expected, "the workspaces whose life changed");
    for (workspace_id, life) in &book.workspaces {
        prop_assert!(
            !(life.archived && life.live),
            "archived workspace {workspace_id} is live"
        );
    }

    // The ledger explains every pool and every workspace, and reads as a consumer sees it:
    // per organization, sequences 1, 2, 3... and each entry's `pool_available_after` is
    // the running balance of its pool.
    let mut balance: BTreeMap<(String, String), Totals> = BTreeMap::new();
    let mut held: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut sequence: BTreeMap<String, i64> = BTreeMap::new();
    for entry in &core.ledger {
        prop_assert!(entry.quantity > 0, "entry moves nothing: {entry:?}");
        let expected = sequence.entry(entry.org_id.to_string()).or_default();
        *expected += 1;
        prop_assert_eq!(
            entry.sequence,
            *expected,
            "sequence gap or repeat at {:?}",
            entry
        );
        let pool = balance
            .entry((entry.org_id.to_string(), entry.product.to_string()))
            .or_default();
        // Rule 12: a consumer ignores the quantity of unlimited entries.
        let counted = if entry.unlimited { 0 } else { entry.quantity };
        pool.0 += sign(entry.kind) * counted;
        match entry.kind {
            LedgerKind::Grant => pool.1 += counted,
            LedgerKind::Transfer | LedgerKind::ManualTransfer => pool.2 += counted,
            LedgerKind::Expiry => pool.3 += counted,
            LedgerKind::Revocation => pool.4 += counted,
        }
        prop_assert_eq!(
            entry.pool_available_after,
            pool.0,
            "pool_available_after is not the running balance at {:?}",
            entry
        );
        let is_transfer = matches!(
            entry.kind,
            LedgerKind::Transfer | LedgerKind::ManualTransfer
        );
        prop_assert_eq!(entry.workspace_id.is_some(), is_transfer, "{:?}", entry);
        prop_assert_eq!(
            entry.actor.is_some(),
            entry.kind == LedgerKind::ManualTransfer,
            "{:?}",
            entry
        );
        prop_assert_eq!(
            entry.grant_id.is_some(),
            !is_transfer,
            "grant, expiry and revocation entries name their grant: {:?}",
            entry
        );
        if let Some(workspace) = &entry.workspace_id {
            *held
                .entry((workspace.to_string(), entry.product.to_string()))
                .or_default() += entry.quantity;
        }
    }
    for (org, last) in &sequence {
        let organization = &book.organizations[&OrgId::parse(org).unwrap()];
        prop_assert_eq!(
            organization.last_sequence,
            *last,
            "last sequence of {}",
            org
        );
    }
    let pools: BTreeMap<(String, String), Totals> = core
        .pools()
        .into_iter()
        .map(
            |(key, (available, granted, transferred, expired, revoked, _))| {
                (key, (available, granted, transferred, expired, revoked))
            },
        )
        .collect();
    for ((org, product), pool) in &pools {
        let from_ledger = balance
            .get(&(org.clone(), product.clone()))
            .copied()
            .unwrap_or_default();
        prop_assert_eq!(*pool, from_ledger, "pool {}/{} vs its ledger", org, product);
    }
    for (key, from_ledger) in &balance {
        prop_assert_eq!(
            pools.get(key).copied().unwrap_or_default(),
            *from_ledger,
            "ledger of {:?} without its pool",
            key
        );
    }
    for ((workspace, product), consumption) in &book.consumption {
        let key = (workspace.to_string(), product.to_string());
        prop_assert_eq!(
            consumption.allocated,
            held.get(&key).copied().unwrap_or(0),
            "allocated of {:?} vs its ledger",
            key
        );
    }

    // Rule 5 (and 6 and 14 for a module assigned automatically): nothing waits while its
    // pool has units; rule 12: nothing at all waits while the product is unlimited.
    for ((workspace, product), consumption) in &book.consumption {
        prop_assert!(
            !(consumption.missing() > 0 && book.pool(&consumption.org_id, product).unlimited),
            "{}/{} misses {} while unlimited",
            workspace,
            product,
            consumption.missing()
        );
        if book.moves_by_itself(product) && consumption.missing() > 0 {
            let available = book.pool(&consumption.org_id, product).available;
            prop_assert_eq!(
                available,
                0,
                "{}/{} misses {} while the pool holds units",
                workspace,
                product,
                consumption.missing()
            );
        }
    }

    // Alerts only on change, and what they told consumers is the state.
    for alert in &book.alerts {
        let key = (alert.workspace_id.to_string(), alert.product.to_string());
        let before = core.published.get(&key).copied().unwrap_or(0);
        prop_assert_ne!(alert.missing, before, "alert without a change: {:?}", alert);
        prop_assert_eq!(
            alert.missing,
            alert.required - alert.allocated.min(alert.required)
        );
        prop_assert_eq!(alert.status == AlertStatus::Open, alert.missing > 0);
        core.published.insert(key, alert.missing);
    }
    for ((workspace, product), consumption) in &core.book.consumption {
        let key = (workspace.to_string(), product.to_string());
        prop_assert_eq!(
            core.published.get(&key).copied().unwrap_or(0),
            consumption.missing(),
            "the last alert of {:?} is not its state",
            key
        );
    }
    Ok(())
}

/// A ledger entry without its position: what the contract says it moved and why.
type Movement = (
    String,
    &'static str,
    String,
    i64,
    Option<String>,
    String,
    Option<String>,
    Option<String>,
    bool,
);
/// With its position: sequence and `pool_available_after`.
type Positioned = (
    String,
    i64,
    &'static str,
    String,
    i64,
    Option<String>,
    i64,
    String,
    Option<String>,
    Option<String>,
    bool,
);

/// (workspace, product) -> (missing, when the shortfall opened).
type Shortfalls = BTreeMap<(String, String), (i64, Option<DateTime<Utc>>)>;

fn core_entry(entry: &LedgerEntry) -> Positioned {
    (
        entry.org_id.to_string(),
        entry.sequence,
        entry.kind.as_str(),
        entry.product.to_string(),
        entry.quantity,
        entry.workspace_id.as_ref().map(ToString::to_string),
        entry.pool_available_after,
        entry.caused_by.to_string(),
        entry.grant_id.as_ref().map(ToString::to_string),
        entry.actor.clone(),
        entry.unlimited,
    )
}

fn oracle_entry(entry: &OracleEntry) -> Positioned {
    (
        entry.org_id.clone(),
        entry.sequence,
        entry.kind.as_str(),
        entry.product.clone(),
        entry.quantity,
        entry.workspace_id.clone(),
        entry.pool_available_after,
        entry.caused_by.clone(),
        entry.grant_id.clone(),
        entry.actor.clone(),
        entry.unlimited,
    )
}

fn movements(entries: &[Positioned]) -> Vec<Movement> {
    let mut movements: Vec<Movement> = entries
        .iter()
        .map(
            |(org, _, kind, product, quantity, workspace, _, cause, grant, actor, unlimited)| {
                (
                    org.clone(),
                    *kind,
                    product.clone(),
                    *quantity,
                    workspace.clone(),
                    cause.clone(),
                    grant.clone(),
                    actor.clone(),
                    *unlimited,
                )
            },
        )
        .collect();
    movements.sort();
    movements
}

/// The core and the oracle agree on the state and on what this round recorded.
///
/// The core records one transfer per top-up of one workspace, exactly as the oracle does
/// one event at a time, so ledger entries are compared one for one (as a multiset, then in
/// order with their sequence and `pool_available_after`); no per-batch grouping needs to
/// be allowed for.
fn check_agreement(
    core: &Core,
    oracle: &Oracle,
    oracle_ledger_from: usize,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(core.holdings(), oracle.holdings(), "required and allocated");
    let oracle_pools: BTreeMap<_, _> = oracle
        .pools()
        .into_iter()
        .filter(|(_, pool)| pool.granted != 0 || pool.unlimited)
        .map(|(key, pool)| {
            prop_assert_eq!(
                pool.available,
                pool.granted - pool.transferred - pool.expired - pool.revoked,
                "the oracle's own pool {:?}",
                key
            );
            Ok((
                key,
                (
                    pool.available,
                    pool.granted,
                    pool.transferred,
                    pool.expired,
                    pool.revoked,
                    pool.unlimited,
                ),
            ))
        })
        .collect::<Result<_, TestCaseError>>()?;
    prop_assert_eq!(core.pools(), oracle_pools, "pools");

    let core_round: Vec<Positioned> = core.book.ledger.iter().map(core_entry).collect();
    let oracle_round: Vec<Positioned> = oracle.ledger()[oracle_ledger_from..]
        .iter()
        .map(oracle_entry)
        .collect();
    prop_assert_eq!(
        movements(&core_round),
        movements(&oracle_round),
        "the round's ledger entries (as a multiset)"
    );
    for org in ORGS {
        let core_org: Vec<_> = core_round.iter().filter(|entry| entry.0 == org).collect();
        let oracle_org: Vec<_> = oracle_round.iter().filter(|entry| entry.0 == org).collect();
        prop_assert_eq!(core_org, oracle_org, "the ledger of {} in order", org);
    }

    let owners: BTreeMap<String, String> = core
        .book
        .owners
        .iter()
        .map(|(workspace, org)| (workspace.to_string(), org.to_string()))
        .collect();
    prop_assert_eq!(&owners, oracle.owners(), "workspace owners");

    let catalogue: BTreeMap<String, OracleDefinition> = core
        .book
        .catalogue
        .iter()
        .map(|(product, definition)| {
            (
                product.to_string(),
                OracleDefinition {
                    occurred_at: definition.occurred_at,
                    event_id: definition.event_id.to_string(),
                    name: definition.name.clone(),
                    description: definition.description.clone(),
                    assignment: definition
                        .assignment
                        .map(|assignment| assignment.as_str().to_owned()),
                },
            )
        })
        .collect();
    prop_assert_eq!(&catalogue, oracle.definitions(), "the catalogue");

    let lives: BTreeMap<String, OracleLife> = core
        .book
        .workspaces
        .iter()
        .map(|(workspace_id, life)| (workspace_id.to_string(), life_of(life)))
        .collect();
    prop_assert_eq!(&lives, oracle.lives(), "the workspaces' lives");
    for workspace in WORKSPACES.map(|(workspace, _)| workspace) {
        let workspace_id = WorkspaceId::parse(workspace).unwrap();
        let expected = oracle.lives().get(workspace);
        prop_assert_eq!(
            core.book.is_live(&workspace_id),
            expected.is_none_or(|life| life.live),
            "whether {} is live",
            workspace
        );
        prop_assert_eq!(
            core.book.workspace_name(&workspace_id),
            expected.and_then(|life| life.name.as_deref()),
            "the name of {}",
            workspace
        );
    }

    let core_shortfalls: Shortfalls = core
        .book
        .consumption
        .iter()
        .filter(|(_, c)| c.missing() > 0)
        .map(|((workspace, product), c)| {
            (
                (workspace.to_string(), product.to_string()),
                (c.missing(), c.shortfall_since),
            )
        })
        .collect();
    let oracle_shortfalls: Shortfalls = oracle
        .open_shortfalls()
        .into_iter()
        .map(|s| ((s.workspace_id, s.product), (s.missing, Some(s.opened_at))))
        .collect();
    prop_assert_eq!(core_shortfalls, oracle_shortfalls, "open shortfalls");
    Ok(())
}

/// A core's life as the oracle writes it.
fn life_of(life: &WorkspaceLife) -> OracleLife {
    OracleLife {
        occurred_at: life.last_event_at,
        event_id: life.last_event_id.to_string(),
        name: life.name.clone(),
        starts_at: life.starts_at,
        ends_at: life.ends_at,
        archived: life.archived,
        live: life.live,
    }
}

fn deliver(
    core: &mut Core,
    oracle: &mut Oracle,
    events: &[&OracleEvent],
    now: DateTime<Utc>,
) -> Result<Vec<OracleVerdict>, TestCaseError> {
    let from = oracle.ledger().len();
    let inputs: Vec<Input> = events.iter().map(|event| input(event)).collect();
    let verdicts = core.batch(&inputs, now);
    let mut kinds = Vec::new();
    for (event, verdict) in events.iter().zip(&verdicts) {
        let expected = oracle.apply(event, now);
        prop_assert_eq!(verdict_kind(verdict), expected, "verdict of {:?}", event);
        kinds.push(verdict_kind(verdict));
    }
    check_core(core)?;
    check_agreement(core, oracle, from)?;
    Ok(kinds)
}

fn tick(core: &mut Core, oracle: &mut Oracle, now: DateTime<Utc>) -> Result<(), TestCaseError> {
    let from = oracle.ledger().len();
    core.clock(now);
    oracle.settle(now);
    check_core(core)?;
    check_agreement(core, oracle, from)?;
    check_warnings(core, oracle, now)
}

/// The warning thresholds of the model's runs: small enough that its pools of a few units
/// warn, and an expiring range shorter than most of its windows (1 to 25 minutes).
const WARNINGS: WarningThresholds = WarningThresholds {
    low_percent: 25,
    low_units: 1,
    expiring_within: Duration::minutes(10),
};

/// Rule 15 after a clock round, when every pool's warnings are up to date: the warnings
/// the core holds open are those the oracle computes from its grants, with their numbers.
fn check_warnings(core: &Core, oracle: &Oracle, now: DateTime<Utc>) -> Result<(), TestCaseError> {
    let expected = oracle.warnings(
        now,
        i64::from(WARNINGS.low_percent),
        WARNINGS.low_units,
        WARNINGS.expiring_within,
    );
    let mut held = OracleWarnings::default();
    for (key, record) in &core.book.warnings {
        if !record.open {
            continue;
        }
        let (org, product) = (key.org_id.to_string(), key.product.to_string());
        match (record.numbers, &key.grant_id) {
            (
                WarningNumbers::Low {
                    available,
                    threshold,
                },
                None,
            ) => {
                held.low.insert((org, product), (available, threshold));
            }
            (WarningNumbers::Expiring { units, .. }, Some(grant)) => {
                held.expiring
                    .insert((org, product, grant.to_string()), units);
            }
            _ => prop_assert!(
                false,
                "a warning whose numbers are not of its kind: {:?}",
                key
            ),
        }
    }
    prop_assert_eq!(&held.low, &expected.low, "open low warnings at {}", now);
    prop_assert_eq!(
        &held.expiring,
        &expected.expiring,
        "open expiring warnings at {}",
        now
    );
    Ok(())
}

/// Delivers `delivery` in the batches of `plan` (cycled); returns the last batch's `now`.
fn run_plan(
    core: &mut Core,
    oracle: &mut Oracle,
    events: &[OracleEvent],
    delivery: &[usize],
    plan: &[Step],
    mut now: DateTime<Utc>,
    time_passes: bool,
) -> Result<(DateTime<Utc>, Vec<OracleVerdict>), TestCaseError> {
    let mut verdicts = Vec::new();
    let mut steps = plan.iter().cycle();
    let mut cursor = 0;
    while cursor < delivery.len() {
        let step = steps.next().unwrap();
        if time_passes {
            now += Duration::minutes(step.advance);
            if step.clock {
                tick(core, oracle, now)?;
            }
        }
        let end = (cursor + step.size).min(delivery.len());
        let batch: Vec<&OracleEvent> = delivery[cursor..end]
            .iter()
            .map(|&index| &events[index])
            .collect();
        verdicts.extend(deliver(core, oracle, &batch, now)?);
        cursor = end;
    }
    Ok((now, verdicts))
}

fn core_and_oracle_agree(case: &Case) -> Result<(), TestCaseError> {
    let mut core = Core::new(case.auto_assign);
    let mut oracle = Oracle::new(case.auto_assign);
    let (now, _) = run_plan(
        &mut core,
        &mut oracle,
        &case.events,
        &case.delivery,
        &case.plan,
        minute(FIRST_BATCH_MINUTE),
        true,
    )?;

    // Redelivery: the clock first, so that nothing is due; then the whole delivery again at
    // the same time changes nothing and records nothing.
    tick(&mut core, &mut oracle, now)?;
    let before = core.snapshot();
    let ledger_before = core.ledger.len();
    let (_, verdicts) = run_plan(
        &mut core,
        &mut oracle,
        &case.events,
        &case.delivery,
        &case.plan,
        now,
        false,
    )?;
    prop_assert_eq!(
        core.ledger.len(),
        ledger_before,
        "a redelivery recorded ledger entries"
    );
    prop_assert_eq!(core.snapshot(), before, "a redelivery changed the state");
    for verdict in verdicts {
        prop_assert!(
            matches!(
                verdict,
                OracleVerdict::Duplicate
                    | OracleVerdict::Stale
                    | OracleVerdict::Refused("tenant_mismatch")
            ),
            "a redelivered event was {:?}",
            verdict
        );
    }
    Ok(())
}

/// Rules 2 and 3 straight from the events: each participant's latest event decides.
fn required_from_events(events: &[OracleEvent]) -> BTreeMap<String, i64> {
    let mut latest: BTreeMap<(&str, &str), (DateTime<Utc>, &str, bool)> = BTreeMap::new();
    for event in events {
        let (workspace, participant, counts) = match &event.body {
            OracleBody::ParticipantAdded {
                workspace_id,
                participant_id,
            } => (workspace_id, participant_id, true),
            OracleBody::ParticipantCancelled {
                workspace_id,
                participant_id,
                activated,
            } => (workspace_id, participant_id, *activated),
            _ => continue,
        };
        let candidate = (event.occurred_at, event.event_id.as_str(), counts);
        let slot = latest
            .entry((workspace.as_str(), participant.as_str()))
            .or_insert(candidate);
        if (candidate.0, candidate.1) > (slot.0, slot.1) {
            *slot = candidate;
        }
    }
    let mut required = BTreeMap::new();
    for ((workspace, _), (_, _, counts)) in latest {
        if counts {
            *required.entry(workspace.to_owned()).or_default() += 1;
        }
    }
    required
}

fn seats_required(core: &Core) -> BTreeMap<String, i64> {
    core.holdings()
        .into_iter()
        .filter(|((_, product), (required, _))| product == SEAT && *required > 0)
        .map(|((workspace, _), (required, _))| (workspace, required))
        .collect()
}

fn order_does_not_change_required(case: &TwoOrders) -> Result<(), TestCaseError> {
    let expected = required_from_events(&case.events);
    let mut outcomes = Vec::new();
    for (delivery, plan) in [
        (&case.first, &case.first_plan),
        (&case.second, &case.second_plan),
    ] {
        let mut core = Core::new(false);
        let mut oracle = Oracle::new(false);
        run_plan(
            &mut core,
            &mut oracle,
            &case.events,
            delivery,
            plan,
            minute(FIRST_BATCH_MINUTE),
            true,
        )?;
        prop_assert!(core.ledger.is_empty(), "no grant, so no ledger entry");
        outcomes.push(seats_required(&core));
    }
    prop_assert_eq!(&outcomes[0], &outcomes[1], "required depends on the order");
    prop_assert_eq!(
        &outcomes[0],
        &expected,
        "required is not what the latest events say"
    );
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// Every invariant after every batch, the core agreeing with the oracle, and a second
    /// delivery of everything changing nothing.
    #[test]
    fn the_core_keeps_the_contract_and_agrees_with_the_oracle(case in case()) {
        core_and_oracle_agree(&case)?;
    }

    /// Rule 2: with participant events only, `required` does not depend on the order or
    /// the batching of the delivery.
    #[test]
    fn required_seats_do_not_depend_on_the_delivery_order(case in two_orders()) {
        order_does_not_change_required(&case)?;
    }
}

// ---------------------------------------------------------------------------------------
// The oracle's JSON entry point, for the end-to-end tests that build their events as JSON.

#[test]
fn the_oracle_reads_the_input_topics_from_json() {
    use serde_json::json;
    let base = |extra: serde_json::Value| {
        let mut value =
            json!({"event_id": "e1", "occurred_at": "2026-01-01T09:00:00Z", "org_id": "acme"});
        for (key, field) in extra.as_object().unwrap() {
            value[key] = field.clone();
        }
        value
    };
    let added = OracleEvent::from_json(
        "participant-added",
        &base(json!({"workspace_id": "summit", "participant_id": "p1", "extra": 1})),
    )
    .unwrap();
    assert_eq!(added.workspace_id(), Some("summit"));
    let cancelled = OracleEvent::from_json(
        "participant_cancelled",
        &base(json!({"workspace_id": "summit", "participant_id": "p1", "activated": false})),
    )
    .unwrap();
    assert!(matches!(
        cancelled.body,
        OracleBody::ParticipantCancelled {
            activated: false,
            ..
        }
    ));
    assert!(OracleEvent::from_json(
        "participant-cancelled",
        &base(json!({"workspace_id": "summit", "participant_id": "p1"}))
    )
    .is_none());
    assert!(OracleEvent::from_json(
        "module-enabled",
        &base(json!({"workspace_id": "summit", "module": "seat"}))
    )
    .is_none());
    let grant = OracleEvent::from_json(
        "entitlement-granted",
        &base(
            json!({"product": "seat", "quantity": 3, "expires_at": "2026-01-02T09:00:00Z",
                      "source": {"kind": "trial", "reference": "t"}}),
        ),
    )
    .unwrap();
    assert!(matches!(
        grant.body,
        OracleBody::Granted {
            quantity: Some(3),
            valid_from: None,
            expires_at: Some(_),
            ..
        }
    ));
    assert!(OracleEvent::from_json(
        "entitlement-granted",
        &base(json!({"product": "seat", "quantity": 0}))
    )
    .is_none());
    let transfer = OracleEvent::from_json(
        "entitlement-transfer-requested",
        &base(
            json!({"workspace_id": "summit", "product": "gamification", "quantity": 1,
                      "requested_by": {"user_id": "u-alice", "role": "entitlement_manager"}}),
        ),
    )
    .unwrap();
    let mut transfer = transfer;
    transfer.event_id = "t1".into();

    let mut oracle = Oracle::new(false);
    let now = DateTime::parse_from_rfc3339("2026-01-01T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let module_grant = OracleEvent::from_json(
        "entitlement-granted",
        &json!({"event_id": "g2", "occurred_at": "2026-01-01T09:00:00Z", "org_id": "acme",
                "product": "gamification", "quantity": 1}),
    )
    .unwrap();
    assert_eq!(oracle.apply(&grant, now), OracleVerdict::Applied);
    assert_eq!(oracle.apply(&grant, now), OracleVerdict::Duplicate);
    assert_eq!(oracle.apply(&module_grant, now), OracleVerdict::Applied);
    let mut added = added;
    added.event_id = "a1".into();
    assert_eq!(oracle.apply(&added, now), OracleVerdict::Applied);
    assert_eq!(oracle.apply(&transfer, now), OracleVerdict::Applied);
    assert_eq!(
        (
            oracle.required("summit", SEAT),
            oracle.allocated("summit", SEAT)
        ),
        (1, 1)
    );
    assert_eq!(oracle.pool("acme", SEAT).available, 2);
    let kinds: Vec<EntryKind> = oracle.ledger().iter().map(|entry| entry.kind).collect();
    assert_eq!(
        kinds,
        [
            EntryKind::Grant,
            EntryKind::Grant,
            EntryKind::Transfer,
            EntryKind::ManualTransfer
        ]
    );
    assert_eq!(oracle.ledger()[3].actor.as_deref(), Some("u-alice"));

    for refused in [
        json!({"grant_id": "e1", "source": {"kind": "trial", "reference": "t"}}),
        json!({}),
        json!({"source": {"kind": "trial", "reference": "t"}, "quantity": 1}),
        json!({"grant_id": "e1", "product": "seat"}),
        json!({"grant_id": "e1", "reason": "x".repeat(257)}),
    ] {
        assert!(
            OracleEvent::from_json("entitlement-revoked", &base(refused.clone())).is_none(),
            "{refused}"
        );
    }
    let mut revocation = OracleEvent::from_json(
        "entitlement-revoked",
        &base(json!({"source": {"kind": "trial", "reference": "t"}, "reason": "over"})),
    )
    .unwrap();
    revocation.event_id = "r1".into();
    assert_eq!(oracle.apply(&revocation, now), OracleVerdict::Applied);
    assert_eq!(oracle.apply(&revocation, now), OracleVerdict::Duplicate);
    let last = oracle.ledger().last().unwrap();
    assert_eq!(
        (last.kind, last.quantity, last.grant_id.as_deref()),
        (EntryKind::Revocation, 2, Some("e1"))
    );
    assert_eq!(oracle.pool("acme", SEAT).available, 0);
    assert_eq!(oracle.pool("acme", SEAT).revoked, 2);

    // Rule 14: a definition names no organization; seats take no assignment.
    let define = |id: &str, at: &str, fields: serde_json::Value| {
        let mut value = json!({"event_id": id, "occurred_at": at});
        for (key, field) in fields.as_object().unwrap() {
            value[key] = field.clone();
        }
        OracleEvent::from_json("product-defined", &value)
    };
    for refused in [
        json!({"product": "seat", "name": "Seat", "assignment": "manual"}),
        json!({"product": "polls", "name": ""}),
        json!({"product": "polls", "name": "Polls", "assignment": "sometimes"}),
        json!({"product": "polls", "name": "Polls", "description": "d".repeat(2001)}),
        json!({"product": "polls"}),
    ] {
        assert!(
            define("d0", "2026-01-01T09:00:00Z", refused.clone()).is_none(),
            "{refused}"
        );
    }
    let enabled = OracleEvent::from_json(
        "module-enabled",
        &json!({"event_id": "m1", "occurred_at": "2026-01-01T09:00:00Z", "org_id": "acme",
                "workspace_id": "expo", "module": "gamification"}),
    )
    .unwrap();
    let gamification = OracleEvent::from_json(
        "entitlement-granted",
        &json!({"event_id": "g3", "occurred_at": "2026-01-01T09:00:00Z", "org_id": "acme",
                "product": "gamification", "quantity": 1}),
    )
    .unwrap();
    assert_eq!(oracle.apply(&gamification, now), OracleVerdict::Applied);
    assert_eq!(oracle.apply(&enabled, now), OracleVerdict::Applied);
    assert_eq!(
        oracle.missing("expo", "gamification"),
        1,
        "waits for a person"
    );
    let automatic = define(
        "d1",
        "2026-01-01T09:30:00Z",
        json!({"product": "gamification", "name": "Engage", "assignment": "automatic",
               "org_id": "ignored"}),
    )
    .unwrap();
    assert_eq!(automatic.org_id, "");
    let older = define(
        "d2",
        "2026-01-01T09:10:00Z",
        json!({"product": "gamification", "name": "Old", "assignment": "manual"}),
    )
    .unwrap();
    assert_eq!(oracle.apply(&automatic, now), OracleVerdict::Applied);
    assert_eq!(oracle.apply(&older, now), OracleVerdict::Stale);
    assert_eq!(oracle.apply(&automatic, now), OracleVerdict::Duplicate);
    assert_eq!(oracle.allocated("expo", "gamification"), 1);
    let last = oracle.ledger().last().unwrap();
    assert_eq!(
        (
            last.kind,
            last.caused_by.as_str(),
            last.workspace_id.as_deref()
        ),
        (EntryKind::Transfer, "d1", Some("expo"))
    );
    assert_eq!(oracle.name_of("gamification"), "Engage");
    assert_eq!(oracle.name_of("polls"), "polls");
}
