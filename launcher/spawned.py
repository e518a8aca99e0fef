"""One rank of `ddplaunch.spawn`: run fn(rank, *args) from the caller's payload, send its value back.

The worker is `python -m ddplaunch.spawned FOLDER`, with the torchrun environment like any
rank. FOLDER (the caller's, private) holds `payload.pkl`: the caller's sys.path and working
directory, how to find its `__main__` (multiprocessing's own preparation data, applied with
multiprocessing's own `prepare`, so a function is found exactly as `mp.spawn` finds it), and
the function and its arguments, pickled by name or, for one defined in a notebook, by value
(cloudpickle). The return value goes to `result-<RANK>.pkl`, written whole (renamed into
place). An exception ends the rank as in any script (its traceback on stderr, from fn down,
exit code 1) and is also written to TORCHELASTIC_ERROR_FILE in torch's `@record` format, so
`JobFailed` carries the whole traceback however long.
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Any

PAYLOAD = "payload.pkl"
IMPORTING_MAIN = "DDPLAUNCH_SPAWN_IMPORTING_MAIN"  # set while a rank runs the caller's main script


def result_path(folder: str, rank: int) -> str:
    return os.path.join(folder, f"result-{rank}.pkl")


def load_payload(folder: str) -> tuple[Any, tuple[Any, ...]]:
    """The caller's function and arguments, found as the caller's process would find them."""
    with open(os.path.join(folder, PAYLOAD), "rb") as file:
        payload = pickle.load(file)  # plain data: the preparation dict and two byte strings
    import multiprocessing.spawn

    # A spawn() at the top level of the caller's main script must not start ranks of its own
    # here: ddplaunch.api.spawn reads this (this module runs as __main__, not by its name).
    os.environ[IMPORTING_MAIN] = "1"
    try:
        multiprocessing.spawn.prepare(payload["preparation"])  # sys.path, cwd, __main__ as __mp_main__
    finally:
        del os.environ[IMPORTING_MAIN]
    return pickle.loads(payload["fn"]), pickle.loads(payload["args"])


def write_result(folder: str, rank: int, value: object) -> None:
    try:
        data = pickle.dumps(value)
    except Exception as exc:
        raise TypeError(
            f"ddplaunch.spawn: rank {rank} returned a {type(value).__name__} that cannot be pickled "
            f"({exc}); return plain data (numbers, strings, lists, dicts, tensors moved to the CPU)."
        ) from None
    final = result_path(folder, rank)
    with open(final + ".part", "wb") as file:
        file.write(data)
    os.replace(final + ".part", final)


def user_traceback(exc: BaseException) -> str:
    """The traceback from fn down: this module's frames (and runpy's) are not the user's."""
    import traceback

    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def write_error_file(text: str, exc: BaseException) -> None:
    """torch's @record format, which launcher.report.read_error_file reads back."""
    import json
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": f"{type(exc).__name__}: {exc}",
                          "extraInfo": {"py_callstack": text, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w", encoding="utf-8") as file:
            json.dump(record, file)
    except OSError:
        pass  # the traceback is on stderr all the same


def main(argv: list[str]) -> None:
    (folder,) = argv
    rank = int(os.environ["RANK"])
    fn, args = load_payload(folder)
    try:
        value = fn(rank, *args)
        write_result(folder, rank, value)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        text = user_traceback(exc)
        write_error_file(text, exc)
        sys.stderr.write(text)
        sys.stderr.flush()
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
