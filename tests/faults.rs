//! The fault matrix: each test injects a real fault while the worker processes a stream,
//! then compares the worker's database and output topics with the outcome the events
//! demand (`common::stream`). Scaled for CI; the environment variables below run the long
//! form by hand:
//!
//! - `FAULT_SCALE` (default 4): participants per workspace, times 75 for the largest;
//! - `FAULT_KILLS` (default 5): SIGKILLs in one run;
//! - `FAULT_TERMINATIONS` (default 10): rounds of `pg_terminate_backend`.
//!
//! Every test prints one `fault-summary` line with the figures `docs/reliability.md` quotes.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::e2e::{Setup, DEADLINE};
use common::stream::{self, Keys};
use rand::Rng;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Small batches: more transactions, so faults land inside more of them.
const FAULT_BATCH: usize = 200;

/// Produces the scenario's events (after its setup has been applied); returns the total
/// number of messages including the setup.
async fn deliver(setup: &Setup, scenario: &stream::Scenario, before: usize) -> usize {
    let events: Vec<_> = scenario.events.iter().collect();
    before + stream::produce(&setup.settings, &events, Keys::ByOrganization).await
}

/// Row: the worker killed with SIGKILL at random points, many times in one run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_many_times_loses_and_doubles_nothing() {
    let kills = knob("FAULT_KILLS", 5);
    let mut setup = Setup::new().await;
    setup.settings.batch.max_messages = FAULT_BATCH;
    // Twice the other rows' stream: on a fast machine the worker applied the rest of the
    // smaller one between the fourth restart and the fifth kill.
    let scenario = stream::scenario(21, knob("FAULT_SCALE", 4) * 10);
    let before = setup.deliver_setup(&scenario).await;
    let total = deliver(&setup, &scenario, before).await;
    let mut points = Vec::new();
    for round in 0..kills {
        let mut worker = setup.start_worker();
        let applied = stream::applied(&setup.database).await;
        // Somewhere in this round's share of what is left.
        let share = ((total as i64 - applied) / (kills - round + 1) as i64).max(1);
        let threshold = applied + rand::rng().random_range(1..=share);
        setup.wait_for_progress(threshold, &worker).await;
        // Into the next batch, wherever it is: reading, deciding, writing or committing.
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..100))).await;
        setup.crash(&mut worker);
        let at_kill = stream::applied(&setup.database).await;
        assert!(
            (at_kill as usize) < total,
            "kill {round} came after the end ({at_kill} of {total}); use a larger FAULT_SCALE"
        );
        points.push(at_kill);
    }
    let mut worker = setup.start_worker();
    setup.wait_until_done(total, &worker).await;
    assert!(worker.terminate(Duration::from_secs(30)).success());
    let entries = setup.check(&scenario).await;
    eprintln!(
        "fault-summary sigkill: faults={kills} messages={total} ledger_entries={entries} \
         killed_at={points:?} lost=0 doubled=0"
    );
}

/// Row: PostgreSQL connections killed with `pg_terminate_backend` mid-batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_terminated_mid_stream_lose_and_double_nothing() {
    let rounds = knob("FAULT_TERMINATIONS", 10);
    let mut setup = Setup::new().await;
    setup.settings.batch.max_messages = FAULT_BATCH;
    let scenario = stream::scenario(22, knob("FAULT_SCALE", 4) * 5);
    let before = setup.deliver_setup(&scenario).await;
    let total = deliver(&setup, &scenario, before).await;
    let database_name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&setup.database)
        .await
        .unwrap();
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", common::server_url()))
        .await
        .unwrap();
    let mut worker = setup.start_worker();
    setup.wait_for_progress(before as i64 + 1, &worker).await;
    // A round terminates every session the worker holds on its database (the test's own
    // pool is on the same database: keep it by excluding the sessions it marks). Only a
    // round that finds a session inside a transaction, while messages are still
    // unapplied, interrupts the worker's work; rounds go on until `rounds` of them did,
    // or the stream is applied. Sessions idle in the pool are replaced without an error.
    let mut terminated = 0;
    let mut during_stream = 0;
    let mut in_transaction = 0;
    while during_stream < rounds && (stream::applied(&setup.database).await as usize) < total {
        let (killed, busy): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE busy) FROM (
                 SELECT pg_terminate_backend(pid), xact_start IS NOT NULL AS busy
                   FROM pg_stat_activity
                  WHERE datname = $1 AND pid <> pg_backend_pid()
                    AND application_name <> 'entitlement-tests'
             ) AS terminated",
        )
        .bind(&database_name)
        .fetch_one(&admin)
        .await
        .unwrap();
        terminated += killed;
        in_transaction += busy;
        if busy > 0 {
            during_stream += 1;
        }
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(5..60))).await;
    }
    setup.wait_until_done(total, &worker).await;
    let (_, metrics) = worker.get("/metrics").expect("/metrics answers");
    let retries = common::metric_sum(&metrics, "entitlements_store_retries_total")
        + common::metric_sum(&metrics, "entitlements_publish_errors_total");
    assert!(worker.terminate(Duration::from_secs(30)).success());
    let entries = setup.check(&scenario).await;
    assert!(
        in_transaction > 0,
        "no session was terminated inside a transaction before the stream was applied \
         ({terminated} idle ones were); use a larger FAULT_SCALE"
    );
    assert!(retries > 0.0, "the metrics show the retries:\n{metrics}");
    eprintln!(
        "fault-summary pg_terminate_backend: rounds_mid_stream={during_stream} of {rounds} \
         sessions_terminated={terminated} in_transaction={in_transaction} \
         retries_in_metrics={retries} messages={total} ledger_entries={entries} lost=0 doubled=0"
    );
}

