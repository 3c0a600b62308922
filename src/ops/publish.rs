//! `entitlement-worker grant`, `revoke`, `transfer` and `define-product`: a person's change,
//! published as the input message the worker consumes, so it goes through the same single
//! path as the event platform's. `transfer` then waits for the worker's answer on the output
//! topics.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::{json, Value};

use crate::codec::{self, DeadLetterMessage, InputKind, LedgerMessage};
use crate::settings::Settings;

/// How long the broker may take to answer metadata and produce requests.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a published message landed.
#[derive(Debug, Clone)]
pub struct Published {
    pub event_id: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

pub struct GrantRequest {
    pub org_id: String,
    pub product: String,
    pub quantity: i64,
    pub valid_from: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    /// `manual` when absent and a reference is given.
    pub source_kind: Option<String>,
    pub source_reference: Option<String>,
    pub event_id: Option<String>,
}

/// What a revocation removes: one grant (at most `quantity` of its units) or every grant
/// of a source (of one product, when given).
pub enum RevokeTarget {
    Grant {
        grant_id: String,
        quantity: Option<i64>,
    },
    Source {
        kind: String,
        reference: String,
        product: Option<String>,
    },
}

pub struct RevokeRequest {
    pub org_id: String,
    pub target: RevokeTarget,
    pub reason: Option<String>,
    pub event_id: Option<String>,
}

/// A product's definition in the catalogue (rule 14).
pub struct DefineRequest {
    pub product: String,
    pub name: String,
    pub description: Option<String>,
    /// `automatic` or `manual`, for a module only; None: `modules.auto_assign` decides.
    pub assignment: Option<String>,
    pub event_id: Option<String>,
}

pub struct TransferRequest {
    pub org_id: String,
    pub workspace_id: String,
    pub product: String,
    pub quantity: i64,
    pub user_id: String,
    pub role: String,
    pub event_id: Option<String>,
}

/// What became of a transfer request.
#[derive(Debug)]
pub enum Outcome {
    Transferred(LedgerMessage),
    Refused(DeadLetterMessage),
}

fn new_event_id(given: Option<String>) -> String {
    given.unwrap_or_else(|| format!("ops-{}", uuid::Uuid::new_v4()))
}

/// Checks `message` the way the worker will, so a mistake is reported here and now
/// rather than as a dead letter later.
fn validated(kind: InputKind, message: &Value) -> anyhow::Result<Vec<u8>> {
    let bytes = serde_json::to_vec(message)?;
    codec::decode(kind, Some(&bytes)).map_err(|rejection| {
        anyhow::anyhow!("the worker would refuse this request: {}", rejection.detail)
    })?;
    Ok(bytes)
}

async fn publish(
    settings: &Settings,
    topic: &str,
    key: &str,
    payload: &[u8],
    event_id: String,
) -> anyhow::Result<Published> {
    let producer: FutureProducer = crate::kafka::client_config(&settings.kafka)
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "15000")
        .create()
        .context("could not create a Kafka producer")?;
    let delivery = producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload),
            BROKER_TIMEOUT,
        )
        .await
        .map_err(|(error, _)| {
            anyhow::anyhow!(
                "the broker at {} did not take the message: {error}",
                settings.kafka.brokers
            )
        })?;
    Ok(Published {
        event_id,
        topic: topic.to_owned(),
        partition: delivery.partition,
        offset: delivery.offset,
    })
}

/// Publishes an `entitlement-granted` message.
pub async fn grant(settings: &Settings, request: GrantRequest) -> anyhow::Result<Published> {
    let event_id = new_event_id(request.event_id);
    let mut message = json!({
        "event_id": event_id,
        "occurred_at": Utc::now().to_rfc3339(),
        "org_id": request.org_id,
        "product": request.product,
        "quantity": request.quantity,
    });
    if let Some(reference) = request.source_reference {
        let kind = request.source_kind.as_deref().unwrap_or("manual");
        message["source"] = json!({"kind": kind, "reference": reference});
    }
    if let Some(valid_from) = request.valid_from {
        message["valid_from"] = json!(valid_from.to_rfc3339());
    }
    if let Some(expires_at) = request.expires_at {
        message["expires_at"] = json!(expires_at.to_rfc3339());
    }
    let payload = validated(InputKind::EntitlementGranted, &message)?;
    publish(
        settings,
        &settings.topics.entitlement_granted,
        &request.org_id,
        &payload,
        event_id,
    )
    .await
}

