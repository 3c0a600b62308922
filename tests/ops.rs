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
    apply_one_by_one(&store, "inputs", &messages).await;
    (settings, store)
}

/// Applies one message per batch, in order, as a worker would commit them.
async fn apply_one_by_one(store: &Store, topic: &str, messages: &[(InputKind, Value)]) {
    for (offset, (kind, body)) in messages.iter().enumerate() {
        let payload = body.to_string().into_bytes();
        let inbound = Inbound {
            topic: topic.into(),
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
}

/// The known ledger, and globex's seats revoked every way rule 11 allows: 1 of g-globex's
/// 4 (r-part); all of plan pro's g-plan (r-plan, by source); g-late, whose revocation
/// (r-early) came first; and a trial grant not valid yet, whose source revocation waits.
/// globex keeps 3 of its 12 seats: 9 revoked.
async fn ledger_with_revocations() -> (Settings, Store) {
    let (settings, store) = known_ledger().await;
    let grant = |id: &str, at: &str, quantity: i64, extra: Value| {
        let mut body = json!({"event_id": id, "occurred_at": at, "org_id": "globex", "product": "seat", "quantity": quantity});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        (InputKind::EntitlementGranted, body)
    };
    let revoke = |id: &str, at: &str, target: Value| {
        let mut body =
            json!({"event_id": id, "occurred_at": at, "org_id": "globex", "reason": "plan change"});
        body.as_object_mut()
            .unwrap()
            .extend(target.as_object().unwrap().clone());
        (InputKind::EntitlementRevoked, body)
    };
    let messages = [
        revoke(
            "r-part",
            "2026-01-01T09:10:00Z",
            json!({"grant_id": "g-globex", "quantity": 1}),
        ),
        grant(
            "g-plan",
            "2026-01-01T09:20:00Z",
            6,
            json!({"source": {"kind": "plan", "reference": "pro"}}),
        ),
        revoke(
            "r-plan",
            "2026-01-01T09:30:00Z",
            json!({"source": {"kind": "plan", "reference": "pro"}, "product": "seat"}),
        ),
        revoke(
            "r-early",
            "2026-01-01T09:40:00Z",
            json!({"grant_id": "g-late"}),
        ),
        grant("g-late", "2026-01-01T09:35:00Z", 2, json!({})),
        grant(
            "g-future",
            "2026-01-01T09:50:00Z",
            5,
            json!({"valid_from": "2099-01-01T00:00:00Z", "source": {"kind": "trial", "reference": "t-1"}}),
        ),
        revoke(
            "r-trial",
            "2026-01-01T10:00:00Z",
            json!({"source": {"kind": "trial", "reference": "t-1"}}),
        ),
    ];
    apply_one_by_one(&store, "more-inputs", &messages).await;
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
            {"product": "seat", "product_name": "seat", "granted": 10, "transferred": 10, "expired": 0, "revoked": 0, "available": 0, "unlimited": false, "expiring_soon": 0, "pending": 0},
            {"product": "gamification", "product_name": "gamification", "granted": 1, "transferred": 1, "expired": 0, "revoked": 0, "available": 0, "unlimited": false, "expiring_soon": 0, "pending": 0},
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
            {"product": "seat", "product_name": "seat", "required": 15, "allocated": 10, "missing": 5, "workspaces_missing": 2},
            {"product": "gamification", "product_name": "gamification", "required": 2, "allocated": 1, "missing": 1, "workspaces_missing": 1},
        ])
    );
    assert_eq!(report["products"], json!([]), "nothing was defined");
    let table = stdout(&run(&settings, &["report", "--org", "acme"]));
    let first_workspace_line = table
        .lines()
        .skip_while(|line| !line.starts_with("LIVE WORKSPACES"))
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

