"""GPU discovery (nvidia-smi, no torch) and the --gpu-ids -> CUDA_VISIBLE_DEVICES mapping.

Everything but `discover_gpus` is pure, so the mapping rules are tested by tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ddplaunch.errors import GpuDiscoveryError, LaunchError

NVIDIA_SMI_QUERY = ("--query-gpu=index,uuid,pci.bus_id", "--format=csv,noheader")
NVIDIA_SMI_TIMEOUT_S = 20.0
# nvidia-smi exits 6 with "No devices were found" on a box with a driver and no GPU.
NVIDIA_SMI_NO_DEVICES = 6

# [0-9], not \d: \d also takes '٣', which int() reads as 3; fullmatch: "$" lets a final "\n" in
_ID_TOKEN = re.compile(r"[0-9]+|GPU-[0-9A-Za-z-]+|MIG-[0-9A-Za-z/-]+")
# nvidia-smi writes 00000000:1B:00.0 (older drivers 0000:1B:00.0); sysfs 0000:1b:00.0.
_PCI_BUS_ID = re.compile(r"^([0-9a-fA-F]{1,8}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")


@dataclass(frozen=True)
class Gpu:
    """One physical GPU as nvidia-smi numbers it."""

    index: int
    uuid: str
    pci_address: str = ""  # as sysfs names it (0000:1b:00.0); "" if nvidia-smi did not say

    def matches(self, token: str) -> bool:
        """True if `token` (an index, a UUID or a unique UUID prefix) names this GPU."""
        if token.isdigit():
            return int(token) == self.index
        return self.uuid == token or (len(token) > 4 and self.uuid.startswith(token))


@dataclass(frozen=True)
class DeviceMap:
    """What the workers of one node see: CUDA_VISIBLE_DEVICES and, per local rank, the GPU."""

    cuda_visible_devices: str | None  # None: leave the user's value untouched
    physical: tuple[str, ...]  # per local rank: the physical GPU index, or "" if unknown


def parse_nvidia_smi(output: str) -> tuple[Gpu, ...]:
    """Parse `nvidia-smi --query-gpu=index,uuid,pci.bus_id --format=csv,noheader`.

    The bus id column is optional, so an answer to the older two-column query still reads.
    """
    gpus: list[Gpu] = []
    for line in output.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        address = sysfs_pci_address(parts[2]) if len(parts) == 3 else ""
        if len(parts) not in (2, 3) or not parts[0].isdigit() or not parts[1] or address is None:
            raise GpuDiscoveryError(
                f"could not read the GPU list: nvidia-smi printed {line.strip()!r}, "
                "expected 'index, uuid, pci bus id'. Check the NVIDIA driver (run nvidia-smi by "
                "hand), or pass --nproc N without --gpu-ids to launch without GPU discovery."
            )
        gpus.append(Gpu(index=int(parts[0]), uuid=parts[1], pci_address=address))
    return tuple(gpus)


def sysfs_pci_address(bus_id: str) -> str | None:
    """nvidia-smi's bus id in the form of /sys/bus/pci/devices names (as torch formats it), or None."""
    found = _PCI_BUS_ID.match(bus_id)
    if found is None:
        return None
    domain, bus, device, function = found.groups()
    return f"{int(domain, 16):04x}:{bus.lower()}:{device.lower()}.{function}"