/// Row: two and three workers in one consumer group, joining and leaving, with the
/// classic group protocol (librdkafka's default, eager `range` assignment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_joining_and_leaving_one_group_transfer_nothing_twice() {
    membership_changes("classic").await;
}

/// Row: the same with KIP-848's protocol (`group.protocol=consumer`): the broker assigns
/// the partitions, incrementally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_joining_and_leaving_a_kip_848_group_transfer_nothing_twice() {
    membership_changes("consumer").await;
}

/// Three workers join while the stream flows; one crashes (SIGKILL), one leaves politely
/// (SIGTERM) right after, and the third finishes alone.
async fn membership_changes(protocol: &str) {
    let mut setup = Setup::new().await;
    setup.settings.batch.max_messages = FAULT_BATCH;
    setup
        .settings
        .kafka
        .properties
        .insert("group.protocol".into(), protocol.into());
    let scenario = stream::scenario(23, knob("FAULT_SCALE", 4) * 5);
    let before = setup.deliver_setup(&scenario).await;
    // The stream goes out in five parts; each change of membership happens right after a
    // part is produced, while it is being consumed.
    let events: Vec<_> = scenario.events.iter().collect();
    let parts: Vec<_> = events.chunks(events.len().div_ceil(5)).collect();
    let mut total = before;
    let mut produce = async |part: &[&stream::Event]| {
        total += stream::produce(&setup.settings, part, Keys::ByOrganization).await;
        total
    };
    let mut first = setup.start_worker();
    produce(parts[0]).await;
    setup.wait_for_progress(before as i64 + 1, &first).await;
    produce(parts[1]).await;
    let mut second = setup.start_worker();
    produce(parts[2]).await;
    let mut third = setup.start_worker();
    let third_joined_at = produce(parts[3]).await;
    let total = produce(parts[4]).await;
    second.kill();
    let at_second_killed = stream::applied(&setup.database).await;
    assert!(first.terminate(Duration::from_secs(30)).success());
    let at_first_left = stream::applied(&setup.database).await;
    setup.wait_until_done(total, &third).await;
    let (_, metrics) = third.get("/metrics").expect("/metrics answers");
    let skipped = common::metric_sum(&metrics, "entitlements_redelivered_messages_total");
    assert!(third.terminate(Duration::from_secs(30)).success());
    let entries = setup.check(&scenario).await;
    assert!(
        (at_second_killed as usize) < total,
        "the second worker was killed mid-stream ({at_second_killed} of {total})"
    );
    eprintln!(
        "fault-summary group-{protocol}: workers=3 joins=3 leaves=2 messages={total} \
         produced_when_third_joined={third_joined_at} applied_when_first_left={at_first_left} \
         applied_when_second_killed={at_second_killed} redelivered_and_skipped_by_last={skipped} \
         ledger_entries={entries} lost=0 doubled=0"
    );
}

/// A broker of the test's own, the scenario `seed`'s setup applied and the first half of
/// its stream produced, and a worker that has begun on it. Returns the setup, the
/// scenario, the second half (to produce during the fault), the messages produced so far
/// and the worker.
async fn own_broker_half_streamed(
    seed: u64,
) -> (
    Setup,
    stream::Scenario,
    Vec<stream::Event>,
    usize,
    common::process::WorkerProcess,
) {
    let mut setup = Setup::own_broker().await;
    setup.settings.batch.max_messages = FAULT_BATCH;
    let scenario = stream::scenario(seed, knob("FAULT_SCALE", 4) * 5);
    let before = setup.deliver_setup(&scenario).await;
    let (first_half, second_half) = scenario.events.split_at(scenario.events.len() / 2);
    let first_half: Vec<_> = first_half.iter().collect();
    let first = before + stream::produce(&setup.settings, &first_half, Keys::ByOrganization).await;
    let second_half = second_half.to_vec();
    let worker = setup.start_worker();
    setup.wait_for_progress(before as i64 + 1, &worker).await;
    (setup, scenario, second_half, first, worker)
}

