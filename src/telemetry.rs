//! Metrics, health and logs: one registry, one HTTP endpoint (`/metrics`, `/healthz`), and
//! the tracing subscriber.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    CounterVec, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio_util::sync::CancellationToken;

use crate::settings::LogSettings;
use crate::store::{BatchReport, Stage};

/// The `phase` labels of `entitlements_lane_wait_seconds_total`: waiting with nothing
/// queued, and filling a batch that has begun.
pub const LANE_WAIT_PHASES: [&str; 2] = ["idle", "gather"];

/// Every metric the worker exports. Labels are low-cardinality: topics, reasons, kinds.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub consumed: IntCounterVec,
    pub rejected: IntCounterVec,
    pub duplicates: IntCounter,
    pub stale: IntCounter,
    pub redelivered: IntCounter,
    pub offsets_skipped: IntCounterVec,
    pub batches: IntCounter,
    pub batch_size: HistogramVec,
    pub commit_latency: HistogramVec,
    pub publish_delay: HistogramVec,
    pub batch_stage_seconds: CounterVec,
    pub lane_wait_seconds: CounterVec,
    pub seats_transferred: IntCounter,
    pub ledger_entries: IntCounterVec,
    pub alerts: IntCounter,
    pub state_changes: IntCounter,
    pub pool_warnings: IntCounterVec,
    pub open_shortfalls: IntGauge,
    pub open_pool_warnings: IntGaugeVec,
    pub outbox_backlog: IntGauge,
    /// Outbox rows the relay published, by where their messages came from.
    pub outbox_rows: IntCounterVec,
    pub consumer_lag: IntGaugeVec,
    pub published: IntCounterVec,
    pub publish_errors: IntCounter,
    pub store_retries: IntCounterVec,
    /// Batches the database refused that were split to find the message at fault.
    pub store_isolations: IntCounter,
    pub clock_entries: IntCounter,
    pub consumer_queued_bytes: IntGaugeVec,
    memory: MemoryGauges,
}

/// Where the worker's memory is, read when `/metrics` is scraped.
#[derive(Clone)]
struct MemoryGauges {
    resident: IntGauge,
    heap_allocated: IntGauge,
    heap_resident: IntGauge,
}

impl MemoryGauges {
    fn refresh(&self) {
        if let Some(bytes) = resident_bytes() {
            self.resident.set(bytes);
        }
        if let Some((allocated, resident)) = heap_bytes() {
            self.heap_allocated.set(allocated);
            self.heap_resident.set(resident);
        }
    }
}

/// The process's resident memory (`VmRSS` of `/proc/self/status`), where Linux tells it.
fn resident_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// jemalloc's count of the bytes the program has allocated and of the pages it holds
/// for them (the binary's allocator; zero where another allocator serves the program).
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
fn heap_bytes() -> Option<(i64, i64)> {
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    let allocated = tikv_jemalloc_ctl::stats::allocated::read().ok()?;
    let resident = tikv_jemalloc_ctl::stats::resident::read().ok()?;
    Some((allocated as i64, resident as i64))
}

