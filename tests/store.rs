//! The store against real PostgreSQL: one batch, one transaction, exactly once.

mod common;

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, SubsecRound, Utc};
use entitlement_worker::codec::{decode, entry_id, InputKind};
use entitlement_worker::domain::{OrgId, Policy};
use entitlement_worker::store::{Inbound, OutboxRow, RowSources, Store};
use serde_json::json;

fn inbound(topic: &str, offset: i64, kind: InputKind, payload: &str) -> Inbound {
    Inbound {
        topic: topic.to_owned(),
        partition: 0,
        offset,
        payload: Some(payload.as_bytes().to_vec()),
        decoded: decode(kind, Some(payload.as_bytes())),
    }
}

async fn store() -> Store {
    let settings = common::settings("unused:9092");
    Store::connect(&settings.database).await.expect("connects")
}

#[tokio::test]
async fn a_grant_with_an_expiry_is_stored_and_expires_on_time() {
    let store = store().await;
    let now = Utc::now();
    let expires = (now + Duration::seconds(4)).to_rfc3339();
    let grant = format!(
        r#"{{"event_id":"g1","occurred_at":"{}","org_id":"acme","product":"seat","quantity":3,"expires_at":"{expires}"}}"#,
        now.to_rfc3339()
    );
    let report = store
        .apply_batch(
            &[inbound("granted", 0, InputKind::EntitlementGranted, &grant)],
            Policy::default(),
            now,
        )
        .await
        .expect("the batch commits");
    assert_eq!(report.ledger_entries.get("grant"), Some(&1));
    let report = store
        .settle_due(Policy::default(), now + Duration::seconds(5))
        .await
        .expect("the clock runs");
    assert_eq!(
        report.ledger_entries.get("expiry"),
        Some(&1),
        "one expiry entry"
    );
    assert_eq!(report.ledger_total(), 1);
}

#[tokio::test]
async fn a_batch_delivered_twice_is_applied_once() {
    let store = store().await;
    let now = Utc::now();
    let batch = vec![
        inbound(
            "granted",
            0,
            InputKind::EntitlementGranted,
            r#"{"event_id":"g1","occurred_at":"2026-01-01T09:00:00Z","org_id":"acme","product":"seat","quantity":10}"#,
        ),
        inbound(
            "added",
            0,
            InputKind::ParticipantAdded,
            r#"{"event_id":"a1","occurred_at":"2026-01-01T09:00:00Z","org_id":"acme","workspace_id":"w","participant_id":"p1"}"#,
        ),
    ];
    let first = store
        .apply_batch(&batch, Policy::default(), now)
        .await
        .unwrap();
    assert_eq!(first.ledger_entries.values().sum::<u64>(), 2);
    let again = store
        .apply_batch(&batch, Policy::default(), now)
        .await
        .unwrap();
    assert_eq!(again.already_applied, 2);
    assert!(again.ledger_entries.is_empty());
    let (sequence,): (i64,) =
        sqlx::query_as("SELECT last_sequence FROM organizations WHERE org_id = 'acme'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(sequence, 2);
}

#[tokio::test]
async fn a_lot_becoming_valid_fills_a_workspace_the_batch_does_not_name() {
    // Given a grant valid only from t+2 s and a workspace left waiting for a seat,
    let store = store().await;
    let now = Utc::now();
    let valid_from = (now + Duration::seconds(2)).to_rfc3339();
    let grant = format!(
        r#"{{"event_id":"g-later","occurred_at":"{}","org_id":"acme","product":"seat","quantity":5,"valid_from":"{valid_from}"}}"#,
        now.to_rfc3339()
    );
    let waiting = r#"{"event_id":"a-waiting","occurred_at":"2026-01-01T09:00:00Z","org_id":"acme","workspace_id":"w-waiting","participant_id":"p1"}"#;
    let first = store
        .apply_batch(
            &[
                inbound("granted", 0, InputKind::EntitlementGranted, &grant),
                inbound("added", 0, InputKind::ParticipantAdded, waiting),
            ],
            Policy::default(),
            now,
        )
        .await
        .unwrap();
    assert!(first.ledger_entries.is_empty(), "nothing is valid yet");
    assert_eq!(first.alerts, 1, "a shortfall opens for w-waiting");

    // when a later batch names only another workspace of the organization, after t+2 s,
    let other = r#"{"event_id":"a-other","occurred_at":"2026-01-01T09:00:01Z","org_id":"acme","workspace_id":"w-other","participant_id":"p2"}"#;
    let second = store
        .apply_batch(
            &[inbound("added", 1, InputKind::ParticipantAdded, other)],
            Policy::default(),
            now + Duration::seconds(3),
        )
        .await
        .unwrap();

    // then the units become valid and fill the waiting workspace too (rule 8).
    assert_eq!(second.ledger_entries.get("grant"), Some(&1));
    assert_eq!(second.ledger_entries.get("transfer"), Some(&2));
    let allocated: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT workspace_id, required, allocated FROM consumption WHERE org_id = 'acme' ORDER BY 1",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(
        allocated,
        vec![("w-other".to_owned(), 1, 1), ("w-waiting".to_owned(), 1, 1)]
    );
}

