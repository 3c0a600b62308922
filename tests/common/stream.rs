//! A stream of input events whose final outcome does not depend on delivery order, with
//! that outcome worked out from the events alone; and the checks that compare a worker's
//! database and output topics with it.
//!
//! Order independence by construction: required seats only grow (every cancellation either
//! comes from an activated participant, predates the participant's addition, or names a
//! participant never added), so each workspace ends with `allocated = required` whenever
//! its organization's grants cover the total, and the pool ends empty when they do not.
//! Revocations (rule 11) name only products no workspace uses, so what they take does not
//! depend on when they arrive either; and the one unlimited grant (rule 12) is of a module
//! with no counted units, which every workspace enabling it gets, before or after it.
//! Workspace updates (rule 13) come several per workspace at distinct times: the latest
//! decides, and ends that are past are past by the time any of them arrives.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use entitlement_worker::codec::InputKind;
use entitlement_worker::settings::{Settings, TopicSettings};
use futures::future::join_all;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use sqlx::PgPool;

#[derive(Clone)]
pub struct Event {
    pub kind: InputKind,
    pub org: String,
    pub body: Value,
}

/// What the contract demands at the end, from the events alone.
#[derive(Default)]
pub struct Expected {
    /// (workspace, product) -> required units.
    pub required: BTreeMap<(String, String), i64>,
    /// (workspace, product) -> allocated units, where the order cannot change it.
    pub allocated: BTreeMap<(String, String), i64>,
    /// (org, product) -> units allocated over all its workspaces.
    pub allocated_by_org: BTreeMap<(String, String), i64>,
    /// (org, product) -> units granted.
    pub granted: BTreeMap<(String, String), i64>,
    /// (org, product) -> units left in the pool.
    pub available: BTreeMap<(String, String), i64>,
    /// (org, product) -> units revocations took, where they took any.
    pub revoked: BTreeMap<(String, String), i64>,
    /// event ids of the manual transfers refused for want of the role.
    pub forbidden: BTreeSet<String>,
    /// workspace -> (name, live, ends_at) of the workspaces updated.
    pub lives: BTreeMap<String, Life>,
}

/// A workspace's life as the checks compare it: name, live, ends_at.
pub type Life = (Option<String>, bool, Option<DateTime<Utc>>);

pub struct Scenario {
    /// Delivered and applied before `events`: the module grant that manual transfers
    /// need (a request that finds the pool empty is refused, so its order would matter).
    pub setup: Vec<Event>,
    pub events: Vec<Event>,
    pub expected: Expected,
}

fn time(seconds: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 9, 0, 0).unwrap() + chrono::Duration::seconds(seconds)
}

