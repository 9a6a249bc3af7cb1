# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""The module layer: what every module of the collection does, done one way.

A module declares its options from the fragments here and what it needs on the
managed host, then runs its operation through :class:`SaveStateModule`, which wraps
``AnsibleModule`` (as community.docker's client does) so that:

* a missing library fails with Ansible's ``missing_required_lib`` message, and a
  qemu.qmp older than the documented floor fails as clearly, before anything is touched;
* ``timeout`` is checked once, the same way, in every module that has one;
* a :class:`SaveStateError` becomes ``fail_json`` with its message *and* the context
  the operation gathered (the QMP trace, the guest, the image): the trace is meant
  for bug reports, and bug reports are about failures;
* an :class:`Outcome` of save or restore becomes the result (``guest``, ``image``,
  ``stats``, the diff, ``qmp_trace``, warnings) the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, Optional, TypeVar

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import HAS_LXML, LXML_IMPORT_ERROR
from ansible_collections.savestate.qemu.plugins.module_utils._errors import SaveStateError
from ansible_collections.savestate.qemu.plugins.module_utils._monitor import (
    HAS_QEMU_QMP,
    QEMU_QMP_IMPORT_ERROR,
    QEMU_QMP_REQUIREMENT,
    qemu_qmp_recent_enough,
)
from ansible_collections.savestate.qemu.plugins.module_utils._outcome import Outcome
from ansible_collections.savestate.qemu.plugins.module_utils._proc import json_safe

T = TypeVar("T")
Spec = dict[str, dict[str, Any]]

QEMU_QMP = "qemu.qmp"
LXML = "lxml"

# --- argument-spec fragments (their documentation: plugins/doc_fragments and each module) ---

# Every module that talks QMP; documented by the savestate.qemu._qmp doc fragment.
QMP_ARGS: Spec = {"qmp_trace": {"type": "bool", "default": False}}
# The guest's identity; each module says what it means for it (find it, or expect it in the image).
GUEST_IDENTITY_ARGS: Spec = {"name": {"type": "str"}, "uuid": {"type": "str"}}
IMAGE_PATH_ARGS: Spec = {"path": {"type": "path", "required": True}}
ALLOW_UNAUTHENTICATED_ARGS: Spec = {"allow_unauthenticated": {"type": "bool", "default": False}}


def timeout_args(default: float) -> Spec:
    """The ``timeout`` option, in seconds; :class:`SaveStateModule` checks it is a positive number."""
    return {"timeout": {"type": "float", "default": default}}


def argument_spec(*fragments: Spec, **options: dict[str, Any]) -> Spec:
    """The fragments and the module's own options as one spec; an option defined twice is a bug."""
    spec: Spec = {}
    for part in (*fragments, options):
        clash = sorted(set(spec) & set(part))
        if clash:
            raise ValueError(f"options defined twice: {clash}")
        spec.update(part)
    return spec


# --- checks before the operation --------------------------------------------------------

def requirement_problem(requirement: str) -> Optional[tuple[str, Optional[str]]]:
    """Why ``requirement`` (QEMU_QMP or LXML) is not met here, with the import's traceback; None if met."""
    if requirement == QEMU_QMP:
        if not HAS_QEMU_QMP:
            return missing_required_lib(QEMU_QMP_REQUIREMENT), QEMU_QMP_IMPORT_ERROR
        if not qemu_qmp_recent_enough():
            return (f"{QEMU_QMP_REQUIREMENT} is required on the managed host, but the qemu.qmp installed there "
                    "is older (it has no cmd_raw, added in 0.0.4); upgrade it with pip."), None
        return None
    if requirement == LXML:
        return None if HAS_LXML else (missing_required_lib("lxml"), LXML_IMPORT_ERROR)
    raise ValueError(f"unknown requirement {requirement!r}")


def timeout_problem(timeout: float) -> Optional[str]:
    """Why ``timeout`` is no usable number of seconds; None if it is. ``nan`` and ``inf`` are not."""
    if math.isfinite(timeout) and timeout > 0:
        return None
    return f"timeout must be a positive number of seconds, not {timeout:g}"


# --- results ----------------------------------------------------------------------------

def diff_result(before: Any, after: Any, header: Optional[str] = None) -> dict[str, Any]:
    """One entry of Ansible's ``diff``; ``header`` names what changes (a path) on both sides."""
    diff = {"before": before, "after": after}
    if header is not None:
        diff.update(before_header=header, after_header=header)
    return diff


def outcome_result(outcome: Outcome, trace_requested: bool, diff: bool, diff_header: Optional[str] = None,
                   changed: Optional[bool] = None) -> dict[str, Any]:
    """The result of save and restore: ``changed`` (unless the module knows better), ``msg``,
    ``guest``, ``image`` and ``stats`` when there are any, the diff and ``qmp_trace`` when asked."""
    result: dict[str, Any] = {"changed": outcome.changed if changed is None else changed, "msg": outcome.msg,
                              "guest": outcome.guest}
    if outcome.image is not None:
        result["image"] = outcome.image
    if outcome.stats is not None:
        result["stats"] = outcome.stats
    if diff:
        result["diff"] = diff_result(outcome.before, outcome.after, diff_header)
    if trace_requested:
        result["qmp_trace"] = outcome.trace
    return result


def failure_result(error: SaveStateError, trace_requested: bool) -> dict[str, Any]:
    """``fail_json``'s arguments for ``error``: its message, the guest and image it concerned
    when known, and the QMP conversation up to the failure when asked for."""
    context = error.context
    result: dict[str, Any] = {"msg": str(error)}
    for key in ("guest", "image"):
        if context.get(key) is not None:
            result[key] = context[key]
    if trace_requested:
        result["qmp_trace"] = context.get("trace", [])
    return result


# --- the module ---------------------------------------------------------------------------

class SaveStateModule:
    """An ``AnsibleModule`` with the collection's conventions (see the module docstring).

    ``requires`` must be met or the module fails; ``wants`` only warns (with ``without``,
    what the module does then).
    """

    def __init__(self, spec: Spec, requires: Iterable[str] = (), wants: Iterable[str] = (),
                 without: str = "", **kwargs: Any) -> None:
        self.ansible = AnsibleModule(argument_spec=spec, supports_check_mode=True, **kwargs)
        self.params: dict[str, Any] = self.ansible.params
        for requirement in requires:
            problem = requirement_problem(requirement)
            if problem is not None:
                traceback = {} if problem[1] is None else {"exception": problem[1]}
                self.ansible.fail_json(msg=problem[0], **traceback)
        for requirement in wants:
            problem = requirement_problem(requirement)
            if problem is not None:
                self.ansible.warn(f"{problem[0].rstrip('.')}. {without}".strip())
        if "timeout" in spec:
            problem_text = timeout_problem(self.params["timeout"])
            if problem_text is not None:
                self.ansible.fail_json(msg=problem_text)

    @property
    def check_mode(self) -> bool:
        return bool(self.ansible.check_mode)

    @property
    def diff(self) -> bool:
        return bool(self.ansible._diff)

    @property
    def trace_requested(self) -> bool:
        return bool(self.params.get("qmp_trace"))

    def run(self, operation: Callable[[], T]) -> T:
        """``operation()``; a :class:`SaveStateError` it raises fails the module with its context."""
        try:
            return operation()
        except SaveStateError as error:
            self.fail(error)

    def fail(self, error: SaveStateError | str) -> NoReturn:
        if isinstance(error, str):
            error = SaveStateError(error)
        self.ansible.fail_json(**json_safe(failure_result(error, self.trace_requested)))
        raise AssertionError("fail_json returned")  # it exits; this tells the type checker

    def exit(self, **result: Any) -> NoReturn:
        self.ansible.exit_json(**json_safe(result))
        raise AssertionError("exit_json returned")

    def exit_outcome(self, outcome: Outcome, diff_header: Optional[str] = None,
                     changed: Optional[bool] = None) -> NoReturn:
        """End the module with a save's or restore's outcome, its warnings included."""
        for warning in outcome.warnings:
            self.ansible.warn(warning)
        self.exit(**outcome_result(outcome, self.trace_requested, self.diff, diff_header, changed))
