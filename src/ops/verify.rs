//! `entitlement-worker verify`: replays the whole ledger from PostgreSQL and checks every
//! invariant against the stored state. One pass over the ledger in sequence order, with
//! memory bounded by the number of pools and workspaces, not of entries.

use std::collections::BTreeMap;

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
}

type Entry = (String, i64, Uuid, String, String, i64, Option<String>, i64);

/// Replays the ledger and compares it with the pools, the workspaces and the sequences.
pub async fn verify(pool: &PgPool) -> anyhow::Result<Verification> {
    let mut gapless = Check::new("sequences start at 1 per organization, with no gap or repeat");
    let mut ids =
        Check::new("every entry id is the one derived from its organization and sequence");
    let mut never_negative = Check::new("no pool balance is ever negative");
    let mut running = Check::new("every entry's pool_available_after equals the replayed balance");
    let mut pools_match = Check::new(
        "each pool's balance equals grants - transfers - expiries, and its totals match",
    );
    let mut allocated_match =
        Check::new("each workspace's allocated units equal the transfers into it");
    let mut last_sequence = Check::new("each organization's last sequence matches its ledger");

    let mut balances: BTreeMap<(String, String), Balance> = BTreeMap::new();
    let mut moved: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    let mut entries = 0_u64;
    let mut rows = sqlx::query_as::<_, Entry>(
        "SELECT org_id, sequence, entry_id, product, kind, quantity, workspace_id,
                pool_available_after
           FROM ledger ORDER BY org_id, sequence",
    )
    .fetch(pool);
    while let Some((org, sequence, id, product, kind, quantity, workspace, after)) =
        rows.try_next().await?
    {
        entries += 1;
        let previous = last.get(&org).copied().unwrap_or(0);
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
        let balance = balances.entry((org.clone(), product.clone())).or_default();
        match kind.as_str() {
            "grant" => {
                balance.available += quantity;
                balance.granted += quantity;
            }
            "transfer" | "manual_transfer" => {
                balance.available -= quantity;
                balance.transferred += quantity;
                if let Some(workspace) = workspace {
                    *moved.entry((workspace, product.clone())).or_default() += quantity;
                }
            }
            "expiry" => {
                balance.available -= quantity;
                balance.expired += quantity;
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

    let stored_pools: Vec<(String, String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT org_id, product, available, granted_total, transferred_total, expired_total
           FROM pools ORDER BY org_id, product",
    )
    .fetch_all(pool)
    .await?;
    let mut seen = 0;
    for (org, product, available, granted, transferred, expired) in stored_pools {
        let replayed = balances
            .get(&(org.clone(), product.clone()))
            .copied()
            .unwrap_or_default();
        seen += 1;
        pools_match.expect(
            (available, granted, transferred, expired)
                == (
                    replayed.available,
                    replayed.granted,
                    replayed.transferred,
                    replayed.expired,
                ),
            || {
                format!(
                    "{org} {product}: stored available {available} (granted {granted}, \
                     transferred {transferred}, expired {expired}); the ledger gives {} ({}, {}, {})",
                    replayed.available, replayed.granted, replayed.transferred, replayed.expired
                )
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

    let mut allocations = sqlx::query_as::<_, (String, String, i64)>(
        "SELECT workspace_id, product, allocated FROM consumption",
    )
    .fetch(pool);
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

    let organizations: Vec<(String, i64)> =
        sqlx::query_as("SELECT org_id, last_sequence FROM organizations ORDER BY org_id")
            .fetch_all(pool)
            .await?;
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
            allocated_match,
            last_sequence,
        ],
    })
}
