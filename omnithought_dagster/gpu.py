"""Distinct GPUs for concurrent GPU steps on one machine: leases on per-device lock files.

The `gpu` concurrency pool bounds how many GPU steps run at once; this decides *which*
devices each one gets, so two steps never share a GPU: a step leases the devices it needs
(tensor x data parallel for a vLLM server, nproc_per_node for training, one for evaluation)
by taking an exclusive `flock` on `<lock_dir>/gpu-<device>.lock` and hands them to the
processes it launches as CUDA_VISIBLE_DEVICES. The kernel drops a dead process's locks, so a
crashed run never holds a GPU. With no devices configured (CPU machines) a lease is empty and
nothing is set. No Dagster here.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class GPULeaseTimeout(TimeoutError):
    """Not enough free devices within the wait; the message says who holds them."""


class GPUSlots:
    def __init__(self, devices: list[str], lock_dir: str | Path, *, wait_s: float = 3600.0, poll_s: float = 0.5):
        self.devices = [str(d) for d in devices]
        self.lock_dir = Path(lock_dir)
        self.wait_s = wait_s
        self.poll_s = poll_s

    @contextmanager
    def lease(self, count: int, *, holder: str = "") -> Iterator[list[str]]:
        """`count` devices no other lease holds, for the duration of the block ([] without devices)."""
        if not self.devices or count <= 0:
            yield []
            return
        if count > len(self.devices):
            raise ValueError(f"{count} GPUs asked for, {len(self.devices)} configured ({','.join(self.devices)})")
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        while True:
            held = self._try(count, holder)
            if held is not None:
                break
            if time.monotonic() >= deadline:
                raise GPULeaseTimeout(
                    f"no {count} free GPUs of {','.join(self.devices)} within {self.wait_s:.0f} s; held by: {self.holders()}"
                )
            time.sleep(self.poll_s)
        try:
            yield [device for device, _ in held]
        finally:
            for _, handle in held:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()

    def holders(self) -> dict[str, str]:
        """device -> what its lock file says about the current holder (for error messages)."""
        out = {}
        for device in self.devices:
            path = self._path(device)
            try:
                with path.open() as handle:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(handle, fcntl.LOCK_UN)
            except BlockingIOError:
                out[device] = path.read_text().strip() or "?"
            except FileNotFoundError:
                continue
        return out

    def _try(self, count: int, holder: str):
        held = []
        for device in self.devices:
            handle = self._path(device).open("a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} {holder}".strip())
            handle.flush()
            held.append((device, handle))
            if len(held) == count:
                return held
        for _, handle in held:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        return None

    def _path(self, device: str) -> Path:
        return self.lock_dir / f"gpu-{device}.lock"


def visible_devices_env(devices: list[str]) -> dict[str, str]:
    return {"CUDA_VISIBLE_DEVICES": ",".join(devices)} if devices else {}


def slots_from_config(config) -> GPUSlots:
    """The project's GPU slots (operations.gpu_devices; none on CPU machines)."""
    ops = config.operations
    return GPUSlots(ops.gpu_devices, ops.gpu_lock_dir, wait_s=ops.gpu_wait_s)
