//! The outbox: messages committed in the same transaction as the state they describe,
//! one row per committed batch, published by the relay and removed once the broker
//! acknowledged all its messages. A row names its batch's ledger entries by range (per
//! organization, first and last sequence) rather than holding them a second time: the
//! ledger is append-only, and the messages are rendered from its blocks when the row is
//! read.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;

use super::{Store, StoreError};
use crate::codec::LedgerMessage;
use crate::domain::LedgerEntry;

/// Which output topic a row goes to; the topic name is resolved when it is published, so
/// a renamed topic applies to rows already waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Ledger,
    Shortfalls,
    Dlq,
    /// `entitlement-state`, keyed by the state's key rather than by organization.
    State,
    /// `entitlement-pool-warnings` (rule 15).
    PoolWarnings,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Ledger => "ledger",
            Channel::Shortfalls => "shortfalls",
            Channel::Dlq => "dlq",
            Channel::State => "state",
            Channel::PoolWarnings => "pool_warnings",
        }
    }

    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "ledger" => Channel::Ledger,
            "shortfalls" => Channel::Shortfalls,
            "dlq" => Channel::Dlq,
            "state" => Channel::State,
            "pool_warnings" => Channel::PoolWarnings,
            _ => return None,
        })
    }
}

/// One message of the outbox: where it goes, its key and its bytes.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub channel: Channel,
    pub key: Option<String>,
    pub payload: Vec<u8>,
}

impl OutboxMessage {
    pub(super) fn new(channel: Channel, key: Option<String>, message: &impl Serialize) -> Self {
        Self {
            channel,
            key,
            payload: serde_json::to_vec(message).expect("output messages always serialise"),
        }
    }
}

/// The messages of one committed batch (or clock round), waiting to be published in
/// their order.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    /// When the transaction that wrote the row began: its commit came a little later.
    pub created_at: DateTime<Utc>,
    pub messages: Vec<OutboxMessage>,
}

/// Per organization, the runs of consecutive sequences among `entries`: (organization,
/// first, last), ordered by organization and sequence.
fn ledger_ranges(entries: &[LedgerEntry]) -> Vec<(&str, i64, i64)> {
    let mut named: Vec<(&str, i64)> = entries
        .iter()
        .map(|entry| (entry.org_id.as_str(), entry.sequence))
        .collect();
    named.sort_unstable();
    let mut ranges: Vec<(&str, i64, i64)> = Vec::new();
    for (org, sequence) in named {
        match ranges.last_mut() {
            Some((last_org, _, last)) if *last_org == org && *last + 1 == sequence => {
                *last = sequence;
            }
            _ => ranges.push((org, sequence, sequence)),
        }
    }
    ranges
}

/// Writes a batch's outputs as one row, its ledger `entries` (already written to the
/// ledger in this transaction) by range and the other `messages` whole: the cost of the
/// outbox is per batch, not per message. Returns the row's id, None when there was
/// nothing to write.
pub(super) async fn insert(
    connection: &mut PgConnection,
    entries: &[LedgerEntry],
    messages: &[OutboxMessage],
) -> Result<Option<i64>, StoreError> {
    if messages.is_empty() && entries.is_empty() {
        return Ok(None);
    }
    let count = i32::try_from(messages.len()).expect("a batch holds fewer than 2^31 messages");
    let ledger_count =
        i32::try_from(entries.len()).expect("a batch holds fewer than 2^31 ledger entries");
    let channels: Vec<&str> = messages.iter().map(|m| m.channel.as_str()).collect();
    let keys: Vec<Option<&str>> = messages.iter().map(|m| m.key.as_deref()).collect();
    let payloads: Vec<&[u8]> = messages.iter().map(|m| m.payload.as_slice()).collect();
    let ranges = ledger_ranges(entries);
    let orgs: Vec<&str> = ranges.iter().map(|(org, _, _)| *org).collect();
    let firsts: Vec<i64> = ranges.iter().map(|(_, first, _)| *first).collect();
    let lasts: Vec<i64> = ranges.iter().map(|(_, _, last)| *last).collect();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (messages, channels, message_keys, payloads,
                             ledger_orgs, ledger_first, ledger_last, ledger_messages)
         VALUES ($1, $2::text[], $3::text[], $4::bytea[], $5::text[], $6::bigint[],
                 $7::bigint[], $8)
         RETURNING id",
    )
    .bind(count)
    .bind(&channels)
    .bind(&keys)
    .bind(&payloads)
    .bind(&orgs)
    .bind(&firsts)
    .bind(&lasts)
    .bind(ledger_count)
    .fetch_one(&mut *connection)
    .await?;
    Ok(Some(id))
}

