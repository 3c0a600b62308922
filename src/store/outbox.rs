//! The outbox: messages committed in the same transaction as the state they describe,
//! published by the relay and removed once the broker acknowledged them.

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
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Ledger => "ledger",
            Channel::Shortfalls => "shortfalls",
            Channel::Dlq => "dlq",
        }
    }

    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "ledger" => Channel::Ledger,
            "shortfalls" => Channel::Shortfalls,
            "dlq" => Channel::Dlq,
            _ => return None,
        })
    }
}

/// A message about to be written to the outbox.
pub(super) struct OutboxMessage {
    channel: Channel,
    key: Option<String>,
    payload: Vec<u8>,
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

/// A committed message waiting to be published.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub channel: Channel,
    pub key: Option<String>,
    pub payload: Vec<u8>,
}

pub(super) async fn insert(
    connection: &mut PgConnection,
    messages: &[OutboxMessage],
) -> Result<(), StoreError> {
    if messages.is_empty() {
        return Ok(());
    }
    let channels: Vec<&str> = messages.iter().map(|m| m.channel.as_str()).collect();
    let keys: Vec<Option<&str>> = messages.iter().map(|m| m.key.as_deref()).collect();
    let payloads: Vec<&[u8]> = messages.iter().map(|m| m.payload.as_slice()).collect();
    // WITH ORDINALITY keeps the ids in the order of the messages: ledger entries go out in
    // sequence order.
    sqlx::query(
        "INSERT INTO outbox (channel, message_key, payload)
         SELECT channel, message_key, payload
           FROM UNNEST($1::text[], $2::text[], $3::bytea[]) WITH ORDINALITY
                AS m (channel, message_key, payload, position)
          ORDER BY position",
    )
    .bind(&channels)
    .bind(&keys)
    .bind(&payloads)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

impl Store {
    /// The oldest committed messages not yet published, in commit order per organization.
    pub async fn pending_outbox(&self, limit: i64) -> Result<Vec<OutboxRow>, StoreError> {
        let rows: Vec<(i64, String, Option<String>, Vec<u8>)> = sqlx::query_as(
            "SELECT id, channel, message_key, payload FROM outbox ORDER BY id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(id, channel, key, payload)| {
                let channel = Channel::parse(&channel)
                    .ok_or_else(|| StoreError::Corrupt(format!("outbox channel {channel:?}")))?;
                Ok(OutboxRow {
                    id,
                    channel,
                    key,
                    payload,
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

    /// Messages committed and not yet published, for the gauge.
    pub async fn outbox_backlog(&self) -> Result<i64, StoreError> {
        let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM outbox")
            .fetch_one(&self.pool)
            .await?;
        Ok(count)
    }
}
