//! Helpers shared by the integration tests: a database per test, settings, messages.

#![allow(dead_code)]

use std::time::{Duration, Instant};

pub mod e2e;
pub mod kafka;
pub mod oracle;
pub mod process;
pub mod state_copy;
pub mod stream;

use entitlement_worker::settings::Settings;

/// The PostgreSQL server the tests use; each test gets its own database on it.
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_SERVER")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432".to_owned())
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}

/// Settings pointing at a fresh database and the given brokers, with topic names of its
/// own and a free metrics port.
pub fn settings(brokers: &str) -> Settings {
    let mut settings = Settings::load(None).expect("the defaults load");
    settings.kafka.brokers = brokers.to_owned();
    settings.kafka.group_id = unique("group");
    settings.kafka.session_timeout_ms = 6000;
    settings.database.url = format!("{}/{}", server_url(), unique("test"));
    settings.metrics.listen = "127.0.0.1:0".to_owned();
    settings.batch.max_wait_ms = 20;
    settings.clock.interval_ms = 200;
    settings.outbox.poll_interval_ms = 50;
    let suffix = unique("t");
    settings.topics.add_suffix(&suffix);
    settings
}

/// Waits until `check` returns Some, or fails the test after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_or(what, deadline, check, String::new).await
}

/// Like [`eventually`], with `context` (a log tail, say) printed when the deadline passes.
pub async fn eventually_or<T, F, Fut>(
    what: &str,
    deadline: Duration,
    mut check: F,
    context: impl Fn() -> String,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sum of a metric's samples (over all its labels) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