/// Publishes an `entitlement-revoked` message.
pub async fn revoke(settings: &Settings, request: RevokeRequest) -> anyhow::Result<Published> {
    let event_id = new_event_id(request.event_id);
    let mut message = json!({
        "event_id": event_id,
        "occurred_at": Utc::now().to_rfc3339(),
        "org_id": request.org_id,
    });
    match request.target {
        RevokeTarget::Grant { grant_id, quantity } => {
            message["grant_id"] = json!(grant_id);
            if let Some(quantity) = quantity {
                message["quantity"] = json!(quantity);
            }
        }
        RevokeTarget::Source {
            kind,
            reference,
            product,
        } => {
            message["source"] = json!({"kind": kind, "reference": reference});
            if let Some(product) = product {
                message["product"] = json!(product);
            }
        }
    }
    if let Some(reason) = request.reason {
        message["reason"] = json!(reason);
    }
    let payload = validated(InputKind::EntitlementRevoked, &message)?;
    publish(
        settings,
        &settings.topics.entitlement_revoked,
        &request.org_id,
        &payload,
        event_id,
    )
    .await
}

/// Publishes a `product-defined` message. The catalogue belongs to no organization: the
/// message is keyed by the product, so that a product's definitions keep their order.
pub async fn define_product(
    settings: &Settings,
    request: DefineRequest,
) -> anyhow::Result<Published> {
    let event_id = new_event_id(request.event_id);
    let mut message = json!({
        "event_id": event_id,
        "occurred_at": Utc::now().to_rfc3339(),
        "product": request.product,
        "name": request.name,
    });
    if let Some(description) = request.description {
        message["description"] = json!(description);
    }
    if let Some(assignment) = request.assignment {
        message["assignment"] = json!(assignment);
    }
    let payload = validated(InputKind::ProductDefined, &message)?;
    publish(
        settings,
        &settings.topics.product_defined,
        &request.product,
        &payload,
        event_id,
    )
    .await
}

/// Publishes an `entitlement-transfer-requested` message and waits up to `wait` for the
/// worker's ledger entry or dead letter naming it.
pub async fn transfer(
    settings: &Settings,
    request: TransferRequest,
    wait: Duration,
) -> anyhow::Result<(Published, Option<Outcome>)> {
    let event_id = new_event_id(request.event_id);
    let message = json!({
        "event_id": event_id,
        "occurred_at": Utc::now().to_rfc3339(),
        "org_id": request.org_id,
        "workspace_id": request.workspace_id,
        "product": request.product,
        "quantity": request.quantity,
        "requested_by": {"user_id": request.user_id, "role": request.role},
    });
    let payload = validated(InputKind::TransferRequested, &message)?;
    // Listen from the outputs' current ends before publishing, so the answer can't slip by.
    let settings_for_listener = settings.clone();
    let listener =
        tokio::task::spawn_blocking(move || Listener::at_end(&settings_for_listener)).await??;
    let published = publish(
        settings,
        &settings.topics.transfer_requested,
        &request.org_id,
        &payload,
        event_id.clone(),
    )
    .await?;
    let outcome = tokio::task::spawn_blocking(move || listener.wait_for(&event_id, wait)).await??;
    Ok((published, outcome))
}

/// A reader of the ledger and dead-letter topics from where they end now.
struct Listener {
    consumer: BaseConsumer,
    ledger: String,
}

impl Listener {
    fn at_end(settings: &Settings) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = crate::kafka::client_config(&settings.kafka)
            .set(
                "group.id",
                format!("entitlement-ops-{}", uuid::Uuid::new_v4()),
            )
            .set("enable.auto.commit", "false")
            .create()
            .context("could not create a Kafka consumer")?;
        let mut assignment = TopicPartitionList::new();
        for topic in [&settings.topics.ledger, &settings.topics.dlq] {
            let metadata = consumer
                .fetch_metadata(Some(topic), BROKER_TIMEOUT)
                .with_context(|| {
                    format!("the broker at {} did not answer", settings.kafka.brokers)
                })?;
            let partitions = metadata
                .topics()
                .first()
                .map(|topic| topic.partitions().len())
                .unwrap_or(0);
            anyhow::ensure!(partitions > 0, "the topic {topic} does not exist");
            for partition in 0..partitions as i32 {
                let (_, high) = consumer.fetch_watermarks(topic, partition, BROKER_TIMEOUT)?;
                assignment.add_partition_offset(topic, partition, Offset::Offset(high))?;
            }
        }
        consumer.assign(&assignment)?;
        Ok(Self {
            consumer,
            ledger: settings.topics.ledger.clone(),
        })
    }

    fn wait_for(self, event_id: &str, wait: Duration) -> anyhow::Result<Option<Outcome>> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let Some(message) = self.consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = message?;
            let Some(payload) = message.payload() else {
                continue;
            };
            if message.topic() == self.ledger {
                if let Ok(entry) = serde_json::from_slice::<LedgerMessage>(payload) {
                    if entry.caused_by == event_id && entry.kind == "manual_transfer" {
                        return Ok(Some(Outcome::Transferred(entry)));
                    }
                }
            } else if let Ok(letter) = serde_json::from_slice::<DeadLetterMessage>(payload) {
                if letter.event_id.as_deref() == Some(event_id) {
                    return Ok(Some(Outcome::Refused(letter)));
                }
            }
        }
        Ok(None)
    }
}
