//! docker-compose.yml cannot run here (no Docker engine): this test reads it and checks the
//! services and their wiring.

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
