//! PostgreSQL: the only code that speaks SQL. Every statement is parameterised and
//! set-based: one statement per table per batch, with arrays and `UNNEST`.

mod apply;
mod load;
mod outbox;
mod snapshot;
mod write;

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

pub use apply::{BatchReport, Inbound, Stage};
pub use outbox::{Channel, OutboxMessage, OutboxRow, RowSources};
pub use snapshot::Queued;

use crate::settings::DatabaseSettings;

/// The migrations, embedded in the binary and applied at start.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or the transaction failed in a way worth retrying.
    #[error("the database is unavailable or busy: {0}")]
    Transient(#[source] sqlx::Error),
    /// Two workers claimed the same new workspace at once; the batch is applied again.
    #[error("workspace {0:?} was claimed by another worker at the same time")]
    ClaimRace(String),
    /// A batch that defines a module found an organization waiting for it that it had not
    /// locked (its shortfall opened meanwhile); the batch is applied again, locking it.
    #[error("organization {0:?} began waiting for a module while the batch defined it")]
    CatalogueRace(String),
    /// A constraint that mirrors a rule of the contract refused the batch: a bug.
    #[error("the database refused a change that breaks an invariant: {0}")]
    Invariant(#[source] sqlx::Error),
    /// The database refused a value the batch holds (a data exception: text it cannot
    /// keep, a time or number out of its range). The decoder is meant to refuse such
    /// input first; one that slips through is some message's doing, and retrying the same
    /// batch would fail the same way for ever.
    #[error("the database refused a value of the batch: {0}")]
    Data(#[source] sqlx::Error),
    /// A stored value no longer reads as what was written: the tables were edited by hand.
    #[error("the database holds a value the worker never wrote: {0}")]
    Corrupt(String),
    #[error("the migrations could not be applied: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Transient(_) | StoreError::ClaimRace(_) | StoreError::CatalogueRace(_)
        )
    }

    /// Whether the failure can be one message's doing, so that applying the batch without
    /// that message would succeed: the batch is then split to find it (rule 10).
    pub fn may_be_one_message(&self) -> bool {
        matches!(self, StoreError::Invariant(_) | StoreError::Data(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        // Integrity violations (class 23) and raised exceptions mean the code tried to
        // write something the contract forbids; data exceptions (class 22) mean a value
        // the database cannot hold. Neither goes away by retrying the same batch. Anything
        // else (connections, timeouts, serialization failures, shutdowns) is retried.
        let code = error
            .as_database_error()
            .and_then(|database| database.code().map(|code| code.into_owned()));
        match code.as_deref() {
            Some(code) if code.starts_with("23") || code == "42501" || code == "P0001" => {
                StoreError::Invariant(error)
            }
            Some(code) if code.starts_with("22") => StoreError::Data(error),
            _ => StoreError::Transient(error),
        }
    }
}

/// The handle every part of the worker shares.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    /// Whether batches publish their state changes on `entitlement-state`.
    publish_state: bool,
    /// The outbox rows this process committed and its relay has not taken yet.
    committed: std::sync::Arc<outbox::Committed>,
}

impl Store {
    /// Connects, creating the database if it is missing, and applies the migrations.
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(&settings.url)?
            .application_name("entitlement-worker")
            .options([(
                "statement_timeout",
                settings.statement_timeout_ms.to_string(),
            )]);
        create_database_if_missing(&options).await?;
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(Duration::from_secs(10))
            // A batch's statements grow the connection's buffers to a batch's size (about
            // 9 MiB for 5,000 messages), and a connection keeps them; as the lanes' batches
            // land on every pooled connection in turn, that was most of the worker's heap.
            // Handing them back when a connection returns to the pool bounds it by the
            // connections in use (docs/performance.md).
            .after_release(|connection, _| {
                Box::pin(async move {
                    connection.shrink_buffers();
                    Ok(true)
                })
            })
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self {
            pool,
            publish_state: true,
            committed: Default::default(),
        })
    }

    /// Turns the state messages on or off (`state.publish`); they are on by default. The
    /// per-key versions go on counting while they are off, so a `snapshot` afterwards
    /// gives a consumer every key's latest version.
    pub fn publishing_state(mut self, publish: bool) -> Self {
        self.publish_state = publish;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The next offset to consume per (topic, partition), for the partitions asked.
    pub async fn stored_offsets(
        &self,
        partitions: &[(String, i32)],
    ) -> Result<HashMap<(String, i32), i64>, StoreError> {
        let topics: Vec<&str> = partitions.iter().map(|(topic, _)| topic.as_str()).collect();
        let numbers: Vec<i32> = partitions.iter().map(|(_, partition)| *partition).collect();
        let rows: Vec<(String, i32, i64)> = sqlx::query_as(
            "SELECT o.topic, o.partition, o.next_offset
               FROM consumer_offsets o
               JOIN UNNEST($1::text[], $2::int[]) AS wanted (topic, partition)
                 ON wanted.topic = o.topic AND wanted.partition = o.partition",
        )
        .bind(&topics)
        .bind(&numbers)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(topic, partition, offset)| ((topic, partition), offset))
            .collect())
    }

    /// Open shortfalls across all organizations, for the gauge.
    pub async fn open_shortfalls(&self) -> Result<i64, StoreError> {
        let (count,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM consumption WHERE required > allocated")
                .fetch_one(&self.pool)
                .await?;
        Ok(count)
    }

    /// How many pool warnings are open now, per kind (`low`, `expiring`).
    pub async fn open_pool_warnings(&self) -> Result<[(&'static str, i64); 2], StoreError> {
        let counts: Vec<(String, i64)> =
            sqlx::query_as("SELECT kind, count(*) FROM pool_warnings WHERE open GROUP BY kind")
                .fetch_all(&self.pool)
                .await?;
        Ok(["low", "expiring"].map(|kind| {
            let open = counts
                .iter()
                .find(|(counted, _)| counted == kind)
                .map_or(0, |(_, open)| *open);
            (kind, open)
        }))
    }
}

/// Creates the database named in `options` when it does not exist yet, through the
/// server's `postgres` maintenance database.
async fn create_database_if_missing(options: &PgConnectOptions) -> Result<(), StoreError> {
    let name = options.get_database().unwrap_or("entitlements").to_owned();
    let mut maintenance = options.clone().database("postgres").connect().await?;
    let exists: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_optional(&mut maintenance)
        .await?;
    if exists.is_none() {
        // CREATE DATABASE takes no parameters; the name is quoted as an identifier.
        let statement = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        if let Err(error) = sqlx::query(&statement).execute(&mut maintenance).await {
            // Another instance may have created it between the check and now.
            let duplicate = error
                .as_database_error()
                .and_then(|database| database.code())
                .is_some_and(|code| code == "42P04");
            if !duplicate {
                return Err(error.into());
            }
        }
        tracing::info!(database = %name, "Created the database, which did not exist.");
    }
    maintenance.close().await?;
    Ok(())
}
