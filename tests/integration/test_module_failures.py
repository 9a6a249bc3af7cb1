"""Failures keep their context (the module layer, _module.py): on real guests, QEMU 10.0 and 7.2.

A failed save returns the guest it concerned and, with qmp_trace, the QMP
conversation up to the failure; a failed restore returns the image and the
conversation with the QEMU it started. That conversation is what a bug report needs.
"""

from __future__ import annotations

import pytest

from harness.guest import GuestSpec
from integration.common import damaged_copy, failed, flip, leftovers, ok, restore, save
from integration.test_save_failures import _path_without

pytestmark = pytest.mark.integration


def _commands(trace: list[dict]) -> list[str]:
    return [entry["message"].get("execute") for entry in trace if entry["direction"] == "sent"]


def test_failures_return_their_context(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="context", qemu=qemu))

    # The save fails after talking to QEMU (the compressor is checked once the format is planned).
    env = {"PATH": _path_without("lzop", workdir / "bin")}
    result = save(guest, workdir / "x.save", format="lzop", env=env, qmp_trace=True)
    failed(result, "lzop", "isn't available")
    assert result["guest"] == {"name": "context", "uuid": guest.spec.uuid, "pid": guest.pid, "state": None,
                               "qmp": result["guest"]["qmp"], "managed_by": "none"}
    sent = _commands(result["qmp_trace"])
    assert "qmp_capabilities" in sent and "query-status" in sent, sent
    assert guest.status() == "running" and leftovers(workdir) == []
    without = save(guest, workdir / "x.save", format="lzop", env=env)
    failed(without, "lzop")
    assert "qmp_trace" not in without and without["guest"]["pid"] == guest.pid

    # The restore fails once the QEMU it started rejects the stream: the image and that conversation come back.
    image = ok(save(guest, workdir / "good.save"))["image"]
    damaged = damaged_copy(workdir / "good.save", workdir / "damaged.save", flip(image["stream_offset"] + 7))
    result = restore(damaged, qmp_trace=True)
    failed(result, "Unsupported migration stream version")
    assert result["image"]["name"] == "context" and result["image"]["path"] == str(damaged)
    assert "migrate-incoming" in _commands(result["qmp_trace"]), result["qmp_trace"]
