#!/usr/bin/env bash
# The whole test suite, as CI runs it:
#   scripts/test.sh          setup (cached), lint, unit, contract tests on a real
#                            vLLM 0.11.0, end-to-end tests on systemd containers
#   scripts/test.sh --fast   lint, collection sanity, unit tests (under a minute; needs the venv)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
cache="${VLLM_LORA_CACHE:-/var/cache/vllm-lora-ansible}"
venv="${VLLM_LORA_VENV:-$cache/venvs/controller}"
fast=0
[[ "${1:-}" == "--fast" ]] && { fast=1; shift; }

if ((!fast)); then
  scripts/setup.sh --vllm
fi
export PATH="$venv/bin:$PATH"

echo "== yamllint"
yamllint --strict .
echo "== ansible-lint (production profile, offline)"
ansible-lint --offline --profile production
echo "== argument_specs vs docs"
python scripts/gen_var_docs.py --check
echo "== collection: build the tarball, install it elsewhere, ansible-test sanity on the installed copy"
scripts/collection.sh

if ((fast)); then
  exec python -m pytest tests/unit -m "not vllm" "$@"
fi
# The slowest tests, printed at the end: where the time goes when the suite grows.
exec python -m pytest tests --durations=25 "$@"
