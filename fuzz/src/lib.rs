//! The checks shared by the fuzz targets: `codec::decode` must never panic, must reject
//! inputs over 64 KiB as `too_large` before looking at them, and every command it accepts
//! must satisfy the contract (`schemas/*.schema.json`) and agree with the JSON it came from;
//! and the store must commit whatever the decoder made of an input ([`check_store`]).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;

use entitlement_worker::codec::decode_received;
use entitlement_worker::domain::Policy;
use entitlement_worker::settings::Settings;
use entitlement_worker::store::{Inbound, Store};

use chrono::{DateTime, Datelike, Utc};
use entitlement_worker::codec::{decode, InputKind, Rejection, MESSAGE_BYTES_MAX};
use entitlement_worker::domain::{
    Command, CommandBody, GrantUnits, Input, Product, ProductDefined, Quantity, RevocationTarget,
};
use serde_json::Value;

const REASONS: [&str; 5] = [
    "too_large",
    "invalid_encoding",
    "invalid_json",
    "schema_violation",
    "clock_skew",
];

/// The runtime and store of this fuzzing process, made on first use.
fn store() -> &'static (tokio::runtime::Runtime, Store) {
    static STORE: OnceLock<(tokio::runtime::Runtime, Store)> = OnceLock::new();
    STORE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let server = std::env::var("FUZZ_DATABASE_SERVER")
            .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432".to_owned());
        let mut settings = Settings::load(None).expect("the defaults load");
        settings.database.url = format!("{server}/fuzz_store_{}", std::process::id());
        let store = runtime
            .block_on(Store::connect(&settings.database))
            .expect("PostgreSQL is reachable (FUZZ_DATABASE_SERVER)");
        (runtime, store)
    })
}

/// Decodes `data[1..]` as an input of the topic `data[0]` picks, as the consumer would
/// now, and applies it alone in a batch: the store must commit it (its effects or its
/// dead letter) and move the partition past it.
pub fn check_store(data: &[u8]) {
    static OFFSET: AtomicI64 = AtomicI64::new(0);
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let kind = InputKind::ALL[usize::from(selector) % InputKind::ALL.len()];
    let now = Utc::now();
    let offset = OFFSET.fetch_add(1, Ordering::Relaxed);
    let inbound = Inbound {
        topic: "fuzz".to_owned(),
        partition: 0,
        offset,
        payload: Some(payload.to_vec()),
        decoded: decode_received(
            kind,
            Some(payload),
            Some(now + chrono::Duration::seconds(300)),
        ),
    };
    let (runtime, store) = store();
    let report = runtime
        .block_on(store.apply_batch(std::slice::from_ref(&inbound), Policy::default(), now))
        .unwrap_or_else(|error| panic!("the store refused a {kind:?} input: {error}"));
    assert_eq!(
        report.next_offsets,
        [("fuzz".to_owned(), 0, offset + 1)],
        "the partition did not move past the input"
    );
}
const SOURCE_KINDS: [&str; 5] = ["plan", "add_on", "subscription", "trial", "manual"];

/// Decodes `data` as a message of `kind` and panics (a fuzzer crash) if any rule is broken.
pub fn check_decode(kind: InputKind, data: &[u8]) {
    let result = decode(kind, Some(data));
    // Decoding is a pure function of its input.
    assert_eq!(
        result,
        decode(kind, Some(data)),
        "decoding is not deterministic"
    );
    match result {
        Ok(Input::Command(command)) => check_command(kind, data, &command),
        Ok(Input::ProductDefined(definition)) => check_definition(kind, data, &definition),
        Err(rejection) => check_rejection(data, &rejection),
    }
}

/// A `product-defined` (rule 14): a handle, a name of 1 to 256 characters, a description
/// of at most 2,000, no assignment for `seat`, all as the JSON says; no organization.
fn check_definition(kind: InputKind, data: &[u8], definition: &ProductDefined) {
    assert_eq!(
        kind,
        InputKind::ProductDefined,
        "{kind:?} decoded into {definition:?}"
    );
    assert!(
        data.len() <= MESSAGE_BYTES_MAX,
        "accepted {} bytes",
        data.len()
    );
    let value: Value = serde_json::from_slice(data).expect("accepted input that is not JSON");
    let field = |name: &str| value.get(name).and_then(Value::as_str);
    check_identifier("event_id", definition.event_id.as_str());
    assert_eq!(field("event_id"), Some(definition.event_id.as_str()));
    check_time("occurred_at", definition.occurred_at);
    assert_eq!(
        field("occurred_at").map(parse_time),
        Some(definition.occurred_at)
    );
    check_product(&definition.product);
    assert_eq!(field("product"), Some(definition.product.as_str()));
    check_length("name", &definition.name, 256);
    assert_eq!(field("name"), Some(definition.name.as_str()));
    if let Some(description) = &definition.description {
        assert!(
            description.chars().count() <= 2000,
            "a description of {description:?}"
        );
    }
    assert_eq!(field("description"), definition.description.as_deref());
    assert_eq!(
        field("assignment"),
        definition.assignment.map(|assignment| assignment.as_str())
    );
    assert!(
        !(definition.product.is_seat() && definition.assignment.is_some()),
        "an assignment accepted for `seat`"
    );
}

