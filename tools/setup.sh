#!/usr/bin/env bash
# Installs what voxlog needs on a Debian machine, idempotently: the system packages (flite and espeak-ng,
# the offline voices; with --dev also a JDK, Maven, Chromium, baresip, Kamailio and docker-compose for the
# tests) and .venv with the project (with --dev, its test and lint tools too).
#
#   bash tools/setup.sh          # to run voxlog
#   bash tools/setup.sh --dev    # to run its tests (what .ci/run does)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

dev=false
[[ "${1:-}" == "--dev" ]] && dev=true

missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v flite >/dev/null 2>&1 || missing+=(flite)
if $dev; then
  command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null 2>&1 || missing+=(maven)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v baresip >/dev/null 2>&1 || missing+=(baresip)  # the SIP tests' far end (baresip-core, no GUI)
  # the SIP front (deploy/kamailio) the tests put before two gateways
  command -v kamailio >/dev/null 2>&1 || [[ -x /usr/sbin/kamailio ]] || missing+=(kamailio)
  if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
    missing+=(docker-compose)
  fi
fi
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "==> installing ${missing[*]}"
  sudo=""
  [[ "$(id -u)" == 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then python=python3.11; else python=python3; fi
fi
if [[ ! -x .venv/bin/python ]]; then
  echo "==> creating .venv with $("$python" --version 2>&1)"
  "$python" -m venv .venv
fi
# caldav's HTTP client (niquests) brings urllib3-future, whose wheel replaces urllib3 itself at every
# interpreter start (a .pth file), and requests' users then break (schemathesis did). Built from its
# source with URLLIB3_NO_OVERRIDE it stays apart, as its authors document; a .venv where it took over
# gets urllib3 back first.
export URLLIB3_NO_OVERRIDE=1 PIP_NO_BINARY=urllib3-future
if .venv/bin/python -c 'import sys, urllib3; sys.exit(int(urllib3.__version__.split(".")[2]) < 900)' 2>/dev/null; then
  echo "==> urllib3-future had replaced urllib3 in .venv: putting urllib3 back"
  .venv/bin/pip uninstall -y -q urllib3-future urllib3
  rm -rf .venv/lib/python3*/site-packages/urllib3
fi
if $dev; then
  .venv/bin/pip install -q -e '.[dev]'
else
  .venv/bin/pip install -q -e .
fi
