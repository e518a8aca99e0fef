"""User-facing error types: a mistake the user can fix, shown as one paragraph, exit 2."""

from __future__ import annotations

USAGE_EXIT_CODE = 2


class LaunchError(Exception):
    """A problem with what the user asked for. The message names the flag and the fix.

    The CLI prints it without a traceback and exits 2, before any worker starts.
    """

    exit_code = USAGE_EXIT_CODE


class GpuDiscoveryError(LaunchError):
    """nvidia-smi exists but its answer could not be used."""


class Interrupted(LaunchError):
    """Ctrl-C (or another stop signal) before any worker ran: nothing to tear down."""

    exit_code = 130
