//! The demo: librdkafka's in-process mock cluster as the broker, the real worker against
//! PostgreSQL, and a short story told step by step: each step's events are sent, the demo
//! waits until the worker has committed them and published what they caused, and prints
//! those outputs under the step's heading (ledger entries in sequence order, then alerts,
//! pool warnings and dead letters, then the states of past workspaces), read back from the
//! output topics.

use std::future::Future;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::codec::{
    AlertMessage, DeadLetterMessage, LedgerMessage, PoolWarningMessage, StateMessage,
};
use crate::settings::Settings;

/// The pause between two steps of the story, so a person can follow it.
const STEP_PAUSE: Duration = Duration::from_millis(700);
/// When the trial's units become valid, counted from when its grant is sent.
const TRIAL_START_SECONDS: i64 = 4;
/// How long the trial grant of the story lasts before its units expire.
const TRIAL_SECONDS: i64 = 4;
/// The longest the demo waits for the story's last entry before giving up.
const STORY_DEADLINE: Duration = Duration::from_secs(60);

pub async fn run(
    mut settings: Settings,
    keep_running: bool,
    interrupted: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let cluster = MockCluster::new(1)?;
    settings.kafka.brokers = cluster.bootstrap_servers();
    settings.database.url = demo_database_url(&settings.database.url);
    settings.batch.max_wait_ms = 20;
    settings.clock.interval_ms = 500;
    recreate_database(&settings.database.url).await?;
    for topic in settings.topics.all() {
        cluster.create_topic(topic, 3, 1)?;
    }
    println!(
        "Embedded broker at {}; database {}.",
        settings.kafka.brokers,
        crate::settings::redact_url(&settings.database.url)
    );

    let stop = CancellationToken::new();
    let (started_sender, started) = tokio::sync::oneshot::channel();
    let worker = tokio::spawn(crate::pipeline::run(
        settings.clone(),
        stop.clone().cancelled_owned(),
        Some(started_sender),
    ));
    let started = started.await?;
    println!(
        "Worker running; metrics on http://{}/metrics\n",
        started.metrics_address
    );
    let assigned = tokio::time::timeout(STORY_DEADLINE, async {
        while !started.health.is_consuming() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assigned
        .await
        .map_err(|_| anyhow::anyhow!("the worker was not assigned its partitions"))?;
    let mut outputs = Outputs::new(&settings)?;
    let database = sqlx::PgPool::connect(&settings.database.url).await?;
    play_story(&settings, &database, &mut outputs).await?;
    // The trial is credited and expires by the clock, after the last step.
    tokio::pin!(interrupted);
    tokio::select! {
        finished = outputs.print_until_expiry(STORY_DEADLINE) => {
            if !finished? {
                println!("\nThe story's last entry did not arrive in time.");
            }
        }
        _ = &mut interrupted => {}
    }
    if keep_running {
        println!(
            "\nThe story is over; the worker keeps running until Ctrl-C. In another terminal:\n\n\
             \x20 export ENTITLEMENTS__KAFKA__BROKERS={}\n\
             \x20 export ENTITLEMENTS__DATABASE__URL={}   # with your database.url's password\n\
             \x20 entitlement-worker report --org acme\n\
             \x20 entitlement-worker transfer --org acme --workspace expo-2026 --product live-stream --as u-alice --role entitlement_manager\n\
             \x20 entitlement-worker export --org acme --output acme.xlsx\n\
             \x20 entitlement-worker verify",
            settings.kafka.brokers,
            crate::settings::redact_url(&settings.database.url)
        );
        interrupted.await;
    }
    println!("\nStopping the worker.");
    stop.cancel();
    worker.await??;
    // The reader must be gone before the broker is: a consumer closing without its broker
    // waits for it.
    drop(outputs);
    drop(cluster);
    Ok(())
}

/// The demo's own database beside the configured one: `database.url`'s name plus `_demo`.
fn demo_database_url(url: &str) -> String {
    let (without_query, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let demo = match without_query.rsplit_once('/') {
        Some((server, name)) => format!("{server}/{name}_demo"),
        None => without_query.to_owned(),
    };
    match query {
        Some(query) => format!("{demo}?{query}"),
        None => demo,
    }
}

/// Every demo starts from an empty database, so it tells the same story each time.
async fn recreate_database(url: &str) -> anyhow::Result<()> {
    use sqlx::{ConnectOptions, Connection};
    use std::str::FromStr;
    let options = sqlx::postgres::PgConnectOptions::from_str(url)?;
    let name = options
        .get_database()
        .ok_or_else(|| anyhow::anyhow!("the demo's database URL names no database"))?;
    let mut maintenance = options.clone().database("postgres").connect().await?;
    // A name cannot be a bound parameter; it is quoted as an identifier.
    let statement = format!(
        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
        name.replace('"', "\"\"")
    );
    sqlx::raw_sql(&statement).execute(&mut maintenance).await?;
    maintenance.close().await?;
    Ok(())
}

async fn play_story(
    settings: &Settings,
    database: &sqlx::PgPool,
    outputs: &mut Outputs,
) -> anyhow::Result<()> {
    let producer: FutureProducer = crate::kafka::client_config(&settings.kafka).create()?;
    let topics = &settings.topics;
    let mut next = 0;
    let mut event = |fields: Value| {
        next += 1;
        let mut message = json!({
            "event_id": format!("demo-{next:04}"),
            "occurred_at": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        });
        message
            .as_object_mut()
            .expect("an object")
            .extend(fields.as_object().expect("an object").clone());
        message
    };
    let summit = "summit-2026";
    // Each step: what a person reads, an unused note, and the (topic, message) pairs.
    type Step<'a> = (&'a str, &'a str, Vec<(String, Value)>);
    let steps: Vec<Step> = vec![
        (
            "acme buys a plan with 10 seats.",
            "",
            vec![(topics.entitlement_granted.clone(), event(json!({"org_id": "acme", "product": "seat", "quantity": 10, "source": {"kind": "plan", "reference": "PLAN-2026"}})))],
        ),
        (
            "12 participants join summit-2026: 10 seats move, 2 are missing, and the pool warns that it is low.",
            "",
            (1..=12)
                .map(|n| (topics.participant_added.clone(), event(json!({"org_id": "acme", "workspace_id": summit, "participant_id": format!("p-{n:04}")}))))
                .collect(),
        ),
        (
            "p-0003 cancels without ever activating the app: one seat fewer is needed.",
            "",
            vec![(topics.participant_cancelled.clone(), event(json!({"org_id": "acme", "workspace_id": summit, "participant_id": "p-0003", "activated": false})))],
        ),
        (
            "p-0005 cancels after activating the app: still counts, nothing changes.",
            "",
            vec![(topics.participant_cancelled.clone(), event(json!({"org_id": "acme", "workspace_id": summit, "participant_id": "p-0005", "activated": true})))],
        ),
        (
            "acme buys an add-on of 5 seats: the waiting workspace is filled at once, and the pool is no longer low.",
            "",
            vec![(topics.entitlement_granted.clone(), event(json!({"org_id": "acme", "product": "seat", "quantity": 5, "source": {"kind": "add_on", "reference": "ADD-77"}})))],
        ),
        (
            "summit-2026 enables gamification; acme owns one unit, but modules wait for a person.",
            "",
            vec![
                (topics.entitlement_granted.clone(), event(json!({"org_id": "acme", "product": "gamification", "quantity": 1}))),
                (topics.module_enabled.clone(), event(json!({"org_id": "acme", "workspace_id": summit, "module": "gamification"}))),
            ],
        ),
        (
            "A viewer tries to transfer the module: refused.",
            "",
            vec![(topics.transfer_requested.clone(), event(json!({"org_id": "acme", "workspace_id": summit, "product": "gamification", "quantity": 1, "requested_by": {"user_id": "u-victor", "role": "viewer"}})))],
        ),
        (
            "The entitlement manager transfers it: the shortfall resolves.",
            "",
            vec![(topics.transfer_requested.clone(), event(json!({"org_id": "acme", "workspace_id": summit, "product": "gamification", "quantity": 1, "requested_by": {"user_id": "u-alice", "role": "entitlement_manager"}})))],
        ),
        (
            "globex names summit-2026, which belongs to acme: refused, globex pays nothing.",
            "",
            vec![(topics.participant_added.clone(), event(json!({"org_id": "globex", "workspace_id": summit, "participant_id": "p-9999"})))],
        ),
        (
            "A message that is not JSON arrives: dead-lettered, the worker goes on.",
            "",
            vec![(topics.participant_added.clone(), Value::String("this is not json".into()))],
        ),
        (
            "expo-2026 enables live-stream; acme owns one unit, and it waits for you to transfer it.",
            "",
            vec![
                (topics.entitlement_granted.clone(), event(json!({"org_id": "acme", "product": "live-stream", "quantity": 1, "source": {"kind": "add_on", "reference": "ADD-LIVE"}}))),
                (topics.module_enabled.clone(), event(json!({"org_id": "acme", "workspace_id": "expo-2026", "module": "live-stream"}))),
            ],
        ),
        (
            "After the event, acme's add-on of 5 seats is removed: the 4 still in the pool leave, the seat in summit-2026 stays; the pool is low again.",
            "",
            vec![(topics.entitlement_revoked.clone(), event(json!({"org_id": "acme", "source": {"kind": "add_on", "reference": "ADD-77"}, "reason": "event over"})))],
        ),
        (
            "summit-2026 is over: the platform names it and dates it (it ended yesterday), so it moves to the past workspaces, keeping its seats.",
            "",
            vec![(topics.workspace_updated.clone(), event(json!({"org_id": "acme", "workspace_id": summit, "name": "Summit 2026", "starts_at": (Utc::now() - chrono::Duration::days(3)).to_rfc3339_opts(SecondsFormat::Secs, true), "ends_at": (Utc::now() - chrono::Duration::days(1)).to_rfc3339_opts(SecondsFormat::Secs, true)})))],
        ),
        (
            "acme upgrades to the unlimited Enterprise plan: the old plan is removed (nothing of it is left), the new one has no limit, so the pool is not low.",
            "",
            vec![
                (topics.entitlement_revoked.clone(), event(json!({"org_id": "acme", "source": {"kind": "plan", "reference": "PLAN-2026"}, "reason": "upgrade"}))),
                (topics.entitlement_granted.clone(), event(json!({"org_id": "acme", "product": "seat", "unlimited": true, "source": {"kind": "plan", "reference": "ENTERPRISE"}}))),
            ],
        ),
        (
            "5 participants join expo-2026: each gets a seat at once, on the unlimited plan; no shortfall opens.",
            "",
            (1..=5)
                .map(|n| (topics.participant_added.clone(), event(json!({"org_id": "acme", "workspace_id": "expo-2026", "participant_id": format!("x-{n:04}")}))))
                .collect(),
        ),
        (
            "acme buys 2 units of q-and-a; summit-2026 enables it and waits for a person.",
            "",
            vec![
                (topics.entitlement_granted.clone(), event(json!({"org_id": "acme", "product": "q-and-a", "quantity": 2, "source": {"kind": "add_on", "reference": "ADD-QA"}}))),
                (topics.module_enabled.clone(), event(json!({"org_id": "acme", "workspace_id": summit, "module": "q-and-a"}))),
            ],
        ),
        (
            "expo-2026 enables q-and-a too, and waits as well.",
            "",
            vec![(topics.module_enabled.clone(), event(json!({"org_id": "acme", "workspace_id": "expo-2026", "module": "q-and-a"})))],
        ),
        (
            "The catalogue defines q-and-a as \"Live Q&A\", assigned automatically: both waiting workspaces get their unit, oldest first.",
            "",
            vec![(topics.product_defined.clone(), event(json!({"product": "q-and-a", "name": "Live Q&A", "description": "Questions from the audience, moderated.", "assignment": "automatic"})))],
        ),
    ];
    let mut produced: i64 = 0;
    for (title, _, messages) in steps {
        play_step(&producer, database, outputs, &mut produced, title, messages).await?;
    }
    // Last, and timed from now, so the trial's credit and expiry are both seen happening.
    let trial_start = Utc::now() + chrono::Duration::seconds(TRIAL_START_SECONDS);
    let trial = event(
        json!({"org_id": "acme", "product": "seat", "quantity": 3, "valid_from": trial_start.to_rfc3339_opts(SecondsFormat::Millis, true), "expires_at": (trial_start + chrono::Duration::seconds(TRIAL_SECONDS)).to_rfc3339_opts(SecondsFormat::Millis, true), "source": {"kind": "trial", "reference": "TRIAL-1"}}),
    );
    play_step(
        &producer,
        database,
        outputs,
        &mut produced,
        "acme gets a trial of 3 seats valid in a few seconds, for a few seconds: the timer credits them, the pool warns that they expire soon, then the timer expires them.",
        vec![(topics.entitlement_granted.clone(), trial)],
    )
    .await
}

/// Sends one step's messages, waits until the worker has committed and published their
/// effects, and prints them under the step's title.
async fn play_step(
    producer: &FutureProducer,
    database: &sqlx::PgPool,
    outputs: &mut Outputs,
    produced: &mut i64,
    title: &str,
    messages: Vec<(String, Value)>,
) -> anyhow::Result<()> {
    println!("\n== {title}");
    for (topic, message) in messages {
        let payload = match &message {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        // An organization's events are keyed by it; the catalogue's by the product.
        let key = message
            .get("org_id")
            .or_else(|| message.get("product"))
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned();
        producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(&payload),
                Duration::from_secs(5),
            )
            .await
            .map_err(|(error, _)| error)?;
        *produced += 1;
    }
    wait_until_published(database, *produced).await?;
    outputs.print_caught_up()?;
    tokio::time::sleep(STEP_PAUSE).await;
    Ok(())
}

/// Waits until the worker has committed the first `produced` inputs and the relay has
/// published everything committed.
async fn wait_until_published(database: &sqlx::PgPool, produced: i64) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    loop {
        let (applied, waiting): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offsets),
                    (SELECT count(*) FROM outbox)",
        )
        .fetch_one(database)
        .await?;
        if applied >= produced && waiting == 0 {
            return Ok(());
        }
        if started.elapsed() > STORY_DEADLINE {
            anyhow::bail!(
                "the worker did not commit and publish the story's step in {} s",
                STORY_DEADLINE.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A reader of the output topics from their start, printing what it reads.
struct Outputs {
    consumer: BaseConsumer,
    topics: crate::settings::TopicSettings,
    /// Whether the trial's expiry entry was printed: the story's last entry.
    expired: bool,
}

/// One output, as the demo prints it, with what orders it within a step.
struct Printed {
    /// 0 for ledger entries, 1 for alerts, 2 for pool warnings, 3 for dead letters, 4 for
    /// states.
    rank: u8,
    /// The organization and the entry's sequence (ledger entries only).
    sequence: (String, i64),
    line: String,
    expiry: bool,
}

impl Outputs {
    fn new(settings: &Settings) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = crate::kafka::client_config(&settings.kafka)
            .set("group.id", "entitlement-demo-reader")
            .set("enable.auto.commit", "false")
            .create()?;
        let topics = settings.topics.clone();
        let mut assignment = TopicPartitionList::new();
        for topic in [
            &topics.ledger,
            &topics.shortfalls,
            &topics.dlq,
            &topics.state,
            &topics.pool_warnings,
        ] {
            let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
            for partition in metadata
                .topics()
                .iter()
                .flat_map(|topic| topic.partitions())
            {
                assignment.add_partition_offset(topic, partition.id(), Offset::Beginning)?;
            }
        }
        consumer.assign(&assignment)?;
        Ok(Self {
            consumer,
            topics,
            expired: false,
        })
    }

    /// Reads every output published so far (up to each partition's high watermark now)
    /// and prints it in causal order: ledger entries by sequence, then alerts, pool
    /// warnings, dead letters and states.
    fn print_caught_up(&mut self) -> anyhow::Result<()> {
        let mut ends = Vec::new();
        let assignment = self.consumer.assignment()?;
        for element in assignment.elements() {
            let (_, high) = self.consumer.fetch_watermarks(
                element.topic(),
                element.partition(),
                Duration::from_secs(10),
            )?;
            ends.push((element.topic().to_owned(), element.partition(), high));
        }
        let mut printed = Vec::new();
        let started = std::time::Instant::now();
        loop {
            let position = self.consumer.position()?;
            let behind = ends.iter().any(|(topic, partition, high)| {
                let at = match position
                    .find_partition(topic, *partition)
                    .map(|element| element.offset())
                {
                    Some(Offset::Offset(at)) => at,
                    _ => 0,
                };
                at < *high
            });
            if !behind {
                break;
            }
            if started.elapsed() > STORY_DEADLINE {
                anyhow::bail!("the outputs could not be read back from the broker");
            }
            if let Some(message) = self.consumer.poll(Duration::from_millis(100)) {
                let message = message?;
                printed
                    .extend(self.describe(message.topic(), message.payload().unwrap_or_default())?);
            }
        }
        printed.sort_by(|a, b| (a.rank, &a.sequence).cmp(&(b.rank, &b.sequence)));
        for output in printed {
            self.expired |= output.expiry;
            println!("{}", output.line);
        }
        Ok(())
    }

    /// Prints what the clock publishes until the trial's expiry entry has been printed;
    /// false if `deadline` passed first.
    async fn print_until_expiry(&mut self, deadline: Duration) -> anyhow::Result<bool> {
        let started = std::time::Instant::now();
        while !self.expired {
            if started.elapsed() > deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.print_caught_up()?;
        }
        Ok(true)
    }

    /// The line of one output; of the state topic, only past workspaces' states are shown.
    fn describe(&self, topic: &str, payload: &[u8]) -> anyhow::Result<Option<Printed>> {
        if topic == self.topics.state {
            let StateMessage::Workspace(state) = serde_json::from_slice(payload)? else {
                return Ok(None);
            };
            if state.live {
                return Ok(None);
            }
            return Ok(Some(Printed {
                rank: 4,
                sequence: (String::new(), 0),
                line: format!(
                    "   state    {} {} ({}) {}: past, required {}, allocated {} (version {})",
                    state.org_id,
                    state.workspace_id,
                    state.name.as_deref().unwrap_or("no name"),
                    state.product,
                    state.required,
                    state.allocated,
                    state.version
                ),
                expiry: false,
            }));
        }
        let printed = if topic == self.topics.ledger {
            let entry: LedgerMessage = serde_json::from_slice(payload)?;
            let place = entry
                .workspace_id
                .as_deref()
                .map(|workspace| format!(" -> {workspace}"))
                .unwrap_or_default();
            let actor = entry
                .actor
                .as_deref()
                .map(|actor| format!(" by {actor}"))
                .unwrap_or_default();
            Printed {
                rank: 0,
                sequence: (entry.org_id.clone(), entry.sequence),
                line: format!(
                    "   ledger   {} #{:<3} {:<15} {:>3} {}{place}{actor}{}; pool now {}",
                    entry.org_id,
                    entry.sequence,
                    entry.kind,
                    entry.quantity,
                    entry.product,
                    if entry.unlimited { " (unlimited)" } else { "" },
                    entry.pool_available_after
                ),
                expiry: entry.kind == "expiry",
            }
        } else if topic == self.topics.shortfalls {
            let alert: AlertMessage = serde_json::from_slice(payload)?;
            Printed {
                rank: 1,
                sequence: (String::new(), 0),
                line: format!(
                    "   ALERT    {} {} {}: {} missing (required {}, allocated {})",
                    alert.status.to_uppercase(),
                    alert.workspace_id,
                    alert.product,
                    alert.missing,
                    alert.required,
                    alert.allocated
                ),
                expiry: false,
            }
        } else if topic == self.topics.pool_warnings {
            let warning: PoolWarningMessage = serde_json::from_slice(payload)?;
            let numbers = crate::codec::warning_numbers(
                warning.available,
                warning.threshold,
                warning.grant_id.as_deref(),
                warning.units,
                warning.expires_at,
            );
            Printed {
                rank: 2,
                sequence: (String::new(), 0),
                line: format!(
                    "   WARNING  {} {} {} {}: {numbers}",
                    warning.status.to_uppercase(),
                    warning.kind,
                    warning.org_id,
                    warning.product
                ),
                expiry: false,
            }
        } else {
            let letter: DeadLetterMessage = serde_json::from_slice(payload)?;
            Printed {
                rank: 3,
                sequence: (String::new(), 0),
                line: format!("   DLQ      {}: {}", letter.reason, letter.detail),
                expiry: false,
            }
        };
        Ok(Some(printed))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_demo_uses_a_database_of_its_own_beside_the_configured_one() {
        use super::demo_database_url;
        assert_eq!(
            demo_database_url("postgres://postgres:pw@127.0.0.1:5432/entitlements"),
            "postgres://postgres:pw@127.0.0.1:5432/entitlements_demo"
        );
        assert_eq!(
            demo_database_url("postgres://db:5432/ents?sslmode=require"),
            "postgres://db:5432/ents_demo?sslmode=require"
        );
    }
}