/// Row: Apache Kafka killed with SIGKILL mid-stream and started again on the same
/// storage, the platform producing the second half of the stream while it is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_killed_and_restarted_on_its_storage_loses_and_doubles_nothing() {
    let (mut setup, scenario, second_half, first, mut worker) = own_broker_half_streamed(28).await;
    tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..100))).await;
    setup.broker.own().kill();
    let at_kill = stream::applied(&setup.database).await;
    let held = spawn_producer(&setup, &second_half.iter().collect::<Vec<_>>());
    setup.broker.own().restart();
    let total = first + held.await.expect("the held messages are delivered");
    setup.wait_until_done(total, &worker).await;
    assert!(worker.terminate(Duration::from_secs(30)).success());
    let entries = setup.check(&scenario).await;
    assert!(
        (at_kill as usize) < total,
        "the broker was killed mid-stream ({at_kill} of {total})"
    );
    eprintln!(
        "fault-summary broker_sigkill: messages={total} applied_at_kill={at_kill} \
         produced_before_kill={first} ledger_entries={entries} lost=0 doubled=0"
    );
}

/// Row: Apache Kafka frozen with SIGSTOP for 30 s mid-stream, then resumed, the platform
/// producing the second half of the stream meanwhile: every group session the broker
/// held has expired by the time it resumes, so the group forms again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_frozen_for_30_seconds_loses_and_doubles_nothing() {
    const FROZEN: Duration = Duration::from_secs(30);
    let (mut setup, scenario, second_half, first, mut worker) = own_broker_half_streamed(29).await;
    setup.broker.own().freeze();
    let at_freeze = stream::applied(&setup.database).await;
    let backlog_at_freeze = stream::outbox_backlog(&setup.database).await;
    let held = spawn_producer(&setup, &second_half.iter().collect::<Vec<_>>());
    // The fault is the freeze's length itself, not a wait for something to happen.
    tokio::time::sleep(FROZEN).await;
    let at_thaw = stream::applied(&setup.database).await;
    let backlog_at_thaw = stream::outbox_backlog(&setup.database).await;
    setup.broker.own().thaw();
    let total = first + held.await.expect("the held messages are delivered");
    setup.wait_until_done(total, &worker).await;
    let (_, metrics) = worker.get("/metrics").expect("/metrics answers");
    assert!(worker.terminate(Duration::from_secs(30)).success());
    let entries = setup.check(&scenario).await;
    assert!(
        at_thaw as usize <= first,
        "nothing produced during the freeze was applied during it ({at_thaw} applied, {first} produced before)"
    );
    let publish_errors = common::metric_sum(&metrics, "entitlements_publish_errors_total");
    eprintln!(
        "fault-summary broker_sigstop: frozen_s={} messages={total} produced_before_freeze={first} \
         applied_at_freeze={at_freeze} applied_at_thaw={at_thaw} outbox_at_freeze={backlog_at_freeze} \
         outbox_at_thaw={backlog_at_thaw} publish_errors_in_metrics={publish_errors} \
         ledger_entries={entries} lost=0 doubled=0",
        FROZEN.as_secs()
    );
}

/// Row: PostgreSQL itself restarted (`pg_ctlcluster ... restart`) mid-batch, twice in one
/// run. The restart takes every session of the server, so this test runs alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_twice_mid_stream_loses_and_doubles_nothing() {
    let mut setup = Setup::exclusive().await;
    setup.settings.batch.max_messages = FAULT_BATCH;
    let scenario = stream::scenario(30, knob("FAULT_SCALE", 4) * 5);
    let before = setup.deliver_setup(&scenario).await;
    let mut worker = setup.start_worker();
    let hold = Arc::new(AtomicBool::new(true));
    let producer = paced_producer(&setup, before, &scenario.events, 40, hold.clone());
    let expected = before + scenario.events.len();
    let database_name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&setup.database)
        .await
        .unwrap();
    let retries = |worker: &common::process::WorkerProcess| {
        let (_, metrics) = worker.get("/metrics").expect("/metrics answers");
        common::metric_sum(&metrics, "entitlements_store_retries_total")
            + common::metric_sum(&metrics, "entitlements_publish_errors_total")
    };
    // From a quarter of the stream on, each restart comes while a worker's batch is open
    // and waiting, mid-transaction, on a lock this test holds on `processed_events` (a
    // batch records its events there after its other writes), so the restart certainly
    // takes an open batch with it.
    setup
        .wait_for_progress((before + scenario.events.len() / 4) as i64, &worker)
        .await;
    let mut restarted_at = Vec::new();
    for restart in 1..=2 {
        let mut blocker = setup.database.begin().await.expect("a transaction begins");
        sqlx::query("LOCK TABLE processed_events IN SHARE MODE")
            .execute(&mut *blocker)
            .await
            .expect("the test takes its lock");
        common::eventually("a worker's batch to wait on the lock", DEADLINE, || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = $1 AND backend_type = 'client backend'
                    AND wait_event_type = 'Lock' AND xact_start IS NOT NULL
                    AND application_name <> 'entitlement-tests'",
            )
            .bind(&database_name)
            .fetch_one(&setup.database)
            .await
            .unwrap_or(0);
            (waiting > 0).then_some(())
        })
        .await;
        let retries_before = retries(&worker);
        let at_restart = stream::applied(&setup.database).await;
        restart_postgres();
        drop(blocker);
        assert!(
            (at_restart as usize) < expected,
            "PostgreSQL restarted mid-stream ({at_restart} of {expected})"
        );
        restarted_at.push(at_restart);
        setup.wait_for_progress(at_restart + 1, &worker).await;
        assert!(
            retries(&worker) > retries_before,
            "restart {restart} took an open batch, and the worker retried it"
        );
    }
    hold.store(false, Ordering::SeqCst);
    let total = before + producer.await.expect("the stream is produced");
    setup.wait_until_done(total, &worker).await;
    let (_, metrics) = worker.get("/metrics").expect("/metrics answers");
    let retries = common::metric_sum(&metrics, "entitlements_store_retries_total")
        + common::metric_sum(&metrics, "entitlements_publish_errors_total");
    assert!(worker.terminate(Duration::from_secs(30)).success());
    let entries = setup.check(&scenario).await;
    eprintln!(
        "fault-summary postgres_restart: restarts={} \
         restarted_at={restarted_at:?} retries_in_metrics={retries} messages={total} \
         ledger_entries={entries} lost=0 doubled=0",
        restarted_at.len()
    );
}

