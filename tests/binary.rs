//! The `entitlement-worker` binary against Apache Kafka and PostgreSQL, each its own
//! process: configured by environment variables only, the way users run it.

mod common;

use std::time::Duration;

use common::e2e::{Setup, DEADLINE};
use common::stream::{self, Keys};
use rand::seq::SliceRandom;

/// The worker killed with SIGKILL twice in the middle of the stream, started again right
/// away each time (the dead session is not waited out), ends with exactly the state and
/// the ledger the events demand: nothing lost, nothing doubled, no gap in a ledger
/// sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_and_restarted_ends_as_if_it_never_crashed() {
    let setup = Setup::new().await;
    let scenario = stream::scenario(7, 20);
    let before = setup.deliver_setup(&scenario).await;
    let events: Vec<_> = scenario.events.iter().collect();
    let total = before + stream::produce(&setup.settings, &events, Keys::ByOrganization).await;

    let mut kills = Vec::new();
    let mut threshold = before as i64 + 1;
    for _ in 0..2 {
        let mut worker = setup.start_worker();
        let progress = setup.wait_for_progress(threshold, &worker).await;
        setup.crash(&mut worker);
        let at_kill = stream::applied(&setup.database).await;
        assert!(
            (at_kill as usize) < total,
            "killed mid-stream, not after the end ({at_kill} of {total} applied)"
        );
        kills.push(at_kill);
        threshold = progress + 1;
    }
    let mut worker = setup.start_worker();
    setup.wait_until_done(total, &worker).await;
    let status = worker.terminate(Duration::from_secs(30));
    assert!(status.success(), "SIGTERM exits 0: {status}");
    let ledger_entries = setup.check(&scenario).await;
    eprintln!(
        "{total} messages; killed after {kills:?} were applied; {ledger_entries} ledger entries"
    );
}

/// Every event delivered twice, shuffled across topics and keyed at random, ends in the
/// same state as one clean delivery; the worker answers /healthz and /metrics on the
/// address its environment gives it, and SIGTERM stops it with exit code 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_delivered_twice_shuffled_and_randomly_keyed_end_as_one_clean_delivery() {
    let setup = Setup::new().await;
    let scenario = stream::scenario(11, 4);
    let before = setup.deliver_setup(&scenario).await;
    let mut twice: Vec<_> = scenario.events.iter().chain(&scenario.events).collect();
    twice.shuffle(&mut rand::rng());
    let total = before + stream::produce(&setup.settings, &twice, Keys::Random).await;

    let mut worker = setup.start_worker();
    let (status, _) = common::eventually_or(
        "/healthz to answer 200",
        DEADLINE,
        || async { worker.get("/healthz").filter(|(status, _)| *status == 200) },
        || worker.tail_of_log(),
    )
    .await;
    assert_eq!(status, 200);
    setup.wait_until_done(total, &worker).await;
    let entries = setup.check(&scenario).await;

    let (_, metrics) = worker.get("/metrics").expect("/metrics answers");
    let consumed = common::metric_sum(&metrics, "entitlements_messages_consumed_total");
    assert_eq!(
        consumed as usize,
        total - before,
        "every message this worker consumed counted once"
    );
    let status = worker.terminate(Duration::from_secs(30));
    assert!(status.success(), "SIGTERM exits 0: {status}");
    // How far the topics trailed the database (docs/local-copy.md quotes it).
    for line in metrics
        .lines()
        .filter(|line| line.starts_with("entitlements_publish_delay_seconds"))
    {
        eprintln!("publish-delay {line}");
    }
    eprintln!(
        "fault-summary twice: events={} messages={total} ledger_entries={entries} lost=0 doubled=0",
        scenario.events.len() + scenario.setup.len()
    );
}

