//! End-to-end fixtures: a tansu broker with the worker's topics, a test database, the
//! scenario's setup delivered, and the final comparison with what the events demand.

use std::time::Duration;

use entitlement_worker::pipeline::{self, Started};
use entitlement_worker::settings::Settings;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::process::WorkerProcess;
use super::stream::{self, Keys, Outputs, Scenario};
use super::tansu::Tansu;

pub const DEADLINE: Duration = Duration::from_secs(180);

/// A Kafka-protocol broker: tansu in its own process, or librdkafka's mock cluster in
/// this one (for faults only it can inject).
pub enum Broker {
    Tansu(Tansu),
    Mock(MockCluster<'static, DefaultProducerContext>),
}

impl Broker {
    pub fn mock(&self) -> &MockCluster<'static, DefaultProducerContext> {
        match self {
            Broker::Mock(cluster) => cluster,
            Broker::Tansu(_) => panic!("this test needs the mock cluster"),
        }
    }

    fn log_dir(&self) -> std::path::PathBuf {
        match self {
            Broker::Tansu(tansu) => tansu.dir.path().to_owned(),
            Broker::Mock(_) => std::env::temp_dir(),
        }
    }
}

/// The worker running in this process, through the library's entry point.
pub struct InProcess {
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub started: Started,
}

impl InProcess {
    pub async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("joined")
            .expect("the worker stops cleanly");
    }
}

pub struct Setup {
    pub database: PgPool,
    pub settings: Settings,
    /// Last, so the clients above go before the broker does.
    pub broker: Broker,
}

/// Creates the test database (migrated) and a pool of the test's own on it, with its
/// sessions named `entitlement-tests` so fault injection can tell them from the worker's.
async fn test_pool(settings: &Settings) -> PgPool {
    entitlement_worker::store::Store::connect(&settings.database)
        .await
        .expect("the test database");
    let options: sqlx::postgres::PgConnectOptions =
        settings.database.url.parse().expect("a database URL");
    sqlx::PgPool::connect_with(options.application_name("entitlement-tests"))
        .await
        .expect("the test's pool")
}

impl Setup {
    /// A broker with the eight topics (3 partitions each) and a fresh database.
    pub async fn new() -> Self {
        let broker = Tansu::start();
        let settings = super::settings(&broker.brokers);
        broker.create_topics(&settings, 3).await;
        let database = test_pool(&settings).await;
        Self {
            broker: Broker::Tansu(broker),
            settings,
            database,
        }
    }

    /// librdkafka's mock cluster (one broker, id 1) with the eight topics, 3 partitions
    /// each, and a fresh database.
    pub async fn mock() -> Self {
        let cluster = MockCluster::new(1).expect("the mock cluster starts");
        let settings = super::settings(&cluster.bootstrap_servers());
        for topic in settings.topics.all() {
            cluster.create_topic(topic, 3, 1).expect("topic created");
        }
        let database = test_pool(&settings).await;
        Self {
            broker: Broker::Mock(cluster),
            settings,
            database,
        }
    }

    /// Starts the binary against this broker and database.
    pub fn start_worker(&self) -> WorkerProcess {
        WorkerProcess::start(&self.settings, &self.broker.log_dir())
    }

    /// Kills the worker with SIGKILL, then lets its group session expire before anything
    /// else happens. tansu 0.6.0 never hands on the partitions of a member whose session
    /// expires while the group is formed and another member heartbeats: the heartbeat
    /// path (`missed_heartbeat` in tansu-broker's `coordinator/group/administrator.rs`)
    /// drops the member but keeps the group formed with the old assignment, so a worker
    /// restarted at once could hold 10 of the 15 partitions for good. Apache Kafka
    /// rebalances then. A member that joins after every dead session has expired makes
    /// tansu re-form the group, so the next worker starts after the session timeout: a
    /// timeout of the broker's own, with nothing to observe before it passes.
    pub async fn crash(&self, worker: &mut WorkerProcess) {
        worker.kill();
        self.wait_out_session().await;
    }

    /// Waits until the group sessions of members that stopped now have expired.
    pub async fn wait_out_session(&self) {
        let session = Duration::from_millis(self.settings.kafka.session_timeout_ms);
        tokio::time::sleep(session + Duration::from_secs(1)).await;
    }

    /// Starts the worker in this process.
    pub async fn start_in_process(&self) -> InProcess {
        let stop = CancellationToken::new();
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(pipeline::run(
            self.settings.clone(),
            stop.clone().cancelled_owned(),
            Some(sender),
        ));
        let Ok(started) = receiver.await else {
            panic!("the worker did not start: {:?}", task.await);
        };
        InProcess {
            stop,
            task,
            started,
        }
    }

    /// Delivers the scenario's setup events and waits for a worker to apply them; returns
    /// how many messages that was.
    pub async fn deliver_setup(&self, scenario: &Scenario) -> usize {
        let events: Vec<_> = scenario.setup.iter().collect();
        let delivered = stream::produce(&self.settings, &events, Keys::ByOrganization).await;
        let mut worker = self.start_worker();
        self.wait_until_done(delivered, &worker).await;
        assert!(worker.terminate(Duration::from_secs(30)).success());
        delivered
    }

    /// Waits until `total` messages are applied and the outbox is published.
    pub async fn wait_until_done(&self, total: usize, worker: &WorkerProcess) {
        self.wait_until_done_or(total, || worker.tail_of_log())
            .await;
    }

    /// Like [`Self::wait_until_done`], with `context` printed on failure.
    pub async fn wait_until_done_or(&self, total: usize, context: impl Fn() -> String) {
        let total = total as i64;
        super::eventually_or(
            "every message applied and the outbox published",
            DEADLINE,
            || async {
                (stream::applied(&self.database).await == total
                    && stream::outbox_backlog(&self.database).await == 0)
                    .then_some(())
            },
            context,
        )
        .await;
    }

    /// Waits until at least `threshold` messages are applied; returns how many are.
    pub async fn wait_for_progress(&self, threshold: i64, worker: &WorkerProcess) -> i64 {
        super::eventually_or(
            "the worker to make progress",
            DEADLINE,
            || async {
                let applied = stream::applied(&self.database).await;
                (applied >= threshold).then_some(applied)
            },
            || worker.tail_of_log(),
        )
        .await
    }

    /// Waits until at least `threshold` messages are applied by a worker in this process.
    pub async fn wait_for_progress_in_process(&self, threshold: i64) -> i64 {
        super::eventually("the worker to make progress", DEADLINE, || async {
            let applied = stream::applied(&self.database).await;
            (applied >= threshold).then_some(applied)
        })
        .await
    }

    /// Reads the output topics and compares them and the database with `scenario`.
    /// Returns the number of ledger entries.
    pub async fn check(&self, scenario: &Scenario) -> usize {
        stream::assert_oracle_agrees(scenario);
        let ledger_entries: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger")
            .fetch_one(&self.database)
            .await
            .unwrap();
        let outputs = Outputs::read(&self.settings, ledger_entries as usize, DEADLINE);
        stream::check(&self.database, &outputs, &scenario.expected).await;
        ledger_entries as usize
    }
}
