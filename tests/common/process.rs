//! The `entitlement-worker` binary as users run it: configured by environment variables
//! only, stopped with SIGTERM or killed with SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use entitlement_worker::settings::Settings;

pub struct WorkerProcess {
    child: Child,
    pub metrics_address: String,
    pub log: PathBuf,
}

/// The environment that points the binary at `settings`: every key the tests change,
/// through the `ENTITLEMENTS__` variables the contract names.
pub fn environment(settings: &Settings, metrics_address: &str) -> Vec<(String, String)> {
    let mut settings = settings.clone();
    settings.metrics.listen = metrics_address.to_owned();
    settings.log.format = "json".to_owned();
    settings.environment()
}

impl WorkerProcess {
    /// Starts `entitlement-worker run` with `settings` given as environment variables (and
    /// `kafka.properties`, which have no variables, in a configuration file), and its log
    /// appended to `log_dir/worker.log`.
    pub fn start(settings: &Settings, log_dir: &Path) -> Self {
        if settings.kafka.properties.is_empty() {
            return Self::start_with(settings, log_dir, &[]);
        }
        let config = log_dir.join("kafka-properties.toml");
        let mut text = String::from("[kafka.properties]\n");
        for (key, value) in &settings.kafka.properties {
            text.push_str(&format!("{key:?} = {value:?}\n"));
        }
        std::fs::write(&config, text).expect("the configuration file");
        Self::start_with(settings, log_dir, &["--config", config.to_str().unwrap()])
    }

    /// Like [`Self::start`], with extra arguments after `run` (`--config FILE`, say).
    pub fn start_with(settings: &Settings, log_dir: &Path, arguments: &[&str]) -> Self {
        let metrics_address = format!("127.0.0.1:{}", super::kafka::free_port());
        let log = log_dir.join("worker.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("the worker's log file");
        let child = Command::new(env!("CARGO_BIN_EXE_entitlement-worker"))
            .arg("run")
            .args(arguments)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(environment(settings, &metrics_address))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("the log file"))
            .stderr(file)
            .spawn()
            .expect("the worker starts");
        Self {
            child,
            metrics_address,
            log,
        }
    }

    /// The body of `GET path` on the metrics address, with its status code.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&self.metrics_address, path)
    }

    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL delivered");
        self.child.wait().expect("the killed worker is reaped");
    }

    /// Sends SIGTERM and waits up to `limit` for the exit status.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "SIGTERM delivered");
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("the worker's status") {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "the worker did not exit within {limit:?} of SIGTERM; the end of its log ({}):\n{}",
                self.log.display(),
                self.tail_of_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn tail_of_log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A minimal HTTP/1.1 GET: enough for /metrics and /healthz.
pub fn http_get(address: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())?;
    Some((status, body))
}
