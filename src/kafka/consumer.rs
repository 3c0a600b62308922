//! The consumer of one apply lane: a librdkafka consumer, a member of the consumer
//! group in its own right, polled on its own thread. On assignment each partition
//! resumes from the offset stored in PostgreSQL; on revocation the messages in
//! hand are committed before the partitions go. Decoding happens here, so the apply loop
//! receives typed commands or rejections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio_util::sync::CancellationToken;

use crate::codec;
use crate::settings::Settings;
use crate::store::{Inbound, Store};
use crate::telemetry::{Health, Metrics};

/// How long a revocation waits for the batch in hand to commit before letting go anyway;
/// the offsets locked in PostgreSQL keep the handover correct even then.
const REVOKE_WAIT: Duration = Duration::from_secs(30);
/// How long one poll blocks: also how quickly the thread notices shutdown.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// librdkafka settings the worker changes from librdkafka's defaults for lane `lane`;
/// each gives way to the same key in the operator's `kafka.properties`.
pub fn consumer_defaults(settings: &Settings, lane: usize) -> Vec<(&'static str, String)> {
    let defaults = [
        // How long the broker may hold a fetch while it has less than `fetch.min.bytes`.
        // librdkafka's 500 ms showed up whole in the input -> alert latency against
        // brokers that hold the fetch for its full time; 10 ms costs an idle consumer
        // about 100 small fetches a second per broker.
        ("fetch.wait.max.ms", "10".to_owned()),
        // The bytes the broker waits for (up to the time above) before it answers a fetch.
        // librdkafka's 1 made Apache Kafka answer a fetch for nearly every message at a
        // few thousand messages a second: with 64 KiB it answers at most every 10 ms
        // when the stream is slow, and at once in a catch-up. On two cores shared with
        // the broker, input -> alert p99 at 2,000 events/s went from 1,257 ms to 148 ms
        // (docs/performance.md).
        ("fetch.min.bytes", "65536".to_owned()),
        // Messages fetched ahead of the apply lane. librdkafka's 64 MiB was most of the
        // worker's memory while it caught up on a backlog; 2 MiB still holds about 11,000
        // messages of 180 bytes, two batches ahead, as long as the fetch after it comes
        // soon (below).
        ("queued.max.messages.kbytes", "2048".to_owned()),
        // How long librdkafka waits before fetching again for a partition whose queue
        // was full. Its 1 s left the lanes waiting for messages for a third of a catch-up
        // (`entitlements_lane_wait_seconds_total{phase="idle"}`): the queue drains in a
        // fraction of that. 20 ms took the benchmark from 50,000-55,000 to about 70,000
        // events/s (docs/performance.md).
        ("fetch.queue.backoff.ms", "20".to_owned()),
        // The most one fetch response may hold (librdkafka: 50 MiB). A response stays in
        // memory until its last message is read, on top of the queue above.
        ("fetch.max.bytes", "4194304".to_owned()),
        // Members learn of a rebalance at their next heartbeat, and an instance's lanes
        // join the group one after another, so librdkafka's 3 s made every start go
        // through rounds of 3 s each.
        (
            "heartbeat.interval.ms",
            heartbeat_interval_ms(settings.kafka.session_timeout_ms).to_string(),
        ),
        ("client.id", format!("entitlement-worker-lane-{lane}")),
    ];
    let classic = uses_classic_protocol(settings);
    defaults
        .into_iter()
        .filter(|(key, _)| !settings.kafka.properties.contains_key(*key))
        // Under KIP-848's protocol the broker sets the heartbeat and the session.
        .filter(|(key, _)| classic || *key != "heartbeat.interval.ms")
        .collect()
}

/// Whether the lanes join their group with the classic protocol (librdkafka's default)
/// rather than KIP-848's `group.protocol=consumer`, under which the broker assigns the
/// partitions and sets the session timeout (`group.consumer.session.timeout.ms`), and the
/// client may set neither.
pub fn uses_classic_protocol(settings: &Settings) -> bool {
    settings
        .kafka
        .properties
        .get("group.protocol")
        .is_none_or(|protocol| !protocol.eq_ignore_ascii_case("consumer"))
}

/// How often a lane heartbeats to the group coordinator: every second, and a third of
/// the session timeout at most, as librdkafka requires it to be below.
pub fn heartbeat_interval_ms(session_timeout_ms: u64) -> u64 {
    (session_timeout_ms / 3).clamp(1, 1000)
}