#[cfg(not(all(feature = "jemalloc", not(target_env = "msvc"))))]
fn heap_bytes() -> Option<(i64, i64)> {
    None
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let metric = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        // Seconds per label value, every value exported from the start (at 0).
        let seconds_vec = |name: &str, help: &str, label: &str, values: &[&str]| {
            let metric = CounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            for value in values {
                metric.with_label_values(&[*value]);
            }
            metric
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &[])
                .expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "entitlements_consumer_lag",
                "Messages behind the end of each input partition, as librdkafka last reported.",
            ),
            &["topic", "partition"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(consumer_lag.clone()))
            .expect("unique metric");
        let open_pool_warnings = IntGaugeVec::new(
            Opts::new(
                "entitlements_open_pool_warnings",
                "Pool warnings open now, across all organizations, per kind (low, expiring).",
            ),
            &["kind"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(open_pool_warnings.clone()))
            .expect("unique metric");
        let consumer_queued_bytes = IntGaugeVec::new(
            Opts::new(
                "entitlements_consumer_queued_bytes",
                "Bytes of messages librdkafka has fetched ahead of each lane, as it last reported.",
            ),
            &["lane"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(consumer_queued_bytes.clone()))
            .expect("unique metric");
        let memory = MemoryGauges {
            resident: gauge(
                "entitlements_memory_resident_bytes",
                "Resident memory of the worker process.",
            ),
            heap_allocated: gauge(
                "entitlements_memory_heap_allocated_bytes",
                "Bytes allocated through the worker's allocator (jemalloc) and not yet freed.",
            ),
            heap_resident: gauge(
                "entitlements_memory_heap_resident_bytes",
                "Resident pages the worker's allocator (jemalloc) holds, free or not.",
            ),
        };
        Self {
            consumer_queued_bytes,
            memory,
            consumed: counter_vec(
                "entitlements_messages_consumed_total",
                "Input messages applied or rejected, per topic.",
                &["topic"],
            ),
            rejected: counter_vec(
                "entitlements_messages_rejected_total",
                "Input messages sent to the dead-letter topic, per reason.",
                &["reason"],
            ),
            duplicates: counter(
                "entitlements_duplicate_events_total",
                "Events whose event_id was already applied; they changed nothing.",
            ),
            stale: counter(
                "entitlements_stale_events_total",
                "Participant events older than the participant's latest; they changed nothing.",
            ),
            redelivered: counter(
                "entitlements_redelivered_messages_total",
                "Messages consumed again below the offset committed in PostgreSQL, skipped.",
            ),
            offsets_skipped: counter_vec(
                "entitlements_input_offsets_skipped_total",
                "Offsets of an input partition a lane never received: the broker went past \
                 them between two messages, or between where the lane resumed and its first \
                 message (retention deleted them, or a broker lost them).",
                &["topic"],
            ),
            batches: counter(
                "entitlements_batches_committed_total",
                "Batches committed to PostgreSQL.",
            ),
            batch_size: histogram(
                "entitlements_batch_size",
                "Messages per committed batch.",
                vec![
                    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
                ],
            ),
            commit_latency: histogram(
                "entitlements_commit_latency_seconds",
                "Time to apply and commit one batch, retries included.",
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                ],
            ),
            publish_delay: histogram(
                "entitlements_publish_delay_seconds",
                "From the start of the transaction that committed an outbox row to the broker's acknowledgement of all its messages: how far the topics, the state topic's copies included, trail the database.",
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            ),
            batch_stage_seconds: seconds_vec(
                "entitlements_batch_stage_seconds_total",
                "Time committed batches spent in each stage of their transaction: lock, load, core, write, commit.",
                "stage",
                &Stage::ALL.map(Stage::as_str),
            ),
            lane_wait_seconds: seconds_vec(
                "entitlements_lane_wait_seconds_total",
                "Time the apply lanes spent waiting for messages: idle (nothing queued) or gather (filling a batch that has begun).",
                "phase",
                &LANE_WAIT_PHASES,
            ),
            seats_transferred: counter(
                "entitlements_seats_transferred_total",
                "Seats moved from pools to workspaces, automatic and manual.",
            ),
            ledger_entries: counter_vec(
                "entitlements_ledger_entries_total",
                "Ledger entries recorded, per kind.",
                &["kind"],
            ),
            alerts: counter(
                "entitlements_shortfall_alerts_total",
                "Shortfall changes recorded for publication.",
            ),
            state_changes: counter(
                "entitlements_state_changes_total",
                "Workspace-product and pool states recorded for publication on the state topic.",
            ),
            pool_warnings: counter_vec(
                "entitlements_pool_warnings_total",
                "Pool warning changes recorded for publication, per kind (low, expiring) and status (open, resolved).",
                &["kind", "status"],
            ),
            open_pool_warnings,
            open_shortfalls: gauge(
                "entitlements_open_shortfalls",
                "(workspace, product) pairs missing entitlements, across all organizations.",
            ),
            outbox_backlog: gauge(
                "entitlements_outbox_backlog",
                "Committed messages not yet acknowledged by the broker.",
            ),
            outbox_rows: counter_vec(
                "entitlements_outbox_rows_total",
                "Outbox rows the relay took: source=\"memory\" kept since this instance committed them, source=\"database\" read back from PostgreSQL.",
                &["source"],
            ),
            consumer_lag,
            published: counter_vec(
                "entitlements_published_total",
                "Messages acknowledged by the broker, per output channel.",
                &["channel"],
            ),
            publish_errors: counter(
                "entitlements_publish_errors_total",
                "Outbox messages the broker did not acknowledge; they are sent again.",
            ),
            store_retries: counter_vec(
                "entitlements_store_retries_total",
                "Database operations retried after a transient failure, per operation.",
                &["operation"],
            ),
            store_isolations: counter(
                "entitlements_batch_splits_total",
                "Batches the database refused that were split in halves to find the message at fault (dead-lettered as unstorable).",
            ),
            clock_entries: counter(
                "entitlements_clock_ledger_entries_total",
                "Ledger entries written by the clock (units becoming valid or expiring).",
            ),
            registry,
        }
    }

    /// Counts what one committed batch did.
    pub fn observe_batch(&self, report: &BatchReport, size: usize, seconds: f64) {
        self.batches.inc();
        self.batch_size
            .with_label_values(&[] as &[&str])
            .observe(size as f64);
        self.commit_latency
            .with_label_values(&[] as &[&str])
            .observe(seconds);
        for (stage, time) in &report.stages {
            self.batch_stage_seconds
                .with_label_values(&[stage.as_str()])
                .inc_by(time.as_secs_f64());
        }
        for (topic, count) in &report.consumed {
            self.consumed.with_label_values(&[topic]).inc_by(*count);
        }
        for (reason, count) in &report.rejected {
            self.rejected.with_label_values(&[reason]).inc_by(*count);
        }
        self.duplicates.inc_by(report.duplicates);
        self.stale.inc_by(report.stale);
        self.redelivered.inc_by(report.already_applied);
        self.observe_effects(report);
    }

    /// Counts the ledger entries, seats transferred, alerts, pool warnings and state changes
    /// of a batch or clock round.
    pub fn observe_effects(&self, report: &BatchReport) {
        for (kind, count) in &report.ledger_entries {
            self.ledger_entries
                .with_label_values(&[kind])
                .inc_by(*count);
        }
        self.seats_transferred
            .inc_by(report.seats_transferred.max(0) as u64);
        self.alerts.inc_by(report.alerts);
        self.state_changes.inc_by(report.states);
        for ((kind, status), count) in &report.warnings {
            self.pool_warnings
                .with_label_values(&[kind, status])
                .inc_by(*count);
        }
    }

    pub fn render(&self) -> String {
        self.memory.refresh();
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding never fails");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What `/healthz` answers: 200 while the worker is consuming and no part of it has been
/// stuck for longer than `stall_after` (a lane holding a batch it cannot commit, the
/// relay holding messages the broker does not acknowledge), 503 with the reason otherwise.
#[derive(Clone)]
pub struct Health(Arc<HealthState>);

struct HealthState {
    consuming: AtomicBool,
    stall_after: Duration,
    /// Work begun and not yet done, by part ("lane 0", "relay"): since when, and what.
    busy: Mutex<BTreeMap<String, (Instant, String)>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new(Duration::from_secs(60))
    }
}

