"""Tensors on a CUDA device round-trip too; skipped, with its reason, without one."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_bit_equal

import mmcore

needs_cuda_device = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.gpu
@needs_cuda_device
def test_cuda_tensors_round_trip(store: mmcore.ModelStore) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    models = {
        f"m{i}": {
            "w": torch.randn(64, 32, device="cuda", generator=g),
            "h": torch.randn(7, device="cuda", generator=g).half(),
            "t": torch.randn(5, 4, device="cuda", generator=g).t(),
        }
        for i in range(4)
    }
    v = store.save(models)
    on_gpu = store.load(v, device="cuda")
    on_cpu = store.load(v)
    one = store.load_model(v, "m2", device="cuda:0")
    for name, sd in models.items():
        for key, t in sd.items():
            assert on_gpu[name][key].device.type == "cuda"
            assert on_cpu[name][key].device.type == "cpu"
            assert_bit_equal(on_gpu[name][key].cpu(), t.cpu())
            assert_bit_equal(on_cpu[name][key], t.cpu())
    assert_bit_equal(one["w"].cpu(), models["m2"]["w"].cpu())
