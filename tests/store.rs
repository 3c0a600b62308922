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
        key: None,
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
