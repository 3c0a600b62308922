//! A real Kafka-protocol broker in its own process: `tansu` with SQLite storage, on a free
//! port, in a directory of its own. Stopped (killed) when dropped.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use entitlement_worker::settings::Settings;

const STARTUP: Duration = Duration::from_secs(30);

pub struct Tansu {
    child: Child,
    pub brokers: String,
    pub dir: tempfile::TempDir,
}

/// The tansu binary: `$TANSU`, else `tansu` from `~/.cargo/bin` or the `PATH`.
fn binary() -> PathBuf {
    if let Ok(path) = std::env::var("TANSU") {
        return path.into();
    }
    let cargo_bin = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .map(|home| home.join("bin").join("tansu"));
    match cargo_bin {
        Ok(path) if path.exists() => path,
        _ => "tansu".into(),
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

impl Tansu {
    /// Starts a broker and waits until it accepts connections.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("a directory for the broker");
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("tansu.log")).expect("a log file");
        let child = Command::new(binary())
            .current_dir(dir.path())
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            // SQLite storage, relative to the broker's directory.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| {
                panic!("tansu could not start ({error}); install it with scripts/ensure-tansu.sh")
            });
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < STARTUP,
                "tansu did not listen on port {port} within {STARTUP:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            brokers: format!("127.0.0.1:{port}"),
            dir,
        }
    }

    /// Creates the worker's eight topics with `partitions` partitions each.
    pub async fn create_topics(&self, settings: &Settings, partitions: i32) {
        entitlement_worker::kafka::admin::create_topics(
            &settings.kafka,
            &settings.topics,
            partitions,
        )
        .await
        .expect("the topics are created");
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
