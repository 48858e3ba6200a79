#!/usr/bin/env bash
# Stop what `make demo` started (`make stop`): each service by the pid in its pid file,
# SIGTERM first (clean shutdown), SIGKILL after 20 s.
set -uo pipefail
cd "$(dirname "$0")/.."
VAR=${DISCUS_VAR:-$(pwd)/var}
for name in flower exporter worker listener orthanc redis; do
  pidfile="$VAR/run/$name.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    # Each service runs in its own session (setsid), so its children stop with it.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"
      echo "$name (pid $pid) killed"
    else
      echo "$name (pid $pid) stopped"
    fi
  fi
  rm -f "$pidfile"
done
