"""The module layer's pieces (_module.py, _outcome.py, _uuid_compare.py, the error context), in process.

The modules themselves, run as Ansible runs them, are in tests/unit/plugins/modules/test_module_layer.py.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._errors import PreconditionError, QMPCommandError, SaveStateError
from ansible_collections.savestate.qemu.plugins.module_utils._module import (
    GUEST_IDENTITY_ARGS,
    LXML,
    QEMU_QMP,
    QMP_ARGS,
    argument_spec,
    diff_result,
    failure_result,
    outcome_result,
    requirement_problem,
    timeout_args,
    timeout_problem,
)
from ansible_collections.savestate.qemu.plugins.module_utils._monitor import Monitor
from ansible_collections.savestate.qemu.plugins.module_utils._outcome import Outcome, guest_result, stats_result
from ansible_collections.savestate.qemu.plugins.module_utils._uuid_compare import same_uuid, uuid_form
from ansible_collections.savestate.qemu.tests.unit.fake_qmp import FakeQMPServer

UUID = "4c7a1a3e-30b6-4e55-9a55-3d7d2a1b0c11"


# --- argument spec and checks ---------------------------------------------------------------

def test_fragments_make_one_spec_and_a_clash_is_a_bug():
    spec = argument_spec(GUEST_IDENTITY_ARGS, timeout_args(2.0), QMP_ARGS, path=dict(type="path"))
    assert set(spec) == {"name", "uuid", "timeout", "qmp_trace", "path"}
    assert spec["timeout"] == {"type": "float", "default": 2.0}
    with pytest.raises(ValueError, match="'name'"):
        argument_spec(GUEST_IDENTITY_ARGS, name=dict(type="str"))


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan"), float("inf"), float("-inf")])
def test_a_timeout_must_be_a_positive_finite_number(timeout):
    assert timeout_problem(timeout) == f"timeout must be a positive number of seconds, not {timeout:g}"


def test_usable_timeouts_pass():
    assert timeout_problem(0.001) is None and timeout_problem(600.0) is None


def test_the_libraries_of_this_environment_are_there():
    assert requirement_problem(QEMU_QMP) is None and requirement_problem(LXML) is None
    with pytest.raises(ValueError):
        requirement_problem("libvirt")


# --- the error's context and the failure result ------------------------------------------------

def _failed_stop(directory: Path) -> QMPCommandError:
    """QEMU refuses ``stop``; the error gets the conversation and the guest, as save_guest adds them."""
    with FakeQMPServer(directory / "qmp.sock") as server:
        server.error("stop", "GenericError", "the guest cannot stop now")
        monitor = Monitor(server.address, trace=True)
        with pytest.raises(QMPCommandError) as raised:
            try:
                with monitor:
                    monitor.execute("stop")
            except SaveStateError as error:
                error.add_context(trace=monitor.trace, guest=guest_result("web01", UUID, 4242, None, server.address))
                raise
    return raised.value


def test_a_failure_carries_the_qmp_conversation_up_to_it():
    directory = Path(tempfile.mkdtemp(prefix="ssq-m"))  # unix socket paths must stay short
    try:
        error = _failed_stop(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    result = failure_result(error, trace_requested=True)
    assert result["msg"] == "QMP command 'stop' failed: GenericError: the guest cannot stop now"
    assert result["guest"]["pid"] == 4242 and result["guest"]["state"] is None
    sent = [entry["message"].get("execute") for entry in result["qmp_trace"] if entry["direction"] == "sent"]
    assert sent == ["qmp_capabilities", "stop"]
    assert result["qmp_trace"][-1]["message"]["error"]["desc"] == "the guest cannot stop now"
    assert "qmp_trace" not in failure_result(error, trace_requested=False)


def test_the_innermost_context_wins_and_nothing_is_not_context():
    error = PreconditionError("no").add_context(trace=[{"inner": 1}], image=None)
    error.add_context(trace=[{"outer": 1}], image={"path": "/x"})
    assert error.context == {"trace": [{"inner": 1}], "image": {"path": "/x"}}
    expected = {"msg": "no", "image": {"path": "/x"}, "qmp_trace": [{"inner": 1}]}
    assert failure_result(error, trace_requested=True) == expected
    with pytest.raises(ValueError):
        error.add_context(stats={})


def test_an_error_without_context_fails_with_its_message_and_an_empty_trace():
    assert failure_result(SaveStateError("plain"), trace_requested=True) == {"msg": "plain", "qmp_trace": []}
    assert SaveStateError("a").context is not SaveStateError("b").context


# --- the outcome -> result mapping ---------------------------------------------------------------

def _outcome() -> Outcome:
    return Outcome(True, "saved", guest_result("web01", UUID, 7, "stopped", "/run/q.sock"), image={"path": "/i"},
                   stats=stats_result(2.0, 4 * 1024 * 1024), before={"guest": {"state": "running"}},
                   after={"guest": {"state": "stopped"}}, trace=[{"t": 1}])


def test_an_outcome_becomes_the_documented_result():
    result = outcome_result(_outcome(), trace_requested=True, diff=True, diff_header="/i")
    assert result == {
        "changed": True, "msg": "saved",
        "guest": {"name": "web01", "uuid": UUID, "pid": 7, "state": "stopped", "qmp": "/run/q.sock", "managed_by": "none"},
        "image": {"path": "/i"}, "stats": {"duration_s": 2.0, "bytes": 4194304, "throughput_mib_s": 2.0},
        "diff": {"before": {"guest": {"state": "running"}}, "after": {"guest": {"state": "stopped"}},
                 "before_header": "/i", "after_header": "/i"},
        "qmp_trace": [{"t": 1}]}


def test_without_diff_trace_image_or_stats_they_are_left_out():
    outcome = Outcome(False, "nothing to do", guest_result(None, None, None, "running", None, "libvirt"))
    result = outcome_result(outcome, trace_requested=False, diff=False, changed=True)
    assert result == {"changed": True, "msg": "nothing to do", "guest": {
        "name": None, "uuid": None, "pid": None, "state": "running", "qmp": None, "managed_by": "libvirt"}}
    assert diff_result("a", "b") == {"before": "a", "after": "b"}
    assert stats_result(0.0, 10)["throughput_mib_s"] is None


# --- UUIDs --------------------------------------------------------------------------------------

def test_uuids_compare_in_any_letter_case_and_only_when_both_are_given():
    assert same_uuid(UUID.upper(), f" {UUID} ") and uuid_form(UUID.upper()) == UUID
    assert not same_uuid(UUID, None) and not same_uuid(None, None)
    assert not same_uuid(UUID, UUID.replace("4c7a", "4c7b"))
    assert same_uuid("Not-A-UUID", "not-a-uuid") and uuid_form("Not-A-UUID") == "not-a-uuid"
    assert same_uuid("00000000-0000-0000-0000-000000000000", "00000000-0000-0000-0000-000000000000")
