//! One bad message never stops, stalls or crash-loops the worker (rule 10): inputs the
//! decoder accepts reach PostgreSQL and the outbox whole, inputs it cannot accept go to the
//! dead-letter topic, and a batch the database refuses is split to find the message at
//! fault. Each test is one class of input that used to stop or stall the worker.

mod common;

use chrono::{DateTime, Duration, Utc};
use entitlement_worker::codec::{decode_received, InputKind};
use entitlement_worker::domain::Policy;
use entitlement_worker::pipeline::commit_batch;
use entitlement_worker::store::{Inbound, Store};
use entitlement_worker::telemetry::{Health, Metrics};
use serde_json::Value;

/// A consumed message as the consumer thread makes it: decoded at `now`, with the default
/// five minutes of clock skew allowed. (Its Kafka key is not kept: a NUL byte in it, which
/// once stalled a partition, is covered end to end by the fault matrix's poison row.)
fn received(
    topic: &str,
    offset: i64,
    kind: InputKind,
    payload: &[u8],
    now: DateTime<Utc>,
) -> Inbound {
    Inbound {
        topic: topic.to_owned(),
        partition: 0,
        offset,
        payload: Some(payload.to_vec()),
        decoded: decode_received(kind, Some(payload), Some(now + Duration::seconds(300))),
    }
}

async fn store() -> Store {
    let settings = common::settings("unused:9092");
    Store::connect(&settings.database).await.expect("connects")
}

/// Applies `batch` the way a lane does (retries, splitting a refused batch).
async fn apply(store: &Store, batch: &[Inbound]) {
    commit_batch(
        store,
        batch,
        Policy::default(),
        &Metrics::new(),
        &Health::default(),
        "lane 0",
    )
    .await
    .expect("a batch of any input commits");
}

/// Every message waiting in the outbox, as (channel, key, JSON), in publishing order.
async fn outbox(store: &Store) -> Vec<(String, Option<String>, Value)> {
    store
        .pending_outbox(1_000_000)
        .await
        .unwrap()
        .into_iter()
        .flat_map(|row| row.messages)
        .map(|message| {
            (
                message.channel.as_str().to_owned(),
                message.key,
                serde_json::from_slice(&message.payload).unwrap(),
            )
        })
        .collect()
}

async fn dead_letters(store: &Store) -> Vec<(Option<String>, Value)> {
    outbox(store)
        .await
        .into_iter()
        .filter(|(channel, _, _)| channel == "dlq")
        .map(|(_, key, letter)| (key, letter))
        .collect()
}

async fn next_offset(store: &Store, topic: &str) -> i64 {
    let (offset,): (i64,) = sqlx::query_as(
        "SELECT next_offset FROM consumer_offsets WHERE topic = $1 AND partition = 0",
    )
    .bind(topic)
    .fetch_one(store.pool())
    .await
    .unwrap();
    offset
}

#[tokio::test]
async fn a_grant_window_shorter_than_a_microsecond_is_rejected_not_fatal() {
    // Given a grant valid for 500 ns (PostgreSQL keeps microseconds) beside a good one,
    let store = store().await;
    let now = Utc::now();
    let short = br#"{"event_id":"g-short","occurred_at":"2026-01-01T09:00:00Z","org_id":"acme","product":"seat","quantity":3,"valid_from":"2026-06-01T00:00:00.000000100Z","expires_at":"2026-06-01T00:00:00.000000600Z"}"#;
    let good = br#"{"event_id":"g-good","occurred_at":"2026-01-01T09:00:00Z","org_id":"acme","product":"seat","quantity":2}"#;
    let batch = [
        received("granted", 0, InputKind::EntitlementGranted, short, now),
        received("granted", 1, InputKind::EntitlementGranted, good, now),
    ];
    apply(&store, &batch).await;

    // then the short one is a schema violation, the good one is credited, and the
    // partition moves on.
    let letters = dead_letters(&store).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].1["reason"], "schema_violation");
    assert_eq!(letters[0].1["event_id"], "g-short");
    let (available,): (i64,) = sqlx::query_as("SELECT available FROM pools WHERE org_id = 'acme'")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(available, 2);
    assert_eq!(next_offset(&store, "granted").await, 2);
}

