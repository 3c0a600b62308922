//! The `entitlement-worker` binary against `tansu`, a Kafka-protocol broker running as its
//! own process, and real PostgreSQL: configured by environment variables only, the way
//! users run it.

mod common;

use std::time::Duration;

use common::process::WorkerProcess;
use common::stream::{self, Keys, Outputs};
use common::tansu::Tansu;
use entitlement_worker::settings::Settings;
use sqlx::PgPool;

const DEADLINE: Duration = Duration::from_secs(180);

struct Setup {
    broker: Tansu,
    settings: Settings,
    database: PgPool,
}

async fn setup() -> Setup {
    let broker = Tansu::start();
    let settings = common::settings(&broker.brokers);
    broker.create_topics(&settings, 3).await;
    let database = entitlement_worker::store::Store::connect(&settings.database)
        .await
        .expect("the test database")
        .pool()
        .clone();
    Setup {
        broker,
        settings,
        database,
    }
}

/// Delivers the scenario's setup events and waits for a worker to apply them.
async fn deliver_setup(setup: &Setup, scenario: &stream::Scenario) -> usize {
    let events: Vec<_> = scenario.setup.iter().collect();
    let delivered = stream::produce(&setup.settings, &events, Keys::ByOrganization).await;
    let worker = WorkerProcess::start(&setup.settings, setup.broker.dir.path());
    wait_until_done(&setup.database, delivered, &worker).await;
    let mut worker = worker;
    assert!(worker.terminate(Duration::from_secs(30)).success());
    delivered
}

/// Waits until the worker has applied `total` messages and published its outbox.
async fn wait_until_done(database: &PgPool, total: usize, worker: &WorkerProcess) {
    let total = total as i64;
    common::eventually_or(
        "every message applied and the outbox published",
        DEADLINE,
        || async {
            (stream::applied(database).await == total
                && stream::outbox_backlog(database).await == 0)
                .then_some(())
        },
        || worker.tail_of_log(),
    )
    .await;
}

/// The worker killed with SIGKILL twice in the middle of the stream, started again each
/// time, ends with exactly the state and the ledger the events demand: nothing lost,
/// nothing doubled, no gap in a ledger sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_and_restarted_ends_as_if_it_never_crashed() {
    let setup = setup().await;
    let scenario = stream::scenario(7, 20);
    let before = deliver_setup(&setup, &scenario).await;
    let Setup {
        broker,
        settings,
        database,
    } = setup;
    let events: Vec<_> = scenario.events.iter().collect();
    let total = before + stream::produce(&settings, &events, Keys::ByOrganization).await;

    let mut kills = Vec::new();
    let mut threshold = before as i64 + 1;
    for _ in 0..2 {
        let mut worker = WorkerProcess::start(&settings, broker.dir.path());
        let progress = common::eventually_or(
            "the worker to make progress",
            DEADLINE,
            || async {
                let applied = stream::applied(&database).await;
                (applied >= threshold).then_some(applied)
            },
            || worker.tail_of_log(),
        )
        .await;
        worker.kill();
        let at_kill = stream::applied(&database).await;
        assert!(
            (at_kill as usize) < total,
            "killed mid-stream, not after the end ({at_kill} of {total} applied)"
        );
        kills.push(at_kill);
        threshold = progress + 1;
    }
    let mut worker = WorkerProcess::start(&settings, broker.dir.path());
    wait_until_done(&database, total, &worker).await;
    let status = worker.terminate(Duration::from_secs(30));
    assert!(status.success(), "SIGTERM exits 0: {status}");

    let ledger_entries: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger")
        .fetch_one(&database)
        .await
        .unwrap();
    let outputs = Outputs::read(&settings, ledger_entries as usize, DEADLINE);
    stream::check(&database, &outputs, &scenario.expected).await;
    eprintln!(
        "{total} messages; killed after {kills:?} were applied; {ledger_entries} ledger entries"
    );
}

/// Every event delivered twice, shuffled across topics and keyed at random, ends in the
/// same state as one clean delivery; the worker answers /healthz and /metrics on the
/// address its environment gives it, and SIGTERM stops it with exit code 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_delivered_twice_shuffled_and_randomly_keyed_end_as_one_clean_delivery() {
    let setup = setup().await;
    let scenario = stream::scenario(11, 1);
    let before = deliver_setup(&setup, &scenario).await;
    let Setup {
        broker,
        settings,
        database,
    } = setup;
    let mut twice: Vec<_> = scenario.events.iter().chain(&scenario.events).collect();
    use rand::seq::SliceRandom;
    twice.shuffle(&mut rand::rng());
    let total = before + stream::produce(&settings, &twice, Keys::Random).await;

    let worker = WorkerProcess::start(&settings, broker.dir.path());
    let (status, _) = common::eventually_or(
        "/healthz to answer 200",
        DEADLINE,
        || async { worker.get("/healthz").filter(|(status, _)| *status == 200) },
        || worker.tail_of_log(),
    )
    .await;
    assert_eq!(status, 200);
    wait_until_done(&database, total, &worker).await;

    let ledger_entries: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger")
        .fetch_one(&database)
        .await
        .unwrap();
    let outputs = Outputs::read(&settings, ledger_entries as usize, DEADLINE);
    stream::check(&database, &outputs, &scenario.expected).await;

    let (_, metrics) = worker.get("/metrics").expect("/metrics answers");
    let consumed: f64 = metrics
        .lines()
        .filter(|line| line.starts_with("entitlements_messages_consumed_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        consumed as usize,
        total - before,
        "every message this worker consumed counted once"
    );
    let mut worker = worker;
    let status = worker.terminate(Duration::from_secs(30));
    assert!(status.success(), "SIGTERM exits 0: {status}");
}
