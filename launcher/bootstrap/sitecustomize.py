"""ddplaunch's worker bootstrap: lets the launcher ask this Python process where its threads are.

`site` imports this at start-up because the launcher put this directory first on PYTHONPATH;
the contract is in launcher/snapshot.py's docstring. In short: take DDPLAUNCH_STACKS and this
directory back out of the environment and sys.path, register faulthandler on the signal
given there to dump every thread into DIR/<pid>, do the same in forked children, let go of
the signal when the script wants it, then run the sitecustomize this one shadows.

It runs before the user's code in every worker, so it imports only built-in modules that are
already loaded (no threading, no `signal`: `_signal` is its built-in half) and it never raises:
a broken bootstrap must never break the user's script. It cannot import ddplaunch.snapshot
(the worker may not see the launcher's package), so the contract's names are repeated here.
"""

import _signal
import _thread
import faulthandler
import os
import sys

_VARIABLE = "DDPLAUNCH_STACKS"  # ddplaunch.snapshot.STACKS_VARIABLE
_HEADER = "ddplaunch-stacks"  # ddplaunch.snapshot.HEADER_WORD
_HERE = os.path.dirname(os.path.abspath(__file__))
# faulthandler prints a thread id as "0x" and sizeof(unsigned long) * 2 hex digits
_IDENT_DIGITS = 16 if sys.maxsize > 2**32 else 8


class _Armed:
    """The signal this process dumps its stacks on, and the file it dumps them into."""

    __slots__ = ("signum", "directory", "fd", "active")

    def __init__(self, signum: int, directory: str, fd: int) -> None:
        self.signum = signum
        self.directory = directory
        self.fd = fd
        self.active = True  # False once the script has taken the signal over


_armed: _Armed | None = None
_original_signal = _signal.signal


def _take_variable() -> tuple[int, bool, str] | None:
    """Pop DDPLAUNCH_STACKS ("SIGNUM:HAD_PYTHONPATH:DIR"); None when absent or malformed."""
    value = os.environ.pop(_VARIABLE, None)
    if value is None:
        return None
    signum, had, directory = (value.split(":", 2) + ["", ""])[:3]
    if not signum.isdecimal() or not directory:  # isdecimal: only what int() accepts
        return None
    return int(signum), had == "1", directory


def _is_here(entry: str) -> bool:
    return entry != "" and os.path.abspath(entry) == _HERE


def _restore_pythonpath(had_pythonpath: bool) -> None:
    """PYTHONPATH as the launcher found it: this directory off its front, or gone if it was unset."""
    value = os.environ.get("PYTHONPATH")
    if value is None:
        return
    first, _, rest = value.partition(os.pathsep)
    if not _is_here(first):
        return  # not as the launcher left it: someone else's to keep
    if had_pythonpath or rest:
        os.environ["PYTHONPATH"] = rest
    else:
        del os.environ["PYTHONPATH"]


def _restore_sys_path() -> None:
    sys.path[:] = [entry for entry in sys.path if not _is_here(entry)]
    sys.path_importer_cache.pop(_HERE, None)


def _open_dump_file(directory: str) -> int:
    """DIR/<pid> for appending, with the header that names this process's main thread."""
    fd = os.open(os.path.join(directory, str(os.getpid())), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.write(fd, f"{_HEADER} 1 0x{_thread.get_ident():0{_IDENT_DIGITS}x}\n".encode())
    return fd


def _register(armed: _Armed) -> None:
    # chain=False: chain=True re-raises the signal to the disposition faulthandler replaced,
    # whose default action kills (here SIG_IGN, set by _arm, so it would only be wasted), and
    # it registers with SA_NODEFER, so the signal would not show in the dumping thread's
    # SigBlk, which is how the launcher tells that a dump is over.
    faulthandler.register(armed.signum, file=armed.fd, all_threads=True, chain=False)


def _arm(signum: int, directory: str) -> _Armed:
    armed = _Armed(signum, directory, _open_dump_file(directory))
    # faulthandler.unregister restores the disposition found at registration. Left at SIG_DFL
    # (terminate), a signal arriving between a release and the script's own handler would
    # kill the process; over SIG_IGN it is only lost. (signal.getsignal then says SIG_IGN.)
    _original_signal(signum, _signal.SIG_IGN)
    _register(armed)
    return armed


def _after_fork_in_child() -> None:
    """A forked child (a DataLoader worker) dumps into its own file, under its own pid."""
    try:
        armed = _armed
        if armed is None or not armed.active:
            return
        inherited = armed.fd
        armed.fd = _open_dump_file(armed.directory)  # its main thread is the one that forked
        _register(armed)  # already registered: this only points faulthandler at the new file
        os.close(inherited)
    except Exception:
        pass


def _release(armed: _Armed, why: str) -> None:
    """Let go of the signal; the line tells the launcher never to send it again."""
    armed.active = False
    # The line first: the launcher reads it before it sends, so the sooner the better.
    os.write(armed.fd, f"{_HEADER} released {why}\n".encode())
    faulthandler.unregister(armed.signum)
    os.close(armed.fd)


def _signal_signal(signalnum: int, handler: object) -> object:
    """_signal.signal, letting go of the dump signal first when the script sets a handler on it.

    signal.signal looks _signal.signal up at each call, so this sees every caller.
    """
    try:
        armed = _armed
        # Let go even if the call below then fails (from a thread other than the main one):
        # the script means to own the signal, and py-spy can still read this process.
        if armed is not None and armed.active and signalnum == armed.signum:
            _release(armed, f"the script set its own handler for signal {armed.signum}")
    except Exception:
        pass
    return _original_signal(signalnum, handler)


def _wrap_signal() -> None:
    _signal_signal.__doc__ = _original_signal.__doc__
    _signal_signal.__name__ = _signal_signal.__qualname__ = "signal"
    _signal.signal = _signal_signal


def _run_shadowed() -> None:
    """Run the sitecustomize this one hides (Debian ships one), as `sitecustomize`.

    Its own errors are let through: `site` reports them just as it would without ddplaunch.
    """
    try:
        # The frozen halves of importlib are loaded at start-up; `importlib` itself may not be.
        import _frozen_importlib
        import _frozen_importlib_external

        path = [entry for entry in sys.path if not _is_here(entry)]
        spec = _frozen_importlib_external.PathFinder.find_spec("sitecustomize", path)
        if spec is None or spec.loader is None:
            return
        module = _frozen_importlib.module_from_spec(spec)
    except Exception:
        return
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


def _bootstrap() -> None:
    global _armed
    try:
        taken = _take_variable()
        if taken is not None:
            _restore_pythonpath(taken[1])
        _restore_sys_path()
        if taken is not None:
            _armed = _arm(taken[0], taken[2])
            _wrap_signal()
            os.register_at_fork(after_in_child=_after_fork_in_child)
    except Exception:
        pass


_bootstrap()
_run_shadowed()
