//! End-to-end fixtures: Apache Kafka with the worker's topics, a test database, the
//! scenario's setup delivered, and the final comparison with what the events demand.

use std::time::Duration;

use entitlement_worker::pipeline::{self, Started};
use entitlement_worker::settings::Settings;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::kafka::Kafka;
use super::process::WorkerProcess;
use super::stream::{self, Keys, Outputs, Scenario};

pub const DEADLINE: Duration = Duration::from_secs(180);

/// The broker of a test: the test binary's Apache Kafka, one of the test's own (to kill or
/// freeze), or librdkafka's mock cluster in this process (for the request errors only it
/// can inject).
pub enum Broker {
    Shared(&'static Kafka),
    Own(Kafka),
    Mock(MockCluster<'static, DefaultProducerContext>),
}

impl Broker {
    pub fn mock(&self) -> &MockCluster<'static, DefaultProducerContext> {
        match self {
            Broker::Mock(cluster) => cluster,
            _ => panic!("this test needs the mock cluster"),
        }
    }

    /// The test's own Apache Kafka.
    pub fn own(&mut self) -> &mut Kafka {
        match self {
            Broker::Own(kafka) => kafka,
            _ => panic!("this test needs a broker of its own"),
        }
    }

    /// The last lines of Apache Kafka's log; nothing for the mock cluster.
    pub fn tail_of_log(&self) -> String {
        match self {
            Broker::Shared(kafka) => kafka.tail_of_log(),
            Broker::Own(kafka) => kafka.tail_of_log(),
            Broker::Mock(_) => String::new(),
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

/// Tests share the PostgreSQL server; one that restarts it holds this for writing, the
/// others for reading, so it runs alone in its test binary.
static SERVER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A test's hold on the PostgreSQL server (see [`SERVER`]).
pub enum ServerHold {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'static, ()>),
}

pub struct Setup {
    pub database: PgPool,
    pub settings: Settings,
    /// The test's directory: the worker's log.
    pub dir: tempfile::TempDir,
    pub server: ServerHold,
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
    /// The test binary's Apache Kafka with the eight topics (3 partitions each, names of
    /// this test's own) and a fresh database.
    pub async fn new() -> Self {
        let server = ServerHold::Shared(SERVER.read().await);
        Self::on(Broker::Shared(Kafka::shared()), server).await
    }

    /// Like [`Self::new`], on an Apache Kafka of the test's own.
    pub async fn own_broker() -> Self {
        let server = ServerHold::Shared(SERVER.read().await);
        Self::on(Broker::Own(Kafka::start()), server).await
    }

    /// Like [`Self::new`], with no other test of this binary using PostgreSQL meanwhile.
    pub async fn exclusive() -> Self {
        let server = ServerHold::Exclusive(SERVER.write().await);
        Self::on(Broker::Shared(Kafka::shared()), server).await
    }

    async fn on(broker: Broker, server: ServerHold) -> Self {
        let kafka = match &broker {
            Broker::Shared(kafka) => *kafka,
            Broker::Own(kafka) => kafka,
            Broker::Mock(_) => unreachable!("the mock cluster has Setup::mock"),
        };
        let settings = super::settings(&kafka.brokers);
        kafka.create_topics(&settings, 3).await;
        let database = test_pool(&settings).await;
        Self {
            broker,
            settings,
            database,
            dir: tempfile::tempdir().expect("the test's directory"),
            server,
        }
    }

    /// librdkafka's mock cluster (one broker, id 1) with the eight topics, 3 partitions
    /// each, and a fresh database.
    pub async fn mock() -> Self {
        let server = ServerHold::Shared(SERVER.read().await);
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
            dir: tempfile::tempdir().expect("the test's directory"),
            server,
        }
    }

    /// Starts the binary against this broker and database.
    pub fn start_worker(&self) -> WorkerProcess {
        WorkerProcess::start(&self.settings, self.dir.path())
    }

    /// Kills the worker with SIGKILL. The next worker may start at once: Kafka hands the
    /// dead member's partitions on when its session expires.
    pub fn crash(&self, worker: &mut WorkerProcess) {
        worker.kill();
    }

    /// The worker's log and the broker's, for a failed wait.
    pub fn logs(&self, worker: &WorkerProcess) -> String {
        format!("{}\n{}", worker.tail_of_log(), self.broker.tail_of_log())
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
        self.wait_until_done_or(total, || self.logs(worker)).await;
    }

    /// Like [`Self::wait_until_done`], with `context` (and the broker's log) printed on
    /// failure.
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
            || format!("{}\n{}", context(), self.broker.tail_of_log()),
        )
        .await;
    }

    /// Waits until at least `threshold` messages are applied; returns how many are.
    pub async fn wait_for_progress(&self, threshold: i64, worker: &WorkerProcess) -> i64 {
        self.wait_for_progress_or(threshold, || self.logs(worker))
            .await
    }

    /// Waits until at least `threshold` messages are applied by a worker in this process.
    pub async fn wait_for_progress_in_process(&self, threshold: i64) -> i64 {
        self.wait_for_progress_or(threshold, || self.broker.tail_of_log())
            .await
    }

    async fn wait_for_progress_or(&self, threshold: i64, context: impl Fn() -> String) -> i64 {
        super::eventually_or(
            "the worker to make progress",
            DEADLINE,
            || async {
                let applied = stream::applied(&self.database).await;
                (applied >= threshold).then_some(applied)
            },
            context,
        )
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
