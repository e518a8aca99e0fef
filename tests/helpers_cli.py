"""Shared helpers for the CLI-level tests: fake nvidia-smi scripts and running `python -m launcher`.

Nothing here touches the test process's os.environ: every subprocess gets its own env dict.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 30

# Variables from the caller's shell that would change what the launcher decides.
_SCRUBBED = ("CUDA_VISIBLE_DEVICES", "NO_COLOR", "OMP_NUM_THREADS", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


def gpu_uuid(index: int) -> str:
    return f"GPU-00000000-0000-0000-0000-{index:012d}"


def nvidia_smi_lines(count: int) -> list[str]:
    return [f"{i}, {gpu_uuid(i)}" for i in range(count)]


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def fake_nvidia_smi_script(stdout_lines: list[str], exit_code: int = 0) -> str:
    """A /bin/sh script that prints `stdout_lines` and exits with `exit_code` (builtins only)."""
    body = "".join(f"printf '%s\\n' {_shell_quote(line)}\n" for line in stdout_lines)
    return f"#!/bin/sh\n{body}exit {exit_code}\n"


# name -> (stdout lines, exit code)
FAKE_NVIDIA_SMI = {
    "8gpu": (nvidia_smi_lines(8), 0),
    "2gpu": (nvidia_smi_lines(2), 0),
    "nogpu": (["No devices were found"], 6),
    "broken": (["this is not, a, gpu list", "garbage"], 0),
    "failing": (["Failed to initialize NVML: Driver/library version mismatch"], 9),
}


def install_fake_nvidia_smi(bin_dir: Path, variant: str | None) -> Path:
    """Write `nvidia-smi` into bin_dir (or nothing, for variant None); return bin_dir."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    if variant is not None:
        lines, code = FAKE_NVIDIA_SMI[variant]
        exe = bin_dir / "nvidia-smi"
        exe.write_text(fake_nvidia_smi_script(lines, code))
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


def cli_env(bin_dir: Path, *, only_bin_dir: bool = False, **extra: str) -> dict[str, str]:
    """A copy of os.environ with bin_dir first on PATH (or alone on it) and `extra` added.

    only_bin_dir=True hides any real nvidia-smi on this machine (the CLI and the workers are
    started through absolute paths, so they need nothing from PATH).
    """
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED and not k.startswith("PET_")}
    env["PATH"] = str(bin_dir) if only_bin_dir else str(bin_dir) + os.pathsep + env.get("PATH", "")
    env["DDPLAUNCH_CLUSTER"] = "none"  # a CI runner inside a Slurm job must not change the plans
    env.update(extra)
    return env


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(args: list[str], env: dict[str, str], *, cwd: Path = REPO, timeout: float = CLI_TIMEOUT_S) -> CliResult:
    done = subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return CliResult(done.returncode, done.stdout, done.stderr)


def table_rows(dry_run_output: str) -> list[list[str]]:
    """The worker rows of a dry-run table, split on runs of spaces (header excluded)."""
    lines = dry_run_output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("node  host"))
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def table_header(dry_run_output: str) -> list[str]:
    line = next(line for line in dry_run_output.splitlines() if line.startswith("node  host"))
    return [cell.strip() for cell in line.split("  ") if cell.strip()]


def table_column(dry_run_output: str, name: str) -> list[str]:
    """One column of the dry-run table by header name (cells contain no spaces)."""
    header = table_header(dry_run_output)
    index = header.index(name)
    return [row[index] for row in table_rows(dry_run_output)]
