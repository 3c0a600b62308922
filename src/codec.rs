//! Message formats: bytes from the input topics to typed commands (or a rejection with a
//! reason), and the output messages to JSON. Mirrored by `schemas/`.

use base64::Engine as _;
use chrono::{DateTime, Datelike, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::domain::shortfalls::{alert_id, ID_NAMESPACE};
use crate::domain::{
    Actor, Alert, Assignment, Command, CommandBody, EventId, GrantSource, GrantUnits, IdError,
    Input, LedgerEntry, OrgId, ParticipantId, PoolWarning, Product, ProductDefined, Quantity,
    RevocationTarget, StateBody, StateChange, StateKey, WarningNumbers, WorkspaceId,
};

/// The largest input message accepted, in bytes (the contract's 64 KiB).
pub const MESSAGE_BYTES_MAX: usize = 64 * 1024;
/// The longest `requested_by.role` or source reference kept, in characters.
const FREE_TEXT_LENGTH_MAX: usize = 256;
/// The longest product description the catalogue keeps, in characters (rule 14).
const DESCRIPTION_LENGTH_MAX: usize = 2000;
/// Times before this year or after 9999 are refused: they are typing mistakes, not events.
const YEAR_MIN: i32 = 1970;
const YEAR_MAX: i32 = 9999;
/// Digits of a second that times keep: PostgreSQL's `timestamptz` keeps microseconds, so
/// a time is cut to them here, before any rule compares two times (a grant whose window is
/// shorter than a microsecond, or two events of a participant in the same microsecond,
/// must be decided the same way in the core as in the database).
const SUBSECOND_DIGITS: u16 = 6;
/// The most of a rejected input its dead letter copies: the input limit itself, so every
/// input the worker could have accepted is kept whole; beyond it the copy is cut and the
/// letter carries the original size and digest. Escaped as JSON, 64 KiB of control
/// characters take at most 6 times that, well under the producer's 1 MB message limit.
pub const DEAD_LETTER_PAYLOAD_BYTES_MAX: usize = MESSAGE_BYTES_MAX;
/// The longest `detail` a dead letter carries, in characters: a parser's message can quote
/// a field of the input, which may be most of 64 KiB.
const DETAIL_LENGTH_MAX: usize = 1024;

/// The input topics, by what they carry rather than by their configured names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InputKind {
    ParticipantAdded,
    ParticipantCancelled,
    ModuleEnabled,
    EntitlementGranted,
    TransferRequested,
    EntitlementRevoked,
    ProductDefined,
    WorkspaceUpdated,
}

impl InputKind {
    /// Every input topic's kind.
    pub const ALL: [InputKind; 8] = [
        InputKind::ParticipantAdded,
        InputKind::ParticipantCancelled,
        InputKind::ModuleEnabled,
        InputKind::EntitlementGranted,
        InputKind::TransferRequested,
        InputKind::EntitlementRevoked,
        InputKind::ProductDefined,
        // Last: the fuzz seeds of the store pick their topic by index into this list.
        InputKind::WorkspaceUpdated,
    ];
}

/// Why an input message was rejected before it reached the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The dead-letter `reason`.
    pub reason: &'static str,
    /// A sentence for the person reading the dead-letter topic.
    pub detail: String,
    /// The `event_id`, when the message got far enough to have one.
    pub event_id: Option<String>,
    /// The `org_id`, when the message names one that can key its dead letter; never for
    /// the catalogue's inputs, which belong to no organization.
    pub org_id: Option<String>,
}

impl Rejection {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            event_id: None,
            org_id: None,
        }
    }
}

#[derive(Deserialize)]
struct RawEnvelope {
    event_id: String,
    occurred_at: String,
    org_id: String,
    workspace_id: Option<String>,
    participant_id: Option<String>,
    activated: Option<bool>,
    module: Option<String>,
    product: Option<String>,
    quantity: Option<i64>,
    unlimited: Option<bool>,
    valid_from: Option<String>,
    expires_at: Option<String>,
    source: Option<RawSource>,
    requested_by: Option<RawActor>,
    grant_id: Option<String>,
    reason: Option<String>,
    name: Option<String>,
    starts_at: Option<String>,
    ends_at: Option<String>,
    archived: Option<bool>,
}

/// A `product-defined`: it has no `org_id` (the catalogue is global).
#[derive(Deserialize)]
struct RawDefinition {
    event_id: String,
    occurred_at: String,
    product: String,
    name: String,
    description: Option<String>,
    assignment: Option<String>,
}

#[derive(Deserialize)]
struct RawSource {
    kind: String,
    reference: String,
}

#[derive(Deserialize)]
struct RawActor {
    user_id: String,
    role: String,
}

const SOURCE_KINDS: [&str; 5] = ["plan", "add_on", "subscription", "trial", "manual"];

/// Decodes one input message with no bound on how far ahead `occurred_at` may be: for
/// inputs that were accepted before (the tests, the operators' checks of what they send).
/// The consumer uses [`decode_received`].
pub fn decode(kind: InputKind, payload: Option<&[u8]>) -> Result<Input, Rejection> {
    decode_received(kind, payload, None)
}

