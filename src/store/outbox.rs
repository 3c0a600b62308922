//! The outbox: messages committed in the same transaction as the state they describe,
//! one row per committed batch, published by the relay and removed once the broker
//! acknowledged all its messages.

use serde::Serialize;
use sqlx::PgConnection;

use super::{Store, StoreError};

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
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub messages: Vec<OutboxMessage>,
}

/// Writes a batch's messages as one row: the cost of the outbox is per batch, not per
/// message. Returns the row's id, None when there was nothing to write.
pub(super) async fn insert(
    connection: &mut PgConnection,
    messages: &[OutboxMessage],
) -> Result<Option<i64>, StoreError> {
    if messages.is_empty() {
        return Ok(None);
    }
    let count = i32::try_from(messages.len()).expect("a batch holds fewer than 2^31 messages");
    let channels: Vec<&str> = messages.iter().map(|m| m.channel.as_str()).collect();
    let keys: Vec<Option<&str>> = messages.iter().map(|m| m.key.as_deref()).collect();
    let payloads: Vec<&[u8]> = messages.iter().map(|m| m.payload.as_slice()).collect();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (messages, channels, message_keys, payloads)
         VALUES ($1, $2::text[], $3::text[], $4::bytea[])
         RETURNING id",
    )
    .bind(count)
    .bind(&channels)
    .bind(&keys)
    .bind(&payloads)
    .fetch_one(&mut *connection)
    .await?;
    Ok(Some(id))
}

impl Store {
    /// The oldest committed rows not yet published, in commit order per organization: as
    /// many whole rows as hold at most `limit_messages` messages, and at least one row.
    pub async fn pending_outbox(&self, limit_messages: i64) -> Result<Vec<OutboxRow>, StoreError> {
        // The row sizes are read first (without the payloads, which live out of line), so
        // a round never reads more than it publishes.
        type Row = (
            i64,
            chrono::DateTime<chrono::Utc>,
            Vec<String>,
            Vec<Option<String>>,
            Vec<Vec<u8>>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "WITH head AS (
                 SELECT id, sum(messages) OVER (ORDER BY id) - messages AS before
                   FROM (SELECT id, messages FROM outbox ORDER BY id LIMIT $1) AS oldest
             )
             SELECT o.id, o.created_at, o.channels, o.message_keys, o.payloads
               FROM outbox o JOIN head h ON h.id = o.id
              WHERE h.before = 0 OR h.before + o.messages <= $1
              ORDER BY o.id",
        )
        .bind(limit_messages.max(1))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(id, created_at, channels, keys, payloads)| {
                if channels.len() != keys.len() || channels.len() != payloads.len() {
                    return Err(StoreError::Corrupt(format!(
                        "outbox row {id} has arrays of different lengths"
                    )));
                }
                let messages = channels
                    .into_iter()
                    .zip(keys)
                    .zip(payloads)
                    .map(|((channel, key), payload)| {
                        let channel = Channel::parse(&channel).ok_or_else(|| {
                            StoreError::Corrupt(format!("outbox channel {channel:?}"))
                        })?;
                        Ok(OutboxMessage {
                            channel,
                            key,
                            payload,
                        })
                    })
                    .collect::<Result<_, StoreError>>()?;
                Ok(OutboxRow {
                    id,
                    created_at,
                    messages,
                })
            })
            .collect()
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
            "SELECT coalesce(sum(messages), 0)::bigint FROM outbox WHERE id <= $1",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Messages committed and not yet published, for the gauge.
    pub async fn outbox_backlog(&self) -> Result<i64, StoreError> {
        let (count,): (i64,) =
            sqlx::query_as("SELECT coalesce(sum(messages), 0)::bigint FROM outbox")
                .fetch_one(&self.pool)
                .await?;
        Ok(count)
    }
}
