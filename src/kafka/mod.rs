//! Kafka: the consumer (offsets from PostgreSQL), the outbox relay (an idempotent
//! producer) and topic administration.

pub mod admin;
pub mod consumer;
pub mod relay;

use rdkafka::ClientConfig;

use crate::settings::KafkaSettings;

/// The librdkafka configuration shared by every client: brokers plus the operator's extra
/// properties (TLS, SASL...).
pub fn client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.brokers);
    for (key, value) in &settings.properties {
        config.set(key, value);
    }
    config
}
