//! `entitlement-worker verify`: replays the whole ledger from PostgreSQL and checks every
//! invariant against the stored state. One pass over the ledger in sequence order, with
//! memory bounded by the number of pools, workspaces and revocations, not of entries. It
//! reads one snapshot, so a worker committing meanwhile causes no false mismatch.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use futures::TryStreamExt as _;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::codec::entry_id;
use crate::domain::OrgId;

/// One invariant and what the replay found.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub checked: u64,
    /// The first few mismatches, each a sentence.
    pub failures: Vec<String>,
    pub failure_count: u64,
}

impl Check {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            checked: 0,
            failures: Vec::new(),
            failure_count: 0,
        }
    }

    fn expect(&mut self, holds: bool, failure: impl FnOnce() -> String) {
        self.checked += 1;
        if !holds {
            self.failure_count += 1;
            if self.failures.len() < 10 {
                self.failures.push(failure());
            }
        }
    }

    /// Counts one case, failed when it has a problem.
    fn expect_none(&mut self, problem: Option<String>) {
        let holds = problem.is_none();
        self.expect(holds, || problem.unwrap_or_default());
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    pub entries: u64,
    pub organizations: u64,
    pub checks: Vec<Check>,
}

impl Verification {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|check| check.failure_count == 0)
    }

    pub fn to_text(&self) -> String {
        let mut out = format!(
            "Replayed {} ledger entries of {} organizations.\n",
            self.entries, self.organizations
        );
        for check in &self.checks {
            let verdict = if check.failure_count == 0 {
                "ok  "
            } else {
                "FAIL"
            };
            out.push_str(&format!(
                "{verdict} {} ({} checked{})\n",
                check.name,
                check.checked,
                if check.failure_count > 0 {
                    format!(", {} mismatched", check.failure_count)
                } else {
                    String::new()
                }
            ));
            for failure in &check.failures {
                out.push_str(&format!("       {failure}\n"));
            }
        }
        out.push_str(if self.passed() {
            "The ledger and the state agree.\n"
        } else {
            "MISMATCH: the ledger and the state disagree.\n"
        });
        out
    }
}

#[derive(Default, Clone, Copy)]
struct Balance {
    available: i64,
    granted: i64,
    transferred: i64,
    expired: i64,
    revoked: i64,
    /// Unlimited grants whose grant entry came and whose expiry or revocation did not.
    unlimited_grants: i64,
}

/// A pool's totals as its lots add them up: granted (lots no longer pending), transferred,
/// expired and revoked counted units.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
struct LotTotals {
    granted: i64,
    drawn: i64,
    expired: i64,
    revoked: i64,
}

#[derive(sqlx::FromRow)]
struct Entry {
    org_id: String,
    sequence: i64,
    entry_id: Uuid,
    product: String,
    kind: String,
    quantity: i64,
    workspace_id: Option<String>,
    pool_available_after: i64,
    caused_by: String,
    grant_id: Option<String>,
    unlimited: bool,
}

/// What the ledger says of one grant so far: its product and the units its entries moved.
struct GrantUnits {
    product: String,
    granted: i64,
    expired: i64,
    revoked: i64,
    unlimited: bool,
}

/// A `revocation` entry, kept to compare with the revocation that caused it.
struct RevocationEntry {
    org_id: String,
    sequence: i64,
    caused_by: String,
    grant_id: String,
    quantity: i64,
}

#[derive(sqlx::FromRow)]
struct StoredRevocation {
    org_id: String,
    event_id: String,
    occurred_at: DateTime<Utc>,
    grant_id: Option<String>,
    quantity: Option<i64>,
    source_kind: Option<String>,
    source_reference: Option<String>,
    product: Option<String>,
    applied: bool,
}

impl StoredRevocation {
    /// Whether this revocation of a source reaches `lot` (rule 11): a grant of the source
    /// (and product, when it names one) whose `occurred_at` is not after its own.
    fn reaches_by_source(&self, lot: &StoredLot) -> bool {
        self.source_kind.is_some()
            && lot.source_kind == self.source_kind
            && lot.source_reference == self.source_reference
            && self
                .product
                .as_ref()
                .is_none_or(|product| product == &lot.product)
            && lot.occurred_at <= self.occurred_at
    }
}