fn check_rejection(data: &[u8], rejection: &Rejection) {
    assert!(
        REASONS.contains(&rejection.reason),
        "unknown reason {:?}",
        rejection.reason
    );
    assert!(!rejection.detail.is_empty(), "a rejection without detail");
    if data.len() > MESSAGE_BYTES_MAX {
        assert_eq!(rejection.reason, "too_large", "{} bytes", data.len());
        assert_eq!(
            rejection.event_id, None,
            "too_large must not parse the input"
        );
    } else {
        assert_ne!(rejection.reason, "too_large", "{} bytes", data.len());
    }
    if let Some(event_id) = &rejection.event_id {
        assert!(
            ["schema_violation", "clock_skew"].contains(&rejection.reason),
            "{:?} with an event_id",
            rejection.reason
        );
        let value: Value = serde_json::from_slice(data).expect("an event_id from non-JSON");
        assert_eq!(value["event_id"].as_str(), Some(event_id.as_str()));
    }
}

fn check_command(kind: InputKind, data: &[u8], command: &Command) {
    assert!(
        data.len() <= MESSAGE_BYTES_MAX,
        "accepted {} bytes",
        data.len()
    );
    let value: Value = serde_json::from_slice(data).expect("accepted input that is not JSON");
    let object = value
        .as_object()
        .expect("accepted JSON that is not an object");
    let field = |name: &str| object.get(name).and_then(Value::as_str);

    // Envelope: ids of 1 to 128 characters taken from the input, a sane time.
    check_identifier("event_id", command.event_id.as_str());
    check_identifier("org_id", command.org_id.as_str());
    assert_eq!(field("event_id"), Some(command.event_id.as_str()));
    assert_eq!(field("org_id"), Some(command.org_id.as_str()));
    check_time("occurred_at", command.occurred_at);
    assert_eq!(
        field("occurred_at").map(parse_time),
        Some(command.occurred_at)
    );
    if let Some(workspace_id) = command.workspace_id() {
        check_identifier("workspace_id", workspace_id.as_str());
        assert_eq!(field("workspace_id"), Some(workspace_id.as_str()));
    }

    match (&command.body, kind) {
        (CommandBody::ParticipantAdded { participant_id, .. }, InputKind::ParticipantAdded) => {
            check_identifier("participant_id", participant_id.as_str());
            assert_eq!(field("participant_id"), Some(participant_id.as_str()));
        }
        (
            CommandBody::ParticipantCancelled {
                participant_id,
                activated,
                ..
            },
            InputKind::ParticipantCancelled,
        ) => {
            check_identifier("participant_id", participant_id.as_str());
            assert_eq!(field("participant_id"), Some(participant_id.as_str()));
            assert_eq!(
                object.get("activated").and_then(Value::as_bool),
                Some(*activated)
            );
        }
        (CommandBody::ModuleEnabled { module, .. }, InputKind::ModuleEnabled) => {
            check_product(module);
            assert!(!module.is_seat(), "`seat` accepted as a module");
            assert_eq!(field("module"), Some(module.as_str()));
        }
        (
            CommandBody::EntitlementGranted {
                product,
                units,
                valid_from,
                expires_at,
                source,
            },
            InputKind::EntitlementGranted,
        ) => {
            check_product(product);
            assert_eq!(field("product"), Some(product.as_str()));
            match units {
                GrantUnits::Counted(quantity) => {
                    check_quantity(*quantity);
                    assert_eq!(
                        object.get("quantity").and_then(Value::as_i64),
                        Some(quantity.get())
                    );
                    assert_ne!(object.get("unlimited"), Some(&Value::Bool(true)));
                }
                GrantUnits::Unlimited => {
                    assert_eq!(object.get("unlimited"), Some(&Value::Bool(true)));
                    assert!(
                        object.get("quantity").is_none_or(Value::is_null),
                        "an unlimited grant with a quantity"
                    );
                }
            }
            let start = valid_from.expect("a grant without its start of validity");
            check_time("valid_from", start);
            let expected_start = field("valid_from").map_or(command.occurred_at, parse_time);
            assert_eq!(start, expected_start);
            if let Some(end) = expires_at {
                check_time("expires_at", *end);
                assert!(
                    *end > start,
                    "expires_at {end} not after valid_from {start}"
                );
            }
            if let Some(source) = source {
                assert!(
                    SOURCE_KINDS.contains(&source.kind.as_str()),
                    "source.kind {:?}",
                    source.kind
                );
                check_length("source.reference", &source.reference, 256);
            }
        }
        (
            CommandBody::TransferRequested {
                product,
                quantity,
                requested_by,
                ..
            },
            InputKind::TransferRequested,
        ) => {
            check_product(product);
            assert_eq!(field("product"), Some(product.as_str()));
            check_quantity(*quantity);
            if !product.is_seat() {
                assert_eq!(quantity.get(), 1, "a module transfer of several units");
            }
            check_identifier("requested_by.user_id", &requested_by.user_id);
            check_length("requested_by.role", &requested_by.role, 64);
        }
        (
            CommandBody::WorkspaceUpdated {
                name,
                starts_at,
                ends_at,
                archived,
                ..
            },
            InputKind::WorkspaceUpdated,
        ) => {
            if let Some(name) = name {
                check_length("name", name, 256);
            }
            assert_eq!(field("name"), name.as_deref());
            let time = |name: &str| field(name).map(parse_time);
            assert_eq!(time("starts_at"), *starts_at);
            assert_eq!(time("ends_at"), *ends_at);
            for (name, at) in [("starts_at", starts_at), ("ends_at", ends_at)] {
                if let Some(at) = at {
                    check_time(name, *at);
                }
            }
            if let (Some(start), Some(end)) = (starts_at, ends_at) {
                assert!(end > start, "ends_at {end} not after starts_at {start}");
            }
            assert_eq!(
                object
                    .get("archived")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                *archived
            );
        }
        (CommandBody::EntitlementRevoked { target, reason }, InputKind::EntitlementRevoked) => {
            match target {
                RevocationTarget::Grant { grant_id, quantity } => {
                    check_identifier("grant_id", grant_id.as_str());
                    assert_eq!(field("grant_id"), Some(grant_id.as_str()));
                    assert!(object.get("source").is_none_or(Value::is_null));
                    assert!(object.get("product").is_none_or(Value::is_null));
                    if let Some(quantity) = quantity {
                        check_quantity(*quantity);
                    }
                }
                RevocationTarget::Source { source, product } => {
                    assert!(
                        SOURCE_KINDS.contains(&source.kind.as_str()),
                        "source.kind {:?}",
                        source.kind
                    );
                    check_length("source.reference", &source.reference, 256);
                    assert!(object.get("grant_id").is_none_or(Value::is_null));
                    assert!(object.get("quantity").is_none_or(Value::is_null));
                    if let Some(product) = product {
                        check_product(product);
                    }
                }
            }
            if let Some(reason) = reason {
                assert!(
                    reason.chars().count() <= 256,
                    "a reason over 256 characters"
                );
            }
        }
        (body, kind) => panic!("{kind:?} decoded into {body:?}"),
    }
}