/// Restarts the test server's PostgreSQL cluster and waits until it takes connections.
fn restart_postgres() {
    let clusters = std::process::Command::new("pg_lsclusters")
        .arg("-h")
        .output()
        .expect("pg_lsclusters runs");
    let listing = String::from_utf8_lossy(&clusters.stdout);
    let (version, name) = listing
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.len() > 3 && fields[2] == "5432")
        .map(|fields| (fields[0].to_owned(), fields[1].to_owned()))
        .expect("the cluster on port 5432");
    let status = std::process::Command::new("pg_ctlcluster")
        .args([&version, &name, "restart"])
        .status()
        .expect("pg_ctlcluster runs");
    assert!(status.success(), "pg_ctlcluster {version} {name} restart");
}

/// Produces `events` in `chunks` steps from a task of its own, each once the worker applied
/// the one before, so that the worker keeps opening transactions. The last fifth goes one
/// event at a time until `hold` is cleared, so the stream cannot end while a test still
/// needs it running. Returns how many went out.
fn paced_producer(
    setup: &Setup,
    before: usize,
    events: &[stream::Event],
    chunks: usize,
    hold: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    let settings = setup.settings.clone();
    let database = setup.database.clone();
    let events = events.to_vec();
    tokio::spawn(async move {
        let mut produced = before;
        let (steady, trickle) = events.split_at(events.len() - events.len() / 5);
        let mut rest = trickle;
        let steps = steady
            .chunks(steady.len().div_ceil(chunks).max(1))
            .map(|chunk| chunk.iter().collect::<Vec<_>>())
            .chain(std::iter::from_fn(|| {
                if rest.is_empty() {
                    return None;
                }
                let take = if hold.load(Ordering::SeqCst) {
                    1
                } else {
                    rest.len()
                };
                let (step, later) = rest.split_at(take);
                rest = later;
                Some(step.iter().collect())
            }));
        for step in steps {
            produced += stream::produce(&settings, &step, Keys::ByOrganization).await;
            common::eventually(
                "the worker to apply what was produced",
                common::e2e::DEADLINE,
                || async { (stream::applied(&database).await >= produced as i64).then_some(()) },
            )
            .await;
        }
        produced - before
    })
}

/// Produces `events` from a task of its own: its producer holds them while the broker is
/// away. Returns how many went out.
fn spawn_producer(setup: &Setup, events: &[&stream::Event]) -> tokio::task::JoinHandle<usize> {
    let settings = setup.settings.clone();
    let events: Vec<stream::Event> = events.iter().map(|&event| event.clone()).collect();
    tokio::spawn(async move {
        let events: Vec<_> = events.iter().collect();
        stream::produce(&settings, &events, Keys::ByOrganization).await
    })
}

