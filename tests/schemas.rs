//! `schemas/` and the code agree: the examples validate (or fail) as named, every message
//! the worker publishes validates, and inputs the schema refuses the decoder refuses.

use std::fs;
use std::path::Path;

use chrono::Utc;
use entitlement_worker::codec::{
    self, AlertMessage, DeadLetterMessage, InputKind, LedgerMessage, PoolWarningMessage,
    StateMessage,
};
use serde_json::Value;

const INPUTS: [(&str, InputKind); 8] = [
    ("participant-added", InputKind::ParticipantAdded),
    ("participant-cancelled", InputKind::ParticipantCancelled),
    ("module-enabled", InputKind::ModuleEnabled),
    ("entitlement-granted", InputKind::EntitlementGranted),
    (
        "entitlement-transfer-requested",
        InputKind::TransferRequested,
    ),
    ("entitlement-revoked", InputKind::EntitlementRevoked),
    ("workspace-updated", InputKind::WorkspaceUpdated),
    ("product-defined", InputKind::ProductDefined),
];

fn schema(topic: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("schemas/{topic}.schema.json"));
    let schema: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    // Formats (date-time, uuid) are checked too, as the worker checks them.
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|error| panic!("{path:?}: {error}"))
}

fn examples(topic: &str) -> Vec<(String, Vec<u8>)> {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("schemas/examples/{topic}"));
    let mut found: Vec<_> = fs::read_dir(&directory)
        .unwrap_or_else(|error| panic!("{directory:?}: {error}"))
        .map(|entry| entry.unwrap().path())
        .map(|path| {
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                fs::read(&path).unwrap(),
            )
        })
        .collect();
    found.sort();
    found
}

#[test]
fn every_input_the_worker_consumes_has_a_schema() {
    for kind in InputKind::ALL {
        assert!(
            INPUTS.iter().any(|(_, listed)| *listed == kind),
            "{kind:?} is listed with its schema"
        );
    }
}

#[test]
fn every_example_validates_or_fails_as_its_name_says() {
    let topics = INPUTS.iter().map(|(topic, _)| *topic).chain([
        "entitlement-shortfalls",
        "entitlement-ledger",
        "entitlement-dlq",
        "entitlement-state",
        "entitlement-pool-warnings",
    ]);
    for topic in topics {
        let validator = schema(topic);
        let examples = examples(topic);
        assert!(
            examples.iter().any(|(name, _)| name.starts_with("valid-")),
            "{topic} has valid examples"
        );
        for (name, bytes) in examples {
            let instance: Value = serde_json::from_slice(&bytes).unwrap();
            let expected = name.starts_with("valid-");
            assert_eq!(validator.is_valid(&instance), expected, "{topic}/{name}");
        }
    }
}

#[test]
fn the_decoder_accepts_the_valid_input_examples_and_refuses_the_invalid_ones() {
    for (topic, kind) in INPUTS {
        for (name, bytes) in examples(topic) {
            let decoded = codec::decode(kind, Some(&bytes));
            if name.starts_with("valid-") {
                assert!(decoded.is_ok(), "{topic}/{name}: {decoded:?}");
            } else {
                let rejection = decoded.expect_err(&format!("{topic}/{name} is refused"));
                assert_eq!(rejection.reason, "schema_violation", "{topic}/{name}");
            }
        }
    }
}