fn check_identifier(name: &str, value: &str) {
    check_length(name, value, 128);
}

fn check_length(name: &str, value: &str, max: usize) {
    let length = value.chars().count();
    assert!(
        (1..=max).contains(&length),
        "{name} is {length} characters, not 1 to {max}"
    );
}

/// `^[a-z0-9][a-z0-9._-]{0,63}$`
fn check_product(product: &Product) {
    let handle = product.as_str();
    let ok = |byte: u8, first: bool| {
        byte.is_ascii_lowercase()
            || byte.is_ascii_digit()
            || (!first && matches!(byte, b'.' | b'_' | b'-'))
    };
    assert!(
        (1..=64).contains(&handle.len())
            && handle
                .bytes()
                .enumerate()
                .all(|(index, byte)| ok(byte, index == 0)),
        "{handle:?} is not a product handle"
    );
}

fn check_quantity(quantity: Quantity) {
    assert!(
        (1..=1_000_000).contains(&quantity.get()),
        "quantity {}",
        quantity.get()
    );
}

fn check_time(name: &str, time: DateTime<Utc>) {
    assert!(
        (1970..=9999).contains(&time.year()),
        "{name} {time} outside the years 1970 to 9999"
    );
}

/// A time as the decoder keeps it: cut to the microseconds PostgreSQL keeps.
fn parse_time(text: &str) -> DateTime<Utc> {
    use chrono::SubsecRound;
    DateTime::parse_from_rfc3339(text)
        .expect("an accepted time that is not RFC 3339")
        .with_timezone(&Utc)
        .trunc_subsecs(6)
}