/// Decodes one input message as received now: an `occurred_at` later than
/// `occurred_at_max` (the worker's clock plus the tolerated skew) is refused as
/// `clock_skew`, since an event from the future would win every later one of its
/// participant (rule 2) until that time. Every way decoding can fail yields a rejection
/// with its reason; what it accepts, the store can keep and publish.
pub fn decode_received(
    kind: InputKind,
    payload: Option<&[u8]>,
    occurred_at_max: Option<DateTime<Utc>>,
) -> Result<Input, Rejection> {
    let bytes = payload.unwrap_or_default();
    if bytes.len() > MESSAGE_BYTES_MAX {
        return Err(Rejection::new(
            "too_large",
            format!(
                "The message is {} bytes, more than the {MESSAGE_BYTES_MAX} allowed.",
                bytes.len()
            ),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|error| {
        Rejection::new(
            "invalid_encoding",
            format!("The message is not UTF-8: {error}."),
        )
    })?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|error| {
        Rejection::new("invalid_json", format!("The message is not JSON: {error}."))
    })?;
    let event_id = value
        .get("event_id")
        .and_then(|id| id.as_str())
        .map(str::to_owned);
    // The dead letter is keyed by the organization, like every output, when the message
    // names one that is a valid identifier. A catalogue input belongs to none: an `org_id`
    // on it is a field it does not have, ignored like any other, so its letter has no key.
    let org_id = value
        .get("org_id")
        .and_then(|id| id.as_str())
        .filter(|id| kind != InputKind::ProductDefined && OrgId::parse(id).is_ok())
        .map(str::to_owned);
    let schema_violation = |detail: String| Rejection {
        reason: "schema_violation",
        detail: bounded_detail(detail),
        event_id: event_id.clone(),
        org_id: org_id.clone(),
    };
    let input = match kind {
        InputKind::ProductDefined => decode_definition(value).map(Input::ProductDefined),
        _ => decode_value(kind, value).map(Input::Command),
    }
    .map_err(schema_violation)?;
    if let Some(latest) = occurred_at_max {
        if input.occurred_at() > latest {
            return Err(Rejection {
                reason: "clock_skew",
                detail: format!(
                    "Field `occurred_at` ({}) is later than the worker's clock allows ({latest}: \
                     its time plus `input.clock_skew_max_seconds`); an event from the future \
                     would outrank every later event until then.",
                    input.occurred_at().to_rfc3339()
                ),
                event_id,
                org_id,
            });
        }
    }
    Ok(input)
}

/// Cuts a detail sentence to [`DETAIL_LENGTH_MAX`] characters.
fn bounded_detail(detail: String) -> String {
    match detail.char_indices().nth(DETAIL_LENGTH_MAX) {
        None => detail,
        Some((cut, _)) => format!("{}... (cut)", &detail[..cut]),
    }
}

/// The fields each input has (beyond `event_id`, `occurred_at` and `org_id`); any other
/// field is ignored, whatever its value, as the contract says, even one another input
/// has (a `quantity` on a participant event is not looked at).
fn fields_of(kind: InputKind) -> &'static [&'static str] {
    match kind {
        InputKind::ParticipantAdded => &["workspace_id", "participant_id"],
        InputKind::ParticipantCancelled => &["workspace_id", "participant_id", "activated"],
        InputKind::ModuleEnabled => &["workspace_id", "module"],
        InputKind::EntitlementGranted => &[
            "product",
            "quantity",
            "unlimited",
            "valid_from",
            "expires_at",
            "source",
        ],
        InputKind::TransferRequested => &["workspace_id", "product", "quantity", "requested_by"],
        InputKind::EntitlementRevoked => &["grant_id", "source", "product", "quantity", "reason"],
        InputKind::WorkspaceUpdated => {
            &["workspace_id", "name", "starts_at", "ends_at", "archived"]
        }
        InputKind::ProductDefined => &["product", "name", "description", "assignment"],
    }
}

fn decode_value(kind: InputKind, mut value: serde_json::Value) -> Result<Command, String> {
    let Some(object) = value.as_object_mut() else {
        return Err("The message is JSON but not an object.".into());
    };
    let fields = fields_of(kind);
    object.retain(|key, _| {
        matches!(key.as_str(), "event_id" | "occurred_at" | "org_id")
            || fields.contains(&key.as_str())
    });
    let raw: RawEnvelope = serde_json::from_value(value)
        .map_err(|error| format!("The message does not match its schema: {error}."))?;
    let event_id = identifier("event_id", &raw.event_id, EventId::parse)?;
    let org_id = identifier("org_id", &raw.org_id, OrgId::parse)?;
    let occurred_at = timestamp("occurred_at", &raw.occurred_at)?;
    let workspace = |raw: &RawEnvelope| {
        let value = required("workspace_id", raw.workspace_id.as_deref())?;
        identifier("workspace_id", value, WorkspaceId::parse)
    };
    let participant = |raw: &RawEnvelope| {
        let value = required("participant_id", raw.participant_id.as_deref())?;
        identifier("participant_id", value, ParticipantId::parse)
    };
    let body = match kind {
        InputKind::ParticipantAdded => CommandBody::ParticipantAdded {
            workspace_id: workspace(&raw)?,
            participant_id: participant(&raw)?,
        },
        InputKind::ParticipantCancelled => CommandBody::ParticipantCancelled {
            workspace_id: workspace(&raw)?,
            participant_id: participant(&raw)?,
            activated: raw
                .activated
                .ok_or("Field `activated` is required (true or false).")?,
        },
        InputKind::ModuleEnabled => {
            let module = product("module", raw.module.as_deref())?;
            if module.is_seat() {
                return Err("Field `module` names an advanced module; `seat` is not one.".into());
            }
            CommandBody::ModuleEnabled {
                workspace_id: workspace(&raw)?,
                module,
            }
        }
        InputKind::EntitlementGranted => {
            let valid_from = optional_timestamp("valid_from", raw.valid_from.as_deref())?;
            let expires_at = optional_timestamp("expires_at", raw.expires_at.as_deref())?;
            // Units without `valid_from` are valid from when they were granted.
            let start = valid_from.unwrap_or(occurred_at);
            if let Some(end) = expires_at {
                if end <= start {
                    return Err(format!(
                        "Field `expires_at` ({end}) must be after the start of validity \
                         ({start}: `valid_from`, or `occurred_at` without it)."
                    ));
                }
            }
            let source = raw.source.map(grant_source).transpose()?;
            CommandBody::EntitlementGranted {
                product: product("product", raw.product.as_deref())?,
                units: grant_units(raw.quantity, raw.unlimited)?,
                valid_from: Some(start),
                expires_at,
                source,
            }
        }
        InputKind::TransferRequested => {
            let product = product("product", raw.product.as_deref())?;
            let quantity = quantity(raw.quantity)?;
            if !product.is_seat() && quantity.get() != 1 {
                return Err(format!(
                    "A module moves one unit at a time; field `quantity` must be 1, not {}.",
                    quantity.get()
                ));
            }
            let workspace_id = workspace(&raw)?;
            let actor = raw
                .requested_by
                .ok_or("Field `requested_by` is required: the person making the transfer.")?;
            identifier("requested_by.user_id", &actor.user_id, EventId::parse)?;
            if actor.role.is_empty() || actor.role.chars().count() > 64 {
                return Err("Field `requested_by.role` must be 1 to 64 characters.".into());
            }
            storable_text("requested_by.role", &actor.role)?;
            CommandBody::TransferRequested {
                workspace_id,
                product,
                quantity,
                requested_by: Actor {
                    user_id: actor.user_id,
                    role: actor.role,
                },
            }
        }
        InputKind::EntitlementRevoked => CommandBody::EntitlementRevoked {
            target: revocation_target(raw.grant_id, raw.source, raw.product, raw.quantity)?,
            reason: raw
                .reason
                .map(|reason| {
                    bounded_text("reason", &reason)?;
                    Ok::<_, String>(reason)
                })
                .transpose()?,
        },
        InputKind::WorkspaceUpdated => {
            let workspace_id = workspace(&raw)?;
            if let Some(name) = &raw.name {
                free_text("name", name)?;
            }
            let starts_at = optional_timestamp("starts_at", raw.starts_at.as_deref())?;
            let ends_at = optional_timestamp("ends_at", raw.ends_at.as_deref())?;
            if let (Some(start), Some(end)) = (starts_at, ends_at) {
                if end <= start {
                    return Err(format!(
                        "Field `ends_at` ({}) must be after `starts_at` ({}): a workspace \
                         ends after it starts.",
                        end.to_rfc3339(),
                        start.to_rfc3339()
                    ));
                }
            }
            CommandBody::WorkspaceUpdated {
                workspace_id,
                name: raw.name,
                starts_at,
                ends_at,
                archived: raw.archived.unwrap_or(false),
            }
        }
        InputKind::ProductDefined => {
            unreachable!("decode_definition() decodes the catalogue's inputs")
        }
    };
    Ok(Command {
        event_id,
        occurred_at,
        org_id,
        body,
    })
}

