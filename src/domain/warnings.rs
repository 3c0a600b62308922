//! Pool warnings (rule 15): they come before shortfalls. A `low` warning per pool while its
//! available counted units are at or below its low threshold, it has valid counted grants
//! and it is not unlimited; an `expiring` warning per grant while units of it still in the
//! pool expire within `warnings.expiring_within_days`. Like shortfalls, a warning is
//! published when it opens, when its numbers change and when it is resolved; changes within
//! one batch are folded into one message per warning.

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::book::{AlertStatus, Book, Lot, LotStatus};
use super::ids::{EventId, OrgId, Product};
use super::shortfalls::ID_NAMESPACE;

/// The thresholds of the `warnings.*` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarningThresholds {
    /// `low` opens at or below this percentage of the units of the product's valid counted
    /// grants (whole units: at or below 10% of 15 is at or below 1)...
    pub low_percent: u32,
    /// ... or at or below this many units, whichever is larger.
    pub low_units: i64,
    /// `expiring` opens for units still in the pool that expire within this long.
    pub expiring_within: Duration,
}

impl Default for WarningThresholds {
    /// The contract's defaults: 10%, 0 units, 30 days.
    fn default() -> Self {
        Self {
            low_percent: 10,
            low_units: 0,
            expiring_within: Duration::days(30),
        }
    }
}

impl WarningThresholds {
    /// The low threshold of a pool whose valid counted grants hold `basis` units: a count
    /// of units is at or below `low_percent` % of `basis` exactly when it is at or below
    /// that share rounded down.
    pub fn low_threshold(&self, basis: i64) -> i64 {
        let share = i128::from(basis.max(0)) * i128::from(self.low_percent) / 100;
        self.low_units.max(i64::try_from(share).unwrap_or(i64::MAX))
    }
}

/// Which warning: a pool's `low` one, or the `expiring` one of one of its grants.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WarningKey {
    pub org_id: OrgId,
    pub product: Product,
    /// The grant of an `expiring` warning; None for `low`.
    pub grant_id: Option<EventId>,
}

impl WarningKey {
    pub fn kind(&self) -> &'static str {
        if self.grant_id.is_some() {
            "expiring"
        } else {
            "low"
        }
    }

    /// The stable id of the key's `revision`-th message.
    pub fn warning_id(&self, revision: i64) -> Uuid {
        let name = match &self.grant_id {
            None => format!(
                "warning/{}/{}/low/{revision}",
                self.org_id.as_str(),
                self.product.as_str()
            ),
            Some(grant_id) => format!(
                "warning/{}/{}/expiring/{}/{revision}",
                self.org_id.as_str(),
                self.product.as_str(),
                grant_id.as_str()
            ),
        };
        Uuid::new_v5(&ID_NAMESPACE, name.as_bytes())
    }
}

/// What a warning says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarningNumbers {
    /// The pool's available counted units and its low threshold.
    Low { available: i64, threshold: i64 },
    /// The grant's units still in the pool, and when they expire.
    Expiring {
        units: i64,
        expires_at: DateTime<Utc>,
    },
}

/// A warning as last published, kept between batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarningRecord {
    pub open: bool,
    pub numbers: WarningNumbers,
    /// When the open warning opened; None once resolved.
    pub opened_at: Option<DateTime<Utc>>,
    /// How many messages the warning has published; part of their ids.
    pub revision: i64,
    /// An open `low` warning's next change by time alone: the earliest expiry among the
    /// grants its threshold counts, and that grant, the cause of the change.
    pub recheck: Option<(DateTime<Utc>, EventId)>,
    /// True when the record is not stored yet.
    pub is_new: bool,
    pub dirty: bool,
}

/// A change of a warning, to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolWarning {
    pub key: WarningKey,
    pub status: AlertStatus,
    pub numbers: WarningNumbers,
    pub opened_at: DateTime<Utc>,
    pub occurred_at: DateTime<Utc>,
    pub caused_by: EventId,
    pub revision: i64,
}

/// What one evaluation found for one warning.
struct Finding {
    key: WarningKey,
    holds: bool,
    numbers: WarningNumbers,
    recheck: Option<(DateTime<Utc>, EventId)>,
    caused_by: Option<EventId>,
}

/// Whether a counted lot's units count in its pool's low threshold at `now`: its grant is
/// valid now. What revocations removed does not count; what it gave workspaces does.
fn counts_in_threshold(lot: &Lot, now: DateTime<Utc>) -> bool {
    !lot.unlimited
        && matches!(
            lot.status,
            LotStatus::Active | LotStatus::Spent | LotStatus::Revoked
        )
        && lot.valid_from <= now
        && lot.expires_at.is_none_or(|expires_at| expires_at > now)
}

impl Book {
    /// The units of the valid counted grants of a pool at `now`: the basis of its low
    /// threshold.
    pub fn threshold_basis(&self, org_id: &OrgId, product: &Product, now: DateTime<Utc>) -> i64 {
        self.lots
            .get(&(org_id.clone(), product.clone()))
            .map_or(0, |lots| {
                lots.iter()
                    .filter(|lot| counts_in_threshold(lot, now))
                    .map(|lot| lot.quantity - lot.revoked)
                    .sum()
            })
    }

    /// Evaluates the warnings of every pool of the organizations the batch brought up to
    /// `now`, and queues a message for each one that opened, changed or was resolved.
    pub(crate) fn collect_warnings(&mut self, now: DateTime<Utc>) {
        let mut pools: Vec<(OrgId, Product)> = self
            .pools
            .keys()
            .chain(self.lots.keys())
            .filter(|(org_id, _)| self.settled.contains(org_id))
            .cloned()
            .collect();
        pools.sort();
        pools.dedup();
        for (org_id, product) in pools {
            let mut findings = vec![self.low_finding(&org_id, &product, now)];
            findings.extend(self.expiring_findings(&org_id, &product, now));
            for finding in findings {
                self.fold_warning(finding, now);
            }
        }
    }

