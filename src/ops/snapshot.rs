//! `entitlement-worker snapshot`: republishes the whole state on `entitlement-state`, for a
//! new consumer or after the topic was lost. The state is queued in the outbox a page at a
//! time under the organizations' locks (so it never lands behind a later change of a key),
//! then published by the relay: this process's own, or a running worker's, whichever holds
//! the relay lock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::kafka::relay::Relay;
use crate::settings::Settings;
use crate::store::Store;
use crate::telemetry::{Health, Metrics};

/// Organizations locked and queued per transaction.
const ORGANIZATIONS_PER_TRANSACTION: i64 = 100;
/// State messages per outbox row, and so the most held in memory at once.
const MESSAGES_PER_ROW: i64 = 5_000;
/// How often the wait for publication looks at the outbox.
const PUBLISH_POLL: Duration = Duration::from_millis(200);

/// What a snapshot did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub pools: u64,
    pub workspaces: u64,
    pub skipped: u64,
    /// Messages of the snapshot (and anything queued before it) still in the outbox when
    /// the wait ended: 0 when everything was published.
    pub unpublished: i64,
}

impl Summary {
    pub fn to_text(&self, topic: &str) -> String {
        let mut text = format!(
            "Queued the state of {} pools and {} workspace-products for {topic}.\n",
            self.pools, self.workspaces
        );
        if self.skipped > 0 {
            text.push_str(&format!(
                "{} keys name no cause (stored before causes were kept) and were not queued; \
                 their next change publishes them.\n",
                self.skipped
            ));
        }
        if self.unpublished == 0 {
            text.push_str("Every message was published.\n");
        } else {
            text.push_str(&format!(
                "{} messages still wait in the outbox: the relay publishes them once the \
                 broker takes them (a running worker's relay, or this command run again).\n",
                self.unpublished
            ));
        }
        text
    }
}

/// Queues the whole state and waits up to `wait` for it to be published.
pub async fn snapshot(
    settings: &Settings,
    wait: Duration,
    progress: bool,
) -> anyhow::Result<Summary> {
    let store = Store::connect(&settings.database).await?;
    let total = store.state_keys().await?;
    let bar = super::progress_bar(progress, total, "queueing", "states");
    let mut summary = Summary::default();
    let mut last_row = None;
    let mut after = String::new();
    loop {
        let orgs = store
            .organizations_after(&after, ORGANIZATIONS_PER_TRANSACTION)
            .await?;
        let Some(last) = orgs.last() else {
            break;
        };
        after = last.clone();
        let queued = store
            .queue_state_of(&orgs, MESSAGES_PER_ROW, |keys| bar.inc(keys))
            .await?;
        summary.pools += queued.pools;
        summary.workspaces += queued.workspaces;
        summary.skipped += queued.skipped;
        last_row = queued.last_row.or(last_row);
    }
    bar.finish_and_clear();
    let Some(last_row) = last_row else {
        return Ok(summary);
    };

    let stop = CancellationToken::new();
    let relay = Relay::new(
        settings,
        store.clone(),
        Metrics::new(),
        Health::new(Duration::from_secs(settings.metrics.stall_after_seconds)),
        Arc::new(tokio::sync::Notify::new()),
    )?;
    let relay = tokio::spawn(relay.run(stop.clone()));
    let queued = store.unpublished_up_to(last_row).await?;
    let bar = super::progress_bar(progress, queued.max(0) as u64, "publishing", "messages");
    let started = Instant::now();
    loop {
        let left = store.unpublished_up_to(last_row).await?;
        bar.set_position((queued - left).max(0) as u64);
        summary.unpublished = left;
        if left == 0 || started.elapsed() >= wait {
            break;
        }
        tokio::time::sleep(PUBLISH_POLL).await;
    }
    bar.finish_and_clear();
    stop.cancel();
    let _ = relay.await;
    Ok(summary)
}
