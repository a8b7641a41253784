#!/usr/bin/env bash
# Set up the controller and deploy.
#   scripts/demo.sh                    local demo: a systemd container on this
#                                      machine, vLLM 0.11.0's CPU build, a tiny
#                                      real model and two LoRA adapters
#   scripts/demo.sh -i inventory/beelink [ansible-playbook args...]
#                                      the same playbook against real hosts
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
cache="${VLLM_LORA_CACHE:-/var/cache/vllm-lora-ansible}"
venv="${VLLM_LORA_VENV:-$cache/venvs/controller}"
export ANSIBLE_CONFIG="$here/ansible.cfg"

if [[ "${1:-}" == "-i" ]]; then
  [[ -x "$venv/bin/ansible-playbook" ]] || {
    python3 -m venv "$venv" && "$venv/bin/pip" install -q -r requirements.txt; }
  exec "$venv/bin/ansible-playbook" playbooks/site.yml "$@"
fi

scripts/setup.sh --wheelhouse
export PATH="$venv/bin:$PATH"
python -m tests.fixtures.tinyqwen build/fixtures >/dev/null
python - <<'PY'
import docker
from tests.harness import image
from tests.harness.hosts import TestHost, start_host, wheelhouse_mount
client = docker.from_env()
try:
    container = client.containers.get("vllm-demo")
    if container.status == "running":
        print("[demo] container vllm-demo already running")
    else:  # stopped with the Docker engine (a reboot): boot it again, the deploy converges it
        container.start()
        print(f"[demo] container vllm-demo started again: systemd {TestHost('vllm-demo', container).system_state()}")
except docker.errors.NotFound:
    host = start_host(client, "vllm-demo", image.base_tag(), "demo", wheelhouse_mount(), test_host=False)
    print(f"[demo] container vllm-demo: systemd {host.system_state()}")
PY
ansible-playbook playbooks/site.yml -i inventory/local/hosts.yml

ask() {
  docker exec vllm-demo curl -s http://127.0.0.1:8000/v1/chat/completions \
    -H 'Content-Type: application/json' -d "$1" | python -c '
import json, sys
r = json.load(sys.stdin)
print("  model=%r: %r" % (r.get("model"), r["choices"][0]["message"]["content"]))'
}
prompt='"messages":[{"role":"user","content":"Tell me about the sea."}],"temperature":0,"max_tokens":16'
echo
echo "[demo] the same prompt, three ways (temperature 0):"
echo " base model:"; ask "{\"model\":\"tiny-qwen2\",$prompt}"
echo " adapter via model=alpha:"; ask "{\"model\":\"alpha\",$prompt}"
echo " adapter via lora_name=beta (older clients; honoured by the shipped middleware):"
ask "{\"model\":\"tiny-qwen2\",\"lora_name\":\"beta\",$prompt}"
echo
echo "[demo] remove the demo host with: docker rm -f vllm-demo"