/// Splits `total` into `parts` positive pieces.
fn split(rng: &mut StdRng, total: i64, parts: usize) -> Vec<i64> {
    let mut cuts: Vec<i64> = (1..parts).map(|_| rng.random_range(1..total)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut pieces = Vec::new();
    let mut last = 0;
    for cut in cuts.into_iter().chain([total]) {
        pieces.push(cut - last);
        last = cut;
    }
    pieces
}

/// Three organizations: one whose grants cover everything, one refilled piece by piece
/// during the stream, one that runs out. `scale` multiplies the participants.
pub fn scenario(seed: u64, scale: usize) -> Scenario {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut events = Vec::new();
    let mut expected = Expected::default();
    let mut next_id = 0_u64;
    let mut id = |prefix: &str| {
        next_id += 1;
        format!("{prefix}-{next_id}")
    };
    for org in ["ample", "refilled", "scarce"] {
        let mut org_required = 0;
        for w in 0..4 {
            let workspace = format!("{org}-ws{w}");
            let size = if w == 0 {
                75 * scale
            } else {
                rng.random_range(2..=15 * scale)
            };
            for p in 0..size {
                let participant = format!("p{p}");
                let joined = (w * 100_000 + p) as i64;
                let base = json!({"org_id": org, "workspace_id": workspace, "participant_id": participant});
                events.push(event(
                    InputKind::ParticipantAdded,
                    org,
                    &id("add"),
                    joined,
                    &base,
                    json!({}),
                ));
                let roll: f64 = rng.random();
                if roll < 0.2 {
                    // Activated, then cancelled: still counts.
                    events.push(event(
                        InputKind::ParticipantCancelled,
                        org,
                        &id("cancel"),
                        joined + 3600,
                        &base,
                        json!({"activated": true}),
                    ));
                } else if roll < 0.3 {
                    // A cancellation older than the addition: the addition wins either way.
                    events.push(event(
                        InputKind::ParticipantCancelled,
                        org,
                        &id("cancel"),
                        joined - 60,
                        &base,
                        json!({"activated": false}),
                    ));
                }
            }
            // Someone who cancelled without ever being added counts for nothing.
            let ghost =
                json!({"org_id": org, "workspace_id": workspace, "participant_id": "ghost"});
            events.push(event(
                InputKind::ParticipantCancelled,
                org,
                &id("cancel"),
                5,
                &ghost,
                json!({"activated": false}),
            ));
            expected
                .required
                .insert((workspace.clone(), "seat".into()), size as i64);
            org_required += size as i64;
        }
        let granted = match org {
            "ample" => org_required + 100,
            "refilled" => org_required + 7,
            _ => org_required / 2,
        };
        let pieces = match org {
            "ample" => vec![granted],
            _ => split(&mut rng, granted, 5),
        };
        for quantity in pieces {
            let body = json!({"org_id": org, "product": "seat", "quantity": quantity, "source": {"kind": "add_on", "reference": "order"}});
            events.push(event(
                InputKind::EntitlementGranted,
                org,
                &id("grant"),
                10,
                &body,
                json!({}),
            ));
        }
        expected
            .granted
            .insert((org.into(), "seat".into()), granted);
        let allocated = org_required.min(granted);
        expected
            .available
            .insert((org.into(), "seat".into()), granted - allocated);
        expected
            .allocated_by_org
            .insert((org.into(), "seat".into()), allocated);
        if granted >= org_required {
            for w in 0..4 {
                let key = (format!("{org}-ws{w}"), "seat".to_owned());
                let required = expected.required[&key];
                expected.allocated.insert(key, required);
            }
        }
    }
    // Modules: ample holds 3 units of gamification, enabled in four workspaces; a manager
    // transfers two by hand, a viewer's request is refused. scarce enables a module it
    // never bought.
    let gamification = json!({"org_id": "ample", "product": "gamification", "quantity": 3});
    let setup = vec![event(
        InputKind::EntitlementGranted,
        "ample",
        &id("grant"),
        10,
        &gamification,
        json!({}),
    )];
    for w in 0..4 {
        let workspace = format!("ample-ws{w}");
        let body = json!({"org_id": "ample", "workspace_id": workspace, "module": "gamification"});
        events.push(event(
            InputKind::ModuleEnabled,
            "ample",
            &id("module"),
            20,
            &body,
            json!({}),
        ));
        expected
            .required
            .insert((workspace.clone(), "gamification".into()), 1);
        let (role, user) = match w {
            0 | 1 => ("entitlement_manager", "mia"),
            2 => ("viewer", "vic"),
            _ => continue,
        };
        let request_id = id("transfer");
        let body = json!({"org_id": "ample", "workspace_id": workspace, "product": "gamification", "quantity": 1, "requested_by": {"user_id": user, "role": role}});
        events.push(event(
            InputKind::TransferRequested,
            "ample",
            &request_id,
            30,
            &body,
            json!({}),
        ));
        let allocated = i64::from(role == "entitlement_manager");
        expected
            .allocated
            .insert((workspace, "gamification".into()), allocated);
        if role == "viewer" {
            expected.forbidden.insert(request_id);
        }
    }
    expected
        .allocated
        .insert(("ample-ws3".into(), "gamification".into()), 0);
    expected
        .granted
        .insert(("ample".into(), "gamification".into()), 3);
    expected
        .available
        .insert(("ample".into(), "gamification".into()), 1);
    expected
        .allocated_by_org
        .insert(("ample".into(), "gamification".into()), 2);
    let live = json!({"org_id": "scarce", "workspace_id": "scarce-ws0", "module": "live-stream"});
    events.push(event(
        InputKind::ModuleEnabled,
        "scarce",
        &id("module"),
        20,
        &live,
        json!({}),
    ));
    expected
        .required
        .insert(("scarce-ws0".into(), "live-stream".into()), 1);
    expected
        .allocated
        .insert(("scarce-ws0".into(), "live-stream".into()), 0);
    expected
        .allocated_by_org
        .insert(("scarce".into(), "live-stream".into()), 0);
    revocations(&mut events, &mut expected, &mut id);
    unlimited(&mut events, &mut expected, &mut id);
    lives(&mut events, &mut expected, &mut id, &mut rng);
    events.shuffle(&mut rng);
    Scenario {
        setup,
        events,
        expected,
    }
}

/// Rule 11 for `ample`, on products no workspace uses: an add-on of 5 polls of which a
/// revocation takes 2; a subscription's 4 Q&A and 2 translation units, all taken by the
/// revocation of its source, and a re-grant of 3 Q&A after it, which stays.
fn revocations(
    events: &mut Vec<Event>,
    expected: &mut Expected,
    id: &mut impl FnMut(&str) -> String,
) {
    let org = "ample";
    let mut grant =
        |events: &mut Vec<Event>, product: &str, quantity: i64, at: i64, source: Value| {
            let grant_id = id("grant");
            let body =
                json!({"org_id": org, "product": product, "quantity": quantity, "source": source});
            events.push(event(
                InputKind::EntitlementGranted,
                org,
                &grant_id,
                at,
                &body,
                json!({}),
            ));
            grant_id
        };
    let polls = grant(
        events,
        "polls",
        5,
        10,
        json!({"kind": "add_on", "reference": "polls-pack"}),
    );
    let subscription = json!({"kind": "subscription", "reference": "sub-7"});
    grant(events, "q-and-a", 4, 10, subscription.clone());
    grant(events, "translation", 2, 10, subscription.clone());
    grant(events, "q-and-a", 3, 60, subscription.clone());
    let revoke_polls =
        json!({"org_id": org, "grant_id": polls, "quantity": 2, "reason": "downgrade"});
    events.push(event(
        InputKind::EntitlementRevoked,
        org,
        &id("revoke"),
        40,
        &revoke_polls,
        json!({}),
    ));
    let revoke_subscription = json!({"org_id": org, "source": subscription});
    events.push(event(
        InputKind::EntitlementRevoked,
        org,
        &id("revoke"),
        50,
        &revoke_subscription,
        json!({}),
    ));
    for (product, granted, revoked) in [("polls", 5, 2), ("q-and-a", 7, 4), ("translation", 2, 2)] {
        let key = (org.to_owned(), product.to_owned());
        expected.granted.insert(key.clone(), granted);
        expected.revoked.insert(key.clone(), revoked);
        expected.available.insert(key.clone(), granted - revoked);
    }
}

/// Rule 13: one to three updates of each workspace, at distinct times, and of a lobby that
/// nothing else names; each with or without a name, a start, an end that is past or far
/// ahead, archived one time in five. The latest by `occurred_at` decides; the end that is
/// past has passed before any event arrives, so the order cannot matter.
fn lives(
    events: &mut Vec<Event>,
    expected: &mut Expected,
    id: &mut impl FnMut(&str) -> String,
    rng: &mut StdRng,
) {
    let past = time(100);
    let ahead = Utc.with_ymd_and_hms(2099, 1, 1, 0, 0, 0).unwrap();
    let mut workspaces: Vec<(String, String)> = ["ample", "refilled", "scarce"]
        .into_iter()
        .flat_map(|org| (0..4).map(move |w| (org.to_owned(), format!("{org}-ws{w}"))))
        .collect();
    workspaces.push(("ample".to_owned(), "ample-lobby".to_owned()));
    for (org, workspace) in workspaces {
        let updates = rng.random_range(1..=3);
        let mut latest = None;
        for update in 0..updates {
            let name = rng
                .random_bool(0.7)
                .then(|| format!("{workspace} (take {update})"));
            let ends_at = match rng.random_range(0..3) {
                0 => None,
                1 => Some(past),
                _ => Some(ahead),
            };
            let archived = rng.random_bool(0.2);
            let mut body = json!({"org_id": org, "workspace_id": workspace, "archived": archived});
            if let Some(name) = &name {
                body["name"] = json!(name);
            }
            if rng.random_bool(0.5) {
                body["starts_at"] = json!(time(50).to_rfc3339());
            }
            if let Some(end) = ends_at {
                body["ends_at"] = json!(end.to_rfc3339());
            }
            events.push(event(
                InputKind::WorkspaceUpdated,
                &org,
                &id("life"),
                200 + update * 10,
                &body,
                json!({}),
            ));
            latest = Some((name, !archived && ends_at != Some(past), ends_at));
        }
        expected
            .lives
            .insert(workspace, latest.expect("at least one update"));
    }
}

/// Rule 12 for `refilled`: an unlimited plan of captions, which three of its workspaces
/// enable; modules wait for a person, but not while unlimited, so each gets its unit
/// whether it enabled captions before the grant arrived or after.
fn unlimited(
    events: &mut Vec<Event>,
    expected: &mut Expected,
    id: &mut impl FnMut(&str) -> String,
) {
    let org = "refilled";
    let body = json!({"org_id": org, "product": "captions", "unlimited": true,
                      "source": {"kind": "plan", "reference": "enterprise"}});
    events.push(event(
        InputKind::EntitlementGranted,
        org,
        &id("grant"),
        10,
        &body,
        json!({}),
    ));
    for w in 0..3 {
        let workspace = format!("{org}-ws{w}");
        let body = json!({"org_id": org, "workspace_id": workspace, "module": "captions"});
        events.push(event(
            InputKind::ModuleEnabled,
            org,
            &id("module"),
            20,
            &body,
            json!({}),
        ));
        let key = (workspace, "captions".to_owned());
        expected.required.insert(key.clone(), 1);
        expected.allocated.insert(key, 1);
    }
    expected
        .allocated_by_org
        .insert((org.to_owned(), "captions".to_owned()), 3);
}

fn event(kind: InputKind, org: &str, event_id: &str, at: i64, base: &Value, extra: Value) -> Event {
    let mut body = json!({"event_id": event_id, "occurred_at": time(at).to_rfc3339()});
    let object = body.as_object_mut().unwrap();
    object.extend(base.as_object().unwrap().clone());
    object.extend(extra.as_object().unwrap().clone());
    Event {
        kind,
        org: org.to_owned(),
        body,
    }
}

pub fn topic_of(topics: &TopicSettings, kind: InputKind) -> &str {
    match kind {
        InputKind::ParticipantAdded => &topics.participant_added,
        InputKind::ParticipantCancelled => &topics.participant_cancelled,
        InputKind::ModuleEnabled => &topics.module_enabled,
        InputKind::EntitlementGranted => &topics.entitlement_granted,
        InputKind::TransferRequested => &topics.transfer_requested,
        InputKind::EntitlementRevoked => &topics.entitlement_revoked,
        InputKind::WorkspaceUpdated => &topics.workspace_updated,
        InputKind::ProductDefined => &topics.product_defined,
    }
}

/// How producers key their messages: the worker must be right whatever they do.
#[derive(Clone, Copy)]
pub enum Keys {
    ByOrganization,
    Random,
}

/// A client of the test's own for the worker's broker: its address and its security
/// properties (the worker's group settings left out).
pub fn client_config(settings: &Settings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.kafka.brokers);
    for (key, value) in &settings.kafka.properties {
        if key.starts_with("security.") || key.starts_with("sasl.") || key.starts_with("ssl.") {
            config.set(key, value);
        }
    }
    config
}

