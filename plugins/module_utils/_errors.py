# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""One exception hierarchy for the whole collection.

Every exception carries a message meant for the person running the playbook:
what went wrong and, where we can tell, what to do about it. The module layer
(``_module.py``) turns any :class:`SaveStateError` into ``fail_json`` with that
message and the error's :attr:`~SaveStateError.context`; anything else is a bug.
"""

from __future__ import annotations

from typing import Any

# The context keys the module layer returns on failure (see _module.failure_result).
CONTEXT_KEYS = ("trace", "guest", "image")


class SaveStateError(Exception):
    """Base class; ``str(error)`` is the user-facing message.

    ``context`` is what the operation had gathered when it failed, for the module to
    return with the message: ``trace`` (the QMP conversation, the one output meant for
    bug reports), ``guest`` and ``image`` (result dicts as on success).
    """

    @property
    def context(self) -> dict[str, Any]:
        # Created on first use: subclasses (and ``type(error)(text)`` copies) need no __init__ of ours.
        context: dict[str, Any] = self.__dict__.setdefault("_context", {})
        return context

    def add_context(self, **context: Any) -> SaveStateError:
        """Record what is known where the error passes by; returns the error, for ``raise``.

        The innermost caller saw the most, so a key once set is kept; None adds nothing.
        """
        for key, value in context.items():
            if key not in CONTEXT_KEYS:
                raise ValueError(f"unknown failure context {key!r}")
            if value is not None:
                self.context.setdefault(key, value)
        return self


# --- the save image ----------------------------------------------------------------

class ImageError(SaveStateError):
    """A save image is unreadable, malformed or unsupported."""


class ImageIncompleteError(ImageError):
    """The image carries the partial magic: its save never finished."""


class ImageTooLargeError(ImageError):
    """New XML (and cookie) do not fit in the image's data area."""


class DomainXMLError(ImageError):
    """The domain XML inside an image (or given by the user) is invalid."""


class ABIStabilityError(DomainXMLError):
    """An XML edit would change what the saved guest is (name, UUID, memory, machine)."""


# --- talking to QEMU ---------------------------------------------------------------

class MonitorError(SaveStateError):
    """QEMU's monitor (QMP) cannot be reached or misbehaved."""


class MonitorBusyError(MonitorError):
    """The QMP socket accepts connections but serves another client."""


class MonitorPeerError(MonitorError):
    """The process serving a QMP socket is not the guest's QEMU: we refuse to talk to it."""


class MonitorTimeoutError(MonitorError):
    """A QMP command or an awaited event did not come back in time."""


class MonitorClosedError(MonitorError):
    """QEMU closed the monitor connection (it exited or was killed)."""


class FdPassingUnsupportedError(MonitorError):
    """File descriptors cannot be passed over this endpoint (TCP)."""


class GuestAgentError(SaveStateError):
    """The QEMU guest agent cannot be reached, does not answer, or refused a command."""


class QMPCommandError(MonitorError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        self.command = command
        self.error_class = error_class
        self.description = description
        super().__init__(f"QMP command {command!r} failed: {error_class}: {description}")


# --- guests on the host ------------------------------------------------------------

class GuestNotFoundError(SaveStateError):
    """No active guest matches what the user asked for."""


class GuestConflictError(SaveStateError):
    """Another active guest holds the name or UUID we need."""


# --- save and restore --------------------------------------------------------------

class PreconditionError(SaveStateError):
    """Something checked before touching the guest rules the operation out."""


class MigrationError(SaveStateError):
    """QEMU's migration to or from the image failed."""
