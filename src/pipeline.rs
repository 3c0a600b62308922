//! The worker's path: consumer -> decode -> batch -> apply (one transaction) -> outbox
//! relay; plus the clock that settles validity windows and the gauges that read the
//! store. [`run`] starts them all and stops them in order.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use chrono::Utc;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::domain::Policy;
use crate::kafka::consumer::{ConsumerThread, Envelope, LaneQueue};
use crate::kafka::relay::Relay;
use crate::settings::{redact_url, Settings};
use crate::store::{BatchReport, Inbound, Store, StoreError};
use crate::telemetry::{self, Health, Metrics};

/// How often the gauges read the store.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// A running worker, for callers that need its address before it stops (tests, the demo).
pub struct Started {
    pub metrics_address: SocketAddr,
    pub metrics: Metrics,
    pub health: Health,
}

/// Runs the worker until `shutdown` completes, then finishes the batch in hand, commits,
/// drains the outbox and returns within `shutdown.timeout_ms`.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
    started: Option<tokio::sync::oneshot::Sender<Started>>,
) -> anyhow::Result<()> {
    tracing::info!(
        brokers = %settings.kafka.brokers,
        group_id = %settings.kafka.group_id,
        database = %redact_url(&settings.database.url),
        auto_assign = settings.modules.auto_assign,
        "Starting the worker."
    );
    let store = Store::connect(&settings.database)
        .await?
        .publishing_state(settings.state.publish);
    let metrics = Metrics::new();
    let health = Health::new(Duration::from_secs(settings.metrics.stall_after_seconds));
    let cancel = CancellationToken::new();
    let relay_stop = CancellationToken::new();
    let background_stop = CancellationToken::new();
    let wake = Arc::new(Notify::new());
    let policy = settings.policy();

    let (address, server) = telemetry::serve(
        &settings.metrics.listen,
        metrics.clone(),
        health.clone(),
        background_stop.clone(),
    )
    .await?;
    tracing::info!(%address, "Serving /metrics and /healthz.");
    let server = tokio::spawn(server);

    // Kafka first, with the worker's own client settings: credentials it refuses or a
    // certificate the worker cannot verify stop the worker here, saying so, rather than
    // leaving lanes that retry for ever; a broker that does not answer is waited for.
    let mut shutdown = std::pin::pin!(shutdown);
    let checked = tokio::select! {
        checked = crate::kafka::preflight::check(&settings.kafka) => Some(checked),
        _ = &mut shutdown => None,
    };
    if !matches!(checked, Some(Ok(()))) {
        background_stop.cancel();
        let _ = server.await;
        let Some(failed) = checked else {
            tracing::info!("Shutdown requested before Kafka answered; nothing was started.");
            return Ok(());
        };
        return failed.map_err(Into::into);
    }
    let missing = crate::kafka::admin::missing_topics(&settings.kafka, &settings.topics).await;
    let missing = match missing {
        Ok(missing) if missing.is_empty() => None,
        Ok(missing) => Some(anyhow::anyhow!(
            "these topics are missing: {}; create them with `entitlement-worker create-topics` \
             (or set topics.* to the names in use)",
            missing.join(", ")
        )),
        Err(error) => Some(error.context("the worker could not list Kafka's topics")),
    };
    if let Some(error) = missing {
        background_stop.cancel();
        let _ = server.await;
        return Err(error);
    }

    // Each lane is a member of the consumer group with its own consumer thread and apply
    // loop, exactly as another instance would be: the group splits the partitions among
    // them, and the offsets and organization locks in PostgreSQL keep them exact. Separate
    // consumers keep a lane whose queue is full from holding back the others.
    let mut consumers = Vec::with_capacity(settings.batch.lanes);
    let mut lanes = Vec::with_capacity(settings.batch.lanes);
    // Messages decoded ahead of each lane: bounds memory and applies back-pressure. A
    // whole batch gathers here while the lane commits the one before.
    let queue_capacity = settings.batch.max_messages;
    for lane in 0..settings.batch.lanes {
        let (sender, receiver) = mpsc::channel(queue_capacity);
        // The bytes decoded ahead of the lane, on top of its batch in hand.
        let queued_bytes = Arc::new(tokio::sync::Semaphore::new(settings.batch.max_bytes));
        let consumer = Arc::new(ConsumerThread::start(
            lane,
            &settings,
            store.clone(),
            LaneQueue {
                sender,
                bytes: queued_bytes,
            },
            metrics.clone(),
            health.clone(),
            cancel.clone(),
        )?);
        lanes.push(tokio::spawn(apply_loop(
            lane,
            health.clone(),
            receiver,
            store.clone(),
            policy,
            settings.clone(),
            metrics.clone(),
            wake.clone(),
            consumer.clone(),
        )));
        consumers.push(consumer);
    }
    let relay = Relay::new(
        &settings,
        store.clone(),
        metrics.clone(),
        health.clone(),
        wake.clone(),
    )?;
    let relay = tokio::spawn(relay.run(relay_stop.clone()));
    let apply = all_lanes(lanes, cancel.clone());
    let clock = tokio::spawn(clock_loop(
        store.clone(),
        policy,
        Duration::from_millis(settings.clock.interval_ms),
        metrics.clone(),
        wake.clone(),
        background_stop.clone(),
    ));
    let gauges = tokio::spawn(gauge_loop(
        store.clone(),
        metrics.clone(),
        background_stop.clone(),
    ));
    if let Some(started) = started {
        let _ = started.send(Started {
            metrics_address: address,
            metrics: metrics.clone(),
            health: health.clone(),
        });
    }

    let mut apply = std::pin::pin!(apply);
    let mut apply_ended = None;
    // A background task ends only when told to: one that ends before (a panic) stops the
    // worker, so that its supervisor restarts it rather than leaving it half working.
    let mut clock = clock;
    let mut gauges = gauges;
    let mut relay = relay;
    let mut background_failure = None;
    tokio::select! {
        _ = &mut shutdown => tracing::info!("Shutdown requested; finishing the batch in hand."),
        result = &mut apply => apply_ended = Some(result),
        ended = &mut clock => background_failure = Some(("clock", ended)),
        ended = &mut gauges => background_failure = Some(("gauges", ended)),
        ended = &mut relay => background_failure = Some(("outbox relay", ended)),
    }
    let ended_task = background_failure.as_ref().map(|(task, _)| *task);
    let background_failure = background_failure.map(|(task, ended)| {
        let why = match ended {
            Err(error) if error.is_panic() => "panicked",
            _ => "ended",
        };
        tracing::error!(task, "The {task} task {why}; the worker stops.");
        anyhow::anyhow!("the {task} task {why} while the worker was running")
    });
    let stopping_since = std::time::Instant::now();
    let stage = |name: &str| {
        tracing::info!(
            elapsed_ms = stopping_since.elapsed().as_millis() as u64,
            "Stopping: {name}."
        );
    };
    let stopping = async {
        cancel.cancel();
        // The consumer thread stops polling and ends every lane; each lane commits what it
        // holds and ends.
        let apply_result = match apply_ended {
            Some(result) => result,
            None => apply.await,
        };
        stage("the lanes have committed what they held");
        background_stop.cancel();
        // A task that already ended is not awaited twice.
        if ended_task != Some("clock") {
            let _ = (&mut clock).await;
        }
        if ended_task != Some("gauges") {
            let _ = (&mut gauges).await;
        }
        relay_stop.cancel();
        if ended_task != Some("outbox relay") {
            let _ = (&mut relay).await;
        }
        stage("the outbox relay has drained");
        // Offsets live in PostgreSQL, so a consumer that cannot leave the group in time
        // loses nothing: it is left behind, and the group reassigns its partitions once its
        // session times out.
        let leaving = consumers.into_iter().filter_map(|consumer| {
            let consumer = Arc::try_unwrap(consumer).ok()?;
            Some(tokio::task::spawn_blocking(move || consumer.join()))
        });
        let leaving = futures::future::join_all(leaving);
        match tokio::time::timeout(CONSUMER_LEAVE, leaving).await {
            Ok(joined) => {
                for result in joined {
                    result?;
                }
                stage("the consumers have left the group");
            }
            Err(_) => tracing::warn!(
                bound_ms = CONSUMER_LEAVE.as_millis() as u64,
                "A consumer did not leave the group in time; it is left behind, and the group \
                 reassigns its partitions after kafka.session_timeout_ms."
            ),
        }
        let _ = server.await;
        match background_failure {
            Some(failure) => apply_result.and(Err(failure)),
            None => apply_result,
        }
    };
    match tokio::time::timeout(
        Duration::from_millis(settings.shutdown.timeout_ms),
        stopping,
    )
    .await
    {
        Ok(result) => {
            result?;
            tracing::info!("The worker stopped cleanly.");
            Ok(())
        }
        Err(_) => anyhow::bail!(
            "the worker did not stop within {} ms",
            settings.shutdown.timeout_ms
        ),
    }
}