/// Produces the events (in the given order) and returns how many messages went out.
pub async fn produce(settings: &Settings, events: &[&Event], keys: Keys) -> usize {
    // Idempotent, so that a request retried while the broker is away (frozen, say) is not
    // written twice: the tests count messages by their offsets.
    let producer: FutureProducer = client_config(settings)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("a producer");
    for chunk in events.chunks(1000) {
        let payloads: Vec<(String, &str, String)> = chunk
            .iter()
            .map(|event| {
                let key = match keys {
                    Keys::ByOrganization => event.org.clone(),
                    Keys::Random => format!("{:x}", rand::random::<u32>()),
                };
                (
                    key,
                    topic_of(&settings.topics, event.kind),
                    event.body.to_string(),
                )
            })
            .collect();
        let sends = payloads.iter().map(|(key, topic, payload)| {
            producer.send(
                FutureRecord::to(topic)
                    .key(key.as_str())
                    .payload(payload.as_str()),
                Duration::from_secs(30),
            )
        });
        for result in join_all(sends).await {
            result.expect("the broker took the message");
        }
    }
    events.len()
}

/// Sum of the next offsets stored in PostgreSQL: the messages the worker has applied.
pub async fn applied(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT COALESCE(sum(next_offset), 0)::bigint FROM consumer_offsets")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

pub async fn outbox_backlog(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT coalesce(sum(messages + ledger_messages), 0)::bigint FROM outbox")
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

/// What the worker published, read from the start of the three output topics.
#[derive(Default)]
pub struct Outputs {
    pub ledger: Vec<Value>,
    pub alerts: Vec<Value>,
    pub dead_letters: Vec<Value>,
    /// The state topic's messages with their keys, in the order of each partition.
    pub states: Vec<(String, Value)>,
    /// The pool warnings, in the order of each partition (one per organization).
    pub warnings: Vec<Value>,
}

impl Outputs {
    /// The state topic's messages as (key, message), in the order they were read.
    pub fn states(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.states.iter().map(|(key, value)| (key.as_str(), value))
    }

    /// Reads all five output topics from the beginning up to their high watermarks as
    /// they are now (call it once the outbox is empty: everything is in the log), and
    /// checks that `ledger_entries` distinct ledger entries were among them.
    pub fn read(settings: &Settings, ledger_entries: usize, deadline: Duration) -> Self {
        let consumer: BaseConsumer = client_config(settings)
            .set("group.id", super::unique("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("a reader");
        let topics = &settings.topics;
        let mut assignment = TopicPartitionList::new();
        let mut remaining: HashMap<(String, i32), i64> = HashMap::new();
        for topic in [
            &topics.ledger,
            &topics.shortfalls,
            &topics.dlq,
            &topics.state,
            &topics.pool_warnings,
        ] {
            let metadata = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .expect("the topic's metadata");
            for partition in metadata.topics()[0].partitions() {
                let (low, high) = consumer
                    .fetch_watermarks(topic, partition.id(), Duration::from_secs(10))
                    .expect("the partition's watermarks");
                if high > low {
                    remaining.insert((topic.to_string(), partition.id()), high);
                }
                assignment
                    .add_partition_offset(topic, partition.id(), Offset::Beginning)
                    .expect("a partition");
            }
        }
        consumer.assign(&assignment).expect("assigned");
        let mut outputs = Self::default();
        let mut ids = BTreeSet::new();
        let started = std::time::Instant::now();
        while !remaining.is_empty() {
            assert!(
                started.elapsed() < deadline,
                "timed out reading the outputs: {} ledger entries so far, still to read {remaining:?}",
                ids.len()
            );
            let Some(message) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let message = message.expect("a message");
            let position = (message.topic().to_owned(), message.partition());
            if remaining
                .get(&position)
                .is_some_and(|high| message.offset() + 1 >= *high)
            {
                remaining.remove(&position);
            }
            let value: Value =
                serde_json::from_slice(message.payload().expect("a payload")).expect("JSON");
            if message.topic() == topics.ledger {
                ids.insert(value["entry_id"].as_str().unwrap().to_owned());
                outputs.ledger.push(value);
            } else if message.topic() == topics.shortfalls {
                outputs.alerts.push(value);
            } else if message.topic() == topics.state {
                let key = message.key().expect("a state message has a key");
                let key = String::from_utf8(key.to_vec()).expect("a UTF-8 key");
                outputs.states.push((key, value));
            } else if message.topic() == topics.pool_warnings {
                outputs.warnings.push(value);
            } else {
                outputs.dead_letters.push(value);
            }
        }
        assert_eq!(
            ids.len(),
            ledger_entries,
            "distinct ledger entries published"
        );
        outputs
    }
}

/// Runs the reference model (`oracle.rs`, written apart from the worker's core) over the
/// scenario's events in their generated order and checks that it reaches the outcome the
/// generator computed: the target the worker is compared with is the oracle's too.
pub fn assert_oracle_agrees(scenario: &Scenario) {
    use super::oracle::{Oracle, OracleEvent, OracleVerdict};
    let mut oracle = Oracle::new(false);
    let now = Utc::now();
    for event in scenario.setup.iter().chain(&scenario.events) {
        let kind = match event.kind {
            InputKind::ParticipantAdded => "participant-added",
            InputKind::ParticipantCancelled => "participant-cancelled",
            InputKind::ModuleEnabled => "module-enabled",
            InputKind::EntitlementGranted => "entitlement-granted",
            InputKind::TransferRequested => "entitlement-transfer-requested",
            InputKind::EntitlementRevoked => "entitlement-revoked",
            InputKind::WorkspaceUpdated => "workspace-updated",
            InputKind::ProductDefined => "product-defined",
        };
        let decoded = OracleEvent::from_json(kind, &event.body).expect("a valid event");
        oracle.apply(&decoded, now);
    }
    let expected = &scenario.expected;
    let holdings = oracle.holdings();
    let required: BTreeMap<(String, String), i64> = holdings
        .iter()
        .filter(|(_, (required, _))| *required > 0)
        .map(|(key, (required, _))| (key.clone(), *required))
        .collect();
    assert_eq!(required, expected.required, "the oracle's required units");
    for ((workspace, product), allocated) in &expected.allocated {
        assert_eq!(
            oracle.allocated(workspace, product),
            *allocated,
            "the oracle's allocation of {workspace} {product}"
        );
    }
    let mut allocated_by_org: BTreeMap<(String, String), i64> = BTreeMap::new();
    for ((workspace, product), (_, allocated)) in &holdings {
        let org = oracle.owner(workspace).expect("an owner").to_owned();
        *allocated_by_org.entry((org, product.clone())).or_insert(0) += allocated;
    }
    assert_eq!(
        allocated_by_org, expected.allocated_by_org,
        "the oracle's allocations"
    );
    for (key, available) in &expected.available {
        let pool = oracle.pool(&key.0, &key.1);
        assert_eq!(pool.available, *available, "the oracle's pool {key:?}");
        assert_eq!(
            pool.granted, expected.granted[key],
            "the oracle's grants {key:?}"
        );
        assert_eq!(
            pool.revoked,
            expected.revoked.get(key).copied().unwrap_or(0),
            "the oracle's revocations {key:?}"
        );
    }
    let forbidden: BTreeSet<String> = oracle
        .verdicts()
        .iter()
        .filter(|(_, verdict)| *verdict == OracleVerdict::Refused("forbidden"))
        .map(|(event_id, _)| event_id.clone())
        .collect();
    assert_eq!(forbidden, expected.forbidden, "the oracle's refusals");
    let lives: BTreeMap<String, Life> = oracle
        .lives()
        .iter()
        .map(|(workspace, life)| {
            (
                workspace.clone(),
                (life.name.clone(), life.live, life.ends_at),
            )
        })
        .collect();
    assert_eq!(lives, expected.lives, "the oracle's workspace lives");
}

/// Compares the worker's database and outputs with what the events demand.
pub async fn check(pool: &PgPool, outputs: &Outputs, expected: &Expected) {
    let consumption: Vec<(String, String, String, i64, i64)> = sqlx::query_as(
        "SELECT workspace_id, product, org_id, required, allocated FROM consumption",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let required: BTreeMap<(String, String), i64> = consumption
        .iter()
        .map(|(w, p, _, required, _)| ((w.clone(), p.clone()), *required))
        .collect();
    assert_eq!(required, expected.required, "required units per workspace");
    for (key, allocated) in &expected.allocated {
        let row = consumption
            .iter()
            .find(|(w, p, ..)| (w, p) == (&key.0, &key.1))
            .unwrap_or_else(|| panic!("no consumption for {key:?}"));
        assert_eq!(row.4, *allocated, "allocated units of {key:?}");
    }
    let mut allocated_by_org = BTreeMap::new();
    for (_, product, org, _, allocated) in &consumption {
        *allocated_by_org
            .entry((org.clone(), product.clone()))
            .or_insert(0) += allocated;
    }
    assert_eq!(
        allocated_by_org, expected.allocated_by_org,
        "allocated units per organization"
    );
    let pools: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT org_id, product, available, granted_total, revoked_total FROM pools",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let available: BTreeMap<_, _> = pools
        .iter()
        .filter(|(_, _, _, granted, _)| *granted > 0)
        .map(|(o, p, available, ..)| ((o.clone(), p.clone()), *available))
        .collect();
    assert_eq!(available, expected.available, "pool balances");
    let granted: BTreeMap<_, _> = pools
        .iter()
        .filter(|(_, _, _, granted, _)| *granted > 0)
        .map(|(o, p, _, granted, _)| ((o.clone(), p.clone()), *granted))
        .collect();
    assert_eq!(granted, expected.granted, "units granted");
    let revoked: BTreeMap<_, _> = pools
        .iter()
        .filter(|(.., revoked)| *revoked > 0)
        .map(|(o, p, .., revoked)| ((o.clone(), p.clone()), *revoked))
        .collect();
    assert_eq!(revoked, expected.revoked, "units revoked");
    let lives: BTreeMap<String, Life> = sqlx::query_as::<_, (String, Option<String>, bool, _)>(
        "SELECT workspace_id, name, live, ends_at FROM workspaces WHERE life_event_id IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(workspace, name, live, ends_at)| (workspace, (name, live, ends_at)))
    .collect();
    assert_eq!(lives, expected.lives, "the workspaces' lives");

    // The ledger in PostgreSQL: gapless per organization, summing to the balances.
    let ledger: Vec<Value> = sqlx::query_scalar(
        "SELECT json_build_object('entry_id', entry_id, 'sequence', sequence, 'org_id', org_id,
                'product', product, 'kind', kind, 'quantity', quantity,
                'workspace_id', workspace_id, 'pool_available_after', pool_available_after,
                'caused_by', caused_by, 'grant_id', grant_id, 'actor', actor,
                'unlimited', CASE WHEN unlimited THEN true END)
         FROM ledger ORDER BY org_id, sequence",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut sequences: HashMap<String, i64> = HashMap::new();
    let mut moved: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut grants: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut revocations: BTreeMap<(String, String), i64> = BTreeMap::new();
    for entry in &ledger {
        let org = entry["org_id"].as_str().unwrap().to_owned();
        let last = sequences.entry(org.clone()).or_insert(0);
        *last += 1;
        assert_eq!(
            entry["sequence"].as_i64(),
            Some(*last),
            "gapless ledger: {entry}"
        );
        let product = entry["product"].as_str().unwrap().to_owned();
        let quantity = entry["quantity"].as_i64().unwrap();
        // Rule 12: an unlimited grant's own entry counts no units.
        let unlimited = entry["unlimited"] == true;
        match entry["kind"].as_str().unwrap() {
            "grant" if unlimited => {}
            "grant" => *grants.entry((org, product)).or_insert(0) += quantity,
            "revocation" => {
                assert!(
                    entry["grant_id"].is_string(),
                    "a revocation names its grant: {entry}"
                );
                *revocations.entry((org, product)).or_insert(0) += quantity;
            }
            "transfer" | "manual_transfer" => {
                let workspace = entry["workspace_id"].as_str().unwrap().to_owned();
                *moved.entry((workspace, product)).or_insert(0) += quantity;
            }
            other => panic!("unexpected ledger entry kind {other}"),
        }
    }
    assert_eq!(grants, expected.granted, "grant entries sum to the grants");
    assert_eq!(
        revocations, expected.revoked,
        "revocation entries sum to what was revoked"
    );
    let allocated: BTreeMap<_, _> = consumption
        .iter()
        .filter(|row| row.4 > 0)
        .map(|(w, p, _, _, allocated)| ((w.clone(), p.clone()), *allocated))
        .collect();
    assert_eq!(
        moved, allocated,
        "transfer entries sum to what each workspace holds"
    );

    // The ledger topic in the order it was read (one partition per organization): a
    // consumer that drops repeats by id sees each organization's entries gapless and in
    // sequence order.
    let mut next_new: HashMap<String, i64> = HashMap::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for message in &outputs.ledger {
        if !seen.insert(message["entry_id"].as_str().unwrap().to_owned()) {
            continue;
        }
        let org = message["org_id"].as_str().unwrap().to_owned();
        let next = next_new.entry(org).or_insert(1);
        assert_eq!(
            message["sequence"].as_i64(),
            Some(*next),
            "the ledger topic in order per organization: {message}"
        );
        *next += 1;
    }

    // The ledger topic: every entry of the database, under the same id, nothing else.
    let mut published: BTreeMap<String, Value> = BTreeMap::new();
    for message in &outputs.ledger {
        let mut message = message.clone();
        message.as_object_mut().unwrap().remove("recorded_at");
        let id = message["entry_id"].as_str().unwrap().to_owned();
        if let Some(earlier) = published.get(&id) {
            assert_eq!(earlier, &message, "a re-published entry keeps its content");
        }
        published.insert(id, message);
    }
    let stored: BTreeMap<String, Value> = ledger
        .iter()
        .map(|entry| {
            let mut entry = entry.clone();
            let object = entry.as_object_mut().unwrap();
            object.retain(|_, value| !value.is_null());
            (entry["entry_id"].as_str().unwrap().to_owned(), entry)
        })
        .collect();
    assert_eq!(
        published.len(),
        stored.len(),
        "one published entry per stored entry"
    );
    assert_eq!(
        published, stored,
        "the ledger topic says what the database says"
    );

    // Alerts: the last word on every shortfall matches the final state.
    let mut last_alert: HashMap<(String, String), &Value> = HashMap::new();
    for alert in &outputs.alerts {
        let key = (
            alert["workspace_id"].as_str().unwrap().to_owned(),
            alert["product"].as_str().unwrap().to_owned(),
        );
        last_alert.insert(key, alert);
    }
    for (workspace, product, _, required, allocated) in &consumption {
        let missing = (required - allocated).max(0);
        let alert = last_alert.get(&(workspace.clone(), product.clone()));
        if missing > 0 {
            let alert = alert.unwrap_or_else(|| panic!("no alert for {workspace} {product}"));
            assert_eq!(alert["status"], "open", "{alert}");
            assert_eq!(alert["missing"].as_i64(), Some(missing), "{alert}");
        } else if let Some(alert) = alert {
            assert_eq!(alert["status"], "resolved", "{alert}");
        }
    }
    let open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM consumption WHERE required > allocated")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(
        open,
        last_alert
            .values()
            .filter(|alert| alert["status"] == "open")
            .count() as i64,
        "open shortfalls"
    );

    check_pool_warnings(pool, &outputs.warnings).await;

    // Dead letters: the viewer's request, and nothing else.
    let refused: BTreeSet<String> = outputs
        .dead_letters
        .iter()
        .map(|letter| {
            assert_eq!(letter["reason"], "forbidden", "{letter}");
            letter["event_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(refused, expected.forbidden, "refused requests");

    // The state topic: a copy kept from it (last version per key) is what `report` shows.
    super::state_copy::assert_copy_matches_report(pool, outputs.states()).await;
}

/// Rule 15 against the final state: a repeated warning id repeats the same message; the
/// last message of every warning is what PostgreSQL keeps; and a pool's `low` warning is
/// open exactly when its available units are at or below 10% of its valid
/// counted grants while it has some and is not unlimited (the stream's grants never expire,
/// so that does not depend on when it is checked).
async fn check_pool_warnings(pool: &PgPool, warnings: &[Value]) {
    let mut by_id: HashMap<&str, &Value> = HashMap::new();
    let mut last: BTreeMap<(String, String, String, String), &Value> = BTreeMap::new();
    for warning in warnings {
        let id = warning["warning_id"].as_str().expect("a warning_id");
        if let Some(seen) = by_id.insert(id, warning) {
            assert_eq!(seen, warning, "a repeated warning id repeats its message");
        }
        let key = (
            warning["org_id"].as_str().unwrap().to_owned(),
            warning["product"].as_str().unwrap().to_owned(),
            warning["kind"].as_str().unwrap().to_owned(),
            warning["grant_id"].as_str().unwrap_or("").to_owned(),
        );
        last.insert(key, warning);
    }
    type Row = (
        String,
        String,
        String,
        String,
        bool,
        Option<i64>,
        Option<i64>,
        Option<i64>,
    );
    let stored: Vec<Row> = sqlx::query_as(
        "SELECT org_id, product, kind, grant_id, open, available, threshold, units
           FROM pool_warnings ORDER BY 1, 2, 3, 4",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        last.len(),
        stored.len(),
        "one stored warning per warning published"
    );
    for (org, product, kind, grant, open, available, threshold, units) in &stored {
        let message = last
            .get(&(org.clone(), product.clone(), kind.clone(), grant.clone()))
            .unwrap_or_else(|| panic!("no warning published for {org} {product} {kind} {grant}"));
        let status = if *open { "open" } else { "resolved" };
        assert_eq!(message["status"], status, "{message}");
        assert_eq!(message["available"].as_i64(), *available, "{message}");
        assert_eq!(message["threshold"].as_i64(), *threshold, "{message}");
        assert_eq!(message["units"].as_i64(), *units, "{message}");
    }
    let pools: Vec<(String, String, i64, bool, i64)> = sqlx::query_as(
        "SELECT p.org_id, p.product, p.available, p.unlimited,
                COALESCE((SELECT sum(l.quantity - l.revoked) FROM lots l
                           WHERE l.org_id = p.org_id AND l.product = p.product
                             AND NOT l.unlimited AND l.status IN ('active', 'spent', 'revoked')
                             AND l.valid_from <= now()
                             AND (l.expires_at IS NULL OR l.expires_at > now())), 0)::bigint
           FROM pools p ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(!pools.is_empty());
    let mut low_open = 0;
    for (org, product, available, unlimited, basis) in pools {
        let threshold = basis * 10 / 100;
        let expected = basis > 0 && !unlimited && available <= threshold;
        let message = last.get(&(org.clone(), product.clone(), "low".into(), String::new()));
        let open = message.is_some_and(|message| message["status"] == "open");
        assert_eq!(
            open, expected,
            "{org} {product}: {available} left, valid counted grants {basis}, unlimited {unlimited}: {message:?}"
        );
        if let Some(message) = message.filter(|_| open) {
            assert_eq!(message["available"].as_i64(), Some(available), "{message}");
            assert_eq!(message["threshold"].as_i64(), Some(threshold), "{message}");
        }
        low_open += i64::from(open);
    }
    eprintln!(
        "pool warnings: {} messages, {low_open} low open at the end",
        warnings.len()
    );
}