/// Where each assigned input partition's next message should be, to see offsets the
/// broker went past: the offset a lane resumed at, then one past each message received.
#[derive(Debug, Default)]
pub struct Continuity {
    next: HashMap<String, HashMap<i32, i64>>,
}

impl Continuity {
    /// A partition assigned to start at `at` (None: wherever `auto.offset.reset` says,
    /// so its first message sets the mark).
    pub fn resume(&mut self, topic: &str, partition: i32, at: Option<i64>) {
        let partitions = self.next.entry(topic.to_owned()).or_default();
        match at {
            Some(at) => partitions.insert(partition, at),
            None => partitions.remove(&partition),
        };
    }

    /// A partition revoked: nothing is expected of it any more.
    pub fn forget(&mut self, topic: &str, partition: i32) {
        if let Some(partitions) = self.next.get_mut(topic) {
            partitions.remove(&partition);
        }
    }

    /// A message received at `offset`: returns how many offsets before it were never
    /// received (0 for the next one, a repeat, or the first of an unmarked partition).
    pub fn receive(&mut self, topic: &str, partition: i32, offset: i64) -> i64 {
        let partitions = match self.next.get_mut(topic) {
            Some(partitions) => partitions,
            None => self.next.entry(topic.to_owned()).or_default(),
        };
        let expected = partitions.insert(partition, offset + 1);
        match expected {
            Some(expected) if offset > expected => offset - expected,
            // A repeat (a seek back) moves the mark back with it.
            _ => 0,
        }
    }
}

/// What the consumer thread hands to the apply loop.
pub enum Envelope {
    /// A message, with its share of the lane's byte budget: released when the apply loop
    /// takes it into a batch.
    Message(Box<Inbound>, OwnedSemaphorePermit),
    /// Commit everything received so far, then answer: sent before partitions are revoked.
    Barrier(std::sync::mpsc::SyncSender<()>),
    /// The consumer stopped polling: commit what is in hand and end.
    End,
}

/// The way from a lane's consumer thread to its apply loop: a channel bounded by count,
/// and a budget of the bytes queued in it.
pub struct LaneQueue {
    pub sender: mpsc::Sender<Envelope>,
    pub bytes: Arc<Semaphore>,
}

pub struct WorkerContext {
    lane: usize,
    store: Store,
    runtime: Handle,
    sender: mpsc::Sender<Envelope>,
    auto_offset_reset: Offset,
    metrics: Metrics,
    /// Turned on once partitions are assigned: `/healthz` then answers 200.
    health: Health,
    /// Set once shutdown began: the apply loop has stopped, no barrier can be answered.
    closing: Arc<AtomicBool>,
    /// Where each partition's next message should be; used on the polling thread only
    /// (rebalances run inside its poll).
    continuity: Arc<Mutex<Continuity>>,
}

impl ClientContext for WorkerContext {
    fn stats(&self, statistics: Statistics) {
        // Every partition's fetch queue forwards to the consumer's one queue, and each
        // reports that queue's size: the largest is the lane's.
        let mut queued_bytes = 0;
        for (topic, stats) in &statistics.topics {
            for (partition, partition_stats) in &stats.partitions {
                queued_bytes = queued_bytes.max(partition_stats.fetchq_size);
                if *partition >= 0 && partition_stats.consumer_lag >= 0 {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[topic.as_str(), &partition.to_string()])
                        .set(partition_stats.consumer_lag);
                }
            }
        }
        self.metrics
            .consumer_queued_bytes
            .with_label_values(&[&self.lane.to_string()])
            .set(queued_bytes as i64);
    }
}

impl ConsumerContext for WorkerContext {
    /// Takes over librdkafka's rebalance: partitions are assigned at the offsets stored
    /// in PostgreSQL, whole (the classic protocol's eager `range` assignment) or as the
    /// partitions added to those held (the incremental assignment of KIP-848's
    /// `group.protocol=consumer`); revoked ones go after the batch in hand committed.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        let incremental = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let outcome = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.start_at_stored_offsets(partitions);
                let mut continuity = self.continuity.lock().expect("not poisoned");
                for element in partitions.elements() {
                    let at = match element.offset() {
                        Offset::Offset(at) => Some(at),
                        _ => None,
                    };
                    continuity.resume(element.topic(), element.partition(), at);
                }
                drop(continuity);
                let outcome = if incremental {
                    consumer.incremental_assign(partitions)
                } else {
                    consumer.assign(partitions)
                };
                if outcome.is_ok() {
                    self.health.set(true);
                    tracing::info!(
                        partitions = partitions.count(),
                        incremental,
                        "Partitions assigned; resuming from the offsets stored in PostgreSQL."
                    );
                }
                outcome
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.before_revoke(partitions);
                let mut continuity = self.continuity.lock().expect("not poisoned");
                for element in partitions.elements() {
                    continuity.forget(element.topic(), element.partition());
                }
                drop(continuity);
                if incremental {
                    consumer.incremental_unassign(partitions)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::error!(error = ?other, "The group rebalance failed; letting the partitions go.");
                if incremental {
                    consumer.incremental_unassign(partitions)
                } else {
                    consumer.unassign()
                }
            }
        };
        if let Err(error) = outcome {
            tracing::error!(%error, "Could not change the partitions this lane consumes.");
        }
    }
}