/// Row: input the broker no longer holds when the worker comes back (retention deleted
/// it while no worker ran) is never skipped silently: the worker resumes at the log's
/// new start and counts, per topic, exactly the offsets it never received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_deleted_before_it_was_consumed_is_counted_as_skipped() {
    use entitlement_worker::codec::InputKind;
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

    let setup = Setup::new().await;
    let scenario = stream::scenario(31, 2);
    let added: Vec<&stream::Event> = scenario
        .events
        .iter()
        .filter(|event| event.kind == InputKind::ParticipantAdded)
        .collect();
    let (first, rest) = added.split_at(added.len() / 2);
    let mut total = stream::produce(&setup.settings, first, Keys::ByOrganization).await;
    let worker = setup.start_in_process().await;
    setup.wait_until_done_or(total, String::new).await;
    worker.stop().await;
    total += stream::produce(&setup.settings, rest, Keys::ByOrganization).await;
    // While no worker runs, the oldest unconsumed half of each partition's new messages
    // is deleted, as retention would.
    let topic = setup.settings.topics.participant_added.clone();
    let stored: Vec<(i32, i64)> =
        sqlx::query_as("SELECT partition, next_offset FROM consumer_offsets WHERE topic = $1")
            .bind(&topic)
            .fetch_all(&setup.database)
            .await
            .unwrap();
    let reader: BaseConsumer = stream::client_config(&setup.settings).create().unwrap();
    let mut cut = TopicPartitionList::new();
    let mut expected_skipped = 0;
    for (partition, next) in &stored {
        let (_, high) = reader
            .fetch_watermarks(&topic, *partition, Duration::from_secs(10))
            .unwrap();
        let to = next + (high - next) / 2;
        if to > *next {
            cut.add_partition_offset(&topic, *partition, Offset::Offset(to))
                .unwrap();
            expected_skipped += to - next;
        }
    }
    assert!(expected_skipped > 0, "some unconsumed input is deleted");
    let admin: AdminClient<DefaultClientContext> =
        stream::client_config(&setup.settings).create().unwrap();
    admin
        .delete_records(&cut, &AdminOptions::new())
        .await
        .expect("the records are deleted");
    let worker = setup.start_in_process().await;
    setup.wait_until_done_or(total, String::new).await;
    let metrics = worker.started.metrics.render();
    worker.stop().await;
    let skipped = common::metric_sum(&metrics, "entitlements_input_offsets_skipped_total");
    assert_eq!(
        skipped as i64, expected_skipped,
        "every deleted offset counted, nothing else:\n{metrics}"
    );
    eprintln!(
        "fault-summary skipped: messages={total} deleted_before_consumed={expected_skipped} \
         counted_as_skipped={skipped}"
    );
}

/// Row: the broker unreachable for a while (the mock cluster's broker taken down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_down_for_a_while_then_back_loses_and_doubles_nothing() {
    let mut setup = Setup::mock().await;
    setup.settings.batch.max_messages = FAULT_BATCH;
    let scenario = stream::scenario(24, knob("FAULT_SCALE", 4));
    let setup_events: Vec<_> = scenario.setup.iter().collect();
    let before = stream::produce(&setup.settings, &setup_events, Keys::ByOrganization).await;
    let worker = setup.start_in_process().await;
    setup.wait_until_done_or(before, String::new).await;
    let events: Vec<_> = scenario.events.iter().collect();
    let (first_half, second_half) = events.split_at(events.len() / 2);
    let first = before + stream::produce(&setup.settings, first_half, Keys::ByOrganization).await;
    setup.wait_for_progress_in_process(before as i64 + 1).await;
    setup.broker.mock().broker_down(1).expect("broker down");
    // The platform goes on producing during the outage: its producer holds the second
    // half until the broker is back.
    let held = spawn_producer(&setup, second_half);
    let at_down = stream::applied(&setup.database).await;
    let mut progress = Vec::new();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        progress.push(stream::applied(&setup.database).await);
    }
    let settled = *progress.last().unwrap();
    // Whatever was fetched before the outage is applied with its offsets, nothing else.
    assert!(
        settled as usize <= first,
        "nothing produced during the outage was applied during it"
    );
    assert_eq!(
        progress[12..].iter().min(),
        progress[12..].iter().max(),
        "no progress without the broker once what was fetched is done: {progress:?}"
    );
    let health_while_down = worker.started.health.is_consuming();
    setup.broker.mock().broker_up(1).expect("broker up");
    let total = first + held.await.expect("the held messages are delivered");
    setup.wait_until_done_or(total, String::new).await;
    worker.stop().await;
    let entries = setup.check(&scenario).await;
    eprintln!(
        "fault-summary broker_down: outages=1 outage_ms=5000 messages={total} \
         produced_before_outage={first} applied_at_down={at_down} applied_after_5s_down={settled} \
         healthy_while_down={health_while_down} ledger_entries={entries} lost=0 doubled=0"
    );
}

/// The mock cluster with the scenario `seed`'s setup applied by a worker that then
/// stopped, and its stream produced, waiting for the next worker; returns the total of
/// messages. The module grant that manual transfers need is applied first (the scenario's
/// rule: a request that finds the pool empty is refused, so its order would matter).
async fn mock_with_stream_waiting(seed: u64) -> (Setup, stream::Scenario, usize) {
    let mut setup = Setup::mock().await;
    setup.settings.batch.max_messages = FAULT_BATCH;
    let scenario = stream::scenario(seed, knob("FAULT_SCALE", 4));
    let setup_events: Vec<_> = scenario.setup.iter().collect();
    let before = stream::produce(&setup.settings, &setup_events, Keys::ByOrganization).await;
    let first = setup.start_in_process().await;
    setup.wait_until_done_or(before, String::new).await;
    first.stop().await;
    let total = deliver(&setup, &scenario, before).await;
    (setup, scenario, total)
}