/// Fields an input does not have are ignored, whatever their values, even when another
/// input has a field of that name: the schema accepts them, and so does the decoder,
/// deciding exactly as without them.
#[test]
fn fields_of_other_inputs_are_ignored_whatever_their_values() {
    // Every input's own fields, as its schema lists them: the contract's list, not the
    // decoder's.
    let own: Vec<Vec<String>> = INPUTS.iter().map(|(topic, _)| own_fields(topic)).collect();
    let mut all_fields: Vec<&str> = own.iter().flatten().map(String::as_str).collect();
    all_fields.sort();
    all_fields.dedup();
    for ((topic, kind), own) in INPUTS.into_iter().zip(&own) {
        let validator = schema(topic);
        for (name, bytes) in examples(topic) {
            if !name.starts_with("valid-") {
                continue;
            }
            let mut instance: Value = serde_json::from_slice(&bytes).unwrap();
            let plain = codec::decode(kind, Some(&bytes)).expect("a valid example decodes");
            let object = instance.as_object_mut().unwrap();
            let mut added = Vec::new();
            for &field in &all_fields {
                if !object.contains_key(field) && !own.iter().any(|mine| mine == field) {
                    // An array is the wrong type for every field of every input.
                    object.insert(field.into(), serde_json::json!(["not", "this", "type"]));
                    added.push(field);
                }
            }
            assert!(
                validator.is_valid(&instance),
                "{topic}/{name}: the schema ignores {added:?}"
            );
            let decoded = codec::decode(kind, Some(instance.to_string().as_bytes()))
                .unwrap_or_else(|rejection| {
                    panic!("{topic}/{name} with {added:?}: refused: {rejection:?}")
                });
            assert_eq!(
                format!("{decoded:?}"),
                format!("{plain:?}"),
                "{topic}/{name}: {added:?} change nothing"
            );
        }
    }
}

/// The fields an input's schema lists under `properties`.
fn own_fields(topic: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("schemas/{topic}.schema.json"));
    let schema: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    let fields: Vec<String> = schema["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("{path:?} lists no properties"))
        .keys()
        .cloned()
        .collect();
    assert!(
        fields.len() > 3,
        "{path:?}: an input has fields beyond event_id, occurred_at and org_id"
    );
    fields
}

