"""Whose credentials a restored QEMU gets: real users from this host's user database."""

from __future__ import annotations

import os
import pwd

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._credentials import (
    Credentials,
    credentials_of_user,
    plan_authenticated,
    plan_unauthenticated,
    process_credentials,
    qemu_drops_privileges_to,
)
from ansible_collections.savestate.qemu.plugins.module_utils._errors import PreconditionError

NOBODY = pwd.getpwnam("nobody")
ROOT = Credentials(uid=0, gid=0, groups=(0,), user="root")
AS_NOBODY = Credentials(uid=NOBODY.pw_uid, gid=NOBODY.pw_gid, groups=(NOBODY.pw_gid,), user="nobody")
QEMU = ("/usr/bin/qemu-system-x86_64", "-m", "128")
UNUSED_UID = 54321


def test_a_guest_saved_as_root_comes_back_as_root():
    plan = plan_authenticated(ROOT, QEMU, euid=0)
    assert plan.credentials == ROOT


def test_a_guest_saved_as_an_unprivileged_user_comes_back_as_that_user():
    plan = plan_authenticated(AS_NOBODY, QEMU, euid=0)
    assert plan.credentials == AS_NOBODY
    assert "nobody" in plan.describe_user


def test_an_image_without_recorded_credentials_is_refused():
    with pytest.raises(PreconditionError, match="records no credentials"):
        plan_authenticated(None, QEMU, euid=0)


def test_a_user_that_no_longer_exists_is_refused():
    gone = Credentials(uid=UNUSED_UID, gid=UNUSED_UID, user="alice")
    with pytest.raises(PreconditionError, match="no longer exists"):
        plan_authenticated(gone, QEMU, euid=0)


def test_a_uid_that_now_belongs_to_someone_else_is_refused():
    renamed = Credentials(uid=NOBODY.pw_uid, gid=NOBODY.pw_gid, user="alice")
    with pytest.raises(PreconditionError, match="is now 'nobody'"):
        plan_authenticated(renamed, QEMU, euid=0)


@pytest.mark.parametrize("option", [("-runas", "nobody"), ("-run-with", "user=nobody")])
def test_qemu_that_drops_privileges_itself_starts_as_root(option):
    argv = QEMU + option
    assert qemu_drops_privileges_to(argv) == "nobody"
    assert plan_authenticated(AS_NOBODY, argv, euid=0).credentials is None  # as the restore runs: root


def test_a_runas_user_that_is_not_the_recorded_uid_is_refused():
    other = Credentials(uid=UNUSED_UID, gid=UNUSED_UID, user="ghost")
    with pytest.raises(PreconditionError, match="is not uid"):
        plan_authenticated(other, QEMU + ("-runas", "nobody"), euid=0)


def test_an_unprivileged_restore_only_restores_its_own_guests():
    assert plan_authenticated(AS_NOBODY, QEMU, euid=NOBODY.pw_uid).credentials is None
    with pytest.raises(PreconditionError, match="restore it as root"):
        plan_authenticated(ROOT, QEMU, euid=NOBODY.pw_uid)


def test_an_unsigned_image_runs_as_its_file_owner():
    plan = plan_unauthenticated(ROOT, QEMU, file_uid=NOBODY.pw_uid, euid=0)
    assert plan.credentials is not None and plan.credentials.uid == NOBODY.pw_uid
    # The groups come from the user database, not from the image.
    assert plan.credentials.groups == credentials_of_user(NOBODY.pw_uid).groups


def test_an_unsigned_root_owned_image_runs_as_the_recorded_non_root_user():
    plan = plan_unauthenticated(AS_NOBODY, QEMU, file_uid=0, euid=0)
    assert plan.credentials is not None and plan.credentials.uid == NOBODY.pw_uid


def test_an_unsigned_image_never_runs_as_root():
    with pytest.raises(PreconditionError, match="would run QEMU as root"):
        plan_unauthenticated(ROOT, QEMU, file_uid=0, euid=0)
    with pytest.raises(PreconditionError, match="would run QEMU as root"):
        plan_unauthenticated(None, QEMU, file_uid=0, euid=0)
    with pytest.raises(PreconditionError, match="drop privileges"):
        plan_unauthenticated(AS_NOBODY, QEMU + ("-runas", "nobody"), file_uid=NOBODY.pw_uid, euid=0)


def test_process_credentials_name_the_user():
    creds = process_credentials(os.getuid(), os.getgid(), [os.getgid(), os.getgid()])
    assert creds.user == pwd.getpwuid(os.getuid()).pw_name
    assert creds.groups == (os.getgid(),)