/// Secrets given in the configuration (the database password in its URL, a SASL password
/// among the Kafka properties) never show in the logs or the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_the_configuration_stay_out_of_logs_and_metrics() {
    const DATABASE_SECRET: &str = "pw-Zq81x-database-secret";
    const KAFKA_SECRET: &str = "kafka-Vb77-sasl-secret";
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", common::server_url()))
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "DO $$ BEGIN
             IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'worker_secret_test') THEN
                 CREATE ROLE worker_secret_test LOGIN CREATEDB;
             END IF;
         END $$;
         ALTER ROLE worker_secret_test PASSWORD '{DATABASE_SECRET}';"
    ))
    .execute(&admin)
    .await
    .expect("the test role");
    let broker = common::kafka::Kafka::shared();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = common::settings(&broker.brokers);
    broker.create_topics(&settings, 1).await;
    settings.database.url = format!(
        "postgres://worker_secret_test:{DATABASE_SECRET}@127.0.0.1:5432/{}",
        common::unique("secret")
    );
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka.properties]\n\"sasl.username\" = \"worker\"\n\"sasl.password\" = \"{KAFKA_SECRET}\"\n"
        ),
    )
    .unwrap();
    let mut worker = common::process::WorkerProcess::start_with(
        &settings,
        dir.path(),
        &["--config", config.to_str().unwrap()],
    );
    common::eventually_or(
        "/healthz to answer 200",
        DEADLINE,
        || async { worker.get("/healthz").filter(|(status, _)| *status == 200) },
        || worker.tail_of_log(),
    )
    .await;
    let (_, metrics) = worker.get("/metrics").expect("/metrics answers");
    assert!(worker.terminate(Duration::from_secs(30)).success());
    let log = std::fs::read_to_string(&worker.log).unwrap();
    assert!(
        log.contains("worker_secret_test:***@"),
        "the log names the database, without its password:\n{log}"
    );
    for secret in [DATABASE_SECRET, KAFKA_SECRET] {
        assert!(!log.contains(secret), "{secret} leaked into the log");
        assert!(
            !metrics.contains(secret),
            "{secret} leaked into the metrics"
        );
    }
}

/// `snapshot` republishes the whole state: with the worker running, on its state topic
/// (every key again under the version it has, so a consumer's copy is unchanged); then,
/// the worker stopped, on a new state topic (a topic lost, or a consumer that starts
/// afresh), where a copy kept from it is again exactly what `report` shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_gives_a_new_state_topic_what_report_shows() {
    let setup = Setup::new().await;
    let scenario = stream::scenario(13, 3);
    let before = setup.deliver_setup(&scenario).await;
    let events: Vec<_> = scenario.events.iter().collect();
    let total = before + stream::produce(&setup.settings, &events, Keys::ByOrganization).await;
    let mut worker = setup.start_worker();
    setup.wait_until_done(total, &worker).await;
    setup.check(&scenario).await;
    let keys: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pools) + (SELECT count(*) FROM consumption)",
    )
    .fetch_one(&setup.database)
    .await
    .unwrap();
    assert!(keys > 0);
    let ledger_entries: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger")
        .fetch_one(&setup.database)
        .await
        .unwrap();

    let snapshot = |settings: &entitlement_worker::settings::Settings| {
        std::process::Command::new(env!("CARGO_BIN_EXE_entitlement-worker"))
            .arg("snapshot")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(common::process::environment(settings, "127.0.0.1:0"))
            .output()
            .expect("the binary runs")
    };
    let output = snapshot(&setup.settings);
    let said = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{output:?}");
    assert!(said.contains("Every message was published."), "{said}");
    let outputs = stream::Outputs::read(&setup.settings, ledger_entries as usize, DEADLINE);
    let copy =
        common::state_copy::assert_copy_matches_report(&setup.database, outputs.states()).await;
    assert_eq!(
        copy.repeated as i64, keys,
        "every key once more, same version"
    );
    assert!(worker.terminate(Duration::from_secs(30)).success());

    let mut fresh = setup.settings.clone();
    fresh.topics.state = common::unique("state-again");
    common::kafka::Kafka::shared()
        .create_topics(&fresh, 3)
        .await;
    let output = snapshot(&fresh);
    let said = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{output:?}");
    assert!(said.contains("Every message was published."), "{said}");
    let outputs = stream::Outputs::read(&fresh, ledger_entries as usize, DEADLINE);
    assert_eq!(outputs.states.len() as i64, keys, "one message per key");
    let copy =
        common::state_copy::assert_copy_matches_report(&setup.database, outputs.states()).await;
    assert_eq!(copy.repeated, 0);
}