/// How long the stopping worker waits for its consumers to leave the group.
const CONSUMER_LEAVE: Duration = Duration::from_secs(5);

/// Waits for every lane and returns the first failure. A lane that fails stops the
/// consumer (through `cancel`), so the other lanes receive their end, commit what they
/// hold and end too.
async fn all_lanes(
    lanes: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let mut lanes: futures::stream::FuturesUnordered<_> = lanes.into_iter().collect();
    let mut first_failure = None;
    while let Some(result) = futures::StreamExt::next(&mut lanes).await {
        let result = result.map_err(anyhow::Error::from).and_then(|ended| ended);
        if let Err(error) = result {
            cancel.cancel();
            first_failure.get_or_insert(error);
        }
    }
    first_failure.map_or(Ok(()), Err)
}

/// Gathers messages into batches (by count or time, whichever first) and applies each in
/// one transaction, retrying transient failures with capped backoff.
#[allow(clippy::too_many_arguments)]
async fn apply_loop(
    lane: usize,
    health: Health,
    mut receiver: mpsc::Receiver<Envelope>,
    store: Store,
    policy: Policy,
    settings: Settings,
    metrics: Metrics,
    wake: Arc<Notify>,
    consumer: Arc<ConsumerThread>,
) -> anyhow::Result<()> {
    let max_messages = settings.batch.max_messages;
    let max_bytes = settings.batch.max_bytes;
    let max_wait = Duration::from_millis(settings.batch.max_wait_ms);
    let mut batch: Vec<Inbound> = Vec::with_capacity(max_messages);
    // The lane's name on `/healthz`.
    let part = format!("lane {lane}");
    let [idle, gather] = telemetry::LANE_WAIT_PHASES
        .map(|phase| metrics.lane_wait_seconds.with_label_values(&[phase]));
    loop {
        let waiting = Instant::now();
        let envelope = receiver.recv().await;
        // Time before a barrier or the end counts as idle too.
        idle.inc_by(waiting.elapsed().as_secs_f64());
        let first = match envelope {
            None | Some(Envelope::End) => break,
            Some(Envelope::Barrier(done)) => {
                let _ = done.send(());
                continue;
            }
            // The permit goes back as the message joins the batch: the queue may then
            // refill while the batch commits.
            Some(Envelope::Message(message, _permit)) => message,
        };
        let gathering = Instant::now();
        let mut bytes = first.size();
        batch.push(*first);
        let deadline = tokio::time::Instant::now() + max_wait;
        let mut barrier = None;
        let mut ended = false;
        while batch.len() < max_messages && bytes < max_bytes {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(Envelope::Message(message, _permit))) => {
                    bytes += message.size();
                    batch.push(*message);
                }
                Ok(Some(Envelope::Barrier(done))) => {
                    barrier = Some(done);
                    break;
                }
                Ok(None) | Ok(Some(Envelope::End)) => {
                    ended = true;
                    break;
                }
                Err(_) => break,
            }
        }
        gather.inc_by(gathering.elapsed().as_secs_f64());
        health.begin(
            &part,
            format!("a batch of {} messages is not committed yet", batch.len()),
        );
        for report in commit_batch(&store, &batch, policy, &metrics, &health, &part).await? {
            consumer.commit_hint(&report.next_offsets);
        }
        health.done(&part);
        wake.notify_one();
        batch.clear();
        if let Some(done) = barrier {
            let _ = done.send(());
        }
        if ended {
            break;
        }
    }
    Ok(())
}

