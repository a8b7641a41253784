"""Stand-in for ansible-test's pip bootstrap script.

ansible-test makes a virtualenv per sanity test and bootstraps pip in it with a
get-pip script from ci-files.testing.ansible.com, which is out of reach here.
scripts/collection.sh puts this file where ansible-test caches that script: pip
comes from the venv's own ensurepip, then what ansible-test asked for comes from
the configured package index (PyPI), as with the original.
"""

import subprocess
import sys

subprocess.check_call([sys.executable, "-m", "ensurepip", "--default-pip"], stdout=subprocess.DEVNULL)
# get-pip's own options; pip install does not know them.
args = [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", *args])