impl Health {
    pub fn new(stall_after: Duration) -> Self {
        Self(Arc::new(HealthState {
            consuming: AtomicBool::new(false),
            stall_after,
            busy: Mutex::new(BTreeMap::new()),
        }))
    }

    pub fn set(&self, consuming: bool) {
        self.0.consuming.store(consuming, Ordering::Relaxed);
    }

    pub fn is_consuming(&self) -> bool {
        self.0.consuming.load(Ordering::Relaxed)
    }

    /// `part` began work described by `what`; the start is kept if it was already busy,
    /// so a retried batch counts from its first try.
    pub fn begin(&self, part: &str, what: impl Into<String>) {
        let mut busy = self.0.busy.lock().expect("health lock");
        let what = what.into();
        busy.entry(part.to_owned())
            .and_modify(|(_, described)| *described = what.clone())
            .or_insert_with(|| (Instant::now(), what));
    }

    /// `part` finished its work: it made progress.
    pub fn done(&self, part: &str) {
        self.0.busy.lock().expect("health lock").remove(part);
    }

    /// `None` while healthy, else why not, as sentences.
    pub fn problem(&self) -> Option<String> {
        if !self.is_consuming() {
            return Some(
                "The worker is not consuming: no partitions are assigned yet, or it is stopping."
                    .into(),
            );
        }
        let busy = self.0.busy.lock().expect("health lock");
        let stuck: Vec<String> = busy
            .iter()
            .filter(|(_, (since, _))| since.elapsed() > self.0.stall_after)
            .map(|(part, (since, what))| {
                format!(
                    "{part} has made no progress for {} s: {what}",
                    since.elapsed().as_secs()
                )
            })
            .collect();
        (!stuck.is_empty()).then(|| stuck.join("\n"))
    }
}

