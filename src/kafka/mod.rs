//! Kafka: the consumer (offsets from PostgreSQL), the outbox relay (an idempotent
//! producer) and topic administration.

pub mod admin;
pub mod consumer;
pub mod preflight;
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

#[cfg(test)]
mod tests {
    use crate::settings::Settings;

    #[test]
    fn tls_and_sasl_settings_from_the_configuration_reach_librdkafka() {
        let mut settings = Settings::load(None).unwrap();
        for (key, value) in [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", "SCRAM-SHA-512"),
            ("sasl.username", "worker"),
            ("sasl.password", "secret"),
            ("ssl.ca.location", "/etc/ssl/certs/ca.pem"),
        ] {
            settings.kafka.properties.insert(key.into(), value.into());
        }
        let config = super::client_config(&settings.kafka);
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("sasl.password"), Some("secret"));
        assert_eq!(config.get("ssl.ca.location"), Some("/etc/ssl/certs/ca.pem"));
        assert_eq!(config.get("bootstrap.servers"), Some("127.0.0.1:9092"));
    }

    #[test]
    fn lanes_heartbeat_often_and_always_below_the_session_timeout() {
        use super::consumer::heartbeat_interval_ms;
        assert_eq!(heartbeat_interval_ms(10_000), 1_000);
        assert_eq!(heartbeat_interval_ms(6_000), 1_000);
        assert_eq!(heartbeat_interval_ms(1_500), 500);
        for session in [3_u64, 4, 1_000, 2_999, 45_000] {
            let heartbeat = heartbeat_interval_ms(session);
            assert!((1..=1_000).contains(&heartbeat), "{session}: {heartbeat}");
            assert!(heartbeat < session, "{session}: {heartbeat}");
        }
    }

    #[test]
    fn offsets_a_lane_never_received_are_counted_and_nothing_else() {
        use super::consumer::Continuity;
        let mut continuity = Continuity::default();
        // Resumed at the stored offset 10: 10, 11 arrive, then 15 (12 to 14 skipped).
        continuity.resume("participant-added", 0, Some(10));
        assert_eq!(continuity.receive("participant-added", 0, 10), 0);
        assert_eq!(continuity.receive("participant-added", 0, 11), 0);
        assert_eq!(continuity.receive("participant-added", 0, 15), 3);
        assert_eq!(continuity.receive("participant-added", 0, 16), 0);
        // Resumed at 40, the first message is 45: the five before it never came.
        continuity.resume("module-enabled", 2, Some(40));
        assert_eq!(continuity.receive("module-enabled", 2, 45), 5);
        // A repeat (a seek back) is not a gap, and the mark follows it.
        assert_eq!(continuity.receive("module-enabled", 2, 41), 0);
        assert_eq!(continuity.receive("module-enabled", 2, 42), 0);
        // Partitions are apart; one resumed from auto.offset.reset starts where it starts.
        continuity.resume("participant-added", 1, None);
        assert_eq!(continuity.receive("participant-added", 1, 1_000), 0);
        assert_eq!(continuity.receive("participant-added", 1, 1_002), 1);
        // A revoked partition, assigned again later without a mark, starts afresh.
        continuity.forget("participant-added", 0);
        assert_eq!(continuity.receive("participant-added", 0, 500), 0);
        // Never assigned (a message before its assignment was seen): no mark, no gap.
        assert_eq!(continuity.receive("entitlement-granted", 0, 7), 0);
    }

    #[test]
    fn under_kip_848_the_broker_sets_the_heartbeat_and_the_session() {
        use super::consumer::{consumer_defaults, uses_classic_protocol};
        let mut settings = Settings::load(None).unwrap();
        assert!(uses_classic_protocol(&settings));
        let keys = |settings: &Settings| -> Vec<&'static str> {
            consumer_defaults(settings, 0)
                .into_iter()
                .map(|(key, _)| key)
                .collect()
        };
        assert!(keys(&settings).contains(&"heartbeat.interval.ms"));
        settings
            .kafka
            .properties
            .insert("group.protocol".into(), "CONSUMER".into());
        assert!(!uses_classic_protocol(&settings));
        assert!(!keys(&settings).contains(&"heartbeat.interval.ms"));
        settings
            .kafka
            .properties
            .insert("group.protocol".into(), "classic".into());
        assert!(uses_classic_protocol(&settings));
    }

    #[test]
    fn the_consumer_defaults_give_way_to_the_operators_properties() {
        use super::consumer::consumer_defaults;
        let mut settings = Settings::load(None).unwrap();
        settings.kafka.session_timeout_ms = 1_500;
        let defaults = consumer_defaults(&settings, 3);
        let value = |key: &str| {
            defaults
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, value)| value.clone())
        };
        assert_eq!(value("heartbeat.interval.ms").as_deref(), Some("500"));
        assert_eq!(
            value("client.id").as_deref(),
            Some("entitlement-worker-lane-3")
        );
        assert_eq!(value("queued.max.messages.kbytes").as_deref(), Some("2048"));
        assert_eq!(value("fetch.queue.backoff.ms").as_deref(), Some("20"));
        assert_eq!(value("fetch.min.bytes").as_deref(), Some("65536"));

        for key in ["heartbeat.interval.ms", "client.id", "fetch.max.bytes"] {
            settings.kafka.properties.insert(key.into(), "1".into());
        }
        let defaults = consumer_defaults(&settings, 3);
        let keys: Vec<&str> = defaults.iter().map(|(key, _)| *key).collect();
        assert_eq!(
            keys,
            [
                "fetch.wait.max.ms",
                "fetch.min.bytes",
                "queued.max.messages.kbytes",
                "fetch.queue.backoff.ms"
            ]
        );
    }
}
