# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Whose credentials a restored QEMU runs with: the saved QEMU's, never more.

A save records the real uid, gid and supplementary groups of the QEMU process
it saved. A restore starts the new QEMU with exactly those, so a guest that an
unprivileged user ran comes back as that user, even though the restore runs as
root. Two cases need care:

- QEMU's own privilege drop (``-runas USER``, ``-run-with user=USER``): such a
  QEMU was started by root and then switched to USER. It is restored the same
  way: started as root, dropping privileges itself.
- Images the host key did not sign (libvirt's, another fleet's, tampered ones)
  carry credentials nobody vouches for. If the operator opts in to restoring one,
  QEMU runs as the image file's owner when that is not root, else as the
  recorded user when that is not root, and never as root.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._errors import PreconditionError
from ansible_collections.savestate.qemu.plugins.module_utils._qemu_argv import option_dict, option_values

ROOT = 0


@dataclass(frozen=True)
class Credentials:
    """A process's real uid, gid and supplementary groups (and the user name, for messages)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    user: Optional[str] = None

    @property
    def is_root(self) -> bool:
        return self.uid == ROOT

    def describe(self) -> str:
        who = f"user {self.user!r} (uid {self.uid})" if self.user else f"uid {self.uid}"
        groups = f", groups {','.join(str(g) for g in self.groups)}" if self.groups else ""
        return f"{who}, gid {self.gid}{groups}"


@dataclass(frozen=True)
class LaunchPlan:
    """How to start the restored QEMU: as ``credentials`` (None: as this process, unchanged)."""

    credentials: Optional[Credentials]
    reason: str

    @property
    def describe_user(self) -> str:
        if self.credentials is None:
            return "the user running the restore"
        return self.credentials.describe()


def user_name(uid: int) -> Optional[str]:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def credentials_of_user(uid: int) -> Credentials:
    """A user's credentials from the user database: primary group and group memberships."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        raise PreconditionError(f"uid {uid} does not exist on this host") from None
    try:
        groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
    except OSError:
        groups = (entry.pw_gid,)
    return Credentials(uid=uid, gid=entry.pw_gid, groups=groups, user=entry.pw_name)


def qemu_drops_privileges_to(argv: Sequence[str]) -> Optional[str]:
    """The user QEMU switches to by itself (``-runas U`` or ``-run-with user=U``), if any."""
    users = option_values(argv, "runas")
    for value in option_values(argv, "run-with"):
        user = option_dict(value).get("user")
        if user:
            users.append(user)
    return users[-1] if users else None


def _uid_of(user: str) -> Optional[int]:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return int(user) if user.isdigit() else None


def _group_exists(gid: int) -> bool:
    try:
        grp.getgrgid(gid)
    except KeyError:
        return False
    return True


def _recorded_owner_exists(recorded: Credentials) -> None:
    """The saved QEMU's user must still be the same user on this host."""
    name = user_name(recorded.uid)
    if name is None or (recorded.user is not None and name != recorded.user):
        now = f"uid {recorded.uid} is now {name!r}" if name else f"uid {recorded.uid} no longer exists"
        raise PreconditionError(
            f"the saved QEMU ran as {recorded.describe()}, but on this host {now}; refusing to start the "
            "guest under another user's identity. Create the user (same uid) or restore on a host that has it")
    if not _group_exists(recorded.gid):
        raise PreconditionError(f"the saved QEMU ran with gid {recorded.gid}, which does not exist on this host")


def plan_authenticated(recorded: Optional[Credentials], argv: Sequence[str], euid: int) -> LaunchPlan:
    """An image this host's key signed: its recorded credentials are the saved QEMU's."""
    if recorded is None:
        raise PreconditionError("the image records no credentials of the saved QEMU, so there is no user to "
                                "restore it as; save the guest again with this version of savestate.qemu")
    dropping_to = qemu_drops_privileges_to(argv)
    if dropping_to is not None and recorded.uid != ROOT:
        if _uid_of(dropping_to) != recorded.uid:
            raise PreconditionError(
                f"the saved QEMU ran as {recorded.describe()} after dropping privileges to {dropping_to!r}, "
                f"but {dropping_to!r} is not uid {recorded.uid} on this host")
        return _as_self_if_root(euid, f"QEMU drops privileges to {dropping_to!r} itself (-runas/-run-with), "
                                      "so it starts as root like the saved one")
    if euid != ROOT:
        if recorded.uid != euid:
            raise PreconditionError(
                f"the saved QEMU ran as {recorded.describe()}, and this restore runs as uid {euid}; restore it "
                "as root (become: true) or as that user")
        return LaunchPlan(None, "the saved QEMU ran as the user running the restore")
    if recorded.is_root:
        return LaunchPlan(recorded, "the saved QEMU ran as root")
    _recorded_owner_exists(recorded)
    return LaunchPlan(recorded, f"the saved QEMU ran as {recorded.describe()}")


def _as_self_if_root(euid: int, reason: str) -> LaunchPlan:
    if euid != ROOT:
        raise PreconditionError("the saved QEMU was started by root and dropped privileges itself; "
                                "restore it as root (become: true)")
    return LaunchPlan(None, reason)


def plan_unauthenticated(recorded: Optional[Credentials], argv: Sequence[str], file_uid: int,
                         euid: int) -> LaunchPlan:
    """An image nobody vouches for, restored on the operator's explicit request: never as root."""
    if qemu_drops_privileges_to(argv) is not None:
        raise PreconditionError("the image is not signed by this host's key and its command line makes QEMU "
                                "drop privileges itself (-runas/-run-with), which needs root; refusing")
    if euid != ROOT:
        return LaunchPlan(None, "an unsigned image restored by an unprivileged user runs as that user")
    if file_uid != ROOT:
        return LaunchPlan(credentials_of_user(file_uid),
                          "the image is not signed by this host's key: QEMU runs as the image file's owner")
    if recorded is not None and not recorded.is_root:
        return LaunchPlan(credentials_of_user(recorded.uid),
                          "the image is not signed by this host's key: QEMU runs as the recorded non-root user")
    raise PreconditionError(
        "the image is not signed by this host's key and would run QEMU as root; an unsigned image is only "
        "ever restored as a non-root user. Give the file to the user the guest should run as (chown), or "
        "re-save the guest on a host with this fleet's key")


def process_credentials(uid: int, gid: int, groups: Sequence[int]) -> Credentials:
    """A live process's credentials (from /proc) as the save records them."""
    return Credentials(uid=uid, gid=gid, groups=tuple(sorted(set(groups))), user=user_name(uid))


def recorded_credentials(record: Any) -> Optional[Credentials]:
    """The saved QEMU's credentials as the image's metadata records them (None: not recorded)."""
    if record.owner_uid is None or record.owner_gid is None:
        return None
    return Credentials(uid=record.owner_uid, gid=record.owner_gid, groups=tuple(record.owner_groups or ()),
                       user=record.owner_user)


def popen_identity(credentials: Optional[Credentials]) -> dict[str, Any]:
    """subprocess.Popen's arguments that make the child run as ``credentials`` (None: unchanged)."""
    if credentials is None:
        return {}
    return {"user": credentials.uid, "group": credentials.gid, "extra_groups": list(credentials.groups)}
