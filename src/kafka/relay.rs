//! The outbox relay: publishes the messages of committed outbox rows in order with an
//! idempotent producer and removes each row once the broker acknowledged all of it. One
//! relay publishes at a time across all instances (a PostgreSQL advisory lock), so an
//! organization's ledger goes out in sequence order; a crash re-publishes the same rows
//! with the same ids.
//!
//! Order holds across failures because librdkafka, not the relay, retries: messages never
//! time out locally (`message.timeout.ms` 0), and the idempotent producer retries each
//! partition's messages in their order until the broker takes them. What is left to fail
//! is a message the broker refuses for good. The idempotent producer then fails the
//! messages behind it in its partition too (none of them lands ahead of it: the fault
//! test `the_broker_refusing_messages_for_good_keeps_each_ledger_in_order`), the relay
//! stops sending behind the failure and sends again from the first row not acknowledged
//! whole; a dead letter refused as too large is replaced by a shorter copy first, so the
//! relay never wedges on it.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use sqlx::PgConnection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;
use crate::store::{Channel, OutboxMessage, OutboxRow, Store};
use crate::telemetry::{Health, Metrics};

/// The advisory lock key held by the instance whose relay publishes.
const RELAY_LOCK_KEY: i64 = 0x656e_7469_746c_6d6e; // "entitlmn"
/// Messages never time out in the producer: a timeout would hand the message back while
/// later ones of its partition may still go out, breaking the order per organization.
/// librdkafka retries until the broker takes it; a broker outage shows as the outbox
/// backlog and on `/healthz`, not as lost order.
const DELIVERY_TIMEOUT_MS: &str = "0";
/// The largest message the producer sends (librdkafka's `message.max.bytes`, its default,
/// under the broker's default of 1 MiB): a larger dead letter is shortened before it is
/// handed over.
const MESSAGE_BYTES_MAX: usize = 1_000_000;
/// Messages handed to the producer and not yet acknowledged: well under librdkafka's
/// queue (`queue.buffering.max.messages`, 100,000), so that a row of any size goes out in
/// windows instead of overflowing the queue.
const IN_FLIGHT_MAX: usize = 10_000;
/// How long a message waits for the producer's queue to free a place when nothing of the
/// relay's is in flight, and how many times before the round fails (about a second).
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(2);
const QUEUE_FULL_WAITS: u32 = 500;
/// The pause after a failed round, so a broker outage is not hammered.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// The relay's name on `/healthz`.
const HEALTH_PART: &str = "the outbox relay";
/// How often an instance that does not hold the relay lock tries to take it.
const LOCK_RETRY_INTERVAL: Duration = Duration::from_secs(1);

pub struct Relay {
    store: Store,
    producer: FutureProducer,
    settings: Settings,
    metrics: Metrics,
    health: Health,
    wake: std::sync::Arc<Notify>,
    /// The session that holds (or keeps trying for) the relay lock, outside the pool so
    /// the lock never leaks to another user of a pooled connection; dropping it releases
    /// the lock.
    lock: Option<PgConnection>,
    /// Whether `lock` holds the relay lock.
    holding: bool,
    /// When an instance without the lock last tried to take it.
    lock_tried: Option<std::time::Instant>,
    /// Shorter copies of dead letters the broker refused as too large, by outbox row and
    /// position: sent in their place from then on.
    replacements: HashMap<(i64, usize), Vec<u8>>,
}

