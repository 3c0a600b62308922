//! The `entitlement-worker` binary against an Apache Kafka that it reaches through a
//! `SASL_SSL` listener only: SCRAM-SHA-512 over TLS, with a CA and a broker certificate
//! made here with `openssl`, and the worker's security settings given the way operators
//! give them, as `kafka.properties.*` in a TOML file passed with `--config`.
//!
//! The broker keeps its PLAINTEXT listener for itself (inter-broker) and the controller;
//! every client of these tests (the worker, the test's producer and reader, topic
//! creation, the harness's readiness check) bootstraps from the `SASL_SSL` port, whose
//! metadata advertises that listener only.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::e2e::DEADLINE;
use common::kafka::{Kafka, Options};
use common::process::WorkerProcess;
use common::stream::{self, Keys, Outputs};
use entitlement_worker::settings::Settings;

/// How long a worker with a configuration Kafka refuses may take to exit.
const REFUSED_EXIT: Duration = Duration::from_secs(60);

/// The broker of this test binary, with what its clients need to trust and log in.
struct Secured {
    kafka: Kafka,
    /// `ca.pem` (the CA that signed the broker's certificate), `other-ca.pem` (a CA that
    /// signed nothing of the broker's) and the broker's keystore.
    certificates: tempfile::TempDir,
    /// The SCRAM password of the user `worker`, stored when the broker's storage was
    /// formatted.
    password: String,
}

impl Secured {
    fn ca(&self) -> PathBuf {
        self.certificates.path().join("ca.pem")
    }

    /// Test settings (fresh database, topic names of their own) whose Kafka properties
    /// log in as `worker` with `password` and trust `ca`; `stream::client_config` passes
    /// these to the test's own clients too.
    fn settings(&self, password: &str, ca: &Path) -> Settings {
        let mut settings = common::settings(&self.kafka.brokers);
        for (key, value) in client_security(password, ca) {
            settings.kafka.properties.insert(key, value);
        }
        settings
    }
}

/// What a librdkafka client needs for the broker's `SASL_SSL` listener. Hostname
/// verification stays on (librdkafka's default, `ssl.endpoint.identification.algorithm`
/// `https`): the broker's certificate names 127.0.0.1.
fn client_security(password: &str, ca: &Path) -> Vec<(String, String)> {
    [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanisms", "SCRAM-SHA-512"),
        ("sasl.username", "worker"),
        ("sasl.password", password),
        ("ssl.ca.location", ca.to_str().expect("a UTF-8 path")),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value.to_owned()))
    .collect()
}

/// The broker this test binary's tests share (each has its own topics, group and
/// database). Like `Kafka::shared`, it goes when the test binary does; the few
/// kilobytes of its certificates stay behind in the temporary directory.
fn secured() -> &'static Secured {
    static SECURED: OnceLock<Secured> = OnceLock::new();
    SECURED.get_or_init(|| {
        let certificates = tempfile::tempdir().expect("a directory for the certificates");
        make_certificates(certificates.path());
        let password = format!("scram-{:016x}", rand::random::<u64>());
        let keystore = certificates.path().join("broker-keystore.pem");
        let properties = format!(
            "\
listeners=PLAINTEXT://127.0.0.1:{{port}},CONTROLLER://127.0.0.1:{{controller}},SASL_SSL://127.0.0.1:{{extra}}
advertised.listeners=PLAINTEXT://127.0.0.1:{{port}},SASL_SSL://127.0.0.1:{{extra}}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL
inter.broker.listener.name=PLAINTEXT
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PEM
ssl.keystore.location={}
",
            keystore.display()
        );
        let ca = certificates.path().join("ca.pem");
        let client = client_security(&password, &ca);
        let client: Vec<(&str, &str)> = client
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        let kafka = Kafka::start_with(
            Options {
                properties,
                scram: format!("SCRAM-SHA-512=[name=worker,password={password}]"),
                client_port_is_extra: true,
            },
            &client,
        );
        Secured {
            kafka,
            certificates,
            password,
        }
    })
}