#[tokio::test]
async fn two_events_of_a_participant_in_one_microsecond_end_the_same_in_either_order() {
    // Two events 100 ns apart: once cut to microseconds, as PostgreSQL keeps them, the
    // event id decides (rule 2), whichever arrives first and whether or not the first was
    // stored before the second arrived.
    let now = Utc::now();
    let added = br#"{"event_id":"e-b","occurred_at":"2026-01-01T09:00:00.000000200Z","org_id":"acme","workspace_id":"w","participant_id":"p"}"#;
    let cancelled = br#"{"event_id":"e-a","occurred_at":"2026-01-01T09:00:00.000000100Z","org_id":"acme","workspace_id":"w","participant_id":"p","activated":false}"#;
    let mut outcomes = Vec::new();
    for (first, second) in [
        (
            (InputKind::ParticipantAdded, &added[..]),
            (InputKind::ParticipantCancelled, &cancelled[..]),
        ),
        (
            (InputKind::ParticipantCancelled, &cancelled[..]),
            (InputKind::ParticipantAdded, &added[..]),
        ),
    ] {
        let store = store().await;
        apply(&store, &[received("one", 0, first.0, first.1, now)]).await;
        apply(&store, &[received("two", 0, second.0, second.1, now)]).await;
        let (counted, last): (bool, String) = sqlx::query_as(
            "SELECT counted, last_event_id FROM participants WHERE participant_id = 'p'",
        )
        .fetch_one(store.pool())
        .await
        .unwrap();
        outcomes.push((counted, last));
    }
    assert_eq!(outcomes[0], outcomes[1], "the arrival order decided");
    // Same microsecond, so the larger event id wins: the participant was added.
    assert_eq!(outcomes[0], (true, "e-b".to_owned()));
}

