//! The worker's first exchange with Kafka, before any lane starts: a metadata request
//! made with the worker's own client configuration (`kafka.brokers` and
//! `kafka.properties`), so that a configuration Kafka refuses stops the worker at once
//! with the reason instead of leaving lanes that retry for ever behind a `/healthz` 503.
//!
//! librdkafka never gives up on its own: a refused password or an untrusted certificate
//! is retried like a broker that is down, and reported only through the client's error
//! callback (`RD_KAFKA_RESP_ERR__AUTHENTICATION`, `__SSL`) and its log. What is decided
//! here:
//!
//! - an authentication failure (`__AUTHENTICATION`, or the broker's
//!   `SASL_AUTHENTICATION_FAILED`, `UNSUPPORTED_SASL_MECHANISM`, `ILLEGAL_SASL_STATE`)
//!   or a TLS failure (`__SSL`: the certificate could not be verified, the handshake was
//!   refused) fails at the first sight: retrying the same credentials or the same trust
//!   store cannot succeed. librdkafka reports a connection dropped during the handshake
//!   as a transport error, not `__SSL`, so a broker that restarts mid-handshake does not
//!   count as a TLS failure.
//! - a broker that does not answer (connection refused, an unknown name, a timeout) is
//!   waited for, as a broker still starting is normal: a warning every
//!   [`WARN_EVERY`] says so, and after [`PATIENCE`] the worker stops with an error naming
//!   `kafka.brokers` and librdkafka's last word, so that its supervisor shows the failure
//!   instead of a worker waiting unseen.
//!
//! Secrets never reach the messages: librdkafka's texts do not carry them, and every
//! value of a `*password*` or `*secret*` property is masked in them anyway.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, NoCustomPartitioner, Producer, ProducerContext};

use crate::settings::KafkaSettings;

/// How long the worker waits for a broker that does not answer before it stops.
pub const PATIENCE: Duration = Duration::from_secs(300);
/// How often the wait for a broker that does not answer is logged.
pub const WARN_EVERY: Duration = Duration::from_secs(30);
/// One metadata request's bound; the connection carries on between attempts.
const ATTEMPT: Duration = Duration::from_secs(1);
/// How long the error events are served after each attempt.
const DRAIN: Duration = Duration::from_millis(50);

/// Why the worker cannot start with its Kafka configuration.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "Kafka refused the worker's credentials (SASL authentication failed): check \
         kafka.properties.sasl.username and kafka.properties.sasl.password (and \
         sasl.mechanisms); librdkafka said: {detail}"
    )]
    Credentials { detail: String },
    #[error(
        "the TLS handshake with Kafka failed: check kafka.properties.ssl.ca.location (the CA \
         that signed the brokers' certificates) and that those certificates name the \
         addresses in kafka.brokers; librdkafka said: {detail}"
    )]
    Tls { detail: String },
    #[error(
        "Kafka at {brokers} did not answer within {} s: check kafka.brokers and that the \
         brokers are up; librdkafka said: {detail}",
        .waited.as_secs()
    )]
    Unreachable {
        brokers: String,
        waited: Duration,
        detail: String,
    },
    #[error("the Kafka client could not be made from kafka.brokers and kafka.properties: {0}")]
    Configuration(String),
}

/// What an error librdkafka reported says about starting at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Kafka refused the credentials or the SASL exchange.
    Credentials,
    /// The TLS handshake failed.
    Tls,
    /// Possibly transient (a broker down or starting): keep trying.
    Wait,
}

/// Sorts an error librdkafka reported into what retrying can and cannot fix.
pub fn verdict(code: RDKafkaErrorCode) -> Verdict {
    match code {
        RDKafkaErrorCode::Authentication
        | RDKafkaErrorCode::SaslAuthenticationFailed
        | RDKafkaErrorCode::UnsupportedSASLMechanism
        | RDKafkaErrorCode::IllegalSASLState => Verdict::Credentials,
        RDKafkaErrorCode::SSL => Verdict::Tls,
        _ => Verdict::Wait,
    }
}

/// Checks that Kafka accepts the worker's configuration: returns once a broker answered
/// a metadata request; fails at once on an authentication or TLS failure, and after
/// [`PATIENCE`] when no broker answered.
pub async fn check(settings: &KafkaSettings) -> Result<(), PreflightError> {
    check_within(settings, PATIENCE).await
}

