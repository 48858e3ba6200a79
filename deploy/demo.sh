#!/usr/bin/env bash
# The Discus demo (`make demo`): start Redis, Orthanc as the PACS, the listener, a worker and
# Flower on loopback; send a synthetic lumbar MR study with DCMTK storescu; wait for the SR in
# Orthanc and print what came back. Services keep running; `make stop` stops them.
#
# Ports (environment): REDIS_PORT 6379, ORTHANC_DICOM_PORT 4242, ORTHANC_HTTP_PORT 8042,
# LISTENER_PORT 11112, FLOWER_PORT 5555. Runtime files, pid files and logs live in var/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VAR=${DISCUS_VAR:-$ROOT/var}
REDIS_PORT=${REDIS_PORT:-6379}
ORTHANC_DICOM_PORT=${ORTHANC_DICOM_PORT:-4242}
ORTHANC_HTTP_PORT=${ORTHANC_HTTP_PORT:-8042}
LISTENER_PORT=${LISTENER_PORT:-11112}
FLOWER_PORT=${FLOWER_PORT:-5555}
QUIET_PERIOD=${QUIET_PERIOD:-3}
SEED=${SEED:-7}
PY="$ROOT/.venv/bin/python"
DISCUS=("$PY" -m worker.cli)
# Debian's DCMTK (storescu, Orthanc's network code) leaves Nagle's algorithm on: ~50 ms per
# instance. TCP_NODELAY=1 turns it off for every DCMTK-based program started from here.
export TCP_NODELAY=1
export DISCUS_CONFIG="$VAR/discus.toml"

mkdir -p "$VAR/run" "$VAR/log" "$VAR/redis" "$VAR/orthanc" "$VAR/demo"

port_open() { "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 0.5)" "$1" 2>/dev/null; }

wait_port() {  # name port seconds
  local i
  for ((i = 0; i < $3 * 5; i++)); do
    port_open "$2" && return 0
    sleep 0.2
  done
  echo "error: $1 did not open port $2; see $VAR/log/$1.log" >&2
  tail -20 "$VAR/log/$1.log" >&2 || true
  exit 1
}

stale() {  # pidfile: the project's code or model packages changed after the process started
  [ -n "$(find "$ROOT/worker" "$ROOT/dicom_io" "$ROOT/models" -newer "$1" \
    \( -name '*.py' -o -name '*.json' -o -name '*.safetensors' \) -print -quit 2>/dev/null)" ]
}