/// Row: the outbox publisher failing for a while (every produce request refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_publisher_failing_for_a_while_keeps_the_effects_and_publishes_later() {
    let (setup, scenario, total) = mock_with_stream_waiting(25).await;
    // The inputs are in; from now on every produce request fails for a while.
    let errors = 300;
    setup.broker.mock().request_errors(
        RDKafkaApiKey::Produce,
        &vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; errors],
    );
    let worker = setup.start_in_process().await;
    // Everything is applied and committed while nothing can be published.
    let backlog = common::eventually(
        "every message applied while the outbox waits",
        common::e2e::DEADLINE,
        || async {
            let applied = stream::applied(&setup.database).await as usize;
            let backlog = stream::outbox_backlog(&setup.database).await;
            (applied == total && backlog > 0).then_some(backlog)
        },
    )
    .await;
    let ledger_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger")
        .fetch_one(&setup.database)
        .await
        .unwrap();
    assert!(ledger_rows > 0, "the effects are committed");
    setup
        .broker
        .mock()
        .clear_request_errors(RDKafkaApiKey::Produce);
    setup.wait_until_done_or(total, String::new).await;
    let metrics = worker.started.metrics.render();
    worker.stop().await;
    let entries = setup.check(&scenario).await;
    let publish_errors = common::metric_sum(&metrics, "entitlements_publish_errors_total");
    eprintln!(
        "fault-summary outbox: produce_errors_injected={errors} messages={total} \
         outbox_backlog_while_failing={backlog} publish_errors_in_metrics={publish_errors} \
         ledger_entries={entries} lost=0 doubled=0"
    );
}

/// Row: the broker refusing produce requests for good now and then (errors the producer
/// does not retry by itself), while the ledger flows. Each refusal fails its messages
/// back to the relay, which sends them again; the ledger topic stays in order per
/// organization (`stream::check`) and nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_refusing_messages_for_good_keeps_each_ledger_in_order() {
    let (setup, scenario, total) = mock_with_stream_waiting(27).await;
    // Every fourth produce request of the next 400 is refused with an error the producer
    // takes as final.
    let refusals = 100;
    let pattern: Vec<RDKafkaRespErr> = (0..4 * refusals)
        .map(|request| {
            if request % 4 == 3 {
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD
            } else {
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
            }
        })
        .collect();
    setup
        .broker
        .mock()
        .request_errors(RDKafkaApiKey::Produce, &pattern);
    let worker = setup.start_in_process().await;
    setup.wait_until_done_or(total, String::new).await;
    let metrics = worker.started.metrics.render();
    worker.stop().await;
    let entries = setup.check(&scenario).await;
    let publish_errors = common::metric_sum(&metrics, "entitlements_publish_errors_total");
    assert!(
        publish_errors > 0.0,
        "the refusals reached the relay (publish errors {publish_errors})"
    );
    eprintln!(
        "fault-summary refusals: refused_requests_injected={refusals} messages={total} \
         publish_errors_in_metrics={publish_errors} ledger_entries={entries} \
         ledger_in_order=true lost=0 doubled=0"
    );
}