/// [`check`], waiting at most `patience` for a broker that does not answer.
pub async fn check_within(
    settings: &KafkaSettings,
    patience: Duration,
) -> Result<(), PreflightError> {
    let secrets: Vec<String> = settings
        .properties
        .iter()
        .filter(|(key, value)| {
            let key = key.to_ascii_lowercase();
            (key.contains("password") || key.contains("secret")) && !value.is_empty()
        })
        .map(|(_, value)| value.clone())
        .collect();
    let mask = |text: &str| {
        secrets
            .iter()
            .fold(text.to_owned(), |text, secret| text.replace(secret, "***"))
    };
    let context = PreflightContext::default();
    let reported = context.reported.clone();
    let producer: BaseProducer<PreflightContext> = super::client_config(settings)
        .set("client.id", "entitlement-worker-preflight")
        .create_with_context(context)
        .map_err(|error| PreflightError::Configuration(mask(&error.to_string())))?;
    let producer = Arc::new(producer);
    let started = Instant::now();
    let mut warned = started;
    loop {
        let attempt = producer.clone();
        let answer = tokio::task::spawn_blocking(move || {
            let answer = attempt.client().fetch_metadata(None, ATTEMPT);
            // Serves the error events raised meanwhile (the context's `error`): all of
            // them, as one poll without a timeout serves one.
            attempt.poll(DRAIN);
            answer
        })
        .await
        .map_err(|error| PreflightError::Configuration(error.to_string()))?;
        let mut last = match answer {
            Ok(metadata) if !metadata.brokers().is_empty() => {
                tracing::info!(
                    brokers = metadata.brokers().len(),
                    "Kafka accepted the worker's connection."
                );
                return Ok(());
            }
            Ok(_) => "the metadata named no broker".to_owned(),
            Err(error) => mask(&error.to_string()),
        };
        let events = std::mem::take(&mut *reported.lock().expect("preflight lock"));
        for (code, reason) in events {
            let detail = mask(&reason);
            match verdict(code) {
                Verdict::Credentials => return Err(PreflightError::Credentials { detail }),
                Verdict::Tls => return Err(PreflightError::Tls { detail }),
                Verdict::Wait => last = detail,
            }
        }
        let waited = started.elapsed();
        if waited >= patience {
            return Err(PreflightError::Unreachable {
                brokers: settings.brokers.clone(),
                waited,
                detail: last,
            });
        }
        if warned.elapsed() >= WARN_EVERY {
            warned = Instant::now();
            tracing::warn!(
                brokers = %settings.brokers,
                waited_s = waited.as_secs(),
                patience_s = patience.as_secs(),
                last_error = %last,
                "Kafka does not answer yet; the worker waits for it before starting."
            );
        }
    }
}

/// Keeps the errors librdkafka reports, with their text, for [`check_within`] to judge.
#[derive(Default)]
struct PreflightContext {
    reported: Arc<Mutex<Vec<(RDKafkaErrorCode, String)>>>,
}

impl ClientContext for PreflightContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(code) = error.rdkafka_error_code() {
            self.reported
                .lock()
                .expect("preflight lock")
                .push((code, reason.to_owned()));
        }
    }
}

impl ProducerContext<NoCustomPartitioner> for PreflightContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Settings;

    #[test]
    fn refused_credentials_and_tls_failures_are_final_and_a_broker_down_is_waited_for() {
        for code in [
            RDKafkaErrorCode::Authentication,
            RDKafkaErrorCode::SaslAuthenticationFailed,
            RDKafkaErrorCode::UnsupportedSASLMechanism,
            RDKafkaErrorCode::IllegalSASLState,
        ] {
            assert_eq!(verdict(code), Verdict::Credentials, "{code:?}");
        }
        assert_eq!(verdict(RDKafkaErrorCode::SSL), Verdict::Tls);
        for code in [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::Resolve,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::OperationTimedOut,
        ] {
            assert_eq!(verdict(code), Verdict::Wait, "{code:?}");
        }
    }

    #[test]
    fn the_messages_say_what_to_check() {
        let credentials = PreflightError::Credentials {
            detail: "SASL authentication error: Authentication failed".into(),
        }
        .to_string();
        assert!(credentials
            .starts_with("Kafka refused the worker's credentials (SASL authentication failed)"));
        assert!(credentials.contains("kafka.properties.sasl.password"));
        let tls = PreflightError::Tls {
            detail: "certificate verify failed".into(),
        }
        .to_string();
        assert!(tls.contains("kafka.properties.ssl.ca.location"), "{tls}");
        let unreachable = PreflightError::Unreachable {
            brokers: "kafka:9092".into(),
            waited: Duration::from_secs(300),
            detail: "Connection refused".into(),
        }
        .to_string();
        assert!(
            unreachable.starts_with("Kafka at kafka:9092 did not answer within 300 s"),
            "{unreachable}"
        );
    }

    #[tokio::test]
    async fn a_broker_that_answers_passes() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        let mut settings = Settings::load(None).unwrap().kafka;
        settings.brokers = cluster.bootstrap_servers();
        check_within(&settings, Duration::from_secs(30))
            .await
            .expect("the mock broker answers");
    }

    #[tokio::test]
    async fn a_broker_nobody_listens_for_is_waited_for_then_named() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut settings = Settings::load(None).unwrap().kafka;
        settings.brokers = format!("127.0.0.1:{port}");
        settings
            .properties
            .insert("sasl.password".into(), "hunter2-secret".into());
        settings
            .properties
            .insert("security.protocol".into(), "SASL_PLAINTEXT".into());
        settings
            .properties
            .insert("sasl.mechanisms".into(), "SCRAM-SHA-512".into());
        settings
            .properties
            .insert("sasl.username".into(), "worker".into());
        let started = Instant::now();
        let error = check_within(&settings, Duration::from_secs(2))
            .await
            .expect_err("nobody answers");
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "waited for the broker first"
        );
        assert!(
            matches!(error, PreflightError::Unreachable { .. }),
            "{error}"
        );
        let message = error.to_string();
        assert!(message.contains(&settings.brokers), "{message}");
        assert!(!message.contains("hunter2-secret"), "{message}");
    }

    #[tokio::test]
    async fn a_configuration_librdkafka_refuses_fails_at_once() {
        let mut settings = Settings::load(None).unwrap().kafka;
        settings
            .properties
            .insert("ssl.ca.location".into(), "/nonexistent/ca.pem".into());
        settings
            .properties
            .insert("security.protocol".into(), "SSL".into());
        let error = check_within(&settings, Duration::from_secs(30))
            .await
            .expect_err("no such CA file");
        assert!(matches!(error, PreflightError::Configuration(_)), "{error}");
    }
}