/// A `product-defined` (rule 14): a handle, a name of 1 to 256 characters, a description
/// of at most 2,000, and for a module only, an assignment.
fn decode_definition(mut value: serde_json::Value) -> Result<ProductDefined, String> {
    let Some(object) = value.as_object_mut() else {
        return Err("The message is JSON but not an object.".into());
    };
    let fields = fields_of(InputKind::ProductDefined);
    object.retain(|key, _| {
        matches!(key.as_str(), "event_id" | "occurred_at") || fields.contains(&key.as_str())
    });
    let raw: RawDefinition = serde_json::from_value(value)
        .map_err(|error| format!("The message does not match its schema: {error}."))?;
    let product = product("product", Some(&raw.product))?;
    free_text("name", &raw.name)?;
    if let Some(description) = &raw.description {
        if description.chars().count() > DESCRIPTION_LENGTH_MAX {
            return Err(format!(
                "Field `description` must be at most {DESCRIPTION_LENGTH_MAX} characters."
            ));
        }
        storable_text("description", description)?;
    }
    let assignment = raw
        .assignment
        .map(|assignment| {
            Assignment::parse(&assignment).ok_or_else(|| {
                format!(
                    "Field `assignment` must be \"automatic\" or \"manual\", not {assignment:?}."
                )
            })
        })
        .transpose()?;
    if product.is_seat() && assignment.is_some() {
        return Err(
            "Field `assignment` is not allowed for `seat`: seats always move from the \
                    pool by themselves, so only modules take an assignment."
                .into(),
        );
    }
    Ok(ProductDefined {
        event_id: identifier("event_id", &raw.event_id, EventId::parse)?,
        occurred_at: timestamp("occurred_at", &raw.occurred_at)?,
        product,
        name: raw.name,
        description: raw.description,
        assignment,
    })
}

/// A grant's `source`: a known kind and a reference of 1 to 256 characters.
fn grant_source(source: RawSource) -> Result<GrantSource, String> {
    if !SOURCE_KINDS.contains(&source.kind.as_str()) {
        return Err(format!(
            "Field `source.kind` must be one of {SOURCE_KINDS:?}, not {:?}.",
            source.kind
        ));
    }
    free_text("source.reference", &source.reference)?;
    Ok(GrantSource {
        kind: source.kind,
        reference: source.reference,
    })
}

/// What a revocation names (rule 11): exactly one of `grant_id` (with an optional
/// `quantity`) or `source` (with an optional `product`).
fn revocation_target(
    grant_id: Option<String>,
    source: Option<RawSource>,
    product_handle: Option<String>,
    units: Option<i64>,
) -> Result<RevocationTarget, String> {
    match (grant_id, source) {
        (Some(_), Some(_)) => Err(
            "Fields `grant_id` and `source` are exclusive: a revocation \
                                   names one grant or one source, not both."
                .into(),
        ),
        (None, None) => Err(
            "A revocation names what it removes: field `grant_id` (one grant) \
                             or field `source` (every grant of a source) is required."
                .into(),
        ),
        (Some(grant_id), None) => {
            if product_handle.is_some() {
                return Err("Field `product` goes with `source` only: a grant named by \
                            `grant_id` already has its product."
                    .into());
            }
            Ok(RevocationTarget::Grant {
                grant_id: identifier("grant_id", &grant_id, EventId::parse)?,
                quantity: units.map(|units| quantity(Some(units))).transpose()?,
            })
        }
        (None, Some(source)) => {
            if units.is_some() {
                return Err(
                    "Field `quantity` goes with `grant_id` only: a revocation of a \
                            source removes every unit its grants have left."
                        .into(),
                );
            }
            Ok(RevocationTarget::Source {
                source: grant_source(source)?,
                product: product_handle
                    .map(|handle| product("product", Some(&handle)))
                    .transpose()?,
            })
        }
    }
}

fn required<'a>(field: &str, value: Option<&'a str>) -> Result<&'a str, String> {
    value.ok_or_else(|| format!("Field `{field}` is required."))
}

fn identifier<T>(
    field: &str,
    value: &str,
    parse: fn(&str) -> Result<T, IdError>,
) -> Result<T, String> {
    parse(value).map_err(|error| format!("Field `{field}` {error}."))
}

fn product(field: &str, value: Option<&str>) -> Result<Product, String> {
    let value = required(field, value)?;
    Product::parse(value).map_err(|error| format!("Field `{field}` ({value:?}) {error}."))
}

/// Rule 12: a grant has exactly one of `quantity` or `"unlimited": true`.
fn grant_units(units: Option<i64>, unlimited: Option<bool>) -> Result<GrantUnits, String> {
    match (units, unlimited.unwrap_or(false)) {
        (Some(_), true) => Err(
            "Fields `quantity` and `\"unlimited\": true` are exclusive: an \
                                unlimited grant has no quantity."
                .into(),
        ),
        (None, true) => Ok(GrantUnits::Unlimited),
        (units, false) => {
            if units.is_none() {
                return Err(
                    "Field `quantity` is required, or `\"unlimited\": true` for a \
                            grant without a limit."
                        .into(),
                );
            }
            quantity(units).map(GrantUnits::Counted)
        }
    }
}

fn quantity(value: Option<i64>) -> Result<Quantity, String> {
    let value = value.ok_or("Field `quantity` is required.")?;
    Quantity::parse(value).map_err(|error| format!("Field `quantity` {error}."))
}

