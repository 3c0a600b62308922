//! The demo as a newcomer runs it (`entitlement-worker demo`): each step's outputs are
//! printed under its own heading, in causal order, whatever the machine's speed.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The demo's output, split into (heading, lines under it).
fn steps(output: &str) -> Vec<(String, Vec<String>)> {
    let mut steps: Vec<(String, Vec<String>)> = Vec::new();
    for line in output.lines() {
        if let Some(heading) = line.strip_prefix("== ") {
            steps.push((heading.to_owned(), Vec::new()));
        } else if let Some((_, lines)) = steps.last_mut() {
            if line.starts_with("   ") {
                lines.push(line.trim().to_owned());
            }
        }
    }
    steps
}

fn step<'a>(steps: &'a [(String, Vec<String>)], starts: &str) -> &'a [String] {
    &steps
        .iter()
        .find(|(heading, _)| heading.starts_with(starts))
        .unwrap_or_else(|| panic!("a step \"{starts}...\""))
        .1
}

fn position(lines: &[String], what: &str) -> usize {
    lines
        .iter()
        .position(|line| line.contains(what))
        .unwrap_or_else(|| panic!("\"{what}\" among {lines:#?}"))
}

#[test]
fn the_demo_prints_each_steps_effects_under_it_in_the_order_they_happened() {
    let database = format!("{}/{}", common::server_url(), common::unique("demo"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_entitlement-worker"))
        .arg("demo")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("ENTITLEMENTS__DATABASE__URL", &database)
        .env("ENTITLEMENTS__METRICS__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the demo starts");
    let started = Instant::now();
    let limit = Duration::from_secs(240);
    let status = loop {
        if let Some(status) = child.try_wait().expect("the demo's status") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("the demo did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = child.wait_with_output().expect("the demo's output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        status.success(),
        "the demo exits 0: {status}\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !stdout.contains("did not arrive in time"),
        "the story ends:\n{stdout}"
    );
    let steps = steps(&stdout);
    assert_eq!(steps.len(), 19, "nineteen steps:\n{stdout}");

    let plan = step(&steps, "acme buys a plan with 10 seats");
    assert_eq!(plan.len(), 1, "{plan:#?}");
    assert!(
        plan[0].contains("grant") && plan[0].contains("pool now 10"),
        "{plan:#?}"
    );

    let join = step(&steps, "12 participants join");
    let transfers = join
        .iter()
        .filter(|line| line.contains(" transfer "))
        .count();
    assert_eq!(transfers, 10, "ten seats move: {join:#?}");
    // The alerts follow the transfers. The joins may fall into one batch or two (a batch
    // folds its changes into one alert), so "1 missing" may come before "2 missing"; the
    // last alert says 2.
    let alerts: Vec<usize> = (0..join.len())
        .filter(|&index| join[index].starts_with("ALERT"))
        .collect();
    assert!(
        !alerts.is_empty() && alerts.len() <= 2 && alerts[0] == 10,
        "the alerts follow the transfers: {join:#?}"
    );
    let open = position(join, "ALERT    OPEN summit-2026 seat: 2 missing");
    assert_eq!(open, *alerts.last().unwrap(), "the last alert: {join:#?}");
    // However the worker batched the joins, the pool ends low: 0 of 10 left, the threshold
    // 10% of 10.
    assert_eq!(
        join.last().map(String::as_str),
        Some("WARNING  OPEN low acme seat: 0 left, warns at 1 or fewer"),
        "{join:#?}"
    );

    let cancel = step(&steps, "p-0003 cancels without ever activating");
    assert!(
        cancel
            .iter()
            .any(|line| line.contains("OPEN summit-2026 seat: 1 missing")),
        "{cancel:#?}"
    );
    assert!(
        step(&steps, "p-0005 cancels after activating").is_empty(),
        "an activated cancellation changes nothing"
    );

    let add_on = step(&steps, "acme buys an add-on of 5 seats");
    let grant = position(add_on, " grant ");
    let transfer = position(add_on, " transfer ");
    let resolved = position(add_on, "ALERT    RESOLVED summit-2026 seat");
    let not_low = position(add_on, "WARNING  RESOLVED low acme seat: 4 left");
    assert!(
        grant < transfer && transfer < resolved && resolved < not_low,
        "the add-on's grant, then the transfer, the resolved alert and warning: {add_on:#?}"
    );

    let viewer = step(&steps, "A viewer tries to transfer the module");
    assert!(
        viewer
            .iter()
            .any(|line| line.contains("DLQ      forbidden")),
        "{viewer:#?}"
    );
    let manager = step(&steps, "The entitlement manager transfers it");
    let moved = position(manager, "manual_transfer");
    let resolved = position(manager, "RESOLVED summit-2026 gamification");
    assert!(moved < resolved, "{manager:#?}");
    let globex = step(&steps, "globex names summit-2026");
    assert!(
        globex
            .iter()
            .any(|line| line.contains("DLQ      tenant_mismatch")),
        "{globex:#?}"
    );
    let not_json = step(&steps, "A message that is not JSON");
    assert!(
        not_json.iter().any(|line| line.starts_with("DLQ")),
        "{not_json:#?}"
    );

    let removed = step(
        &steps,
        "After the event, acme's add-on of 5 seats is removed",
    );
    assert_eq!(removed.len(), 2, "{removed:#?}");
    assert!(
        removed[0].contains(" revocation ") && removed[0].contains("4 seat; pool now 0"),
        "{removed:#?}"
    );
    assert_eq!(
        removed[1], "WARNING  OPEN low acme seat: 0 left, warns at 1 or fewer",
        "the plan's 10 and the 1 seat the add-on gave still count: {removed:#?}"
    );
    let past = step(&steps, "summit-2026 is over");
    assert!(
        past.iter().any(|line| line.starts_with("state")
            && line.contains("summit-2026 (Summit 2026) seat: past, required 11, allocated 11")),
        "its state says it is past, with its name and seats: {past:#?}"
    );
    assert!(
        past.iter()
            .all(|line| !line.starts_with("ledger") && !line.starts_with("ALERT")),
        "nothing moves: {past:#?}"
    );
    let upgrade = step(&steps, "acme upgrades to the unlimited Enterprise plan");
    assert_eq!(
        upgrade.len(),
        2,
        "the old plan had nothing left: {upgrade:#?}"
    );
    assert!(
        upgrade[1].starts_with("WARNING  RESOLVED low acme seat"),
        "unlimited is never low: {upgrade:#?}"
    );
    assert!(
        upgrade[0].contains(" grant ") && upgrade[0].contains("seat (unlimited); pool now 0"),
        "{upgrade:#?}"
    );
    let unlimited = step(&steps, "5 participants join expo-2026");
    assert!(
        unlimited.iter().all(|line| line.contains(" transfer ")
            && line.contains("seat -> expo-2026 (unlimited); pool now 0")),
        "transfers on the unlimited plan, no alert: {unlimited:#?}"
    );
    // However the worker batched them: five seats in all.
    let seats: i64 = unlimited
        .iter()
        .map(|line| {
            let before = line.split(" seat -> ").next().unwrap();
            before.rsplit(' ').next().unwrap().parse::<i64>().unwrap()
        })
        .sum();
    assert_eq!(seats, 5, "{unlimited:#?}");

    let waiting = step(&steps, "acme buys 2 units of q-and-a");
    assert!(
        waiting.iter().all(|line| !line.contains(" transfer ")),
        "modules wait for a person: {waiting:#?}"
    );
    position(waiting, "ALERT    OPEN summit-2026 q-and-a: 1 missing");
    let later = step(&steps, "expo-2026 enables q-and-a too");
    assert_eq!(later.len(), 1, "{later:#?}");
    position(later, "ALERT    OPEN expo-2026 q-and-a: 1 missing");
    let automatic = step(&steps, "The catalogue defines q-and-a");
    let summit = position(automatic, "1 q-and-a -> summit-2026");
    let expo = position(automatic, "1 q-and-a -> expo-2026");
    assert!(summit < expo, "oldest shortfall first: {automatic:#?}");
    position(automatic, "ALERT    RESOLVED summit-2026 q-and-a");
    position(automatic, "ALERT    RESOLVED expo-2026 q-and-a");

    let trial = step(&steps, "acme gets a trial of 3 seats");
    let credited = position(trial, " grant ");
    let warned = position(trial, "WARNING  OPEN expiring acme seat: 3 units of");
    let expired = position(trial, " expiry ");
    let over = position(trial, "WARNING  RESOLVED expiring acme seat: 0 units of");
    assert!(
        credited < warned && warned < expired.max(over),
        "credited, warned, then expired: {trial:#?}"
    );
}
