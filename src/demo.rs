//! The demo: librdkafka's in-process mock cluster as the broker, the real worker against
//! PostgreSQL, and a short story whose alerts and ledger entries are printed as the
//! worker publishes them.

use std::future::Future;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::codec::{AlertMessage, DeadLetterMessage, LedgerMessage};
use crate::settings::Settings;

/// The pause between two steps of the story, so a person can follow it.
const STEP_PAUSE: Duration = Duration::from_millis(700);
/// When the trial's units become valid, from the start of the story.
const TRIAL_START_SECONDS: i64 = 10;
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
    let (story_done_sender, story_done) = tokio::sync::oneshot::channel();
    let watcher = tokio::spawn(watch(settings.clone(), story_done_sender));
    play_story(&settings).await?;

    tokio::pin!(interrupted);
    tokio::select! {
        result = tokio::time::timeout(STORY_DEADLINE, story_done) => {
            if result.is_err() {
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
    watcher.abort();
    // The watcher's consumer must be gone before the broker is: a consumer closing
    // without its broker waits for it.
    let _ = watcher.await;
    drop(cluster);
    Ok(())
}

fn demo_database_url(url: &str) -> String {
    match url.rsplit_once('/') {
        Some((server, _)) => format!("{server}/entitlements_demo"),
        None => url.to_owned(),
    }
}

/// Every demo starts from an empty database, so it tells the same story each time.
async fn recreate_database(url: &str) -> anyhow::Result<()> {
    use sqlx::{ConnectOptions, Connection};
    use std::str::FromStr;
    let options = sqlx::postgres::PgConnectOptions::from_str(url)?;
    let mut maintenance = options.clone().database("postgres").connect().await?;
    sqlx::query("DROP DATABASE IF EXISTS entitlements_demo WITH (FORCE)")
        .execute(&mut maintenance)
        .await?;
    maintenance.close().await?;
    Ok(())
}

async fn play_story(settings: &Settings) -> anyhow::Result<()> {
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
    // After the last step, so the trial's credit and expiry are both seen happening.
    let trial_start = Utc::now() + chrono::Duration::seconds(TRIAL_START_SECONDS);
    // Each step: what a person reads, an unused note, and the (topic, message) pairs.
    type Step<'a> = (&'a str, &'a str, Vec<(String, Value)>);
    let steps: Vec<Step> = vec![
        (
            "acme buys a plan with 10 seats.",
            "",
            vec![(topics.entitlement_granted.clone(), event(json!({"org_id": "acme", "product": "seat", "quantity": 10, "source": {"kind": "plan", "reference": "PLAN-2026"}})))],
        ),
        (
            "12 participants join summit-2026: 10 seats move, 2 are missing.",
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
            "acme buys an add-on of 5 seats: the waiting workspace is filled at once.",
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
            "acme gets a trial of 3 seats valid in a few seconds, for a few seconds: the timer credits, then expires them.",
            "",
            vec![(topics.entitlement_granted.clone(), event(json!({"org_id": "acme", "product": "seat", "quantity": 3, "valid_from": trial_start.to_rfc3339_opts(SecondsFormat::Millis, true), "expires_at": (trial_start + chrono::Duration::seconds(TRIAL_SECONDS)).to_rfc3339_opts(SecondsFormat::Millis, true), "source": {"kind": "trial", "reference": "TRIAL-1"}})))],
        ),
    ];
    for (title, _, messages) in steps {
        println!("\n== {title}");
        for (topic, message) in messages {
            let payload = match &message {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            let key = message
                .get("org_id")
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
        }
        tokio::time::sleep(STEP_PAUSE).await;
    }
    Ok(())
}

/// Prints what the worker publishes; signals when the trial's expiry entry appears.
async fn watch(settings: Settings, done: tokio::sync::oneshot::Sender<()>) -> anyhow::Result<()> {
    let consumer: StreamConsumer = crate::kafka::client_config(&settings.kafka)
        .set("group.id", "entitlement-demo-watcher")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let topics = &settings.topics;
    consumer.subscribe(&[&topics.ledger, &topics.shortfalls, &topics.dlq])?;
    let mut done = Some(done);
    loop {
        let message = consumer.recv().await?;
        let payload = message.payload().unwrap_or_default();
        if message.topic() == topics.ledger {
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
            println!(
                "   ledger   {} #{:<3} {:<15} {:>3} {}{place}{actor}; pool now {}",
                entry.org_id,
                entry.sequence,
                entry.kind,
                entry.quantity,
                entry.product,
                entry.pool_available_after
            );
            if entry.kind == "expiry" {
                if let Some(done) = done.take() {
                    let _ = done.send(());
                }
            }
        } else if message.topic() == topics.shortfalls {
            let alert: AlertMessage = serde_json::from_slice(payload)?;
            println!(
                "   ALERT    {} {} {}: {} missing (required {}, allocated {})",
                alert.status.to_uppercase(),
                alert.workspace_id,
                alert.product,
                alert.missing,
                alert.required,
                alert.allocated
            );
        } else {
            let letter: DeadLetterMessage = serde_json::from_slice(payload)?;
            println!("   DLQ      {}: {}", letter.reason, letter.detail);
        }
    }
}
