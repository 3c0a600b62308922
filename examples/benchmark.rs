//! The benchmark of issue 4: throughput, its two limits, latency and state growth of the
//! `entitlement-worker` binary against a real Kafka-protocol broker and PostgreSQL.
//!
//! Run it with `scripts/bench.sh [--events N] [--stored 10000,1000000] ...` (which builds
//! the worker and this example in release first); `--help` lists every option, and
//! docs/performance.md says what each figure means.
//!
//! What it does, in order:
//!
//! 1. starts its own Apache Kafka broker (one KRaft node run by `scripts/kafka-broker.sh`,
//!    on free ports, its data in a temporary directory) and creates the eight topics;
//! 2. generates a seeded, realistic stream (many organizations, heavy-tailed workspace
//!    sizes, joins and cancellations, modules, grants and refills, manual transfers) and
//!    loads it into the broker, measuring the produce rate;
//! 3. measures the two limits: a plain consumer reading the five input topics, and
//!    PostgreSQL absorbing one row per participant with `COPY`;
//! 4. runs the worker binary on a fresh database and measures end to end: from its start
//!    until every message is applied and the outbox is empty;
//! 5. repeats 4 with many participants already stored (`--stored`);
//! 6. restarts the worker on the first database, caught up, and measures input -> alert
//!    latency at a steady offered rate (on the same Kafka, or librdkafka's mock cluster);
//! 7. prints a table and writes the same figures as JSON (`--json`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use chrono::{DateTime, SecondsFormat, Utc};
use clap::Parser;
use entitlement_worker::settings::{Settings, TopicSettings};
use entitlement_worker::store::Stage;
use entitlement_worker::telemetry::LANE_WAIT_PHASES;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

