"""GPU leases: concurrent GPU steps on one machine get distinct devices; a dead holder frees its devices."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

from omnithought_dagster.config import LLMConfig
from omnithought_dagster.gpu import GPULeaseTimeout, GPUSlots, visible_devices_env


def test_leases_are_distinct_and_released(tmp_path):
    slots = GPUSlots(["0", "1", "2", "3"], tmp_path, wait_s=0.2, poll_s=0.05)
    with slots.lease(2, holder="a") as first, slots.lease(2, holder="b") as second:
        assert len(first) == len(second) == 2 and not set(first) & set(second)
        with pytest.raises(GPULeaseTimeout, match="no 1 free GPUs of 0,1,2,3 within 0 s; held by"):
            with slots.lease(1):
                pass
    with slots.lease(4) as everything:
        assert sorted(everything) == ["0", "1", "2", "3"]
    with pytest.raises(ValueError, match="5 GPUs asked for, 4 configured"):
        with slots.lease(5):
            pass


def test_a_waiting_lease_gets_the_devices_when_they_are_freed(tmp_path):
    slots = GPUSlots(["0"], tmp_path, wait_s=10, poll_s=0.05)
    got = []
    with slots.lease(1, holder="first"):
        waiter = threading.Thread(target=lambda: got.append(_lease_once(slots)))
        waiter.start()
        time.sleep(0.3)
        assert not got  # still waiting
    waiter.join(5)
    assert got == [["0"]]


def _lease_once(slots):
    with slots.lease(1, holder="second") as devices:
        return devices


def test_a_killed_holder_frees_its_devices(tmp_path):
    """The kernel drops flocks of a dead process: a crashed run never keeps a GPU."""
    code = (
        "import sys, time; from omnithought_dagster.gpu import GPUSlots\n"
        f"lease = GPUSlots(['0', '1'], {str(tmp_path)!r}).lease(2, holder='doomed'); lease.__enter__()\n"
        "print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        slots = GPUSlots(["0", "1"], tmp_path, wait_s=0.2, poll_s=0.05)
        assert set(slots.holders()) == {"0", "1"} and "doomed" in slots.holders()["0"]
        with pytest.raises(GPULeaseTimeout):
            with slots.lease(1):
                pass
    finally:
        holder.kill()
        holder.wait()
    with GPUSlots(["0", "1"], tmp_path, wait_s=1).lease(2) as devices:
        assert sorted(devices) == ["0", "1"]


def test_no_devices_means_no_lease_and_no_environment(tmp_path):
    with GPUSlots([], tmp_path).lease(4) as devices:
        assert devices == [] and visible_devices_env(devices) == {}
    assert visible_devices_env(["2", "5"]) == {"CUDA_VISIBLE_DEVICES": "2,5"}


def test_a_vllm_server_leases_tensor_x_data_parallel_devices(tmp_path, monkeypatch):
    """open_backend hands the leased devices to the server it starts (the server itself needs a GPU: not started here)."""
    from omnithought_dagster.llm import choose, vllm_server

    seen = []

    @contextmanager
    def fake_server(config, **kwargs):
        seen.append(config.gpus)

        class Server:
            base_url = "http://127.0.0.1:1/v1"

        yield Server()

    monkeypatch.setattr(vllm_server.VLLMServer, "from_config", staticmethod(fake_server))
    slots = GPUSlots(["0", "1", "2", "3"], tmp_path, wait_s=0.2, poll_s=0.05)
    config = LLMConfig(backend="vllm", model=str(tmp_path), name="t", tensor_parallel_size=2, data_parallel_size=1)
    with (
        choose.open_backend(config, models_dir=tmp_path, gpu_slots=slots),
        choose.open_backend(config, models_dir=tmp_path, gpu_slots=slots),
    ):
        pass
    assert len(seen) == 2 and all(len(g.split(",")) == 2 for g in seen) and not set(seen[0].split(",")) & set(seen[1].split(","))
    pinned = config.model_copy(update={"gpus": "7"})
    with choose.open_backend(pinned, models_dir=tmp_path, gpu_slots=slots):
        pass
    assert seen[-1] == "7"  # explicit `gpus` is used as is, no lease
