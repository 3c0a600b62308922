//! Topic administration, for the demo, the tests and first-time setup.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use crate::settings::{KafkaSettings, TopicSettings};

/// Creates every topic (the inputs and the outputs) with `partitions` partitions each; topics that exist are kept.
pub async fn create_topics(
    kafka: &KafkaSettings,
    topics: &TopicSettings,
    partitions: i32,
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = super::client_config(kafka).create()?;
    let names = topics.all();
    let new_topics: Vec<NewTopic> = names
        .iter()
        .map(|name| NewTopic::new(name, partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("topic {name} could not be created: {code}"),
        }
    }
    Ok(())
}