fn free_text(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.chars().count() > FREE_TEXT_LENGTH_MAX {
        return Err(format!(
            "Field `{field}` must be 1 to {FREE_TEXT_LENGTH_MAX} characters."
        ));
    }
    storable_text(field, value)
}

/// Text of at most [`FREE_TEXT_LENGTH_MAX`] characters, possibly empty.
fn bounded_text(field: &str, value: &str) -> Result<(), String> {
    if value.chars().count() > FREE_TEXT_LENGTH_MAX {
        return Err(format!(
            "Field `{field}` must be at most {FREE_TEXT_LENGTH_MAX} characters."
        ));
    }
    storable_text(field, value)
}

/// PostgreSQL's text refuses the NUL character: a field that holds one could never be
/// stored, so it is refused here, with the rest of the message.
fn storable_text(field: &str, value: &str) -> Result<(), String> {
    if value.contains('\0') {
        return Err(format!(
            "Field `{field}` contains the NUL character (U+0000), which text cannot hold."
        ));
    }
    Ok(())
}

fn timestamp(field: &str, value: &str) -> Result<DateTime<Utc>, String> {
    let parsed = DateTime::parse_from_rfc3339(value)
        .map_err(|error| format!("Field `{field}` ({value:?}) is not an RFC 3339 time: {error}."))?
        .with_timezone(&Utc);
    if !(YEAR_MIN..=YEAR_MAX).contains(&parsed.year()) {
        return Err(format!(
            "Field `{field}` ({value:?}) is outside the years {YEAR_MIN} to {YEAR_MAX}."
        ));
    }
    Ok(parsed.trunc_subsecs(SUBSECOND_DIGITS))
}

fn optional_timestamp(field: &str, value: Option<&str>) -> Result<Option<DateTime<Utc>>, String> {
    value.map(|value| timestamp(field, value)).transpose()
}

/// A message on `entitlement-shortfalls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertMessage {
    pub alert_id: Uuid,
    pub status: String,
    pub org_id: String,
    pub workspace_id: String,
    pub product: String,
    pub required: i64,
    pub allocated: i64,
    pub missing: i64,
    pub opened_at: DateTime<Utc>,
    pub occurred_at: DateTime<Utc>,
    pub caused_by: String,
}

impl From<&Alert> for AlertMessage {
    fn from(alert: &Alert) -> Self {
        Self {
            alert_id: alert_id(&alert.workspace_id, &alert.product, alert.revision),
            status: alert.status.as_str().to_owned(),
            org_id: alert.org_id.to_string(),
            workspace_id: alert.workspace_id.to_string(),
            product: alert.product.to_string(),
            required: alert.required,
            allocated: alert.allocated,
            missing: alert.missing,
            opened_at: alert.opened_at,
            occurred_at: alert.occurred_at,
            caused_by: alert.caused_by.to_string(),
        }
    }
}

/// A message on `entitlement-pool-warnings` (rule 15). A `low` warning carries
/// `available` and `threshold`; an `expiring` one `grant_id`, `units` and `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolWarningMessage {
    pub warning_id: Uuid,
    pub status: String,
    pub kind: String,
    pub org_id: String,
    pub product: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    pub opened_at: DateTime<Utc>,
    pub occurred_at: DateTime<Utc>,
    pub caused_by: String,
}

/// What a pool warning says, for people: `9 left, warns at 10 or fewer`, or `20 units of
/// g-1 in the pool, expiring 2027-01-31T00:00:00Z`.
pub fn warning_numbers(
    available: Option<i64>,
    threshold: Option<i64>,
    grant_id: Option<&str>,
    units: Option<i64>,
    expires_at: Option<DateTime<Utc>>,
) -> String {
    match (available, threshold, units) {
        (Some(available), Some(threshold), _) => {
            format!("{available} left, warns at {threshold} or fewer")
        }
        (_, _, Some(units)) => format!(
            "{units} units of {} in the pool, expiring {}",
            grant_id.unwrap_or("?"),
            expires_at
                .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default()
        ),
        _ => String::new(),
    }
}

impl From<&PoolWarning> for PoolWarningMessage {
    fn from(warning: &PoolWarning) -> Self {
        let (available, threshold, units, expires_at) = match warning.numbers {
            WarningNumbers::Low {
                available,
                threshold,
            } => (Some(available), Some(threshold), None, None),
            WarningNumbers::Expiring { units, expires_at } => {
                (None, None, Some(units), Some(expires_at))
            }
        };
        Self {
            warning_id: warning.key.warning_id(warning.revision),
            status: warning.status.as_str().to_owned(),
            kind: warning.key.kind().to_owned(),
            org_id: warning.key.org_id.to_string(),
            product: warning.key.product.to_string(),
            available,
            threshold,
            grant_id: warning.key.grant_id.as_ref().map(ToString::to_string),
            units,
            expires_at,
            opened_at: warning.opened_at,
            occurred_at: warning.occurred_at,
            caused_by: warning.caused_by.to_string(),
        }
    }
}

/// A message on `entitlement-state`: the whole new state of one key, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StateMessage {
    Workspace(WorkspaceStateMessage),
    Pool(PoolStateMessage),
}

/// The state of one workspace's consumption of one product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceStateMessage {
    pub state_id: Uuid,
    pub org_id: String,
    pub workspace_id: String,
    pub product: String,
    pub required: i64,
    pub allocated: i64,
    pub missing: i64,
    /// The workspace's name (rule 13); null until one is set.
    pub name: Option<String>,
    /// Whether the workspace is live (rule 13): not archived, and its `ends_at` not past.
    pub live: bool,
    pub version: i64,
    pub updated_at: DateTime<Utc>,
    pub caused_by: String,
}

/// The state of one organization's pool of one product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStateMessage {
    pub state_id: Uuid,
    pub org_id: String,
    pub product: String,
    /// Counted units in the pool now.
    pub available: i64,
    /// Counted units of grants not valid yet.
    pub pending: i64,
    /// An unlimited grant of the product is valid now (rule 12).
    pub unlimited: bool,
    pub granted: i64,
    pub transferred: i64,
    pub expired: i64,
    pub revoked: i64,
    pub version: i64,
    pub updated_at: DateTime<Utc>,
    pub caused_by: String,
}

