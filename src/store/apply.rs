//! One batch, one transaction: lock the partitions' offsets and the organizations touched,
//! load the state the batch needs, run the domain core, write state, ledger, outbox and
//! offsets, commit.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, SubsecRound, Utc};

use super::outbox::{Channel, OutboxMessage};
use super::{Store, StoreError};
use crate::codec::{AlertMessage, DeadLetterMessage, PoolWarningMessage, Rejection, StateMessage};
use crate::domain::{Book, Input, LedgerKind, OrgId, Policy, Verdict, WorkspaceId};

/// One consumed message and what decoding made of it.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub payload: Option<Vec<u8>>,
    pub decoded: Result<Input, Rejection>,
}

impl Inbound {
    /// The bytes the message holds.
    pub fn size(&self) -> usize {
        self.payload.as_ref().map_or(0, Vec::len)
    }
}

/// What a committed batch did, for metrics and logs.
#[derive(Debug, Default, Clone)]
pub struct BatchReport {
    /// Messages applied or rejected in this batch, per topic.
    pub consumed: BTreeMap<String, u64>,
    /// Messages already applied by an earlier transaction (a redelivery), skipped.
    pub already_applied: u64,
    pub rejected: BTreeMap<&'static str, u64>,
    pub duplicates: u64,
    pub stale: u64,
    pub ledger_entries: BTreeMap<&'static str, u64>,
    pub seats_transferred: i64,
    pub alerts: u64,
    /// Pool warning messages, by kind and status.
    pub warnings: BTreeMap<(&'static str, &'static str), u64>,
    /// State messages of changed keys (published when `state.publish` is on).
    pub states: u64,
    /// Workspaces the clock turned past because their `ends_at` passed (rule 13).
    pub workspaces_turned_past: u64,
    /// The next offset per partition after this batch.
    pub next_offsets: Vec<(String, i32, i64)>,
    /// Where the transaction that committed spent its time, stage by stage.
    pub stages: Vec<(Stage, Duration)>,
}

/// The stages of a batch's transaction, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Opening the transaction and locking the partitions' stored offsets.
    Lock,
    /// Locking the organizations and loading the state the batch names.
    Load,
    /// The domain core, and the dead letters, ledger messages and alerts it produces.
    Core,
    /// Writing state, ledger, outbox and offsets.
    Write,
    /// The commit.
    Commit,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Lock,
        Stage::Load,
        Stage::Core,
        Stage::Write,
        Stage::Commit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Lock => "lock",
            Stage::Load => "load",
            Stage::Core => "core",
            Stage::Write => "write",
            Stage::Commit => "commit",
        }
    }
}

/// Measures consecutive stages: each lap ends one and starts the next.
struct Laps {
    last: Instant,
    laps: Vec<(Stage, Duration)>,
}

impl Laps {
    fn start() -> Self {
        Self {
            last: Instant::now(),
            laps: Vec::with_capacity(Stage::ALL.len()),
        }
    }

    fn lap(&mut self, stage: Stage) {
        let now = Instant::now();
        self.laps.push((stage, now - self.last));
        self.last = now;
    }
}

impl BatchReport {
    /// Ledger entries by kind, seats transferred and alerts raised by `book`.
    fn count_effects(&mut self, book: &Book) {
        for entry in &book.ledger {
            *self.ledger_entries.entry(entry.kind.as_str()).or_default() += 1;
            if entry.product.is_seat()
                && matches!(
                    entry.kind,
                    LedgerKind::Transfer | LedgerKind::ManualTransfer
                )
            {
                self.seats_transferred += entry.quantity;
            }
        }
        self.alerts += book.alerts.len() as u64;
        for warning in &book.pool_warnings {
            *self
                .warnings
                .entry((warning.key.kind(), warning.status.as_str()))
                .or_default() += 1;
        }
        self.states += book.states.len() as u64;
    }

