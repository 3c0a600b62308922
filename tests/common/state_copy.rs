//! A consumer of `entitlement-state` as the event platform keeps one: it reads the topic
//! from the start and keeps, per key, the message with the highest `version`. The copy
//! must hold exactly what `report --format json` shows for every organization.

use std::collections::BTreeMap;

use chrono::Utc;
use entitlement_worker::ops::report::Report;
use serde_json::{json, Value};
use sqlx::PgPool;

/// The local copy: the latest state message per key (the message's key, as published).
#[derive(Debug, Default)]
pub struct StateCopy {
    pub latest: BTreeMap<String, Value>,
    /// Messages seen again with a version already kept (a republication): same id, same
    /// state.
    pub repeated: usize,
}

impl StateCopy {
    /// Folds `messages` (key, value) in the order the topic holds them per partition. A
    /// message whose version is not above the one kept is a repeat (the outbox republishes
    /// what a crash or a refused message left unacknowledged, in order): it must be one
    /// seen before, with the same state. And the last message of each key, the one
    /// compaction keeps, is its highest version.
    pub fn build<'a>(messages: impl IntoIterator<Item = (&'a str, &'a Value)>) -> Self {
        let mut copy = Self::default();
        let mut seen: BTreeMap<(String, i64), Value> = BTreeMap::new();
        let mut last: BTreeMap<String, i64> = BTreeMap::new();
        for (key, message) in messages {
            let version = message["version"].as_i64().expect("a version");
            assert_eq!(
                key,
                key_of(message),
                "a state message's key names its state"
            );
            last.insert(key.to_owned(), version);
            let state = without_time(message);
            match seen.get(&(key.to_owned(), version)) {
                Some(earlier) => {
                    assert_eq!(
                        earlier, &state,
                        "version {version} of {key} published twice with different states"
                    );
                    copy.repeated += 1;
                }
                None => {
                    if let Some(kept) = copy.latest.get(key) {
                        assert!(
                            kept["version"].as_i64().unwrap() < version,
                            "the state of {key} went back from {kept} to {message}, never seen before"
                        );
                    }
                    seen.insert((key.to_owned(), version), state);
                    copy.latest.insert(key.to_owned(), message.clone());
                }
            }
        }
        for (key, version) in last {
            assert_eq!(
                copy.latest[&key]["version"].as_i64(),
                Some(version),
                "the last message of {key}, which compaction keeps, is its latest state"
            );
        }
        copy
    }

    /// What the copy says of every organization, in the report's terms.
    fn by_organization(&self) -> BTreeMap<String, (Vec<Value>, Vec<Value>)> {
        let mut organizations: BTreeMap<String, (Vec<Value>, Vec<Value>)> = BTreeMap::new();
        for message in self.latest.values() {
            let org = message["org_id"].as_str().unwrap().to_owned();
            let entry = organizations.entry(org).or_default();
            match message["kind"].as_str().unwrap() {
                "pool" => entry.0.push(pool_line(message)),
                "workspace" => entry.1.push(workspace_line(message)),
                other => panic!("a state message of kind {other:?}"),
            }
        }
        for (pools, workspaces) in organizations.values_mut() {
            pools.sort_by_key(|line| line["product"].as_str().unwrap().to_owned());
            workspaces.sort_by_key(workspace_order);
        }
        organizations
    }
}

/// Checks that the copy built from `messages` equals `report --format json` of every
/// organization the database knows, pool by pool and workspace by workspace.
pub async fn assert_copy_matches_report<'a>(
    pool: &PgPool,
    messages: impl IntoIterator<Item = (&'a str, &'a Value)>,
) -> StateCopy {
    let copy = StateCopy::build(messages);
    let mut from_copy = copy.by_organization();
    let organizations: Vec<String> =
        sqlx::query_scalar("SELECT org_id FROM organizations ORDER BY org_id")
            .fetch_all(pool)
            .await
            .unwrap();
    for org in organizations {
        let report = Report::load(pool, &org, Utc::now()).await.unwrap();
        let report = serde_json::to_value(&report).unwrap();
        let mut pools: Vec<Value> = report["pools"]
            .as_array()
            .unwrap()
            .iter()
            .map(pool_line)
            .collect();
        pools.sort_by_key(|line| line["product"].as_str().unwrap().to_owned());
        let mut workspaces: Vec<Value> = report["workspaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(workspace_line)
            .collect();
        workspaces.sort_by_key(workspace_order);
        let (copied_pools, copied_workspaces) = from_copy.remove(&org).unwrap_or_default();
        assert_eq!(copied_pools, pools, "the state topic's pools of {org}");
        assert_eq!(
            copied_workspaces, workspaces,
            "the state topic's workspaces of {org}"
        );
    }
    assert!(
        from_copy.is_empty(),
        "the state topic holds organizations the database does not: {:?}",
        from_copy.keys()
    );
    copy
}

/// The message key a state message must have.
fn key_of(message: &Value) -> String {
    let org = &message["org_id"];
    let product = &message["product"];
    match message["kind"].as_str() {
        Some("workspace") => json!([org, message["workspace_id"], product]).to_string(),
        _ => json!([org, product]).to_string(),
    }
}

fn without_time(message: &Value) -> Value {
    let mut message = message.clone();
    message.as_object_mut().unwrap().remove("updated_at");
    message
}

/// The fields a pool's state and its report line share.
fn pool_line(line: &Value) -> Value {
    json!({
        "product": line["product"],
        "available": line["available"],
        "pending": line["pending"],
        "unlimited": line["unlimited"],
        "granted": line["granted"],
        "transferred": line["transferred"],
        "expired": line["expired"],
        "revoked": line["revoked"],
    })
}

/// The fields a workspace's state and its report line share.
fn workspace_line(line: &Value) -> Value {
    json!({
        "workspace_id": line["workspace_id"],
        "product": line["product"],
        "required": line["required"],
        "allocated": line["allocated"],
        "missing": line["missing"],
        "name": line["name"],
        "live": line["live"],
    })
}

fn workspace_order(line: &Value) -> (String, String) {
    (
        line["workspace_id"].as_str().unwrap().to_owned(),
        line["product"].as_str().unwrap().to_owned(),
    )
}
