# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Test helper: write each task's full result (diff included) as JSON to a file.

Used by tests/integration/ansible_runner.py. Screen callbacks drop ``diff`` and
``exception`` from what they print, and ansible-core's machine-readable ones are
deprecated, so the tests take results from here instead.
"""

from __future__ import annotations

import json
import os

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: savestate_result_file
type: notification
short_description: Write task results as JSON lines to E(SAVESTATE_RESULT_FILE)
description:
  - Test helper of the savestate.qemu collection; not shipped for use.
requirements:
  - E(SAVESTATE_RESULT_FILE) names the file to append to.
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "savestate_result_file"
    CALLBACK_NEEDS_ENABLED = True

    def _write(self, result, status):
        path = os.environ.get("SAVESTATE_RESULT_FILE")
        if not path:
            return
        data = {key: value for key, value in result._result.items() if not key.startswith("_ansible")}
        data["_status"] = status
        data["_host"] = result._host.get_name()
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(data, default=str) + "\n")

    def v2_runner_on_ok(self, result):
        self._write(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._write(result, "failed")

    def v2_runner_on_unreachable(self, result):
        self._write(result, "unreachable")

    def v2_runner_on_skipped(self, result):
        self._write(result, "skipped")
