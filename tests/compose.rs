//! docker-compose.yml cannot run here (no Docker engine): this test reads it and checks the
//! services and their wiring.

use std::collections::BTreeSet;

use serde_norway::Value;

fn compose() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
        .unwrap();
    serde_norway::from_str(&text).unwrap()
}

fn environment(service: &Value, key: &str) -> String {
    service["environment"][key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is set"))
        .to_owned()
}

/// The Kafka users get from docker-compose.yml is the one the tests run
/// (`scripts/kafka/pom.xml`), and its single node is set up the way the tests' is.
#[test]
fn compose_runs_the_kafka_release_the_tests_run() {
    let pom = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/kafka/pom.xml"
    ))
    .unwrap();
    let version = pom
        .split("<kafka.version>")
        .nth(1)
        .and_then(|rest| rest.split("</kafka.version>").next())
        .expect("the pom pins kafka.version");
    let compose = compose();
    for name in ["kafka", "kafka-init"] {
        assert_eq!(
            compose["services"][name]["image"].as_str(),
            Some(format!("apache/kafka:{version}").as_str()),
            "{name} runs Kafka {version}"
        );
    }
    let broker = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/kafka-broker.sh"
    ))
    .unwrap();
    let kafka = &compose["services"]["kafka"];
    for (variable, property) in [
        ("KAFKA_PROCESS_ROLES", "process.roles"),
        (
            "KAFKA_AUTO_CREATE_TOPICS_ENABLE",
            "auto.create.topics.enable",
        ),
        (
            "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
            "offsets.topic.replication.factor",
        ),
        (
            "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
            "transaction.state.log.min.isr",
        ),
        (
            "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS",
            "group.initial.rebalance.delay.ms",
        ),
    ] {
        let line = format!("{property}={}", environment(kafka, variable));
        assert!(
            broker.lines().any(|written| written == line),
            "scripts/kafka-broker.sh writes {line}, as docker-compose.yml sets {variable}"
        );
    }
    assert!(
        broker.contains(&format!("kafka_2.13-{version}.tgz")),
        "scripts/kafka-broker.sh names the release tarball of Kafka {version}"
    );
}

#[test]
fn compose_runs_kafka_postgres_the_worker_and_prometheus_with_health_checks() {
    let compose = compose();
    let services = &compose["services"];
    for name in ["kafka", "kafka-init", "postgres", "worker", "prometheus"] {
        assert!(services.get(name).is_some(), "service {name}");
    }
    for name in ["kafka", "postgres", "worker", "prometheus"] {
        assert!(
            services[name].get("healthcheck").is_some(),
            "{name} has a health check"
        );
    }
    assert_eq!(
        environment(&services["kafka"], "KAFKA_PROCESS_ROLES"),
        "broker,controller",
        "KRaft mode"
    );
    let worker = &services["worker"];
    assert_eq!(worker["build"].as_str(), Some("."));
    assert_eq!(
        environment(worker, "ENTITLEMENTS__KAFKA__BROKERS"),
        "kafka:9092"
    );
    assert!(environment(worker, "ENTITLEMENTS__DATABASE__URL").contains("@postgres:5432/"));
    assert_eq!(
        environment(worker, "ENTITLEMENTS__METRICS__LISTEN"),
        "0.0.0.0:9464"
    );
    assert_eq!(
        worker["depends_on"]["postgres"]["condition"].as_str(),
        Some("service_healthy")
    );
    assert_eq!(
        worker["depends_on"]["kafka-init"]["condition"].as_str(),
        Some("service_completed_successfully")
    );
    let init = serde_norway::to_string(&services["kafka-init"]).unwrap();
    for topic in [
        "participant-added",
        "participant-cancelled",
        "module-enabled",
        "entitlement-granted",
        "entitlement-transfer-requested",
        "entitlement-revoked",
        "workspace-updated",
        "product-defined",
        "entitlement-shortfalls",
        "entitlement-ledger",
        "entitlement-dlq",
    ] {
        assert!(init.contains(topic), "kafka-init creates {topic}");
    }
    let scrape = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus.yml"
    ))
    .unwrap();
    assert!(
        scrape.contains("worker:9464"),
        "Prometheus scrapes the worker"
    );
}

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|error| panic!("{path}: {error}"))
}