impl Relay {
    pub fn new(
        settings: &Settings,
        store: Store,
        metrics: Metrics,
        health: Health,
        wake: std::sync::Arc<Notify>,
    ) -> anyhow::Result<Self> {
        let producer: FutureProducer = super::client_config(&settings.kafka)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("message.timeout.ms", DELIVERY_TIMEOUT_MS)
            .set("message.max.bytes", MESSAGE_BYTES_MAX.to_string())
            .create()?;
        Ok(Self {
            store,
            producer,
            settings: settings.clone(),
            metrics,
            health,
            wake,
            lock: None,
            holding: false,
            lock_tried: None,
            replacements: HashMap::new(),
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
            // The relay holding the lock reads this instance's rows back.
            self.store.forget_committed();
            return Ok(0);
        }
        let (rows, sources) = self
            .store
            .pending_outbox_from(self.settings.outbox.batch_size)
            .await?;
        self.metrics
            .outbox_rows
            .with_label_values(&["memory"])
            .inc_by(sources.from_memory as u64);
        self.metrics
            .outbox_rows
            .with_label_values(&["database"])
            .inc_by(sources.read_back as u64);
        if rows.is_empty() {
            self.health.done(HEALTH_PART);
            return Ok(0);
        }
        // A message larger than the producer sends would be refused locally, round after
        // round: a dead letter that large is shortened before it is ever handed over.
        for row in &rows {
            for (index, message) in row.messages.iter().enumerate() {
                let size = message.payload.len() + message.key.as_ref().map_or(0, String::len);
                if size > MESSAGE_BYTES_MAX && !self.replacements.contains_key(&(row.id, index)) {
                    self.shorten(row.id, index, message, "is larger than the producer sends");
                }
            }
        }
        let waiting: usize = rows.iter().map(|row| row.messages.len()).sum();
        self.health.begin(
            HEALTH_PART,
            format!("{waiting} committed messages wait for the broker's acknowledgement"),
        );
        let topics = &self.settings.topics;
        // Deliveries awaited in the order they were sent, at most IN_FLIGHT_MAX at a time.
        // A row is removed once all its messages, and all before them, were acknowledged.
        let mut in_flight: VecDeque<(usize, usize, DeliveryFuture)> = VecDeque::new();
        let mut acknowledged = Vec::with_capacity(rows.len());
        let mut published = 0;
        let mut failure: Option<(i64, usize, KafkaError)> = None;
        let mut row_done = vec![0usize; rows.len()];
        'rows: for (row_index, row) in rows.iter().enumerate() {
            for (index, message) in row.messages.iter().enumerate() {
                let topic = match message.channel {
                    Channel::Ledger => &topics.ledger,
                    Channel::Shortfalls => &topics.shortfalls,
                    Channel::Dlq => &topics.dlq,
                    Channel::State => &topics.state,
                    Channel::PoolWarnings => &topics.pool_warnings,
                };
                let payload = self.payload_to_send(row.id, index, message);
                let mut full_and_idle = 0;
                loop {
                    while in_flight.len() >= IN_FLIGHT_MAX {
                        self.settle_oldest(&mut in_flight, &rows, &mut row_done, &mut failure)
                            .await;
                    }
                    if failure.is_some() {
                        // Nothing more goes out behind a failed message.
                        break 'rows;
                    }
                    let mut record = FutureRecord::<str, [u8]>::to(topic).payload(payload);
                    if let Some(key) = &message.key {
                        record = record.key(key.as_str());
                    }
                    match self.producer.send_result(record) {
                        Ok(delivery) => {
                            in_flight.push_back((row_index, index, delivery));
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                            if !in_flight.is_empty() =>
                        {
                            self.settle_oldest(&mut in_flight, &rows, &mut row_done, &mut failure)
                                .await;
                        }
                        // A delivery is reported a moment before librdkafka frees its place
                        // in the queue: with nothing left in flight the queue empties by
                        // itself, so the message waits for it rather than failing the round
                        // (which would send the row's acknowledged messages again).
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                            if full_and_idle < QUEUE_FULL_WAITS =>
                        {
                            full_and_idle += 1;
                            tokio::time::sleep(QUEUE_FULL_WAIT).await;
                        }
                        Err((error, _)) => {
                            failure = Some((row.id, index, error));
                            break 'rows;
                        }
                    }
                }
            }
        }
        while !in_flight.is_empty() {
            self.settle_oldest(&mut in_flight, &rows, &mut row_done, &mut failure)
                .await;
        }
        // Rows acknowledged whole, up to the first that is not: a row after it is sent
        // again with it, so the order per organization holds (a consumer drops the repeat
        // by its id).
        for (row, done) in rows.iter().zip(&row_done) {
            if *done < row.messages.len() {
                break;
            }
            acknowledged.push(row.id);
            published += row.messages.len();
            let delay = (chrono::Utc::now() - row.created_at).num_microseconds();
            self.metrics
                .publish_delay
                .with_label_values::<&str>(&[])
                .observe(delay.unwrap_or(0).max(0) as f64 / 1e6);
        }
        if !acknowledged.is_empty() {
            self.store.remove_published(&acknowledged).await?;
            self.health.done(HEALTH_PART);
            self.replacements
                .retain(|(row_id, _), _| !acknowledged.contains(row_id));
        }
        match failure {
            None => Ok(published),
            Some((row_id, index, error)) => {
                self.replace_if_too_large(&rows, row_id, index, &error);
                anyhow::bail!("the broker did not acknowledge a message: {error}")
            }
        }
    }

    /// Awaits the oldest delivery in flight and counts it; the first failure is kept, and
    /// acknowledgements after it no longer count toward removing their rows.
    async fn settle_oldest(
        &self,
        in_flight: &mut VecDeque<(usize, usize, DeliveryFuture)>,
        rows: &[OutboxRow],
        row_done: &mut [usize],
        failure: &mut Option<(i64, usize, KafkaError)>,
    ) {
        let Some((row_index, index, delivery)) = in_flight.pop_front() else {
            return;
        };
        let outcome = match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((error, _))) => Err(error),
            Err(_) => Err(KafkaError::Canceled),
        };
        match outcome {
            Ok(()) => {
                if failure.is_none() {
                    row_done[row_index] += 1;
                    self.metrics
                        .published
                        .with_label_values(&[rows[row_index].messages[index].channel.as_str()])
                        .inc();
                }
            }
            Err(error) => {
                self.metrics.publish_errors.inc();
                failure.get_or_insert((rows[row_index].id, index, error));
            }
        }
    }

    /// The bytes to send for a message: its own, or the shorter copy that replaced it.
    fn payload_to_send<'a>(
        &'a self,
        row_id: i64,
        index: usize,
        message: &'a OutboxMessage,
    ) -> &'a [u8] {
        match self.replacements.get(&(row_id, index)) {
            Some(replacement) => replacement,
            None => &message.payload,
        }
    }

    /// After the broker refused a dead letter as too large, the next rounds send a copy
    /// that keeps less of the rejected input; any other refusal is tried again as it is.
    fn replace_if_too_large(
        &mut self,
        rows: &[OutboxRow],
        row_id: i64,
        index: usize,
        error: &KafkaError,
    ) {
        let too_large = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
        );
        let Some(message) = rows
            .iter()
            .find(|row| row.id == row_id)
            .and_then(|row| row.messages.get(index))
        else {
            return;
        };
        if too_large {
            self.shorten(
                row_id,
                index,
                message,
                "was refused by the broker as too large",
            );
        }
    }

    /// Puts a shorter copy of the dead letter at (`row_id`, `index`) in its place, from
    /// this round on. Other messages (ledger entries, alerts) are a few hundred bytes and
    /// are never shortened: a refusal of one is tried again as it is, and shows on
    /// `/healthz`.
    fn shorten(&mut self, row_id: i64, index: usize, message: &OutboxMessage, why: &str) {
        if message.channel != Channel::Dlq {
            tracing::error!(
                row_id,
                index,
                "An outbox message {why}; it is sent again as it is."
            );
            return;
        }
        let current = self.payload_to_send(row_id, index, message);
        let bytes = current.len();
        if let Some(shorter) = crate::codec::shorten_dead_letter(current) {
            tracing::warn!(
                row_id,
                index,
                bytes,
                shorter = shorter.len(),
                "A dead letter {why}; a shorter copy replaces it."
            );
            self.replacements.insert((row_id, index), shorter);
        }
    }

    /// Holds the relay lock on a dedicated connection; false while another instance has
    /// it. An instance without it tries again at most once per LOCK_RETRY_INTERVAL, on the
    /// same connection, rather than opening one per round.
    async fn hold_lock(&mut self) -> anyhow::Result<bool> {
        if self.holding {
            let connection = self.lock.as_mut().expect("a held lock has its connection");
            // The lock lives as long as the session: check the session is still there.
            if sqlx::query("SELECT 1")
                .execute(&mut *connection)
                .await
                .is_ok()
            {
                return Ok(true);
            }
            tracing::warn!("The session holding the relay lock was lost; trying to take it again.");
            self.holding = false;
            self.lock = None;
        }
        if self
            .lock_tried
            .is_some_and(|tried| tried.elapsed() < LOCK_RETRY_INTERVAL)
        {
            return Ok(false);
        }
        self.lock_tried = Some(std::time::Instant::now());
        if self.lock.is_none() {
            self.lock = Some(self.store.pool().acquire().await?.detach());
        }
        let connection = self.lock.as_mut().expect("set above");
        let held = match sqlx::query_as::<_, (bool,)>("SELECT pg_try_advisory_lock($1)")
            .bind(RELAY_LOCK_KEY)
            .fetch_one(&mut *connection)
            .await
        {
            Ok((held,)) => held,
            Err(error) => {
                self.lock = None;
                return Err(error.into());
            }
        };
        if held {
            tracing::info!("This instance publishes the outbox.");
            self.holding = true;
        }
        Ok(held)
    }
}