#[derive(sqlx::FromRow)]
struct StoredLot {
    org_id: String,
    lot_id: String,
    product: String,
    quantity: i64,
    remaining: i64,
    revoked: i64,
    drawn: i64,
    expired: i64,
    unlimited: bool,
    status: String,
    source_kind: Option<String>,
    source_reference: Option<String>,
    occurred_at: DateTime<Utc>,
}

/// Replays the ledger and compares it with the pools, the grants, the revocations, the
/// workspaces and the sequences.
pub async fn verify(pool: &PgPool) -> anyhow::Result<Verification> {
    let mut gapless = Check::new("sequences start at 1 per organization, with no gap or repeat");
    let mut ids =
        Check::new("every entry id is the one derived from its organization and sequence");
    let mut never_negative = Check::new("no pool balance is ever negative");
    let mut running = Check::new("every entry's pool_available_after equals the replayed balance");
    let mut pools_match = Check::new(
        "each pool's balance equals grants - transfers - expiries - revocations, its totals \
         match, and it is unlimited exactly while an unlimited grant is",
    );
    let mut lots_account = Check::new(
        "each pool's grants add up to its totals: granted, transferred, expired and revoked units",
    );
    let mut revocations_follow =
        Check::new("every revocation takes units its grant put in the pool and still had");
    let mut lots_revoked =
        Check::new("each grant's revoked units equal the revocation entries naming it");
    let mut revoked_status = Check::new(
        "a revoked grant has nothing left and lost units to revocations; a grant not yet valid lost none",
    );
    let mut revocations_caused = Check::new(
        "every revocation entry comes from a stored revocation that reaches its grant, once per grant",
    );
    let mut revocations_done =
        Check::new("no grant in the pool keeps units a stored revocation should have taken");
    let mut allocated_match =
        Check::new("each workspace's allocated units equal the transfers into it");
    let mut last_sequence = Check::new("each organization's last sequence matches its ledger");
    let mut warnings_follow = Check::new(
        "each open pool warning says what is in the pool: a low one its available units, an \
         expiring one its grant's units still there",
    );

    // Every query reads the same snapshot, however long the replay takes.
    let mut transaction = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *transaction)
        .await?;

    let mut balances: BTreeMap<(String, String), Balance> = BTreeMap::new();
    let mut moved: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    // The grants of the organization being replayed (the ledger comes by organization).
    let mut grants: HashMap<String, GrantUnits> = HashMap::new();
    let mut revoked_by_grant: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut revocation_entries: Vec<RevocationEntry> = Vec::new();
    let mut entries = 0_u64;
    let mut rows = sqlx::query_as::<_, Entry>(
        "SELECT b.org_id, b.first_sequence + e.n - 1 AS sequence, e.entry_id, e.product,
                e.kind, e.quantity, e.workspace_id, e.pool_available_after, e.caused_by,
                e.grant_id, e.unlimited
           FROM ledger_blocks b
          CROSS JOIN LATERAL unnest(b.entry_ids, b.products, b.kinds, b.quantities,
                                    b.workspace_ids, b.pool_available_after, b.caused_by,
                                    b.grant_ids, b.unlimited)
                WITH ORDINALITY AS e (entry_id, product, kind, quantity, workspace_id,
                                      pool_available_after, caused_by, grant_id, unlimited, n)
          ORDER BY b.org_id, b.first_sequence, e.n",
    )
    .fetch(&mut *transaction);
    while let Some(entry) = rows.try_next().await? {
        let Entry {
            org_id: org,
            sequence,
            entry_id: id,
            product,
            kind,
            quantity,
            workspace_id: workspace,
            pool_available_after: after,
            caused_by,
            grant_id,
            unlimited,
        } = entry;
        entries += 1;
        // Rule 12: the quantity of an unlimited entry is in no counted balance.
        let counted = if unlimited { 0 } else { quantity };
        let previous = last.get(&org).copied().unwrap_or(0);
        if previous == 0 {
            // A new organization: the grants of the one before are done with.
            grants.clear();
        }
        gapless.expect(sequence == previous + 1, || {
            format!("{org}: sequence {sequence} follows {previous}")
        });
        last.insert(org.clone(), sequence);
        let expected_id = OrgId::parse(&org)
            .ok()
            .map(|org_id| entry_id(&org_id, sequence));
        ids.expect(expected_id == Some(id), || {
            format!("{org} #{sequence}: entry id {id}")
        });
        // Entries written before revocations existed name their grant only as the cause.
        let grant = grant_id.unwrap_or_else(|| caused_by.clone());
        let balance = balances.entry((org.clone(), product.clone())).or_default();
        match kind.as_str() {
            "grant" => {
                balance.available += counted;
                balance.granted += counted;
                balance.unlimited_grants += i64::from(unlimited);
                grants
                    .entry(grant)
                    .or_insert_with(|| GrantUnits {
                        product: product.clone(),
                        granted: 0,
                        expired: 0,
                        revoked: 0,
                        unlimited,
                    })
                    .granted += counted;
            }
            "transfer" | "manual_transfer" => {
                balance.available -= counted;
                balance.transferred += counted;
                if let Some(workspace) = workspace {
                    *moved.entry((workspace, product.clone())).or_default() += quantity;
                }
            }
            "expiry" => {
                balance.available -= counted;
                balance.expired += counted;
                balance.unlimited_grants -= i64::from(unlimited);
                if let Some(units) = grants.get_mut(&grant) {
                    units.expired += counted;
                }
            }
            "revocation" => {
                balance.available -= counted;
                balance.revoked += counted;
                balance.unlimited_grants -= i64::from(unlimited);
                let problem = match grants.get_mut(&grant) {
                    None => Some(format!(
                        "{org} #{sequence}: revocation {caused_by} took {quantity} {product} of \
                         grant {grant}, which has no grant entry before it"
                    )),
                    Some(units) if units.product != product => Some(format!(
                        "{org} #{sequence}: revocation {caused_by} took {quantity} {product} of \
                         grant {grant}, a grant of {}",
                        units.product
                    )),
                    Some(units) if units.unlimited != unlimited => Some(format!(
                        "{org} #{sequence}: revocation {caused_by} of grant {grant}: the entry \
                         says unlimited {unlimited}, the grant {}",
                        units.unlimited
                    )),
                    Some(units) if units.unlimited => None,
                    Some(units) => {
                        // Transfers do not say which grant they drew on: this is the most
                        // the grant can still have had.
                        let left = units.granted - units.expired - units.revoked;
                        units.revoked += quantity;
                        (quantity > left).then(|| {
                            format!(
                                "{org} #{sequence}: revocation {caused_by} took {quantity} \
                                 {product} of grant {grant}, which had at most {left} left"
                            )
                        })
                    }
                };
                revocations_follow.expect_none(problem);
                *revoked_by_grant
                    .entry((org.clone(), grant.clone()))
                    .or_default() += counted;
                revocation_entries.push(RevocationEntry {
                    org_id: org.clone(),
                    sequence,
                    caused_by,
                    grant_id: grant,
                    quantity,
                });
            }
            other => anyhow::bail!("{org} #{sequence}: unknown ledger entry kind {other:?}"),
        }
        let available = balance.available;
        never_negative.expect(available >= 0, || {
            format!("{org} {product}: balance {available} after #{sequence}")
        });
        running.expect(after == available, || {
            format!("{org} #{sequence} {product}: says {after} left, the replay gives {available}")
        });
    }
    drop(rows);
    drop(grants);

    /// org, product, available, granted, transferred, expired, revoked, unlimited.
    type PoolRow = (String, String, i64, i64, i64, i64, i64, bool);
    let stored_pools: Vec<PoolRow> = sqlx::query_as(
        "SELECT org_id, product, available, granted_total, transferred_total, expired_total,
                revoked_total, unlimited
           FROM pools ORDER BY org_id, product",
    )
    .fetch_all(&mut *transaction)
    .await?;
    let mut seen = 0;
    // Each pool's totals, to compare with what its lots add up to.
    let mut pool_totals: BTreeMap<(String, String), LotTotals> = BTreeMap::new();
    for (org, product, available, granted, transferred, expired, revoked, unlimited) in stored_pools
    {
        let replayed = balances
            .get(&(org.clone(), product.clone()))
            .copied()
            .unwrap_or_default();
        seen += 1;
        pools_match.expect(
            (available, granted, transferred, expired, revoked, unlimited)
                == (
                    replayed.available,
                    replayed.granted,
                    replayed.transferred,
                    replayed.expired,
                    replayed.revoked,
                    replayed.unlimited_grants > 0,
                ),
            || {
                format!(
                    "{org} {product}: stored available {available} (granted {granted}, \
                     transferred {transferred}, expired {expired}, revoked {revoked}, \
                     unlimited {unlimited}); the ledger gives {} ({}, {}, {}, {}, {})",
                    replayed.available,
                    replayed.granted,
                    replayed.transferred,
                    replayed.expired,
                    replayed.revoked,
                    replayed.unlimited_grants > 0
                )
            },
        );
        pool_totals.insert(
            (org, product),
            LotTotals {
                granted,
                drawn: transferred,
                expired,
                revoked,
            },
        );
    }
    // A pool the ledger knows but the table lost.
    let stored_count = seen;
    pools_match.expect(stored_count >= balances.len(), || {
        format!(
            "{} pools in the ledger, {stored_count} in the pools table",
            balances.len()
        )
    });

    let stored_revocations: Vec<StoredRevocation> = sqlx::query_as(
        "SELECT org_id, event_id, occurred_at, grant_id, quantity, source_kind, source_reference,
                product, applied
           FROM revocations ORDER BY org_id, occurred_at, event_id",
    )
    .fetch_all(&mut *transaction)
    .await?;
    // A revocation of one grant still waiting for it, by that grant; revocations of a
    // source, by organization.
    let mut waiting: HashMap<(String, String), Vec<&StoredRevocation>> = HashMap::new();
    let mut by_source: HashMap<&str, Vec<&StoredRevocation>> = HashMap::new();
    for revocation in &stored_revocations {
        match &revocation.grant_id {
            Some(grant) if !revocation.applied => waiting
                .entry((revocation.org_id.clone(), grant.clone()))
                .or_default()
                .push(revocation),
            Some(_) => {}
            None => by_source
                .entry(revocation.org_id.as_str())
                .or_default()
                .push(revocation),
        }
    }

    // The grants that revocation entries name, for comparing with their revocations.
    let mut revoked_lots: HashMap<(String, String), StoredLot> = HashMap::new();
    let mut lots = sqlx::query_as::<_, StoredLot>(
        "SELECT org_id, lot_id, product, quantity, remaining, revoked, drawn, expired,
                unlimited, status, source_kind, source_reference, occurred_at
           FROM lots ORDER BY org_id, lot_id",
    )
    .fetch(&mut *transaction);
    let mut lot_totals: BTreeMap<(String, String), LotTotals> = BTreeMap::new();
    while let Some(lot) = lots.try_next().await? {
        let StoredLot {
            org_id: org,
            lot_id: grant,
            product,
            quantity,
            remaining,
            revoked,
            drawn,
            expired,
            unlimited,
            status,
            ..
        } = &lot;
        // An unlimited grant's transfers are not counted units of its pool.
        if !unlimited && status != "pending" {
            let totals = lot_totals
                .entry((org.clone(), product.clone()))
                .or_default();
            totals.granted += quantity;
            totals.drawn += drawn;
            totals.expired += expired;
            totals.revoked += revoked;
        }
        let key = (org.clone(), grant.clone());
        let by_ledger = revoked_by_grant.remove(&key);
        let taken = by_ledger.unwrap_or(0);
        lots_revoked.expect(*revoked == taken, || {
            format!(
                "{org} grant {grant} ({product}): revoked {revoked}, the revocation entries \
                 naming it take {taken}"
            )
        });
        revoked_status.expect_none(match status.as_str() {
            "revoked" if !unlimited && (*remaining != 0 || *revoked == 0) => Some(format!(
                "{org} grant {grant} ({product}): revoked with {remaining} left and \
                 {revoked} revoked"
            )),
            "pending" if *revoked != 0 => Some(format!(
                "{org} grant {grant} ({product}): not yet valid, yet {revoked} revoked"
            )),
            _ => None,
        });
        if status == "active" {
            let pending_grant = waiting
                .get(&key)
                .and_then(|revocations| revocations.first());
            let by_its_source = by_source
                .get(org.as_str())
                .and_then(|revocations| revocations.iter().find(|r| r.reaches_by_source(&lot)));
            revocations_done.expect_none(match (pending_grant, by_its_source) {
                (Some(revocation), _) => Some(format!(
                    "{org} grant {grant} keeps {remaining} units of {product} in the pool, while \
                     revocation {} naming it still waits for it",
                    revocation.event_id
                )),
                (None, Some(revocation)) => Some(format!(
                    "{org} grant {grant} keeps {remaining} units of {product} in the pool, while \
                     revocation {} of its source {}/{} reaches it",
                    revocation.event_id,
                    revocation.source_kind.as_deref().unwrap_or_default(),
                    revocation.source_reference.as_deref().unwrap_or_default()
                )),
                (None, None) => None,
            });
        }
        if by_ledger.is_some() {
            revoked_lots.insert(key, lot);
        }
    }
    drop(lots);
    let keys: BTreeSet<&(String, String)> = pool_totals.keys().chain(lot_totals.keys()).collect();
    for key in keys {
        let stored = pool_totals.get(key).copied().unwrap_or_default();
        let added = lot_totals.get(key).copied().unwrap_or_default();
        lots_account.expect(stored == added, || {
            format!(
                "{} {}: the pool says granted {}, transferred {}, expired {}, revoked {}; its \
                 grants add up to {}, {}, {}, {}",
                key.0,
                key.1,
                stored.granted,
                stored.drawn,
                stored.expired,
                stored.revoked,
                added.granted,
                added.drawn,
                added.expired,
                added.revoked
            )
        });
    }
    for ((org, grant), taken) in &revoked_by_grant {
        lots_revoked.expect(false, || {
            format!(
                "{org} grant {grant}: revocation entries take {taken} units of a grant with no lot"
            )
        });
    }

    let revocations: HashMap<(&str, &str), &StoredRevocation> = stored_revocations
        .iter()
        .map(|r| ((r.org_id.as_str(), r.event_id.as_str()), r))
        .collect();
    revocation_entries.sort_by(|left, right| {
        (&left.org_id, &left.caused_by, &left.grant_id, left.sequence).cmp(&(
            &right.org_id,
            &right.caused_by,
            &right.grant_id,
            right.sequence,
        ))
    });
    let mut previous: Option<&RevocationEntry> = None;
    for entry in &revocation_entries {
        let RevocationEntry {
            org_id: org,
            sequence,
            caused_by,
            grant_id: grant,
            quantity,
        } = entry;
        let lot = revoked_lots.get(&(org.clone(), grant.clone()));
        let problem = match revocations.get(&(org.as_str(), caused_by.as_str())) {
            None => Some(format!(
                "{org} #{sequence}: revocation entry caused by {caused_by}, which is not a \
                 stored revocation"
            )),
            Some(_)
                if previous.is_some_and(|p| {
                    (&p.org_id, &p.caused_by, &p.grant_id) == (org, caused_by, grant)
                }) =>
            {
                Some(format!(
                    "{org} #{sequence}: revocation {caused_by} took units of grant {grant} a \
                     second time (first #{})",
                    previous.map_or(0, |p| p.sequence)
                ))
            }
            Some(revocation) => match &revocation.grant_id {
                Some(named) if named != grant => Some(format!(
                    "{org} #{sequence}: revocation {caused_by} names grant {named}, the entry \
                     took units of grant {grant}"
                )),
                Some(_) if revocation.quantity.is_some_and(|limit| *quantity > limit) => {
                    Some(format!(
                        "{org} #{sequence}: revocation {caused_by} took {quantity} units of \
                         grant {grant}, more than its {}",
                        revocation.quantity.unwrap_or_default()
                    ))
                }
                Some(_) if !revocation.applied => Some(format!(
                    "{org} #{sequence}: revocation {caused_by} took units of grant {grant}, \
                     yet is stored as still waiting for it"
                )),
                Some(_) => None,
                None if !lot.is_some_and(|lot| revocation.reaches_by_source(lot)) => Some(format!(
                    "{org} #{sequence}: revocation {caused_by} of source {}/{} took units \
                         of grant {grant}, which it does not reach",
                    revocation.source_kind.as_deref().unwrap_or_default(),
                    revocation.source_reference.as_deref().unwrap_or_default()
                )),
                None => None,
            },
        };
        revocations_caused.expect_none(problem);
        previous = Some(entry);
    }

    let mut allocations = sqlx::query_as::<_, (String, String, i64)>(
        "SELECT workspace_id, product, allocated FROM consumption",
    )
    .fetch(&mut *transaction);
    let mut allocated_seen = 0;
    while let Some((workspace, product, allocated)) = allocations.try_next().await? {
        let transferred = moved
            .get(&(workspace.clone(), product.clone()))
            .copied()
            .unwrap_or(0);
        if transferred > 0 || allocated > 0 {
            allocated_seen += 1;
        }
        allocated_match.expect(allocated == transferred, || {
            format!("{workspace} {product}: allocated {allocated}, transfers into it {transferred}")
        });
    }
    drop(allocations);
    allocated_match.expect(allocated_seen >= moved.len(), || {
        format!(
            "{} workspaces received transfers, {allocated_seen} hold units",
            moved.len()
        )
    });

    // Rule 15: every batch that changes a pool evaluates its warnings, so an open warning
    // carries the numbers the pool and its grant hold now.
    /// org, product, kind, grant, available and units as published, the pool's available,
    /// the grant's remaining units and status.
    type WarningRow = (
        String,
        String,
        String,
        String,
        Option<i64>,
        Option<i64>,
        Option<i64>,
        Option<i64>,
        Option<String>,
    );
    let open_warnings: Vec<WarningRow> = sqlx::query_as(
        "SELECT w.org_id, w.product, w.kind, w.grant_id, w.available, w.units, p.available,
                l.remaining, l.status
           FROM pool_warnings w
           LEFT JOIN pools p ON p.org_id = w.org_id AND p.product = w.product
           LEFT JOIN lots l ON l.org_id = w.org_id AND l.lot_id = w.grant_id
                           AND l.product = w.product
          WHERE w.open
          ORDER BY w.org_id, w.product, w.kind, w.grant_id",
    )
    .fetch_all(&mut *transaction)
    .await?;
    for (org, product, kind, grant, said, units, available, remaining, status) in open_warnings {
        if kind == "low" {
            warnings_follow.expect(said.is_some() && said == available, || {
                format!(
                    "{org} {product}: the open low warning says {said:?} available, the pool \
                     holds {available:?}"
                )
            });
        } else {
            warnings_follow.expect(
                units.is_some() && units == remaining && status.as_deref() == Some("active"),
                || {
                    format!(
                        "{org} {product}: the open expiring warning of grant {grant} says \
                         {units:?} units, the grant has {remaining:?} ({status:?})"
                    )
                },
            );
        }
    }

    let organizations: Vec<(String, i64)> =
        sqlx::query_as("SELECT org_id, last_sequence FROM organizations ORDER BY org_id")
            .fetch_all(&mut *transaction)
            .await?;
    transaction.commit().await?;
    let organization_count = organizations.len() as u64;
    for (org, stored) in organizations {
        let replayed = last.get(&org).copied().unwrap_or(0);
        last_sequence.expect(stored == replayed, || {
            format!("{org}: last_sequence {stored}, the ledger ends at {replayed}")
        });
    }
    Ok(Verification {
        entries,
        organizations: organization_count,
        checks: vec![
            gapless,
            ids,
            never_negative,
            running,
            pools_match,
            lots_account,
            revocations_follow,
            lots_revoked,
            revoked_status,
            revocations_caused,
            revocations_done,
            allocated_match,
            last_sequence,
            warnings_follow,
        ],
    })
}