/// Makes, in `dir`: a CA (`ca.pem`), the broker's certificate signed by it for
/// 127.0.0.1 and localhost, with its unencrypted PKCS#8 key, in one PEM keystore as Kafka
/// reads it (`broker-keystore.pem`: key, certificate, CA); and a second CA,
/// `other-ca.pem`, that a client may wrongly trust instead.
fn make_certificates(dir: &Path) {
    const KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    for name in ["ca", "other-ca"] {
        openssl(
            dir,
            &format!(
                "req -x509 -days 2 -subj /CN={name} {KEY} -keyout {name}.key -out {name}.pem \
                 -addext basicConstraints=critical,CA:TRUE \
                 -addext keyUsage=critical,keyCertSign,cRLSign"
            ),
        );
    }
    openssl(
        dir,
        &format!("req -new -subj /CN=localhost {KEY} -keyout broker.key -out broker.csr"),
    );
    std::fs::write(
        dir.join("broker.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
         basicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\n",
    )
    .expect("the extensions file");
    openssl(
        dir,
        "x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
         -extfile broker.ext -out broker.pem",
    );
    let keystore: String = ["broker.key", "broker.pem", "ca.pem"]
        .iter()
        .map(|name| std::fs::read_to_string(dir.join(name)).expect("a PEM file"))
        .collect();
    std::fs::write(dir.join("broker-keystore.pem"), keystore).expect("the keystore");
}

/// Runs `openssl` in `dir` with `command`'s words as its arguments.
fn openssl(dir: &Path, command: &str) {
    let arguments: Vec<&str> = command.split_whitespace().collect();
    let output = Command::new("openssl")
        .args(&arguments)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("openssl runs (Debian's openssl package)");
    assert!(
        output.status.success(),
        "openssl {command}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The test's database: created and migrated as the worker does, with a pool of the
/// test's own.
async fn database(settings: &Settings) -> sqlx::PgPool {
    entitlement_worker::store::Store::connect(&settings.database)
        .await
        .expect("the test database");
    sqlx::PgPool::connect(&settings.database.url)
        .await
        .expect("the test's pool")
}

/// Waits until `total` messages are applied and the outbox is published.
async fn wait_until_done(pool: &sqlx::PgPool, total: usize, worker: &WorkerProcess) {
    common::eventually_or(
        "every message applied and the outbox published",
        DEADLINE,
        || async {
            (stream::applied(pool).await == total as i64 && stream::outbox_backlog(pool).await == 0)
                .then_some(())
        },
        || {
            format!(
                "{}\n{}",
                worker.tail_of_log(),
                secured().kafka.tail_of_log()
            )
        },
    )
    .await;
}

/// Asserts that neither password shows in the worker's log nor in its metrics.
fn assert_no_password(log: &str, metrics: Option<&str>, passwords: &[&str]) {
    for password in passwords {
        assert!(
            !log.contains(password),
            "the password {password} is in the worker's log:\n{log}"
        );
        if let Some(metrics) = metrics {
            assert!(
                !metrics.contains(password),
                "the password {password} is in the worker's metrics"
            );
        }
    }
}

/// The worker, logging in with SCRAM over TLS, applies a stream and publishes its
/// outputs exactly as the events demand; neither its log nor its metrics show the
/// password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_reaching_kafka_over_sasl_ssl_applies_and_publishes_what_the_events_demand() {
    let broker = secured();
    let settings = broker.settings(&broker.password, &broker.ca());
    assert_eq!(
        settings.kafka.brokers,
        format!("127.0.0.1:{}", broker.kafka.extra_port),
        "every client bootstraps from the SASL_SSL listener"
    );
    broker.kafka.create_topics(&settings, 1).await;
    let pool = database(&settings).await;
    let scenario = stream::scenario(41, 1);
    let dir = tempfile::tempdir().expect("the worker's directory");

    // `kafka.properties` reach the binary through a TOML file given with `--config` only.
    let mut worker = WorkerProcess::start(&settings, dir.path());
    let config = std::fs::read_to_string(dir.path().join("kafka-properties.toml"))
        .expect("the configuration file");
    assert!(
        config.contains("\"security.protocol\" = \"SASL_SSL\""),
        "{config}"
    );

    let setup: Vec<_> = scenario.setup.iter().collect();
    let before = stream::produce(&settings, &setup, Keys::ByOrganization).await;
    wait_until_done(&pool, before, &worker).await;
    let events: Vec<_> = scenario.events.iter().collect();
    let total = before + stream::produce(&settings, &events, Keys::ByOrganization).await;
    wait_until_done(&pool, total, &worker).await;

    let (status, health) = common::eventually_or(
        "/healthz to answer 200",
        DEADLINE,
        || async { worker.get("/healthz").filter(|(status, _)| *status == 200) },
        || worker.tail_of_log(),
    )
    .await;
    assert_eq!(status, 200, "{health}");
    let (_, metrics) = worker.get("/metrics").expect("/metrics answers");
    assert_eq!(
        common::metric_sum(&metrics, "entitlements_messages_consumed_total") as usize,
        total,
        "every message consumed once"
    );
    let status = worker.terminate(Duration::from_secs(30));
    assert!(status.success(), "SIGTERM exits 0: {status}");

    stream::assert_oracle_agrees(&scenario);
    let ledger_entries: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ledger_entries > 0, "the stream moved units");
    let outputs = Outputs::read(&settings, ledger_entries as usize, DEADLINE);
    stream::check(&pool, &outputs, &scenario.expected).await;

    let log = std::fs::read_to_string(&worker.log).expect("the worker's log");
    assert!(
        log.contains("Partitions assigned"),
        "the worker consumed:\n{log}"
    );
    assert_no_password(&log, Some(&metrics), &[&broker.password]);
    eprintln!(
        "secured: messages={total} ledger_entries={ledger_entries} alerts={} dead_letters={}",
        outputs.alerts.len(),
        outputs.dead_letters.len()
    );
}

/// A wrong password is a configuration error retrying cannot fix: the worker says so in
/// plain words and exits non-zero instead of waiting for ever, without writing either
/// password anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_stops_the_worker_at_start_saying_kafka_refused_its_credentials() {
    let broker = secured();
    let good = broker.settings(&broker.password, &broker.ca());
    // The topics exist: only the password is wrong.
    broker.kafka.create_topics(&good, 1).await;
    let wrong = format!("wrong-{:016x}", rand::random::<u64>());
    let settings = broker.settings(&wrong, &broker.ca());

    let exited = run_until_exit(&settings).await;
    assert!(
        !exited.status.success(),
        "a worker Kafka refuses exits non-zero: {}\n{}",
        exited.status,
        exited.log
    );
    assert!(
        exited
            .log
            .contains("Kafka refused the worker's credentials (SASL authentication failed)"),
        "the log says Kafka refused the credentials:\n{}",
        exited.log
    );
    assert!(
        exited.log.contains("kafka.properties.sasl.password"),
        "the log says which setting to check:\n{}",
        exited.log
    );
    // The endpoint serves while the worker asks Kafka, for a second at least.
    let metrics = exited.metrics.as_deref();
    assert!(metrics.is_some(), "/metrics answered:\n{}", exited.log);
    assert_no_password(&exited.log, metrics, &[&wrong, &broker.password]);
    eprintln!(
        "secured: wrong password: {} after {:?}: {}",
        exited.status,
        exited.after,
        exited.line("Kafka refused")
    );
}

