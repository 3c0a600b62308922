//! Typed configuration: `config/default.toml` (built into the binary), then the file named
//! by `--config`, then environment variables `ENTITLEMENTS__<SECTION>__<KEY>`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;

/// The defaults, compiled in so the binary runs from any directory.
const DEFAULT_TOML: &str = include_str!("../config/default.toml");
const ENVIRONMENT_PREFIX: &str = "ENTITLEMENTS";

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("the configuration could not be read: {0}")]
    Load(#[from] config::ConfigError),
    #[error("the configuration is invalid: {0}")]
    Invalid(String),
}

#[derive(Clone, Deserialize)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub database: DatabaseSettings,
    pub metrics: MetricsSettings,
    pub modules: ModuleSettings,
    pub topics: TopicSettings,
    pub input: InputSettings,
    pub batch: BatchSettings,
    pub clock: ClockSettings,
    pub outbox: OutboxSettings,
    pub state: StateSettings,
    pub warnings: WarningSettings,
    pub shutdown: ShutdownSettings,
    pub log: LogSettings,
}

#[derive(Clone, Deserialize)]
pub struct KafkaSettings {
    /// Bootstrap servers, `host:port` separated by commas.
    pub brokers: String,
    pub group_id: String,
    pub auto_offset_reset: String,
    pub session_timeout_ms: u64,
    /// Passed to librdkafka as they are (TLS, SASL, tuning). Values are never logged.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

#[derive(Clone, Deserialize)]
pub struct DatabaseSettings {
    /// Holds the password: printed only with it masked.
    pub url: String,
    pub max_connections: u32,
    pub statement_timeout_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct MetricsSettings {
    pub listen: String,
    /// `/healthz` answers 503 once a lane has held a batch it could not commit, or the
    /// relay messages the broker did not acknowledge, for longer than this.
    pub stall_after_seconds: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ModuleSettings {
    pub auto_assign: bool,
}

#[derive(Clone, Debug, Deserialize)]
pub struct TopicSettings {
    pub participant_added: String,
    pub participant_cancelled: String,
    pub module_enabled: String,
    pub entitlement_granted: String,
    pub transfer_requested: String,
    pub entitlement_revoked: String,
    pub workspace_updated: String,
    pub product_defined: String,
    pub shortfalls: String,
    pub ledger: String,
    pub dlq: String,
    /// The compacted topic of the current state (version 2).
    pub state: String,
    /// Pool warnings, `low` and `expiring` (version 2, rule 15).
    pub pool_warnings: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct StateSettings {
    /// Whether each batch publishes the new state of what it changed on `topics.state`.
    pub publish: bool,
}

/// The thresholds of pool warnings (rule 15).
#[derive(Clone, Debug, Deserialize)]
pub struct WarningSettings {
    /// `low` opens when a pool's available counted units fall to or below this percentage
    /// of the units of its valid counted grants ...
    pub low_percent: u32,
    /// ... or to or below this many units, whichever is larger.
    pub low_units: i64,
    /// `expiring` opens for a grant whose units still in the pool expire within this many
    /// days; 0 turns these warnings off.
    pub expiring_within_days: u32,
}

#[derive(Clone, Debug, Deserialize)]
pub struct InputSettings {
    /// How far ahead of the worker's clock an input's `occurred_at` may be; later ones are
    /// rejected as `clock_skew`.
    pub clock_skew_max_seconds: u32,
    /// Gaps in an input partition's offsets are normal (compacted input topics, or
    /// producers that write in transactions, whose commit markers take offsets): they are
    /// then not counted as skipped.
    pub offset_gaps_expected: bool,
}

impl InputSettings {
    /// The latest `occurred_at` accepted from a message received now.
    pub fn occurred_at_max(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> chrono::DateTime<chrono::Utc> {
        now + chrono::Duration::seconds(i64::from(self.clock_skew_max_seconds))
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct BatchSettings {
    pub max_messages: usize,
    /// A batch closes at this many bytes of input, and the queue ahead of a lane holds at
    /// most this many: a lane holds at most twice this, whatever the messages' sizes.
    pub max_bytes: usize,
    pub max_wait_ms: u64,
    /// Apply lanes running side by side: each is a member of the consumer group with its
    /// own consumer, batches and transactions.
    pub lanes: usize,
}

/// The most apply lanes one instance runs: each holds a database connection, and past a
/// few the cores, not the lanes, are the limit.
pub const LANES_MAX: usize = 16;

#[derive(Clone, Debug, Deserialize)]
pub struct ClockSettings {
    pub interval_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct OutboxSettings {
    pub batch_size: i64,
    pub poll_interval_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ShutdownSettings {
    pub timeout_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct LogSettings {
    pub format: String,
    pub level: String,
}

impl Settings {
    /// The rules' settings, as the domain core takes them.
    pub fn policy(&self) -> crate::domain::Policy {
        crate::domain::Policy {
            modules_auto_assign: self.modules.auto_assign,
            warnings: crate::domain::WarningThresholds {
                low_percent: self.warnings.low_percent,
                low_units: self.warnings.low_units,
                expiring_within: chrono::Duration::days(i64::from(
                    self.warnings.expiring_within_days,
                )),
            },
        }
    }

    /// The `ENTITLEMENTS__` environment variables that configure another process (a worker
    /// started by the tests or the benchmark) like `self`, for the keys those change.
    pub fn environment(&self) -> Vec<(String, String)> {
        let topics = &self.topics;
        [
            ("KAFKA__BROKERS", self.kafka.brokers.clone()),
            ("KAFKA__GROUP_ID", self.kafka.group_id.clone()),
            (
                "KAFKA__SESSION_TIMEOUT_MS",
                self.kafka.session_timeout_ms.to_string(),
            ),
            ("DATABASE__URL", self.database.url.clone()),
            ("METRICS__LISTEN", self.metrics.listen.clone()),
            (
                "METRICS__STALL_AFTER_SECONDS",
                self.metrics.stall_after_seconds.to_string(),
            ),
            ("MODULES__AUTO_ASSIGN", self.modules.auto_assign.to_string()),
            (
                "INPUT__CLOCK_SKEW_MAX_SECONDS",
                self.input.clock_skew_max_seconds.to_string(),
            ),
            (
                "INPUT__OFFSET_GAPS_EXPECTED",
                self.input.offset_gaps_expected.to_string(),
            ),
            ("BATCH__MAX_WAIT_MS", self.batch.max_wait_ms.to_string()),
            ("BATCH__MAX_MESSAGES", self.batch.max_messages.to_string()),
            ("BATCH__MAX_BYTES", self.batch.max_bytes.to_string()),
            ("BATCH__LANES", self.batch.lanes.to_string()),
            (
                "OUTBOX__POLL_INTERVAL_MS",
                self.outbox.poll_interval_ms.to_string(),
            ),
            ("LOG__FORMAT", self.log.format.clone()),
            (
                "TOPICS__PARTICIPANT_ADDED",
                topics.participant_added.clone(),
            ),
            (
                "TOPICS__PARTICIPANT_CANCELLED",
                topics.participant_cancelled.clone(),
            ),
            ("TOPICS__MODULE_ENABLED", topics.module_enabled.clone()),
            (
                "TOPICS__ENTITLEMENT_GRANTED",
                topics.entitlement_granted.clone(),
            ),
            (
                "TOPICS__TRANSFER_REQUESTED",
                topics.transfer_requested.clone(),
            ),
            (
                "TOPICS__ENTITLEMENT_REVOKED",
                topics.entitlement_revoked.clone(),
            ),
            (
                "TOPICS__WORKSPACE_UPDATED",
                topics.workspace_updated.clone(),
            ),
            ("TOPICS__PRODUCT_DEFINED", topics.product_defined.clone()),
            ("TOPICS__SHORTFALLS", topics.shortfalls.clone()),
            ("TOPICS__LEDGER", topics.ledger.clone()),
            ("TOPICS__DLQ", topics.dlq.clone()),
            ("TOPICS__STATE", topics.state.clone()),
            ("TOPICS__POOL_WARNINGS", topics.pool_warnings.clone()),
            ("STATE__PUBLISH", self.state.publish.to_string()),
            (
                "WARNINGS__LOW_PERCENT",
                self.warnings.low_percent.to_string(),
            ),
            ("WARNINGS__LOW_UNITS", self.warnings.low_units.to_string()),
            (
                "WARNINGS__EXPIRING_WITHIN_DAYS",
                self.warnings.expiring_within_days.to_string(),
            ),
        ]
        .into_iter()
        .map(|(key, value)| (format!("ENTITLEMENTS__{key}"), value))
        .collect()
    }

    /// Loads the layers in order; later layers win.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).required(true));
        }
        let settings: Settings = builder
            .add_source(
                config::Environment::with_prefix(ENVIRONMENT_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |message: String| Err(SettingsError::Invalid(message));
        if !["earliest", "latest"].contains(&self.kafka.auto_offset_reset.as_str()) {
            return invalid(format!(
                "kafka.auto_offset_reset must be \"earliest\" or \"latest\", not {:?}",
                self.kafka.auto_offset_reset
            ));
        }
        if !(1..=100_000).contains(&self.batch.max_messages) {
            return invalid("batch.max_messages must be between 1 and 100000".into());
        }
        // The smallest still holds one message of the broker's default size limit.
        if !(1 << 20..=1 << 30).contains(&self.batch.max_bytes) {
            return invalid(
                "batch.max_bytes must be between 1048576 (1 MiB) and 1073741824 (1 GiB)".into(),
            );
        }
        if !(1..=100_000).contains(&self.outbox.batch_size) {
            return invalid("outbox.batch_size must be between 1 and 100000".into());
        }
        if !["text", "json"].contains(&self.log.format.as_str()) {
            return invalid(format!(
                "log.format must be \"text\" or \"json\", not {:?}",
                self.log.format
            ));
        }
        if !(1..=LANES_MAX).contains(&self.batch.lanes) {
            return invalid(format!("batch.lanes must be between 1 and {LANES_MAX}"));
        }
        // One connection per lane, plus the relay's lock, the relay, the clock and the
        // gauges.
        let needed = self.batch.lanes as u32 + 4;
        if self.database.max_connections < needed {
            return invalid(format!(
                "database.max_connections must be at least batch.lanes + 4 = {needed}"
            ));
        }
        if self.warnings.low_percent > 100 {
            return invalid("warnings.low_percent must be between 0 and 100".into());
        }
        if self.warnings.low_units < 0 {
            return invalid("warnings.low_units must not be negative".into());
        }
        if self.warnings.expiring_within_days > 3650 {
            return invalid("warnings.expiring_within_days must be between 0 and 3650".into());
        }
        let mut names = self.topics.all();
        let count = names.len();
        names.sort();
        names.dedup();
        if names.len() != count || names.iter().any(|name| name.is_empty()) {
            return invalid("the topic names must be distinct and not empty".into());
        }
        Ok(())
    }
}

impl TopicSettings {
    /// The input topics with what each carries.
    pub fn inputs(&self) -> impl Iterator<Item = (crate::codec::InputKind, &str)> {
        use crate::codec::InputKind;
        [
            (InputKind::ParticipantAdded, self.participant_added.as_str()),
            (
                InputKind::ParticipantCancelled,
                self.participant_cancelled.as_str(),
            ),
            (InputKind::ModuleEnabled, self.module_enabled.as_str()),
            (
                InputKind::EntitlementGranted,
                self.entitlement_granted.as_str(),
            ),
            (
                InputKind::TransferRequested,
                self.transfer_requested.as_str(),
            ),
            (
                InputKind::EntitlementRevoked,
                self.entitlement_revoked.as_str(),
            ),
            (InputKind::WorkspaceUpdated, self.workspace_updated.as_str()),
            (InputKind::ProductDefined, self.product_defined.as_str()),
        ]
        .into_iter()
    }

    /// Appends `-suffix` to every name: topics of their own for a test or a
    /// benchmark phase on a shared broker.
    pub fn add_suffix(&mut self, suffix: &str) {
        for name in [
            &mut self.participant_added,
            &mut self.participant_cancelled,
            &mut self.module_enabled,
            &mut self.entitlement_granted,
            &mut self.transfer_requested,
            &mut self.entitlement_revoked,
            &mut self.workspace_updated,
            &mut self.product_defined,
            &mut self.shortfalls,
            &mut self.ledger,
            &mut self.dlq,
            &mut self.state,
            &mut self.pool_warnings,
        ] {
            name.push('-');
            name.push_str(suffix);
        }
    }

    /// Every topic name: the inputs, then shortfalls, ledger, dead letters, state and pool
    /// warnings.
    pub fn all(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.inputs().map(|(_, name)| name).collect();
        names.extend([
            self.shortfalls.as_str(),
            self.ledger.as_str(),
            self.dlq.as_str(),
            self.state.as_str(),
            self.pool_warnings.as_str(),
        ]);
        names
    }

    pub fn kind_of(&self, topic: &str) -> Option<crate::codec::InputKind> {
        self.inputs()
            .find(|(_, name)| *name == topic)
            .map(|(kind, _)| kind)
    }
}

/// Replaces the password of a connection URL with `***`: in the user part, and in a
/// `password` (or `sslpassword`) parameter of the query string, which libpq accepts too.
pub fn redact_url(url: &str) -> String {
    let (address, query) = match url.split_once('?') {
        Some((address, query)) => (address, Some(query)),
        None => (url, None),
    };
    let mut redacted = match address.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((credentials, host)) => {
                let user = credentials.split(':').next().unwrap_or_default();
                format!("{scheme}://{user}:***@{host}")
            }
            None => address.to_owned(),
        },
        None => return "***".to_owned(),
    };
    if let Some(query) = query {
        let parameters: Vec<String> = query
            .split('&')
            .map(|parameter| match parameter.split_once('=') {
                Some((name, _)) if name.to_ascii_lowercase().ends_with("password") => {
                    format!("{name}=***")
                }
                _ => parameter.to_owned(),
            })
            .collect();
        redacted.push('?');
        redacted.push_str(&parameters.join("&"));
    }
    redacted
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("auto_offset_reset", &self.auto_offset_reset)
            .field("session_timeout_ms", &self.session_timeout_ms)
            .field("properties", &self.properties.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl fmt::Debug for DatabaseSettings {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("DatabaseSettings")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .finish()
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Settings")
            .field("kafka", &self.kafka)
            .field("database", &self.database)
            .field("metrics", &self.metrics)
            .field("modules", &self.modules)
            .field("topics", &self.topics)
            .field("input", &self.input)
            .field("batch", &self.batch)
            .field("clock", &self.clock)
            .field("outbox", &self.outbox)
            .field("shutdown", &self.shutdown)
            .field("log", &self.log)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suffix_gives_every_topic_a_name_of_its_own() {
        let defaults = Settings::load(None).unwrap().topics;
        let mut topics = defaults.clone();
        topics.add_suffix("run-7");
        let (before, after) = (defaults.all(), topics.all());
        assert_eq!(after.len(), 13);
        for (old, new) in before.iter().zip(&after) {
            assert_eq!(*new, format!("{old}-run-7"));
        }
        assert_eq!(topics.kind_of(after[0]), defaults.kind_of(before[0]));
    }

    #[test]
    fn lanes_are_bounded_and_need_their_connections() {
        let mut settings = Settings::load(None).unwrap();
        assert_eq!(settings.batch.lanes, 2);
        settings.validate().unwrap();
        settings.batch.lanes = 0;
        assert!(
            matches!(settings.validate(), Err(SettingsError::Invalid(message)) if message.contains("batch.lanes"))
        );
        settings.batch.lanes = LANES_MAX + 1;
        assert!(settings.validate().is_err());
        settings.batch.lanes = 5;
        settings.database.max_connections = 8;
        let error = settings.validate().unwrap_err().to_string();
        assert!(
            error.contains("database.max_connections must be at least batch.lanes + 4 = 9"),
            "{error}"
        );
        settings.database.max_connections = 9;
        settings.validate().unwrap();
    }

    #[test]
    fn the_defaults_are_the_contract_defaults() {
        let settings = Settings::load(None).unwrap();
        assert_eq!(settings.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(settings.kafka.group_id, "entitlement-worker");
        assert_eq!(
            settings.database.url,
            "postgres://postgres:postgres@127.0.0.1:5432/entitlements"
        );
        assert_eq!(settings.metrics.listen, "127.0.0.1:9464");
        assert!(!settings.modules.auto_assign);
        assert_eq!(
            settings.topics.transfer_requested,
            "entitlement-transfer-requested"
        );
        assert_eq!(settings.topics.entitlement_revoked, "entitlement-revoked");
        assert_eq!(settings.topics.workspace_updated, "workspace-updated");
        assert_eq!(settings.topics.product_defined, "product-defined");
        assert_eq!(settings.topics.dlq, "entitlement-dlq");
        assert_eq!(settings.topics.state, "entitlement-state");
        assert_eq!(settings.topics.pool_warnings, "entitlement-pool-warnings");
        assert_eq!(
            (
                settings.warnings.low_percent,
                settings.warnings.low_units,
                settings.warnings.expiring_within_days
            ),
            (10, 0, 30)
        );
        assert_eq!(
            settings.policy().warnings,
            crate::domain::WarningThresholds::default()
        );
    }

    #[test]
    fn warning_thresholds_out_of_range_are_refused_by_name() {
        let defaults = Settings::load(None).unwrap();
        type Change = fn(&mut WarningSettings);
        let cases: [(Change, &str); 3] = [
            (|w| w.low_percent = 101, "warnings.low_percent"),
            (|w| w.low_units = -1, "warnings.low_units"),
            (
                |w| w.expiring_within_days = 5000,
                "warnings.expiring_within_days",
            ),
        ];
        for (change, named) in cases {
            let mut settings = defaults.clone();
            change(&mut settings.warnings);
            let error = settings.validate().err().map(|error| error.to_string());
            assert!(
                error.as_deref().is_some_and(|error| error.contains(named)),
                "{named}: {error:?}"
            );
        }
        assert!(defaults.validate().is_ok());
    }

    #[test]
    fn passwords_never_show_in_debug_output() {
        let settings = Settings::load(None).unwrap();
        let printed = format!("{settings:?}");
        assert!(printed.contains("postgres:***@127.0.0.1"), "{printed}");
        assert!(!printed.contains("postgres:postgres@"), "{printed}");
        assert_eq!(
            redact_url("postgres://u:s3cr3t@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(
            redact_url("postgres://h/db?user=u&password=s3cr3t&sslmode=require&sslpassword=k3y"),
            "postgres://h/db?user=u&password=***&sslmode=require&sslpassword=***"
        );
        assert_eq!(
            redact_url("postgres://u:s3cr3t@h/db?application_name=x"),
            "postgres://u:***@h/db?application_name=x"
        );
    }
}