/// The ledger's entries in the ranges of the outbox rows `ids`, with the row that names
/// each, in order of row, organization and sequence. A range is one block of the ledger
/// (the batch's entries of one organization), or several where the entries were stored
/// one block each before blocks were written per batch.
const LEDGER_OF_ROWS: &str = "SELECT o.id, e.entry_id, b.first_sequence + e.n - 1 AS sequence,
        b.org_id, e.product, e.kind, e.quantity, e.workspace_id, e.pool_available_after,
        e.caused_by, e.grant_id, e.actor, e.unlimited, e.recorded_at
   FROM outbox o
  CROSS JOIN LATERAL unnest(o.ledger_orgs, o.ledger_first, o.ledger_last) AS r (org_id, first, last)
   JOIN ledger_blocks b ON b.org_id = r.org_id AND b.first_sequence BETWEEN r.first AND r.last
  CROSS JOIN LATERAL unnest(b.entry_ids, b.products, b.kinds, b.quantities, b.workspace_ids,
                            b.pool_available_after, b.caused_by, b.grant_ids, b.actors,
                            b.unlimited, b.recorded_at)
        WITH ORDINALITY AS e (entry_id, product, kind, quantity, workspace_id,
                              pool_available_after, caused_by, grant_id, actor, unlimited,
                              recorded_at, n)
  WHERE o.id = ANY($1) AND o.ledger_messages > 0
    AND b.first_sequence + e.n - 1 <= r.last
  ORDER BY o.id, b.org_id COLLATE \"C\", b.first_sequence, e.n";

/// A ledger entry named by an outbox row, and the row.
#[derive(sqlx::FromRow)]
struct NamedEntry {
    id: i64,
    #[sqlx(flatten)]
    message: LedgerMessage,
}

/// At most this many messages wait in memory for the relay (about 400 bytes each, 8 MiB in
/// all): past that, rows are read back from the outbox like rows committed by other
/// processes.
const COMMITTED_MESSAGES_MAX: usize = 20_000;

/// The messages of the outbox rows this process committed, kept from the commit until its
/// relay takes them, so that the relay publishes them without reading them back (the
/// ledger entries' rendering was most of that read). The outbox stays the record: a row
/// not found here (committed by another instance, before a restart, or past the bound) is
/// read from PostgreSQL, and a row taken here whose publishing fails is read from there in
/// the next round.
#[derive(Default)]
pub(crate) struct Committed {
    rows: std::sync::Mutex<CommittedRows>,
}

#[derive(Default)]
struct CommittedRows {
    by_id: BTreeMap<i64, Vec<OutboxMessage>>,
    messages: usize,
}

impl Committed {
    /// Keeps a committed row's messages, in the order `pending_outbox` reads them back:
    /// the ledger entries by organization and sequence, then the others as written.
    pub(super) fn keep(&self, id: i64, entries: &[LedgerEntry], messages: Vec<OutboxMessage>) {
        let count = entries.len() + messages.len();
        let mut rows = self
            .rows
            .lock()
            .expect("the committed rows' lock is never poisoned");
        if rows.messages + count > COMMITTED_MESSAGES_MAX {
            return;
        }
        let mut ordered: Vec<&LedgerEntry> = entries.iter().collect();
        ordered.sort_unstable_by(|a, b| (&a.org_id, a.sequence).cmp(&(&b.org_id, b.sequence)));
        let mut all: Vec<OutboxMessage> = ordered
            .into_iter()
            .map(|entry| {
                OutboxMessage::new(
                    Channel::Ledger,
                    Some(entry.org_id.to_string()),
                    &LedgerMessage::from(entry),
                )
            })
            .collect();
        all.extend(messages);
        rows.messages += count;
        rows.by_id.insert(id, all);
    }

    /// Takes the rows `ids` (the oldest unpublished, in order) that are kept here, and
    /// forgets rows older than the first of them: those were published by another relay.
    fn take(&self, ids: &[i64]) -> HashMap<i64, Vec<OutboxMessage>> {
        let mut rows = self
            .rows
            .lock()
            .expect("the committed rows' lock is never poisoned");
        let Some(&first) = ids.first() else {
            return HashMap::new();
        };
        let newer = rows.by_id.split_off(&first);
        let gone = std::mem::replace(&mut rows.by_id, newer);
        let mut taken = HashMap::new();
        for id in ids {
            if let Some(messages) = rows.by_id.remove(id) {
                taken.insert(*id, messages);
            }
        }
        rows.messages = rows.by_id.values().map(Vec::len).sum();
        drop(gone);
        taken
    }

    /// Forgets every row: another instance's relay publishes them.
    pub(crate) fn clear(&self) {
        let mut rows = self
            .rows
            .lock()
            .expect("the committed rows' lock is never poisoned");
        rows.by_id.clear();
        rows.messages = 0;
    }
}

/// How many of the rows a relay round took came from memory and how many were read back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowSources {
    pub from_memory: usize,
    pub read_back: usize,
}

impl Store {
    /// The oldest committed rows not yet published, in commit order per organization: as
    /// many whole rows as hold at most `limit_messages` messages, and at least one row.
    /// Rows this process committed come from memory, the others from the outbox.
    pub async fn pending_outbox(&self, limit_messages: i64) -> Result<Vec<OutboxRow>, StoreError> {
        Ok(self.pending_outbox_from(limit_messages).await?.0)
    }