/// Applies a batch, retrying transient failures. A failure that can be one message's
/// doing (the database refused a value, or a constraint refused a change) splits the batch
/// in two halves applied in turn, down to the one message that fails on its own, which is
/// then dead-lettered as `unstorable`: one bad message never stops the worker nor stalls
/// its partition (rule 10). Returns the report of every transaction that committed, in
/// order.
pub async fn commit_batch(
    store: &Store,
    batch: &[Inbound],
    policy: Policy,
    metrics: &Metrics,
    health: &Health,
    lane_part: &str,
) -> anyhow::Result<Vec<BatchReport>> {
    let mut reports = Vec::new();
    let mut pending: Vec<std::borrow::Cow<'_, [Inbound]>> = vec![batch.into()];
    while let Some(part) = pending.pop() {
        let started = Instant::now();
        match apply_retrying(store, &part, policy, metrics, health, lane_part).await {
            Ok(report) => {
                metrics.observe_batch(&report, part.len(), started.elapsed().as_secs_f64());
                tracing::debug!(
                    messages = part.len(),
                    ledger_entries = report.ledger_total(),
                    alerts = report.alerts,
                    "Committed a batch."
                );
                reports.push(report);
            }
            Err(error) if error.may_be_one_message() && part.len() > 1 => {
                metrics.store_isolations.inc();
                tracing::warn!(
                    error = %error,
                    messages = part.len(),
                    "The database refused the batch; applying it in halves to find the message at fault."
                );
                let (first, second) = part.split_at(part.len() / 2);
                // Last in, first out: the first half is applied first, so the offsets of
                // a partition only move forward.
                pending.push(second.to_vec().into());
                pending.push(first.to_vec().into());
            }
            Err(error) if error.may_be_one_message() && part[0].decoded.is_ok() => {
                let message = &part[0];
                tracing::error!(
                    error = %error,
                    topic = %message.topic,
                    partition = message.partition,
                    offset = message.offset,
                    "The database refused this message on its own; it goes to the dead-letter topic as unstorable."
                );
                let mut letter = message.clone();
                letter.decoded = Err(unstorable(message, &error));
                pending.push(vec![letter].into());
            }
            Err(error) => {
                tracing::error!(error = %error, "The batch broke an invariant; the worker stops.");
                return Err(error.into());
            }
        }
    }
    Ok(reports)
}

