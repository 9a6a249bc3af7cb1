"""Run one of the collection's modules the way Ansible's executor does, without Ansible.

The module runs in its own Python process (``exit_json``/``fail_json`` end it) with
its arguments in a file named on its command line, the input AnsibleModule reads
when it is not run from an AnsiballZ wrapper. Works under ``make units`` and under
``ansible-test units`` alike, on every ansible-core we claim.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

COLLECTION_MODULES = "ansible_collections.savestate.qemu.plugins.modules"
# The directory holding ansible_collections/savestate/qemu: this file is its tests/unit/module_runner.py.
COLLECTIONS_ROOT = Path(__file__).parents[5]


def run_module(module: str, args: dict[str, Any] | None = None, check: bool = False, diff: bool = False,
               timeout: float = 120.0) -> dict[str, Any]:
    """The module's result: ``changed``, ``failed``, ``msg``, ``diff`` and its return values.

    ``_stdout``/``_stderr`` hold what the process printed, for assertion messages.
    """
    payload = {"ANSIBLE_MODULE_ARGS": {**(args or {}), "_ansible_check_mode": check, "_ansible_diff": diff}}
    with tempfile.TemporaryDirectory(prefix="ssq-module-") as scratch:
        args_file = Path(scratch) / "args.json"
        args_file.write_text(json.dumps(payload))
        done = subprocess.run([sys.executable, "-m", f"{COLLECTION_MODULES}.{module}", str(args_file)],
                              capture_output=True, text=True, timeout=timeout, check=False, env=_environment())
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        result = {"failed": True, "msg": f"the module printed no result (exit status {done.returncode}): {done.stderr[-2000:]}"}
    result.setdefault("failed", False)
    result.setdefault("changed", False)
    result["_stdout"], result["_stderr"] = done.stdout, done.stderr
    return result


def _environment() -> dict[str, str]:
    """Ours, with the collection importable (ansible-test units finds it by a loader of its own)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(COLLECTIONS_ROOT), env.get("PYTHONPATH")]))
    return env