    /// `pending_outbox`, and where its rows came from.
    pub async fn pending_outbox_from(
        &self,
        limit_messages: i64,
    ) -> Result<(Vec<OutboxRow>, RowSources), StoreError> {
        // The row sizes are read first, so a round never reads more than it publishes.
        let head: Vec<(i64, DateTime<Utc>, i32, i32)> = sqlx::query_as(
            "WITH head AS (
                 SELECT id, total, sum(total) OVER (ORDER BY id) - total AS before
                   FROM (SELECT id, messages + ledger_messages AS total
                           FROM outbox ORDER BY id LIMIT $1) AS oldest
             )
              SELECT o.id, o.created_at, o.messages, o.ledger_messages
               FROM outbox o JOIN head h ON h.id = o.id
              WHERE h.before = 0 OR h.before + h.total <= $1
              ORDER BY o.id",
        )
        .bind(limit_messages.max(1))
        .fetch_all(&self.pool)
        .await?;
        let ids: Vec<i64> = head.iter().map(|row| row.0).collect();
        let mut kept = self.committed.take(&ids);
        let unread: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| !kept.contains_key(id))
            .collect();
        let mut read = if unread.is_empty() {
            HashMap::new()
        } else {
            self.read_outbox_rows(&unread).await?
        };
        let sources = RowSources {
            from_memory: kept.len(),
            read_back: unread.len(),
        };
        let rows = head
            .into_iter()
            .map(|(id, created_at, inline, ledger)| {
                let messages = match kept.remove(&id) {
                    Some(messages) => messages,
                    None => read.remove(&id).ok_or_else(|| {
                        StoreError::Corrupt(format!("outbox row {id} went while it was read"))
                    })?,
                };
                let expected = inline.max(0) as usize + ledger.max(0) as usize;
                if messages.len() != expected {
                    return Err(StoreError::Corrupt(format!(
                        "outbox row {id} holds {expected} messages, {} were found",
                        messages.len()
                    )));
                }
                Ok(OutboxRow {
                    id,
                    created_at,
                    messages,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok((rows, sources))
    }

    /// The messages of the outbox rows `ids`, read back: the ledger entries they name,
    /// rendered from the ledger, then the messages they hold.
    async fn read_outbox_rows(
        &self,
        ids: &[i64],
    ) -> Result<HashMap<i64, Vec<OutboxMessage>>, StoreError> {
        type Row = (i64, Vec<String>, Vec<Option<String>>, Vec<Vec<u8>>, i32);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, channels, message_keys, payloads, ledger_messages
               FROM outbox WHERE id = ANY($1) ORDER BY id",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        let ledger: Vec<NamedEntry> = sqlx::query_as(LEDGER_OF_ROWS)
            .bind(ids)
            .fetch_all(&self.pool)
            .await?;
        let mut ledger = ledger.into_iter().peekable();
        rows.into_iter()
            .map(|(id, channels, keys, payloads, ledger_messages)| {
                if channels.len() != keys.len() || channels.len() != payloads.len() {
                    return Err(StoreError::Corrupt(format!(
                        "outbox row {id} has arrays of different lengths"
                    )));
                }
                let mut messages =
                    Vec::with_capacity(channels.len() + ledger_messages.max(0) as usize);
                while let Some(entry) = ledger.next_if(|entry| entry.id == id) {
                    let key = Some(entry.message.org_id.clone());
                    messages.push(OutboxMessage::new(Channel::Ledger, key, &entry.message));
                }
                if messages.len() != ledger_messages as usize {
                    return Err(StoreError::Corrupt(format!(
                        "outbox row {id} names {ledger_messages} ledger entries and the ledger \
                         holds {} of them",
                        messages.len()
                    )));
                }
                for ((channel, key), payload) in channels.into_iter().zip(keys).zip(payloads) {
                    let channel = Channel::parse(&channel).ok_or_else(|| {
                        StoreError::Corrupt(format!("outbox channel {channel:?}"))
                    })?;
                    messages.push(OutboxMessage {
                        channel,
                        key,
                        payload,
                    });
                }
                Ok((id, messages))
            })
            .collect()
    }

    /// Forgets the rows kept in memory for the relay (which reads them back instead).
    pub fn forget_committed(&self) {
        self.committed.clear();
    }

    /// Removes rows the broker acknowledged.
    pub async fn remove_published(&self, ids: &[i64]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Messages of the rows up to `id` not yet published.
    pub async fn unpublished_up_to(&self, id: i64) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT coalesce(sum(messages + ledger_messages), 0)::bigint FROM outbox
              WHERE id <= $1",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Messages committed and not yet published, for the gauge.
    pub async fn outbox_backlog(&self) -> Result<i64, StoreError> {
        let (count,): (i64,) = sqlx::query_as(
            "SELECT coalesce(sum(messages + ledger_messages), 0)::bigint FROM outbox",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(count)
    }
}
