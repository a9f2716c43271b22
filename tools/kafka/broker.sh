#!/usr/bin/env bash
# Runs a real single-node Apache Kafka broker (KRaft, broker+controller in one JVM) on the
# loopback interface, without Docker: the broker's jars come from Maven Central via pom.xml.
#
#   tools/kafka/broker.sh fetch   # copy the broker classpath into the cache (once)
#   tools/kafka/broker.sh start   # wipe the data dir, format, start, wait until it answers
#   tools/kafka/broker.sh resume  # start it again on the same data dir (topics and messages kept)
#   tools/kafka/broker.sh stop    # stop it (TERM, then KILL); fine if it isn't running
#   tools/kafka/broker.sh log     # last 200 lines of server.log
#   tools/kafka/broker.sh status  # exit 0 if the broker process is alive
#
# Environment:
#   VOXLOG_KAFKA_VERSION   kafka version to fetch (default: the one in pom.xml)
#   VOXLOG_KAFKA_CACHE     jar cache root        (default: $HOME/.cache/voxlog-kafka)
#   VOXLOG_KAFKA_DIR       data dir, wiped on start (default: /tmp/voxlog-kafka)
#   VOXLOG_KAFKA_PORT      client port; the controller uses port+1 (default: 19092)
#   VOXLOG_KAFKA_HEAP      JVM heap flags         (default: -Xmx1G -Xms512m)
#   VOXLOG_KAFKA_JVM_OPTS  other JVM flags        (default: G1, C1-only JIT)
#   VOXLOG_KAFKA_START_TIMEOUT  seconds to wait for readiness (default: 90)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
POM="$HERE/pom.xml"

pom_version() {
  sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM" | head -n1
}

pom_sum() {
  printf '%s ' "$VERSION"
  cksum <"$POM" | cut -d' ' -f1
}

VERSION="${VOXLOG_KAFKA_VERSION:-$(pom_version)}"
CACHE_ROOT="${VOXLOG_KAFKA_CACHE:-$HOME/.cache/voxlog-kafka}"
LIBS="$CACHE_ROOT/$VERSION"
MARKER="$LIBS/.complete"
DATA_DIR="${VOXLOG_KAFKA_DIR:-/tmp/voxlog-kafka}"
PORT="${VOXLOG_KAFKA_PORT:-19092}"
CONTROLLER_PORT="$((PORT + 1))"
HOST="127.0.0.1"
BOOTSTRAP="$HOST:$PORT"
PID_FILE="$DATA_DIR/broker.pid"
SERVER_LOG="$DATA_DIR/logs/server.log"
STDOUT_LOG="$DATA_DIR/logs/kafka.out"
START_TIMEOUT="${VOXLOG_KAFKA_START_TIMEOUT:-90}"
# shellcheck disable=SC2206
HEAP=(${VOXLOG_KAFKA_HEAP:--Xmx1G -Xms512m})
# C1-only JIT and G1 with short pauses: quick startup and little CPU on a 2-core machine.
# shellcheck disable=SC2206
JVM_OPTS=(${VOXLOG_KAFKA_JVM_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:TieredStopAtLevel=1})

log() { printf '[broker] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need() { command -v "$1" >/dev/null 2>&1 || die "'$1' is required but not on PATH"; }

# ---------------------------------------------------------------------------------------------
fetch() {
  # The marker holds the pom's checksum, so editing pom.xml (e.g. the log4j version) refetches.
  if [[ -f "$MARKER" ]] && [[ "$(cat "$MARKER")" == "$(pom_sum)" ]]; then
    return 0
  fi
  need java
  need mvn
  log "fetching kafka $VERSION broker classpath into $LIBS"
  local started=$SECONDS tmp
  mkdir -p "$CACHE_ROOT"
  tmp="$(mktemp -d "$CACHE_ROOT/.fetch-$VERSION.XXXXXX")"
  if ! mvn -q -B -Dstyle.color=never -f "$POM" dependency:copy-dependencies \
      -Dkafka.version="$VERSION" -DincludeScope=runtime -DoutputDirectory="$tmp" >&2; then
    rm -rf "$tmp"
    die "mvn could not resolve the kafka $VERSION classpath"
  fi
  if ! compgen -G "$tmp/kafka_2.13-$VERSION.jar" >/dev/null; then
    rm -rf "$tmp"
    die "kafka_2.13-$VERSION.jar missing after the copy"
  fi
  rm -rf "$LIBS"
  mv "$tmp" "$LIBS"
  pom_sum >"$MARKER"
  log "fetched $(find "$LIBS" -name '*.jar' | wc -l) jars in $((SECONDS - started))s"
}

# ---------------------------------------------------------------------------------------------
# True when $1 is a live process running this data dir's broker (guards against pid reuse).
is_our_broker() {
  local pid="$1"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r "/proc/$pid/cmdline" ]]; then
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$DATA_DIR/server.properties"
  fi
}