/// A message for the poison test: topic, payload (none: a tombstone), and the reason
/// expected on the dead-letter topic (none: accepted).
type Case = (String, Option<Vec<u8>>, Option<&'static str>);

/// Rows: poison input, and input crafted to cross tenants, skip the role check or smuggle
/// SQL. Each bad message lands on the dead-letter topic with its reason and its exact
/// position; nothing it names changes; the good events around them are all applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_and_hostile_input_goes_to_the_dead_letter_topic_and_changes_nothing() {
    use entitlement_worker::codec::InputKind::*;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use serde_json::json;

    let setup = Setup::mock().await;
    let topics = setup.settings.topics.clone();
    let topic = |kind| stream::topic_of(&topics, kind).to_owned();
    let at = "2026-01-01T09:00:00Z";
    let evil_org = "acme'; DROP TABLE ledger; --";
    let evil_workspace = "w' OR '1'='1";
    let evil_participant = "p\"); DELETE FROM pools; --";
    let mut huge = br#"{"event_id":"big","pad":""#.to_vec();
    huge.resize(64 * 1024 + 1, b'x');
    let deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
    let participant = |id: &str, field: &str, value: serde_json::Value| {
        let mut event = json!({"event_id": id, "occurred_at": at, "org_id": "acme",
                               "workspace_id": "summit", "participant_id": "p1"});
        event[field] = value;
        event.to_string().into_bytes()
    };
    let granted = |id: &str, field: &str, value: serde_json::Value| {
        let mut event = json!({"event_id": id, "occurred_at": at, "org_id": "acme",
                               "product": "seat", "quantity": 1});
        event[field] = value;
        event.to_string().into_bytes()
    };
    // (topic, payload, the reason expected on the dead-letter topic, or None if accepted)
    let cases: Vec<Case> = vec![
        (topic(ParticipantAdded), Some(b"this is not json".to_vec()), Some("invalid_json")),
        (topic(ParticipantAdded), Some(b"\xff\xfe\x00".to_vec()), Some("invalid_encoding")),
        (topic(ParticipantAdded), Some(huge), Some("too_large")),
        (topic(ParticipantAdded), None, Some("invalid_json")),
        (topic(ParticipantAdded), Some(deep.into_bytes()), Some("invalid_json")),
        (topic(ParticipantAdded), Some(b"[1, 2]".to_vec()), Some("schema_violation")),
        (topic(ParticipantAdded), Some(b"{}".to_vec()), Some("schema_violation")),
        (topic(ParticipantAdded), Some(participant("x1", "occurred_at", json!("10000-01-01T00:00:00Z"))), Some("schema_violation")),
        (topic(ParticipantAdded), Some(participant("x2", "occurred_at", json!("1969-12-31T23:59:59Z"))), Some("schema_violation")),
        (topic(ParticipantAdded), Some(participant("x3", "occurred_at", json!("yesterday"))), Some("schema_violation")),
        (topic(ParticipantAdded), Some(participant("x4", "workspace_id", json!("w".repeat(129)))), Some("schema_violation")),
        (topic(ParticipantAdded), Some(participant("x5", "participant_id", json!(""))), Some("schema_violation")),
        (topic(ParticipantCancelled), Some(participant("x6", "activated", json!("yes"))), Some("schema_violation")),
        (topic(EntitlementGranted), Some(granted("x7", "quantity", json!(0))), Some("schema_violation")),
        (topic(EntitlementGranted), Some(granted("x8", "quantity", json!(1_000_001))), Some("schema_violation")),
        (topic(EntitlementGranted), Some(granted("x9", "quantity", json!(1.5))), Some("schema_violation")),
        (topic(EntitlementGranted), Some(granted("x10", "quantity", json!(-3))), Some("schema_violation")),
        (topic(EntitlementGranted), Some(granted("x11", "product", json!("Seat!"))), Some("schema_violation")),
        (topic(EntitlementGranted), Some(granted("x12", "expires_at", json!("2025-01-01T00:00:00Z"))), Some("schema_violation")),
        (topic(EntitlementGranted), Some(granted("x13", "source", json!({"kind": "gift", "reference": "r"}))), Some("schema_violation")),
        (topic(ModuleEnabled), Some(json!({"event_id": "x14", "occurred_at": at, "org_id": "acme", "workspace_id": "summit", "module": "seat"}).to_string().into_bytes()), Some("schema_violation")),
        // What the decoder once passed and PostgreSQL refused or mis-ordered (rule 10):
        // text with NUL, a window shorter than a microsecond, an event from 2999; the
        // first message here (not JSON) also has a NUL byte in its Kafka key.
        (topic(ParticipantAdded), Some(participant("x15", "participant_id", json!("p\u{0}1"))), Some("schema_violation")),
        (topic(EntitlementGranted), Some(granted("x16", "source", json!({"kind": "plan", "reference": "pro\u{0}"}))), Some("schema_violation")),
        (topic(EntitlementGranted), Some(json!({"event_id": "x17", "occurred_at": at, "org_id": "acme", "product": "seat", "quantity": 1, "valid_from": "2026-06-01T00:00:00.000000100Z", "expires_at": "2026-06-01T00:00:00.000000900Z"}).to_string().into_bytes()), Some("schema_violation")),
        (topic(ParticipantCancelled), Some(json!({"event_id": "x18", "occurred_at": "2999-01-01T00:00:00Z", "org_id": "acme", "workspace_id": "summit", "participant_id": "p1", "activated": false}).to_string().into_bytes()), Some("clock_skew")),
        (topic(TransferRequested), Some(json!({"event_id": "x19", "occurred_at": at, "org_id": "acme", "workspace_id": "summit", "product": "seat", "quantity": 1, "requested_by": {"user_id": "mia", "role": "entitlement_manager\u{0}"}}).to_string().into_bytes()), Some("schema_violation")),
        // Good events, with identifiers crafted as SQL: stored as the strings they are.
        (topic(EntitlementGranted), Some(json!({"event_id": "g-evil", "occurred_at": at, "org_id": evil_org, "product": "seat", "quantity": 2}).to_string().into_bytes()), None),
        (topic(ParticipantAdded), Some(json!({"event_id": "a-evil", "occurred_at": at, "org_id": evil_org, "workspace_id": evil_workspace, "participant_id": evil_participant}).to_string().into_bytes()), None),
        (topic(EntitlementGranted), Some(granted("g-acme", "quantity", json!(5))), None),
        (topic(ParticipantAdded), Some(participant("a-acme", "participant_id", json!("p1"))), None),
        // Another organization naming acme's workspace; a viewer moving seats; a module
        // nobody bought, moved by the manager.
        (topic(ParticipantAdded), Some(json!({"event_id": "a-globex", "occurred_at": at, "org_id": "globex", "workspace_id": "summit", "participant_id": "spy"}).to_string().into_bytes()), Some("tenant_mismatch")),
        (topic(TransferRequested), Some(json!({"event_id": "t-viewer", "occurred_at": at, "org_id": "acme", "workspace_id": "summit", "product": "seat", "quantity": 3, "requested_by": {"user_id": "vic", "role": "viewer"}}).to_string().into_bytes()), Some("forbidden")),
        (topic(TransferRequested), Some(json!({"event_id": "t-none", "occurred_at": at, "org_id": "acme", "workspace_id": "summit", "product": "holograms", "quantity": 1, "requested_by": {"user_id": "mia", "role": "entitlement_manager"}}).to_string().into_bytes()), Some("insufficient_pool")),
        (topic(TransferRequested), Some(json!({"event_id": "t-role-case", "occurred_at": at, "org_id": "acme", "workspace_id": "summit", "product": "seat", "quantity": 1, "requested_by": {"user_id": "eve", "role": "Entitlement_Manager"}}).to_string().into_bytes()), Some("forbidden")),
    ];
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &setup.settings.kafka.brokers)
        .create()
        .expect("a producer");
    let mut expected = std::collections::BTreeMap::new();
    for (index, (topic, payload, reason)) in cases.iter().enumerate() {
        let key = if index == 0 { "ac\0me" } else { "acme" };
        let mut record = FutureRecord::<str, [u8]>::to(topic).key(key);
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        let delivery = producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("the broker took the message");
        if let Some(reason) = reason {
            expected.insert(
                (topic.clone(), delivery.partition, delivery.offset),
                *reason,
            );
        }
    }
    let worker = setup.start_in_process().await;
    setup.wait_until_done_or(cases.len(), String::new).await;
    let metrics = worker.started.metrics.render();
    worker.stop().await;

    let ledger_entries: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger")
        .fetch_one(&setup.database)
        .await
        .unwrap();
    let outputs = stream::Outputs::read(
        &setup.settings,
        ledger_entries as usize,
        common::e2e::DEADLINE,
    );
    let letters: std::collections::BTreeMap<_, _> = outputs
        .dead_letters
        .iter()
        .map(|letter| {
            (
                (
                    letter["topic"].as_str().unwrap().to_owned(),
                    letter["partition"].as_i64().unwrap() as i32,
                    letter["offset"].as_i64().unwrap(),
                ),
                letter["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        letters, expected,
        "each bad message at its position, with its reason"
    );
    let letter_of = |offset_reason: &str| {
        outputs
            .dead_letters
            .iter()
            .find(|letter| letter["reason"] == offset_reason)
            .unwrap()
    };
    assert_eq!(letter_of("invalid_encoding")["payload_encoding"], "base64");
    assert_eq!(letter_of("invalid_encoding")["payload"], "//4A");
    // An oversized input is kept up to the input limit, with its size and digest.
    let too_large = letter_of("too_large");
    assert_eq!(too_large["payload"].as_str().unwrap().len(), 64 * 1024);
    assert_eq!(too_large["payload_bytes"], 64 * 1024 + 1);
    assert_eq!(too_large["payload_truncated"], true);

    // The hostile identifiers are data: stored verbatim, the tables intact.
    let (org, workspace, available): (String, String, i64) = sqlx::query_as(
        "SELECT p.org_id, c.workspace_id, p.available FROM pools p
         JOIN consumption c ON c.org_id = p.org_id AND c.product = p.product
         WHERE p.org_id = $1",
    )
    .bind(evil_org)
    .fetch_one(&setup.database)
    .await
    .expect("the crafted organization's pool and workspace");
    assert_eq!(
        (org.as_str(), workspace.as_str(), available),
        (evil_org, evil_workspace, 1)
    );
    let pools: i64 = sqlx::query_scalar("SELECT count(*) FROM pools")
        .fetch_one(&setup.database)
        .await
        .unwrap();
    assert!(pools >= 2, "no pool was deleted");
    // acme: 5 granted, 1 moved to summit by p1; the viewer and the spy changed nothing.
    let (available,): (i64,) =
        sqlx::query_as("SELECT available FROM pools WHERE org_id = 'acme' AND product = 'seat'")
            .fetch_one(&setup.database)
            .await
            .unwrap();
    assert_eq!(available, 4);
    let globex: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pools WHERE org_id = 'globex')
              + (SELECT count(*) FROM consumption WHERE org_id = 'globex')
              + (SELECT count(*) FROM ledger WHERE org_id = 'globex')
              + (SELECT count(*) FROM workspaces WHERE org_id = 'globex')",
    )
    .fetch_one(&setup.database)
    .await
    .unwrap();
    assert_eq!(
        globex, 0,
        "the other organization got nothing and paid nothing"
    );
    let (summit_required,): (i64,) = sqlx::query_as(
        "SELECT required FROM consumption WHERE workspace_id = 'summit' AND product = 'seat'",
    )
    .fetch_one(&setup.database)
    .await
    .unwrap();
    assert_eq!(summit_required, 1, "the spy is not counted");
    let rejected = common::metric_sum(&metrics, "entitlements_messages_rejected_total");
    assert_eq!(rejected as usize, expected.len(), "every rejection counted");
    eprintln!(
        "fault-summary poison: bad_messages={} good_messages={} dead_letters={} \
         tables_intact=true lost=0",
        expected.len(),
        cases.len() - expected.len(),
        outputs.dead_letters.len()
    );
}
