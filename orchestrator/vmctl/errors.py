"""The errors a user can fix.

Everything that is not a `VmctlError` is a bug and keeps its traceback. A
`VmctlError` carries one line saying what went wrong and a hint saying what
to do; `vmctl.cli` turns it into output in exactly one place. Library
modules raise, they never print or exit.
"""

from __future__ import annotations


class VmctlError(Exception):
    """A problem the user can fix: one line of message, one line of hint."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, *, details: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        #: Extra lines shown below the message (a server's last log lines).
        self.details = details

    def __str__(self) -> str:
        return self.message


class ConfigError(VmctlError):
    """Bad flags or options, caught before anything starts."""

    exit_code = 2


class ModelError(VmctlError):
    """Unknown model, hostile spec, missing or corrupt weights."""


class FetchError(ModelError):
    """A download failed, or the file is not cached while offline."""


class SandboxError(VmctlError):
    """The sandbox cannot be applied (no bwrap, blocked namespaces, ...)."""


class ServerError(VmctlError):
    """llama-server or the gateway failed to start or died."""


class VMError(VmctlError):
    """A guest that cannot be built, booted, reached or stopped."""


class NotFoundError(VmctlError):
    """No server, instance or client of that name."""


class ClientError(VmctlError):
    """A host client (llm, opencode, claude) is missing or cannot start."""
