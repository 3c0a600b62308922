#!/usr/bin/env bash
# Makes Apache Kafka (KRaft only) runnable from Maven Central: installs a JDK (17 or newer)
# and Maven from Debian's packages when they are missing, and resolves the broker's and its
# tools' jars (scripts/kafka/pom.xml) into Maven's local repository. Safe to run again: with
# everything in place it only checks, in well under a second, and runs no Maven.
#
# The last line of standard output is the cache directory (progress goes to standard error):
#   dir=$(scripts/ensure-kafka.sh | tail -n 1)
# It is ${ENTITLEMENT_KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/entitlement-worker/kafka-VERSION}
# and holds:
#   classpath                the jars, one line, ':'-separated (absolute paths)
#   log4j2.properties        the broker's logging: a file, ${kafka.logs.dir}/server.log
#                            (-Dkafka.log.file=PATH names another), rolled at 100 MB, two
#                            kept; WARN and above also on stderr (-Dkafka.console.level=OFF
#                            silences that)
#   tools-log4j2.properties  the command-line tools' logging: WARN and above on stderr
#   pom.sha256               the hash of the pom the class path was resolved from
# scripts/kafka-broker.sh runs a broker with them.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
say() { echo "$@" >&2; }

here=$(cd "$(dirname "$0")" && pwd)
pom="$here/kafka/pom.xml"
version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom" | head -n 1)
[ -n "$version" ] || { say "No <kafka.version> in $pom."; exit 1; }
cache="${ENTITLEMENT_KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/entitlement-worker/kafka-$version}"

java_major() {
  java -XshowSettings:properties -version 2>&1 |
    sed -n 's/^ *java\.specification\.version = \([0-9.]*\).*/\1/p' | sed 's/^1\.//; s/\..*//'
}

java_ok() { command -v java >/dev/null 2>&1 && [ "$(java_major)" -ge 17 ] 2>/dev/null; }
missing=()
if ! java_ok; then missing+=(default-jdk-headless); fi
if ! command -v mvn >/dev/null 2>&1; then missing+=(maven); fi
if [ "${#missing[@]}" -gt 0 ]; then
  say "Installing ${missing[*]}..."
  as_root apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  if ! java_ok; then
    # Debian's default JDK is older than 17 on this release: ask for 17 by name.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jdk-headless >/dev/null
    java17=(/usr/lib/jvm/java-17-openjdk-*/bin/java)
    as_root update-alternatives --set java "${java17[0]}" >&2
  fi
fi

mkdir -p "$cache"
# One resolver at a time (tests may call this in parallel); the others wait, then find it done.
exec 9>"$cache/.lock"
flock 9

# Written on every run, only when different, so an edit here reaches the next broker started.
write_if_changed() { # FILE (content on standard input)
  local tmp
  tmp=$(mktemp "$1.XXXXXX")
  cat >"$tmp"
  chmod 644 "$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv -f "$tmp" "$1"; fi
}
write_if_changed "$cache/log4j2.properties" <<'EOF'
# The broker's logging (written by scripts/ensure-kafka.sh).
# -Dkafka.logs.dir=DIR writes DIR/server.log; -Dkafka.log.file=PATH writes PATH instead.
status = warn
name = kafka-broker

appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = ${sys:kafka.log.file:-${sys:kafka.logs.dir:-.}/server.log}
appender.file.filePattern = ${sys:kafka.log.file:-${sys:kafka.logs.dir:-.}/server.log}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 100MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 2

appender.stderr.type = Console
appender.stderr.name = stderr
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = [%d] %p %m (%c)%n

rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
rootLogger.appenderRef.stderr.ref = stderr
rootLogger.appenderRef.stderr.level = ${sys:kafka.console.level:-WARN}

# One line per request at DEBUG; keep it quiet.
logger.request.name = kafka.request.logger
logger.request.level = WARN
EOF
write_if_changed "$cache/tools-log4j2.properties" <<'EOF'
# The command-line tools' logging (written by scripts/ensure-kafka.sh): warnings on stderr.
status = warn
name = kafka-tools
appender.stderr.type = Console
appender.stderr.name = stderr
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.stderr.ref = stderr
EOF

# The class path is current when it was resolved from this very pom and all its jars exist.
pom_hash=$(sha256sum "$pom" | cut -d' ' -f1)
jars_exist() {
  [ -s "$cache/classpath" ] || return 1
  local jar
  while IFS= read -r -d: jar; do [ -f "$jar" ] || return 1; done < <(tr -d '\n' <"$cache/classpath"; echo -n :)
}
current() { [ "$(cat "$cache/pom.sha256" 2>/dev/null)" = "$pom_hash" ] && jars_exist; }
if ! current; then
  say "Resolving Kafka $version's jars with Maven (the first time, a download of about 45 MB)..."
  rm -f "$cache/pom.sha256"
  # Debian's Maven prints colour resets even in batch mode: they are dropped.
  mvn -B -q -f "$pom" dependency:build-classpath \
    -Dmdep.outputFile="$cache/classpath.tmp" -Dmdep.includeScope=runtime </dev/null 2>&1 |
    sed 's/\x1b\[[0-9;]*m//g' >&2
  # One line, whatever the plugin ends it with.
  tr -d '\n' <"$cache/classpath.tmp" >"$cache/classpath.new"
  mv -f "$cache/classpath.new" "$cache/classpath"
  rm -f "$cache/classpath.tmp"
  jars_exist || { say "Maven left a class path with missing jars: $cache/classpath"; exit 1; }
  echo "$pom_hash" >"$cache/pom.sha256"
fi
say "Kafka $version is ready ($(tr ':' '\n' <"$cache/classpath" | wc -l) jars)."
echo "$cache"
