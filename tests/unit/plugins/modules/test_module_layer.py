"""What every module does the same way (_module.py), run as Ansible runs modules (module_runner).

Missing or too old libraries are simulated with packages of the same name that the
module's own import finds first: a ``sitecustomize`` on the module's PYTHONPATH puts
them at the head of ``sys.path`` (the runner's PYTHONPATH starts with the venv's
site-packages, which holds the real ones).
"""

from __future__ import annotations

import os
import textwrap

import pytest

from ansible_collections.savestate.qemu.tests.unit.image_helpers import make_savestate_image
from ansible_collections.savestate.qemu.tests.unit.module_runner import run_module

QMP_MISSING = "Failed to import the required Python library (qemu.qmp >= 0.0.4)"
QMP_TOO_OLD = "qemu.qmp >= 0.0.4 is required on the managed host, but the qemu.qmp installed there is older"
LXML_MISSING = "Failed to import the required Python library (lxml)"

# qemu.qmp before 0.0.4: the names the collection imports, but a legacy client without cmd_raw.
OLD_QEMU_QMP = {
    "qemu/__init__.py": "",
    "qemu/qmp/__init__.py": """
        class QMPError(Exception): pass
        class ExecuteError(QMPError): pass
        class ExecInterruptedError(QMPError): pass
        class StateError(QMPError): pass
        class QMPClient:
            def __init__(self, name=None): pass
        class EventListener: pass
        class Message(dict): pass
        """,
    "qemu/qmp/legacy.py": """
        class QEMUMonitorProtocol:
            def cmd(self, name, args=None): pass
        """,
    "qemu/qmp/message.py": "class DeserializationError(Exception): pass\n",
}
NO_QEMU_QMP = {"qemu/__init__.py": ""}   # a qemu package without qmp
NO_LXML = {"lxml/__init__.py": "raise ImportError('lxml is hidden by the test')\n"}


@pytest.fixture
def hide(tmp_path, monkeypatch):
    """Make the modules import the given package files instead of the installed packages."""
    def place(files: dict[str, str]) -> None:
        root, packages = tmp_path / "startup", tmp_path / "shadow"
        for name, text in files.items():
            path = packages / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        root.mkdir()
        (root / "sitecustomize.py").write_text(f"import sys\nsys.path.insert(0, {str(packages)!r})\n")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    return place


def _failed(result: dict, fragment: str) -> dict:
    assert result["failed"], result["_stdout"]
    assert fragment in result["msg"], result["msg"]
    return result


def _warnings(result: dict) -> list[str]:
    """The warnings' texts (ansible-core 2.19 prints each as a summary object, older ones as text)."""
    return [item if isinstance(item, str) else item["event"]["msg"] for item in result.get("warnings", [])]


# --- requirements ----------------------------------------------------------------------------------

@pytest.mark.parametrize("module, args", [
    ("save", {"name": "web01", "path": "/nonexistent/web01.save"}),
    ("restore", {"path": "/nonexistent/web01.save"}),
])
def test_a_missing_qemu_qmp_fails_with_ansibles_message(hide, module, args):
    hide(NO_QEMU_QMP)
    _failed(run_module(module, args), QMP_MISSING)


@pytest.mark.parametrize("module, args", [
    ("save", {"name": "web01", "path": "/nonexistent/web01.save"}),
    ("restore", {"path": "/nonexistent/web01.save"}),
])
def test_a_qemu_qmp_below_the_floor_fails_before_anything_is_touched(hide, module, args):
    hide(OLD_QEMU_QMP)
    result = _failed(run_module(module, args), QMP_TOO_OLD)
    assert "upgrade it with pip" in result["msg"]


@pytest.mark.parametrize("files, fragment", [(NO_QEMU_QMP, QMP_MISSING), (OLD_QEMU_QMP, QMP_TOO_OLD)])
def test_guest_info_lists_without_a_usable_qemu_qmp_and_says_why(hide, files, fragment):
    hide(files)
    result = run_module("guest_info", {"name": "no-such-guest-here"})
    assert not result["failed"], result["_stdout"]
    assert result["guests"] == []
    assert any(fragment in text and text.endswith(". Guests are listed with state 'unknown'.")
               for text in _warnings(result)), result


@pytest.mark.parametrize("module, args", [
    ("save_image_info", {"path": "/nonexistent.save"}),
    ("save_image_define", {"path": "/nonexistent.save"}),
    ("save", {"name": "web01", "path": "/nonexistent/web01.save"}),
])
def test_a_missing_lxml_fails_with_ansibles_message(hide, module, args):
    hide(NO_LXML)
    _failed(run_module(module, args), LXML_MISSING)


# --- timeout --------------------------------------------------------------------------------------

@pytest.mark.parametrize("module, args, timeout", [  # every value is checked in process (test_module.py)
    ("save", {"name": "web01", "path": "/nonexistent/web01.save"}, "0"),
    ("restore", {"path": "/nonexistent/web01.save"}, "nan"),
    ("guest_info", {}, "-5"),
])
def test_a_timeout_that_is_no_positive_number_of_seconds_is_refused(module, args, timeout):
    result = _failed(run_module(module, {**args, "timeout": timeout}), "timeout must be a positive number of seconds")
    assert result["msg"].endswith(f"not {float(timeout):g}")


# --- failures keep their context ---------------------------------------------------------------------

@pytest.mark.parametrize("check", [True, False])
def test_a_failed_restore_returns_the_image_and_the_trace(tmp_path, check):
    path = make_savestate_image(tmp_path / "web01.save")
    result = _failed(run_module("restore", {"path": str(path), "qmp_trace": True}, check=check),
                     "no user to restore it as")
    assert result["image"]["path"] == str(path) and result["image"]["name"] == "web01"
    assert result["qmp_trace"] == []  # it failed before any QEMU was asked anything
    quiet = _failed(run_module("restore", {"path": str(path)}, check=check), "no user to restore it as")
    assert "qmp_trace" not in quiet and quiet["image"]["name"] == "web01"


def test_a_save_that_finds_no_guest_fails_without_inventing_one(tmp_path):
    result = _failed(run_module("save", {"name": "no-such-guest-here", "path": str(tmp_path / "x.save"),
                                         "qmp_trace": True}), "no active QEMU guest matches")
    assert "guest" not in result and result["qmp_trace"] == []


def test_an_option_error_of_a_module_goes_through_the_layer(tmp_path):
    path = make_savestate_image(tmp_path / "web01.save")
    result = _failed(run_module("save_image_define", {"path": str(path), "disk_paths": {"/a": ""}}),
                     "disk_paths maps old paths to new paths")
    assert "image" not in result