    fn low_finding(&self, org_id: &OrgId, product: &Product, now: DateTime<Utc>) -> Finding {
        let key = WarningKey {
            org_id: org_id.clone(),
            product: product.clone(),
            grant_id: None,
        };
        let pool = self.pool(org_id, product);
        let basis = self.threshold_basis(org_id, product, now);
        let threshold = self.policy.warnings.low_threshold(basis);
        let holds = basis > 0 && !pool.unlimited && pool.available <= threshold;
        let recheck = if holds {
            self.lots
                .get(&(org_id.clone(), product.clone()))
                .into_iter()
                .flatten()
                .filter(|lot| counts_in_threshold(lot, now))
                .filter_map(|lot| lot.expires_at.map(|at| (at, lot.lot_id.clone())))
                .min()
        } else {
            None
        };
        // A change by time alone is caused by the grant whose expiry changed the threshold.
        let due = self
            .warnings
            .get(&key)
            .and_then(|record| record.recheck.clone())
            .filter(|(at, _)| *at <= now && !pool.dirty);
        let caused_by = due.map(|(_, grant)| grant).or(pool.last_cause);
        Finding {
            key,
            holds,
            numbers: WarningNumbers::Low {
                available: pool.available,
                threshold,
            },
            recheck,
            caused_by,
        }
    }

    fn expiring_findings(
        &self,
        org_id: &OrgId,
        product: &Product,
        now: DateTime<Utc>,
    ) -> Vec<Finding> {
        let within = self.policy.warnings.expiring_within;
        let pool_cause = self
            .pools
            .get(&(org_id.clone(), product.clone()))
            .and_then(|pool| pool.last_cause.clone());
        let lots = self
            .lots
            .get(&(org_id.clone(), product.clone()))
            .map_or(&[][..], Vec::as_slice);
        let mut findings: Vec<Finding> = lots
            .iter()
            .filter(|lot| !lot.unlimited)
            .filter_map(|lot| {
                let expires_at = lot.expires_at?;
                let holds = lot.status == LotStatus::Active
                    && lot.remaining > 0
                    && expires_at - within <= now;
                // Units drawn, revoked or expired in this batch: the input that last
                // changed the pool; otherwise time alone, and the grant itself.
                let caused_by = if lot.dirty {
                    pool_cause.clone().or_else(|| Some(lot.lot_id.clone()))
                } else {
                    Some(lot.lot_id.clone())
                };
                Some(Finding {
                    key: WarningKey {
                        org_id: org_id.clone(),
                        product: product.clone(),
                        grant_id: Some(lot.lot_id.clone()),
                    },
                    holds,
                    numbers: WarningNumbers::Expiring {
                        units: lot.remaining,
                        expires_at,
                    },
                    recheck: None,
                    caused_by,
                })
            })
            .collect();
        // An open warning of a grant the book does not hold any more has nothing left.
        let mut orphans: Vec<Finding> = self
            .warnings
            .iter()
            .filter(|(key, record)| {
                record.open
                    && &key.org_id == org_id
                    && &key.product == product
                    && key
                        .grant_id
                        .as_ref()
                        .is_some_and(|grant_id| !lots.iter().any(|lot| &lot.lot_id == grant_id))
            })
            .filter_map(|(key, record)| match record.numbers {
                WarningNumbers::Expiring { expires_at, .. } => Some(Finding {
                    key: key.clone(),
                    holds: false,
                    numbers: WarningNumbers::Expiring {
                        units: 0,
                        expires_at,
                    },
                    recheck: None,
                    caused_by: key.grant_id.clone(),
                }),
                WarningNumbers::Low { .. } => None,
            })
            .collect();
        findings.append(&mut orphans);
        findings.sort_by(|left, right| left.key.cmp(&right.key));
        findings
    }

    /// Compares a finding with the warning as last published and queues a message when
    /// it opened, its numbers changed or it was resolved.
    fn fold_warning(&mut self, finding: Finding, now: DateTime<Utc>) {
        let Finding {
            key,
            holds,
            numbers,
            recheck,
            caused_by,
        } = finding;
        let record = self.warnings.get_mut(&key);
        let was_open = record.as_ref().is_some_and(|record| record.open);
        if !holds && !was_open {
            return;
        }
        if let Some(record) = record {
            if holds && record.open && record.numbers == numbers {
                if record.recheck != recheck {
                    record.recheck = recheck;
                    record.dirty = true;
                }
                return;
            }
        }
        let Some(caused_by) = caused_by else {
            return;
        };
        let record = self.warnings.entry(key.clone()).or_insert(WarningRecord {
            open: false,
            numbers,
            opened_at: None,
            revision: 0,
            recheck: None,
            is_new: true,
            dirty: true,
        });
        let opened_at = record.opened_at.unwrap_or(now);
        record.open = holds;
        record.numbers = numbers;
        record.opened_at = holds.then_some(opened_at);
        record.revision += 1;
        record.recheck = recheck;
        record.dirty = true;
        let status = if holds {
            AlertStatus::Open
        } else {
            AlertStatus::Resolved
        };
        self.pool_warnings.push(PoolWarning {
            key,
            status,
            numbers,
            opened_at,
            occurred_at: now,
            caused_by,
            revision: record.revision,
        });
    }
}
