#!/usr/bin/env bash
# Runs a single-node Apache Kafka 4 broker (KRaft: one process is broker and controller) in
# the foreground, from the jars scripts/ensure-kafka.sh resolves from Maven Central.
#
#   scripts/kafka-broker.sh DATA_DIR PORT [CONTROLLER_PORT]
#
# Clients connect to 127.0.0.1:PORT (PLAINTEXT); the controller listens on 127.0.0.1 at
# CONTROLLER_PORT, PORT + 1 by default. DATA_DIR holds server.properties (written on every
# start), the data (DATA_DIR/data, formatted on the first start only, so a restart on the
# same DATA_DIR keeps its topics and offsets) and the log, DATA_DIR/logs/server.log.
# Topics are not created on first use (auto.create.topics.enable=false, as in
# docker-compose.yml): the worker's tests and benchmark create theirs with the admin client.
#
# Environment, all optional:
#   KAFKA_HEAP_OPTS         the JVM heap, "-Xmx512m -Xms512m" by default
#   KAFKA_OPTS              more JVM options (e.g. -Dkafka.console.level=OFF: no warnings on
#                           stderr, the file only)
#   KAFKA_CLUSTER_ID        the cluster id given to a new DATA_DIR (a fixed one by default)
#   KAFKA_SERVER_PROPERTIES lines appended to server.properties; a key given here wins
#                           over the same key above it (e.g. a SASL_PLAINTEXT listener)
#   KAFKA_ADD_SCRAM         SCRAM credentials stored when DATA_DIR is formatted, one a line,
#                           e.g. 'SCRAM-SHA-512=[name=admin,password=admin-secret]'
#
# The same Kafka another way: the release tarball (kafka_2.13-4.1.1.tgz from
# kafka.apache.org/downloads), then
#   bin/kafka-storage.sh format --standalone -t "$(bin/kafka-storage.sh random-uuid)" \
#     -c config/server.properties
#   bin/kafka-server-start.sh config/server.properties
# or the kafka service of docker-compose.yml (`docker compose up kafka`; the apache/kafka
# image), which listens inside the compose network only.
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: $0 DATA_DIR PORT [CONTROLLER_PORT]" >&2
  exit 2
fi
mkdir -p "$1"
data_dir=$(cd "$1" && pwd)
port=$2
controller_port=${3:-$((port + 1))}
threads=$(nproc 2>/dev/null || echo 2)
if [ "$threads" -lt 2 ]; then threads=2; fi

cache=$("$(dirname "$0")/ensure-kafka.sh" | tail -n 1)
classpath=$(cat "$cache/classpath")

mkdir -p "$data_dir/data" "$data_dir/logs"
{
  cat <<EOF
# Written by scripts/kafka-broker.sh on every start.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$data_dir/data
num.partitions=1
auto.create.topics.enable=false
# One broker: the internal topics can have one replica only, and need few partitions (50 by
# default, each a log to create, load and recover).
offsets.topic.num.partitions=5
transaction.state.log.num.partitions=5
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Request threads as many as the cores (Kafka's defaults, 3 network and 8 I/O threads, are
# for a broker with a machine of its own): on two cores shared with PostgreSQL and the
# worker, the defaults put the broker's round trip at 2,000 messages/s in the seconds
# (p99 1 to 3 s), and 2 and 2 brought it to tens of milliseconds (docs/performance.md).
num.network.threads=$threads
num.io.threads=$threads
# No wait for more members before a group's first rebalance.
group.initial.rebalance.delay.ms=0
# After a kill -9 the controller turns the restarted broker away while the old one's
# session lasts (9 s by default): a shorter session makes that restart about 5 s sooner.
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=4000
EOF
  if [ -n "${KAFKA_SERVER_PROPERTIES:-}" ]; then
    echo "# From KAFKA_SERVER_PROPERTIES."
    printf '%s\n' "$KAFKA_SERVER_PROPERTIES"
  fi
} >"$data_dir/server.properties"

# A short-lived JVM: the quick compiler only and the serial collector start it sooner.
jvm=(java -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -cp "$classpath")
if [ ! -f "$data_dir/data/meta.properties" ]; then
  scram=()
  while IFS= read -r credential; do
    if [ -n "$credential" ]; then scram+=(--add-scram "$credential"); fi
  done <<<"${KAFKA_ADD_SCRAM:-}"
  # The storage tool's own messages on stderr, with the tools' logging.
  "${jvm[@]}" -Dlog4j2.configurationFile="$cache/tools-log4j2.properties" kafka.tools.StorageTool \
    format --config "$data_dir/server.properties" \
    --cluster-id "${KAFKA_CLUSTER_ID:-5L6g3nShT-eMCtK--X86sw}" ${scram[@]+"${scram[@]}"} >&2
fi

echo "Kafka broker on 127.0.0.1:$port (controller $controller_port), log $data_dir/logs/server.log" >&2
# The JVM options bin/kafka-run-class.sh gives the broker, with a smaller heap.
# shellcheck disable=SC2086 # KAFKA_HEAP_OPTS and KAFKA_OPTS are lists of options
exec java ${KAFKA_HEAP_OPTS:--Xmx512m -Xms512m} -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
  -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
  -XX:MaxInlineLevel=15 -Djava.awt.headless=true \
  -Dlog4j2.configurationFile="$cache/log4j2.properties" -Dkafka.logs.dir="$data_dir/logs" \
  ${KAFKA_OPTS:-} -cp "$classpath" kafka.Kafka "$data_dir/server.properties"