start() {  # name port command...; skipped when its pid file names a live process
  local name=$1 port=$2
  shift 2
  local pidfile="$VAR/run/$name.pid"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    if [[ "$name" == listener || "$name" == worker || "$name" == exporter ]] && stale "$pidfile"; then
      # a warm worker keeps the models it loaded: restart it on the installed code and models
      echo "  $name runs older code or models than installed: restarting it"
      local pid i
      pid=$(cat "$pidfile")
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      for ((i = 0; i < 150; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; fi
      rm -f "$pidfile"
    else
      echo "  $name already running (pid $(cat "$pidfile"))"
      return
    fi
  fi
  if [ "$port" != "-" ] && port_open "$port"; then
    echo "error: port $port for $name is taken by another program; set its port variable" >&2
    exit 1
  fi
  setsid nohup "$@" >>"$VAR/log/$name.log" 2>&1 &
  echo $! >"$pidfile"
  echo "  $name started (pid $!, log var/log/$name.log)"
}

# Configuration of this demo's Discus: the Orthanc below is its one destination.
cat >"$DISCUS_CONFIG" <<EOF
ae_title = "DISCUS"
port = $LISTENER_PORT
bind = "127.0.0.1"
data_dir = "$VAR"
redis_url = "redis://127.0.0.1:$REDIS_PORT/0"
quiet_period = $QUIET_PERIOD
flower_port = $FLOWER_PORT
# The demo study is a synthetic phantom: analyses trained on phantoms only may report on it here.
# A site's configuration leaves this false, so they never report on a patient.
report_synthetic_models = true
results_url = "http://127.0.0.1:$ORTHANC_HTTP_PORT/dicom-web"

[[destinations]]
name = "orthanc"
kind = "dicom"
host = "127.0.0.1"
port = $ORTHANC_DICOM_PORT
ae_title = "ORTHANC"
EOF

# Orthanc's configuration from the template; the modality entry lets our C-STORE in.
ORTHANC_NAME=discus-demo ORTHANC_STORAGE="$VAR/orthanc" ORTHANC_PLUGINS=/usr/share/orthanc/plugins \
ORTHANC_HTTP_PORT=$ORTHANC_HTTP_PORT ORTHANC_AET=ORTHANC ORTHANC_DICOM_PORT=$ORTHANC_DICOM_PORT \
DISCUS_AET=DISCUS DISCUS_PORT=$LISTENER_PORT \
  "$PY" -c "import os, string, sys; print(string.Template(open(sys.argv[1]).read()).substitute(os.environ))" \
  deploy/orthanc.json >"$VAR/orthanc.json"

echo "demo configuration: report_synthetic_models = true (phantom-trained analyses report on this"
echo "  synthetic study; a site's default is false, which withholds them from patients' studies)"
echo "starting services"
start redis "$REDIS_PORT" redis-server "$ROOT/deploy/redis.conf" --port "$REDIS_PORT" --dir "$VAR/redis"
wait_port redis "$REDIS_PORT" 15
start orthanc "$ORTHANC_HTTP_PORT" Orthanc "$VAR/orthanc.json"
wait_port orthanc "$ORTHANC_HTTP_PORT" 30
start listener "$LISTENER_PORT" "${DISCUS[@]}" listen
# as deployed (compose, systemd): one warm analysis process, and export processes beside it that
# deliver each object while the next is still being encoded
start worker - "${DISCUS[@]}" worker --queues analyze --name "analyze@%h"
start exporter - "${DISCUS[@]}" worker --queues export --name "export@%h"
start flower "$FLOWER_PORT" "${DISCUS[@]}" dashboard
wait_port listener "$LISTENER_PORT" 30
wait_port flower "$FLOWER_PORT" 60

echo "writing a synthetic lumbar MR study (seed $SEED)"
rm -rf "$VAR/demo/study"
truth=$("${DISCUS[@]}" demo-study --out "$VAR/demo/study" --modality MR --seed "$SEED")
study_uid=$("$PY" - "$VAR/demo/study" <<'EOF'
import sys
from pathlib import Path
import pydicom
for f in sorted(Path(sys.argv[1]).rglob("*")):
    try:
        print(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
        break
    except Exception:
        continue
EOF
)
echo "  $(find "$VAR/demo/study" -type f ! -name '*.json' | wc -l) instances, study $study_uid, ground truth $truth"

echo "sending it with storescu to DISCUS@127.0.0.1:$LISTENER_PORT"
t0=$(date +%s%N)
mapfile -t files < <(find "$VAR/demo/study" -type f ! -name '*.json' | sort)
storescu -aet MODALITY -aec DISCUS 127.0.0.1 "$LISTENER_PORT" "${files[@]}"
t1=$(date +%s%N)
echo "  sent in $(( (t1 - t0) / 1000000 )) ms; waiting for the results in Orthanc"

"${DISCUS[@]}" results "$study_uid" --wait 300
t2=$(date +%s%N)
echo
echo "results arrived $(( (t2 - t1) / 1000000 )) ms after the last instance (quiet period ${QUIET_PERIOD} s)"
"${DISCUS[@]}" status --limit 3 || true
echo
echo "Orthanc Explorer: http://127.0.0.1:$ORTHANC_HTTP_PORT/app/explorer.html#study?uuid=$(curl -s -X POST \
  "http://127.0.0.1:$ORTHANC_HTTP_PORT/tools/lookup" -d "$study_uid" | "$PY" -c 'import json,sys; r=json.load(sys.stdin); print(r[0]["ID"] if r else "")')"
echo "Flower (Celery dashboard): http://127.0.0.1:$FLOWER_PORT  (user admin, password discus)"
echo "Services keep running; stop them with: make stop"