/// Binds the metrics endpoint; returns the bound address (useful with port 0) and the
/// server future, which ends when `cancel` fires.
pub async fn serve(
    listen: &str,
    metrics: Metrics,
    health: Health,
    cancel: CancellationToken,
) -> std::io::Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let address = listener.local_addr()?;
    let router = Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        metrics.render(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let health = health.clone();
                async move {
                    match health.problem() {
                        None => (StatusCode::OK, "consuming\n".to_owned()).into_response(),
                        Some(problem) => (StatusCode::SERVICE_UNAVAILABLE, format!("{problem}\n"))
                            .into_response(),
                    }
                }
            }),
        );
    let server = async move {
        if let Err(error) = axum::serve(listener, router)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await
        {
            tracing::error!(%error, "The metrics endpoint stopped.");
        }
    };
    Ok((address, server))
}

/// Installs the tracing subscriber: text for people, JSON for log pipelines. `RUST_LOG`
/// overrides `log.level`.
pub fn init_logging(settings: &LogSettings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&settings.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if settings.format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    // A second initialisation (tests start several workers) keeps the first subscriber.
    let _ = result;
}

#[cfg(all(test, feature = "jemalloc", not(target_env = "msvc")))]
mod tests {
    use super::Health;
    use std::time::Duration;

    #[test]
    fn health_turns_unhealthy_when_work_stays_unfinished_and_says_what() {
        let health = Health::new(Duration::from_millis(30));
        assert!(health.problem().unwrap().contains("not consuming"));
        health.set(true);
        assert_eq!(health.problem(), None);
        health.begin("lane 1", "a batch of 7 messages is not committed yet");
        assert_eq!(health.problem(), None, "not yet past the threshold");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let problem = loop {
            if let Some(problem) = health.problem() {
                break problem;
            }
            assert!(std::time::Instant::now() < deadline, "never unhealthy");
            std::thread::yield_now();
        };
        assert!(
            problem.starts_with("lane 1 has made no progress for"),
            "{problem}"
        );
        assert!(problem.contains("a batch of 7 messages"), "{problem}");
        // A retry describes itself anew but keeps the first start.
        health.begin("lane 1", "retrying after an error");
        assert!(health
            .problem()
            .unwrap()
            .contains("retrying after an error"));
        health.done("lane 1");
        assert_eq!(health.problem(), None);
    }

    /// The allocator settings `.cargo/config.toml` builds in are the ones in effect: one
    /// arena and a background thread that returns freed pages (docs/performance.md).
    #[test]
    fn the_built_in_allocator_settings_are_in_effect() {
        let arenas = tikv_jemalloc_ctl::opt::narenas::read().expect("opt.narenas");
        let background =
            tikv_jemalloc_ctl::opt::background_thread::read().expect("opt.background_thread");
        assert_eq!(
            (arenas, background),
            (1, true),
            "jemalloc runs with other settings than the built-in ones \
             (JEMALLOC_SYS_WITH_MALLOC_CONF at build time, or MALLOC_CONF now: {:?})",
            std::env::var("MALLOC_CONF").ok()
        );
    }
}