#[test]
fn the_messages_the_worker_publishes_validate() {
    use entitlement_worker::domain::*;
    let now = Utc::now();
    let org = OrgId::parse("acme").unwrap();
    let workspace = WorkspaceId::parse("summit").unwrap();
    let cause = EventId::parse("e-1").unwrap();
    let entries = [
        LedgerEntry {
            org_id: org.clone(),
            sequence: 1,
            product: Product::seat(),
            kind: LedgerKind::Grant,
            quantity: 10,
            workspace_id: None,
            pool_available_after: 10,
            caused_by: cause.clone(),
            grant_id: Some(cause.clone()),
            actor: None,
            unlimited: false,
            recorded_at: now,
        },
        LedgerEntry {
            org_id: org.clone(),
            sequence: 2,
            product: Product::parse("gamification").unwrap(),
            kind: LedgerKind::ManualTransfer,
            quantity: 1,
            workspace_id: Some(workspace.clone()),
            pool_available_after: 0,
            caused_by: cause.clone(),
            grant_id: None,
            actor: Some("u-alice".into()),
            unlimited: false,
            recorded_at: now,
        },
        LedgerEntry {
            org_id: org.clone(),
            sequence: 3,
            product: Product::seat(),
            kind: LedgerKind::Revocation,
            quantity: 4,
            workspace_id: None,
            pool_available_after: 6,
            caused_by: EventId::parse("r-1").unwrap(),
            grant_id: Some(cause.clone()),
            actor: None,
            unlimited: false,
            recorded_at: now,
        },
        LedgerEntry {
            org_id: org.clone(),
            sequence: 4,
            product: Product::seat(),
            kind: LedgerKind::Transfer,
            quantity: 250,
            workspace_id: Some(workspace.clone()),
            pool_available_after: 6,
            caused_by: cause.clone(),
            grant_id: None,
            actor: None,
            unlimited: true,
            recorded_at: now,
        },
    ];
    let ledger = schema("entitlement-ledger");
    for entry in &entries {
        let message = serde_json::to_value(LedgerMessage::from(entry)).unwrap();
        assert!(ledger.is_valid(&message), "{message}");
    }
    let alerts = schema("entitlement-shortfalls");
    for (status, missing) in [(AlertStatus::Open, 2), (AlertStatus::Resolved, 0)] {
        let alert = Alert {
            org_id: org.clone(),
            workspace_id: workspace.clone(),
            product: Product::seat(),
            status,
            required: 12,
            allocated: 12 - missing,
            missing,
            opened_at: now,
            occurred_at: now,
            caused_by: cause.clone(),
            revision: 1,
        };
        let message = serde_json::to_value(AlertMessage::from(&alert)).unwrap();
        assert!(alerts.is_valid(&message), "{message}");
    }
    let states = schema("entitlement-state");
    let changes = [
        StateChange {
            key: StateKey::Workspace {
                org_id: org.clone(),
                workspace_id: workspace.clone(),
                product: Product::seat(),
            },
            body: StateBody::Workspace(WorkspaceCounts {
                required: 12,
                allocated: 10,
            }),
            version: 3,
            updated_at: now,
            caused_by: cause.clone(),
        },
        StateChange {
            key: StateKey::Pool {
                org_id: org.clone(),
                product: Product::parse("live-stream").unwrap(),
            },
            body: StateBody::Pool(PoolState {
                available: 4,
                pending: 10,
                unlimited: true,
                granted: 14,
                transferred: 10,
                expired: 0,
                revoked: 0,
            }),
            version: 1,
            updated_at: now,
            caused_by: cause.clone(),
        },
    ];
    for change in &changes {
        for (name, live) in [(None, true), (Some("Summit 2026"), false)] {
            let message = serde_json::to_value(StateMessage::new(change, name, live)).unwrap();
            assert!(states.is_valid(&message), "{message}");
        }
    }
    let warnings = schema("entitlement-pool-warnings");
    let expires_at = now + chrono::Duration::days(20);
    let grant = EventId::parse("g-trial").unwrap();
    for (grant_id, status, numbers) in [
        (
            None,
            AlertStatus::Open,
            WarningNumbers::Low {
                available: 10,
                threshold: 10,
            },
        ),
        (
            None,
            AlertStatus::Resolved,
            WarningNumbers::Low {
                available: 57,
                threshold: 15,
            },
        ),
        (
            Some(grant.clone()),
            AlertStatus::Open,
            WarningNumbers::Expiring {
                units: 30,
                expires_at,
            },
        ),
        (
            Some(grant.clone()),
            AlertStatus::Resolved,
            WarningNumbers::Expiring {
                units: 0,
                expires_at,
            },
        ),
    ] {
        let warning = PoolWarning {
            key: WarningKey {
                org_id: org.clone(),
                product: Product::seat(),
                grant_id,
            },
            status,
            numbers,
            opened_at: now,
            occurred_at: now,
            caused_by: cause.clone(),
            revision: 2,
        };
        let message = serde_json::to_value(PoolWarningMessage::from(&warning)).unwrap();
        assert!(warnings.is_valid(&message), "{message}");
    }
    let dlq = schema("entitlement-dlq");
    // The last: a catalogue input, which names no organization.
    let seat_assigned = br#"{"event_id":"d-1","occurred_at":"2026-12-03T09:00:00Z","product":"seat","name":"Seat","assignment":"manual"}"#;
    for (topic, kind, payload) in [
        (
            "participant-added",
            InputKind::ParticipantAdded,
            &b"not json"[..],
        ),
        (
            "participant-added",
            InputKind::ParticipantAdded,
            &b"\xff\xfe"[..],
        ),
        (
            "product-defined",
            InputKind::ProductDefined,
            &seat_assigned[..],
        ),
    ] {
        let rejection = codec::decode(kind, Some(payload)).unwrap_err();
        let message = serde_json::to_value(DeadLetterMessage::new(
            topic,
            0,
            7,
            Some(payload),
            &rejection,
            now,
        ))
        .unwrap();
        assert!(dlq.is_valid(&message), "{message}");
    }
}
