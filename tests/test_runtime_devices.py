"""Device profiles and the numbers bench derives from them (no model needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from edgepack.runtime.bench import check_budget, estimate_decode, weight_bytes_per_token
from edgepack.runtime.runner import DEVICES
from edgepack.targets.devices import PROFILES, DeviceProfile, get_profile
from onnx import TensorProto, helper, numpy_helper

from edgepack.errors import EdgepackError


def test_profiles_are_usable() -> None:
    assert {"pixel-8", "galaxy-s24", "raspberry-pi-5", "jetson-orin-nano", "server-h100"} <= set(PROFILES)
    for name, p in PROFILES.items():
        assert p.name == name and p.device in DEVICES and p.threads >= 1 and p.source
        assert p.memory_bandwidth_gbs > 0 and 1024 <= p.app_memory_mib <= 80 * 1024


def test_profile_typo_lists_every_name() -> None:
    with pytest.raises(EdgepackError, match="did you mean raspberry-pi-5") as err:
        get_profile("raspbery-pi-5")
    assert all(name in str(err.value) for name in PROFILES) and "\n" not in str(err.value)


def test_estimate_is_bytes_over_bandwidth() -> None:
    profile = DeviceProfile("x", 10.0, 1000, 1, "cpu", True, "test")
    report = {"prompt_len": 10, "gen": 9, "kv": {"bytes_per_position": 1000}}
    est = estimate_decode(profile, report, weight_bytes=85_000)
    assert est.kv_bytes == 15_000  # mean context 10 + (9 + 1) / 2
    assert est.tokens_per_s == pytest.approx(10e9 / 100_000)


def test_budget_counts_what_the_device_shares() -> None:
    phone = DeviceProfile("phone", 10.0, 1000, 4, "cpu", True, "test")
    jetson = DeviceProfile("jetson", 10.0, 1000, 4, "cuda", True, "test")
    h100 = DeviceProfile("h100", 10.0, 1000, 4, "cuda", False, "test")
    cpu_run = {"device": "cpu", "peak_rss_mib": 900.0, "gpu_memory_mib": None}
    gpu_run = {"device": "cuda", "peak_rss_mib": 700.0, "gpu_memory_mib": 600.0}
    assert check_budget(phone, cpu_run).passed is True
    assert check_budget(jetson, gpu_run).passed is False  # 700 + 600 of one shared 1000
    assert check_budget(h100, gpu_run).passed is True  # only the 600 on the card counts
    assert check_budget(h100, {**gpu_run, "gpu_memory_mib": None}).passed is None


def test_weight_bytes_skip_tables_that_are_only_gathered(tmp_path: Path) -> None:
    table = numpy_helper.from_array(np.zeros((100, 8), np.float32), "table")  # embedding: one row per token
    head = numpy_helper.from_array(np.zeros((8, 100), np.float32), "head")  # lm_head: read whole
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["x"]),
        helper.make_node("MatMul", ["x", "head"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 100])],
        [table, head],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert weight_bytes_per_token(path) == 8 * 100 * 4
