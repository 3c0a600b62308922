//! The consumer of one apply lane: a librdkafka consumer, a member of the consumer
//! group in its own right, polled on its own thread. On assignment each partition
//! resumes from the offset stored in PostgreSQL; on revocation the messages in
//! hand are committed before the partitions go. Decoding happens here, so the apply loop
//! receives typed commands or rejections.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
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
    defaults
        .into_iter()
        .filter(|(key, _)| !settings.kafka.properties.contains_key(*key))
        .collect()
}

/// How often a lane heartbeats to the group coordinator: every second, and a third of
/// the session timeout at most, as librdkafka requires it to be below.
pub fn heartbeat_interval_ms(session_timeout_ms: u64) -> u64 {
    (session_timeout_ms / 3).clamp(1, 1000)
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
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
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
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(assigned) = rebalance else {
            return;
        };
        let wanted: Vec<(String, i32)> = assigned
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
        let mut positions = TopicPartitionList::new();
        for (topic, partition) in &wanted {
            let offset = stored
                .get(&(topic.clone(), *partition))
                .map_or(self.auto_offset_reset, |next| Offset::Offset(*next));
            if let Err(error) = positions.add_partition_offset(topic, *partition, offset) {
                tracing::error!(%error, topic, partition, "Could not set a start offset.");
            }
        }
        self.health.set(true);
        match consumer.assign(&positions) {
            Ok(()) => tracing::info!(
                partitions = wanted.len(),
                "Partitions assigned; resuming from the offsets stored in PostgreSQL."
            ),
            Err(error) => tracing::error!(%error, "Could not resume from the stored offsets."),
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
    /// Subscribes to the five input topics as lane `lane` of this instance (a member of
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
        };
        let mut config = super::client_config(&settings.kafka);
        for (key, value) in consumer_defaults(settings, lane) {
            config.set(key, value);
        }
        let consumer: BaseConsumer<WorkerContext> = config
            .set("group.id", &settings.kafka.group_id)
            // Offsets live in PostgreSQL with the effects; Kafka's copy is committed after
            // each batch only so that ordinary tools can show the group's lag.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", &settings.kafka.auto_offset_reset)
            .set(
                "session.timeout.ms",
                settings.kafka.session_timeout_ms.to_string(),
            )
            .set("statistics.interval.ms", "5000")
            .set("partition.assignment.strategy", "range")
            .create_with_context(context)?;
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
        self.consumer.unsubscribe();
    }
}