fn yaml(path: &str) -> Value {
    serde_norway::from_str(&read(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

fn dashboard() -> serde_json::Value {
    let path = "deploy/grafana/dashboards/entitlement-worker.json";
    serde_json::from_str(&read(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// The series names src/telemetry.rs exports: every `"entitlements_..."` literal, and for
/// the histograms (the literals passed to `histogram(`) their `_bucket`, `_sum` and `_count`
/// series.
fn exported_series() -> BTreeSet<String> {
    let source = read("src/telemetry.rs");
    let mut series = BTreeSet::new();
    let mut histograms = 0;
    for (start, _) in source.match_indices("\"entitlements_") {
        let name_start = start + 1;
        let length = source[name_start..].find('"').expect("a closed literal");
        let name = &source[name_start..name_start + length];
        series.insert(name.to_owned());
        if source[..start].trim_end().ends_with("histogram(") {
            histograms += 1;
            for suffix in ["_bucket", "_sum", "_count"] {
                series.insert(format!("{name}{suffix}"));
            }
        }
    }
    assert!(series.len() > 10, "metric names found in src/telemetry.rs");
    assert!(histograms >= 2, "histograms found in src/telemetry.rs");
    series
}

/// The label names src/telemetry.rs declares (`&["topic", "partition"]`, ...), and `le`.
fn exported_labels() -> BTreeSet<String> {
    let source = read("src/telemetry.rs");
    let mut labels = BTreeSet::from(["le".to_owned()]);
    for (start, _) in source.match_indices("&[\"") {
        let list_start = start + 2;
        let length = source[list_start..].find(']').expect("a closed list");
        for label in source[list_start..list_start + length].split(',') {
            let label = label.trim().trim_matches('"');
            if !label.is_empty() {
                labels.insert(label.to_owned());
            }
        }
    }
    assert!(labels.contains("topic"), "labels found in src/telemetry.rs");
    labels
}

/// The metric names a PromQL expression mentions.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("entitlements_"))
        .map(str::to_owned)
        .collect()
}

/// The labels an expression aggregates by: the lists after `by` and `without`.
fn grouping_labels(expr: &str) -> Vec<String> {
    let mut labels = Vec::new();
    for keyword in ["by", "without"] {
        let mut rest = expr;
        while let Some(at) = rest.find(keyword) {
            let before = rest[..at].chars().next_back();
            let after = rest[at + keyword.len()..].trim_start();
            rest = &rest[at + keyword.len()..];
            let standalone = before.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
            if standalone && after.starts_with('(') {
                let list = &after[1..after.find(')').expect("a closed label list")];
                labels.extend(list.split(',').map(|label| label.trim().to_owned()));
            }
        }
    }
    labels
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    fn walk<'a>(list: &'a serde_json::Value, into: &mut Vec<&'a serde_json::Value>) {
        for panel in list.as_array().into_iter().flatten() {
            into.push(panel);
            walk(&panel["panels"], into);
        }
    }
    let mut all = Vec::new();
    walk(&dashboard["panels"], &mut all);
    all
}

/// `(host path, container path)` of a service's bind mounts that are read-only.
fn read_only_binds(service: &Value) -> Vec<(String, String)> {
    service["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .filter_map(|volume| {
            let parts: Vec<&str> = volume.as_str()?.split(':').collect();
            match parts.as_slice() {
                [host, container, "ro"] if host.starts_with("./") => {
                    Some((host.to_string(), container.to_string()))
                }
                _ => None,
            }
        })
        .collect()
}

#[test]
fn compose_runs_grafana_provisioned_with_prometheus_and_the_dashboard() {
    let compose = compose();
    let grafana = &compose["services"]["grafana"];
    let image = grafana["image"].as_str().expect("grafana image");
    let tag = image
        .strip_prefix("grafana/grafana-oss:")
        .expect("the Grafana OSS image");
    assert!(
        tag.starts_with(|c: char| c.is_ascii_digit()),
        "a pinned version, not {tag}"
    );
    let health = serde_norway::to_string(&grafana["healthcheck"]["test"]).unwrap();
    assert!(health.contains("/api/health"), "health check: {health}");
    assert!(
        grafana["ports"]
            .as_sequence()
            .expect("ports")
            .iter()
            .any(|port| port.as_str() == Some("3000:3000")),
        "Grafana on host port 3000"
    );
    assert_eq!(
        grafana["depends_on"]["prometheus"]["condition"].as_str(),
        Some("service_healthy")
    );
    assert!(
        compose["services"]["prometheus"]
            .get("healthcheck")
            .is_some(),
        "service_healthy needs Prometheus' health check"
    );
    if let Some(volumes) = grafana["volumes"].as_sequence() {
        for volume in volumes.iter().filter_map(Value::as_str) {
            let source = volume.split(':').next().unwrap();
            if !source.starts_with("./") && !source.starts_with('/') {
                assert!(
                    compose["volumes"].get(source).is_some(),
                    "named volume {source} is declared"
                );
            }
        }
    }

    let binds = read_only_binds(grafana);
    let container_path = |host: &str| {
        binds
            .iter()
            .find(|(source, _)| source == host)
            .map(|(_, container)| container.clone())
            .unwrap_or_else(|| panic!("{host} is mounted read-only"))
    };
    assert_eq!(
        container_path("./deploy/grafana/provisioning"),
        "/etc/grafana/provisioning"
    );
    let dashboards = container_path("./deploy/grafana/dashboards");

    let datasources = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    let datasource = &datasources["datasources"][0];
    assert_eq!(datasource["type"].as_str(), Some("prometheus"));
    assert_eq!(datasource["url"].as_str(), Some("http://prometheus:9090"));
    assert_eq!(datasource["isDefault"].as_bool(), Some(true));
    let uid = datasource["uid"].as_str().expect("a fixed datasource uid");

    let providers = yaml("deploy/grafana/provisioning/dashboards/entitlement-worker.yml");
    let provider = &providers["providers"][0];
    assert_eq!(provider["type"].as_str(), Some("file"));
    assert_eq!(
        provider["options"]["path"].as_str(),
        Some(dashboards.as_str()),
        "the provider reads the mounted dashboards"
    );

    let dashboard = dashboard();
    assert_eq!(dashboard["uid"].as_str(), Some("entitlement-worker"));
    assert_eq!(dashboard["title"].as_str(), Some("entitlement-worker"));
    assert_eq!(dashboard["refresh"].as_str(), Some("10s"));
    assert_eq!(dashboard["time"]["from"].as_str(), Some("now-1h"));
    let mut ids = BTreeSet::new();
    for panel in panels(&dashboard) {
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "unique ids"
        );
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().expect("panel title");
        assert_eq!(panel["datasource"]["uid"].as_str(), Some(uid), "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} queries something");
        for target in targets {
            if let Some(datasource) = target.get("datasource") {
                assert_eq!(datasource["uid"].as_str(), Some(uid), "{title}");
            }
        }
    }
}

#[test]
fn the_dashboard_queries_only_metrics_the_worker_exports_and_covers_the_issue() {
    let series = exported_series();
    let labels = exported_labels();
    let dashboard = dashboard();
    let mut used = BTreeSet::new();
    let mut quantiles = BTreeSet::new();
    for panel in panels(&dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr} reads a worker metric");
            for name in &names {
                assert!(
                    series.contains(name),
                    "{expr}: {name} is not exported by src/telemetry.rs"
                );
            }
            for label in grouping_labels(expr) {
                assert!(
                    labels.contains(&label),
                    "{expr}: label {label} is not declared in src/telemetry.rs"
                );
            }
            if expr.contains("histogram_quantile") {
                quantiles.extend(names.iter().cloned());
            }
            used.extend(names);
        }
    }
    for (topic, metric) in [
        ("throughput", "entitlements_messages_consumed_total"),
        ("consumer lag", "entitlements_consumer_lag"),
        ("open shortfalls", "entitlements_open_shortfalls"),
        ("seats transferred", "entitlements_seats_transferred_total"),
        ("dead-letter rate", "entitlements_messages_rejected_total"),
    ] {
        assert!(used.contains(metric), "{topic}: a panel reads {metric}");
    }
    assert!(
        quantiles.contains("entitlements_commit_latency_seconds_bucket"),
        "commit latency: quantiles of entitlements_commit_latency_seconds"
    );
}