    /// How many ledger entries the batch or clock round recorded.
    pub fn ledger_total(&self) -> u64 {
        self.ledger_entries.values().sum()
    }
}

impl Store {
    /// Applies a batch of consumed messages exactly once. The caller retries on a
    /// transient error with the same batch; messages whose offsets were already committed
    /// are skipped, so a retry or a redelivery changes nothing twice.
    pub async fn apply_batch(
        &self,
        batch: &[Inbound],
        policy: Policy,
        now: DateTime<Utc>,
    ) -> Result<BatchReport, StoreError> {
        // PostgreSQL keeps microseconds: an instant published now and one read back later
        // (a shortfall's or a warning's opened_at) are then the same.
        let now = now.trunc_subsecs(6);
        let mut laps = Laps::start();
        let mut transaction = self.pool.begin().await?;
        let mut report = BatchReport::default();

        // The partitions' stored offsets, locked: two workers that both believe they own a
        // partition (during a rebalance) serialise here, and the second skips what the
        // first applied.
        let positions = partitions_of(batch);
        let stored = lock_offsets(&mut transaction, &positions).await?;
        let fresh: Vec<&Inbound> = batch
            .iter()
            .filter(|message| message.offset >= stored[&(message.topic.clone(), message.partition)])
            .collect();
        report.already_applied = (batch.len() - fresh.len()) as u64;
        laps.lap(Stage::Lock);

        let inputs: Vec<(usize, &Input)> = fresh
            .iter()
            .enumerate()
            .filter_map(|(index, message)| message.decoded.as_ref().ok().map(|c| (index, c)))
            .collect();
        let mut book = super::load::load_book(
            &mut transaction,
            inputs.iter().map(|(_, input)| *input),
            policy,
            now,
        )
        .await?;
        laps.lap(Stage::Load);

        let mut verdicts: HashMap<usize, Verdict> = HashMap::new();
        for (index, input) in &inputs {
            verdicts.insert(*index, book.apply_input(input, now));
        }
        book.finish(now);

        let mut outbox = Vec::new();
        for (index, message) in fresh.iter().enumerate() {
            *report.consumed.entry(message.topic.clone()).or_default() += 1;
            let rejection = match (&message.decoded, verdicts.get(&index)) {
                (Err(rejection), _) => Some(rejection.clone()),
                (Ok(input), Some(Verdict::Refused { refusal, detail })) => Some(Rejection {
                    reason: refusal.reason(),
                    detail: detail.clone(),
                    event_id: Some(input.event_id().to_string()),
                    org_id: input.org_id().map(ToString::to_string),
                }),
                (Ok(_), Some(Verdict::Duplicate)) => {
                    report.duplicates += 1;
                    None
                }
                (Ok(_), Some(Verdict::Stale)) => {
                    report.stale += 1;
                    None
                }
                _ => None,
            };
            if let Some(rejection) = rejection {
                *report.rejected.entry(rejection.reason).or_default() += 1;
                let letter = DeadLetterMessage::new(
                    &message.topic,
                    message.partition,
                    message.offset,
                    message.payload.as_deref(),
                    &rejection,
                    now,
                );
                // Keyed by organization like every output; the input's own key may be
                // anything, NUL bytes included, which a text column cannot hold.
                outbox.push(OutboxMessage::new(
                    Channel::Dlq,
                    rejection.org_id.clone(),
                    &letter,
                ));
            }
        }
        report.count_effects(&book);
        outbox.extend(self.effects_to_publish(&book));
        laps.lap(Stage::Core);

        super::write::write_book(&mut transaction, &book).await?;
        let row = super::outbox::insert(&mut transaction, &book.ledger, &outbox).await?;
        report.next_offsets = next_offsets(&positions, &stored, &fresh);
        store_offsets(&mut transaction, &report.next_offsets).await?;
        laps.lap(Stage::Write);
        transaction.commit().await?;
        if let Some(row) = row {
            self.committed.keep(row, &book.ledger, outbox);
        }
        laps.lap(Stage::Commit);
        report.stages = laps.laps;
        Ok(report)
    }