/// The rejection of a message the decoder accepted and the database refused.
fn unstorable(message: &Inbound, error: &StoreError) -> crate::codec::Rejection {
    let input = message.decoded.as_ref().ok();
    crate::codec::Rejection {
        reason: "unstorable",
        detail: format!("The database refused this message: {error}."),
        event_id: input.map(|input| input.event_id().to_string()),
        org_id: input
            .and_then(|input| input.org_id())
            .map(ToString::to_string),
    }
}

async fn apply_retrying(
    store: &Store,
    batch: &[Inbound],
    policy: Policy,
    metrics: &Metrics,
    health: &Health,
    part: &str,
) -> Result<BatchReport, StoreError> {
    (|| async { store.apply_batch(batch, policy, Utc::now()).await })
        .retry(retry_policy())
        .when(StoreError::is_transient)
        .notify(|error, pause| {
            metrics.store_retries.with_label_values(&["apply_batch"]).inc();
            health.begin(
                part,
                format!(
                    "a batch of {} messages could not be committed ({error}); retrying",
                    batch.len()
                ),
            );
            tracing::warn!(error = %error, retry_in_ms = pause.as_millis() as u64, "The batch could not be committed; retrying.");
        })
        .await
}

/// Capped exponential backoff, retried for as long as it takes: without the database the
/// worker cannot make progress, and stopping would only move the wait elsewhere.
fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
}

/// Settles validity windows while the worker runs, not only on the next event.
async fn clock_loop(
    store: Store,
    policy: Policy,
    interval: Duration,
    metrics: Metrics,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        match store.settle_due(policy, Utc::now()).await {
            Ok(report)
                if report.ledger_total() == 0
                    && report.alerts == 0
                    && report.warnings.is_empty()
                    && report.states == 0 => {}
            Ok(report) => {
                metrics.clock_entries.inc_by(report.ledger_total());
                metrics.observe_effects(&report);
                wake.notify_one();
            }
            Err(error) => {
                metrics.store_retries.with_label_values(&["clock"]).inc();
                tracing::warn!(error = %error, "The clock could not settle validity windows; it tries again at the next tick.");
            }
        }
    }
}

async fn gauge_loop(store: Store, metrics: Metrics, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(GAUGE_INTERVAL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        if let Ok(open) = store.open_shortfalls().await {
            metrics.open_shortfalls.set(open);
        }
        if let Ok(counts) = store.open_pool_warnings().await {
            for (kind, open) in counts {
                metrics
                    .open_pool_warnings
                    .with_label_values(&[kind])
                    .set(open);
            }
        }
        if let Ok(backlog) = store.outbox_backlog().await {
            metrics.outbox_backlog.set(backlog);
        }
    }
}
