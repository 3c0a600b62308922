//! The outbox relay: publishes the messages of committed outbox rows in order with an
//! idempotent producer and removes each row once the broker acknowledged all of it. One relay publishes at a time
//! across all instances (a PostgreSQL advisory lock), so an organization's ledger goes out
//! in sequence order; a crash re-publishes the same rows with the same ids.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use sqlx::PgConnection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;
use crate::store::{Channel, Store};
use crate::telemetry::Metrics;

/// The advisory lock key held by the instance whose relay publishes.
const RELAY_LOCK_KEY: i64 = 0x656e_7469_746c_6d6e; // "entitlmn"
/// How long one message may wait for the broker's acknowledgement before it is retried.
const DELIVERY_TIMEOUT_MS: &str = "30000";
/// The pause after a failed round, so a broker outage is not hammered.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

pub struct Relay {
    store: Store,
    producer: FutureProducer,
    settings: Settings,
    metrics: Metrics,
    wake: std::sync::Arc<Notify>,
    /// The session holding the relay lock, outside the pool so the lock never leaks to
    /// another user of a pooled connection; dropping it releases the lock.
    lock: Option<PgConnection>,
}

impl Relay {
    pub fn new(
        settings: &Settings,
        store: Store,
        metrics: Metrics,
        wake: std::sync::Arc<Notify>,
    ) -> anyhow::Result<Self> {
        let producer: FutureProducer = super::client_config(&settings.kafka)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("message.timeout.ms", DELIVERY_TIMEOUT_MS)
            .create()?;
        Ok(Self {
            store,
            producer,
            settings: settings.clone(),
            metrics,
            wake,
            lock: None,
        })
    }

    /// Publishes until `stop` fires, then drains what is committed and flushes.
    pub async fn run(mut self, stop: CancellationToken) {
        let poll = Duration::from_millis(self.settings.outbox.poll_interval_ms);
        loop {
            let published = match self.round().await {
                Ok(published) => published,
                Err(error) => {
                    self.metrics.publish_errors.inc();
                    tracing::warn!(error = %error, "The outbox relay could not publish; it tries again.");
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY_PAUSE) => {}
                        _ = stop.cancelled() => break,
                    }
                    continue;
                }
            };
            if published < self.settings.outbox.batch_size as usize {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(poll) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
        // Drain: everything committed before shutdown goes out now, if the broker is there.
        loop {
            match self.round().await {
                Ok(0) => break,
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %error, "The outbox could not be drained; the rows stay and go out at the next start.");
                    break;
                }
            }
        }
        if let Err(error) = self.producer.flush(Timeout::After(Duration::from_secs(5))) {
            tracing::warn!(%error, "The producer could not flush.");
        }
    }

    /// One round: take the lock if free, publish up to a batch of rows in order, remove the
    /// rows acknowledged whole. Returns how many messages those rows held.
    async fn round(&mut self) -> anyhow::Result<usize> {
        if !self.hold_lock().await? {
            return Ok(0);
        }
        let rows = self
            .store
            .pending_outbox(self.settings.outbox.batch_size)
            .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let topics = &self.settings.topics;
        let deliveries: Vec<Vec<_>> = rows
            .iter()
            .map(|row| {
                row.messages
                    .iter()
                    .map(|message| {
                        let topic = match message.channel {
                            Channel::Ledger => &topics.ledger,
                            Channel::Shortfalls => &topics.shortfalls,
                            Channel::Dlq => &topics.dlq,
                        };
                        let mut record =
                            FutureRecord::<str, [u8]>::to(topic).payload(&message.payload);
                        if let Some(key) = &message.key {
                            record = record.key(key.as_str());
                        }
                        // The record handed back on a failed enqueue is not needed.
                        self.producer
                            .send_result(record)
                            .map_err(|(error, _record)| error)
                    })
                    .collect()
            })
            .collect();
        // Remove only the rows acknowledged whole, up to the first failure: a row after a
        // failed one is sent again with it, so the order per organization holds (a
        // consumer drops the repeat by its id).
        let mut acknowledged = Vec::with_capacity(rows.len());
        let mut published = 0;
        let mut failure = None;
        for (row, row_deliveries) in rows.iter().zip(deliveries) {
            for (message, delivery) in row.messages.iter().zip(row_deliveries) {
                let outcome = match delivery {
                    Ok(future) => match future.await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err((error, _))) => Err(error.to_string()),
                        Err(_) => Err("the delivery was cancelled".to_owned()),
                    },
                    Err(error) => Err(error.to_string()),
                };
                match outcome {
                    Ok(()) if failure.is_none() => {
                        self.metrics
                            .published
                            .with_label_values(&[message.channel.as_str()])
                            .inc();
                    }
                    Ok(()) => {}
                    Err(error) => {
                        self.metrics.publish_errors.inc();
                        failure.get_or_insert(error);
                    }
                }
            }
            // A failure in this row or an earlier one keeps this row for the next round.
            if failure.is_none() {
                acknowledged.push(row.id);
                published += row.messages.len();
            }
        }
        if !acknowledged.is_empty() {
            self.store.remove_published(&acknowledged).await?;
        }
        match failure {
            None => Ok(published),
            Some(error) => anyhow::bail!("the broker did not acknowledge a message: {error}"),
        }
    }

    /// Holds the relay lock on a dedicated connection; false while another instance has it.
    async fn hold_lock(&mut self) -> anyhow::Result<bool> {
        if let Some(connection) = self.lock.as_mut() {
            // The lock lives as long as the session: check the session is still there.
            if sqlx::query("SELECT 1")
                .execute(&mut *connection)
                .await
                .is_ok()
            {
                return Ok(true);
            }
            self.lock = None;
        }
        let mut connection = self.store.pool().acquire().await?.detach();
        let (held,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
            .bind(RELAY_LOCK_KEY)
            .fetch_one(&mut connection)
            .await?;
        if held {
            tracing::info!("This instance publishes the outbox.");
            self.lock = Some(connection);
        }
        Ok(held)
    }
}
