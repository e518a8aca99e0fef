"""Linux prctl(2) through ctypes (no compiled extension); elsewhere every call is a no-op."""

from __future__ import annotations

PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36


def prctl(option: int, arg: int | bytes) -> bool:
    """True if the kernel accepted it; ctypes is imported only here, when first needed."""
    try:
        import ctypes

        value = ctypes.c_char_p(arg) if isinstance(arg, bytes) else arg
        return bool(ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False