pid_alive() {
  [[ -f "$PID_FILE" ]] || return 1
  is_our_broker "$(cat "$PID_FILE" 2>/dev/null || true)"
}

stop() {
  if ! [[ -f "$PID_FILE" ]]; then
    log "not running (no pid file at $PID_FILE)"
    return 0
  fi
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  if ! is_our_broker "$pid"; then
    log "not running (stale pid file)"
    rm -f "$PID_FILE"
    return 0
  fi
  log "stopping broker pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  local i
  for ((i = 0; i < 150; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "broker did not exit after 15s; sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  rm -f "$PID_FILE"
  log "stopped"
}

# Exit 0 when something on $1:$2 answers a Kafka ApiVersions (v0) request with error_code 0.
# Only the Python stdlib is used, so this works before any project venv exists.
api_versions_ok() {
  python3 - "$1" "$2" <<'PY'
import socket, struct, sys

host, port = sys.argv[1], int(sys.argv[2])
client_id = b"voxlog-broker-probe"
correlation_id = 0x766F78
# RequestHeader v1: api_key INT16, api_version INT16, correlation_id INT32, client_id STRING
body = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
try:
    with socket.create_connection((host, port), timeout=3) as s:
        s.settimeout(5)
        s.sendall(struct.pack(">i", len(body)) + body)

        def read(n: int) -> bytes:
            buf = b""
            while len(buf) < n:
                chunk = s.recv(n - len(buf))
                if not chunk:
                    raise EOFError("connection closed")
                buf += chunk
            return buf

        (size,) = struct.unpack(">i", read(4))
        if size < 10 or size > 1 << 20:
            sys.exit(3)
        payload = read(size)
        corr, error_code, n_apis = struct.unpack(">ihi", payload[:10])
        sys.exit(0 if corr == correlation_id and error_code == 0 and n_apis > 0 else 4)
except (OSError, EOFError, struct.error):
    sys.exit(2)
PY
}

port_in_use() {
  python3 - "$1" "$2" <<'PY'
import socket, sys
s = socket.socket()
s.settimeout(1)
sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)
PY
}

write_config() {
  cat >"$DATA_DIR/server.properties" <<EOF
# Generated by tools/kafka/broker.sh; single-node KRaft (combined broker + controller).
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$HOST:$CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA_DIR/data

# Topics and internal topics for one node.
num.partitions=3
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=true
delete.topic.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0

# Light on a small (2-core) machine.
num.network.threads=2
num.io.threads=2
background.threads=2
num.recovery.threads.per.data.dir=1
num.replica.fetchers=1
log.cleaner.threads=1
log.cleaner.dedupe.buffer.size=16777216
log.cleaner.backoff.ms=1000
log.retention.check.interval.ms=60000
socket.send.buffer.bytes=102400
socket.receive.buffer.bytes=102400
socket.request.max.bytes=104857600
EOF

  cat >"$DATA_DIR/log4j2.properties" <<EOF
# Generated by tools/kafka/broker.sh: everything goes to server.log, nothing to stdout.
status = warn
name = voxlog-kafka
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $SERVER_LOG
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.zk.name = org.apache.zookeeper
logger.zk.level = WARN
EOF
}

start() {
  need java
  need python3
  fetch

  # Stop a broker left over from an earlier start on this data dir before wiping it.
  stop
  if port_in_use "$HOST" "$PORT" || port_in_use "$HOST" "$CONTROLLER_PORT"; then
    die "port $PORT or $CONTROLLER_PORT on $HOST is already in use (another broker?); set VOXLOG_KAFKA_PORT"
  fi

  rm -rf "$DATA_DIR"
  mkdir -p "$DATA_DIR/data" "$DATA_DIR/logs"
  write_config

  local cp="$LIBS/*"
  local cluster_id
  cluster_id="$(java -cp "$cp" -Dlog4j2.configurationFile="$DATA_DIR/log4j2.properties" \
    kafka.tools.StorageTool random-uuid 2>>"$STDOUT_LOG")"
  [[ -n "$cluster_id" ]] || die "StorageTool random-uuid printed nothing"
  if ! java -cp "$cp" -Dlog4j2.configurationFile="$DATA_DIR/log4j2.properties" \
      kafka.tools.StorageTool format --config "$DATA_DIR/server.properties" \
      --cluster-id "$cluster_id" --standalone >>"$STDOUT_LOG" 2>&1; then
    cat "$STDOUT_LOG" >&2
    die "StorageTool format failed"
  fi

  launch
}

# Runs the broker on the data dir as it is (formatted by `start`), and waits until it answers.
launch() {
  local cp="$LIBS/*" started=$SECONDS
  local -a jvm=(
    "${HEAP[@]}"
    "${JVM_OPTS[@]}"
    -XX:+ExitOnOutOfMemoryError
    -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$DATA_DIR/log4j2.properties"
    -Dkafka.logs.dir="$DATA_DIR/logs"
  )
  : >"$SERVER_LOG"  # readiness is read from this start's lines only
  log "starting kafka $VERSION on $BOOTSTRAP (controller $HOST:$CONTROLLER_PORT, dir $DATA_DIR)"
  nohup java "${jvm[@]}" -cp "$cp" kafka.Kafka "$DATA_DIR/server.properties" \
    >>"$STDOUT_LOG" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$PID_FILE"

  while ((SECONDS - started < START_TIMEOUT)); do
    # The pid itself, not `pid_alive`: until the fork has exec'd java (a while, on a busy machine),
    # its command line is still this script's, and the broker would be taken for dead while it starts.
    if ! kill -0 "$pid" 2>/dev/null; then
      log "broker process exited during startup"
      show_log 80 >&2
      exit 1
    fi
    if grep -q 'Kafka Server started' "$SERVER_LOG" 2>/dev/null &&
        api_versions_ok "$HOST" "$PORT"; then
      log "ready after $((SECONDS - started))s (pid $(cat "$PID_FILE"))"
      echo "KAFKA_BOOTSTRAP=$BOOTSTRAP"
      return 0
    fi
    sleep 0.5
  done

  log "broker not ready after ${START_TIMEOUT}s"
  show_log 80 >&2
  stop || true
  exit 1
}

show_log() {
  local n="${1:-200}"
  if [[ -f "$SERVER_LOG" ]]; then
    echo "----- $SERVER_LOG (last $n lines) -----"
    tail -n "$n" "$SERVER_LOG"
  else
    echo "(no $SERVER_LOG)"
  fi
  if [[ -s "$STDOUT_LOG" ]]; then
    echo "----- $STDOUT_LOG (last 40 lines) -----"
    tail -n 40 "$STDOUT_LOG"
  fi
}

# Starts the broker again on the data dir of an earlier `start`, keeping its topics and messages
# (the outage tests stop a broker and bring it back).
resume() {
  need java
  need python3
  [[ -f "$DATA_DIR/server.properties" ]] || die "no broker was started on $DATA_DIR; use start"
  if pid_alive; then
    log "already running (pid $(cat "$PID_FILE"))"
    echo "KAFKA_BOOTSTRAP=$BOOTSTRAP"
    return 0
  fi
  launch
}

status() {
  if pid_alive; then
    echo "running pid $(cat "$PID_FILE") on $BOOTSTRAP"
  else
    echo "not running"
    return 1
  fi
}

case "${1:-}" in
  fetch) fetch ;;
  classpath) fetch && echo "$LIBS/*" ;;
  start) start ;;
  resume) resume ;;
  stop) stop ;;
  log) show_log 200 ;;
  status) status ;;
  *)
    echo "usage: $0 {fetch|classpath|start|resume|stop|log|status}" >&2
    exit 2
    ;;
esac