/// `report` tells, per pool, where its units came from: by source, what was granted, used,
/// revoked, expired and is left, unlimited grants on lines of their own; an unlimited pool
/// shows as unlimited.
#[tokio::test]
async fn report_shows_where_each_pools_units_came_from() {
    let (settings, store) = ledger_with_revocations().await;
    let at = "2026-01-01T11:00:00Z";
    let mut messages = vec![(
        InputKind::EntitlementGranted,
        json!({"event_id": "g-enterprise", "occurred_at": at, "org_id": "globex", "product": "seat", "unlimited": true, "source": {"kind": "plan", "reference": "enterprise"}}),
    )];
    for n in 0..7 {
        messages.push((InputKind::ParticipantAdded, json!({"event_id": format!("gx-{n}"), "occurred_at": at, "org_id": "globex", "workspace_id": "gx", "participant_id": format!("p{n}")})));
    }
    apply_one_by_one(&store, "unlimited-inputs", &messages).await;

    let output = run(
        &settings,
        &["report", "--org", "globex", "--format", "json"],
    );
    assert!(output.status.success(), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    // 4 + 6 + 2 counted seats valid (the trial's 5 are not yet), 9 of them revoked, the 7
    // participants on the unlimited plan.
    assert_eq!(
        report["pools"],
        json!([{"product": "seat", "product_name": "seat", "granted": 12, "transferred": 0, "expired": 0, "revoked": 9, "available": 3, "unlimited": true, "expiring_soon": 0, "pending": 5}])
    );
    let line = |source: &str, unlimited: bool, now: bool, counts: [i64; 6]| {
        json!({"product": "seat", "product_name": "seat", "source": source, "unlimited": unlimited, "unlimited_now": now,
               "granted": counts[0], "used": counts[1], "revoked": counts[2], "expired": counts[3],
               "available": counts[4], "pending": counts[5]})
    };
    assert_eq!(
        report["sources"],
        json!([
            line("none", false, false, [6, 0, 3, 0, 3, 0]),
            line("plan", false, false, [6, 0, 6, 0, 0, 0]),
            line("plan", true, true, [0, 7, 0, 0, 0, 0]),
            line("trial", false, false, [0, 0, 0, 0, 0, 5]),
        ])
    );
    let sum = |field: &str| -> i64 {
        report["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|line| line[field].as_i64().unwrap())
            .sum()
    };
    for (source_field, pool_field) in [
        ("granted", "granted"),
        ("revoked", "revoked"),
        ("expired", "expired"),
        ("available", "available"),
        ("pending", "pending"),
    ] {
        assert_eq!(
            sum(source_field),
            report["pools"][0][pool_field].as_i64().unwrap(),
            "the sources add up to the pool's {pool_field}"
        );
    }
    let table = stdout(&run(&settings, &["report", "--org", "globex"]));
    let pool = table
        .lines()
        .find(|line| line.starts_with("seat "))
        .unwrap();
    assert!(pool.contains("unlimited"), "{table}");
    let unlimited_line = table
        .lines()
        .skip_while(|line| !line.starts_with("SOURCES"))
        .find(|line| {
            line.starts_with("seat") && line.contains("plan") && line.contains("unlimited")
        })
        .unwrap_or_else(|| panic!("the unlimited plan's line:\n{table}"));
    assert!(unlimited_line.contains(" 7 "), "{table}");
    assert!(
        table.lines().all(|line| line.chars().count() <= 80),
        "{table}"
    );
    let output = run(&settings, &["verify"]);
    assert!(output.status.success(), "{}", stdout(&output));
}

/// Changes the database as a superuser could (`statements`, past the constraints the
/// worker relies on where they allow it), runs `verify`, checks that it fails and says
/// MISMATCH, and returns what it printed.
async fn verify_after_tampering(settings: &Settings, statements: &str) -> String {
    let mut connection = superuser(settings).await;
    sqlx::raw_sql(statements)
        .execute(&mut connection)
        .await
        .unwrap();
    let output = run(settings, &["verify"]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    let text = stdout(&output);
    assert!(text.contains("MISMATCH"), "{text}");
    text
}

async fn superuser(settings: &Settings) -> sqlx::PgConnection {
    use sqlx::Connection as _;
    sqlx::PgConnection::connect(&settings.database.url)
        .await
        .unwrap()
}

#[tokio::test]
async fn verify_fails_on_a_ledger_entry_changed_by_a_superuser() {
    let (settings, _store) = known_ledger().await;
    // Triggers (the append-only guard among them) do not fire for a replica session.
    let text = verify_after_tampering(
        &settings,
        "SET session_replication_role = replica;
         UPDATE ledger_blocks b SET quantities[g.n] = b.quantities[g.n] + 5
           FROM (SELECT l.first_sequence, e.n
                   FROM ledger_blocks l, unnest(l.kinds, l.products) WITH ORDINALITY AS e (k, p, n)
                  WHERE l.org_id = 'acme' AND e.k = 'grant' AND e.p = 'seat') g
          WHERE b.org_id = 'acme' AND b.first_sequence = g.first_sequence;",
    )
    .await;
    assert!(
        text.contains("FAIL every entry's pool_available_after"),
        "{text}"
    );
}

#[tokio::test]
async fn verify_fails_on_a_ledger_block_deleted_with_the_guard_disabled() {
    let (settings, _store) = known_ledger().await;
    let mut connection = superuser(&settings).await;
    sqlx::raw_sql(
        "ALTER TABLE ledger_blocks DISABLE TRIGGER ledger_no_update_or_delete;
         DELETE FROM ledger_blocks
          WHERE org_id = 'acme' AND 3 BETWEEN first_sequence AND last_sequence;
         ALTER TABLE ledger_blocks ENABLE TRIGGER ledger_no_update_or_delete;",
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
    let text = verify_after_tampering(
        &settings,
        "UPDATE pools SET available = available + 3, granted_total = granted_total + 3
          WHERE org_id = 'globex' AND product = 'seat';",
    )
    .await;
    assert!(text.contains("globex seat: stored available 7"), "{text}");
}

#[tokio::test]
async fn verify_fails_on_a_pool_warning_edited_by_hand() {
    let (settings, _store) = known_ledger().await;
    // acme's seats are all drawn: its low warning is open at 0 of 10 (threshold 1).
    let text = verify_after_tampering(
        &settings,
        "UPDATE pool_warnings SET available = 1
          WHERE org_id = 'acme' AND product = 'seat' AND kind = 'low' AND open;",
    )
    .await;
    assert!(
        text.contains(
            "acme seat: the open low warning says Some(1) available, the pool holds Some(0)"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn verify_agrees_with_a_ledger_holding_revocations() {
    let (settings, store) = ledger_with_revocations().await;
    let pool: (i64, i64, i64) = sqlx::query_as(
        "SELECT available, granted_total, revoked_total FROM pools
          WHERE org_id = 'globex' AND product = 'seat'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(pool, (3, 12, 9), "the scenario revoked what it meant to");

    let output = run(&settings, &["verify", "--format", "json"]);
    assert!(output.status.success(), "{}", stdout(&output));
    let verification: Value = serde_json::from_slice(&output.stdout).unwrap();
    let checked = |prefix: &str| -> u64 {
        let check = verification["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|check| check["name"].as_str().unwrap().starts_with(prefix))
            .unwrap_or_else(|| panic!("no check {prefix:?}: {verification}"));
        assert_eq!(check["failure_count"], 0, "{check}");
        check["checked"].as_u64().unwrap()
    };
    // Three revocation entries (r-part, r-plan, r-early) of three grants.
    assert_eq!(checked("every revocation takes units its grant"), 3);
    assert_eq!(
        checked("every revocation entry comes from a stored revocation"),
        3
    );
    // Every grant (acme's two, globex's four) is compared, and each one in the pool with
    // the kept revocations: g-globex still has 3 seats under r-part, which is done.
    assert_eq!(checked("each grant's revoked units equal"), 6);
    assert_eq!(checked("no grant in the pool keeps units"), 1);
    let text = stdout(&run(&settings, &["verify"]));
    assert!(text.contains("The ledger and the state agree."), "{text}");
}

#[tokio::test]
async fn verify_fails_on_a_grant_whose_revoked_units_were_edited_by_hand() {
    let (settings, _store) = ledger_with_revocations().await;
    // The lot still accounts for every unit (the database refuses otherwise): the revoked
    // unit is made to look transferred, which only the ledger can contradict.
    let text = verify_after_tampering(
        &settings,
        "UPDATE lots SET revoked = 0, drawn = drawn + 1
          WHERE org_id = 'globex' AND lot_id = 'g-globex';",
    )
    .await;
    assert!(
        text.contains("FAIL each grant's revoked units equal the revocation entries naming it"),
        "{text}"
    );
    assert!(
        text.contains(
            "globex grant g-globex (seat): revoked 0, the revocation entries naming it take 1"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn verify_fails_on_a_pool_whose_revoked_total_was_edited_by_hand() {
    let (settings, _store) = ledger_with_revocations().await;
    // The pool's balance constraint holds: only the ledger can tell.
    let text = verify_after_tampering(
        &settings,
        "UPDATE pools SET revoked_total = revoked_total + 2, available = available - 2
          WHERE org_id = 'globex' AND product = 'seat';",
    )
    .await;
    assert!(
        text.contains(
            "globex seat: stored available 1 (granted 12, transferred 0, expired 0, revoked 11, \
             unlimited false); the ledger gives 3 (12, 0, 0, 9, false)"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn verify_fails_on_revocations_edited_by_hand() {
    let (settings, _store) = ledger_with_revocations().await;
    // g-late's revocation entry made to name g-globex (past the append-only guard), and
    // r-part, which took 1 of g-globex's seats, made to look still waiting for it.
    let text = verify_after_tampering(
        &settings,
        "SET session_replication_role = replica;
         UPDATE ledger_blocks b SET grant_ids[r.n] = 'g-globex'
           FROM (SELECT l.first_sequence, e.n
                   FROM ledger_blocks l, unnest(l.kinds, l.grant_ids) WITH ORDINALITY AS e (k, g, n)
                  WHERE l.org_id = 'globex' AND e.k = 'revocation' AND e.g = 'g-late') r
          WHERE b.org_id = 'globex' AND b.first_sequence = r.first_sequence;
         UPDATE revocations SET applied = false WHERE org_id = 'globex' AND event_id = 'r-part';",
    )
    .await;
    for failure in [
        "globex grant g-late (seat): revoked 2, the revocation entries naming it take 0",
        "revocation r-early names grant g-late, the entry took units of grant g-globex",
        "revocation r-part took units of grant g-globex, yet is stored as still waiting for it",
        "globex grant g-globex keeps 3 units of seat in the pool, while revocation r-part naming it \
         still waits for it",
    ] {
        assert!(text.contains(failure), "{failure:?} in:\n{text}");
    }
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
    // A source is a kind and a reference: a kind alone is refused before anything is sent.
    let output = run(
        &settings,
        &[
            "grant",
            "--org",
            "acme",
            "--product",
            "seat",
            "--quantity",
            "5",
            "--source-kind",
            "plan",
        ],
    );
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--reference"));
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
    // A grant that names no source is one too.
    let output = run(
        settings,
        &[
            "grant",
            "--org",
            "acme",
            "--product",
            "seat",
            "--quantity",
            "5",
        ],
    );
    assert!(output.status.success(), "{output:?}");
    let enable = json!({"event_id": "m-1", "occurred_at": "2026-01-01T09:00:00Z", "org_id": "acme", "workspace_id": "summit", "module": "gamification"});
    let event = common::stream::Event {
        kind: InputKind::ModuleEnabled,
        org: "acme".into(),
        body: enable,
    };
    common::stream::produce(settings, &[&event], common::stream::Keys::ByOrganization).await;
    setup.wait_until_done(3, &worker).await;

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
    assert_eq!(report["pools"][0]["product"], "seat");
    assert_eq!(report["pools"][0]["available"], 5);
    assert_eq!(report["sources"][0]["source"], "none");
    assert_eq!(report["totals"][0]["product"], "gamification");
    assert_eq!(report["totals"][0]["missing"], 0, "the shortfall resolved");
    assert!(worker.terminate(Duration::from_secs(30)).success());
    let output = run(settings, &["verify"]);
    assert!(output.status.success(), "{}", stdout(&output));
}

/// `revoke` publishes what the worker applies: part of one grant, then the rest of a
/// source's grants of one product; arguments that name both a grant and a source, or a
/// quantity with a source, are refused before anything is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_goes_through_the_worker() {
    let setup = common::e2e::Setup::new().await;
    let settings = &setup.settings;
    let mut worker = setup.start_worker();
    for (id, product, quantity) in [("g-seats", "seat", "10"), ("g-polls", "polls", "3")] {
        let output = run(
            settings,
            &[
                "grant",
                "--org",
                "acme",
                "--product",
                product,
                "--quantity",
                quantity,
                "--source-kind",
                "add_on",
                "--reference",
                "PO-9",
                "--event-id",
                id,
            ],
        );
        assert!(output.status.success(), "{output:?}");
    }
    let output = run(
        settings,
        &[
            "revoke",
            "--org",
            "acme",
            "--grant",
            "g-seats",
            "--quantity",
            "4",
            "--reason",
            "support ticket 12",
        ],
    );
    assert!(output.status.success(), "{output:?}");
    assert!(
        stdout(&output).contains("Published revocation ops-"),
        "{}",
        stdout(&output)
    );
    let output = run(
        settings,
        &[
            "revoke",
            "--org",
            "acme",
            "--source-kind",
            "add_on",
            "--reference",
            "PO-9",
            "--product",
            "seat",
        ],
    );
    assert!(output.status.success(), "{output:?}");
    setup.wait_until_done(4, &worker).await;
    for refused in [
        &[
            "--grant",
            "g-seats",
            "--source-kind",
            "add_on",
            "--reference",
            "PO-9",
        ][..],
        &[
            "--source-kind",
            "add_on",
            "--reference",
            "PO-9",
            "--quantity",
            "1",
        ][..],
        &["--grant", "g-seats", "--product", "seat"][..],
        &[][..],
    ] {
        let mut arguments = vec!["revoke", "--org", "acme"];
        arguments.extend_from_slice(refused);
        let output = run(settings, &arguments);
        assert_eq!(output.status.code(), Some(2), "{arguments:?}: {output:?}");
    }
    let output = run(
        settings,
        &[
            "revoke",
            "--org",
            "acme",
            "--grant",
            "g-seats",
            "--quantity",
            "0",
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("the worker would refuse this request")
    );

    let revocations: Vec<(String, i64, Option<String>)> = sqlx::query_as(
        "SELECT product, quantity, grant_id FROM ledger WHERE kind = 'revocation' ORDER BY sequence",
    )
    .fetch_all(&setup.database)
    .await
    .unwrap();
    assert_eq!(
        revocations,
        [
            ("seat".to_owned(), 4, Some("g-seats".to_owned())),
            ("seat".to_owned(), 6, Some("g-seats".to_owned())),
        ],
        "4 of the grant, then the 6 left of the source's seats; its polls stay"
    );
    let pools: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT product, available, revoked_total FROM pools WHERE org_id = 'acme' ORDER BY product",
    )
    .fetch_all(&setup.database)
    .await
    .unwrap();
    assert_eq!(
        pools,
        [("polls".to_owned(), 3, 0), ("seat".to_owned(), 0, 10)]
    );
    assert!(worker.terminate(Duration::from_secs(30)).success());
    let output = run(settings, &["verify"]);
    assert!(output.status.success(), "{}", stdout(&output));
}

/// `define-product` publishes what the worker applies (rule 14): given gamification
/// waiting for a person in summit with a unit in the pool, defining it `automatic` moves
/// the unit at once, and the reports show its name beside its handle; an assignment for
/// `seat` is refused before anything is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn define_product_goes_through_the_worker() {
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
            "PO-8",
        ],
    );
    assert!(output.status.success(), "{output:?}");
    let enable = json!({"event_id": "m-1", "occurred_at": "2026-01-01T09:00:00Z", "org_id": "acme", "workspace_id": "summit", "module": "gamification"});
    let event = common::stream::Event {
        kind: InputKind::ModuleEnabled,
        org: "acme".into(),
        body: enable,
    };
    common::stream::produce(settings, &[&event], common::stream::Keys::ByOrganization).await;
    setup.wait_until_done(2, &worker).await;

    for (refused, code, says) in [
        (
            &[
                "--product",
                "seat",
                "--name",
                "Seat",
                "--assignment",
                "manual",
            ][..],
            1,
            "not allowed for `seat`",
        ),
        (
            &["--product", "gamification", "--name", ""][..],
            1,
            "`name`",
        ),
        (
            &[
                "--product",
                "gamification",
                "--name",
                "G",
                "--assignment",
                "sometimes",
            ][..],
            2,
            "sometimes",
        ),
        (&["--product", "gamification"][..], 2, "--name"),
    ] {
        let mut arguments = vec!["define-product"];
        arguments.extend_from_slice(refused);
        let output = run(settings, &arguments);
        assert_eq!(
            output.status.code(),
            Some(code),
            "{arguments:?}: {output:?}"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{arguments:?}: {stderr}");
    }
    let output = run(
        settings,
        &[
            "define-product",
            "--product",
            "gamification",
            "--name",
            "Engagement games",
            "--description",
            "Points and leaderboards.",
            "--assignment",
            "automatic",
            "--event-id",
            "d-games",
        ],
    );
    assert!(output.status.success(), "{output:?}");
    assert!(
        stdout(&output).contains("Published definition d-games of gamification"),
        "{}",
        stdout(&output)
    );
    setup.wait_until_done(3, &worker).await;

    let moved: Vec<(String, String, String)> =
        sqlx::query_as("SELECT kind, workspace_id, caused_by FROM ledger WHERE kind = 'transfer'")
            .fetch_all(&setup.database)
            .await
            .unwrap();
    assert_eq!(
        moved,
        [(
            "transfer".to_owned(),
            "summit".to_owned(),
            "d-games".to_owned()
        )],
        "the waiting workspace got its unit, caused by the definition"
    );
    let report: Value = serde_json::from_slice(
        &run(settings, &["report", "--org", "acme", "--format", "json"]).stdout,
    )
    .unwrap();
    assert_eq!(report["pools"][0]["product"], "gamification");
    assert_eq!(report["pools"][0]["product_name"], "Engagement games");
    assert_eq!(report["totals"][0]["missing"], 0);
    assert_eq!(
        report["products"],
        json!([{"product": "gamification", "name": "Engagement games",
                "description": "Points and leaderboards.", "assignment": "automatic"}])
    );
    let table = stdout(&run(settings, &["report", "--org", "acme"]));
    let products: Vec<&str> = table
        .lines()
        .skip_while(|line| !line.starts_with("PRODUCTS"))
        .collect();
    assert_eq!(
        products,
        [
            "PRODUCTS (names from the catalogue)",
            "  gamification     Engagement games, automatic"
        ],
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|line| line.starts_with("Engagement games ")),
        "the pool is shown by its name:\n{table}"
    );
    assert!(worker.terminate(Duration::from_secs(30)).success());
    let output = run(settings, &["verify"]);
    assert!(output.status.success(), "{}", stdout(&output));
}

/// `run` refuses to start without its topics and names every missing one; `create-topics`
/// makes them (the state topic compacted), says what it made, and makes nothing the
/// second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_topics_makes_what_run_says_is_missing() {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let kafka = common::kafka::Kafka::shared();
    let settings = common::settings(&kafka.brokers);
    let names: Vec<String> = settings
        .topics
        .all()
        .into_iter()
        .map(str::to_owned)
        .collect();

    let refused = run(&settings, &["run"]);
    assert!(!refused.status.success(), "{refused:?}");
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(error.contains("these topics are missing"), "{error}");
    assert!(
        error.contains("entitlement-worker create-topics"),
        "{error}"
    );
    for name in &names {
        assert!(error.contains(name.as_str()), "{name} in {error}");
    }

    let created = run(&settings, &["create-topics", "--partitions", "2"]);
    assert!(created.status.success(), "{created:?}");
    let said = stdout(&created);
    assert!(
        said.contains(&format!(
            "created {} (cleanup.policy=compact)",
            settings.topics.state
        )),
        "{said}"
    );
    for name in &names {
        assert!(
            said.contains(&format!("created {name}")),
            "{name} in {said}"
        );
    }
    assert!(
        said.contains(&format!("{0} of {0} topics created.", names.len())),
        "{said}"
    );

    let admin: AdminClient<DefaultClientContext> =
        entitlement_worker::kafka::client_config(&settings.kafka)
            .create()
            .unwrap();
    let configs = admin
        .describe_configs(
            [
                &ResourceSpecifier::Topic(&settings.topics.state),
                &ResourceSpecifier::Topic(&settings.topics.ledger),
            ],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    let policy = |index: usize| {
        let resource = configs[index].as_ref().expect("the topic's configuration");
        resource
            .get("cleanup.policy")
            .and_then(|entry| entry.value.clone())
    };
    assert_eq!(policy(0).as_deref(), Some("compact"), "the state topic");
    assert_eq!(policy(1).as_deref(), Some("delete"), "the ledger topic");
    let consumer: BaseConsumer = entitlement_worker::kafka::client_config(&settings.kafka)
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(&settings.topics.dlq), Duration::from_secs(10))
        .unwrap();
    assert_eq!(metadata.topics()[0].partitions().len(), 2);

    let again = run(&settings, &["create-topics"]);
    assert!(again.status.success(), "{again:?}");
    let said = stdout(&again);
    assert!(
        said.contains(&format!("0 of {} topics created.", names.len())),
        "{said}"
    );
    assert!(!said.contains("created "), "{said}");
}