#[tokio::test]
async fn text_postgresql_cannot_hold_is_rejected_and_the_partition_moves_on() {
    let store = store().await;
    let now = Utc::now();
    let inputs: [(InputKind, &[u8]); 4] = [
        (
            InputKind::ParticipantAdded,
            br#"{"event_id":"a1","occurred_at":"2026-01-01T09:00:00Z","org_id":"acme","workspace_id":"w","participant_id":"p\u0000"}"#,
        ),
        (
            InputKind::EntitlementGranted,
            br#"{"event_id":"g1","occurred_at":"2026-01-01T09:00:00Z","org_id":"acme","product":"seat","quantity":1,"source":{"kind":"plan","reference":"pro\u0000"}}"#,
        ),
        (
            InputKind::TransferRequested,
            br#"{"event_id":"t1","occurred_at":"2026-01-01T09:00:00Z","org_id":"acme","workspace_id":"w","product":"seat","quantity":1,"requested_by":{"user_id":"u","role":"entitlement_manager\u0000"}}"#,
        ),
        (
            InputKind::ParticipantAdded,
            br#"{"event_id":"a2","occurred_at":"2026-01-01T09:00:00Z","org_id":"acme","workspace_id":"w","participant_id":"fine"}"#,
        ),
    ];
    let batch: Vec<Inbound> = inputs
        .iter()
        .enumerate()
        .map(|(offset, (kind, payload))| received("t", offset as i64, *kind, payload, now))
        .collect();
    apply(&store, &batch).await;
    let letters = dead_letters(&store).await;
    let reasons: Vec<(&str, &str)> = letters
        .iter()
        .map(|(_, letter)| {
            (
                letter["event_id"].as_str().unwrap(),
                letter["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            ("a1", "schema_violation"),
            ("g1", "schema_violation"),
            ("t1", "schema_violation")
        ]
    );
    assert!(letters
        .iter()
        .all(|(_, letter)| letter["detail"].as_str().unwrap().contains("NUL")));
    // Dead letters are keyed by organization.
    assert!(
        letters
            .iter()
            .all(|(key, _)| key.as_deref() == Some("acme")),
        "{letters:?}"
    );
    assert_eq!(next_offset(&store, "t").await, 4);
    let (participants,): (i64,) = sqlx::query_as("SELECT count(*) FROM participants")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(participants, 1, "the good participant is applied");
}

#[tokio::test]
async fn bad_workspace_updates_are_dead_lettered_saying_why_and_the_good_one_applied() {
    let store = store().await;
    let now = Utc::now();
    let update = |event_id: &str, org: &str, fields: &str| {
        format!(
            r#"{{"event_id":"{event_id}","occurred_at":"2026-01-01T09:00:00Z","org_id":"{org}","workspace_id":"summit"{fields}}}"#
        )
    };
    let inputs = [
        update(
            "u-good",
            "acme",
            r#","name":"Summit","ends_at":"2099-01-01T00:00:00Z""#,
        ),
        update(
            "u-backwards",
            "acme",
            r#","starts_at":"2027-03-03T00:00:00Z","ends_at":"2027-03-01T00:00:00Z""#,
        ),
        update("u-nul", "acme", r#","name":"Sum\u0000mit""#),
        update(
            "u-long",
            "acme",
            &format!(r#","name":"{}""#, "n".repeat(257)),
        ),
        update("u-flag", "acme", r#","archived":"yes""#),
        update("u-when", "acme", r#","ends_at":"next friday""#),
        update("u-stray", "globex", r#","name":"Ours","archived":true"#),
    ];
    let batch: Vec<Inbound> = inputs
        .iter()
        .enumerate()
        .map(|(offset, payload)| {
            received(
                "updated",
                offset as i64,
                InputKind::WorkspaceUpdated,
                payload.as_bytes(),
                now,
            )
        })
        .collect();
    apply(&store, &batch).await;
    let letters = dead_letters(&store).await;
    let reasons: Vec<(&str, &str, Option<&str>)> = letters
        .iter()
        .map(|(key, letter)| {
            (
                letter["event_id"].as_str().unwrap(),
                letter["reason"].as_str().unwrap(),
                key.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            ("u-backwards", "schema_violation", Some("acme")),
            ("u-nul", "schema_violation", Some("acme")),
            ("u-long", "schema_violation", Some("acme")),
            ("u-flag", "schema_violation", Some("acme")),
            ("u-when", "schema_violation", Some("acme")),
            ("u-stray", "tenant_mismatch", Some("globex")),
        ]
    );
    assert!(letters[0].1["detail"]
        .as_str()
        .unwrap()
        .contains("must be after `starts_at`"));
    assert_eq!(next_offset(&store, "updated").await, inputs.len() as i64);
    let (owner, name, live): (String, Option<String>, bool) =
        sqlx::query_as("SELECT org_id, name, live FROM workspaces WHERE workspace_id = 'summit'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(
        (owner.as_str(), name.as_deref(), live),
        ("acme", Some("Summit"), true),
        "the good update is applied, the stray one changes nothing"
    );
}

#[tokio::test]
async fn a_dead_letter_stays_under_the_producer_limit_whatever_its_input() {
    // 64 KiB of control characters, each escaped as six bytes in JSON, and a 900 KB input
    // over the size limit: both dead letters stay under 1 MB, say how large the input was
    // and carry its digest.
    let store = store().await;
    let now = Utc::now();
    let mut controls = b"{\"event_id\":\"x\",\"pad\":\"".to_vec();
    controls.resize(64 * 1024 - 2, 0x01);
    controls.extend_from_slice(b"\"}");
    let huge = vec![b'x'; 900_000];
    let batch = [
        received("t", 0, InputKind::ParticipantAdded, &controls, now),
        received("t", 1, InputKind::ParticipantAdded, &huge, now),
    ];
    apply(&store, &batch).await;
    let rows = store.pending_outbox(100).await.unwrap();
    let messages: Vec<_> = rows.iter().flat_map(|row| &row.messages).collect();
    assert_eq!(messages.len(), 2);
    for (message, input) in messages.iter().zip([&controls, &huge]) {
        assert!(
            message.payload.len() < 1_000_000,
            "{} bytes",
            message.payload.len()
        );
        let letter: Value = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(letter["payload_bytes"], input.len());
        assert_eq!(letter["payload_sha256"].as_str().unwrap().len(), 64);
    }
    let second: Value = serde_json::from_slice(&messages[1].payload).unwrap();
    assert_eq!(second["reason"], "too_large");
    assert_eq!(second["payload_truncated"], true);
    assert_eq!(second["payload"].as_str().unwrap().len(), 64 * 1024);
    assert_eq!(next_offset(&store, "t").await, 2);
}

#[tokio::test]
async fn the_same_event_id_in_two_organizations_is_two_grants() {
    // Event ids are the producers' choice: two organizations may both send "g1".
    let store = store().await;
    let now = Utc::now();
    let grant = |org: &str, quantity: i64| {
        format!(
            r#"{{"event_id":"g1","occurred_at":"2026-01-01T09:00:00Z","org_id":"{org}","product":"seat","quantity":{quantity}}}"#
        )
    };
    let (acme, globex) = (grant("acme", 5), grant("globex", 7));
    let batch = [
        received("g", 0, InputKind::EntitlementGranted, acme.as_bytes(), now),
        received(
            "g",
            1,
            InputKind::EntitlementGranted,
            globex.as_bytes(),
            now,
        ),
    ];
    apply(&store, &batch).await;
    // Sent again at later offsets (a producer's retry), both are duplicates.
    let again = [
        received(
            "g",
            2,
            InputKind::EntitlementGranted,
            globex.as_bytes(),
            now,
        ),
        received("g", 3, InputKind::EntitlementGranted, acme.as_bytes(), now),
    ];
    apply(&store, &again).await;
    let pools: Vec<(String, i64)> =
        sqlx::query_as("SELECT org_id, available FROM pools ORDER BY org_id")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(pools, [("acme".to_owned(), 5), ("globex".to_owned(), 7)]);
    let lots: Vec<(String, i64)> =
        sqlx::query_as("SELECT org_id, remaining FROM lots WHERE lot_id = 'g1' ORDER BY org_id")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(lots, [("acme".to_owned(), 5), ("globex".to_owned(), 7)]);
    assert!(dead_letters(&store).await.is_empty());
    assert_eq!(next_offset(&store, "g").await, 4);
}

#[tokio::test]
async fn an_event_from_the_future_is_rejected_with_its_reason() {
    // A cancellation dated 2999 would outrank every later event of the participant.
    let store = store().await;
    let now = Utc::now();
    let future = br#"{"event_id":"c-2999","occurred_at":"2999-01-01T00:00:00Z","org_id":"acme","workspace_id":"w","participant_id":"p","activated":false}"#;
    let soon = (now + Duration::seconds(60)).to_rfc3339();
    let skewed = format!(
        r#"{{"event_id":"a-soon","occurred_at":"{soon}","org_id":"acme","workspace_id":"w","participant_id":"p"}}"#
    );
    let batch = [
        received("c", 0, InputKind::ParticipantCancelled, future, now),
        received("a", 0, InputKind::ParticipantAdded, skewed.as_bytes(), now),
    ];
    apply(&store, &batch).await;
    let letters = dead_letters(&store).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].1["reason"], "clock_skew");
    assert_eq!(letters[0].1["event_id"], "c-2999");
    // A minute ahead is within the tolerated skew: the participant counts.
    let (counted,): (bool,) =
        sqlx::query_as("SELECT counted FROM participants WHERE participant_id = 'p'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert!(counted);
}

#[tokio::test]
async fn a_message_the_database_refuses_is_found_and_dead_lettered_and_the_rest_applied() {
    // Given a database that refuses one participant id (standing in for any value the
    // decoder accepts and PostgreSQL does not), in the middle of a batch of 40 joins,
    let store = store().await;
    let now = Utc::now();
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.participant_id = 'poison' THEN
                 RAISE EXCEPTION 'refused for the test' USING ERRCODE = 'invalid_parameter_value';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_poison BEFORE INSERT ON participants
             FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let batch: Vec<Inbound> = (0..40)
        .map(|n| {
            let participant = if n == 23 { "poison".to_owned() } else { format!("p{n}") };
            let payload = format!(r#"{{"event_id":"a{n}","occurred_at":"2026-01-01T09:00:00Z","org_id":"acme","workspace_id":"w","participant_id":"{participant}"}}"#);
            received("added", n, InputKind::ParticipantAdded, payload.as_bytes(), now)
        })
        .collect();
    let metrics = Metrics::new();
    let reports = commit_batch(
        &store,
        &batch,
        Policy::default(),
        &metrics,
        &Health::default(),
        "lane 0",
    )
    .await
    .expect("the batch is applied without the message at fault");

    // then the 39 others count, the poison is an `unstorable` dead letter, the partition
    // moves past all 40, and the splits are counted.
    let (counted,): (i64,) = sqlx::query_as("SELECT count(*) FROM participants WHERE counted")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(counted, 39);
    let letters = dead_letters(&store).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].1["reason"], "unstorable");
    assert_eq!(letters[0].1["offset"], 23);
    assert!(letters[0].1["detail"]
        .as_str()
        .unwrap()
        .contains("refused for the test"));
    assert_eq!(next_offset(&store, "added").await, 40);
    assert!(reports.len() > 2, "the batch was applied in parts");
    let splits = common::metric_sum(&metrics.render(), "entitlements_batch_splits_total");
    assert!(splits >= 1.0, "{splits}");
}

mod random_inputs {
    //! Random inputs, good and bad in every field, never make the store return anything
    //! but success: each message ends as its effects or as a dead letter, and the
    //! partition moves past all of them.

    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn text() -> impl Strategy<Value = Value> {
        // Mostly good values, so that many inputs are accepted and reach every table.
        prop_oneof![
            1 => Just(json_string("")),
            8 => "[a-z0-9]{1,6}".prop_map(|text| json_string(&text)),
            4 => Just(json_string("acme")),
            4 => Just(json_string("seat")),
            2 => Just(json_string("gamification")),
            4 => Just(json_string("entitlement_manager")),
            2 => Just(json_string("plan")),
            1 => Just(json_string("p\u{0}")),
            1 => Just(json_string(&"x".repeat(129))),
            1 => Just(json_string(&"é".repeat(128))),
            1 => any::<String>().prop_map(|text| json_string(&text)),
            1 => Just(Value::from(7)),
            1 => Just(Value::Null),
        ]
    }

    fn time() -> impl Strategy<Value = Value> {
        prop_oneof![
            8 => (0u32..1_000_000_000)
                .prop_map(|ns| json_string(&format!("2026-01-01T09:00:00.{ns:09}Z"))),
            1 => Just(json_string("2999-01-01T00:00:00Z")),
            1 => Just(json_string("1970-01-01T00:00:00Z")),
            1 => Just(json_string("9999-12-31T23:59:59.999999999Z")),
            1 => Just(json_string("yesterday")),
        ]
    }

    fn json_string(text: &str) -> Value {
        Value::String(text.to_owned())
    }

    fn message() -> impl Strategy<Value = (usize, Vec<u8>)> {
        let fields = (
            (text(), time(), text(), text(), text()),
            (
                any::<bool>(),
                text(),
                text(),
                prop_oneof![
                    Just(Value::from(0)),
                    (1i64..1_000_001).prop_map(Value::from),
                    Just(Value::from(1.5))
                ],
            ),
            (prop::option::of(time()), prop::option::of(time())),
            (prop::option::of((text(), text())), (text(), text())),
            (
                text(),
                prop::option::of(text()),
                prop::option::of(prop_oneof![
                    Just(json_string("automatic")),
                    Just(json_string("manual")),
                    text(),
                ]),
            ),
            (
                prop::option::of(time()),
                prop::option::of(time()),
                prop::option::of(prop_oneof![any::<bool>().prop_map(Value::from), text()]),
            ),
        );
        // The version 1 inputs, the catalogue's and workspace updates (revocations' fields
        // are not drawn here).
        let position = |wanted: InputKind| {
            InputKind::ALL
                .iter()
                .position(|kind| *kind == wanted)
                .unwrap()
        };
        let kind = prop_oneof![
            0usize..5,
            Just(position(InputKind::ProductDefined)),
            Just(position(InputKind::WorkspaceUpdated)),
        ];
        (kind, fields).prop_map(
            |(
                kind,
                (
                    (event_id, occurred_at, org_id, workspace_id, participant_id),
                    (activated, module, product, quantity),
                    (valid_from, expires_at),
                    (source, (user_id, role)),
                    (name, description, assignment),
                    (starts_at, ends_at, archived),
                ),
            )| {
                let mut object = serde_json::json!({
                    "event_id": event_id, "occurred_at": occurred_at, "org_id": org_id,
                    "workspace_id": workspace_id, "participant_id": participant_id,
                    "activated": activated, "module": module, "product": product,
                    "quantity": quantity,
                    "requested_by": {"user_id": user_id, "role": role},
                    "name": name,
                });
                if let Some(description) = description {
                    object["description"] = description;
                }
                if let Some(assignment) = assignment {
                    object["assignment"] = assignment;
                }
                if let Some(valid_from) = valid_from {
                    object["valid_from"] = valid_from;
                }
                if let Some(expires_at) = expires_at {
                    object["expires_at"] = expires_at;
                }
                for (field, value) in [
                    ("starts_at", starts_at),
                    ("ends_at", ends_at),
                    ("archived", archived),
                ] {
                    if let Some(value) = value {
                        object[field] = value;
                    }
                }
                if let Some((kind, reference)) = source {
                    object["source"] = serde_json::json!({"kind": kind, "reference": reference});
                }
                (kind, object.to_string().into_bytes())
            },
        )
    }

    fn shared() -> &'static (tokio::runtime::Runtime, Store) {
        static SHARED: OnceLock<(tokio::runtime::Runtime, Store)> = OnceLock::new();
        SHARED.get_or_init(|| {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let store = runtime.block_on(store());
            (runtime, store)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn any_batch_of_inputs_commits_as_effects_or_dead_letters(
            messages in prop::collection::vec(message(), 1..24)
        ) {
            let (runtime, store) = shared();
            let topic = common::unique("random");
            let now = Utc::now();
            let batch: Vec<Inbound> = messages
                .iter()
                .enumerate()
                .map(|(offset, (kind, payload))| received(&topic, offset as i64, InputKind::ALL[*kind], payload, now))
                .collect();
            runtime.block_on(async {
                let reports = commit_batch(store, &batch, Policy::default(), &Metrics::new(), &Health::default(), "lane 0")
                    .await
                    .expect("a batch of any input commits");
                let rejected = batch.iter().filter(|message| message.decoded.is_err()).count() as u64;
                let dead_letters: u64 = reports.iter().flat_map(|report| report.rejected.values()).sum();
                assert!(dead_letters >= rejected, "{dead_letters} dead letters for {rejected} rejected inputs");
                assert_eq!(next_offset(store, &topic).await, batch.len() as i64);
            });
        }
    }
}