impl WorkerContext {
    /// Commits the batch in hand before `partitions` go to another member.
    fn before_revoke(&self, partitions: &TopicPartitionList) {
        tracing::info!(
            partitions = partitions.count(),
            "Partitions are being revoked; committing the batch in hand first."
        );
        // These partitions' lag is another instance's to report from now on.
        for element in partitions.elements() {
            let _ = self
                .metrics
                .consumer_lag
                .remove_label_values(&[element.topic(), &element.partition().to_string()]);
        }
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        if self.sender.blocking_send(Envelope::Barrier(done)).is_ok()
            && wait.recv_timeout(REVOKE_WAIT).is_err()
        {
            tracing::warn!(
                "The batch in hand did not commit in time; letting the partitions go \
                 (the offsets locked in PostgreSQL keep the handover exact)."
            );
        }
    }

    /// Sets each assigned partition's start to the offset stored in PostgreSQL, or to
    /// `auto.offset.reset` for one never consumed.
    fn start_at_stored_offsets(&self, partitions: &mut TopicPartitionList) {
        let wanted: Vec<(String, i32)> = partitions
            .elements()
            .iter()
            .map(|element| (element.topic().to_owned(), element.partition()))
            .collect();
        if wanted.is_empty() {
            return;
        }
        let stored = match self.runtime.block_on(self.store.stored_offsets(&wanted)) {
            Ok(stored) => stored,
            Err(error) => {
                // Without the stored offsets the consumer starts where Kafka's committed
                // offsets say; the offsets locked in each batch skip anything applied.
                tracing::error!(error = %error, "Could not read the stored offsets; resuming from the group's committed offsets.");
                return;
            }
        };
        for (topic, partition) in &wanted {
            let offset = stored
                .get(&(topic.clone(), *partition))
                .map_or(self.auto_offset_reset, |next| Offset::Offset(*next));
            if let Err(error) = partitions.set_partition_offset(topic, *partition, offset) {
                tracing::error!(%error, topic, partition, "Could not set a start offset.");
            }
        }
    }
}

/// The running consumer: a thread that polls and decodes.
pub struct ConsumerThread {
    pub consumer: Arc<BaseConsumer<WorkerContext>>,
    thread: std::thread::JoinHandle<()>,
    closing: Arc<AtomicBool>,
}

