//! Topic administration: `create-topics` makes every topic the worker reads and writes that
//! is missing, each with its settings (`entitlement-state` compacted); `run` checks at start
//! that they all exist, and names the missing ones.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{BaseProducer, Producer};

use crate::settings::{KafkaSettings, TopicSettings};

/// How long a metadata request, and the wait for new topics to be served, may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `create-topics` waits for every partition of the topics it made to have a leader.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The topic settings a topic is created with, beyond the broker's defaults.
pub fn topic_config(topics: &TopicSettings, name: &str) -> Vec<(&'static str, &'static str)> {
    if name == topics.state {
        // The latest message per key is the state: older ones may go.
        vec![("cleanup.policy", "compact")]
    } else {
        Vec::new()
    }
}

/// Creates the worker's topics that are missing, `partitions` partitions and
/// `replication` replicas each (-1: the broker's `num.partitions` and
/// `default.replication.factor`), and waits until the broker serves them. Returns the
/// names of the topics it made, in the order of [`TopicSettings::all`].
pub async fn create_topics(
    kafka: &KafkaSettings,
    topics: &TopicSettings,
    partitions: i32,
    replication: i32,
) -> anyhow::Result<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> = super::client_config(kafka).create()?;
    let names = topics.all();
    let configs: Vec<Vec<(&str, &str)>> = names
        .iter()
        .map(|name| topic_config(topics, name))
        .collect();
    let new_topics: Vec<NewTopic> = names
        .iter()
        .zip(&configs)
        .map(|(name, config)| {
            config.iter().fold(
                NewTopic::new(name, partitions, TopicReplication::Fixed(replication)),
                |topic, (key, value)| topic.set(key, value),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT));
    let mut created = Vec::new();
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("topic {name} could not be created: {code}"),
        }
    }
    let order = |name: &String| names.iter().position(|known| known == name);
    created.sort_by_key(order);
    wait_until_served(kafka, &created).await?;
    Ok(created)
}

/// The worker's topics the cluster does not have, in the order of [`TopicSettings::all`].
pub async fn missing_topics(
    kafka: &KafkaSettings,
    topics: &TopicSettings,
) -> anyhow::Result<Vec<String>> {
    let served = served_topics(kafka).await?;
    Ok(topics
        .all()
        .into_iter()
        .filter(|name| !served.iter().any(|(served, _)| served == name))
        .map(str::to_owned)
        .collect())
}

/// Waits until every topic of `names` is listed with every partition led: a topic just
/// created is not served at once.
async fn wait_until_served(kafka: &KafkaSettings, names: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let served = served_topics(kafka).await?;
        let waiting: Vec<&String> = names
            .iter()
            .filter(|name| {
                !served
                    .iter()
                    .any(|(served, ready)| served == *name && *ready)
            })
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < READY_TIMEOUT,
            "the broker did not serve the new topics {waiting:?} within {} s",
            READY_TIMEOUT.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every topic the cluster lists, and whether it has partitions, all with a leader.
async fn served_topics(kafka: &KafkaSettings) -> anyhow::Result<Vec<(String, bool)>> {
    let client: BaseProducer = super::client_config(kafka).create()?;
    tokio::task::spawn_blocking(move || {
        let metadata = client.client().fetch_metadata(None, METADATA_TIMEOUT)?;
        Ok(metadata
            .topics()
            .iter()
            .filter(|topic| topic.error().is_none())
            .map(|topic| {
                let partitions = topic.partitions();
                let ready = !partitions.is_empty()
                    && partitions
                        .iter()
                        .all(|partition| partition.leader() >= 0 && partition.error().is_none());
                (topic.name().to_owned(), ready)
            })
            .collect())
    })
    .await?
}