impl StateMessage {
    /// The message of `change`; `name` and `live` are those of its workspace (rule 13).
    pub fn new(change: &StateChange, name: Option<&str>, live: bool) -> Self {
        let state_id = change.key.state_id(change.version);
        let caused_by = change.caused_by.to_string();
        match (&change.key, &change.body) {
            (
                StateKey::Workspace {
                    org_id,
                    workspace_id,
                    product,
                },
                StateBody::Workspace(counts),
            ) => StateMessage::Workspace(WorkspaceStateMessage {
                state_id,
                org_id: org_id.to_string(),
                workspace_id: workspace_id.to_string(),
                product: product.to_string(),
                required: counts.required,
                allocated: counts.allocated,
                missing: counts.missing(),
                name: name.map(str::to_owned),
                live,
                version: change.version,
                updated_at: change.updated_at,
                caused_by,
            }),
            (StateKey::Pool { org_id, product }, StateBody::Pool(state)) => {
                StateMessage::Pool(PoolStateMessage {
                    state_id,
                    org_id: org_id.to_string(),
                    product: product.to_string(),
                    available: state.available,
                    pending: state.pending,
                    unlimited: state.unlimited,
                    granted: state.granted,
                    transferred: state.transferred,
                    expired: state.expired,
                    revoked: state.revoked,
                    version: change.version,
                    updated_at: change.updated_at,
                    caused_by,
                })
            }
            _ => unreachable!("a state change's body matches its key"),
        }
    }
}

/// A message on `entitlement-ledger`; its fields are the ledger's columns of the same
/// names, so the outbox reads it from a ledger row as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct LedgerMessage {
    pub entry_id: Uuid,
    pub sequence: i64,
    pub org_id: String,
    pub product: String,
    pub kind: String,
    pub quantity: i64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub workspace_id: Option<String>,
    pub pool_available_after: i64,
    pub caused_by: String,
    /// The grant whose units moved, for `grant`, `expiry` and `revocation` entries.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grant_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub actor: Option<String>,
    /// Rule 12: present (true) on the entries of an unlimited grant and on the transfers
    /// that drew on one; their quantity is not counted in `pool_available_after`.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub unlimited: bool,
    pub recorded_at: DateTime<Utc>,
}

/// The stable id of an organization's ledger entry.
pub fn entry_id(org_id: &OrgId, sequence: i64) -> Uuid {
    Uuid::new_v5(
        &ID_NAMESPACE,
        format!("ledger/{}/{sequence}", org_id.as_str()).as_bytes(),
    )
}

impl From<&LedgerEntry> for LedgerMessage {
    fn from(entry: &LedgerEntry) -> Self {
        Self {
            entry_id: entry_id(&entry.org_id, entry.sequence),
            sequence: entry.sequence,
            org_id: entry.org_id.to_string(),
            product: entry.product.to_string(),
            kind: entry.kind.as_str().to_owned(),
            quantity: entry.quantity,
            workspace_id: entry.workspace_id.as_ref().map(ToString::to_string),
            pool_available_after: entry.pool_available_after,
            caused_by: entry.caused_by.to_string(),
            grant_id: entry.grant_id.as_ref().map(ToString::to_string),
            actor: entry.actor.clone(),
            unlimited: entry.unlimited,
            recorded_at: entry.recorded_at,
        }
    }
}

/// A message on `entitlement-dlq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterMessage {
    pub dlq_id: Uuid,
    pub reason: String,
    pub detail: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The organization the message names, when it names a valid one; also the key.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub org_id: Option<String>,
    /// The original bytes, whole up to [`DEAD_LETTER_PAYLOAD_BYTES_MAX`], then cut.
    pub payload: String,
    pub payload_encoding: String,
    /// The size of the original bytes, whether or not `payload` holds them all.
    pub payload_bytes: usize,
    /// Whether `payload` holds only the first [`DEAD_LETTER_PAYLOAD_BYTES_MAX`] bytes.
    pub payload_truncated: bool,
    /// SHA-256 of the original bytes, in hexadecimal: names the input when it was cut.
    pub payload_sha256: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub event_id: Option<String>,
    pub rejected_at: DateTime<Utc>,
}

impl DeadLetterMessage {
    /// The dead-letter record of the message at (`topic`, `partition`, `offset`); its id is
    /// derived from that position, so a re-run yields the same id.
    pub fn new(
        topic: &str,
        partition: i32,
        offset: i64,
        payload: Option<&[u8]>,
        rejection: &Rejection,
        rejected_at: DateTime<Utc>,
    ) -> Self {
        let bytes = payload.unwrap_or_default();
        let kept = &bytes[..bytes.len().min(DEAD_LETTER_PAYLOAD_BYTES_MAX)];
        // A cut in the middle of a character leaves a few bytes that are not UTF-8: the
        // text up to the last whole character is kept rather than all of it in base64.
        let text = match std::str::from_utf8(kept) {
            Ok(text) => Some(text),
            Err(error) if kept.len() < bytes.len() && error.error_len().is_none() => {
                std::str::from_utf8(&kept[..error.valid_up_to()]).ok()
            }
            Err(_) => None,
        };
        let (payload, payload_encoding) = match text {
            Some(text) => (text.to_owned(), "utf8"),
            None => (
                base64::engine::general_purpose::STANDARD.encode(kept),
                "base64",
            ),
        };
        Self {
            dlq_id: Uuid::new_v5(
                &ID_NAMESPACE,
                format!("dlq/{topic}/{partition}/{offset}").as_bytes(),
            ),
            reason: rejection.reason.to_owned(),
            detail: rejection.detail.clone(),
            topic: topic.to_owned(),
            partition,
            offset,
            org_id: rejection.org_id.clone(),
            payload,
            payload_encoding: payload_encoding.to_owned(),
            payload_bytes: bytes.len(),
            payload_truncated: kept.len() < bytes.len(),
            payload_sha256: hex(&Sha256::digest(bytes)),
            event_id: rejection.event_id.clone(),
            rejected_at,
        }
    }
}

/// The most of a rejected input a dead letter keeps once the broker refused the whole
/// letter as too large (its limit can be set below the producer's).
const SHORTENED_PAYLOAD_LENGTH_MAX: usize = 4096;