def discover_gpus() -> tuple[Gpu, ...]:
    """All GPUs on this machine per nvidia-smi; empty if there is no nvidia-smi or no GPU."""
    import shutil
    import subprocess  # only here: most launches never ask nvidia-smi, and this costs 5 ms

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        done = subprocess.run(
            [exe, *NVIDIA_SMI_QUERY],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=NVIDIA_SMI_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GpuDiscoveryError(
            f"could not run {exe} to list GPUs ({exc}). Check the NVIDIA driver, "
            "or pass --nproc N without --gpu-ids to skip GPU discovery."
        ) from None
    if done.returncode == NVIDIA_SMI_NO_DEVICES:
        return ()
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise GpuDiscoveryError(
            f"nvidia-smi failed (exit {done.returncode}: {said[0] if said else 'no output'}). "
            "Fix the NVIDIA driver, or pass --nproc N without --gpu-ids to skip GPU discovery."
        )
    return parse_nvidia_smi(done.stdout)


def is_gpu_id(token: str) -> bool:
    """An index as nvidia-smi numbers GPUs, or a GPU/MIG UUID."""
    return _ID_TOKEN.fullmatch(token) is not None


def parse_gpu_ids(text: str) -> tuple[str, ...]:
    """Validate the --gpu-ids list: indices or UUIDs, comma separated, no duplicates."""
    tokens = [t.strip() for t in text.split(",")]
    for token in tokens:
        if not token:
            raise LaunchError(
                f"--gpu-ids {text!r} has an empty entry. Give a comma-separated list "
                "of GPU indices or UUIDs with no gaps, e.g. --gpu-ids 0,2,4,6."
            )
        if not is_gpu_id(token):
            raise LaunchError(
                f"--gpu-ids: {token!r} is not a GPU index or UUID. Use non-negative "
                "indices as nvidia-smi numbers them (e.g. --gpu-ids 0,2) or UUIDs (GPU-...)."
            )
    seen: set[str] = set()
    for token in tokens:
        if token in seen:
            raise LaunchError(
                f"--gpu-ids lists GPU {token} twice. Each GPU can serve one worker; "
                "list each id once."
            )
        seen.add(token)
    return tuple(tokens)


def visible_gpus(gpus: tuple[Gpu, ...], cuda_visible_devices: str | None) -> tuple[Gpu, ...]:
    """The GPUs a process may use: all of them, or those CUDA_VISIBLE_DEVICES names, in its order."""
    if cuda_visible_devices is None:
        return gpus
    visible: list[Gpu] = []
    for token in (t.strip() for t in cuda_visible_devices.split(",")):
        found = [g for g in gpus if g.matches(token)] if token else []
        if len(found) != 1:
            break  # CUDA stops at the first id it cannot use
        if found[0] in visible:
            return ()  # a repeated GPU hides them all (torch.cuda._parse_visible_devices)
        visible.append(found[0])
    return tuple(visible)


def map_gpu_ids(
    requested: tuple[str, ...],
    gpus: tuple[Gpu, ...],
    cuda_visible_devices: str | None,
) -> DeviceMap:
    """Check --gpu-ids against this host and give every worker the whole list.

    LOCAL_RANK i then uses cuda:i, which is physical GPU requested[i]: the contract that
    Accelerate, Lightning and plain `cuda:LOCAL_RANK` scripts rely on.
    """
    if not gpus:
        raise LaunchError(
            f"--gpu-ids {','.join(requested)}: no GPU found on this machine (nvidia-smi is "
            "missing or lists none). Drop --gpu-ids to run on CPU, e.g. --nproc 2."
        )
    allowed = visible_gpus(gpus, cuda_visible_devices)
    physical: list[str] = []
    for token in requested:
        matches = [g for g in gpus if g.matches(token)]
        if len(matches) != 1:
            listing = ", ".join(str(g.index) for g in gpus)
            raise LaunchError(
                f"--gpu-ids: GPU {token} is not on this machine (nvidia-smi lists {listing}). "
                "Use indices from nvidia-smi's index column or full GPU UUIDs."
            )
        gpu = matches[0]
        if gpu not in allowed:
            allowed_text = ",".join(str(g.index) for g in allowed) or "none"
            raise LaunchError(
                f"--gpu-ids: GPU {token} is outside CUDA_VISIBLE_DEVICES="
                f"{cuda_visible_devices} (set by your scheduler or shell), which allows "
                f"physical GPUs {allowed_text}. Pick ids from that list, or unset "
                "CUDA_VISIBLE_DEVICES."
            )
        physical.append(str(gpu.index))
    if len(set(physical)) != len(physical):
        raise LaunchError(
            f"--gpu-ids {','.join(requested)} names the same GPU twice (as an index and a "
            "UUID). List each GPU once."
        )
    return DeviceMap(cuda_visible_devices=",".join(requested), physical=tuple(physical))


def default_device_map(
    nproc: int, gpus: tuple[Gpu, ...], cuda_visible_devices: str | None
) -> DeviceMap:
    """Without --gpu-ids, CUDA_VISIBLE_DEVICES passes through; show which GPU cuda:i is."""
    allowed = visible_gpus(gpus, cuda_visible_devices)
    physical = tuple(str(allowed[i].index) if i < len(allowed) else "" for i in range(nproc))
    return DeviceMap(cuda_visible_devices=None, physical=physical)
