//! The `entitlement-worker` binary against `tansu`, a Kafka-protocol broker running as its
//! own process, and real PostgreSQL: configured by environment variables only, the way
//! users run it.

mod common;

use std::time::Duration;

use common::e2e::{Setup, DEADLINE};
use common::stream::{self, Keys};
use rand::seq::SliceRandom;

/// The worker killed with SIGKILL twice in the middle of the stream, started again each
/// time, ends with exactly the state and the ledger the events demand: nothing lost,
/// nothing doubled, no gap in a ledger sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_and_restarted_ends_as_if_it_never_crashed() {
    let setup = Setup::new().await;
    let scenario = stream::scenario(7, 20);
    let before = setup.deliver_setup(&scenario).await;
    let events: Vec<_> = scenario.events.iter().collect();
    let total = before + stream::produce(&setup.settings, &events, Keys::ByOrganization).await;

    let mut kills = Vec::new();
    let mut threshold = before as i64 + 1;
    for _ in 0..2 {
        let mut worker = setup.start_worker();
        let progress = setup.wait_for_progress(threshold, &worker).await;
        worker.kill();
        let at_kill = stream::applied(&setup.database).await;
        assert!(
            (at_kill as usize) < total,
            "killed mid-stream, not after the end ({at_kill} of {total} applied)"
        );
        kills.push(at_kill);
        threshold = progress + 1;
    }
    let mut worker = setup.start_worker();
    setup.wait_until_done(total, &worker).await;
    let status = worker.terminate(Duration::from_secs(30));
    assert!(status.success(), "SIGTERM exits 0: {status}");
    let ledger_entries = setup.check(&scenario).await;
    eprintln!(
        "{total} messages; killed after {kills:?} were applied; {ledger_entries} ledger entries"
    );
}

/// Every event delivered twice, shuffled across topics and keyed at random, ends in the
/// same state as one clean delivery; the worker answers /healthz and /metrics on the
/// address its environment gives it, and SIGTERM stops it with exit code 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_delivered_twice_shuffled_and_randomly_keyed_end_as_one_clean_delivery() {
    let setup = Setup::new().await;
    let scenario = stream::scenario(11, 1);
    let before = setup.deliver_setup(&scenario).await;
    let mut twice: Vec<_> = scenario.events.iter().chain(&scenario.events).collect();
    twice.shuffle(&mut rand::rng());
    let total = before + stream::produce(&setup.settings, &twice, Keys::Random).await;

    let mut worker = setup.start_worker();
    let (status, _) = common::eventually_or(
        "/healthz to answer 200",
        DEADLINE,
        || async { worker.get("/healthz").filter(|(status, _)| *status == 200) },
        || worker.tail_of_log(),
    )
    .await;
    assert_eq!(status, 200);
    setup.wait_until_done(total, &worker).await;
    setup.check(&scenario).await;

    let (_, metrics) = worker.get("/metrics").expect("/metrics answers");
    let consumed = common::metric_sum(&metrics, "entitlements_messages_consumed_total");
    assert_eq!(
        consumed as usize,
        total - before,
        "every message this worker consumed counted once"
    );
    let status = worker.terminate(Duration::from_secs(30));
    assert!(status.success(), "SIGTERM exits 0: {status}");
}