/// A worker that trusts another CA than the one that signed the broker's certificate
/// fails at start saying the TLS handshake failed, and exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_broker_certificate_stops_the_worker_at_start_saying_tls_failed() {
    let broker = secured();
    let good = broker.settings(&broker.password, &broker.ca());
    broker.kafka.create_topics(&good, 1).await;
    let other_ca = broker.certificates.path().join("other-ca.pem");
    let settings = broker.settings(&broker.password, &other_ca);

    let exited = run_until_exit(&settings).await;
    assert!(
        !exited.status.success(),
        "exits non-zero: {}\n{}",
        exited.status,
        exited.log
    );
    assert!(
        exited.log.contains("TLS") && exited.log.contains("kafka.properties.ssl.ca.location"),
        "the log says the TLS handshake failed and what to check:\n{}",
        exited.log
    );
    assert_no_password(&exited.log, exited.metrics.as_deref(), &[&broker.password]);
    eprintln!(
        "secured: untrusted certificate: {} after {:?}: {}",
        exited.status,
        exited.after,
        exited.line("TLS handshake")
    );
}

/// A worker that ended on its own.
struct Exited {
    status: ExitStatus,
    after: Duration,
    log: String,
    /// `/metrics` as last read while it ran, if it answered.
    metrics: Option<String>,
}

impl Exited {
    /// The first line of the log that holds `text`.
    fn line(&self, text: &str) -> &str {
        self.log
            .lines()
            .find(|line| line.contains(text))
            .unwrap_or_default()
    }
}

/// Kills the worker if the test fails while it runs.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs `entitlement-worker run --config FILE` (the file holding `settings`'
/// `kafka.properties`) until it exits on its own, within [`REFUSED_EXIT`].
async fn run_until_exit(settings: &Settings) -> Exited {
    let dir = tempfile::tempdir().expect("the worker's directory");
    let config = dir.path().join("worker.toml");
    let mut text = String::from("[kafka.properties]\n");
    for (key, value) in &settings.kafka.properties {
        text.push_str(&format!("{key:?} = {value:?}\n"));
    }
    std::fs::write(&config, text).expect("the configuration file");
    let metrics_address = format!("127.0.0.1:{}", common::kafka::free_port());
    let log = dir.path().join("worker.log");
    let file = std::fs::File::create(&log).expect("the worker's log file");
    let started = std::time::Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_entitlement-worker"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(common::process::environment(settings, &metrics_address))
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("the log file"))
        .stderr(file)
        .spawn()
        .expect("the worker starts");
    let running = std::cell::RefCell::new(Running(child));
    let metrics = std::cell::RefCell::new(None);
    let health = std::cell::RefCell::new(None);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let status = common::eventually_or(
        "the worker to exit",
        REFUSED_EXIT,
        || async {
            if let Some((_, text)) = common::process::http_get(&metrics_address, "/metrics") {
                *metrics.borrow_mut() = Some(text);
            }
            if let Some(answer) = common::process::http_get(&metrics_address, "/healthz") {
                *health.borrow_mut() = Some(answer);
            }
            running
                .borrow_mut()
                .0
                .try_wait()
                .expect("the worker's status")
        },
        || {
            format!(
                "/healthz last answered {:?}\nthe worker's log:\n{}",
                health.borrow(),
                read_log()
            )
        },
    )
    .await;
    Exited {
        status,
        after: started.elapsed(),
        log: read_log(),
        metrics: metrics.into_inner(),
    }
}
