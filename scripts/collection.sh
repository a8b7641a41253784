#!/usr/bin/env bash
# The collection as Galaxy users get it: build the tarball from this repository,
# install it offline into a scratch collections path (nowhere near this
# repository's ansible.cfg) and run `ansible-test sanity` on the installed copy.
#
#   scripts/collection.sh            build, install, sanity
#   scripts/collection.sh --keep DIR build and install into DIR, no sanity (for a look)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
# The controller venv (scripts/setup.sh), as scripts/test.sh uses it.
venv="${VLLM_LORA_VENV:-${VLLM_LORA_CACHE:-/var/cache/vllm-lora-ansible}/venvs/controller}"
[[ -x "$venv/bin/ansible-test" ]] && export PATH="$venv/bin:$PATH"
namespace=$(sed -n 's/^namespace: *//p' "$here/galaxy.yml")
name=$(sed -n 's/^name: *//p' "$here/galaxy.yml")
keep=""
[[ "${1:-}" == "--keep" ]] && keep="${2:?--keep DIR}"
work="${keep:-$(mktemp -d)}"
[[ -z "$keep" ]] && trap 'rm -rf "$work"' EXIT
mkdir -p "$work/dist" "$work/collections"

# Away from the repository: its ansible.cfg would find the collection through
# collections/ (a link to the repository) and call it installed already.
cd "$work"
unset ANSIBLE_CONFIG
ansible-galaxy collection build --force --output-path "$work/dist" "$here" >/dev/null
ANSIBLE_COLLECTIONS_PATH="$work/collections" ansible-galaxy collection install --offline --force \
  -p "$work/collections" "$work/dist/$namespace-$name-"*.tar.gz >/dev/null
installed="$work/collections/ansible_collections/$namespace/$name"
echo "installed: $installed"
[[ -n "$keep" ]] && exit 0

# ansible-test's per-test virtualenvs bootstrap pip from a host out of reach
# here: a stand-in (scripts/ansible_test_get_pip.py) in ansible-test's cache.
pip_version=$(python - <<'PY'
import re, pathlib, ansible_test
text = (pathlib.Path(ansible_test.__file__).parent / "_internal/python_requirements.py").read_text()
found = re.search(r"\bpip='([\d.]+)'", text)
print(found.group(1) if found else "")
PY
)
if [[ -n "$pip_version" ]]; then
  cache_file="$HOME/.ansible/test/cache/get_pip_${pip_version//./_}.py"
  mkdir -p "$(dirname "$cache_file")"
  # Never over a real bootstrap script already cached (one downloaded where the host is reachable).
  [[ -f "$cache_file" ]] || cp "$here/scripts/ansible_test_get_pip.py" "$cache_file"
fi
python_version=$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
cd "$installed"
ansible-test sanity --python "$python_version" --color no 2>&1 | grep -v 'Using locale "C.UTF-8"'
exit "${PIPESTATUS[0]}"
