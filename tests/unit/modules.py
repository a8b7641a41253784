"""Run an Ansible module's main() in-process, as Ansible would, for unit tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
from ansible.module_utils import _internal as ansible_internal
from ansible.module_utils.common import warnings as ansible_warnings
from ansible.module_utils.testing import patch_module_args


def run_main(main: Callable[[], None], args: dict[str, Any],
             capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    """(exit code, result JSON) of main() given `args`.

    Once any test imports controller-side ansible, module warnings go to the
    controller's Display instead of the result: act as a module process does.
    Warnings are process-global: start empty and leave none for other tests.
    """
    with patch_module_args(args), pytest.raises(SystemExit) as exit_info, \
            mock.patch.object(ansible_internal, "is_controller", False), \
            mock.patch.dict(ansible_warnings._global_warnings, clear=True), \
            mock.patch.dict(ansible_warnings._global_deprecations, clear=True):
        main()
    code = exit_info.value.code
    assert isinstance(code, int)
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return code, result
