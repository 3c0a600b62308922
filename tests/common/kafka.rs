//! Apache Kafka as its own process: a single KRaft node (broker and controller in one)
//! run by `scripts/kafka-broker.sh` from the jars `scripts/ensure-kafka.sh` resolves from
//! Maven Central, its storage formatted by Kafka's own storage tool in a directory of its
//! own, on free ports.
//!
//! [`Kafka::shared`] is the one broker of a test binary (topics, groups and databases are
//! random per test); [`Kafka::start`] gives a test a broker of its own, to kill, freeze or
//! secure. Either way the broker goes when the test binary does, however it ends: it runs
//! under a small shell that kills it as soon as the pipe from this process closes.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use entitlement_worker::settings::Settings;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

/// How long a broker may take from its start to serving metadata (8 to 14 s seen on a
/// loaded 2-core machine).
const STARTUP: Duration = Duration::from_secs(120);

/// What the tests change from `scripts/kafka-broker.sh`'s single-node defaults.
const TEST_PROPERTIES: &str = "\
# KIP-848's protocol: the broker's session and heartbeat as short as the classic
# protocol's in the tests (6 s), instead of 45 s and 5 s.
group.consumer.min.session.timeout.ms=6000
group.consumer.session.timeout.ms=6000
group.consumer.min.heartbeat.interval.ms=500
group.consumer.heartbeat.interval.ms=1000
";

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// What a broker is started with beyond the defaults.
#[derive(Clone, Default)]
pub struct Options {
    /// Lines for `server.properties`, after the defaults (a key given here wins); `{port}`
    /// and `{controller}` stand for the broker's two ports, `{extra}` for a third one.
    pub properties: String,
    /// SCRAM credentials stored when the storage is formatted, one per line.
    pub scram: String,
    /// Which port's address clients bootstrap from: `{port}` unless this names `{extra}`.
    pub client_port_is_extra: bool,
}

pub struct Kafka {
    /// The shell that runs the broker and kills it when `guard` closes.
    shell: Option<Child>,
    /// The write end of the shell's stdin: dropping it stops the broker.
    guard: Option<ChildStdin>,
    /// The broker's process id, for SIGKILL, SIGSTOP and SIGCONT.
    pid: u32,
    pub port: u16,
    pub controller_port: u16,
    /// A third port for a listener of the caller's (`{extra}` in the properties).
    pub extra_port: u16,
    /// The address clients bootstrap from.
    pub brokers: String,
    pub dir: tempfile::TempDir,
    options: Options,
    /// librdkafka properties the harness's own clients need (security).
    client_properties: Vec<(String, String)>,
}

impl Kafka {
    /// The broker this test binary shares among its tests.
    pub fn shared() -> &'static Kafka {
        static SHARED: OnceLock<Kafka> = OnceLock::new();
        SHARED.get_or_init(Kafka::start)
    }

    /// A broker of the caller's own, with the single-node defaults.
    pub fn start() -> Self {
        Self::start_with(Options::default(), &[])
    }

    /// A broker of the caller's own, started with `options`; `client_properties` are what
    /// a client needs to reach it (its security settings).
    pub fn start_with(options: Options, client_properties: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("a directory for the broker");
        let port = free_port();
        let controller_port = free_port();
        let extra_port = free_port();
        let client_port = if options.client_port_is_extra {
            extra_port
        } else {
            port
        };
        let mut kafka = Self {
            shell: None,
            guard: None,
            pid: 0,
            port,
            controller_port,
            extra_port,
            brokers: format!("127.0.0.1:{client_port}"),
            dir,
            options,
            client_properties: client_properties
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
        };
        kafka.launch();
        kafka
    }

    /// The broker's own log, `logs/server.log`, its last 60 lines.
    pub fn tail_of_log(&self) -> String {
        let mut text = String::new();
        for name in ["server.log", "output.log"] {
            let path = self.dir.path().join("logs").join(name);
            let content = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = content.lines().collect();
            text.push_str(&format!("--- {} (last 60 lines)\n", path.display()));
            text.push_str(&lines[lines.len().saturating_sub(60)..].join("\n"));
            text.push('\n');
        }
        text
    }

    /// Kills the broker with SIGKILL and waits until it is gone.
    pub fn kill(&mut self) {
        if self.pid != 0 {
            signal("KILL", self.pid);
            self.pid = 0;
        }
        self.guard = None;
        if let Some(mut shell) = self.shell.take() {
            let _ = shell.wait();
        }
    }

    /// Starts the broker again on the same storage and ports; waits until it serves.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Stops the broker's process where it stands (SIGSTOP): connections stay open and
    /// nothing answers.
    pub fn freeze(&self) {
        signal("STOP", self.pid);
    }

    /// Lets a frozen broker go on (SIGCONT).
    pub fn thaw(&self) {
        signal("CONT", self.pid);
    }

    /// Creates the worker's topics with `partitions` partitions each.
    pub async fn create_topics(&self, settings: &Settings, partitions: i32) {
        entitlement_worker::kafka::admin::create_topics(
            &settings.kafka,
            &settings.topics,
            partitions,
            1,
        )
        .await
        .unwrap_or_else(|error| panic!("the topics are created: {error}\n{}", self.tail_of_log()));
    }

    /// Starts `scripts/kafka-broker.sh` under a shell that prints the broker's process id
    /// (the script ends in `exec java`) and kills it once its own stdin closes (this
    /// process ended, or the guard was dropped); then waits until the broker serves.
    fn launch(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka-broker.sh");
        let output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("output.log"))
            .expect("the broker's output file");
        let properties = format!("{TEST_PROPERTIES}{}", self.options.properties)
            .replace("{port}", &self.port.to_string())
            .replace("{controller}", &self.controller_port.to_string())
            .replace("{extra}", &self.extra_port.to_string());
        let wrapper = r#""$@" </dev/null >&2 &
pid=$!
echo "$pid"
cat >/dev/null
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
exit 0"#;
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(wrapper)
            .arg("kafka")
            .arg(&script)
            .arg(self.dir.path())
            .arg(self.port.to_string())
            .arg(self.controller_port.to_string())
            .env("KAFKA_SERVER_PROPERTIES", properties)
            .env("KAFKA_ADD_SCRAM", &self.options.scram)
            .env("KAFKA_OPTS", "-Dkafka.console.level=OFF")
            .env("KAFKA_HEAP_OPTS", "-Xmx512m -Xms256m")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(output)
            .spawn()
            .expect("sh runs");
        let guard = shell.stdin.take().expect("the shell's stdin");
        let mut line = String::new();
        BufReader::new(shell.stdout.take().expect("the shell's stdout"))
            .read_line(&mut line)
            .expect("the shell names the broker's process");
        self.pid = line.trim().parse().expect("a process id");
        self.shell = Some(shell);
        self.guard = Some(guard);
        self.wait_until_serving();
    }

    /// Waits until the broker answers a metadata request naming itself.
    fn wait_until_serving(&self) {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("log_level", "0");
        for (key, value) in &self.client_properties {
            config.set(key, value);
        }
        let consumer: BaseConsumer = config.create().expect("a metadata client");
        let started = Instant::now();
        loop {
            if let Ok(metadata) = consumer.fetch_metadata(None, Duration::from_secs(1)) {
                if !metadata.brokers().is_empty() {
                    return;
                }
            }
            assert!(
                started.elapsed() < STARTUP,
                "Kafka did not serve metadata on {} within {STARTUP:?}\n{}",
                self.brokers,
                self.tail_of_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(name: &str, pid: u32) {
    assert_ne!(pid, 0, "a broker's own process, never the process group");
    let _ = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}