    /// Runs the clock through the same path as a batch (lock, load, core, write, commit)
    /// for every organization with units that became valid or expired by `now`, or whose
    /// pool warnings change by time alone (rule 15: units coming within
    /// `warnings.expiring_within_days` of their expiry, a grant counted in an open `low`
    /// warning's threshold expiring), and for every live workspace whose `ends_at` has
    /// passed by `now`, which turns past (rule 13) without any event.
    pub async fn settle_due(
        &self,
        policy: Policy,
        now: DateTime<Utc>,
    ) -> Result<BatchReport, StoreError> {
        let now = now.trunc_subsecs(6);
        let due: Vec<(String,)> = sqlx::query_as(
            "SELECT org_id FROM lots WHERE status = 'pending' AND valid_from <= $1
             UNION
             SELECT org_id FROM lots WHERE status = 'active' AND expires_at <= $1
             UNION
             SELECT l.org_id FROM lots l
              WHERE l.status = 'active' AND l.expires_at <= $2 AND NOT l.unlimited
                AND l.remaining > 0
                AND NOT EXISTS (SELECT 1 FROM pool_warnings w
                                 WHERE w.org_id = l.org_id AND w.product = l.product
                                   AND w.kind = 'expiring' AND w.grant_id = l.lot_id AND w.open)
             UNION
             SELECT org_id FROM pool_warnings WHERE recheck_at <= $1
             ORDER BY 1 LIMIT 500",
        )
        .bind(now)
        .bind(now + policy.warnings.expiring_within)
        .fetch_all(&self.pool)
        .await?;
        let ending: Vec<(String, String)> = sqlx::query_as(
            "SELECT workspace_id, org_id FROM workspaces
              WHERE live AND ends_at <= $1
              ORDER BY ends_at, workspace_id LIMIT 500",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        let mut report = BatchReport::default();
        if due.is_empty() && ending.is_empty() {
            return Ok(report);
        }
        let orgs: BTreeSet<OrgId> = due
            .iter()
            .map(|(org,)| org)
            .chain(ending.iter().map(|(_, org)| org))
            .filter_map(|org| OrgId::parse(org).ok())
            .collect();
        let orgs: Vec<OrgId> = orgs.into_iter().collect();
        let workspaces: Vec<String> = ending
            .into_iter()
            .map(|(workspace_id, _)| workspace_id)
            .collect();
        let mut transaction = self.pool.begin().await?;
        let mut book: Book =
            super::load::load_book_for_orgs(&mut transaction, &orgs, &workspaces, policy, now)
                .await?;
        for org in &orgs {
            book.settle_time(org, now);
        }
        // Loaded under their organizations' locks: a workspace-updated committed since the
        // query above (a later end, say) is what the book holds now.
        let ending: Vec<WorkspaceId> = book.workspaces.keys().cloned().collect();
        for workspace_id in &ending {
            book.refresh_life(workspace_id, now);
        }
        report.workspaces_turned_past = book.life_changed().count() as u64;
        book.finish(now);
        let outbox = self.effects_to_publish(&book);
        super::write::write_book(&mut transaction, &book).await?;
        let row = super::outbox::insert(&mut transaction, &book.ledger, &outbox).await?;
        transaction.commit().await?;
        if let Some(row) = row {
            self.committed.keep(row, &book.ledger, outbox);
        }
        report.count_effects(&book);
        Ok(report)
    }
}

impl Store {
    /// The alerts, pool warnings and (when the state topic is on) state messages a book
    /// produced, as outbox messages in the order they were recorded: alerts and warnings
    /// keyed by organization, the state by its own key. Its ledger entries go into the
    /// outbox by range (`outbox::insert`).
    fn effects_to_publish(&self, book: &Book) -> Vec<OutboxMessage> {
        let alerts = book.alerts.iter().map(|alert| {
            OutboxMessage::new(
                Channel::Shortfalls,
                Some(alert.org_id.to_string()),
                &AlertMessage::from(alert),
            )
        });
        let states = book
            .states
            .iter()
            .filter(|_| self.publish_state)
            .map(|change| {
                OutboxMessage::new(
                    Channel::State,
                    Some(change.key.to_json()),
                    &StateMessage::new(
                        change,
                        change
                            .key
                            .workspace_id()
                            .and_then(|id| book.workspace_name(id)),
                        change.key.workspace_id().is_none_or(|id| book.is_live(id)),
                    ),
                )
            });
        let warnings = book.pool_warnings.iter().map(|warning| {
            OutboxMessage::new(
                Channel::PoolWarnings,
                Some(warning.key.org_id.to_string()),
                &PoolWarningMessage::from(warning),
            )
        });
        alerts.chain(warnings).chain(states).collect()
    }
}

fn partitions_of(batch: &[Inbound]) -> Vec<(String, i32)> {
    let set: BTreeSet<(String, i32)> = batch
        .iter()
        .map(|message| (message.topic.clone(), message.partition))
        .collect();
    set.into_iter().collect()
}

async fn lock_offsets(
    transaction: &mut sqlx::PgConnection,
    positions: &[(String, i32)],
) -> Result<HashMap<(String, i32), i64>, StoreError> {
    let topics: Vec<&str> = positions.iter().map(|(topic, _)| topic.as_str()).collect();
    let partitions: Vec<i32> = positions.iter().map(|(_, partition)| *partition).collect();
    sqlx::query(
        "INSERT INTO consumer_offsets (topic, partition, next_offset)
         SELECT topic, partition, 0 FROM UNNEST($1::text[], $2::int[]) AS p (topic, partition)
         ON CONFLICT DO NOTHING",
    )
    .bind(&topics)
    .bind(&partitions)
    .execute(&mut *transaction)
    .await?;
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT o.topic, o.partition, o.next_offset
           FROM consumer_offsets o
           JOIN UNNEST($1::text[], $2::int[]) AS p (topic, partition)
             ON p.topic = o.topic AND p.partition = o.partition
          ORDER BY o.topic, o.partition
            FOR UPDATE OF o",
    )
    .bind(&topics)
    .bind(&partitions)
    .fetch_all(&mut *transaction)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(topic, partition, offset)| ((topic, partition), offset))
        .collect())
}