impl ConsumerThread {
    /// Subscribes to the input topics as lane `lane` of this instance (a member of
    /// the consumer group in its own right) and starts polling on a new thread.
    pub fn start(
        lane: usize,
        settings: &Settings,
        store: Store,
        queue: LaneQueue,
        metrics: Metrics,
        health: Health,
        cancel: CancellationToken,
    ) -> anyhow::Result<Self> {
        let LaneQueue {
            sender,
            bytes: queued_bytes,
        } = queue;
        let closing = Arc::new(AtomicBool::new(false));
        let continuity = Arc::new(Mutex::new(Continuity::default()));
        let offsets_skipped = metrics.offsets_skipped.clone();
        let context = WorkerContext {
            lane,
            store,
            runtime: Handle::current(),
            sender: sender.clone(),
            auto_offset_reset: if settings.kafka.auto_offset_reset == "latest" {
                Offset::End
            } else {
                Offset::Beginning
            },
            metrics,
            health: health.clone(),
            closing: closing.clone(),
            continuity: continuity.clone(),
        };
        let mut config = super::client_config(&settings.kafka);
        for (key, value) in consumer_defaults(settings, lane) {
            config.set(key, value);
        }
        config
            .set("group.id", &settings.kafka.group_id)
            // Offsets live in PostgreSQL with the effects; Kafka's copy is committed after
            // each batch only so that ordinary tools can show the group's lag.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", &settings.kafka.auto_offset_reset)
            .set("statistics.interval.ms", "5000");
        if uses_classic_protocol(settings) {
            config
                .set(
                    "session.timeout.ms",
                    settings.kafka.session_timeout_ms.to_string(),
                )
                .set("partition.assignment.strategy", "range");
        }
        let consumer: BaseConsumer<WorkerContext> = config.create_with_context(context)?;
        let topics: Vec<&str> = settings.topics.inputs().map(|(_, name)| name).collect();
        consumer.subscribe(&topics)?;
        let consumer = Arc::new(consumer);
        let topics = settings.topics.clone();
        let input = settings.input.clone();
        let queue_bytes_max = settings.batch.max_bytes;
        let runtime = Handle::current();
        let polled = consumer.clone();
        let thread_closing = closing.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kafka-consumer-{lane}"))
            .spawn(move || {
                while !cancel.is_cancelled() {
                    let Some(result) = polled.poll(POLL_TIMEOUT) else {
                        continue;
                    };
                    let message = match result {
                        Ok(message) => message,
                        Err(error) => {
                            tracing::warn!(%error, "The consumer reported an error; it keeps trying.");
                            continue;
                        }
                    };
                    let Some(kind) = topics.kind_of(message.topic()) else {
                        continue;
                    };
                    let skipped = continuity.lock().expect("not poisoned").receive(
                        message.topic(),
                        message.partition(),
                        message.offset(),
                    );
                    if skipped > 0 && !input.offset_gaps_expected {
                        offsets_skipped
                            .with_label_values(&[message.topic()])
                            .inc_by(skipped as u64);
                        tracing::warn!(
                            topic = message.topic(),
                            partition = message.partition(),
                            skipped,
                            from = message.offset() - skipped,
                            to = message.offset() - 1,
                            "Offsets of an input partition never reached this lane: retention \
                             deleted them before they were consumed, or the broker skipped \
                             them (set input.offset_gaps_expected if the topic is compacted \
                             or written in transactions)."
                        );
                    }
                    let payload = message.payload();
                    // Messages are bounded by count in the channel and by bytes here: a
                    // stream of large messages cannot take more than the budget. The key
                    // is not kept (outputs are keyed by org_id), so only the payload counts.
                    let size = payload.map_or(0, <[u8]>::len);
                    let budget = u32::try_from(size.min(queue_bytes_max))
                        .unwrap_or(u32::MAX)
                        .max(1);
                    // Taken without waiting while the budget has room, the common case:
                    // the runtime is entered only when the lane is behind.
                    let permit = match queued_bytes.clone().try_acquire_many_owned(budget) {
                        Ok(permit) => permit,
                        Err(TryAcquireError::NoPermits) => {
                            let waited = runtime
                                .block_on(queued_bytes.clone().acquire_many_owned(budget));
                            match waited {
                                Ok(permit) => permit,
                                Err(_) => break,
                            }
                        }
                        Err(TryAcquireError::Closed) => break,
                    };
                    let inbound = Inbound {
                        topic: message.topic().to_owned(),
                        partition: message.partition(),
                        offset: message.offset(),
                        payload: payload.map(<[u8]>::to_vec),
                        decoded: codec::decode_received(
                            kind,
                            payload,
                            Some(input.occurred_at_max(chrono::Utc::now())),
                        ),
                    };
                    if sender
                        .blocking_send(Envelope::Message(Box::new(inbound), permit))
                        .is_err()
                    {
                        break;
                    }
                }
                health.set(false);
                thread_closing.store(true, Ordering::SeqCst);
                let _ = sender.blocking_send(Envelope::End);
            })?;
        Ok(Self {
            consumer,
            thread,
            closing,
        })
    }

    /// Copies committed offsets to Kafka, so that the group's lag shows in Kafka's tools.
    /// PostgreSQL stays the source of truth; a failed copy changes nothing.
    pub fn commit_hint(&self, offsets: &[(String, i32, i64)]) {
        let mut list = TopicPartitionList::new();
        for (topic, partition, next) in offsets {
            let _ = list.add_partition_offset(topic, *partition, Offset::Offset(*next));
        }
        if list.count() > 0 {
            if let Err(error) = self.consumer.commit(&list, CommitMode::Async) {
                tracing::debug!(%error, "Could not copy the offsets to Kafka.");
            }
        }
    }

    /// Waits for the polling thread to end (after `cancel`), then leaves the group.
    pub fn join(self) {
        self.closing.store(true, Ordering::SeqCst);
        if self.thread.join().is_err() {
            tracing::error!("The consumer thread panicked.");
        }
        tracing::debug!("The consumer thread has ended; the consumer leaves the group.");
        self.consumer.unsubscribe();
    }
}
