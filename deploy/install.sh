#!/usr/bin/env bash
# Install what Discus needs on a Debian machine: system packages (Redis, Orthanc,
# DCMTK, dicom3tools) and the project's virtual environment in .venv/.
# Idempotent: installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v Orthanc >/dev/null || need_apt+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
command -v storescu >/dev/null || need_apt+=(dcmtk)
command -v dciodvfy >/dev/null || need_apt+=(dicom3tools)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing system packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  # The Debian packages start system services; Discus runs its own instances.
  for svc in redis-server orthanc; do $SUDO service "$svc" stop >/dev/null 2>&1 || true; done
fi

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import torch, timm, highdicom, pynetdicom, celery, pytorch_grad_cam" 
  touch "$stamp"
fi
