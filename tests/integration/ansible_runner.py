"""Run one of the collection's modules through real Ansible, the way a playbook would.

``ansible localhost -m savestate.qemu.<module> -a '<JSON>'`` runs in a subprocess
against the working tree (linked into the venv as the ``savestate.qemu``
collection). A small callback plugin of the tests
(``callback_plugins/savestate_result_file.py``) writes the module's full result,
``diff`` included, as JSON to a file that is read back as data; screen output is
not parsed. Arguments travel as one JSON object on an argv entry, never through
a shell, so paths with spaces, quotes or commas arrive unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from harness.paths import PROJECT_ROOT, VENV_DIR
from harness.processes import kill_tree

ANSIBLE = VENV_DIR / "bin" / "ansible"
COLLECTION = "savestate.qemu"
CALLBACK_DIR = Path(__file__).resolve().parent / "callback_plugins"


class AnsibleRunError(RuntimeError):
    """Ansible itself failed (no result for the module), as opposed to the module failing."""


def run_module(module: str, args: dict[str, Any] | None = None, check: bool = False, diff: bool = False,
               timeout: float = 300.0, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The module's result for localhost: ``changed``, ``failed``, ``msg``, ``diff`` and its return values.

    ``module`` is a short name (``guest_info``) or a FQCN. A failing module is a
    result with ``failed: true``, not an exception; only Ansible failing to run
    at all raises :class:`AnsibleRunError`. ``_stdout``/``_stderr`` hold Ansible's
    screen output, for assertion messages.
    """
    name = module if "." in module else f"{COLLECTION}.{module}"
    argv = [str(ANSIBLE), "localhost", "-m", name, "-a", json.dumps(args or {})]
    if check:
        argv.append("--check")
    if diff:
        argv.append("--diff")
    with tempfile.TemporaryDirectory(prefix="ssq-ansible-") as scratch:
        result_file = Path(scratch) / "results.jsonl"
        process = subprocess.Popen(argv, cwd=PROJECT_ROOT, env=ansible_environment(result_file, env),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)  # the module runs in a worker's own session: kill it too
            stdout, stderr = process.communicate()
            raise AnsibleRunError(f"{name} did not finish within {timeout:g} s\n"
                                  f"--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}") from None
        completed = subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
        return host_result(completed, result_file)


def ansible_environment(result_file: Path, extra: dict[str, str] | None) -> dict[str, str]:
    """The environment of an Ansible run whose module results the test callback writes to ``result_file``."""
    env = dict(os.environ)
    env.update({
        "ANSIBLE_CALLBACK_PLUGINS": str(CALLBACK_DIR),
        "ANSIBLE_CALLBACKS_ENABLED": "savestate_result_file",
        "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",  # ad-hoc runs load no callbacks otherwise
        "SAVESTATE_RESULT_FILE": str(result_file),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCALHOST_WARNING": "0",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
        "ANSIBLE_PYTHON_INTERPRETER": str(VENV_DIR / "bin" / "python"),
        "PATH": f"{VENV_DIR / 'bin'}{os.pathsep}{env.get('PATH', '')}",
    })
    env.pop("ANSIBLE_STDOUT_CALLBACK", None)
    env.update(extra or {})
    return env


def host_result(completed: subprocess.CompletedProcess[str], result_file: Path) -> dict[str, Any]:
    """The last module result in ``result_file``, with the run's screen output; raises AnsibleRunError if none."""
    try:
        lines = result_file.read_text(encoding="utf-8").splitlines()
        result = json.loads(lines[-1])
    except (OSError, ValueError, IndexError):
        raise AnsibleRunError(f"ansible exited {completed.returncode} without a module result\n"
                              f"--- stdout ---\n{completed.stdout}\n--- stderr ---\n{completed.stderr}") from None
    result.setdefault("failed", result["_status"] in ("failed", "unreachable"))
    result["_stdout"] = completed.stdout
    result["_stderr"] = completed.stderr
    return result
