//! The operators' commands, run as the binary against real PostgreSQL with a known ledger
//! (and, for grant and transfer, a running worker on Apache Kafka).

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use chrono::Utc;
use entitlement_worker::codec::{decode, InputKind};
use entitlement_worker::domain::Policy;
use entitlement_worker::settings::Settings;
use entitlement_worker::store::{Inbound, Store};
use serde_json::{json, Value};

/// Runs `entitlement-worker ARGS` against `settings`' database and broker.
fn run(settings: &Settings, arguments: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_entitlement-worker"))
        .args(arguments)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(common::process::environment(settings, "127.0.0.1:0"))
        .output()
        .expect("the binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// acme: 10 seats and 1 gamification granted; summit gets 12 participants (10 seats move,
/// 2 missing), expo 3 (nothing left for it: 3 missing); summit enables gamification and
/// a manager moves it; expo enables gamification (missing: none left). globex: 4 seats.
async fn known_ledger() -> (Settings, Store) {
    let settings = common::settings("127.0.0.1:1");
    let store = Store::connect(&settings.database).await.unwrap();
    let at = "2026-01-01T09:00:00Z";
    let mut messages: Vec<(InputKind, Value)> = vec![
        (
            InputKind::EntitlementGranted,
            json!({"event_id": "g-seat", "occurred_at": at, "org_id": "acme", "product": "seat", "quantity": 10}),
        ),
        (
            InputKind::EntitlementGranted,
            json!({"event_id": "g-gam", "occurred_at": at, "org_id": "acme", "product": "gamification", "quantity": 1}),
        ),
        (
            InputKind::EntitlementGranted,
            json!({"event_id": "g-globex", "occurred_at": at, "org_id": "globex", "product": "seat", "quantity": 4}),
        ),
    ];
    for n in 0..12 {
        messages.push((InputKind::ParticipantAdded, json!({"event_id": format!("s-{n}"), "occurred_at": at, "org_id": "acme", "workspace_id": "summit", "participant_id": format!("p{n}")})));
    }
    for n in 0..3 {
        messages.push((InputKind::ParticipantAdded, json!({"event_id": format!("e-{n}"), "occurred_at": at, "org_id": "acme", "workspace_id": "expo", "participant_id": format!("p{n}")})));
    }
    messages.push((InputKind::ModuleEnabled, json!({"event_id": "m-1", "occurred_at": at, "org_id": "acme", "workspace_id": "summit", "module": "gamification"})));
    messages.push((InputKind::TransferRequested, json!({"event_id": "t-1", "occurred_at": at, "org_id": "acme", "workspace_id": "summit", "product": "gamification", "quantity": 1, "requested_by": {"user_id": "u-alice", "role": "entitlement_manager"}})));
    messages.push((InputKind::ModuleEnabled, json!({"event_id": "m-2", "occurred_at": at, "org_id": "acme", "workspace_id": "expo", "module": "gamification"})));
    // One message per batch, in order, as a worker would commit them.
    for (offset, (kind, body)) in messages.iter().enumerate() {
        let payload = body.to_string().into_bytes();
        let inbound = Inbound {
            topic: "inputs".into(),
            partition: 0,
            offset: offset as i64,
            decoded: decode(*kind, Some(&payload)),
            payload: Some(payload),
        };
        store
            .apply_batch(&[inbound], Policy::default(), Utc::now())
            .await
            .expect("the batch commits");
    }
    (settings, store)
}

#[tokio::test]
async fn report_history_and_verify_tell_the_story_of_a_known_ledger() {
    let (settings, _store) = known_ledger().await;

    let output = run(&settings, &["report", "--org", "acme", "--format", "json"]);
    assert!(output.status.success(), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        report["pools"],
        json!([
            {"product": "seat", "granted": 10, "transferred": 10, "expired": 0, "available": 0, "expiring_soon": 0, "pending": 0},
            {"product": "gamification", "granted": 1, "transferred": 1, "expired": 0, "available": 0, "expiring_soon": 0, "pending": 0},
        ])
    );
    let rows: Vec<(String, String, i64, i64, i64)> = report["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["workspace_id"].as_str().unwrap().to_owned(),
                row["product"].as_str().unwrap().to_owned(),
                row["required"].as_i64().unwrap(),
                row["allocated"].as_i64().unwrap(),
                row["missing"].as_i64().unwrap(),
            )
        })
        .collect();
    let row = |w: &str, p: &str, r, a, m| (w.to_owned(), p.to_owned(), r, a, m);
    assert_eq!(
        rows,
        [
            row("expo", "seat", 3, 0, 3),
            row("summit", "seat", 12, 10, 2),
            row("expo", "gamification", 1, 0, 1),
            row("summit", "gamification", 1, 1, 0),
        ],
        "missing first, most missing first"
    );
    assert_eq!(
        report["totals"],
        json!([
            {"product": "seat", "required": 15, "allocated": 10, "missing": 5, "workspaces_missing": 2},
            {"product": "gamification", "required": 2, "allocated": 1, "missing": 1, "workspaces_missing": 1},
        ])
    );
    let table = stdout(&run(&settings, &["report", "--org", "acme"]));
    let first_workspace_line = table
        .lines()
        .skip_while(|line| !line.starts_with("WORKSPACES"))
        .nth(2)
        .unwrap();
    assert!(
        first_workspace_line.starts_with("! expo"),
        "missing rows are marked and first:\n{table}"
    );

    // History: newest first, filtered, paged.
    let page = |extra: &[&str]| -> Vec<Value> {
        let mut arguments = vec!["history", "--org", "acme", "--format", "json"];
        arguments.extend_from_slice(extra);
        let output = run(&settings, &arguments);
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let all = page(&[]);
    let sequences: Vec<i64> = all
        .iter()
        .map(|e| e["sequence"].as_i64().unwrap())
        .collect();
    assert_eq!(
        sequences,
        (1..=sequences.len() as i64).rev().collect::<Vec<_>>()
    );
    let manual = page(&["--product", "gamification", "--workspace", "summit"]);
    assert_eq!(manual.len(), 1);
    assert_eq!(manual[0]["kind"], "manual_transfer");
    assert_eq!(manual[0]["actor"], "u-alice");
    let first_page = page(&["--limit", "2"]);
    let next = first_page[1]["sequence"].as_i64().unwrap().to_string();
    let second_page = page(&["--limit", "2", "--before", &next]);
    assert_eq!(
        second_page[0]["sequence"].as_i64().unwrap(),
        first_page[1]["sequence"].as_i64().unwrap() - 1
    );

    let output = run(&settings, &["verify"]);
    assert!(output.status.success(), "{}", stdout(&output));
    assert!(stdout(&output).contains("The ledger and the state agree."));
}

async fn superuser(settings: &Settings) -> sqlx::PgConnection {
    use sqlx::Connection as _;
    sqlx::PgConnection::connect(&settings.database.url)
        .await
        .unwrap()
}

#[tokio::test]
async fn verify_fails_on_a_ledger_row_changed_by_a_superuser() {
    let (settings, _store) = known_ledger().await;
    let mut connection = superuser(&settings).await;
    // Triggers (the append-only guard among them) do not fire for a replica session.
    sqlx::raw_sql(
        "SET session_replication_role = replica;
         UPDATE ledger SET quantity = quantity + 5 WHERE org_id = 'acme' AND kind = 'grant' AND product = 'seat';",
    )
    .execute(&mut connection)
    .await
    .unwrap();
    let output = run(&settings, &["verify"]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    let text = stdout(&output);
    assert!(
        text.contains("FAIL every entry's pool_available_after"),
        "{text}"
    );
    assert!(text.contains("MISMATCH"), "{text}");
}

#[tokio::test]
async fn verify_fails_on_a_ledger_row_deleted_with_the_guard_disabled() {
    let (settings, _store) = known_ledger().await;
    let mut connection = superuser(&settings).await;
    sqlx::raw_sql(
        "ALTER TABLE ledger DISABLE TRIGGER ledger_no_update_or_delete;
         DELETE FROM ledger WHERE org_id = 'acme' AND sequence = 3;
         ALTER TABLE ledger ENABLE TRIGGER ledger_no_update_or_delete;",
    )
    .execute(&mut connection)
    .await
    .unwrap();
    let output = run(&settings, &["verify", "--format", "json"]);
    assert_eq!(output.status.code(), Some(1));
    let verification: Value = serde_json::from_slice(&output.stdout).unwrap();
    let failed: Vec<&str> = verification["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|check| check["failure_count"].as_u64() > Some(0))
        .map(|check| check["name"].as_str().unwrap())
        .collect();
    assert!(
        failed
            .iter()
            .any(|name| name.starts_with("sequences start at 1")),
        "{failed:?}"
    );
}

#[tokio::test]
async fn verify_fails_on_a_pool_balance_edited_by_hand() {
    let (settings, _store) = known_ledger().await;
    let mut connection = superuser(&settings).await;
    sqlx::raw_sql(
        "UPDATE pools SET available = available + 3, granted_total = granted_total + 3
          WHERE org_id = 'globex' AND product = 'seat';",
    )
    .execute(&mut connection)
    .await
    .unwrap();
    let output = run(&settings, &["verify"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).contains("globex seat: stored available 7"));
}

#[tokio::test]
async fn commands_fail_clearly_on_bad_arguments_and_an_unreachable_database() {
    let (settings, _store) = known_ledger().await;
    let output = run(&settings, &["report", "--org", "nobody"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no organization \"nobody\""));
    let output = run(
        &settings,
        &["history", "--org", "acme", "--since", "yesterday"],
    );
    assert_eq!(output.status.code(), Some(2), "clap refuses bad arguments");
    assert!(String::from_utf8_lossy(&output.stderr).contains("RFC 3339"));
    let mut unreachable = settings.clone();
    unreachable.database.url = "postgres://postgres:postgres@127.0.0.1:1/entitlements".into();
    let output = run(&unreachable, &["verify"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("could not reach the database at postgres://postgres:***@127.0.0.1:1"),
        "{stderr}"
    );
    let output = run(
        &settings,
        &[
            "grant",
            "--org",
            "acme",
            "--product",
            "Seat!",
            "--quantity",
            "5",
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("the worker would refuse this request")
    );
}

/// A person's grant and transfers go through the running worker: a viewer is refused with
/// the dead-letter reason, the entitlement manager's transfer resolves the shortfall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_and_transfer_go_through_the_worker_and_print_its_answer() {
    let setup = common::e2e::Setup::new().await;
    let settings = &setup.settings;
    let mut worker = setup.start_worker();
    let output = run(
        settings,
        &[
            "grant",
            "--org",
            "acme",
            "--product",
            "gamification",
            "--quantity",
            "1",
            "--source-kind",
            "add_on",
            "--reference",
            "PO-7",
        ],
    );
    assert!(output.status.success(), "{output:?}");
    assert!(stdout(&output).contains("Published grant ops-"));
    let enable = json!({"event_id": "m-1", "occurred_at": "2026-01-01T09:00:00Z", "org_id": "acme", "workspace_id": "summit", "module": "gamification"});
    let event = common::stream::Event {
        kind: InputKind::ModuleEnabled,
        org: "acme".into(),
        body: enable,
    };
    common::stream::produce(settings, &[&event], common::stream::Keys::ByOrganization).await;
    setup.wait_until_done(2, &worker).await;

    let transfer = |user: &str, role: &str| {
        run(
            settings,
            &[
                "transfer",
                "--org",
                "acme",
                "--workspace",
                "summit",
                "--product",
                "gamification",
                "--as",
                user,
                "--role",
                role,
                "--timeout",
                "60",
            ],
        )
    };
    let refused = transfer("u-victor", "viewer");
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        stdout(&refused).contains("Refused (forbidden)"),
        "{}",
        stdout(&refused)
    );
    let done = transfer("u-alice", "entitlement_manager");
    assert!(done.status.success(), "{}", stdout(&done));
    assert!(
        stdout(&done).contains("1 gamification -> summit by u-alice; 0 left in the pool"),
        "{}",
        stdout(&done)
    );
    let report: Value = serde_json::from_slice(
        &run(settings, &["report", "--org", "acme", "--format", "json"]).stdout,
    )
    .unwrap();
    assert_eq!(report["totals"][0]["product"], "gamification");
    assert_eq!(report["totals"][0]["missing"], 0, "the shortfall resolved");
    assert!(worker.terminate(Duration::from_secs(30)).success());
    let output = run(settings, &["verify"]);
    assert!(output.status.success(), "{}", stdout(&output));
}
