//! The store against real PostgreSQL: one batch, one transaction, exactly once.

mod common;

use chrono::{Duration, Utc};
use entitlement_worker::codec::{decode, InputKind};
use entitlement_worker::domain::Policy;
use entitlement_worker::store::{Inbound, Store};

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
    assert_eq!(store.outbox_backlog().await.unwrap(), 4 + 3);

    // A round asking for fewer messages than the first row holds still gets that row whole.
    let rows = store.pending_outbox(1).await.unwrap();
    assert_eq!(rows.len(), 1);
    let kinds: Vec<&str> = rows[0]
        .messages
        .iter()
        .map(|message| message.channel.as_str())
        .collect();
    assert_eq!(kinds, ["dlq", "ledger", "ledger", "shortfalls"]);
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
    assert_eq!(rows[1].messages.len(), 3);
    let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
    store.remove_published(&ids).await.unwrap();
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
}

#[tokio::test]
async fn the_upgrade_to_event_ids_per_organization_keeps_what_was_applied() {
    // Given a database of the version before, holding a grant, a manual transfer and a
    // refused transfer request, all applied,
    use entitlement_worker::store::MIGRATOR;
    let name = common::unique("upgrade");
    let server = common::server_url();
    let mut maintenance = sqlx::PgPool::connect(&format!("{server}/postgres"))
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&maintenance)
        .await
        .unwrap();
    maintenance.close().await;
    maintenance = sqlx::PgPool::connect(&format!("{server}/{name}"))
        .await
        .unwrap();
    let before = sqlx::migrate::Migrator {
        migrations: MIGRATOR
            .iter()
            .filter(|migration| migration.version < 20261201000001)
            .cloned()
            .collect::<Vec<_>>()
            .into(),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    before.run(&maintenance).await.unwrap();
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
    let mut settings = common::settings("unused:9092");
    settings.database.url = format!("{server}/{name}");
    let store = Store::connect(&settings.database).await.unwrap();

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