#[tokio::test]
async fn a_batch_leaves_its_messages_in_one_outbox_row_read_whole_and_in_order() {
    let store = store().await;
    let now = Utc::now();
    let grant = r#"{"event_id":"g1","occurred_at":"2026-01-01T09:00:00Z","org_id":"acme","product":"seat","quantity":1}"#;
    let joins: Vec<String> = (1..=3)
        .map(|n| format!(r#"{{"event_id":"a{n}","occurred_at":"2026-01-01T09:00:0{n}Z","org_id":"acme","workspace_id":"w","participant_id":"p{n}"}}"#))
        .collect();
    let mut batch = vec![inbound("granted", 0, InputKind::EntitlementGranted, grant)];
    batch.extend(
        joins
            .iter()
            .enumerate()
            .map(|(n, join)| inbound("added", n as i64, InputKind::ParticipantAdded, join)),
    );
    batch.push(inbound("added", 3, InputKind::ParticipantAdded, "not json"));
    let report = store
        .apply_batch(&batch, Policy::default(), now)
        .await
        .unwrap();
    // grant + one transfer, one alert (2 missing), one dead letter.
    assert_eq!(report.ledger_total(), 2);
    assert_eq!(report.alerts, 1);
    let second = store
        .apply_batch(
            &[inbound(
                "granted",
                1,
                InputKind::EntitlementGranted,
                r#"{"event_id":"g2","occurred_at":"2026-01-01T09:01:00Z","org_id":"acme","product":"seat","quantity":2}"#,
            )],
            Policy::default(),
            now,
        )
        .await
        .unwrap();
    assert_eq!(
        second.ledger_total(),
        2,
        "a grant and the transfer it allowed"
    );
    assert_eq!(second.alerts, 1, "the shortfall is resolved");
    // Each batch also carries the new state of the pool and of the workspace it changed;
    // the first one the pool's low warning too (0 left of 1), which the second leaves
    // unchanged (0 left of 3: the threshold is still 1).
    assert_eq!(store.outbox_backlog().await.unwrap(), 7 + 5);

    // A round asking for fewer messages than the first row holds still gets that row whole.
    let rows = store.pending_outbox(1).await.unwrap();
    assert_eq!(rows.len(), 1);
    let kinds: Vec<&str> = rows[0]
        .messages
        .iter()
        .map(|message| message.channel.as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "ledger",
            "ledger",
            "dlq",
            "shortfalls",
            "pool_warnings",
            "state",
            "state"
        ]
    );
    // The rows name their ledger entries by range instead of holding them a second time,
    // and the messages read back are the ledger's rows.
    type Ranges = (Vec<String>, Vec<i64>, Vec<i64>, i32, Vec<String>);
    let stored: Vec<Ranges> = sqlx::query_as(
        "SELECT ledger_orgs, ledger_first, ledger_last, ledger_messages, channels
           FROM outbox ORDER BY id",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!(
        (&stored[0].0, &stored[0].1, &stored[0].2, stored[0].3),
        (&vec!["acme".to_owned()], &vec![1], &vec![2], 2)
    );
    assert_eq!(
        (&stored[1].1, &stored[1].2, stored[1].3),
        (&vec![3], &vec![4], 2)
    );
    assert!(stored
        .iter()
        .all(|row| !row.4.iter().any(|channel| channel == "ledger")));
    let ledger: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT json_strip_nulls(json_build_object('entry_id', entry_id, 'sequence', sequence,
                'org_id', org_id, 'product', product, 'kind', kind, 'quantity', quantity,
                'workspace_id', workspace_id, 'pool_available_after', pool_available_after,
                'caused_by', caused_by, 'grant_id', grant_id, 'actor', actor,
                'recorded_at', recorded_at))
           FROM ledger ORDER BY sequence",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    let published: Vec<serde_json::Value> = store
        .pending_outbox(100)
        .await
        .unwrap()
        .iter()
        .flat_map(|row| &row.messages)
        .filter(|message| message.channel.as_str() == "ledger")
        .map(|message| {
            assert_eq!(message.key.as_deref(), Some("acme"));
            let mut value: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
            let at: DateTime<Utc> = value["recorded_at"].as_str().unwrap().parse().unwrap();
            value["recorded_at"] = serde_json::json!(at.to_rfc3339());
            value
        })
        .collect();
    let ledger: Vec<serde_json::Value> = ledger
        .into_iter()
        .map(|mut value| {
            let at: DateTime<Utc> = value["recorded_at"].as_str().unwrap().parse().unwrap();
            value["recorded_at"] = serde_json::json!(at.to_rfc3339());
            value
        })
        .collect();
    assert_eq!(published, ledger);
    let sequences: Vec<i64> = rows[0]
        .messages
        .iter()
        .filter(|message| message.channel.as_str() == "ledger")
        .map(|message| {
            serde_json::from_slice::<serde_json::Value>(&message.payload).unwrap()["sequence"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(sequences, [1, 2]);

    // Both rows fit in a larger round, oldest first; removing them empties the outbox.
    let rows = store.pending_outbox(100).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows[0].id < rows[1].id);
    assert_eq!(rows[1].messages.len(), 5);
    let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
    store.remove_published(&ids).await.unwrap();
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
}

#[tokio::test]
async fn participants_with_any_characters_are_stored_and_read_back_exactly() {
    // New participants are written with COPY's binary format: tabs, line breaks,
    // backslashes, COPY's own null marker and non-ASCII text are data like any other.
    let store = store().await;
    let ids = ["p\t1", "p\n2", "p\\N", "\\N", "p 🎉 é", "p,\"q\";--"];
    let added = |offset: i64, id: &str, at: &str| {
        let event = json!({
            "event_id": format!("e-{at}-{id}"),
            "occurred_at": at,
            "org_id": "acme",
            "workspace_id": "w\t1",
            "participant_id": id,
        });
        inbound(
            "added",
            offset,
            InputKind::ParticipantAdded,
            &event.to_string(),
        )
    };
    let batch: Vec<Inbound> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| added(n as i64, id, "2026-01-01T09:00:00.123456Z"))
        .collect();
    store
        .apply_batch(&batch, Policy::default(), Utc::now())
        .await
        .unwrap();
    let stored: Vec<(String, String, DateTime<Utc>, String, bool)> = sqlx::query_as(
        "SELECT workspace_id, participant_id, last_event_at, last_event_id, counted
           FROM participants ORDER BY participant_id",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    let at: DateTime<Utc> = "2026-01-01T09:00:00.123456Z".parse().unwrap();
    let mut expected: Vec<(String, String, DateTime<Utc>, String, bool)> = ids
        .iter()
        .map(|id| {
            let event = format!("e-2026-01-01T09:00:00.123456Z-{id}");
            ("w\t1".to_owned(), id.to_string(), at, event, true)
        })
        .collect();
    expected.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(stored, expected);
    let (required,): (i64,) =
        sqlx::query_as("SELECT required FROM consumption WHERE workspace_id = 'w\t1'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(required, ids.len() as i64);
    // and each is found again: the same joins, a microsecond earlier, are stale.
    let earlier: Vec<Inbound> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| added((ids.len() + n) as i64, id, "2026-01-01T09:00:00.123455Z"))
        .collect();
    let report = store
        .apply_batch(&earlier, Policy::default(), Utc::now())
        .await
        .unwrap();
    assert_eq!(report.stale, ids.len() as u64);
}

/// An outbox row as the relay publishes it: id, when it was committed, and per message its
/// channel, key and payload.
type ShownRow = (i64, DateTime<Utc>, Vec<(String, Option<String>, String)>);

#[tokio::test]
async fn the_relay_publishes_from_memory_what_another_process_reads_back() {
    // Given two batches committed by one process (a grant, joins, a bad message: ledger
    // entries, an alert, a dead letter, a warning and state messages),
    let settings = common::settings("unused:9092");
    let committing = Store::connect(&settings.database).await.unwrap();
    let now = Utc::now();
    let grant = r#"{"event_id":"g1","occurred_at":"2026-01-01T09:00:00Z","org_id":"acme","product":"seat","quantity":2}"#;
    let mut first = vec![inbound("granted", 0, InputKind::EntitlementGranted, grant)];
    first.extend((1..=3).map(|n| {
        inbound(
            "added",
            n - 1,
            InputKind::ParticipantAdded,
            &format!(r#"{{"event_id":"a{n}","occurred_at":"2026-01-01T09:00:0{n}Z","org_id":"acme","workspace_id":"w","participant_id":"p{n}"}}"#),
        )
    }));
    first.push(inbound("added", 3, InputKind::ParticipantAdded, "not json"));
    committing
        .apply_batch(&first, Policy::default(), now)
        .await
        .unwrap();
    let grant = r#"{"event_id":"g2","occurred_at":"2026-01-01T09:01:00Z","org_id":"globex","product":"seat","quantity":1}"#;
    committing
        .apply_batch(
            &[inbound("granted", 1, InputKind::EntitlementGranted, grant)],
            Policy::default(),
            now,
        )
        .await
        .unwrap();
    // another process (which kept nothing) reads both rows back from the outbox,
    let other = Store::connect(&settings.database).await.unwrap();
    let (read_back, sources) = other.pending_outbox_from(100).await.unwrap();
    assert_eq!(
        sources,
        RowSources {
            from_memory: 0,
            read_back: 2
        }
    );
    // the committing process takes the same rows from memory, message for message,
    let (kept, sources) = committing.pending_outbox_from(100).await.unwrap();
    assert_eq!(
        sources,
        RowSources {
            from_memory: 2,
            read_back: 0
        }
    );
    let shown = |rows: &[OutboxRow]| -> Vec<ShownRow> {
        rows.iter()
            .map(|row| {
                let messages = row
                    .messages
                    .iter()
                    .map(|m| {
                        (
                            m.channel.as_str().to_owned(),
                            m.key.clone(),
                            String::from_utf8(m.payload.clone()).unwrap(),
                        )
                    })
                    .collect();
                (row.id, row.created_at, messages)
            })
            .collect()
    };
    assert_eq!(shown(&kept), shown(&read_back));
    let channels: std::collections::BTreeSet<&str> = kept[0]
        .messages
        .iter()
        .map(|m| m.channel.as_str())
        .collect();
    assert_eq!(
        channels,
        ["dlq", "ledger", "pool_warnings", "shortfalls", "state"].into(),
        "{:?}",
        shown(&kept)
    );
    // and once taken, a row not published yet (a failed round) is read back.
    let (again, sources) = committing.pending_outbox_from(100).await.unwrap();
    assert_eq!(
        sources,
        RowSources {
            from_memory: 0,
            read_back: 2
        }
    );
    assert_eq!(shown(&again), shown(&read_back));
    // A relay that lost the lock forgets what it kept: the holder reads it back.
    committing
        .apply_batch(
            &[inbound(
                "granted",
                2,
                InputKind::EntitlementGranted,
                r#"{"event_id":"g3","occurred_at":"2026-01-01T09:02:00Z","org_id":"globex","product":"seat","quantity":1}"#,
            )],
            Policy::default(),
            now,
        )
        .await
        .unwrap();
    committing.forget_committed();
    let (_, sources) = committing.pending_outbox_from(100).await.unwrap();
    assert_eq!(
        sources,
        RowSources {
            from_memory: 0,
            read_back: 3
        }
    );
}

/// A new database with only the migrations older than `version`, as a worker of that
/// version left it: its URL and a connection to fill it.
async fn database_before(version: i64) -> (String, sqlx::PgPool) {
    use entitlement_worker::store::MIGRATOR;
    let name = common::unique("upgrade");
    let server = common::server_url();
    let maintenance = sqlx::PgPool::connect(&format!("{server}/postgres"))
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&maintenance)
        .await
        .unwrap();
    maintenance.close().await;
    let url = format!("{server}/{name}");
    let database = sqlx::PgPool::connect(&url).await.unwrap();
    let before = sqlx::migrate::Migrator {
        migrations: MIGRATOR
            .iter()
            .filter(|migration| migration.version < version)
            .cloned()
            .collect::<Vec<_>>()
            .into(),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    before.run(&database).await.unwrap();
    (url, database)
}

/// The worker's store on `url`, which it migrates.
async fn store_on(url: &str) -> Store {
    let mut settings = common::settings("unused:9092");
    settings.database.url = url.to_owned();
    Store::connect(&settings.database).await.unwrap()
}

#[tokio::test]
async fn the_upgrade_to_event_ids_per_organization_keeps_what_was_applied() {
    // Given a database of the version before, holding a grant, a manual transfer and a
    // refused transfer request, all applied,
    let (url, maintenance) = database_before(20261201000001).await;
    sqlx::raw_sql(
        "INSERT INTO organizations (org_id, last_sequence) VALUES ('acme', 2);
         INSERT INTO lots (lot_id, org_id, product, quantity, remaining, valid_from, status)
              VALUES ('g1', 'acme', 'seat', 5, 4, now(), 'active');
         INSERT INTO ledger (org_id, sequence, entry_id, product, kind, quantity, workspace_id,
                             pool_available_after, caused_by, actor, recorded_at)
              VALUES ('acme', 2, gen_random_uuid(), 'seat', 'manual_transfer', 1, 'w', 4, 't1', 'mia', now());
         INSERT INTO processed_events (event_id) VALUES ('g1'), ('t1'), ('t-refused');",
    )
    .execute(&maintenance)
    .await
    .unwrap();
    maintenance.close().await;

    // when the worker starts on it (and migrates it),
    let store = store_on(&url).await;

    // then each applied event has its organization where the data tells it, and the one
    // that left nothing behind still counts as applied, for any organization.
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT event_id, org_id FROM processed_events ORDER BY event_id")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(
        rows,
        [
            ("g1".to_owned(), "acme".to_owned()),
            ("t-refused".to_owned(), String::new()),
            ("t1".to_owned(), "acme".to_owned()),
        ]
    );
    let now = Utc::now();
    let replay = [
        inbound(
            "granted",
            0,
            InputKind::EntitlementGranted,
            r#"{"event_id":"g1","occurred_at":"2026-01-01T09:00:00Z","org_id":"acme","product":"seat","quantity":5}"#,
        ),
        inbound(
            "transfers",
            0,
            InputKind::TransferRequested,
            r#"{"event_id":"t-refused","occurred_at":"2026-01-01T09:00:00Z","org_id":"globex","workspace_id":"w2","product":"seat","quantity":1,"requested_by":{"user_id":"u","role":"viewer"}}"#,
        ),
    ];
    let report = store
        .apply_batch(&replay, Policy::default(), now)
        .await
        .unwrap();
    assert_eq!(report.duplicates, 2, "both were applied before the upgrade");
    assert!(report.ledger_entries.is_empty());
}

#[tokio::test]
async fn a_revocation_stored_before_its_grant_takes_its_units_when_the_grant_arrives() {
    let store = store().await;
    let now = Utc::now();
    let at = now.to_rfc3339();
    let plan = format!(
        r#"{{"event_id":"g-plan","occurred_at":"{at}","org_id":"acme","product":"seat","quantity":100,"source":{{"kind":"plan","reference":"pro"}}}}"#
    );
    let revocation = format!(
        r#"{{"event_id":"r-1","occurred_at":"{at}","org_id":"acme","grant_id":"g-addon","reason":"trial ended"}}"#
    );
    let add_on = format!(
        r#"{{"event_id":"g-addon","occurred_at":"{at}","org_id":"acme","product":"seat","quantity":20,"source":{{"kind":"add_on","reference":"extra"}}}}"#
    );
    let first = store
        .apply_batch(
            &[
                inbound("granted", 0, InputKind::EntitlementGranted, &plan),
                inbound("revoked", 0, InputKind::EntitlementRevoked, &revocation),
            ],
            Policy::default(),
            now,
        )
        .await
        .expect("the first batch commits");
    assert_eq!(
        first.ledger_entries.get("revocation"),
        None,
        "nothing to take yet"
    );
    let second = store
        .apply_batch(
            &[inbound(
                "granted",
                1,
                InputKind::EntitlementGranted,
                &add_on,
            )],
            Policy::default(),
            now,
        )
        .await
        .expect("the second batch commits");
    assert_eq!(second.ledger_entries.get("grant"), Some(&1));
    assert_eq!(second.ledger_entries.get("revocation"), Some(&1));
    let pool: (i64, i64, i64) = sqlx::query_as(
        "SELECT available, granted_total, revoked_total FROM pools
          WHERE org_id = 'acme' AND product = 'seat'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(pool, (100, 120, 20));
    let lot: (i64, i64, String) = sqlx::query_as(
        "SELECT remaining, revoked, status FROM lots WHERE org_id = 'acme' AND lot_id = 'g-addon'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(lot, (0, 20, "revoked".to_owned()));
    let entry: (String, i64, String, Option<String>) = sqlx::query_as(
        "SELECT kind, quantity, caused_by, grant_id FROM ledger
          WHERE org_id = 'acme' ORDER BY sequence DESC LIMIT 1",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(
        entry,
        (
            "revocation".into(),
            20,
            "r-1".into(),
            Some("g-addon".into())
        )
    );
    let applied: bool = sqlx::query_scalar(
        "SELECT applied FROM revocations WHERE org_id = 'acme' AND event_id = 'r-1'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert!(applied, "a revocation of one grant is done once applied");
}

/// A revocation of a grant whose units are all in workspaces takes nothing and writes no
/// entry, and is done: it is not kept waiting for a grant that already came.
#[tokio::test]
async fn a_revocation_of_a_spent_grant_takes_nothing_and_is_done() {
    let store = store().await;
    let now = Utc::now();
    let at = now.to_rfc3339();
    let grant = format!(
        r#"{{"event_id":"g-1","occurred_at":"{at}","org_id":"acme","product":"seat","quantity":2}}"#
    );
    let joins: Vec<String> = (0..2)
        .map(|n| {
            format!(
                r#"{{"event_id":"a-{n}","occurred_at":"{at}","org_id":"acme","workspace_id":"summit","participant_id":"p{n}"}}"#
            )
        })
        .collect();
    let mut first = vec![inbound("granted", 0, InputKind::EntitlementGranted, &grant)];
    for (offset, join) in joins.iter().enumerate() {
        first.push(inbound(
            "added",
            offset as i64,
            InputKind::ParticipantAdded,
            join,
        ));
    }
    store
        .apply_batch(&first, Policy::default(), now)
        .await
        .expect("the first batch commits");
    let revocation =
        format!(r#"{{"event_id":"r-1","occurred_at":"{at}","org_id":"acme","grant_id":"g-1"}}"#);
    let second = store
        .apply_batch(
            &[inbound(
                "revoked",
                0,
                InputKind::EntitlementRevoked,
                &revocation,
            )],
            Policy::default(),
            now,
        )
        .await
        .expect("the second batch commits");
    assert_eq!(second.ledger_entries.get("revocation"), None);
    let state: (String, bool, i64) = sqlx::query_as(
        "SELECT l.status, r.applied, p.revoked_total
           FROM lots l, revocations r, pools p
          WHERE l.lot_id = 'g-1' AND r.event_id = 'r-1' AND p.product = 'seat'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(state, ("spent".to_owned(), true, 0));
}

/// Each table's columns in their order, by table (the migrator's own table aside).
async fn columns(database: &sqlx::PgPool) -> BTreeMap<String, Vec<String>> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text FROM information_schema.columns
          WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations'
          ORDER BY table_name, ordinal_position",
    )
    .fetch_all(database)
    .await
    .unwrap();
    let mut tables: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (table, column) in rows {
        tables.entry(table).or_default().push(column);
    }
    tables
}

/// Every row of `table`, as a JSON object of the `columns` named, in one stable order.
async fn rows(database: &sqlx::PgPool, table: &str, columns: &[String]) -> serde_json::Value {
    sqlx::query_scalar(&format!(
        "SELECT COALESCE(jsonb_agg(r ORDER BY r::text), '[]'::jsonb)
           FROM (SELECT (SELECT jsonb_object_agg(key, value) FROM jsonb_each(to_jsonb(t))
                          WHERE key = ANY($1)) AS r
                   FROM \"{table}\" t) AS picked"
    ))
    .bind(columns)
    .fetch_one(database)
    .await
    .unwrap()
}

/// The constraint that refused `statement`.
async fn refused_by(database: &sqlx::PgPool, statement: &str) -> Option<String> {
    let error = sqlx::query(statement)
        .execute(database)
        .await
        .expect_err(statement);
    error
        .as_database_error()
        .and_then(|database| database.constraint().map(str::to_owned))
}

#[tokio::test]
async fn the_upgrade_from_version_1_keeps_every_row_and_the_worker_goes_on_from_it() {
    // Given a database of version 1 (before revocations and unlimited grants), as acme's
    // worker left it: a
    // trial's seats that expired, a starter plan's seats mostly transferred, a pro plan's
    // seats valid only next month, a gamification add-on a manager moved, a module
    // shortfall open, an outbox batch not published yet and the consumer's offsets,
    let (url, database) = database_before(20261202000001).await;
    let acme = OrgId::parse("acme").unwrap();
    let id = |sequence| entry_id(&acme, sequence);
    sqlx::raw_sql(&format!(
        "INSERT INTO organizations (org_id, last_sequence) VALUES ('acme', 7);
         INSERT INTO pools (org_id, product, available, granted_total, transferred_total,
                            expired_total)
              VALUES ('acme', 'seat', 2, 13, 8, 3), ('acme', 'gamification', 0, 1, 1, 0);
         INSERT INTO lots (lot_id, org_id, product, quantity, remaining, valid_from, expires_at,
                           status, source_kind, source_reference, granted_at)
              VALUES ('g-trial', 'acme', 'seat', 3, 0, '2026-10-01T09:00:00Z',
                      '2026-10-31T09:00:00Z', 'expired', 'trial', 'october',
                      '2026-10-01T09:00:01Z'),
                     ('g-seat', 'acme', 'seat', 10, 2, '2026-11-01T09:00:00Z', NULL, 'active',
                      'plan', 'starter', '2026-11-01T09:00:02Z'),
                     ('g-gam', 'acme', 'gamification', 1, 0, '2026-11-01T09:00:00Z', NULL,
                      'spent', 'add_on', 'gam-1', '2026-11-01T09:00:03Z'),
                     ('g-later', 'acme', 'seat', 5, 5, now() + interval '30 days', NULL,
                      'pending', 'plan', 'pro', '2026-11-10T12:00:00Z');
         INSERT INTO workspaces (workspace_id, org_id, claimed_at)
              VALUES ('summit', 'acme', '2026-11-02T10:00:00Z'),
                     ('expo', 'acme', '2026-11-03T10:00:00Z');
         INSERT INTO consumption (workspace_id, product, org_id, required, allocated,
                                  shortfall_since, reported_missing, reported_opened_at,
                                  alert_revision, last_cause)
              VALUES ('summit', 'seat', 'acme', 5, 5, NULL, 0, NULL, 0, 's-4'),
                     ('summit', 'gamification', 'acme', 1, 1, NULL, 0, NULL, 2, 't-1'),
                     ('expo', 'seat', 'acme', 3, 3, NULL, 0, NULL, 0, 'e-2'),
                     ('expo', 'gamification', 'acme', 1, 0, '2026-11-03T11:00:00Z', 1,
                      '2026-11-03T11:00:00Z', 1, 'm-2');
         INSERT INTO participants (workspace_id, participant_id, last_event_at, last_event_id,
                                   counted)
              SELECT 'summit', 'p' || n, '2026-11-02T10:00:00Z'::timestamptz + n * interval '1 minute',
                     's-' || n, true
                FROM generate_series(0, 4) AS n
              UNION ALL
              SELECT 'expo', 'p' || n, '2026-11-03T10:00:00Z'::timestamptz + n * interval '1 minute',
                     'e-' || n, true
                FROM generate_series(0, 2) AS n
              UNION ALL
              SELECT 'expo', 'p9', '2026-11-03T10:30:00Z', 'c-9', false;
         INSERT INTO processed_events (event_id, org_id, processed_at)
              VALUES ('g-trial', 'acme', '2026-10-01T09:00:01Z'),
                     ('g-seat', 'acme', '2026-11-01T09:00:02Z'),
                     ('g-gam', 'acme', '2026-11-01T09:00:03Z'),
                     ('g-later', 'acme', '2026-11-10T12:00:00Z'),
                     ('t-1', 'acme', '2026-11-03T12:00:00Z');
         INSERT INTO ledger (org_id, sequence, entry_id, product, kind, quantity, workspace_id,
                             pool_available_after, caused_by, actor, recorded_at)
              VALUES ('acme', 1, '{}', 'seat', 'grant', 3, NULL, 3, 'g-trial', NULL,
                      '2026-10-01T09:00:01Z'),
                     ('acme', 2, '{}', 'seat', 'expiry', 3, NULL, 0, 'g-trial', NULL,
                      '2026-10-31T09:00:00Z'),
                     ('acme', 3, '{}', 'seat', 'grant', 10, NULL, 10, 'g-seat', NULL,
                      '2026-11-01T09:00:02Z'),
                     ('acme', 4, '{}', 'gamification', 'grant', 1, NULL, 1, 'g-gam', NULL,
                      '2026-11-01T09:00:03Z'),
                     ('acme', 5, '{}', 'seat', 'transfer', 5, 'summit', 5, 's-4', NULL,
                      '2026-11-02T10:04:00Z'),
                     ('acme', 6, '{}', 'seat', 'transfer', 3, 'expo', 2, 'e-2', NULL,
                      '2026-11-03T10:02:00Z'),
                     ('acme', 7, '{}', 'gamification', 'manual_transfer', 1, 'summit', 0, 't-1',
                      'u-alice', '2026-11-03T12:00:00Z');
         INSERT INTO outbox (messages, channels, message_keys, payloads, created_at)
              VALUES (1, ARRAY['ledger'], ARRAY['acme'], ARRAY['{{\"sequence\":7}}'::bytea],
                      '2026-11-03T12:00:00Z');
         INSERT INTO consumer_offsets (topic, partition, next_offset, updated_at)
              VALUES ('entitlement-granted', 0, 4, '2026-11-10T12:00:00Z'),
                     ('participant-added', 0, 8, '2026-11-03T10:02:00Z'),
                     ('entitlement-transfer-requested', 0, 1, '2026-11-03T12:00:00Z');",
        id(1),
        id(2),
        id(3),
        id(4),
        id(5),
        id(6),
        id(7)
    ))
    .execute(&database)
    .await
    .unwrap();
    let before = columns(&database).await;
    let mut kept = BTreeMap::new();
    for (table, columns) in &before {
        let rows = rows(&database, table, columns).await;
        assert!(
            rows.as_array().is_some_and(|rows| !rows.is_empty()),
            "every table of the version before holds data, {table} too"
        );
        kept.insert(table.clone(), rows);
    }
    database.close().await;

    // when the worker starts on it and migrates it,
    let store = store_on(&url).await;

    // then every row is still there with the same values, and only what rules 11, 12 and 13
    // and the state topic's versions need was added,
    let after = columns(store.pool()).await;
    for (table, columns) in &before {
        assert_eq!(
            rows(store.pool(), table, columns).await,
            kept[table],
            "{table} after the upgrade"
        );
    }
    let added: Vec<String> = after
        .iter()
        .filter_map(|(table, columns)| Some((table, columns, before.get(table)?)))
        .flat_map(|(table, columns, old)| {
            columns
                .iter()
                .filter(|column| !old.contains(column))
                .map(move |column| format!("{table}.{column}"))
        })
        .collect();
    assert_eq!(
        added,
        [
            "consumption.state_version",
            "ledger.grant_id",
            "ledger.unlimited",
            "lots.revoked",
            "lots.occurred_at",
            "lots.unlimited",
            "lots.drawn",
            "lots.expired",
            "outbox.ledger_orgs",
            "outbox.ledger_first",
            "outbox.ledger_last",
            "outbox.ledger_messages",
            "pools.revoked_total",
            "pools.unlimited",
            "pools.state_version",
            "pools.last_cause",
            "workspaces.name",
            "workspaces.starts_at",
            "workspaces.ends_at",
            "workspaces.archived",
            "workspaces.live",
            "workspaces.life_event_at",
            "workspaces.life_event_id",
        ]
    );
    // the row waiting in the outbox goes out as it was written, its ledger message inline,
    let waiting: Vec<(Option<String>, String)> = store
        .pending_outbox(100)
        .await
        .unwrap()
        .iter()
        .flat_map(|row| &row.messages)
        .map(|message| {
            (
                message.key.clone(),
                String::from_utf8(message.payload.clone()).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        waiting,
        [(Some("acme".to_owned()), r#"{"sequence":7}"#.to_owned())]
    );
    assert_eq!(store.outbox_backlog().await.unwrap(), 1);
    // each pool knows the input behind its last ledger entry, for its state messages,
    let causes: Vec<(String, Option<String>, String)> = sqlx::query_as(
        "SELECT p.product, p.last_cause,
                (SELECT l.caused_by FROM ledger l WHERE l.org_id = p.org_id
                    AND l.product = p.product ORDER BY l.sequence DESC LIMIT 1)
           FROM pools p ORDER BY p.org_id, p.product",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert!(!causes.is_empty());
    for (product, cause, last_entry) in &causes {
        assert_eq!(cause.as_ref(), Some(last_entry), "{product}");
    }
    let new_tables: Vec<&String> = after
        .keys()
        .filter(|table| !before.contains_key(*table))
        .collect();
    assert_eq!(
        new_tables,
        ["ledger_blocks", "pool_warnings", "products", "revocations"],
        "the ledger's blocks (the ledger is their view now), the catalogue's, the \
         revocations' and the pool warnings'"
    );

    // nothing was revoked before: each lot's grant is dated the earlier of its start of
    // validity and when it was stored, and no old entry names a grant,
    let pools: Vec<(String, i64)> =
        sqlx::query_as("SELECT product, revoked_total FROM pools ORDER BY product")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(
        pools,
        [("gamification".to_owned(), 0), ("seat".to_owned(), 0)]
    );
    let at = |time: &str| time.parse::<DateTime<Utc>>().unwrap();
    // and each lot says what became of its units: the trial's 3 expired (its expiry
    // entry), 8 of the starter plan's seats and the gamification unit were transferred,
    // nothing is unlimited,
    type LotRow = (String, i64, DateTime<Utc>, i64, i64, bool);
    let lots: Vec<LotRow> = sqlx::query_as(
        "SELECT lot_id, revoked, occurred_at, drawn, expired, unlimited FROM lots ORDER BY lot_id",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(
        lots,
        [
            (
                "g-gam".to_owned(),
                0,
                at("2026-11-01T09:00:00Z"),
                1,
                0,
                false
            ),
            // Stored before its validity starts: dated when it was stored.
            (
                "g-later".to_owned(),
                0,
                at("2026-11-10T12:00:00Z"),
                0,
                0,
                false
            ),
            (
                "g-seat".to_owned(),
                0,
                at("2026-11-01T09:00:00Z"),
                8,
                0,
                false
            ),
            (
                "g-trial".to_owned(),
                0,
                at("2026-10-01T09:00:00Z"),
                0,
                3,
                false
            ),
        ]
    );
    let (unlimited,): (i64,) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pools WHERE unlimited)
              + (SELECT count(*) FROM ledger WHERE unlimited)",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(unlimited, 0);
    let (naming,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM ledger WHERE grant_id IS NOT NULL")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(naming, 0);

    // the database refuses what rules 11 and 12 forbid: a lot losing more than it had
    // left or not accounting for its units, an unlimited lot counting units, a pool whose
    // balance does not count its revoked units, a revocation entry that does not name its
    // grant,
    assert_eq!(
        refused_by(
            store.pool(),
            "UPDATE lots SET drawn = 9 WHERE org_id = 'acme' AND lot_id = 'g-seat'"
        )
        .await
        .as_deref(),
        Some("lot_accounted")
    );
    assert_eq!(
        refused_by(
            store.pool(),
            "UPDATE lots SET unlimited = true WHERE org_id = 'acme' AND lot_id = 'g-seat'"
        )
        .await
        .as_deref(),
        Some("lot_quantity")
    );
    // (Both constraints refuse it; PostgreSQL names the first it checks.)
    let refusal = refused_by(
        store.pool(),
        "UPDATE lots SET revoked = 9 WHERE org_id = 'acme' AND lot_id = 'g-seat'",
    )
    .await;
    assert!(
        matches!(refusal.as_deref(), Some("lot_units" | "lot_accounted")),
        "{refusal:?}"
    );
    assert_eq!(
        refused_by(
            store.pool(),
            "UPDATE pools SET revoked_total = 1 WHERE org_id = 'acme' AND product = 'seat'"
        )
        .await
        .as_deref(),
        Some("pool_balance")
    );
    // the ledger's blocks refuse an entry that breaks its rules, a block whose arrays do not
    // match its sequences, and a block that does not follow the organization's last,
    let block = |first: i64, last: i64, kinds: &str, grants: &str| {
        format!(
            "INSERT INTO ledger_blocks (org_id, first_sequence, last_sequence, entry_ids,
                                        products, kinds, quantities, workspace_ids,
                                        pool_available_after, caused_by, grant_ids, actors,
                                        unlimited, recorded_at)
             VALUES ('acme', {first}, {last}, ARRAY[gen_random_uuid()], '{{seat}}', '{kinds}',
                     '{{2}}', '{{NULL}}', '{{0}}', '{{r-0}}', '{grants}', '{{NULL}}',
                     '{{false}}', ARRAY[now()])"
        )
    };
    assert_eq!(
        refused_by(store.pool(), &block(8, 8, "{revocation}", "{NULL}"))
            .await
            .as_deref(),
        Some("ledger_entries_consistent")
    );
    assert_eq!(
        refused_by(store.pool(), &block(8, 9, "{revocation}", "{g-seat}"))
            .await
            .as_deref(),
        Some("ledger_blocks_sizes")
    );
    let gap = sqlx::query(&block(9, 9, "{revocation}", "{g-seat}"))
        .execute(store.pool())
        .await
        .expect_err("a block after a gap");
    assert!(
        gap.to_string()
            .contains("the ledger of acme is gapless: a block from sequence 9 cannot follow 7"),
        "{gap}"
    );

    // and the worker goes on from the upgraded state: a new participant draws one of the
    // starter plan's two seats left, its grant redelivered is still a duplicate, its
    // revocation takes the last seat, and a revocation of the pro plan reaches the grant
    // stored before the upgrade (dated before it) once that grant becomes valid.
    let now = Utc::now();
    let joined = format!(
        r#"{{"event_id":"s-5","occurred_at":"{}","org_id":"acme","workspace_id":"summit","participant_id":"p5"}}"#,
        now.to_rfc3339()
    );
    let report = store
        .apply_batch(
            &[inbound("added", 8, InputKind::ParticipantAdded, &joined)],
            Policy::default(),
            now,
        )
        .await
        .unwrap();
    assert_eq!(report.ledger_entries.get("transfer"), Some(&1));
    let batch = [
        inbound(
            "granted",
            4,
            InputKind::EntitlementGranted,
            r#"{"event_id":"g-seat","occurred_at":"2026-11-01T09:00:00Z","org_id":"acme","product":"seat","quantity":10,"source":{"kind":"plan","reference":"starter"}}"#,
        ),
        inbound(
            "revoked",
            0,
            InputKind::EntitlementRevoked,
            &format!(
                r#"{{"event_id":"r-1","occurred_at":"{}","org_id":"acme","grant_id":"g-seat"}}"#,
                now.to_rfc3339()
            ),
        ),
        inbound(
            "revoked",
            1,
            InputKind::EntitlementRevoked,
            &format!(
                r#"{{"event_id":"r-2","occurred_at":"{}","org_id":"acme","source":{{"kind":"plan","reference":"pro"}}}}"#,
                now.to_rfc3339()
            ),
        ),
    ];
    let report = store
        .apply_batch(&batch, Policy::default(), now)
        .await
        .unwrap();
    assert_eq!(
        report.duplicates, 1,
        "g-seat was applied before the upgrade"
    );
    assert_eq!(report.ledger_entries.get("revocation"), Some(&1));
    let report = store
        .settle_due(Policy::default(), now + Duration::days(31))
        .await
        .unwrap();
    assert_eq!(report.ledger_entries.get("grant"), Some(&1));
    assert_eq!(report.ledger_entries.get("revocation"), Some(&1));

    type Row = (
        i64,
        String,
        i64,
        Option<String>,
        i64,
        String,
        Option<String>,
    );
    let entries: Vec<Row> = sqlx::query_as(
        "SELECT sequence, kind, quantity, workspace_id, pool_available_after, caused_by, grant_id
           FROM ledger WHERE org_id = 'acme' AND sequence > 7 ORDER BY sequence",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    let row = |sequence,
               kind: &str,
               quantity,
               workspace: Option<&str>,
               after,
               cause: &str,
               grant: Option<&str>| {
        (
            sequence,
            kind.to_owned(),
            quantity,
            workspace.map(str::to_owned),
            after,
            cause.to_owned(),
            grant.map(str::to_owned),
        )
    };
    assert_eq!(
        entries,
        [
            row(8, "transfer", 1, Some("summit"), 1, "s-5", None),
            row(9, "revocation", 1, None, 0, "r-1", Some("g-seat")),
            row(10, "grant", 5, None, 5, "g-later", Some("g-later")),
            row(11, "revocation", 5, None, 0, "r-2", Some("g-later")),
        ]
    );
    let seats: (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT available, granted_total, transferred_total, expired_total, revoked_total
           FROM pools WHERE org_id = 'acme' AND product = 'seat'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(seats, (0, 18, 9, 3, 6));
    let verification = entitlement_worker::ops::verify::verify(store.pool())
        .await
        .unwrap();
    assert!(verification.passed(), "{}", verification.to_text());
}

/// A `product-defined` of `product` at `at`, with `fields` besides.
fn definition(offset: i64, event_id: &str, at: &str, product: &str, fields: &str) -> Inbound {
    inbound(
        "defined",
        offset,
        InputKind::ProductDefined,
        &format!(
            r#"{{"event_id":"{event_id}","occurred_at":"{at}","product":"{product}","name":"Live polls"{fields}}}"#
        ),
    )
}

/// Rule 14 through the store: a definition names no organization, yet the workspaces of
/// every organization that wait for the module it makes automatic are filled, oldest
/// first; the latest definition stays whatever arrives after it.
#[tokio::test]
async fn a_module_defined_automatic_fills_every_organizations_waiting_workspaces() {
    // Given 2 units of polls for acme and 1 for globex, and four workspaces that enabled
    // polls and wait for a person (the default policy),
    let store = store().await;
    let now = Utc::now();
    let grants = [("acme", 2), ("globex", 1)].map(|(org, quantity)| {
        format!(
            r#"{{"event_id":"g-{org}","occurred_at":"2026-01-01T09:00:00Z","org_id":"{org}","product":"polls","quantity":{quantity}}}"#
        )
    });
    store
        .apply_batch(
            &[
                inbound("granted", 0, InputKind::EntitlementGranted, &grants[0]),
                inbound("granted", 1, InputKind::EntitlementGranted, &grants[1]),
            ],
            Policy::default(),
            now,
        )
        .await
        .unwrap();
    for (offset, (org, workspace)) in [
        ("acme", "keynote"),
        ("acme", "summit"),
        ("globex", "fair"),
        ("acme", "expo"),
    ]
    .into_iter()
    .enumerate()
    {
        let enabled = format!(
            r#"{{"event_id":"m-{workspace}","occurred_at":"2026-01-01T09:00:00Z","org_id":"{org}","workspace_id":"{workspace}","module":"polls"}}"#
        );
        store
            .apply_batch(
                &[inbound(
                    "enabled",
                    offset as i64,
                    InputKind::ModuleEnabled,
                    &enabled,
                )],
                Policy::default(),
                now + Duration::seconds(offset as i64 + 1),
            )
            .await
            .unwrap();
    }

    // when polls is defined automatic,
    let later = now + Duration::seconds(10);
    let report = store
        .apply_batch(
            &[definition(
                0,
                "d-auto",
                "2026-02-01T09:00:00Z",
                "polls",
                r#","assignment":"automatic","description":"Questions to the audience""#,
            )],
            Policy::default(),
            later,
        )
        .await
        .unwrap();

    // then the oldest two of acme's and globex's one are filled, by the definition;
    assert_eq!(report.ledger_entries.get("transfer"), Some(&3));
    let transfers: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT org_id, workspace_id, caused_by FROM ledger WHERE kind = 'transfer'
          ORDER BY org_id, sequence",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    let transfer =
        |org: &str, workspace: &str| (org.to_owned(), workspace.to_owned(), "d-auto".to_owned());
    assert_eq!(
        transfers,
        [
            transfer("acme", "keynote"),
            transfer("acme", "summit"),
            transfer("globex", "fair")
        ]
    );
    let waiting: Vec<(String,)> =
        sqlx::query_as("SELECT workspace_id FROM consumption WHERE required > allocated")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(waiting, [("expo".to_owned(),)]);

    // an older definition arriving later, and the same one again, change nothing.
    let report = store
        .apply_batch(
            &[
                definition(
                    1,
                    "d-old",
                    "2026-01-15T09:00:00Z",
                    "polls",
                    r#","assignment":"manual""#,
                ),
                definition(
                    2,
                    "d-auto",
                    "2026-02-01T09:00:00Z",
                    "polls",
                    r#","assignment":"automatic""#,
                ),
            ],
            Policy::default(),
            later,
        )
        .await
        .unwrap();
    assert_eq!((report.stale, report.duplicates), (1, 1));
    let stored: (String, Option<String>, Option<String>, String) = sqlx::query_as(
        "SELECT name, description, assignment, event_id FROM products WHERE product = 'polls'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(
        stored,
        (
            "Live polls".to_owned(),
            Some("Questions to the audience".to_owned()),
            Some("automatic".to_owned()),
            "d-auto".to_owned()
        )
    );

    // From now on polls moves by itself: a refill fills expo.
    let refill = r#"{"event_id":"g-more","occurred_at":"2026-02-02T09:00:00Z","org_id":"acme","product":"polls","quantity":1}"#;
    let report = store
        .apply_batch(
            &[inbound("granted", 2, InputKind::EntitlementGranted, refill)],
            Policy::default(),
            later,
        )
        .await
        .unwrap();
    assert_eq!(report.ledger_entries.get("transfer"), Some(&1));
}

/// The database repeats rule 14: a seat takes no assignment, an assignment is automatic or
/// manual, a name 1 to 256 characters, a description at most 2,000, and a row is replaced
/// only by a later definition.
#[tokio::test]
async fn the_catalogue_table_refuses_what_rule_14_forbids() {
    let store = store().await;
    store
        .apply_batch(
            &[definition(0, "d-1", "2026-01-01T09:00:00Z", "seat", "")],
            Policy::default(),
            Utc::now(),
        )
        .await
        .unwrap();
    let insert = |product: &str, name: &str, description: &str, assignment: &str| {
        format!(
            "INSERT INTO products (product, name, description, assignment, occurred_at, event_id)
                  VALUES ('{product}', '{name}', {description}, {assignment}, now(), 'd-x')"
        )
    };
    for (statement, constraint) in [
        (
            insert("polls", "Polls", "NULL", "'sometimes'"),
            "products_assignment_check",
        ),
        (
            insert("seat-pack", "", "NULL", "NULL"),
            "products_name_check",
        ),
        (
            insert("polls", &"n".repeat(257), "NULL", "NULL"),
            "products_name_check",
        ),
        (
            insert("polls", "Polls", &format!("'{}'", "d".repeat(2001)), "NULL"),
            "products_description_check",
        ),
        (
            insert("Polls!", "Polls", "NULL", "NULL"),
            "products_product_check",
        ),
        (
            "UPDATE products SET assignment = 'manual', event_id = 'd-2', occurred_at = now()
              WHERE product = 'seat'"
                .to_owned(),
            "seat_is_always_automatic",
        ),
    ] {
        assert_eq!(
            refused_by(store.pool(), &statement).await.as_deref(),
            Some(constraint),
            "{statement}"
        );
    }
    for (occurred_at, event_id) in [
        ("'2025-12-31T09:00:00Z'", "d-2"),
        ("'2026-01-01T09:00:00Z'", "d-1"),
        ("'2026-01-01T09:00:00Z'", "D-2"),
    ] {
        let statement = format!(
            "UPDATE products SET name = 'Seats', occurred_at = {occurred_at}, event_id = '{event_id}'
              WHERE product = 'seat'"
        );
        let error = sqlx::query(&statement)
            .execute(store.pool())
            .await
            .expect_err(&statement);
        assert!(
            error.to_string().contains("is not later than"),
            "{statement}: {error}"
        );
    }
}

/// Rule 14 under concurrency: a batch that enables a module and a batch that makes it
/// automatic, committed side by side, never leave the workspace waiting with a unit in
/// its pool, whichever commits first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_enabled_while_it_becomes_automatic_never_waits_with_units_in_the_pool() {
    let store = store().await;
    let now = Utc::now();
    for round in 0..12 {
        let module = format!("module-{round}");
        let org = format!("org-{round}");
        let grant = format!(
            r#"{{"event_id":"g-{round}","occurred_at":"2026-01-01T09:00:00Z","org_id":"{org}","product":"{module}","quantity":1}}"#
        );
        store
            .apply_batch(
                &[inbound(
                    "granted",
                    round,
                    InputKind::EntitlementGranted,
                    &grant,
                )],
                Policy::default(),
                now,
            )
            .await
            .unwrap();
        let enabled = format!(
            r#"{{"event_id":"m-{round}","occurred_at":"2026-01-01T09:00:00Z","org_id":"{org}","workspace_id":"w-{round}","module":"{module}"}}"#
        );
        let enabling = vec![inbound(
            "enabled",
            round,
            InputKind::ModuleEnabled,
            &enabled,
        )];
        let defining = vec![definition(
            round,
            &format!("d-{round}"),
            "2026-01-01T09:00:00Z",
            &module,
            r#","assignment":"automatic""#,
        )];
        // Each retried while the store says it may (as the worker's lanes do).
        let apply = |batch: Vec<Inbound>| {
            let store = store.clone();
            tokio::spawn(async move {
                loop {
                    match store.apply_batch(&batch, Policy::default(), now).await {
                        Ok(_) => return,
                        Err(error) if error.is_transient() => continue,
                        Err(error) => panic!("the batch failed: {error}"),
                    }
                }
            })
        };
        let (enabling, defining) = (apply(enabling), apply(defining));
        enabling.await.unwrap();
        defining.await.unwrap();
        let allocated: i64 = sqlx::query_scalar(
            "SELECT allocated FROM consumption WHERE workspace_id = $1 AND product = $2",
        )
        .bind(format!("w-{round}"))
        .bind(&module)
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert_eq!(allocated, 1, "round {round}: the workspace got its unit");
    }
}

#[tokio::test]
async fn a_module_enabled_and_defined_automatic_in_one_batch_gets_its_unit() {
    // Given an organization holding one unit of a module and no shortfall stored,
    let store = store().await;
    let now = Utc::now();
    let grant = r#"{"event_id":"g-1","occurred_at":"2026-01-01T09:00:00Z","org_id":"acme","product":"q-and-a","quantity":1}"#;
    store
        .apply_batch(
            &[inbound("granted", 0, InputKind::EntitlementGranted, grant)],
            Policy::default(),
            now,
        )
        .await
        .unwrap();
    // when one batch enables the module in a workspace (a shortfall opens: modules wait
    // for a person) and then defines it automatic,
    let enabled = r#"{"event_id":"m-1","occurred_at":"2026-01-01T09:00:01Z","org_id":"acme","workspace_id":"summit","module":"q-and-a"}"#;
    let report = store
        .apply_batch(
            &[
                inbound("enabled", 0, InputKind::ModuleEnabled, enabled),
                definition(
                    0,
                    "d-1",
                    "2026-01-01T09:00:02Z",
                    "q-and-a",
                    r#","assignment":"automatic""#,
                ),
            ],
            Policy::default(),
            now,
        )
        .await
        .unwrap();
    // then the definition fills the shortfall the batch opened: the unit moves, the pool
    // is empty and nothing is left missing.
    assert_eq!(report.ledger_total(), 1, "one transfer");
    let consumption: (i64, i64) =
        sqlx::query_as("SELECT required, allocated FROM consumption WHERE workspace_id = 'summit'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(consumption, (1, 1));
    let available: i64 = sqlx::query_scalar(
        "SELECT available FROM pools WHERE org_id = 'acme' AND product = 'q-and-a'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(available, 0);
}

/// A `workspace-updated` of acme's `summit` at `offset`.
fn workspace_update(offset: i64, event_id: &str, at: DateTime<Utc>, fields: &str) -> Inbound {
    let payload = format!(
        r#"{{"event_id":"{event_id}","occurred_at":"{}","org_id":"acme","workspace_id":"summit"{fields}}}"#,
        at.to_rfc3339()
    );
    inbound("updated", offset, InputKind::WorkspaceUpdated, &payload)
}

type LifeRow = (Option<String>, bool, Option<DateTime<Utc>>, Option<String>);

async fn life_of(store: &Store, workspace: &str) -> LifeRow {
    sqlx::query_as(
        "SELECT name, live, ends_at, life_event_id FROM workspaces WHERE workspace_id = $1",
    )
    .bind(workspace)
    .fetch_one(store.pool())
    .await
    .unwrap()
}

/// The messages of `channel` waiting in the outbox, oldest first.
async fn outbox_messages(store: &Store, channel: &str) -> Vec<serde_json::Value> {
    store
        .pending_outbox(100_000)
        .await
        .unwrap()
        .iter()
        .flat_map(|row| row.messages.iter())
        .filter(|message| message.channel.as_str() == channel)
        .map(|message| serde_json::from_slice(&message.payload).unwrap())
        .collect()
}

/// The state messages waiting in the outbox, oldest first.
async fn state_messages(store: &Store) -> Vec<serde_json::Value> {
    outbox_messages(store, "state").await
}

#[tokio::test]
async fn a_workspace_turns_past_when_its_end_passes_and_the_report_lists_it_apart() {
    use entitlement_worker::ops::report::Report;
    use entitlement_worker::store::StoreError;

    // Given acme's summit, named and ending 2 s from now, with a participant, and expo,
    // never updated, with one too,
    let store = store().await;
    let now = Utc::now();
    let ends = now + Duration::seconds(2);
    let summit = workspace_update(
        0,
        "u-2",
        now,
        &format!(
            r#","name":"Summit 2026","starts_at":"{}","ends_at":"{}""#,
            (now - Duration::hours(1)).to_rfc3339(),
            ends.to_rfc3339()
        ),
    );
    let grant = r#"{"event_id":"g1","occurred_at":"2026-01-01T09:00:00Z","org_id":"acme","product":"seat","quantity":5}"#;
    let join = |offset, workspace: &str| {
        let payload = format!(
            r#"{{"event_id":"a-{workspace}","occurred_at":"2026-01-01T09:00:00Z","org_id":"acme","workspace_id":"{workspace}","participant_id":"p1"}}"#
        );
        inbound("added", offset, InputKind::ParticipantAdded, &payload)
    };
    store
        .apply_batch(
            &[
                inbound("granted", 0, InputKind::EntitlementGranted, grant),
                summit,
                join(0, "summit"),
                join(1, "expo"),
            ],
            Policy::default(),
            now,
        )
        .await
        .expect("the batch commits");
    let stored = life_of(&store, "summit").await;
    assert_eq!(
        (stored.0.as_deref(), stored.1, stored.3.as_deref()),
        (Some("Summit 2026"), true, Some("u-2")),
        "summit is live and named"
    );
    assert_eq!(life_of(&store, "expo").await, (None, true, None, None));

    // when an older update arrives late, it changes nothing,
    let older = workspace_update(
        1,
        "u-1",
        now - Duration::minutes(1),
        r#","name":"Old name","archived":true"#,
    );
    let report = store
        .apply_batch(&[older], Policy::default(), now)
        .await
        .unwrap();
    assert_eq!((report.stale, report.rejected.len()), (1, 0));
    assert_eq!(life_of(&store, "summit").await, stored);

    // and before its end the clock leaves it live,
    let report = store
        .settle_due(Policy::default(), now + Duration::seconds(1))
        .await
        .unwrap();
    assert_eq!(report.workspaces_turned_past, 0);

    // then once its end has passed the clock turns it past, without any event, keeping its
    // seat; and only once,
    let later = now + Duration::seconds(3);
    let report = store.settle_due(Policy::default(), later).await.unwrap();
    assert_eq!(report.workspaces_turned_past, 1);
    assert_eq!(report.ledger_total(), 0);
    let past = life_of(&store, "summit").await;
    assert_eq!((past.0.as_deref(), past.1), (Some("Summit 2026"), false));
    // and its state message says so: the next version, caused by the update that set the
    // end; expo's state is not published again,
    let states = state_messages(&store).await;
    let summit: Vec<&serde_json::Value> = states
        .iter()
        .filter(|state| state["workspace_id"] == "summit")
        .collect();
    assert_eq!(summit.len(), 2, "{summit:?}");
    assert_eq!(
        (
            &summit[0]["live"],
            &summit[0]["name"],
            &summit[0]["version"]
        ),
        (&json!(true), &json!("Summit 2026"), &json!(1))
    );
    assert_eq!(
        (
            &summit[1]["live"],
            &summit[1]["name"],
            &summit[1]["version"]
        ),
        (&json!(false), &json!("Summit 2026"), &json!(2))
    );
    assert_eq!(summit[1]["caused_by"], "u-2");
    assert_eq!(summit[1]["required"], 1);
    assert_eq!(
        states
            .iter()
            .filter(|state| state["workspace_id"] == "expo")
            .count(),
        1
    );
    let report = store.settle_due(Policy::default(), later).await.unwrap();
    assert_eq!(report.workspaces_turned_past, 0);
    assert_eq!(report.states, 0, "nothing changed, nothing is published");
    let (required, allocated): (i64, i64) = sqlx::query_as(
        "SELECT required, allocated FROM consumption
          WHERE workspace_id = 'summit' AND product = 'seat'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!((required, allocated), (1, 1));

    // and the report lists the live workspaces first, the past ones apart, with names.
    let report = Report::load(store.pool(), "acme", later).await.unwrap();
    let lines: Vec<(&str, Option<&str>, bool)> = report
        .workspaces
        .iter()
        .map(|line| (line.workspace_id.as_str(), line.name.as_deref(), line.live))
        .collect();
    assert_eq!(
        lines,
        [("expo", None, true), ("summit", Some("Summit 2026"), false)]
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["workspaces"][1]["name"], "Summit 2026");
    assert_eq!(json["workspaces"][1]["live"], false);
    let table = report.to_table();
    let live = table.find("LIVE WORKSPACES").expect("a live section");
    let past = table.find("PAST WORKSPACES").expect("a past section");
    let expo = table.find("  expo ").expect("expo by its id");
    let named = table.find("  Summit 2026 ").expect("summit by its name");
    assert!(live < expo && expo < past && past < named, "{table}");

    // The database refuses what rule 13 forbids: a live archived workspace, an end before
    // the start, a life without its event, and a life replaced by an older one.
    for (statement, constraint) in [
        (
            "UPDATE workspaces SET archived = true, live = true WHERE workspace_id = 'summit'",
            "archived_workspace_is_past",
        ),
        (
            "UPDATE workspaces SET ends_at = starts_at WHERE workspace_id = 'summit'",
            "workspace_ends_after_it_starts",
        ),
        (
            "UPDATE workspaces SET name = 'Expo' WHERE workspace_id = 'expo'",
            "workspace_life_comes_from_an_event",
        ),
        (
            "UPDATE workspaces SET life_event_id = NULL WHERE workspace_id = 'summit'",
            "workspace_life_has_its_event",
        ),
    ] {
        assert_eq!(
            refused_by(store.pool(), statement).await.as_deref(),
            Some(constraint),
            "{statement}"
        );
    }
    let older = sqlx::query(
        "UPDATE workspaces SET life_event_at = life_event_at - interval '1 second'
          WHERE workspace_id = 'summit'",
    )
    .execute(store.pool())
    .await
    .map_err(StoreError::from)
    .unwrap_err();
    assert!(
        older.to_string().contains("is older than the one at"),
        "{older}"
    );
}

/// The pool warnings waiting in the outbox, oldest first.
async fn warning_messages(store: &Store) -> Vec<serde_json::Value> {
    outbox_messages(store, "pool_warnings").await
}

/// What a warning message says: status, kind, and its numbers.
fn told(message: &serde_json::Value) -> (String, String, String) {
    let numbers = match message["kind"].as_str() {
        Some("low") => format!("{} of {}", message["available"], message["threshold"]),
        _ => format!("{} of {}", message["units"], message["grant_id"]),
    };
    (
        message["status"].as_str().unwrap().to_owned(),
        message["kind"].as_str().unwrap().to_owned(),
        numbers,
    )
}

#[tokio::test]
async fn pool_warnings_open_change_and_resolve_across_batches_and_clock_rounds() {
    let store = store().await;
    let now = Utc::now();
    let occurred = now.to_rfc3339();
    let grant = |offset, id: &str, quantity, expires: Option<DateTime<Utc>>| {
        let expiry = expires.map_or(String::new(), |at| {
            format!(r#","expires_at":"{}""#, at.to_rfc3339())
        });
        let payload = format!(
            r#"{{"event_id":"{id}","occurred_at":"{occurred}","org_id":"acme","product":"seat","quantity":{quantity}{expiry}}}"#
        );
        inbound("granted", offset, InputKind::EntitlementGranted, &payload)
    };
    let joins = |from: i64, to: i64| -> Vec<Inbound> {
        (from..to)
            .map(|n| {
                let payload = format!(
                    r#"{{"event_id":"a{n}","occurred_at":"{occurred}","org_id":"acme","workspace_id":"summit","participant_id":"p{n}"}}"#
                );
                inbound("added", n, InputKind::ParticipantAdded, &payload)
            })
            .collect()
    };
    let policy = Policy::default();

    // Given a plan of 100 seats and the default 10% threshold, 90 participants warn once.
    store
        .apply_batch(&[grant(0, "plan", 100, None)], policy, now)
        .await
        .unwrap();
    store.apply_batch(&joins(0, 89), policy, now).await.unwrap();
    assert!(warning_messages(&store).await.is_empty(), "11 left");
    store
        .apply_batch(&joins(89, 90), policy, now)
        .await
        .unwrap();
    // `report` lists the open warning.
    let report = entitlement_worker::ops::report::Report::load(store.pool(), "acme", now)
        .await
        .unwrap();
    let listed: Vec<(&str, Option<i64>, Option<i64>)> = report
        .warnings
        .iter()
        .map(|warning| (warning.kind.as_str(), warning.available, warning.threshold))
        .collect();
    assert_eq!(listed, [("low", Some(10), Some(10))]);
    assert!(
        report
            .to_table()
            .contains("WARNINGS (open)\nseat             low: 10 left, warns at 10 or fewer"),
        "{}",
        report.to_table()
    );
    // The next batch loads the open warning from PostgreSQL and follows its numbers.
    store
        .apply_batch(&joins(90, 91), policy, now)
        .await
        .unwrap();
    // A refill of 50 resolves it: 59 left of 150, threshold 15.
    store
        .apply_batch(&[grant(1, "add-on", 50, None)], policy, now)
        .await
        .unwrap();
    let low = warning_messages(&store).await;
    assert_eq!(
        low.iter().map(told).collect::<Vec<_>>(),
        [
            ("open".into(), "low".into(), "10 of 10".into()),
            ("open".into(), "low".into(), "9 of 10".into()),
            ("resolved".into(), "low".into(), "59 of 15".into()),
        ]
    );
    assert!(low
        .iter()
        .all(|message| message["opened_at"] == low[0]["opened_at"]));
    let ids: std::collections::BTreeSet<&str> = low
        .iter()
        .map(|message| message["warning_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "every message has its own id");
    assert_eq!(
        low.iter()
            .map(|message| message["caused_by"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["a89", "a90", "add-on"]
    );

    // A grant expiring in 40 days is warned by the clock 30 days before, without any event,
    // and resolved when its units expire.
    let expires = now + Duration::days(40);
    store
        .apply_batch(&[grant(2, "trial", 20, Some(expires))], policy, now)
        .await
        .unwrap();
    let before = warning_messages(&store).await.len();
    store
        .settle_due(policy, expires - Duration::days(30) - Duration::minutes(1))
        .await
        .unwrap();
    assert_eq!(
        warning_messages(&store).await.len(),
        before,
        "not in range yet"
    );
    let raised = store
        .settle_due(policy, expires - Duration::days(30))
        .await
        .unwrap();
    assert_eq!(raised.warnings.get(&("expiring", "open")), Some(&1));
    let again = store
        .settle_due(policy, expires - Duration::days(29))
        .await
        .unwrap();
    assert!(again.warnings.is_empty(), "raised once, not at every round");
    let expired = store.settle_due(policy, expires).await.unwrap();
    assert_eq!(expired.ledger_entries.get("expiry"), Some(&1));
    let expiring: Vec<_> = warning_messages(&store).await[before..].to_vec();
    assert_eq!(
        expiring.iter().map(told).collect::<Vec<_>>(),
        [
            ("open".into(), "expiring".into(), "20 of \"trial\"".into()),
            (
                "resolved".into(),
                "expiring".into(),
                "0 of \"trial\"".into()
            ),
        ]
    );
    assert!(expiring
        .iter()
        .all(|message| message["caused_by"] == "trial"
            && message["expires_at"]
                .as_str()
                .map(|at| at.parse::<DateTime<Utc>>().unwrap())
                == Some(expires.trunc_subsecs(6))));

    // PostgreSQL keeps each warning as last published, resolved, with its revisions.
    let rows: Vec<(String, String, bool, i64)> = sqlx::query_as(
        "SELECT kind, grant_id, open, revision FROM pool_warnings ORDER BY kind, grant_id",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            ("expiring".to_owned(), "trial".to_owned(), false, 2),
            ("low".to_owned(), String::new(), false, 3),
        ]
    );
}