fn next_offsets(
    positions: &[(String, i32)],
    stored: &HashMap<(String, i32), i64>,
    fresh: &[&Inbound],
) -> Vec<(String, i32, i64)> {
    positions
        .iter()
        .map(|(topic, partition)| {
            let seen = fresh
                .iter()
                .filter(|message| &message.topic == topic && message.partition == *partition)
                .map(|message| message.offset + 1)
                .max();
            let before = stored[&(topic.clone(), *partition)];
            (
                topic.clone(),
                *partition,
                seen.unwrap_or(before).max(before),
            )
        })
        .collect()
}

async fn store_offsets(
    transaction: &mut sqlx::PgConnection,
    offsets: &[(String, i32, i64)],
) -> Result<(), StoreError> {
    let topics: Vec<&str> = offsets.iter().map(|(topic, _, _)| topic.as_str()).collect();
    let partitions: Vec<i32> = offsets.iter().map(|(_, partition, _)| *partition).collect();
    let next: Vec<i64> = offsets.iter().map(|(_, _, offset)| *offset).collect();
    sqlx::query(
        "UPDATE consumer_offsets o
            SET next_offset = p.next_offset, updated_at = now()
           FROM UNNEST($1::text[], $2::int[], $3::bigint[]) AS p (topic, partition, next_offset)
          WHERE o.topic = p.topic AND o.partition = p.partition",
    )
    .bind(&topics)
    .bind(&partitions)
    .bind(&next)
    .execute(&mut *transaction)
    .await?;
    Ok(())
}