/// A shorter copy of the dead letter `letter` (its JSON), keeping at most
/// [`SHORTENED_PAYLOAD_LENGTH_MAX`] characters of the input and saying so; `None` when it
/// is not a dead letter or is already that short.
pub fn shorten_dead_letter(letter: &[u8]) -> Option<Vec<u8>> {
    let mut letter: DeadLetterMessage = serde_json::from_slice(letter).ok()?;
    let (cut, _) = letter
        .payload
        .char_indices()
        .nth(SHORTENED_PAYLOAD_LENGTH_MAX)?;
    letter.payload.truncate(cut);
    if letter.payload_encoding == "base64" {
        // Whole groups of four characters stay decodable.
        letter.payload.truncate(cut - cut % 4);
    }
    letter.payload_truncated = true;
    letter.detail = bounded_detail(format!(
        "{} (The copy of the input was cut to {SHORTENED_PAYLOAD_LENGTH_MAX} characters: the \
         broker refused the whole letter as too large.)",
        letter.detail
    ));
    serde_json::to_vec(&letter).ok()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut text, byte| {
            let _ = write!(text, "{byte:02x}");
            text
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(kind: InputKind, payload: &[u8]) -> &'static str {
        decode(kind, Some(payload)).unwrap_err().reason
    }

    #[test]
    fn a_participant_added_event_decodes_and_ignores_unknown_fields() {
        let command = decode(
            InputKind::ParticipantAdded,
            Some(br#"{"event_id":"e1","occurred_at":"2026-11-23T09:00:00+01:00","org_id":"acme","workspace_id":"summit","participant_id":"p1","extra":{"x":1}}"#),
        )
        .unwrap();
        assert_eq!(command.event_id().as_str(), "e1");
        assert_eq!(
            command.occurred_at().to_rfc3339(),
            "2026-11-23T08:00:00+00:00"
        );
    }

    #[test]
    fn bad_bytes_get_the_reason_a_reader_needs() {
        let kind = InputKind::ParticipantAdded;
        assert_eq!(reason(kind, b"not json"), "invalid_json");
        assert_eq!(reason(kind, b"{\"event_id\": \xff}"), "invalid_encoding");
        assert_eq!(reason(kind, b"[1,2]"), "schema_violation");
        assert_eq!(reason(kind, b"{}"), "schema_violation");
        let mut huge = br#"{"event_id":"e1","pad":""#.to_vec();
        huge.resize(MESSAGE_BYTES_MAX + 1, b'x');
        assert_eq!(reason(kind, &huge), "too_large");
        assert_eq!(
            decode(kind, None).unwrap_err().reason,
            "invalid_json",
            "a message without a payload"
        );
    }

    #[test]
    fn fields_out_of_range_are_schema_violations_with_the_event_id() {
        let rejection = decode(
            InputKind::EntitlementGranted,
            Some(br#"{"event_id":"g1","occurred_at":"2026-11-23T09:00:00Z","org_id":"acme","product":"seat","quantity":0}"#),
        )
        .unwrap_err();
        assert_eq!(rejection.reason, "schema_violation");
        assert_eq!(rejection.event_id.as_deref(), Some("g1"));
        assert!(
            rejection.detail.contains("quantity"),
            "{}",
            rejection.detail
        );
        for payload in [
            r#"{"event_id":"g1","occurred_at":"2026-11-23T09:00:00Z","org_id":"acme","product":"Seat!","quantity":1}"#,
            r#"{"event_id":"g1","occurred_at":"10000-01-01T00:00:00Z","org_id":"acme","product":"seat","quantity":1}"#,
            r#"{"event_id":"g1","occurred_at":"2026-11-23T09:00:00Z","org_id":"acme","product":"seat","quantity":1,"valid_from":"2026-12-01T00:00:00Z","expires_at":"2026-11-01T00:00:00Z"}"#,
            r#"{"event_id":"g1","occurred_at":"2026-11-23T09:00:00Z","org_id":"acme","product":"seat","quantity":1,"source":{"kind":"gift","reference":"x"}}"#,
            r#"{"event_id":"g1","occurred_at":"2026-11-23T09:00:00Z","org_id":"acme","product":"seat","quantity":1,"expires_at":"2026-11-23T08:00:00Z"}"#,
        ] {
            assert_eq!(
                reason(InputKind::EntitlementGranted, payload.as_bytes()),
                "schema_violation",
                "{payload}"
            );
        }
        assert_eq!(
            reason(
                InputKind::ModuleEnabled,
                br#"{"event_id":"m1","occurred_at":"2026-11-23T09:00:00Z","org_id":"acme","workspace_id":"w","module":"seat"}"#
            ),
            "schema_violation"
        );
        assert_eq!(
            reason(
                InputKind::TransferRequested,
                br#"{"event_id":"t1","occurred_at":"2026-11-23T09:00:00Z","org_id":"acme","workspace_id":"w","product":"gamification","quantity":2,"requested_by":{"user_id":"u","role":"entitlement_manager"}}"#
            ),
            "schema_violation"
        );
    }

    /// An `entitlement-revoked` from `acme` with these fields besides its envelope.
    fn revocation(fields: &str) -> Result<Input, Rejection> {
        let payload = format!(
            r#"{{"event_id":"r1","occurred_at":"2026-12-01T00:00:00Z","org_id":"acme",{fields}}}"#
        );
        decode(InputKind::EntitlementRevoked, Some(payload.as_bytes()))
    }

    fn revoked(fields: &str) -> (RevocationTarget, Option<String>) {
        match revocation(fields).unwrap() {
            Input::Command(Command {
                body: CommandBody::EntitlementRevoked { target, reason },
                ..
            }) => (target, reason),
            other => panic!("not a revocation: {other:?}"),
        }
    }

    #[test]
    fn a_revocation_names_one_grant_or_every_grant_of_a_source() {
        let (target, reason) = revoked(r#""grant_id":"g1","quantity":200,"reason":"Refund.""#);
        assert_eq!(
            target,
            RevocationTarget::Grant {
                grant_id: EventId::parse("g1").unwrap(),
                quantity: Some(Quantity::parse(200).unwrap()),
            }
        );
        assert_eq!(reason.as_deref(), Some("Refund."));

        let (target, reason) = revoked(r#""grant_id":"g1","workspace_id":["not","this"]"#);
        assert_eq!(
            target,
            RevocationTarget::Grant {
                grant_id: EventId::parse("g1").unwrap(),
                quantity: None,
            },
            "without a quantity, all that is left; fields of other inputs are ignored"
        );
        assert_eq!(reason, None);

        let plan = GrantSource {
            kind: "plan".into(),
            reference: "plan-pro".into(),
        };
        let (target, _) =
            revoked(r#""source":{"kind":"plan","reference":"plan-pro"},"product":"live-stream""#);
        assert_eq!(
            target,
            RevocationTarget::Source {
                source: plan.clone(),
                product: Some(Product::parse("live-stream").unwrap()),
            }
        );
        let (target, _) = revoked(r#""source":{"kind":"plan","reference":"plan-pro"}"#);
        assert_eq!(
            target,
            RevocationTarget::Source {
                source: plan,
                product: None,
            },
            "without a product, every product of the source"
        );

        // 256 characters, 512 bytes: the limit counts characters.
        let longest = "é".repeat(256);
        let (_, reason) = revoked(&format!(r#""grant_id":"g1","reason":"{longest}""#));
        assert_eq!(reason, Some(longest));
    }

    #[test]
    fn a_revocation_that_names_the_wrong_things_is_refused_saying_why() {
        let source = r#""source":{"kind":"add_on","reference":"order-42"}"#;
        let too_long = format!(r#""grant_id":"g1","reason":"{}""#, "x".repeat(257));
        for (fields, expected) in [
            (
                format!(r#""grant_id":"g1",{source}"#),
                "Fields `grant_id` and `source` are exclusive",
            ),
            (
                r#""reason":"Everything.""#.to_owned(),
                "field `grant_id` (one grant) or field `source` (every grant of a source) is required",
            ),
            (
                format!(r#"{source},"quantity":2"#),
                "Field `quantity` goes with `grant_id` only",
            ),
            (
                r#""grant_id":"g1","product":"seat""#.to_owned(),
                "Field `product` goes with `source` only",
            ),
            (too_long, "Field `reason` must be at most 256 characters."),
            (
                r#""grant_id":"g1","quantity":0"#.to_owned(),
                "Field `quantity` must be between 1 and 1000000, not 0.",
            ),
        ] {
            let rejection = revocation(&fields).unwrap_err();
            assert_eq!(rejection.reason, "schema_violation", "{fields}");
            assert!(
                rejection.detail.contains(expected),
                "{fields}: {}",
                rejection.detail
            );
            assert_eq!(rejection.event_id.as_deref(), Some("r1"));
            assert_eq!(rejection.org_id.as_deref(), Some("acme"));
        }
    }

    /// A `product-defined` with these fields besides its envelope.
    fn definition(fields: &str) -> Result<Input, Rejection> {
        let payload =
            format!(r#"{{"event_id":"d1","occurred_at":"2026-12-03T09:00:00Z",{fields}}}"#);
        decode(InputKind::ProductDefined, Some(payload.as_bytes()))
    }

    fn defined(fields: &str) -> ProductDefined {
        match definition(fields).unwrap() {
            Input::ProductDefined(definition) => definition,
            other => panic!("not a definition: {other:?}"),
        }
    }

    #[test]
    fn a_product_definition_names_the_product_and_for_a_module_its_assignment() {
        let module = defined(
            r#""product":"live-stream","name":"Live streaming","description":"Broadcast.","assignment":"automatic""#,
        );
        assert_eq!(module.product.as_str(), "live-stream");
        assert_eq!(module.name, "Live streaming");
        assert_eq!(module.description.as_deref(), Some("Broadcast."));
        assert_eq!(module.assignment, Some(Assignment::Automatic));
        assert_eq!(
            defined(r#""product":"polls","name":"Polls","assignment":"manual""#).assignment,
            Some(Assignment::Manual)
        );

        // The catalogue names no organization: an `org_id` is a field it does not have.
        let seat = defined(r#""product":"seat","name":"Seat","org_id":["not","this"]"#);
        assert_eq!((seat.assignment, seat.description), (None, None));

        // 256 and 2,000 characters, twice as many bytes: the limits count characters.
        let name = "é".repeat(256);
        let description = "é".repeat(2000);
        let longest = defined(&format!(
            r#""product":"polls","name":"{name}","description":"{description}""#
        ));
        assert_eq!(
            (longest.name, longest.description),
            (name, Some(description))
        );
    }

    #[test]
    fn a_product_definition_that_breaks_the_catalogue_rules_is_refused_saying_why() {
        for (fields, expected) in [
            (
                r#""product":"seat","name":"Seat","assignment":"automatic""#.to_owned(),
                "Field `assignment` is not allowed for `seat`: seats always move from the pool by themselves",
            ),
            (
                r#""product":"polls","name":"Polls","assignment":"sometimes""#.to_owned(),
                r#"Field `assignment` must be "automatic" or "manual", not "sometimes"."#,
            ),
            (
                r#""product":"polls","name":"""#.to_owned(),
                "Field `name` must be 1 to 256 characters.",
            ),
            (
                format!(r#""product":"polls","name":"{}""#, "n".repeat(257)),
                "Field `name` must be 1 to 256 characters.",
            ),
            (
                format!(
                    r#""product":"polls","name":"Polls","description":"{}""#,
                    "d".repeat(2001)
                ),
                "Field `description` must be at most 2000 characters.",
            ),
            (
                r#""product":"polls","name":"Po\u0000lls""#.to_owned(),
                "Field `name` contains the NUL character",
            ),
            (
                r#""product":"polls""#.to_owned(),
                "missing field `name`",
            ),
            (
                r#""product":"Polls","name":"Polls""#.to_owned(),
                "Field `product` (\"Polls\") is not a product handle",
            ),
        ] {
            let rejection = definition(&format!(r#"{fields},"org_id":"acme""#)).unwrap_err();
            assert_eq!(rejection.reason, "schema_violation", "{fields}");
            assert!(
                rejection.detail.contains(expected),
                "{fields}: {}",
                rejection.detail
            );
            assert_eq!(rejection.event_id.as_deref(), Some("d1"));
            assert_eq!(
                rejection.org_id, None,
                "a catalogue input's dead letter has no organization to be keyed by"
            );
        }
    }

    /// A `workspace-updated` from `acme` of `summit` with these fields besides its envelope.
    fn workspace_update(fields: &str) -> Result<Input, Rejection> {
        let payload = format!(
            r#"{{"event_id":"w1","occurred_at":"2026-12-04T09:00:00Z","org_id":"acme","workspace_id":"summit"{fields}}}"#
        );
        decode(InputKind::WorkspaceUpdated, Some(payload.as_bytes()))
    }

    #[test]
    fn a_workspace_update_carries_the_workspaces_whole_life() {
        let life = |fields: &str| match workspace_update(fields).unwrap() {
            Input::Command(Command {
                body:
                    CommandBody::WorkspaceUpdated {
                        workspace_id,
                        name,
                        starts_at,
                        ends_at,
                        archived,
                    },
                ..
            }) => {
                assert_eq!(workspace_id.as_str(), "summit");
                (name, starts_at, ends_at, archived)
            }
            other => panic!("not a workspace update: {other:?}"),
        };
        let time = |text: &str| text.parse::<DateTime<Utc>>().unwrap();
        assert_eq!(
            life(
                r#","name":"Summit 2026","starts_at":"2027-03-01T08:00:00Z","ends_at":"2027-03-03T18:00:00+01:00","archived":true"#
            ),
            (
                Some("Summit 2026".to_owned()),
                Some(time("2027-03-01T08:00:00Z")),
                Some(time("2027-03-03T17:00:00Z")),
                true
            )
        );
        assert_eq!(
            life(r#","product":["not","this"],"quantity":"x""#),
            (None, None, None, false),
            "without its optional fields nothing is set and it is not archived; fields of \
             other inputs are ignored"
        );
        // 256 characters, 512 bytes: the limit counts characters.
        let longest = "é".repeat(256);
        assert_eq!(life(&format!(r#","name":"{longest}""#)).0, Some(longest));
    }

    #[test]
    fn a_workspace_update_that_breaks_the_rules_is_refused_saying_why() {
        for (fields, expected) in [
            (
                r#","starts_at":"2027-03-03T00:00:00Z","ends_at":"2027-03-01T00:00:00Z""#
                    .to_owned(),
                "Field `ends_at` (2027-03-01T00:00:00+00:00) must be after `starts_at` \
                 (2027-03-03T00:00:00+00:00): a workspace ends after it starts.",
            ),
            (
                r#","starts_at":"2027-03-01T00:00:00Z","ends_at":"2027-03-01T01:00:00+01:00""#
                    .to_owned(),
                "must be after `starts_at`",
            ),
            (
                r#","name":"""#.to_owned(),
                "Field `name` must be 1 to 256 characters.",
            ),
            (
                format!(r#","name":"{}""#, "n".repeat(257)),
                "Field `name` must be 1 to 256 characters.",
            ),
            (
                r#","name":"Sum\u0000mit""#.to_owned(),
                "Field `name` contains the NUL character",
            ),
            (r#","name":2026"#.to_owned(), "invalid type"),
            (r#","archived":"yes""#.to_owned(), "invalid type"),
            (
                r#","ends_at":"next friday""#.to_owned(),
                "Field `ends_at` (\"next friday\") is not an RFC 3339 time",
            ),
            (
                r#","starts_at":"0001-01-01T00:00:00Z""#.to_owned(),
                "Field `starts_at` (\"0001-01-01T00:00:00Z\") is outside the years",
            ),
        ] {
            let rejection = workspace_update(&fields).unwrap_err();
            assert_eq!(rejection.reason, "schema_violation", "{fields}");
            assert!(
                rejection.detail.contains(expected),
                "{fields}: {}",
                rejection.detail
            );
            assert_eq!(rejection.event_id.as_deref(), Some("w1"));
            assert_eq!(rejection.org_id.as_deref(), Some("acme"));
        }
        let without_workspace = br#"{"event_id":"w1","occurred_at":"2026-12-04T09:00:00Z","org_id":"acme","name":"Summit"}"#;
        let rejection = decode(InputKind::WorkspaceUpdated, Some(without_workspace)).unwrap_err();
        assert!(
            rejection
                .detail
                .contains("Field `workspace_id` is required."),
            "{}",
            rejection.detail
        );
    }

    #[test]
    fn a_grant_has_a_quantity_or_is_unlimited_never_both() {
        let grant = |fields: &str| {
            let payload = format!(
                r#"{{"event_id":"g1","occurred_at":"2026-01-01T09:00:00Z","org_id":"acme","product":"seat",{fields}}}"#
            );
            decode(InputKind::EntitlementGranted, Some(payload.as_bytes()))
        };
        let units = |fields: &str| match grant(fields).unwrap() {
            Input::Command(Command {
                body: CommandBody::EntitlementGranted { units, .. },
                ..
            }) => units,
            other => panic!("{other:?}"),
        };
        assert_eq!(units(r#""unlimited":true"#), GrantUnits::Unlimited);
        assert_eq!(
            units(r#""quantity":5,"unlimited":false"#),
            GrantUnits::Counted(Quantity::parse(5).unwrap())
        );
        for (fields, expected) in [
            (
                r#""unlimited":true,"quantity":5000"#,
                "an unlimited grant has no quantity",
            ),
            (r#""unlimited":false"#, "Field `quantity` is required"),
            (r#""source":null"#, "Field `quantity` is required"),
            (r#""unlimited":"yes""#, "does not match its schema"),
        ] {
            let rejection = grant(fields).unwrap_err();
            assert_eq!(rejection.reason, "schema_violation", "{fields}");
            assert!(
                rejection.detail.contains(expected),
                "{fields}: {}",
                rejection.detail
            );
            assert_eq!(rejection.event_id.as_deref(), Some("g1"));
        }
    }

    #[test]
    fn a_dead_letter_refused_as_too_large_is_shortened_once_and_says_so() {
        let rejection = Rejection::new("invalid_json", "The message is not JSON.");
        for input in [vec![b'x'; 10_000], vec![0xff; 10_000]] {
            let letter = DeadLetterMessage::new("t", 0, 1, Some(&input), &rejection, Utc::now());
            let shorter = shorten_dead_letter(&serde_json::to_vec(&letter).unwrap())
                .expect("a long copy is shortened");
            let shorter: DeadLetterMessage = serde_json::from_slice(&shorter).unwrap();
            assert!(shorter.payload.chars().count() <= SHORTENED_PAYLOAD_LENGTH_MAX);
            assert!(shorter.payload_truncated);
            assert_eq!(shorter.payload_bytes, 10_000, "the original's size stays");
            assert_eq!(shorter.payload_sha256, letter.payload_sha256);
            assert_eq!(
                shorter.dlq_id, letter.dlq_id,
                "the same letter, not a new one"
            );
            assert!(shorter.detail.contains("too large"), "{}", shorter.detail);
            if shorter.payload_encoding == "base64" {
                let kept = base64::engine::general_purpose::STANDARD
                    .decode(&shorter.payload)
                    .expect("still decodable");
                assert!(input.starts_with(&kept));
            }
            let again = serde_json::to_vec(&shorter).unwrap();
            assert_eq!(shorten_dead_letter(&again), None, "already short");
        }
    }

    #[test]
    fn dead_letters_keep_non_utf8_payloads_as_base64_with_a_stable_id() {
        let rejection = Rejection::new("invalid_encoding", "x");
        let first = DeadLetterMessage::new("t", 1, 7, Some(b"\xff\x00"), &rejection, Utc::now());
        let again = DeadLetterMessage::new("t", 1, 7, Some(b"\xff\x00"), &rejection, Utc::now());
        assert_eq!(first.payload, "/wA=");
        assert_eq!(first.payload_encoding, "base64");
        assert_eq!(first.dlq_id, again.dlq_id);
    }
}