/// Relations listed by name in the summary's WAL by relation (the JSON has them all).
const WAL_SHARES_SHOWN: usize = 16;
/// Modules the stream enables (any handle but `seat` is an advanced module).
const MODULES: [&str; 4] = ["gamification", "live-stream", "networking", "analytics"];
/// Organizations the latency phase uses: none of them ever gets a grant.
const LATENCY_ORGS: usize = 20;
/// Workspaces a latency phase spreads its events over at the least, and one per event per
/// second above that, so that hardly any batch holds two events of one workspace (the
/// worker folds the changes of one batch into one alert).
const LATENCY_WORKSPACES: usize = 2_000;

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Benchmark of entitlement-worker (issue 4): throughput, limits, latency, state growth"
)]
struct Args {
    /// Input events in the generated stream.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Organizations in the generated stream.
    #[arg(long, default_value_t = 200)]
    orgs: usize,
    /// Seed of the stream's random generator: the same seed gives the same stream.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Partitions per topic. Six, so that the worker's two lanes (and a second instance's)
    /// each get a share of every topic; with three, one lane gets two of them.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Offered rates of the latency phases, in participant-added events per second,
    /// comma-separated: one phase per rate, in order.
    #[arg(long, alias = "latency-rate", default_value = "2000,20000")]
    latency_rates: String,
    /// Duration of each latency phase; 0 skips them.
    #[arg(long, default_value_t = 30)]
    latency_seconds: u64,
    /// The worker's own instructions per event: two runs under valgrind's callgrind on the
    /// stream's first N1 and first N2 events (each on topics and a database of its own),
    /// and the difference of their counts over N2 - N1, so the start and the stop cancel
    /// out. "none" skips them.
    #[arg(long, default_value = "5000,25000")]
    instructions_events: String,
    /// Instances of the worker in one consumer group for the scale-out run: the same
    /// stream on a fresh database, beside the single instance's run; 1 or 0 skips it.
    #[arg(long, default_value_t = 2)]
    instances: usize,
    /// Seconds sent at the offered rate before each latency phase's measured seconds,
    /// and not counted: the first seconds of small fetches and produce requests after the
    /// catch-up runs' large ones ran seconds behind on a broker sharing two cores (its
    /// just-in-time compiler at work), and a second phase at the same rate did not.
    #[arg(long, default_value_t = 10)]
    latency_warmup_seconds: u64,
    /// The broker of the latency phase: the main Apache Kafka, which holds the stream, on
    /// the main topics (the default), or librdkafka's mock cluster in this process, on
    /// topics of its own. `--latency-storage` is an old name of this option.
    #[arg(long, alias = "latency-storage", value_enum, default_value_t = LatencyBroker::Kafka)]
    latency_broker: LatencyBroker,
    /// `linger.ms` of the latency phase's producer: how long it gathers messages into one
    /// produce request (librdkafka's default is 5). Its wait counts in every latency.
    #[arg(long, default_value_t = 5)]
    latency_linger_ms: u64,
    /// Participants already stored before an end-to-end run, one run per size,
    /// comma-separated (e.g. 10000,1000000,10000000); "none" skips the state-growth runs.
    #[arg(long, default_value = "10000,1000000")]
    stored: String,
    /// Where the JSON result goes.
    #[arg(long, default_value = "target/bench/result.json")]
    json: PathBuf,
    /// Keep the benchmark's databases (they are dropped at the end otherwise).
    #[arg(long)]
    keep: bool,
    /// The PostgreSQL server; each run gets a fresh database on it.
    #[arg(long, default_value = "postgres://postgres:postgres@127.0.0.1:5432")]
    database_server: String,
    /// The worker binary (default: target/release/entitlement-worker).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// Overrides batch.max_messages for the worker (default: the worker's default).
    #[arg(long)]
    batch_max_messages: Option<usize>,
    /// Overrides batch.max_wait_ms for the worker (default: the worker's default).
    #[arg(long)]
    batch_max_wait_ms: Option<u64>,
    /// An extra librdkafka property for the worker (KEY=VALUE, repeatable), passed in a
    /// `--config` file as `kafka.properties`; for experiments, none by default.
    #[arg(long = "worker-kafka-property", value_name = "KEY=VALUE")]
    worker_kafka_properties: Vec<String>,
    /// An extra environment variable for the worker process (KEY=VALUE, repeatable), e.g.
    /// MALLOC_ARENA_MAX=2; for experiments, none by default.
    #[arg(long = "worker-env", value_name = "KEY=VALUE")]
    worker_env: Vec<String>,
    /// Gives up on an end-to-end run after this long.
    #[arg(long, default_value_t = 1800)]
    run_timeout_seconds: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let sizes = parse_sizes(&args.stored, "--stored")?;
    let rates = parse_sizes(&args.latency_rates, "--latency-rates")?;
    let worker_bin = args.worker_bin.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/entitlement-worker")
    });
    if !worker_bin.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release` (scripts/bench.sh does)",
            worker_bin.display()
        );
    }
    let facts = machine_facts(&args).await?;
    println!(
        "entitlement-worker benchmark: {} events, seed {}, stored sizes {:?}, latency at {:?} ev/s for {} s each",
        fmt_int(args.events as u64),
        args.seed,
        sizes,
        rates,
        args.latency_seconds
    );
    let mut cleanup = Cleanup {
        server: args.database_server.clone(),
        databases: Vec::new(),
        keep: args.keep,
    };
    let outcome = bench(&args, &worker_bin, &sizes, &rates, &facts, &mut cleanup).await;
    cleanup.finish().await;
    let report = outcome?;
    let text = report.text();
    println!("\n{text}");
    if let Some(parent) = args.json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report.json())?)?;
    println!("JSON written to {}", args.json.display());
    Ok(())
}

/// A comma-separated list of numbers ("none" or nothing: none) given to `option`.
fn parse_sizes(text: &str, option: &str) -> anyhow::Result<Vec<u64>> {
    if text.trim().is_empty() || text.trim() == "none" {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|size| {
            size.trim()
                .replace('_', "")
                .parse::<u64>()
                .with_context(|| format!("{option}: {size:?} is not a number"))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The orchestration
// ---------------------------------------------------------------------------------------

struct Bench<'a> {
    args: &'a Args,
    worker_bin: PathBuf,
    brokers: String,
    /// The five input topics (the output names are set per run).
    inputs: TopicSettings,
    run_id: String,
    log_dir: PathBuf,
    /// The main broker's process id (the JVM), for the CPU accounting.
    kafka_pid: u32,
    clock_ticks: f64,
}

async fn bench(
    args: &Args,
    worker_bin: &Path,
    sizes: &[u64],
    rates: &[u64],
    facts: &Value,
    cleanup: &mut Cleanup,
) -> anyhow::Result<Report> {
    let all_started = Instant::now();
    let run_id = format!("{:x}", Utc::now().timestamp() & 0xff_ffff);
    let mut phases: Vec<(String, f64)> = Vec::new();
    let mut phase = Instant::now();
    let mut lap = |phases: &mut Vec<(String, f64)>, name: &str| {
        phases.push((name.to_owned(), phase.elapsed().as_secs_f64()));
        phase = Instant::now();
    };
    let log_dir = args
        .json
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!("logs-{run_id}"));
    std::fs::create_dir_all(&log_dir)?;
    let log_dir = std::fs::canonicalize(&log_dir)?;
    println!("worker and broker logs go to {}", log_dir.display());
    let kafka = Kafka::start(&log_dir)?;
    println!(
        "Apache Kafka {} listens on {} (pid {}, heap {KAFKA_HEAP}, data in {}); serving after {:.1} s",
        kafka_version(),
        kafka.brokers,
        kafka.pid,
        kafka.dir.path().display(),
        kafka.startup_seconds
    );
    let mut inputs = Settings::load(None)?.topics;
    for name in [
        &mut inputs.participant_added,
        &mut inputs.participant_cancelled,
        &mut inputs.module_enabled,
        &mut inputs.entitlement_granted,
        &mut inputs.transfer_requested,
    ] {
        *name = format!("bench-{run_id}-{name}");
    }
    // A copy of the binary, so that a rebuild during the benchmark cannot mix versions.
    let worker_copy = kafka.dir.path().join("entitlement-worker");
    std::fs::copy(worker_bin, &worker_copy).context("copying the worker binary")?;
    let bench = Bench {
        args,
        worker_bin: worker_copy,
        brokers: kafka.brokers.clone(),
        inputs,
        run_id,
        log_dir: log_dir.clone(),
        kafka_pid: kafka.pid,
        clock_ticks: clock_ticks(),
    };
    let main_settings = bench.run_settings("main", &format!("bench_{}_main", bench.run_id));
    entitlement_worker::kafka::admin::create_topics(
        &main_settings.kafka,
        &main_settings.topics,
        args.partitions,
        1,
    )
    .await
    .context("creating the topics")?;
    lap(&mut phases, "broker start and topics");

    // The stream.
    let started = Instant::now();
    let base = Utc::now() - chrono::Duration::days(8);
    let (events, stream) = generate(args.events, args.orgs, args.seed, base);
    let generate_seconds = started.elapsed().as_secs_f64();
    println!(
        "generated {} events in {:.1} s: {} organizations, {} workspaces (largest {} participants)",
        fmt_int(events.len() as u64),
        generate_seconds,
        stream.orgs,
        fmt_int(stream.workspaces),
        fmt_int(stream.largest_workspace)
    );
    let produced = {
        let brokers = bench.brokers.clone();
        let topics = bench.inputs.clone();
        let events = Arc::new(events);
        let for_producer = events.clone();
        let produced =
            tokio::task::spawn_blocking(move || produce_stream(&brokers, &topics, &for_producer))
                .await??;
        println!(
            "loaded into the broker: {} messages in {:.1} s = {} msgs/s",
            fmt_int(produced.messages),
            produced.seconds,
            fmt_int(produced.rate() as u64)
        );
        (produced, Arc::try_unwrap(events).ok().expect("one owner"))
    };
    let (produced, events) = produced;
    let total = produced.messages as i64;
    lap(&mut phases, "stream generated and loaded");

    // Limit (a): a plain consumer.
    let consumer_limit = {
        let brokers = bench.brokers.clone();
        let topics = bench.inputs.clone();
        let partitions = args.partitions;
        let target = produced.messages;
        tokio::task::spawn_blocking(move || plain_consumer(&brokers, &topics, partitions, target))
            .await??
    };
    println!(
        "limit (a) plain consumer: {} msgs in {:.2} s = {} msgs/s",
        fmt_int(consumer_limit.messages),
        consumer_limit.seconds,
        fmt_int(consumer_limit.rate() as u64)
    );
    lap(&mut phases, "limit (a) plain consumer");

    // Beside it, Kafka's own consumer benchmark on the largest input topic.
    let kafka_perf = {
        let brokers = bench.brokers.clone();
        let topic = bench.inputs.participant_added.clone();
        let partitions = args.partitions;
        tokio::task::spawn_blocking(move || kafka_consumer_perf(&brokers, &topic, partitions))
            .await?
    };
    match &kafka_perf {
        Ok(perf) => println!("{}", perf.line()),
        Err(error) => println!("kafka-consumer-perf-test did not run: {error:#}"),
    }
    let kafka_perf = kafka_perf.ok();
    lap(&mut phases, "kafka-consumer-perf-test");

    // Limit (b): PostgreSQL COPY, in the main run's database before the worker runs.
    cleanup
        .databases
        .push(database_name(&main_settings.database.url));
    entitlement_worker::store::Store::connect(&main_settings.database)
        .await
        .context("creating the main database")?;
    let copy_rows = participant_rows(&events);
    let participant_events = events
        .iter()
        .filter(|event| matches!(event.kind, Kind::Added | Kind::Cancelled))
        .count() as u64;
    // Only the prefix the instruction counts replay is kept.
    let counts = parse_sizes(&args.instructions_events, "--instructions-events")?;
    let mut prefix = events;
    prefix.truncate(counts.iter().copied().max().unwrap_or(0) as usize);
    let copy_limit = copy_limit(&main_settings.database.url, &copy_rows).await?;
    drop(copy_rows);
    println!(
        "limit (b) PostgreSQL COPY: {} rows in {:.2} s = {} rows/s",
        fmt_int(copy_limit.messages),
        copy_limit.seconds,
        fmt_int(copy_limit.rate() as u64)
    );
    lap(&mut phases, "limit (b) COPY, with the database's creation");

    // End to end on a fresh database.
    let main_run = bench
        .end_to_end("main", &main_settings, total, 0, 0.0)
        .await?;
    println!("{}", main_run.one_line());
    lap(
        &mut phases,
        "end to end, fresh database (with the worker's stop)",
    );

    // The same stream without the state topic (state.publish = false), on a fresh database:
    // what the state messages cost.
    let mut settings = bench.fresh_run("nostate", cleanup).await?;
    settings.state.publish = false;
    let without_state = bench
        .end_to_end("nostate", &settings, total, 0, 0.0)
        .await?;
    println!("{}", without_state.one_line());
    println!(
        "state topic: {} events/s with it, {} without it ({:.1}% of the rate without)",
        fmt_int(main_run.rate() as u64),
        fmt_int(without_state.rate() as u64),
        100.0 * main_run.rate() / without_state.rate()
    );
    if !args.keep {
        cleanup
            .drop_now(&database_name(&settings.database.url))
            .await;
    }
    lap(&mut phases, "end to end without the state topic");

    // Scale-out: several instances in one group on the same stream, broker and database.
    let scale_out = if args.instances > 1 {
        let label = format!("x{}", args.instances);
        let settings = bench.fresh_run(&label, cleanup).await?;
        let run = bench
            .instances_run(&label, &settings, total, args.instances)
            .await?;
        println!(
            "{} instances in one group: {} events/s ({} with one, {:.0}%)",
            args.instances,
            fmt_int(run.rate() as u64),
            fmt_int(main_run.rate() as u64),
            100.0 * run.rate() / main_run.rate()
        );
        if !args.keep {
            cleanup
                .drop_now(&database_name(&settings.database.url))
                .await;
        }
        lap(&mut phases, "end to end with several instances");
        Some(run)
    } else {
        None
    };

    // The worker's own instructions per event.
    let instructions = match counts.as_slice() {
        [] => Err("skipped (--instructions-events none)".to_owned()),
        [first, second] if first < second => {
            bench
                .instructions(&prefix, &[*first as usize, *second as usize], cleanup)
                .await
        }
        _ => bail!("--instructions-events takes two counts, the smaller first"),
    };
    match &instructions {
        Ok(instructions) => println!("{}", instructions.one_line()),
        Err(why) => println!("instructions per event: not measured ({why})"),
    }
    lap(
        &mut phases,
        "instructions per event (two runs under callgrind)",
    );

    // State growth.
    let mut growth = Vec::new();
    for size in sizes {
        let label = format!("s{size}");
        let settings = bench.fresh_run(&label, cleanup).await?;
        let started = Instant::now();
        let populated = populate(&settings.database.url, *size, args.seed).await?;
        let populate_seconds = started.elapsed().as_secs_f64();
        lap(
            &mut phases,
            &format!("store {} participants", fmt_int(*size)),
        );
        println!(
            "stored {} participants in {} workspaces of {} organizations in {:.1} s",
            fmt_int(populated.participants),
            fmt_int(populated.workspaces),
            fmt_int(populated.orgs),
            populate_seconds
        );
        let run = bench
            .end_to_end(&label, &settings, total, *size, populate_seconds)
            .await?;
        println!("{}", run.one_line());
        growth.push(run);
        if !args.keep {
            cleanup
                .drop_now(&database_name(&settings.database.url))
                .await;
        }
        lap(
            &mut phases,
            &format!("end to end, {} stored", fmt_int(*size)),
        );
    }

    // Latency, on the main run's database, caught up, one phase per rate.
    let mut latency = Vec::new();
    let mut applied = total;
    for (phase, rate) in rates.iter().enumerate() {
        if args.latency_seconds == 0 {
            break;
        }
        let (result, now_applied) = bench
            .latency(&main_settings, applied, (*rate).max(1), phase)
            .await?;
        applied = now_applied;
        println!("{}", result.one_line());
        lap(
            &mut phases,
            &format!("latency at {rate} ev/s (catch-up, warm-up, sending, draining)"),
        );
        latency.push(result);
    }
    drop(kafka);
    Ok(Report {
        args: args.clone(),
        facts: facts.clone(),
        stream,
        generate_seconds,
        produced,
        consumer_limit,
        kafka_perf,
        copy_limit,
        participant_events,
        main_run,
        without_state,
        scale_out,
        instructions,
        growth,
        latency,
        phases,
        total_seconds: all_started.elapsed().as_secs_f64(),
    })
}

/// The stream applied by several instances of the worker in one consumer group.
struct ScaleOut {
    instances: usize,
    events: u64,
    seconds: f64,
    /// Per instance: peak RSS (KiB) and exit code.
    workers: Vec<(u64, Option<i32>)>,
    /// PostgreSQL's and the broker's cores and the machine's over the run.
    cpu: CpuShare,
}

impl ScaleOut {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds.max(1e-9)
    }

    fn json(&self) -> Value {
        json!({
            "instances": self.instances, "events": self.events, "seconds": self.seconds,
            "events_per_second": self.rate(),
            "workers": self.workers.iter().map(|(rss, exit)| json!({
                "peak_rss_mib": *rss as f64 / 1024.0, "exit_code": exit,
            })).collect::<Vec<_>>(),
            "cpu": self.cpu.json(),
        })
    }
}

/// The worker's instructions over two prefixes of the stream (callgrind's `Ir`).
struct Instructions {
    /// (events, instructions, seconds under callgrind) per run, the smaller first.
    runs: Vec<(usize, u64, f64)>,
}

impl Instructions {
    /// Instructions per event between the two runs: what one more event costs.
    fn per_event(&self) -> f64 {
        let (small, large) = (&self.runs[0], &self.runs[1]);
        (large.1 as f64 - small.1 as f64) / (large.0 - small.0).max(1) as f64
    }

    fn one_line(&self) -> String {
        let runs: Vec<String> = self
            .runs
            .iter()
            .map(|(events, instructions, seconds)| {
                format!(
                    "{} events {} instructions ({seconds:.0} s under callgrind)",
                    fmt_int(*events as u64),
                    fmt_int(*instructions)
                )
            })
            .collect();
        format!(
            "instructions per event (the worker's own, valgrind --tool=callgrind): {}; {}",
            fmt_int(self.per_event().max(0.0) as u64),
            runs.join(", ")
        )
    }

    fn json(&self) -> Value {
        json!({
            "per_event": self.per_event(),
            "runs": self.runs.iter().map(|(events, instructions, seconds)| json!({
                "events": events, "instructions": instructions, "seconds": seconds,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Callgrind's total of instructions executed (its `summary:` line) in `path`.
fn callgrind_total(path: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading callgrind's output {}", path.display()))?;
    text.lines()
        .find_map(|line| line.strip_prefix("summary:"))
        .and_then(|total| total.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no summary line in {}", path.display()))
}

impl Bench<'_> {
    /// Starts `instances` workers in one consumer group on `settings` and measures until
    /// `total` messages are applied and the outbox is empty.
    async fn instances_run(
        &self,
        label: &str,
        settings: &Settings,
        total: i64,
        instances: usize,
    ) -> anyhow::Result<ScaleOut> {
        let pool = monitor_pool(&settings.database.url).await?;
        let mut workers = Vec::new();
        for instance in 0..instances {
            workers.push(self.start_worker(settings, &format!("{label}-{instance}"))?);
        }
        let started = workers[0].started;
        let meter_stop = Arc::new(AtomicBool::new(false));
        let meter = meter_in_background(
            CpuMeter::new(workers[0].child.id(), self.kafka_pid, self.clock_ticks),
            meter_stop.clone(),
        );
        let deadline = Duration::from_secs(self.args.run_timeout_seconds);
        let seconds = loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            for worker in &mut workers {
                if let Some(status) = worker.child.try_wait()? {
                    bail!(
                        "a worker exited with {status} during run {label}; log {}:\n{}",
                        worker.log.display(),
                        worker.tail_of_log()
                    );
                }
            }
            if started.elapsed() > deadline {
                bail!("run {label}: not done after {deadline:?}");
            }
            if applied(&pool).await >= total && outbox_backlog(&pool).await == 0 {
                break started.elapsed().as_secs_f64();
            }
        };
        meter_stop.store(true, Ordering::SeqCst);
        let cpu = meter.await?;
        let mut summary = Vec::new();
        for worker in &mut workers {
            let rss = proc_status_kib(worker.child.id(), "VmHWM").unwrap_or(0);
            let (exit, _) = worker.terminate(Duration::from_secs(60));
            summary.push((rss, exit));
        }
        pool.close().await;
        Ok(ScaleOut {
            instances,
            events: total as u64,
            seconds,
            workers: summary,
            cpu,
        })
    }

    /// Runs the worker under callgrind on the first `counts[i]` events of the stream, each
    /// run on input topics and a database of its own, until everything is applied and
    /// published; the worker's instructions per run. Err says why it was not measured.
    async fn instructions(
        &self,
        events: &[Event],
        counts: &[usize],
        cleanup: &mut Cleanup,
    ) -> Result<Instructions, String> {
        if Command::new("valgrind")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            return Err("valgrind is not installed; scripts/bench.sh installs it".to_owned());
        }
        let mut runs = Vec::new();
        for &count in counts {
            let run = self
                .instructions_run(&events[..count.min(events.len())], cleanup)
                .await
                .map_err(|error| format!("the run on {count} events failed: {error:#}"))?;
            runs.push(run);
        }
        Ok(Instructions { runs })
    }

    async fn instructions_run(
        &self,
        events: &[Event],
        cleanup: &mut Cleanup,
    ) -> anyhow::Result<(usize, u64, f64)> {
        let label = format!("instr{}", events.len());
        let mut settings = self.fresh_run(&label, cleanup).await?;
        // Input topics of the run's own, named like the shared ones (`bench`).
        let topics = &mut settings.topics;
        for name in [
            &mut topics.participant_added,
            &mut topics.participant_cancelled,
            &mut topics.module_enabled,
            &mut topics.entitlement_granted,
            &mut topics.transfer_requested,
        ] {
            let base = name
                .rsplit_once(&format!("bench-{}-", self.run_id))
                .map_or(name.as_str(), |(_, base)| base);
            *name = format!("bench-{}-{label}-{base}", self.run_id);
        }
        entitlement_worker::kafka::admin::create_topics(
            &settings.kafka,
            &settings.topics,
            self.args.partitions,
            1,
        )
        .await?;
        let produced = {
            let brokers = self.brokers.clone();
            let topics = settings.topics.clone();
            let events = events.to_vec();
            tokio::task::spawn_blocking(move || produce_stream(&brokers, &topics, &events))
                .await??
        };
        let total = produced.messages as i64;
        let out = self.log_dir.join(format!("callgrind-{label}.out"));
        let wrapper = [
            "valgrind".to_owned(),
            "--tool=callgrind".to_owned(),
            format!("--callgrind-out-file={}", out.display()),
        ];
        let pool = monitor_pool(&settings.database.url).await?;
        let mut worker = self.start_worker_under(&wrapper, &settings, &label)?;
        let deadline = Duration::from_secs(self.args.run_timeout_seconds);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Some(status) = worker.child.try_wait()? {
                bail!(
                    "the worker exited with {status} under callgrind; log {}:\n{}",
                    worker.log.display(),
                    worker.tail_of_log()
                );
            }
            if worker.started.elapsed() > deadline {
                bail!(
                    "not done after {deadline:?} under callgrind (applied {} of {total})",
                    applied(&pool).await
                );
            }
            if applied(&pool).await >= total && outbox_backlog(&pool).await == 0 {
                break;
            }
        }
        let seconds = worker.started.elapsed().as_secs_f64();
        let (exit, _) = worker.terminate(Duration::from_secs(300));
        pool.close().await;
        if exit != Some(0) {
            bail!("the worker under callgrind exited with {exit:?}");
        }
        if !self.args.keep {
            cleanup
                .drop_now(&database_name(&settings.database.url))
                .await;
        }
        Ok((events.len(), callgrind_total(&out)?, seconds))
    }

    /// The settings of a run on a database of its own (created and migrated, dropped at
    /// the end) with output topics of its own, created.
    async fn fresh_run(&self, label: &str, cleanup: &mut Cleanup) -> anyhow::Result<Settings> {
        let settings = self.run_settings(label, &format!("bench_{}_{label}", self.run_id));
        cleanup
            .databases
            .push(database_name(&settings.database.url));
        entitlement_worker::kafka::admin::create_topics(
            &settings.kafka,
            &settings.topics,
            self.args.partitions,
            1,
        )
        .await?;
        entitlement_worker::store::Store::connect(&settings.database)
            .await
            .with_context(|| format!("creating and migrating the database of run {label}"))?;
        Ok(settings)
    }

    /// Settings for one run: the shared input topics, output topics of the run's own, a
    /// fresh consumer group, and the given database.
    fn run_settings(&self, label: &str, database: &str) -> Settings {
        let mut settings = Settings::load(None).expect("the defaults load");
        settings.kafka.brokers = self.brokers.clone();
        settings.kafka.group_id = format!(
            "bench-{}-{label}-{:08x}",
            self.run_id,
            rand::random::<u32>()
        );
        settings.kafka.session_timeout_ms = 6000;
        settings.database.url = format!("{}/{database}", self.args.database_server);
        if let Some(messages) = self.args.batch_max_messages {
            settings.batch.max_messages = messages;
        }
        if let Some(wait) = self.args.batch_max_wait_ms {
            settings.batch.max_wait_ms = wait;
        }
        let mut topics = self.inputs.clone();
        for name in [
            &mut topics.shortfalls,
            &mut topics.ledger,
            &mut topics.dlq,
            &mut topics.state,
        ] {
            *name = format!("bench-{}-{label}-{name}", self.run_id);
        }
        settings.topics = topics;
        settings
    }

    fn start_worker(&self, settings: &Settings, label: &str) -> anyhow::Result<WorkerProcess> {
        self.start_worker_under(&[], settings, label)
    }

    fn start_worker_under(
        &self,
        wrapper: &[String],
        settings: &Settings,
        label: &str,
    ) -> anyhow::Result<WorkerProcess> {
        let mut arguments = Vec::new();
        if !self.args.worker_kafka_properties.is_empty() {
            let mut toml = String::from("[kafka.properties]\n");
            for property in &self.args.worker_kafka_properties {
                let Some((key, value)) = property.split_once('=') else {
                    bail!("--worker-kafka-property {property:?} is not KEY=VALUE");
                };
                toml.push_str(&format!("{key:?} = {value:?}\n"));
            }
            let path = self.log_dir.join("worker-extra.toml");
            std::fs::write(&path, toml)?;
            arguments = vec!["--config".to_owned(), path.to_string_lossy().into_owned()];
        }
        let mut extra = Vec::new();
        for variable in &self.args.worker_env {
            let Some((key, value)) = variable.split_once('=') else {
                bail!("--worker-env {variable:?} is not KEY=VALUE");
            };
            extra.push((key.to_owned(), value.to_owned()));
        }
        WorkerProcess::start(
            wrapper,
            &self.worker_bin,
            settings,
            &arguments,
            &extra,
            &self.log_dir.join(format!("worker-{label}.log")),
        )
    }

    /// Starts the worker binary on `settings` and measures until `total` messages are
    /// applied and the outbox is empty.
    async fn end_to_end(
        &self,
        label: &str,
        settings: &Settings,
        total: i64,
        stored: u64,
        populate_seconds: f64,
    ) -> anyhow::Result<RunResult> {
        let pool = monitor_pool(&settings.database.url).await?;
        let mut worker = self.start_worker(settings, label)?;
        let pid = worker.child.id();
        let started = worker.started;
        let deadline = Duration::from_secs(self.args.run_timeout_seconds);
        let mut healthy_at = None;
        let mut progress_at = None;
        let mut applied_at = None;
        let mut timeline = Vec::new();
        let meter_stop = Arc::new(AtomicBool::new(false));
        let meter = meter_in_background(
            CpuMeter::new(pid, self.kafka_pid, self.clock_ticks),
            meter_stop.clone(),
        );
        let wal_start = wal_bytes(&pool).await;
        let wal_window = WalWindow::open(&settings.database.url).await;
        let checkpoints_start = checkpoints(&pool).await;
        let mut next_sample = started + Duration::from_secs(1);
        let done_at = loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Some(status) = worker.child.try_wait()? {
                bail!(
                    "the worker exited with {status} during run {label}; log {}:\n{}",
                    worker.log.display(),
                    worker.tail_of_log()
                );
            }
            if started.elapsed() > deadline {
                bail!(
                    "run {label}: not done after {deadline:?} (applied {} of {total}); log {}:\n{}",
                    applied(&pool).await,
                    worker.log.display(),
                    worker.tail_of_log()
                );
            }
            let now = Instant::now();
            if healthy_at.is_none()
                && http_get(&worker.metrics_address, "/healthz")
                    .is_some_and(|(code, _)| code == 200)
            {
                healthy_at = Some(now - started);
            }
            let count = applied(&pool).await;
            if progress_at.is_none() && count > 0 {
                progress_at = Some(now - started);
            }
            if applied_at.is_none() && count >= total {
                applied_at = Some(now - started);
            }
            let sample_due = now >= next_sample;
            let backlog = if sample_due || count >= total {
                Some(outbox_backlog(&pool).await)
            } else {
                None
            };
            if sample_due {
                next_sample += Duration::from_secs(1);
                let metrics = http_get(&worker.metrics_address, "/metrics")
                    .map(|(_, body)| MetricsSummary::parse(&body))
                    .unwrap_or_default();
                timeline.push(Sample {
                    seconds: (now - started).as_secs_f64(),
                    applied: count,
                    outbox: backlog.unwrap_or(-1),
                    rss_kib: proc_status_kib(pid, "VmRSS").unwrap_or(0),
                    heap_allocated: metrics.heap_allocated,
                    heap_resident: metrics.heap_resident,
                    consumer_queued: metrics.consumer_queued,
                    batches: metrics.batches,
                    commit_seconds: metrics.commit_seconds_sum,
                });
            }
            if count >= total && backlog == Some(0) {
                break now - started;
            }
        };
        meter_stop.store(true, Ordering::SeqCst);
        let cpu = meter.await?;
        let peak_rss_kib = proc_status_kib(pid, "VmHWM").unwrap_or(0);
        let metrics = http_get(&worker.metrics_address, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default();
        let wal = wal_bytes(&pool).await - wal_start;
        let wal_end = wal_window.end(&pool).await;
        let checkpoints = checkpoints(&pool).await - checkpoints_start;
        let (exit, stop_seconds) = worker.terminate(Duration::from_secs(60));
        let log = scan_log(&worker.log);
        // After the worker's sessions ended, so that their statistics are all flushed.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let tables = table_statistics(&pool).await;
        let wal_by_relation = wal_window.attribute(wal_end).await;
        pool.close().await;
        Ok(RunResult {
            label: label.to_owned(),
            stored,
            populate_seconds,
            events: total as u64,
            seconds: done_at.as_secs_f64(),
            healthy_seconds: healthy_at.map(|at| at.as_secs_f64()),
            first_progress_seconds: progress_at.map(|at| at.as_secs_f64()),
            applied_seconds: applied_at.map(|at| at.as_secs_f64()),
            peak_rss_kib,
            timeline,
            cpu,
            metrics: MetricsSummary::parse(&metrics),
            exit,
            stop_seconds,
            log,
            wal_bytes: wal,
            wal_by_relation,
            checkpoints,
            tables,
        })
    }

    /// Input -> alert latency at a steady offered `rate`, with the worker caught up on the
    /// main run's database, which has applied `main_total` messages; in the same run, the
    /// broker's own round trip (input produced -> the same input read back by a reader
    /// that fetches like the worker) for the same inputs. Phase `phase` has event ids and
    /// workspaces of its own. Returns the messages applied after it, too.
    async fn latency(
        &self,
        main: &Settings,
        main_total: i64,
        rate: u64,
        phase: usize,
    ) -> anyhow::Result<(LatencyResult, i64)> {
        let mut settings = main.clone();
        settings.kafka.group_id = format!("{}-latency-{phase}", main.kafka.group_id);
        // On the mock cluster the phase has topics of its own; the main database keeps its
        // state and its offsets of the main topics, and starts the new ones at 0.
        let mock = match self.args.latency_broker {
            LatencyBroker::Kafka => None,
            LatencyBroker::Mock => Some(MockCluster::new(1)?),
        };
        // The mock cluster runs in this process: its time counts as the harness's (and
        // the main Kafka's, idle then, as "kafka").
        let brokers = match &mock {
            Some(cluster) => cluster.bootstrap_servers(),
            None => self.brokers.clone(),
        };
        if let Some(cluster) = &mock {
            settings.kafka.brokers = brokers.clone();
            settings.topics.add_suffix(&format!("latency-{phase}"));
            for topic in settings.topics.all() {
                cluster
                    .create_topic(topic, self.args.partitions, 1)
                    .context("creating the latency phase's topics")?;
            }
        }
        println!(
            "latency: broker {brokers} ({})",
            self.args.latency_broker.name()
        );
        let input_topic = settings.topics.participant_added.clone();
        let pool = monitor_pool(&settings.database.url).await?;
        let mut worker = self.start_worker(&settings, "latency")?;
        let pid = worker.child.id();
        let wait = Duration::from_secs(300);
        let caught_up = wait_until(&pool, &worker, main_total, wait).await?;
        println!("latency: the worker is caught up after {caught_up:.1} s");

        // Warm-up: every workspace of the latency phase is claimed and short by one.
        let count = (rate * self.args.latency_seconds) as usize;
        let warm = (rate * self.args.latency_warmup_seconds) as usize;
        let workspaces = LATENCY_WORKSPACES.max(rate as usize).min(count).max(1);
        let prefix = format!("lat{phase}-");
        let warmup: Vec<(String, String, String)> = (0..workspaces)
            .map(|w| {
                let org = format!("lat-org-{:02}", w % LATENCY_ORGS);
                let payload = added_json(
                    &format!("lat{phase}w-{w:06}"),
                    &now_rfc3339(),
                    &org,
                    &format!("{prefix}ws-{w:06}"),
                    "wp-0",
                );
                (input_topic.clone(), org, payload)
            })
            .collect();
        {
            let brokers = brokers.clone();
            tokio::task::spawn_blocking(move || produce_simple(&brokers, &warmup)).await??;
        }
        wait_until(&pool, &worker, main_total + workspaces as i64, wait).await?;

        // The reader reads the shortfall topic and the input topic from their high
        // watermarks, asked for once the warm-up is applied and its alerts published, so
        // it reads only what comes after; only the phase's inputs and the alerts they
        // caused are kept. It fetches as the worker's lanes do (their fetch settings), so
        // that the round trip beside the worker's latency is the one a consumer like the
        // worker's sees.
        let fetch_defaults = entitlement_worker::kafka::consumer::consumer_defaults(&settings, 0);
        let stop = Arc::new(AtomicBool::new(false));
        let reader_count = Arc::new(AtomicU64::new(0));
        let reader = {
            let mut config = ClientConfig::new();
            config
                .set("bootstrap.servers", &brokers)
                .set("group.id", format!("bench-{}-alerts-{phase}", self.run_id))
                .set("enable.auto.commit", "false");
            for (key, value) in fetch_defaults
                .iter()
                .filter(|(key, _)| key.starts_with("fetch."))
            {
                config.set(*key, value);
            }
            let consumer: BaseConsumer = config.create()?;
            let alert_topic = settings.topics.shortfalls.clone();
            let mut assignment = TopicPartitionList::new();
            for topic in [&alert_topic, &input_topic] {
                for partition in 0..self.args.partitions {
                    let (_, high) = consumer
                        .fetch_watermarks(topic, partition, Duration::from_secs(10))
                        .with_context(|| format!("the high watermark of {topic}[{partition}]"))?;
                    assignment.add_partition_offset(topic, partition, Offset::Offset(high))?;
                }
            }
            consumer.assign(&assignment)?;
            let stop = stop.clone();
            let count = reader_count.clone();
            let input_topic = input_topic.clone();
            let prefix = prefix.clone();
            std::thread::spawn(move || {
                let mut alerts = Vec::new();
                let mut inputs = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let Some(Ok(message)) = consumer.poll(Duration::from_millis(20)) else {
                        continue;
                    };
                    let at = Instant::now();
                    count.fetch_add(1, Ordering::SeqCst);
                    let is_input = message.topic() == input_topic;
                    let field = if is_input { "event_id" } else { "caused_by" };
                    let index = message
                        .payload()
                        .and_then(|payload| serde_json::from_slice::<Value>(payload).ok())
                        .and_then(|value| value[field].as_str().map(str::to_owned))
                        .and_then(|id| id.strip_prefix(prefix.as_str())?.parse::<usize>().ok());
                    match (index, is_input) {
                        (Some(index), true) => inputs.push((index, at)),
                        (Some(index), false) => alerts.push((index, at)),
                        (None, _) => {}
                    }
                }
                (alerts, inputs)
            })
        };
        // Settled before anything is produced: its fetches going, nothing read for 2 s.
        let mut last = (u64::MAX, Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = reader_count.load(Ordering::SeqCst);
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() >= Duration::from_secs(2) {
                break;
            }
        }
        let read_before = reader_count.load(Ordering::SeqCst);
        println!(
            "latency: the reader is at the end of both topics ({read_before} messages read before the sending)"
        );

        let checkpoints_start = checkpoints(&pool).await;
        let meter_stop = Arc::new(AtomicBool::new(false));
        let meter = meter_in_background(
            CpuMeter::new(pid, self.kafka_pid, self.clock_ticks),
            meter_stop.clone(),
        );
        let paced = {
            let brokers = brokers.clone();
            let topic = input_topic.clone();
            let linger = self.args.latency_linger_ms;
            let prefix = prefix.clone();
            tokio::task::spawn_blocking(move || {
                produce_paced(
                    &brokers, &topic, &prefix, rate, warm, count, workspaces, linger,
                )
            })
            .await??
        };
        let expected = main_total + workspaces as i64 + (warm + count) as i64;
        let drained = wait_until(&pool, &worker, expected, wait).await?;
        meter_stop.store(true, Ordering::SeqCst);
        let cpu = meter.await?;
        let checkpoints = checkpoints(&pool).await - checkpoints_start;
        // Alerts published at the end may still be on their way to the reader.
        let settle = Instant::now();
        while settle.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        stop.store(true, Ordering::SeqCst);
        let (alerts, inputs) = reader
            .join()
            .map_err(|_| anyhow::anyhow!("the reader panicked"))?;
        let alerts_read = alerts.len() as u64;
        let peak_rss_kib = proc_status_kib(pid, "VmHWM").unwrap_or(0);
        let metrics = http_get(&worker.metrics_address, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default();
        let (exit, _) = worker.terminate(Duration::from_secs(60));
        let log = scan_log(&worker.log);
        pool.close().await;
        drop(mock);

        let seconds = self.args.latency_seconds as usize;
        // The warm-up's inputs have no start: they count in no distribution.
        let sent: Vec<Option<Instant>> = paced
            .sent
            .iter()
            .enumerate()
            .map(|(index, at)| (index >= warm).then_some(*at))
            .collect();
        let mut read_back: Vec<Option<Instant>> = vec![None; warm + count];
        for (index, at) in &inputs {
            if *index < warm {
                continue;
            }
            if let Some(slot @ None) = read_back.get_mut(*index) {
                *slot = Some(*at);
            }
        }
        let result = LatencyResult {
            on: self.args.latency_broker,
            offered_rate: rate,
            produced: count as u64,
            produce_seconds: paced.seconds,
            warmup_workspaces: workspaces as u64,
            alerts_read,
            alert: Distribution::of(&alerts, &sent, &paced, seconds),
            broker: Distribution::of(&inputs, &sent, &paced, seconds),
            added: Distribution::of(&alerts, &read_back, &paced, seconds),
            checkpoints,
            drained_seconds: drained,
            peak_rss_kib,
            cpu,
            metrics: MetricsSummary::parse(&metrics),
            exit,
            log,
        };
        Ok((result, expected))
    }
}

/// Latencies from the sending of each paced input to the first time something naming it
/// was read.
struct Distribution {
    matched: u64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    mean_ms: f64,
    /// p50 and max of the inputs sent in each second.
    per_second: Vec<(f64, f64)>,
}

impl Distribution {
    /// The time from `from[index]` to the first read of `index`, over the inputs that have
    /// both, with per-second figures by the second each input was sent in.
    fn of(
        read: &[(usize, Instant)],
        from: &[Option<Instant>],
        paced: &Paced,
        seconds: usize,
    ) -> Self {
        let mut seen = vec![false; from.len()];
        let mut latencies: Vec<f64> = Vec::with_capacity(from.len());
        let mut by_second: Vec<Vec<f64>> = vec![Vec::new(); seconds + 1];
        for (index, at) in read {
            let Some(Some(start)) = from.get(*index) else {
                continue;
            };
            if !seen[*index] {
                seen[*index] = true;
                let latency = at.saturating_duration_since(*start).as_secs_f64() * 1000.0;
                latencies.push(latency);
                let second = paced.sent[*index].duration_since(paced.started).as_secs() as usize;
                if let Some(bucket) = by_second.get_mut(second) {
                    bucket.push(latency);
                }
            }
        }
        latencies.sort_by(f64::total_cmp);
        let per_second = by_second
            .iter_mut()
            .filter(|bucket| !bucket.is_empty())
            .map(|bucket| {
                bucket.sort_by(f64::total_cmp);
                (percentile(bucket, 0.5), percentile(bucket, 1.0))
            })
            .collect();
        Self {
            matched: latencies.len() as u64,
            p50_ms: percentile(&latencies, 0.50),
            p99_ms: percentile(&latencies, 0.99),
            p999_ms: percentile(&latencies, 0.999),
            max_ms: latencies.last().copied().unwrap_or(f64::NAN),
            mean_ms: latencies.iter().sum::<f64>() / latencies.len().max(1) as f64,
            per_second,
        }
    }

    fn figures(&self) -> String {
        format!(
            "p50 {:.1} ms   p99 {:.1} ms   p99.9 {:.1} ms   max {:.1} ms   mean {:.1} ms",
            self.p50_ms, self.p99_ms, self.p999_ms, self.max_ms, self.mean_ms
        )
    }

    fn per_second_line(&self) -> String {
        self.per_second
            .iter()
            .map(|(p50, max)| format!("{p50:.0}/{max:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn json(&self) -> Value {
        json!({
            "matched": self.matched,
            "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "p999_ms": self.p999_ms,
            "max_ms": self.max_ms, "mean_ms": self.mean_ms,
            "per_second_of_sending": self.per_second.iter().map(|(p50, max)| json!({"p50_ms": p50, "max_ms": max})).collect::<Vec<_>>(),
        })
    }
}

/// Waits until `total` messages are applied and the outbox is empty; returns the seconds.
async fn wait_until(
    pool: &PgPool,
    worker: &WorkerProcess,
    total: i64,
    limit: Duration,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    loop {
        if applied(pool).await >= total && outbox_backlog(pool).await == 0 {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > limit {
            bail!(
                "not caught up after {limit:?} (applied {} of {total}); log {}:\n{}",
                applied(pool).await,
                worker.log.display(),
                worker.tail_of_log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn monitor_pool(url: &str) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .with_context(|| format!("connecting to {}", redact(url)))
}

/// Messages the worker applied: the sum of the next offsets it stored.
async fn applied(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT COALESCE(sum(next_offset), 0)::bigint FROM consumer_offsets")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

async fn outbox_backlog(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT coalesce(sum(messages + ledger_messages), 0)::bigint FROM outbox")
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

fn percentile(sorted: &[f64], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------------------
// The stream
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Added,
    Cancelled,
    Module,
    Grant,
    Transfer,
}

fn topic_of(topics: &TopicSettings, kind: Kind) -> &str {
    match kind {
        Kind::Added => &topics.participant_added,
        Kind::Cancelled => &topics.participant_cancelled,
        Kind::Module => &topics.module_enabled,
        Kind::Grant => &topics.entitlement_granted,
        Kind::Transfer => &topics.transfer_requested,
    }
}

#[derive(Clone)]
struct Event {
    /// Milliseconds after the stream's start at which the platform produces it.
    produce_at: i64,
    kind: Kind,
    org: u16,
    payload: String,
}

#[derive(Default, Clone)]
struct StreamStats {
    orgs: usize,
    workspaces: u64,
    largest_workspace: u64,
    huge_workspaces: Vec<u64>,
    median_workspace: u64,
    added: u64,
    cancelled: u64,
    cancelled_activated: u64,
    modules: u64,
    grants: u64,
    refills: u64,
    transfers: u64,
    transfers_by_viewers: u64,
    orgs_ample: usize,
    orgs_refilled: usize,
    orgs_short: usize,
    mean_bytes: f64,
    late_events: u64,
}

fn uuid(rng: &mut StdRng) -> String {
    uuid::Uuid::from_u128(rng.random::<u128>()).to_string()
}

fn rfc3339(base: DateTime<Utc>, offset_ms: i64) -> String {
    (base + chrono::Duration::milliseconds(offset_ms)).to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn added_json(id: &str, at: &str, org: &str, workspace: &str, participant: &str) -> String {
    format!(
        r#"{{"event_id":"{id}","occurred_at":"{at}","org_id":"{org}","workspace_id":"{workspace}","participant_id":"{participant}"}}"#
    )
}

/// Pareto(`minimum`, `alpha`): heavy-tailed sizes.
fn pareto(rng: &mut StdRng, minimum: f64, alpha: f64) -> f64 {
    let uniform: f64 = rng.random_range(f64::EPSILON..1.0);
    minimum / uniform.powf(1.0 / alpha)
}

/// A seeded stream of about `count` events (exactly `count` when enough were generated):
/// organizations of Zipf-like weights, workspaces of heavy-tailed sizes (a few huge ones),
/// participants joining and cancelling over a week, modules, grants with refills, a few
/// manual transfers; produced in time order with a small jitter and 1% arriving late.
fn generate(
    count: usize,
    orgs: usize,
    seed: u64,
    base: DateTime<Utc>,
) -> (Vec<Event>, StreamStats) {
    let mut rng = StdRng::seed_from_u64(seed);
    let orgs = orgs.clamp(1, 999);
    let span: i64 = 7 * 24 * 3_600_000;
    let scale = (count as f64 / 1_000_000.0).min(1.0);
    let weights: Vec<f64> = (0..orgs)
        .map(|rank| 1.0 / ((rank + 1) as f64).powf(0.7))
        .collect();
    let total_weight: f64 = weights.iter().sum();
    let cumulative: Vec<f64> = weights
        .iter()
        .scan(0.0, |sum, weight| {
            *sum += weight;
            Some(*sum)
        })
        .collect();
    let pick_org = |rng: &mut StdRng| -> usize {
        let point = rng.random::<f64>() * total_weight;
        cumulative
            .partition_point(|edge| *edge < point)
            .min(orgs - 1)
    };
    let org_name = |org: usize| format!("org-{org:03}");

    let mut events: Vec<Event> = Vec::with_capacity(count + count / 10);
    let mut stats = StreamStats {
        orgs,
        ..StreamStats::default()
    };
    // Per organization: counted participants and enabled modules, for the grants.
    let mut seat_demand = vec![0_i64; orgs];
    let mut module_demand: Vec<HashMap<&str, i64>> = vec![HashMap::new(); orgs];
    let mut sizes = Vec::new();
    let huge = ((4.0 * scale).round() as usize).max(1);
    let target = count + count / 33;
    let push = |events: &mut Vec<Event>, rng: &mut StdRng, at: i64, kind, org: usize, payload| {
        let late = rng.random_bool(0.01);
        let delay = if late {
            rng.random_range(0..600_000)
        } else {
            rng.random_range(0..2_000)
        };
        events.push(Event {
            produce_at: at + delay,
            kind,
            org: org as u16,
            payload,
        });
        late
    };
    let mut workspace = 0_u64;
    while events.len() < target {
        let org = pick_org(&mut rng);
        let is_huge = (workspace as usize) < huge;
        let size = if is_huge {
            (rng.random_range(20_000.0..60_000.0) * scale).round() as u64
        } else {
            (pareto(&mut rng, 8.0, 1.15).min(8_000.0 * scale.max(0.1))).round() as u64
        }
        .max(1);
        if is_huge {
            stats.huge_workspaces.push(size);
        }
        sizes.push(size);
        let ws = format!("ws-{org:03}-{workspace:06}");
        workspace += 1;
        let on = org_name(org);
        let start = rng.random_range(0..span * 8 / 10);
        let length = if is_huge {
            rng.random_range(72 * 3_600_000..120 * 3_600_000)
        } else {
            rng.random_range(2 * 3_600_000..48 * 3_600_000)
        };
        let end = (start + length).min(span);
        for p in 0..size {
            let joined = start + (rng.random::<f64>() * (end - start) as f64 * 0.9) as i64;
            let participant = format!("p-{p:06}");
            let payload = added_json(
                &uuid(&mut rng),
                &rfc3339(base, joined),
                &on,
                &ws,
                &participant,
            );
            stats.late_events +=
                push(&mut events, &mut rng, joined, Kind::Added, org, payload) as u64;
            stats.added += 1;
            let mut counted = true;
            if rng.random_bool(0.14) {
                let at = joined + 1 + (rng.random::<f64>() * (end - joined) as f64) as i64;
                let activated = rng.random_bool(0.5);
                counted = activated;
                let payload = format!(
                    r#"{{"event_id":"{}","occurred_at":"{}","org_id":"{on}","workspace_id":"{ws}","participant_id":"{participant}","activated":{activated}}}"#,
                    uuid(&mut rng),
                    rfc3339(base, at)
                );
                stats.late_events +=
                    push(&mut events, &mut rng, at, Kind::Cancelled, org, payload) as u64;
                stats.cancelled += 1;
                stats.cancelled_activated += activated as u64;
            }
            seat_demand[org] += counted as i64;
        }
        if rng.random_bool(0.3) {
            let how_many = if rng.random_bool(0.7) { 1 } else { 2 };
            let first = rng.random_range(0..MODULES.len());
            for m in 0..how_many {
                let module = MODULES[(first + m) % MODULES.len()];
                let at = start + rng.random_range(0..3_600_000);
                let payload = format!(
                    r#"{{"event_id":"{}","occurred_at":"{}","org_id":"{on}","workspace_id":"{ws}","module":"{module}"}}"#,
                    uuid(&mut rng),
                    rfc3339(base, at)
                );
                stats.late_events +=
                    push(&mut events, &mut rng, at, Kind::Module, org, payload) as u64;
                stats.modules += 1;
                *module_demand[org].entry(module).or_default() += 1;
                if rng.random_bool(0.05) {
                    let viewer = rng.random_bool(0.15);
                    let role = if viewer {
                        "viewer"
                    } else {
                        "entitlement_manager"
                    };
                    let at = at + rng.random_range(600_000..7_200_000);
                    let payload = transfer_json(
                        &uuid(&mut rng),
                        &rfc3339(base, at),
                        &on,
                        &ws,
                        module,
                        1,
                        &format!("u-{org:03}-{}", rng.random_range(0..5)),
                        role,
                    );
                    stats.late_events +=
                        push(&mut events, &mut rng, at, Kind::Transfer, org, payload) as u64;
                    stats.transfers += 1;
                    stats.transfers_by_viewers += viewer as u64;
                }
            }
        }
        if rng.random_bool(0.002) {
            let at = start + rng.random_range(0..(end - start).max(1));
            let quantity = rng.random_range(5..=20);
            let payload = transfer_json(
                &uuid(&mut rng),
                &rfc3339(base, at),
                &on,
                &ws,
                "seat",
                quantity,
                &format!("u-{org:03}-0"),
                "entitlement_manager",
            );
            stats.late_events +=
                push(&mut events, &mut rng, at, Kind::Transfer, org, payload) as u64;
            stats.transfers += 1;
        }
    }
    stats.workspaces = workspace;

    // Grants: most organizations hold enough; some run short and are refilled during the
    // stream; a few stay short.
    for org in 0..orgs {
        let on = org_name(org);
        let demand = seat_demand[org];
        let roll: f64 = rng.random();
        let (class, initial, refills): (usize, f64, Vec<(f64, f64)>) = if roll < 0.65 {
            (0, 1.15, vec![])
        } else if roll < 0.90 {
            (1, 0.5, vec![(0.3, 0.22), (0.5, 0.22), (0.7, 0.22)])
        } else {
            (2, 0.3, vec![(0.6, 0.2)])
        };
        match class {
            0 => stats.orgs_ample += 1,
            1 => stats.orgs_refilled += 1,
            _ => stats.orgs_short += 1,
        }
        let grant = |events: &mut Vec<Event>,
                     rng: &mut StdRng,
                     at: i64,
                     product: &str,
                     quantity: i64,
                     kind: &str,
                     expires: Option<i64>| {
            let mut left = quantity;
            while left > 0 {
                let piece = left.min(1_000_000);
                left -= piece;
                let expires = expires
                    .map(|at| format!(r#","expires_at":"{}""#, rfc3339(base, at)))
                    .unwrap_or_default();
                let payload = format!(
                    r#"{{"event_id":"{}","occurred_at":"{}","org_id":"{on}","product":"{product}","quantity":{piece}{expires},"source":{{"kind":"{kind}","reference":"ref-{}"}}}}"#,
                    uuid(rng),
                    rfc3339(base, at),
                    rng.random_range(10_000..99_999)
                );
                push(events, rng, at, Kind::Grant, org, payload);
            }
        };
        let first = (demand as f64 * initial).ceil() as i64 + 10;
        let at = rng.random_range(0..60_000);
        grant(&mut events, &mut rng, at, "seat", first, "plan", None);
        stats.grants += 1;
        for (when, share) in refills {
            let quantity = (demand as f64 * share).ceil() as i64 + 1;
            let kind = if rng.random_bool(0.5) {
                "add_on"
            } else {
                "subscription"
            };
            grant(
                &mut events,
                &mut rng,
                (span as f64 * when) as i64,
                "seat",
                quantity,
                kind,
                None,
            );
            stats.grants += 1;
            stats.refills += 1;
        }
        if rng.random_bool(0.2) {
            // A trial that expires well after the benchmark.
            let at = rng.random_range(0..span / 2);
            grant(
                &mut events,
                &mut rng,
                at,
                "seat",
                50,
                "trial",
                Some(span + 30 * 24 * 3_600_000),
            );
            stats.grants += 1;
        }
        let mut modules: Vec<(&str, i64)> =
            module_demand[org].iter().map(|(m, n)| (*m, *n)).collect();
        modules.sort();
        for (module, enabled) in modules {
            let quantity = match class {
                0 => enabled,
                1 => (enabled as f64 * 0.6).ceil() as i64,
                _ => 0,
            };
            if quantity > 0 {
                let at = rng.random_range(0..60_000);
                grant(&mut events, &mut rng, at, module, quantity, "add_on", None);
                stats.grants += 1;
            }
        }
    }
    events.sort_by_key(|event| event.produce_at);
    events.truncate(count);
    // The counts above are of what was generated; recount what is kept.
    let mut kept = [0_u64; 5];
    let mut bytes = 0_u64;
    for event in &events {
        kept[event.kind as usize] += 1;
        bytes += event.payload.len() as u64;
    }
    stats.added = kept[Kind::Added as usize];
    stats.cancelled = kept[Kind::Cancelled as usize];
    stats.modules = kept[Kind::Module as usize];
    stats.grants = kept[Kind::Grant as usize];
    stats.transfers = kept[Kind::Transfer as usize];
    stats.mean_bytes = bytes as f64 / events.len().max(1) as f64;
    sizes.sort_unstable();
    stats.largest_workspace = sizes.last().copied().unwrap_or(0);
    stats.median_workspace = sizes.get(sizes.len() / 2).copied().unwrap_or(0);
    (events, stats)
}

#[allow(clippy::too_many_arguments)]
fn transfer_json(
    id: &str,
    at: &str,
    org: &str,
    ws: &str,
    product: &str,
    quantity: i64,
    user: &str,
    role: &str,
) -> String {
    format!(
        r#"{{"event_id":"{id}","occurred_at":"{at}","org_id":"{org}","workspace_id":"{ws}","product":"{product}","quantity":{quantity},"requested_by":{{"user_id":"{user}","role":"{role}"}}}}"#
    )
}

// ---------------------------------------------------------------------------------------
// Kafka: loading the stream, the plain consumer, paced production
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Deliveries {
    delivered: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.delivered.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

fn producer(brokers: &str, linger_ms: &str) -> anyhow::Result<BaseProducer<Deliveries>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", linger_ms)
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create_with_context(Deliveries::default())?)
}

/// Sends one record, waiting for room in the local queue when it is full.
fn send(
    producer: &BaseProducer<Deliveries>,
    topic: &str,
    key: &str,
    payload: &str,
) -> anyhow::Result<()> {
    loop {
        match producer.send(BaseRecord::to(topic).key(key).payload(payload)) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                producer.poll(Duration::from_millis(5));
            }
            Err((error, _)) => bail!("could not produce to {topic}: {error}"),
        }
    }
}

fn finish(producer: &BaseProducer<Deliveries>, sent: u64) -> anyhow::Result<()> {
    producer.flush(Duration::from_secs(300))?;
    let context = producer.context();
    let (delivered, failed) = (
        context.delivered.load(Ordering::SeqCst),
        context.failed.load(Ordering::SeqCst),
    );
    if failed > 0 || delivered != sent {
        bail!("{failed} messages failed, {delivered} of {sent} delivered");
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Rate {
    messages: u64,
    seconds: f64,
    /// What should have been read or written, where that is known independently.
    expected: u64,
}

impl Rate {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds.max(1e-9)
    }
}

/// What Kafka's own consumer benchmark (`kafka-consumer-perf-test`, the class
/// `org.apache.kafka.tools.ConsumerPerformance` of the jars scripts/ensure-kafka.sh resolves)
/// read of one topic, from its own CSV line.
struct KafkaPerf {
    topic: String,
    messages: u64,
    megabytes: f64,
    /// Joining the group, before the first fetch.
    rebalance_ms: f64,
    /// From the first fetch to the last message.
    fetch_ms: f64,
}

impl KafkaPerf {
    fn rate(&self) -> f64 {
        self.messages as f64 / (self.fetch_ms / 1000.0).max(1e-9)
    }

    fn line(&self) -> String {
        format!(
            "(a') kafka-consumer-perf-test, 1 topic      {:>10} msgs/s   ({} msgs, {:.1} MB, of {} in {:.2} s of fetching after {:.2} s joining its group; Java client, one JVM)",
            fmt_int(self.rate() as u64),
            fmt_int(self.messages),
            self.megabytes,
            self.topic,
            self.fetch_ms / 1000.0,
            self.rebalance_ms / 1000.0
        )
    }

    fn json(&self) -> Value {
        json!({
            "topic": self.topic, "messages": self.messages, "megabytes": self.megabytes,
            "rebalance_ms": self.rebalance_ms, "fetch_ms": self.fetch_ms, "per_second": self.rate(),
        })
    }
}

/// Runs `kafka-consumer-perf-test` over every message of `topic`.
fn kafka_consumer_perf(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<KafkaPerf> {
    let watermarks: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let mut messages = 0;
    for partition in 0..partitions {
        let (low, high) = watermarks.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
        messages += high - low;
    }
    drop(watermarks);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ensured = Command::new(root.join("scripts/ensure-kafka.sh"))
        .stderr(Stdio::inherit())
        .output()
        .context("running scripts/ensure-kafka.sh")?;
    let cache = String::from_utf8_lossy(&ensured.stdout)
        .lines()
        .last()
        .map(str::to_owned)
        .context("scripts/ensure-kafka.sh printed no cache directory")?;
    let classpath = std::fs::read_to_string(Path::new(&cache).join("classpath"))?;
    let output = Command::new("java")
        .args(["-Xmx512m", "-cp", classpath.trim()])
        .arg(format!(
            "-Dlog4j2.configurationFile={cache}/tools-log4j2.properties"
        ))
        .arg("org.apache.kafka.tools.ConsumerPerformance")
        .args(["--bootstrap-server", brokers, "--topic", topic])
        .args(["--messages", &messages.to_string()])
        .args([
            "--group",
            &format!("bench-perf-{:08x}", rand::random::<u32>()),
        ])
        .args(["--timeout", "60000", "--hide-header"])
        .stderr(Stdio::inherit())
        .output()
        .context("java could not run ConsumerPerformance")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "ConsumerPerformance exited with {}: {stdout}",
            output.status
        );
    }
    // start.time, end.time, data.consumed.in.MB, MB.sec, data.consumed.in.nMsg, nMsg.sec,
    // rebalance.time.ms, fetch.time.ms, fetch.MB.sec, fetch.nMsg.sec
    let fields: Vec<&str> = stdout
        .lines()
        .rfind(|line| line.contains(','))
        .context("ConsumerPerformance printed no figures")?
        .split(',')
        .map(str::trim)
        .collect();
    let number = |index: usize| -> anyhow::Result<f64> {
        fields
            .get(index)
            .and_then(|field| field.parse::<f64>().ok())
            .with_context(|| format!("ConsumerPerformance's line {fields:?}, field {index}"))
    };
    Ok(KafkaPerf {
        topic: topic.to_owned(),
        megabytes: number(2)?,
        messages: number(4)? as u64,
        rebalance_ms: number(6)?,
        fetch_ms: number(7)?,
    })
}

fn produce_stream(brokers: &str, topics: &TopicSettings, events: &[Event]) -> anyhow::Result<Rate> {
    let producer = producer(brokers, "20")?;
    let keys: Vec<String> = (0..1000).map(|org| format!("org-{org:03}")).collect();
    let started = Instant::now();
    for (index, event) in events.iter().enumerate() {
        send(
            &producer,
            topic_of(topics, event.kind),
            &keys[event.org as usize],
            &event.payload,
        )?;
        if index % 1000 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    finish(&producer, events.len() as u64)?;
    Ok(Rate {
        messages: events.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
        expected: events.len() as u64,
    })
}

/// (topic, key, payload) triples, produced and flushed.
fn produce_simple(brokers: &str, records: &[(String, String, String)]) -> anyhow::Result<()> {
    let producer = producer(brokers, "5")?;
    for (topic, key, payload) in records {
        send(&producer, topic, key, payload)?;
    }
    finish(&producer, records.len() as u64)
}

struct Paced {
    /// When the measured seconds began (after the warm-up's).
    started: Instant,
    sent: Vec<Instant>,
    seconds: f64,
}

/// Produces `warm` and then `count` participant-added events at `rate` per second, each
/// into the next of `workspaces` workspaces of organizations without a pool, and notes when
/// each was sent; the measured seconds start after the `warm` ones.
#[allow(clippy::too_many_arguments)]
fn produce_paced(
    brokers: &str,
    topic: &str,
    prefix: &str,
    rate: u64,
    warm: usize,
    count: usize,
    workspaces: usize,
    linger_ms: u64,
) -> anyhow::Result<Paced> {
    let producer = producer(brokers, &linger_ms.to_string())?;
    // Connected, with the topic's metadata, before the clock starts: a new producer's
    // first requests are no part of the round trip.
    producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .with_context(|| format!("the metadata of {topic}"))?;
    let mut sent = Vec::with_capacity(count);
    let started = Instant::now();
    for index in 0..warm + count {
        let due = started + Duration::from_secs_f64(index as f64 / rate as f64);
        let now = Instant::now();
        if due > now {
            producer.poll(Duration::ZERO);
            std::thread::sleep(due - now);
        }
        let w = index % workspaces;
        let org = format!("lat-org-{:02}", w % LATENCY_ORGS);
        let payload = added_json(
            &format!("{prefix}{index:09}"),
            &now_rfc3339(),
            &org,
            &format!("{prefix}ws-{w:06}"),
            &format!("{prefix}p-{index:09}"),
        );
        sent.push(Instant::now());
        send(&producer, topic, &org, &payload)?;
    }
    let measured_from = started + Duration::from_secs_f64(warm as f64 / rate as f64);
    let seconds = measured_from.elapsed().as_secs_f64();
    finish(&producer, (warm + count) as u64)?;
    Ok(Paced {
        started: measured_from,
        sent,
        seconds,
    })
}

/// Limit (a): a plain consumer reading the five input topics from the beginning until it
/// has read the `target` messages produced, doing nothing with them.
fn plain_consumer(
    brokers: &str,
    topics: &TopicSettings,
    partitions: i32,
    target: u64,
) -> anyhow::Result<Rate> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("bench-plain-{:08x}", rand::random::<u32>()),
        )
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for (_, topic) in topics.inputs() {
        for partition in 0..partitions {
            assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
        }
    }
    let watermarks = |consumer: &BaseConsumer| -> anyhow::Result<(i64, Vec<String>)> {
        let mut total = 0;
        let mut each = Vec::new();
        for (_, topic) in topics.inputs() {
            for partition in 0..partitions {
                let (low, high) =
                    consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
                total += high - low;
                each.push(format!("{topic}[{partition}] {low}..{high}"));
            }
        }
        Ok((total, each))
    };
    let (before, _) = watermarks(&consumer)?;
    let started = Instant::now();
    consumer.assign(&assignment)?;
    let mut messages = 0_u64;
    let mut bytes = 0_u64;
    let mut read: HashMap<(String, i32), (i64, i64)> = HashMap::new();
    while messages < target {
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("the plain consumer read {messages} of {target} messages in 30 minutes");
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        messages += 1;
        bytes += message.payload_len() as u64;
        let last = read
            .entry((message.topic().to_owned(), message.partition()))
            .or_insert((0_i64, -1_i64));
        last.0 += 1;
        last.1 = message.offset();
    }
    let seconds = started.elapsed().as_secs_f64();
    std::hint::black_box(bytes);
    // Fetching no more: otherwise each watermark request waits on the connection behind
    // a fetch the broker holds for up to `fetch.wait.max.ms` (500 ms), 15 s for 30
    // partitions.
    consumer.unassign()?;
    let (after, each) = watermarks(&consumer)?;
    if before != target as i64 || after != target as i64 {
        let mut read: Vec<String> = read
            .iter()
            .map(|((topic, partition), (count, last))| {
                format!("{topic}[{partition}] {count} read, last offset {last}")
            })
            .collect();
        read.sort();
        eprintln!(
            "note: the input partitions' watermarks summed to {before} right after the stream was \
             flushed and to {after} after it was read; {target} messages were produced and read.\n  \
             watermarks (low..high): {each:?}\n  read: {read:?}"
        );
    }
    Ok(Rate {
        messages,
        seconds,
        expected: before.max(0) as u64,
    })
}

// ---------------------------------------------------------------------------------------
// PostgreSQL: the COPY limit and the stored participants
// ---------------------------------------------------------------------------------------

/// One text-format COPY row per participant: the state its participant events leave,
/// the last one in produce order winning (a table with a primary key takes each key once).
fn participant_rows(events: &[Event]) -> Vec<u8> {
    let mut latest: HashMap<(String, String), (String, String, bool)> = HashMap::new();
    for event in events {
        if !matches!(event.kind, Kind::Added | Kind::Cancelled) {
            continue;
        }
        let value: Value = serde_json::from_str(&event.payload).expect("generated JSON");
        let text = |field: &str| value[field].as_str().unwrap_or_default().to_owned();
        let counted = value["activated"].as_bool().unwrap_or(true);
        latest.insert(
            (text("workspace_id"), text("participant_id")),
            (text("occurred_at"), text("event_id"), counted),
        );
    }
    let mut rows = Vec::with_capacity(latest.len() * 100);
    for ((workspace, participant), (at, id, counted)) in latest {
        let counted = if counted { 't' } else { 'f' };
        writeln!(rows, "{workspace}\t{participant}\t{at}\t{id}\t{counted}").expect("in memory");
    }
    rows
}

/// Limit (b): `COPY` of one row per participant into a scratch table shaped like
/// `participants` (same columns, same primary key).
async fn copy_limit(url: &str, rows: &[u8]) -> anyhow::Result<Rate> {
    let mut connection = PgConnection::connect(url).await?;
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS bench_copy_participants;
         CREATE TABLE bench_copy_participants (
             workspace_id   text NOT NULL,
             participant_id text NOT NULL,
             last_event_at  timestamptz NOT NULL,
             last_event_id  text NOT NULL,
             counted        boolean NOT NULL,
             PRIMARY KEY (workspace_id, participant_id))",
    )
    .execute(&mut connection)
    .await?;
    let started = Instant::now();
    let mut copy = connection
        .copy_in_raw("COPY bench_copy_participants FROM STDIN")
        .await?;
    // COPY data may be cut anywhere: message boundaries need not be row boundaries.
    for chunk in rows.chunks(1 << 20) {
        copy.send(chunk).await?;
    }
    let copied = copy.finish().await?;
    let seconds = started.elapsed().as_secs_f64();
    sqlx::raw_sql("DROP TABLE bench_copy_participants")
        .execute(&mut connection)
        .await?;
    connection.close().await?;
    Ok(Rate {
        messages: copied,
        seconds,
        expected: (rows.iter().filter(|byte| **byte == b'\n').count()) as u64,
    })
}

struct Populated {
    orgs: u64,
    workspaces: u64,
    participants: u64,
}

/// Stores `participants` participants (90% counted) in workspaces of heavy-tailed sizes
/// belonging to organizations the stream never names, with their organizations,
/// workspaces, seat pools and consumption rows; then VACUUM ANALYZE of `participants` and
/// CHECKPOINT, so the run starts from a settled database.
///
/// Only `participants` (the table whose size is the variable) is analysed: analysing the
/// small tables too (10 organizations, 68 workspaces for 10,000 participants) makes the
/// worker's cached plans scan them sequentially once the stream has added its 200
/// organizations and 16,000 workspaces, which measures stale statistics, not state size;
/// the fresh database of the first run has no statistics either.
async fn populate(url: &str, participants: u64, seed: u64) -> anyhow::Result<Populated> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_5eed);
    let orgs = (participants / 10_000).max(10);
    let mut workspaces: Vec<(u64, u64, u64)> = Vec::new(); // (org, size, counted)
    let mut left = participants;
    while left > 0 {
        let size = (pareto(&mut rng, 50.0, 1.3).min(50_000.0) as u64).clamp(1, left);
        let org = workspaces.len() as u64 % orgs;
        workspaces.push((org, size, 0));
        left -= size;
    }
    let mut connection = PgConnection::connect(url).await?;

    let mut copy = connection
        .copy_in_raw("COPY participants (workspace_id, participant_id, last_event_at, last_event_id, counted) FROM STDIN")
        .await?;
    let mut buffer = Vec::with_capacity(8 << 20);
    for (index, (_, size, counted)) in workspaces.iter_mut().enumerate() {
        for p in 0..*size {
            let is_counted = rng.random_bool(0.9);
            *counted += is_counted as u64;
            writeln!(
                buffer,
                "stored-ws-{index:07}\tp-{p:06}\t2026-01-01 09:00:00+00\tstored-{index}-{p}\t{}",
                if is_counted { 't' } else { 'f' }
            )?;
            if buffer.len() >= 4 << 20 {
                copy.send(buffer.as_slice()).await?;
                buffer.clear();
            }
        }
    }
    copy.send(buffer.as_slice()).await?;
    copy.finish().await?;

    let mut copy = connection
        .copy_in_raw("COPY organizations (org_id) FROM STDIN")
        .await?;
    let text: String = (0..orgs)
        .map(|org| format!("stored-org-{org:05}\n"))
        .collect();
    copy.send(text.as_bytes()).await?;
    copy.finish().await?;

    let mut copy = connection
        .copy_in_raw("COPY workspaces (workspace_id, org_id) FROM STDIN")
        .await?;
    let text: String = workspaces
        .iter()
        .enumerate()
        .map(|(index, (org, _, _))| format!("stored-ws-{index:07}\tstored-org-{org:05}\n"))
        .collect();
    copy.send(text.as_bytes()).await?;
    copy.finish().await?;

    let mut copy = connection
        .copy_in_raw(
            "COPY consumption (workspace_id, product, org_id, required, allocated) FROM STDIN",
        )
        .await?;
    let text: String = workspaces
        .iter()
        .enumerate()
        .map(|(index, (org, _, counted))| {
            format!("stored-ws-{index:07}\tseat\tstored-org-{org:05}\t{counted}\t{counted}\n")
        })
        .collect();
    copy.send(text.as_bytes()).await?;
    copy.finish().await?;

    let mut per_org = vec![0_u64; orgs as usize];
    for (org, _, counted) in &workspaces {
        per_org[*org as usize] += counted;
    }
    let mut copy = connection
        .copy_in_raw("COPY pools (org_id, product, available, granted_total, transferred_total, expired_total) FROM STDIN")
        .await?;
    let text: String = per_org
        .iter()
        .enumerate()
        .map(|(org, units)| format!("stored-org-{org:05}\tseat\t0\t{units}\t{units}\t0\n"))
        .collect();
    copy.send(text.as_bytes()).await?;
    copy.finish().await?;

    sqlx::raw_sql("VACUUM (ANALYZE) participants")
        .execute(&mut connection)
        .await?;
    sqlx::raw_sql("CHECKPOINT").execute(&mut connection).await?;
    connection.close().await?;
    Ok(Populated {
        orgs,
        workspaces: workspaces.len() as u64,
        participants,
    })
}

/// Drops the benchmark's databases at the end (unless `--keep`).
struct Cleanup {
    server: String,
    databases: Vec<String>,
    keep: bool,
}

impl Cleanup {
    async fn drop_now(&mut self, name: &str) {
        drop_database(&self.server, name).await;
        self.databases.retain(|database| database != name);
    }

    async fn finish(&mut self) {
        if self.keep {
            if !self.databases.is_empty() {
                println!("kept the databases {:?}", self.databases);
            }
            return;
        }
        for name in std::mem::take(&mut self.databases) {
            drop_database(&self.server, &name).await;
        }
    }
}

async fn drop_database(server: &str, name: &str) {
    let result = async {
        let mut connection = PgConnection::connect(&format!("{server}/postgres")).await?;
        let statement = format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            name.replace('"', "\"\"")
        );
        sqlx::raw_sql(&statement).execute(&mut connection).await?;
        connection.close().await
    }
    .await;
    if let Err(error) = result {
        eprintln!("could not drop the database {name}: {error}");
    }
}

fn database_name(url: &str) -> String {
    url.rsplit('/').next().unwrap_or_default().to_owned()
}

fn redact(url: &str) -> String {
    entitlement_worker::settings::redact_url(url)
}

// ---------------------------------------------------------------------------------------
// Processes: Apache Kafka and the worker
// ---------------------------------------------------------------------------------------

/// The broker of the latency phase (`--latency-broker`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LatencyBroker {
    /// The main Apache Kafka, holding the stream, on the main topics.
    Kafka,
    /// librdkafka's mock cluster, in the harness's process, on topics of its own.
    Mock,
}

impl LatencyBroker {
    fn name(self) -> &'static str {
        match self {
            LatencyBroker::Kafka => "kafka",
            LatencyBroker::Mock => "mock",
        }
    }

    fn description(self) -> &'static str {
        match self {
            LatencyBroker::Kafka => "the main Apache Kafka, holding the stream, on the main topics",
            LatencyBroker::Mock => {
                "librdkafka's mock cluster of its own, in the harness's process (its CPU counts as the harness's)"
            }
        }
    }
}

/// The main broker's JVM heap (`KAFKA_HEAP_OPTS`): twice `scripts/kafka-broker.sh`'s
/// default, fixed from the start so that the heap does not grow during a measurement.
const KAFKA_HEAP: &str = "-Xmx1g -Xms1g";

/// How long the broker may take from its start to serving metadata (8 to 14 s seen on a
/// loaded 2-core machine).
const KAFKA_STARTUP: Duration = Duration::from_secs(120);

/// The Kafka version `scripts/ensure-kafka.sh` resolves (`<kafka.version>` of
/// `scripts/kafka/pom.xml`).
fn kafka_version() -> String {
    let pom = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka/pom.xml");
    std::fs::read_to_string(pom)
        .ok()
        .and_then(|text| {
            let (_, rest) = text.split_once("<kafka.version>")?;
            let (version, _) = rest.split_once("</kafka.version>")?;
            Some(version.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Apache Kafka as its own process: a single KRaft node (broker and controller in one) run
/// by `scripts/kafka-broker.sh` on free ports, its data in a temporary directory. It runs
/// under a small shell that kills it (and removes the directory) as soon as the pipe from
/// this process closes: when this is dropped, and also when the harness panics or is
/// killed.
struct Kafka {
    /// The shell that runs the broker and kills it when `guard` closes.
    shell: Child,
    /// The write end of the shell's stdin: closing it stops the broker.
    guard: Option<ChildStdin>,
    /// The broker's process id: the JVM (the script ends in `exec java`).
    pid: u32,
    brokers: String,
    dir: tempfile::TempDir,
    /// The broker's own log: `kafka-server.log` in the log directory, kept after the run.
    log: PathBuf,
    /// From the start until the broker served metadata.
    startup_seconds: f64,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Kafka {
    /// Starts a broker with its data in a temporary directory, its log and output in
    /// `log_dir` (`kafka-server.log`, `kafka-output.log`: the script's and the JVM's own),
    /// and waits until it serves.
    fn start(log_dir: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("bench-kafka-").tempdir()?;
        let port = free_port()?;
        let controller_port = free_port()?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka-broker.sh");
        let output = log_dir.join("kafka-output.log");
        // The script splits KAFKA_OPTS at spaces: a log directory with one in its path
        // leaves the log in the data directory (thrown away with it).
        let mut options = "-Dkafka.console.level=OFF".to_owned();
        let log = if log_dir.to_string_lossy().contains(char::is_whitespace) {
            dir.path().join("logs").join("server.log")
        } else {
            let log = log_dir.join("kafka-server.log");
            options.push_str(&format!(" -Dkafka.log.file={}", log.display()));
            log
        };
        // The caller's own JVM options (e.g. JMX, for a look at the broker's request
        // rates) come after the harness's.
        if let Ok(extra) = std::env::var("KAFKA_OPTS") {
            options.push(' ');
            options.push_str(&extra);
        }
        // "$@" is the script and its arguments; $2 its DATA_DIR, this process's own
        // temporary directory. The shell, `cat` and the broker ignore SIGHUP, SIGINT and
        // SIGTERM: a Ctrl-C or a hang-up sent to the whole process group would otherwise
        // end the shell before it kills the broker (which, started in the background of a
        // shell without job control, ignores SIGINT anyway) and leave the broker behind.
        // The broker's life hangs on the pipe alone.
        let wrapper = r#"trap '' HUP INT TERM
"$@" </dev/null >&2 &
pid=$!
echo "$pid"
cat >/dev/null
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
rm -rf -- "$2"
exit 0"#;
        let started = Instant::now();
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(wrapper)
            .arg("kafka")
            .arg(&script)
            .arg(dir.path())
            .arg(port.to_string())
            .arg(controller_port.to_string())
            .env("KAFKA_HEAP_OPTS", KAFKA_HEAP)
            .env("KAFKA_OPTS", options)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&output)?)
            .spawn()
            .context("sh could not start scripts/kafka-broker.sh")?;
        let guard = shell.stdin.take();
        let mut line = String::new();
        BufReader::new(shell.stdout.take().context("the shell's stdout")?)
            .read_line(&mut line)
            .context("the shell names the broker's process")?;
        let pid = line
            .trim()
            .parse()
            .with_context(|| format!("the shell printed {line:?}, not a process id"))?;
        let mut kafka = Self {
            shell,
            guard,
            pid,
            brokers: format!("127.0.0.1:{port}"),
            dir,
            log,
            startup_seconds: 0.0,
        };
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .set("log_level", "0")
            .create()?;
        loop {
            if let Ok(metadata) = consumer.fetch_metadata(None, Duration::from_secs(1)) {
                if !metadata.brokers().is_empty() {
                    break;
                }
            }
            if !process_alive(pid) {
                bail!(
                    "Kafka exited before it served metadata on {}; {}:\n{}\n{}",
                    kafka.brokers,
                    output.display(),
                    tail(&output, 20),
                    kafka.tail_of_log()
                );
            }
            if started.elapsed() > KAFKA_STARTUP {
                bail!(
                    "Kafka did not serve metadata on {} within {KAFKA_STARTUP:?}\n{}",
                    kafka.brokers,
                    kafka.tail_of_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        kafka.startup_seconds = started.elapsed().as_secs_f64();
        Ok(kafka)
    }

    /// The last lines of the broker's own log.
    fn tail_of_log(&self) -> String {
        format!(
            "--- {} (last 40 lines)\n{}",
            self.log.display(),
            tail(&self.log, 40)
        )
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        // The shell kills the broker once its stdin closes, waits for it and removes the
        // directory.
        self.guard = None;
        let _ = self.shell.wait();
    }
}

/// Whether a process exists and is not a zombie (a broker that died is one until the
/// shell above it waits for it).
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat[stat.rfind(')')? + 1..].split_whitespace().next()?;
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// The last `lines` lines of a text file (nothing when it cannot be read).
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

struct WorkerProcess {
    child: Child,
    metrics_address: String,
    log: PathBuf,
    started: Instant,
}

/// The environment that points the binary at `settings` (`Settings::environment`), with
/// its metrics address and JSON logs.
fn environment(settings: &Settings, metrics_address: &str) -> Vec<(String, String)> {
    let mut settings = settings.clone();
    settings.metrics.listen = metrics_address.to_owned();
    settings.log.format = "json".to_owned();
    settings.environment()
}

impl WorkerProcess {
    /// Starts `binary run`, under `wrapper` (a program and its arguments) when it is not
    /// empty.
    fn start(
        wrapper: &[String],
        binary: &Path,
        settings: &Settings,
        arguments: &[String],
        extra_environment: &[(String, String)],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let metrics_address = format!("127.0.0.1:{}", free_port()?);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let started = Instant::now();
        let mut command = match wrapper.split_first() {
            Some((program, leading)) => {
                let mut command = Command::new(program);
                command.args(leading).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        let child = command
            .arg("run")
            .args(arguments)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(environment(settings, &metrics_address))
            .envs(extra_environment.iter().cloned())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self {
            child,
            metrics_address,
            log: log.to_owned(),
            started,
        })
    }

    /// SIGTERM, then waits up to `limit`: the exit code and how long the stop took.
    fn terminate(&mut self, limit: Duration) -> (Option<i32>, f64) {
        let started = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return (status.code(), started.elapsed().as_secs_f64());
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return (None, started.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn tail_of_log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
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
fn http_get(address: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(address).ok()?;
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

/// Warnings and errors in the worker's JSON log.
#[derive(Default, Clone)]
struct LogScan {
    warnings: u64,
    errors: u64,
    /// The distinct messages, with how often each came.
    messages: Vec<(String, u64)>,
}

fn scan_log(path: &Path) -> LogScan {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut scan = LogScan::default();
    let mut counts: Vec<(String, u64)> = Vec::new();
    for line in text.lines() {
        let Ok(value) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let level = value["level"].as_str().unwrap_or_default();
        if level != "WARN" && level != "ERROR" {
            continue;
        }
        if level == "WARN" {
            scan.warnings += 1;
        } else {
            scan.errors += 1;
        }
        // The worker logs with flatten_event: the fields are at the top level.
        let field = |name: &str| {
            value[name]
                .as_str()
                .or_else(|| value["fields"][name].as_str())
                .map(str::to_owned)
        };
        let mut message = format!("{level} {}", field("message").unwrap_or_default());
        if let Some(error) = field("error") {
            message.push_str(&format!(" ({error})"));
        }
        match counts.iter_mut().find(|(known, _)| *known == message) {
            Some((_, count)) => *count += 1,
            None => counts.push((message, 1)),
        }
    }
    scan.messages = counts;
    scan
}

// ---------------------------------------------------------------------------------------
// /proc: memory and CPU
// ---------------------------------------------------------------------------------------

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// utime + stime of a process, in clock ticks, and its command name.
fn proc_cpu(pid: &str) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat[open + 1..close].to_owned();
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((name, ticks))
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU time per process, sampled about once a second: a process's share is the sum of
/// its increases between samples, so processes that start and end during a run (other
/// people's builds, autovacuum workers) are counted too, to within their last second.
struct CpuMeter {
    worker: u32,
    /// The main broker's JVM (one process, all its threads).
    kafka: u32,
    me: u32,
    ticks_per_second: f64,
    started: Instant,
    busy_start: u64,
    last: HashMap<u32, (String, u64)>,
    /// Ticks per party: "worker", "kafka", "postgres", "harness", or a command name.
    totals: HashMap<String, u64>,
    /// PostgreSQL's ticks by process role ([`postgres_role`]).
    postgres_roles: HashMap<&'static str, u64>,
}

/// What a PostgreSQL process does, from the title it sets (`/proc/<pid>/cmdline`).
fn postgres_role(pid: u32) -> &'static str {
    let title = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    if title.contains("autovacuum") {
        "autovacuum"
    } else if ["walwriter", "checkpointer", "background writer"]
        .iter()
        .any(|role| title.contains(role))
    {
        "WAL writer, checkpointer, background writer"
    } else if title.contains('(') {
        // A client backend's title holds its peer: "user db 127.0.0.1(port) state".
        "backends"
    } else {
        "other"
    }
}

fn machine_busy_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|stat| {
            let values: Vec<u64> = stat
                .lines()
                .next()?
                .split_whitespace()
                .skip(1)
                .filter_map(|value| value.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal: busy = all but idle, iowait.
            let all: u64 = values.iter().take(8).sum();
            Some(all - values.get(3)? - values.get(4)?)
        })
        .unwrap_or(0)
}

fn all_processes() -> HashMap<u32, (String, u64)> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.file_name().into_string().ok())
                .filter_map(|name| name.parse::<u32>().ok())
                .filter_map(|pid| Some((pid, proc_cpu(&pid.to_string())?)))
                .collect()
        })
        .unwrap_or_default()
}

impl CpuMeter {
    fn new(worker: u32, kafka: u32, ticks_per_second: f64) -> Self {
        Self {
            worker,
            kafka,
            me: std::process::id(),
            ticks_per_second,
            started: Instant::now(),
            busy_start: machine_busy_ticks(),
            last: all_processes(),
            totals: HashMap::new(),
            postgres_roles: HashMap::new(),
        }
    }

    fn party(&self, pid: u32, name: &str) -> String {
        if pid == self.worker {
            "worker".into()
        } else if pid == self.kafka {
            "kafka".into()
        } else if pid == self.me {
            "harness".into()
        } else if name == "postgres" {
            "postgres".into()
        } else if name.starts_with("kworker") {
            "kernel workers".into()
        } else {
            name.to_owned()
        }
    }

    fn sample(&mut self) {
        let now = all_processes();
        for (pid, (name, ticks)) in &now {
            // Kernel threads change their names as they work: a known pid is the same
            // process unless its time went backwards (a reused pid).
            let before = match self.last.get(pid) {
                Some((_, before)) if before <= ticks => *before,
                // Started since the last sample: all its time is new.
                _ => 0,
            };
            let party = self.party(*pid, name);
            let spent = ticks.saturating_sub(before);
            if party == "postgres" && spent > 0 {
                *self.postgres_roles.entry(postgres_role(*pid)).or_default() += spent;
            }
            *self.totals.entry(party).or_default() += spent;
        }
        self.last = now;
    }

    fn finish(mut self) -> CpuShare {
        self.sample();
        let seconds = self.started.elapsed().as_secs_f64();
        let cores = |ticks: u64| ticks as f64 / self.ticks_per_second / seconds.max(1e-9);
        let take = |totals: &mut HashMap<String, u64>, party: &str| {
            cores(totals.remove(party).unwrap_or(0))
        };
        let worker = take(&mut self.totals, "worker");
        let kafka = take(&mut self.totals, "kafka");
        let postgres = take(&mut self.totals, "postgres");
        let harness = take(&mut self.totals, "harness");
        let mut others: Vec<(String, f64)> = self
            .totals
            .iter()
            .map(|(name, ticks)| (name.clone(), cores(*ticks)))
            .filter(|(_, cores)| *cores >= 0.005)
            .collect();
        others.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut postgres_roles: Vec<(String, f64)> = self
            .postgres_roles
            .iter()
            .map(|(role, ticks)| (role.to_string(), cores(*ticks)))
            .collect();
        postgres_roles.sort_by(|a, b| b.1.total_cmp(&a.1));
        let machine = cores(machine_busy_ticks().saturating_sub(self.busy_start));
        CpuShare {
            seconds,
            worker,
            kafka,
            postgres,
            postgres_roles,
            harness,
            others,
            machine,
        }
    }
}

/// Cores used on average over an interval, per party, and the machine's total (which also
/// holds kernel time no process is charged with, such as interrupts).
#[derive(Default, Clone)]
struct CpuShare {
    seconds: f64,
    worker: f64,
    kafka: f64,
    postgres: f64,
    /// PostgreSQL's share by process role, largest first.
    postgres_roles: Vec<(String, f64)>,
    harness: f64,
    others: Vec<(String, f64)>,
    machine: f64,
}

impl CpuShare {
    fn other(&self) -> f64 {
        // An empty sum of floats is -0.0; adding 0.0 prints it as 0.00.
        self.others.iter().map(|(_, cores)| cores).sum::<f64>() + 0.0
    }

    fn line(&self) -> String {
        let top: Vec<String> = self
            .others
            .iter()
            .take(3)
            .map(|(name, cores)| format!("{name} {cores:.2}"))
            .collect();
        let roles: Vec<String> = self
            .postgres_roles
            .iter()
            .map(|(role, cores)| format!("{role} {cores:.2}"))
            .collect();
        format!(
            "cores: worker {:.2}, postgres {:.2} ({}), kafka {:.2}, harness {:.2}, other processes {:.2}{}; machine {:.2} of {}",
            self.worker,
            self.postgres,
            roles.join(", "),
            self.kafka,
            self.harness,
            self.other(),
            if top.is_empty() {
                String::new()
            } else {
                format!(" ({})", top.join(", "))
            },
            self.machine,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        )
    }

    fn json(&self) -> Value {
        json!({"seconds": self.seconds, "cores": {"worker": self.worker, "postgres": self.postgres,
               "kafka": self.kafka, "harness": self.harness, "other_processes": self.other(),
               "machine": self.machine},
               "postgres_roles": self.postgres_roles.iter().map(|(role, cores)| json!({"role": role, "cores": cores})).collect::<Vec<_>>(),
               "other_processes": self.others.iter().map(|(name, cores)| json!({"name": name, "cores": cores})).collect::<Vec<_>>()})
    }
}

/// Samples a [`CpuMeter`] every second until `stop`, then hands back its share.
fn meter_in_background(
    mut meter: CpuMeter,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<CpuShare> {
    tokio::spawn(async move {
        let mut rounds = 0_u64;
        while !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            rounds += 1;
            if rounds % 4 == 0 {
                meter.sample();
            }
        }
        meter.finish()
    })
}

// ---------------------------------------------------------------------------------------
// Machine facts
// ---------------------------------------------------------------------------------------

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_default()
}

async fn machine_facts(args: &Args) -> anyhow::Result<Value> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_owned();
    let mut connection = PgConnection::connect(&format!("{}/postgres", args.database_server))
        .await
        .context("PostgreSQL is not reachable; scripts/ensure-postgres.sh starts it")?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut connection)
        .await?;
    let mut settings = serde_json::Map::new();
    for name in [
        "shared_buffers",
        "synchronous_commit",
        "fsync",
        "max_wal_size",
        "work_mem",
    ] {
        let value: String = sqlx::query_scalar(&format!("SHOW {name}"))
            .fetch_one(&mut connection)
            .await?;
        settings.insert(name.to_owned(), Value::String(value));
    }
    connection.close().await?;
    let dirty =
        !command_output("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    Ok(json!({
        "nproc": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": cpu_model,
        "total_ram_mib": total_kib / 1024,
        "kernel": command_output("uname", &["-r"]),
        "postgresql_version": version,
        "postgresql_settings": settings,
        "kafka_version": kafka_version(),
        "kafka_heap": KAFKA_HEAP,
        "broker_data_filesystem": command_output("stat", &["-f", "-c", "%T", &std::env::temp_dir().to_string_lossy()]),
        "git_commit": command_output("git", &["rev-parse", "HEAD"]),
        "git_worktree_dirty": dirty,
        "loadavg_at_start": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "started_at": Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
    }))
}

// ---------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------

struct Sample {
    seconds: f64,
    applied: i64,
    outbox: i64,
    rss_kib: u64,
    /// Of the resident memory: what the worker's allocator holds, and the bytes
    /// librdkafka has fetched ahead of the lanes (from the worker's `/metrics`).
    heap_allocated: f64,
    heap_resident: f64,
    consumer_queued: f64,
    /// The worker's batches committed so far, and the seconds they took.
    batches: f64,
    commit_seconds: f64,
}

#[derive(Default, Clone)]
struct MetricsSummary {
    batches: f64,
    batch_size_sum: f64,
    commit_seconds_sum: f64,
    commit_count: f64,
    rejected: f64,
    retries: f64,
    publish_errors: f64,
    published: f64,
    ledger_entries: f64,
    alerts: f64,
    stale: f64,
    duplicates: f64,
    consumed: f64,
    redelivered: f64,
    /// "reason=count" for each dead-letter reason.
    rejected_by_reason: String,
    heap_allocated: f64,
    heap_resident: f64,
    consumer_queued: f64,
    /// Seconds the committed batches spent in each stage of their transaction.
    stage_seconds: Vec<(&'static str, f64)>,
    /// Seconds the lanes waited for messages: idle, gather.
    wait_seconds: Vec<(&'static str, f64)>,
}

fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0
}

/// The value of `name{label="value"}` for each of `values`.
fn labelled_sums(
    text: &str,
    name: &str,
    label: &str,
    values: &[&'static str],
) -> Vec<(&'static str, f64)> {
    values
        .iter()
        .map(|value| {
            (
                *value,
                metric_sum(text, &format!("{name}{{{label}=\"{value}\"}}")),
            )
        })
        .collect()
}

/// `{"label": seconds, ...}` for the JSON.
fn seconds_by_label(pairs: &[(&'static str, f64)]) -> Value {
    pairs
        .iter()
        .map(|(label, seconds)| (label.to_string(), json!(seconds)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

impl MetricsSummary {
    fn parse(text: &str) -> Self {
        Self {
            batches: metric_sum(text, "entitlements_batches_committed_total"),
            batch_size_sum: metric_sum(text, "entitlements_batch_size_sum"),
            commit_seconds_sum: metric_sum(text, "entitlements_commit_latency_seconds_sum"),
            commit_count: metric_sum(text, "entitlements_commit_latency_seconds_count"),
            rejected: metric_sum(text, "entitlements_messages_rejected_total"),
            retries: metric_sum(text, "entitlements_store_retries_total"),
            publish_errors: metric_sum(text, "entitlements_publish_errors_total"),
            published: metric_sum(text, "entitlements_published_total"),
            ledger_entries: metric_sum(text, "entitlements_ledger_entries_total"),
            alerts: metric_sum(text, "entitlements_shortfall_alerts_total"),
            stale: metric_sum(text, "entitlements_stale_events_total"),
            duplicates: metric_sum(text, "entitlements_duplicate_events_total"),
            consumed: metric_sum(text, "entitlements_messages_consumed_total"),
            redelivered: metric_sum(text, "entitlements_redelivered_messages_total"),
            heap_allocated: metric_sum(text, "entitlements_memory_heap_allocated_bytes"),
            heap_resident: metric_sum(text, "entitlements_memory_heap_resident_bytes"),
            consumer_queued: metric_sum(text, "entitlements_consumer_queued_bytes"),
            stage_seconds: labelled_sums(
                text,
                "entitlements_batch_stage_seconds_total",
                "stage",
                &Stage::ALL.map(Stage::as_str),
            ),
            wait_seconds: labelled_sums(
                text,
                "entitlements_lane_wait_seconds_total",
                "phase",
                &LANE_WAIT_PHASES,
            ),
            rejected_by_reason: text
                .lines()
                .filter_map(|line| {
                    line.strip_prefix("entitlements_messages_rejected_total{reason=\"")
                })
                .filter_map(|rest| {
                    let (reason, rest) = rest.split_once('"')?;
                    Some(format!("{reason}={}", rest.rsplit(' ').next()?))
                })
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    fn mean_batch(&self) -> f64 {
        self.batch_size_sum / self.batches.max(1.0)
    }

    fn mean_commit_ms(&self) -> f64 {
        1000.0 * self.commit_seconds_sum / self.commit_count.max(1.0)
    }

    /// "lock 0.3 s (1%), load ..." over every committed batch.
    fn stages_line(&self) -> String {
        let total: f64 = self.stage_seconds.iter().map(|(_, seconds)| seconds).sum();
        self.stage_seconds
            .iter()
            .map(|(stage, seconds)| {
                format!(
                    "{stage} {seconds:.1} s ({:.0}%)",
                    100.0 * seconds / total.max(f64::MIN_POSITIVE)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// "idle 1.2 s, gather 0.4 s": the lanes' wait for messages.
    fn wait_line(&self) -> String {
        self.wait_seconds
            .iter()
            .map(|(phase, seconds)| format!("{phase} {seconds:.1} s"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn json(&self) -> Value {
        json!({"batches": self.batches, "mean_batch_size": self.mean_batch(),
               "mean_commit_ms": self.mean_commit_ms(), "commit_seconds_total": self.commit_seconds_sum,
               "rejected": self.rejected, "store_retries": self.retries,
               "publish_errors": self.publish_errors, "published": self.published,
               "ledger_entries": self.ledger_entries, "alerts": self.alerts,
               "stale": self.stale, "duplicates": self.duplicates, "consumed": self.consumed,
               "redelivered": self.redelivered, "rejected_by_reason": self.rejected_by_reason,
               "stage_seconds": seconds_by_label(&self.stage_seconds),
               "lane_wait_seconds": seconds_by_label(&self.wait_seconds)})
    }
}

struct RunResult {
    label: String,
    stored: u64,
    populate_seconds: f64,
    events: u64,
    seconds: f64,
    healthy_seconds: Option<f64>,
    first_progress_seconds: Option<f64>,
    applied_seconds: Option<f64>,
    peak_rss_kib: u64,
    timeline: Vec<Sample>,
    cpu: CpuShare,
    metrics: MetricsSummary,
    exit: Option<i32>,
    stop_seconds: f64,
    log: LogScan,
    /// WAL written by the whole PostgreSQL server during the run.
    wal_bytes: i64,
    /// The run's WAL by the relation its records change (pg_walinspect), largest first,
    /// or why it could not be read.
    wal_by_relation: Result<Vec<WalShare>, String>,
    /// Checkpoints the server made during the run (timed and requested).
    checkpoints: i64,
    /// pg_stat_user_tables of the run's database after the run.
    tables: Vec<Value>,
}

/// The server's WAL position counter (pg_stat_wal, PostgreSQL 14 and later).
async fn wal_bytes(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT wal_bytes::bigint FROM pg_stat_wal")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

/// The WAL a relation's records took in a run.
struct WalShare {
    /// The table or index, or what a record without a relation is (commits and the like).
    relation: String,
    records: i64,
    /// Whole records, full-page images included.
    bytes: i64,
    /// Of which full-page images (the first change of a page after a checkpoint).
    fpi_bytes: i64,
}

/// A stretch of WAL kept for reading afterwards: a temporary physical replication slot,
/// reserved at once (from the last checkpoint on), holds every segment from the window's
/// start, the position after the slot was made, whatever checkpoints come meanwhile. The
/// slot lives as long as the window's own session, so a harness that dies leaves none.
struct WalWindow {
    session: Option<PgConnection>,
    start: Result<String, String>,
}

impl WalWindow {
    async fn open(url: &str) -> Self {
        let mut session = match PgConnection::connect(url).await {
            Ok(session) => session,
            Err(error) => {
                return Self {
                    session: None,
                    start: Err(format!("no session for the WAL window ({error})")),
                }
            }
        };
        let start = sqlx::query_scalar::<_, String>(
            "SELECT pg_current_wal_lsn()::text
               FROM pg_create_physical_replication_slot(
                        'bench_wal_' || pg_backend_pid(), true, true)",
        )
        .fetch_one(&mut session)
        .await
        .map_err(|error| format!("no replication slot ({error})"));
        Self {
            session: Some(session),
            start,
        }
    }

    /// Where the window ends: the server's WAL position now.
    async fn end(&self, pool: &PgPool) -> Result<String, String> {
        sqlx::query_scalar::<_, String>("SELECT pg_current_wal_lsn()::text")
            .fetch_one(pool)
            .await
            .map_err(|error| error.to_string())
    }

    /// The WAL from the window's start to `end`, by relation (of the run's database); the
    /// slot goes with the session.
    async fn attribute(self, end: Result<String, String>) -> Result<Vec<WalShare>, String> {
        let (Some(mut session), Ok(start)) = (self.session, self.start.clone()) else {
            return Err(self.start.err().unwrap_or_default());
        };
        let result = match end {
            Ok(end) => Self::read(&mut session, &start, &end)
                .await
                .map_err(|error| error.to_string()),
            Err(error) => Err(error),
        };
        let _ = session.close().await;
        result
    }

    async fn read(
        session: &mut PgConnection,
        start: &str,
        end: &str,
    ) -> sqlx::Result<Vec<WalShare>> {
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
            .execute(&mut *session)
            .await?;
        // Summed by relation file first, named after: the names' lookups run once per
        // relation, not once per record.
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "WITH records AS (
                 SELECT regexp_match(block_ref, 'rel \\d+/(\\d+)/(\\d+)') AS rel,
                        resource_manager, record_type, record_length, fpi_length
                   FROM pg_get_wal_records_info($1::pg_lsn, $2::pg_lsn)),
             by_file AS (
                 SELECT rel[1]::oid AS database, rel[2]::oid AS file,
                        CASE WHEN rel IS NULL
                             THEN '(' || resource_manager || ' ' || record_type || ')' END AS kind,
                        count(*) AS records, sum(record_length) AS bytes,
                        sum(fpi_length) AS fpi_bytes
                   FROM records GROUP BY 1, 2, 3)
             SELECT CASE
                      WHEN f.kind IS NOT NULL THEN f.kind
                      WHEN f.database <> d.oid THEN '(another database)'
                      ELSE coalesce(
                          (SELECT o.relname || ' (TOAST)' FROM pg_class o
                            WHERE o.reltoastrelid = c.oid),
                          (SELECT o.relname || ' (TOAST index)' FROM pg_index i
                             JOIN pg_class o ON o.reltoastrelid = i.indrelid
                            WHERE i.indexrelid = c.oid),
                          c.relname, '(relation ' || f.file || ')')
                    END AS relation,
                    sum(f.records)::bigint, sum(f.bytes)::bigint, sum(f.fpi_bytes)::bigint
               FROM by_file f
               JOIN pg_database d ON d.datname = current_database()
               LEFT JOIN pg_class c ON c.relfilenode = f.file AND f.database = d.oid
              GROUP BY 1 ORDER BY 3 DESC",
        )
        .bind(start)
        .bind(end)
        .fetch_all(&mut *session)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(relation, records, bytes, fpi_bytes)| WalShare {
                relation,
                records,
                bytes,
                fpi_bytes,
            })
            .collect())
    }
}

/// Checkpoints so far (pg_stat_bgwriter), timed and requested.
async fn checkpoints(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT (checkpoints_timed + checkpoints_req)::bigint FROM pg_stat_bgwriter")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

/// Row and scan counters of the run's tables: where the database's work went.
async fn table_statistics(pool: &PgPool) -> Vec<Value> {
    sqlx::query_scalar(
        "SELECT json_build_object('table', relname, 'seq_scan', seq_scan,
                'seq_tup_read', seq_tup_read, 'idx_scan', idx_scan, 'idx_tup_fetch', idx_tup_fetch,
                'inserted', n_tup_ins, 'updated', n_tup_upd, 'hot_updated', n_tup_hot_upd,
                'deleted', n_tup_del, 'live', n_live_tup, 'dead', n_dead_tup,
                'autovacuums', autovacuum_count, 'size_bytes', pg_total_relation_size(relid))
           FROM pg_stat_user_tables ORDER BY relname",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default()
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds.max(1e-9)
    }

    fn micros_per_event(&self) -> f64 {
        self.seconds * 1e6 / self.events.max(1) as f64
    }

    /// Applied messages per second, second by second.
    fn per_second(&self) -> Vec<i64> {
        let mut previous = 0;
        self.timeline
            .iter()
            .map(|sample| {
                let delta = sample.applied - previous;
                previous = sample.applied;
                delta
            })
            .collect()
    }

    /// The mean commit time of the batches committed in each second.
    fn commit_ms_per_second(&self) -> Vec<f64> {
        let mut previous = (0.0, 0.0);
        self.timeline
            .iter()
            .map(|sample| {
                let batches = sample.batches - previous.0;
                let seconds = sample.commit_seconds - previous.1;
                previous = (sample.batches, sample.commit_seconds);
                if batches > 0.0 {
                    1000.0 * seconds / batches
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// Longest run of whole seconds without progress between the first progress and the
    /// last message applied.
    fn longest_stall(&self) -> usize {
        let rates = self.per_second();
        let first = rates
            .iter()
            .position(|rate| *rate > 0)
            .unwrap_or(rates.len());
        let last = rates.iter().rposition(|rate| *rate > 0).unwrap_or(0);
        let mut longest = 0;
        let mut current = 0;
        for rate in rates.iter().take(last + 1).skip(first) {
            if *rate == 0 {
                current += 1;
                longest = longest.max(current);
            } else {
                current = 0;
            }
        }
        longest
    }

    fn one_line(&self) -> String {
        format!(
            "run {}: {} events in {:.1} s = {} events/s, {:.1} µs/event, peak RSS {:.1} MiB, exit {:?}",
            self.label,
            fmt_int(self.events),
            self.seconds,
            fmt_int(self.rate() as u64),
            self.micros_per_event(),
            self.peak_rss_kib as f64 / 1024.0,
            self.exit
        )
    }

    fn json(&self) -> Value {
        json!({
            "label": self.label,
            "stored_participants": self.stored,
            "populate_seconds": self.populate_seconds,
            "events": self.events,
            "seconds": self.seconds,
            "events_per_second": self.rate(),
            "micros_per_event": self.micros_per_event(),
            "healthz_after_seconds": self.healthy_seconds,
            "first_progress_after_seconds": self.first_progress_seconds,
            "all_applied_after_seconds": self.applied_seconds,
            "peak_rss_mib": self.peak_rss_kib as f64 / 1024.0,
            "longest_stall_seconds": self.longest_stall(),
            "timeline": self.timeline.iter().map(|sample| json!({
                "t": sample.seconds, "applied": sample.applied, "outbox": sample.outbox,
                "rss_mib": sample.rss_kib as f64 / 1024.0,
                "heap_allocated_mib": sample.heap_allocated / 1048576.0,
                "heap_resident_mib": sample.heap_resident / 1048576.0,
                "consumer_queued_mib": sample.consumer_queued / 1048576.0,
                "batches": sample.batches,
                "commit_seconds": sample.commit_seconds})).collect::<Vec<_>>(),
            "cpu": self.cpu.json(),
            "worker_metrics": self.metrics.json(),
            "exit_code": self.exit,
            "stop_seconds": self.stop_seconds,
            "wal_bytes": self.wal_bytes,
            "wal_by_relation": match &self.wal_by_relation {
                Ok(shares) => json!(shares.iter().map(|share| json!({
                    "relation": share.relation, "records": share.records,
                    "bytes": share.bytes, "fpi_bytes": share.fpi_bytes,
                    "bytes_per_event": share.bytes as f64 / self.events.max(1) as f64,
                })).collect::<Vec<_>>()),
                Err(error) => json!({"error": error}),
            },
            "checkpoints": self.checkpoints,
            "tables": self.tables,
            "log": {"warnings": self.log.warnings, "errors": self.log.errors,
                    "messages": self.log.messages.iter().map(|(m, n)| json!({"message": m, "count": n})).collect::<Vec<_>>()},
        })
    }
}

struct LatencyResult {
    /// The broker the phase ran on.
    on: LatencyBroker,
    /// Checkpoints the server made while the inputs were sent and drained.
    checkpoints: i64,
    offered_rate: u64,
    produced: u64,
    produce_seconds: f64,
    warmup_workspaces: u64,
    alerts_read: u64,
    /// Input produced -> its alert read from the shortfall topic.
    alert: Distribution,
    /// Input produced -> the input itself read back: the broker's own round trip.
    broker: Distribution,
    /// Input read back -> its alert read: what the worker adds to the broker's round trip
    /// (its fetch, batch, commit and publication, and the alert's own trip).
    added: Distribution,
    drained_seconds: f64,
    peak_rss_kib: u64,
    cpu: CpuShare,
    metrics: MetricsSummary,
    exit: Option<i32>,
    log: LogScan,
}

impl LatencyResult {
    fn one_line(&self) -> String {
        format!(
            "latency at {} ev/s: p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms; {} of {} matched; broker round trip p50 {:.1} ms, p99 {:.1} ms",
            self.offered_rate, self.alert.p50_ms, self.alert.p99_ms, self.alert.p999_ms, self.alert.max_ms,
            self.alert.matched, self.produced, self.broker.p50_ms, self.broker.p99_ms
        )
    }
}

struct Report {
    args: Args,
    facts: Value,
    stream: StreamStats,
    generate_seconds: f64,
    produced: Rate,
    consumer_limit: Rate,
    /// Kafka's own `kafka-consumer-perf-test` on the participant-added topic, if it ran.
    kafka_perf: Option<KafkaPerf>,
    copy_limit: Rate,
    participant_events: u64,
    main_run: RunResult,
    /// The same stream with `state.publish = false`.
    without_state: RunResult,
    /// The same stream with several instances in one group, if it ran.
    scale_out: Option<ScaleOut>,
    /// The worker's instructions per event, or why they were not measured.
    instructions: Result<Instructions, String>,
    growth: Vec<RunResult>,
    /// One latency phase per offered rate, in order.
    latency: Vec<LatencyResult>,
    /// Wall time of each part of the benchmark, in order.
    phases: Vec<(String, f64)>,
    total_seconds: f64,
}

fn fmt_int(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "MET"
    } else {
        "NOT MET"
    }
}

impl Report {
    fn slower_limit(&self) -> (f64, &'static str) {
        let consumer = self.consumer_limit.rate();
        let copy = self.copy_limit.rate();
        if consumer <= copy {
            (consumer, "plain consumer")
        } else {
            (copy, "PostgreSQL COPY")
        }
    }

    fn text(&self) -> String {
        let mut out = String::new();
        let f = &self.facts;
        let s = &self.stream;
        let line = |out: &mut String, text: String| {
            out.push_str(&text);
            out.push('\n');
        };
        line(
            &mut out,
            "== entitlement-worker benchmark (issue 4) ==".into(),
        );
        line(
            &mut out,
            format!(
                "machine   {} cores ({}), {} MiB RAM, kernel {}",
                f["nproc"],
                f["cpu_model"].as_str().unwrap_or_default(),
                f["total_ram_mib"],
                f["kernel"].as_str().unwrap_or_default()
            ),
        );
        line(&mut out, format!(
            "          PostgreSQL {} (shared_buffers {}, synchronous_commit {}, fsync {}); Apache Kafka {} (one KRaft node, heap {}, data on {})",
            f["postgresql_version"].as_str().unwrap_or_default(),
            f["postgresql_settings"]["shared_buffers"].as_str().unwrap_or_default(),
            f["postgresql_settings"]["synchronous_commit"].as_str().unwrap_or_default(),
            f["postgresql_settings"]["fsync"].as_str().unwrap_or_default(),
            f["kafka_version"].as_str().unwrap_or_default(),
            f["kafka_heap"].as_str().unwrap_or_default(),
            f["broker_data_filesystem"].as_str().unwrap_or_default(),
        ));
        line(&mut out, format!(
            "          commit {}{}; load average at start {}; worker, broker, PostgreSQL and this harness share the cores",
            f["git_commit"].as_str().unwrap_or_default().get(..12).unwrap_or_default(),
            if f["git_worktree_dirty"].as_bool() == Some(true) { " (uncommitted changes)" } else { "" },
            f["loadavg_at_start"].as_str().unwrap_or_default()
        ));
        line(&mut out, format!(
            "stream    {} events, seed {}: {} organizations ({} ample, {} refilled mid-stream, {} short), {} workspaces",
            fmt_int(self.produced.messages), self.args.seed, s.orgs, s.orgs_ample, s.orgs_refilled, s.orgs_short, fmt_int(s.workspaces)
        ));
        line(
            &mut out,
            format!(
                "          workspace sizes: median {}, largest {}, huge {:?}",
                fmt_int(s.median_workspace),
                fmt_int(s.largest_workspace),
                s.huge_workspaces
            ),
        );
        line(&mut out, format!(
            "          {} added, {} cancelled ({} activated), {} modules enabled, {} grants ({} refills), {} manual transfers ({} by viewers); mean {:.0} bytes; {} arrive late",
            fmt_int(s.added), fmt_int(s.cancelled), fmt_int(s.cancelled_activated), fmt_int(s.modules), fmt_int(s.grants), s.refills,
            s.transfers, s.transfers_by_viewers, s.mean_bytes, fmt_int(s.late_events)
        ));
        line(
            &mut out,
            format!(
                "load      generated in {:.1} s; produced {} msgs in {:.1} s = {} msgs/s",
                self.generate_seconds,
                fmt_int(self.produced.messages),
                self.produced.seconds,
                fmt_int(self.produced.rate() as u64)
            ),
        );
        let defaults = Settings::load(None).expect("the defaults load");
        line(
            &mut out,
            format!(
                "worker    binary, {} partitions per topic; batch.lanes {}, batch.max_messages {}, batch.max_wait_ms {}, outbox.batch_size {}, outbox.poll_interval_ms {}; extra librdkafka properties: {}",
                self.args.partitions,
                defaults.batch.lanes,
                self.args.batch_max_messages.unwrap_or(defaults.batch.max_messages),
                self.args.batch_max_wait_ms.unwrap_or(defaults.batch.max_wait_ms),
                defaults.outbox.batch_size,
                defaults.outbox.poll_interval_ms,
                if self.args.worker_kafka_properties.is_empty() && self.args.worker_env.is_empty() {
                    "none".to_owned()
                } else {
                    format!(
                        "{}; extra environment: {}",
                        self.args.worker_kafka_properties.join(", "),
                        self.args.worker_env.join(", ")
                    )
                }
            ),
        );
        line(&mut out, String::new());
        line(&mut out, "limits".into());
        line(
            &mut out,
            format!(
                "  (a) plain consumer, 5 input topics        {:>10} msgs/s   ({} msgs in {:.2} s; watermarks right after the load said {})",
                fmt_int(self.consumer_limit.rate() as u64),
                fmt_int(self.consumer_limit.messages),
                self.consumer_limit.seconds,
                fmt_int(self.consumer_limit.expected)
            ),
        );
        match &self.kafka_perf {
            Some(perf) => line(&mut out, format!("  {}", perf.line())),
            None => line(&mut out, "  kafka-consumer-perf-test did not run".into()),
        }
        line(&mut out, format!(
            "  (b) PostgreSQL COPY, participants shape   {:>10} rows/s   ({} rows for {} participant events, in {:.2} s)",
            fmt_int(self.copy_limit.rate() as u64), fmt_int(self.copy_limit.messages), fmt_int(self.participant_events), self.copy_limit.seconds
        ));
        let (slower, slower_name) = self.slower_limit();
        let m = &self.main_run;
        line(&mut out, String::new());
        line(
            &mut out,
            "end to end (fresh database, worker binary started after the stream was loaded)".into(),
        );
        line(
            &mut out,
            format!(
                "  {} events applied and published in {:.1} s = {} events/s ({:.1} µs/event)",
                fmt_int(m.events),
                m.seconds,
                fmt_int(m.rate() as u64),
                m.micros_per_event()
            ),
        );
        line(
            &mut out,
            format!(
                "  ratio to the slower limit ({slower_name}, {} /s): {:.0}%",
                fmt_int(slower as u64),
                100.0 * m.rate() / slower
            ),
        );
        line(&mut out, format!(
            "  /healthz 200 after {:.1} s, first batch after {:.1} s, all applied after {:.1} s, outbox empty after {:.1} s",
            m.healthy_seconds.unwrap_or(f64::NAN), m.first_progress_seconds.unwrap_or(f64::NAN),
            m.applied_seconds.unwrap_or(f64::NAN), m.seconds
        ));
        line(&mut out, format!(
            "  peak RSS {}; {} batches, mean {:.0} messages, mean commit {:.1} ms; {} ledger entries, {} alerts, {} published, {} dead letters",
            mib(m.peak_rss_kib), fmt_int(m.metrics.batches as u64), m.metrics.mean_batch(), m.metrics.mean_commit_ms(),
            fmt_int(m.metrics.ledger_entries as u64), fmt_int(m.metrics.alerts as u64), fmt_int(m.metrics.published as u64), fmt_int(m.metrics.rejected as u64)
        ));
        line(&mut out, format!(
            "  worker counted {} messages consumed ({} stale, {} duplicates, {} redelivered); dead letters: {}",
            fmt_int(m.metrics.consumed as u64), fmt_int(m.metrics.stale as u64), fmt_int(m.metrics.duplicates as u64),
            fmt_int(m.metrics.redelivered as u64),
            if m.metrics.rejected_by_reason.is_empty() { "none" } else { &m.metrics.rejected_by_reason }
        ));
        line(
            &mut out,
            format!(
                "  batches' time by stage, all lanes: {}; lanes waiting for messages: {}",
                m.metrics.stages_line(),
                m.metrics.wait_line()
            ),
        );
        line(&mut out, format!("  {}", m.cpu.line()));
        line(
            &mut out,
            format!(
                "  applied per second (thousands): {}",
                m.per_second()
                    .iter()
                    .map(|rate| format!("{:.0}", *rate as f64 / 1000.0))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        );
        line(
            &mut out,
            format!(
                "  outbox backlog per second (thousands): {}",
                m.timeline
                    .iter()
                    .map(|sample| format!("{:.0}", sample.outbox as f64 / 1000.0))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        );
        line(
            &mut out,
            format!(
                "  mean commit per second (ms): {}",
                m.commit_ms_per_second()
                    .iter()
                    .map(|ms| format!("{ms:.0}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        );
        let per_second_mib = |value: &dyn Fn(&Sample) -> f64| {
            m.timeline
                .iter()
                .map(|sample| format!("{:.0}", value(sample) / 1048576.0))
                .collect::<Vec<_>>()
                .join(" ")
        };
        line(
            &mut out,
            format!(
                "  resident memory per second (MiB): {}",
                per_second_mib(&|sample| sample.rss_kib as f64 * 1024.0)
            ),
        );
        line(
            &mut out,
            format!(
                "    of which jemalloc holds (MiB): {}",
                per_second_mib(&|sample| sample.heap_resident)
            ),
        );
        line(
            &mut out,
            format!(
                "    allocated through jemalloc (MiB): {}",
                per_second_mib(&|sample| sample.heap_allocated)
            ),
        );
        line(
            &mut out,
            format!(
                "    fetched ahead by librdkafka (MiB): {}",
                per_second_mib(&|sample| sample.consumer_queued)
            ),
        );
        line(
            &mut out,
            format!(
                "  WAL written by the server during the run: {:.0} MiB ({:.0} bytes per event); {} checkpoints",
                m.wal_bytes as f64 / 1048576.0,
                m.wal_bytes as f64 / m.events.max(1) as f64,
                m.checkpoints
            ),
        );
        match &m.wal_by_relation {
            Ok(shares) => {
                line(
                    &mut out,
                    "    by relation (pg_walinspect): bytes per event (of which full-page images), records per event".into(),
                );
                let per_event = |n: i64| n as f64 / m.events.max(1) as f64;
                for share in shares.iter().take(WAL_SHARES_SHOWN) {
                    line(
                        &mut out,
                        format!(
                            "      {:<40} {:>6.1} ({:>5.1}) B, {:>5.2} records",
                            share.relation,
                            per_event(share.bytes),
                            per_event(share.fpi_bytes),
                            per_event(share.records)
                        ),
                    );
                }
                let rest: i64 = shares
                    .iter()
                    .skip(WAL_SHARES_SHOWN)
                    .map(|share| share.bytes)
                    .sum();
                if rest > 0 {
                    line(
                        &mut out,
                        format!("      {:<40} {:>6.1} B", "(the rest)", per_event(rest)),
                    );
                }
            }
            Err(error) => line(&mut out, format!("    by relation: not read ({error})")),
        }
        line(
            &mut out,
            "  tables: rows inserted / updated (HOT) / deleted; index scans, rows fetched by index; rows read by sequential scans".into(),
        );
        for table in &m.tables {
            let n = |key: &str| table[key].as_i64().unwrap_or(0).max(0) as u64;
            if n("inserted") + n("updated") + n("deleted") + n("idx_tup_fetch") + n("seq_tup_read")
                == 0
            {
                continue;
            }
            line(
                &mut out,
                format!(
                    "    {:<18} {:>9} / {:>9} ({:>9}) / {:>9}; {:>8} scans, {:>11} fetched; {:>11} seq read; {:>6.0} MiB",
                    table["table"].as_str().unwrap_or_default(),
                    fmt_int(n("inserted")),
                    fmt_int(n("updated")),
                    fmt_int(n("hot_updated")),
                    fmt_int(n("deleted")),
                    fmt_int(n("idx_scan")),
                    fmt_int(n("idx_tup_fetch")),
                    fmt_int(n("seq_tup_read")),
                    n("size_bytes") as f64 / 1048576.0
                ),
            );
        }
        line(
            &mut out,
            format!(
            "  longest stall {} s; SIGTERM -> exit {:?} in {:.1} s; log: {} warnings, {} errors",
            m.longest_stall(), m.exit, m.stop_seconds, m.log.warnings, m.log.errors
        ),
        );
        for (message, count) in &m.log.messages {
            line(&mut out, format!("    {count} x {message}"));
        }

        for l in &self.latency {
            line(&mut out, String::new());
            line(&mut out, format!(
                "latency input -> alert ({} ev/s offered for {:.1} s after {} s not counted, into {} workspaces of {} organizations without a pool, producer linger.ms {}; worker caught up on the main database; broker: {})",
                l.offered_rate, l.produce_seconds, self.args.latency_warmup_seconds, fmt_int(l.warmup_workspaces), LATENCY_ORGS, self.args.latency_linger_ms,
                l.on.description()
            ));
            line(
                &mut out,
                format!("  worker (input -> alert)          {}", l.alert.figures()),
            );
            line(
                &mut out,
                format!("  broker (input -> input read back) {}", l.broker.figures()),
            );
            line(
                &mut out,
                format!("  added (input read back -> alert)  {}", l.added.figures()),
            );
            line(&mut out, format!(
                "  {} of {} inputs matched to their alert ({} alerts read), {} read back; {} batches, mean {:.0} messages, mean commit {:.1} ms; peak RSS {}; {} checkpoints; exit {:?}",
                fmt_int(l.alert.matched), fmt_int(l.produced), fmt_int(l.alerts_read), fmt_int(l.broker.matched),
                fmt_int(l.metrics.batches as u64), l.metrics.mean_batch(), l.metrics.mean_commit_ms(),
                mib(l.peak_rss_kib), l.checkpoints, l.exit
            ));
            line(
                &mut out,
                format!(
                    "  per second of sending, worker p50/max (ms): {}",
                    l.alert.per_second_line()
                ),
            );
            line(
                &mut out,
                format!(
                    "  per second of sending, broker p50/max (ms): {}",
                    l.broker.per_second_line()
                ),
            );
            line(
                &mut out,
                format!(
                    "  per second of sending, added p50/max (ms): {}",
                    l.added.per_second_line()
                ),
            );
            line(&mut out, format!("  {}", l.cpu.line()));
            if l.log.warnings + l.log.errors > 0 {
                for (message, count) in &l.log.messages {
                    line(&mut out, format!("    {count} x {message}"));
                }
            }
        }

        line(&mut out, String::new());
        if let Some(run) = &self.scale_out {
            line(
                &mut out,
                format!(
                    "{} instances in one group (batch.lanes each as above), same stream, fresh database: {} events/s ({:.0}% of one instance's {}); peak RSS {}; exits {:?}",
                    run.instances,
                    fmt_int(run.rate() as u64),
                    100.0 * run.rate() / self.main_run.rate(),
                    fmt_int(self.main_run.rate() as u64),
                    run.workers.iter().map(|(rss, _)| mib(*rss)).collect::<Vec<_>>().join(", "),
                    run.workers.iter().map(|(_, exit)| *exit).collect::<Vec<_>>(),
                ),
            );
            line(&mut out, format!("  {}", run.cpu.line()));
        }
        match &self.instructions {
            Ok(instructions) => line(&mut out, instructions.one_line()),
            Err(why) => line(
                &mut out,
                format!("instructions per event: not measured ({why})"),
            ),
        }

        let mut runs: Vec<&RunResult> = vec![&self.main_run];
        runs.extend(self.growth.iter());
        line(&mut out, String::new());
        line(
            &mut out,
            "state growth (same stream, fresh database with participants already stored)".into(),
        );
        line(
            &mut out,
            format!(
                "  {:>12} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>7}",
                "stored",
                "seconds",
                "events/s",
                "µs/event",
                "peak RSS",
                "commit ms",
                "ledger",
                "alerts",
                "stall s",
                "load s"
            ),
        );
        for run in &runs {
            line(
                &mut out,
                format!(
                    "  {:>12} {:>8.1} {:>9} {:>9.1} {:>9} {:>9.1} {:>8} {:>8} {:>8} {:>7.1}",
                    fmt_int(run.stored),
                    run.seconds,
                    fmt_int(run.rate() as u64),
                    run.micros_per_event(),
                    format!("{:.1}M", run.peak_rss_kib as f64 / 1024.0),
                    run.metrics.mean_commit_ms(),
                    fmt_int(run.metrics.ledger_entries as u64),
                    fmt_int(run.metrics.alerts as u64),
                    run.longest_stall(),
                    run.populate_seconds
                ),
            );
        }
        for run in &self.growth {
            line(
                &mut out,
                format!(
                    "  stored {}: {}; log {} warnings, {} errors; applied/s (k): {}; RSS/s (MiB): {}",
                    fmt_int(run.stored),
                    run.cpu.line(),
                    run.log.warnings,
                    run.log.errors,
                    run.per_second()
                        .iter()
                        .map(|rate| format!("{:.0}", *rate as f64 / 1000.0))
                        .collect::<Vec<_>>()
                        .join(" "),
                    run.timeline
                        .iter()
                        .map(|sample| format!("{:.0}", sample.rss_kib as f64 / 1024.0))
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            );
        }

        line(&mut out, String::new());
        line(&mut out, "targets of issue 4".into());
        let ratio = m.rate() / slower;
        line(
            &mut out,
            format!(
                "  >= 50,000 events/s over {} events          {:>12} events/s   {}",
                fmt_int(m.events),
                fmt_int(m.rate() as u64),
                verdict(m.rate() >= 50_000.0)
            ),
        );
        line(
            &mut out,
            format!(
                "  >= 50% of the slower limit                  {:>12.0}%           {}",
                100.0 * ratio,
                verdict(ratio >= 0.5)
            ),
        );
        if self.latency.is_empty() {
            line(
                &mut out,
                "  p99 input->alert < 100 ms                   not measured".into(),
            );
        }
        for l in &self.latency {
            line(
                &mut out,
                format!(
                    "  p99 input->alert < 100 ms at {:>6} ev/s    {:>12.1} ms         {} (broker round trip p99 {:.1} ms, the worker's share {:.1} ms)",
                    l.offered_rate,
                    l.alert.p99_ms,
                    verdict(l.alert.p99_ms < 100.0 && l.alert.matched > 0),
                    l.broker.p99_ms,
                    l.alert.p99_ms - l.broker.p99_ms
                ),
            );
        }
        let largest = runs.iter().map(|run| run.peak_rss_kib).max().unwrap_or(0);
        let smallest = runs.iter().map(|run| run.peak_rss_kib).min().unwrap_or(0);
        let biggest_stored = runs.iter().map(|run| run.stored).max().unwrap_or(0);
        line(
            &mut out,
            format!(
                "  worker RSS < 128 MiB, 0 to {} stored    {:>8.1}-{:.1} MiB   {}{}",
                fmt_int(biggest_stored),
                smallest as f64 / 1024.0,
                largest as f64 / 1024.0,
                verdict(largest < 128 * 1024),
                if biggest_stored < 10_000_000 {
                    " (10M not measured in this run)"
                } else {
                    ""
                }
            ),
        );
        let costs: Vec<f64> = runs.iter().map(|run| run.micros_per_event()).collect();
        let (low, high) = costs.iter().fold((f64::MAX, 0.0_f64), |(low, high), cost| {
            (low.min(*cost), high.max(*cost))
        });
        line(
            &mut out,
            format!(
                "  cost per event flat (max/min <= 1.25)       {:>8.1}-{:.1} µs ({:.2}x)  {}",
                low,
                high,
                high / low,
                verdict(runs.len() > 1 && high / low <= 1.25)
            ),
        );
        line(
            &mut out,
            format!(
                "time per part: {}; total {:.0} s",
                self.phases
                    .iter()
                    .map(|(name, seconds)| format!("{name} {seconds:.1} s"))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.total_seconds
            ),
        );
        out
    }

    fn json(&self) -> Value {
        let (slower, slower_name) = self.slower_limit();
        let s = &self.stream;
        json!({
            "machine": self.facts,
            "arguments": {
                "events": self.args.events, "orgs": self.args.orgs, "seed": self.args.seed,
                "partitions": self.args.partitions, "latency_rates": self.args.latency_rates,
                "latency_seconds": self.args.latency_seconds, "instructions_events": self.args.instructions_events, "instances": self.args.instances, "latency_broker": self.args.latency_broker.name(), "latency_linger_ms": self.args.latency_linger_ms, "stored": self.args.stored,
                "batch_max_messages": self.args.batch_max_messages, "batch_max_wait_ms": self.args.batch_max_wait_ms,
                "worker_kafka_properties": self.args.worker_kafka_properties,
                "worker_env": self.args.worker_env,
            },
            "stream": {
                "events": self.produced.messages, "organizations": s.orgs, "workspaces": s.workspaces,
                "largest_workspace": s.largest_workspace, "median_workspace": s.median_workspace,
                "huge_workspaces": s.huge_workspaces, "added": s.added, "cancelled": s.cancelled,
                "cancelled_activated": s.cancelled_activated, "modules_enabled": s.modules, "grants": s.grants,
                "refills": s.refills, "manual_transfers": s.transfers, "transfers_by_viewers": s.transfers_by_viewers,
                "orgs_ample": s.orgs_ample, "orgs_refilled": s.orgs_refilled, "orgs_short": s.orgs_short,
                "mean_bytes": s.mean_bytes, "late_events": s.late_events,
                "generate_seconds": self.generate_seconds,
            },
            "produce": {"messages": self.produced.messages, "seconds": self.produced.seconds, "per_second": self.produced.rate()},
            "limits": {
                "plain_consumer": {"messages": self.consumer_limit.messages, "messages_by_watermarks": self.consumer_limit.expected, "seconds": self.consumer_limit.seconds, "per_second": self.consumer_limit.rate()},
                "kafka_consumer_perf_test": self.kafka_perf.as_ref().map(KafkaPerf::json),
                "postgres_copy": {"rows": self.copy_limit.messages, "participant_events": self.participant_events,
                                  "seconds": self.copy_limit.seconds, "per_second": self.copy_limit.rate()},
                "slower": slower_name, "slower_per_second": slower,
            },
            "end_to_end": self.main_run.json(),
            "ratio_to_slower_limit": self.main_run.rate() / slower,
            "end_to_end_without_state_topic": self.without_state.json(),
            "state_topic_rate_ratio": self.main_run.rate() / self.without_state.rate(),
            "scale_out": self.scale_out.as_ref().map(ScaleOut::json),
            "instructions": match &self.instructions {
                Ok(instructions) => instructions.json(),
                Err(why) => json!({"not_measured": why}),
            },
            "latency": self.latency.iter().map(|l| json!({
                "offered_rate": l.offered_rate, "produced": l.produced, "produce_seconds": l.produce_seconds,
                "broker": l.on.name(),
                "workspaces": l.warmup_workspaces, "alerts_read": l.alerts_read,
                "input_to_alert": l.alert.json(), "broker_round_trip": l.broker.json(), "added_by_worker": l.added.json(),
                "drained_after_seconds": l.drained_seconds, "checkpoints": l.checkpoints, "peak_rss_mib": l.peak_rss_kib as f64 / 1024.0,
                "cpu": l.cpu.json(), "worker_metrics": l.metrics.json(), "exit_code": l.exit,
                "log": {"warnings": l.log.warnings, "errors": l.log.errors},
            })).collect::<Vec<_>>(),
            "state_growth": self.growth.iter().map(RunResult::json).collect::<Vec<_>>(),
            "phases": self.phases.iter().map(|(name, seconds)| json!({"part": name, "seconds": seconds})).collect::<Vec<_>>(),
            "total_seconds": self.total_seconds,
        })
    }
}
