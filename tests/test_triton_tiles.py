"""The Triton CFF kernel's tile lists: each dtype is tuned over its own tiles only."""

import pytest
import torch

triton = pytest.importorskip("triton")
from icnet_kernels.triton import cascade_feature_fusion as cff  # noqa: E402


def tile(config):
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"], config.num_warps,
            config.num_stages)


@pytest.mark.parametrize("dtype, expected", [(torch.float32, cff._FLOAT_TILES), (torch.float16, cff._HALF_TILES),
                                             (torch.bfloat16, cff._HALF_TILES)])
def test_each_dtype_keeps_its_own_tiles(dtype, expected):
    every = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
             for m, n, k, w, s in cff._HALF_TILES + cff._FLOAT_TILES]
    kept = cff._tiles_for_dtype(every, {"low_ptr": torch.empty(1, dtype=dtype)})
    assert [tile(c) for c in kept] == expected


def test_untuned_builds_keep_one_tile_per_dtype(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("ICNET_TRITON_AUTOTUNE", "0")
    assert [tile(c) for c in cff._configs()] == [cff._HALF_TILES[0], cff._FLOAT_TILES[0]]
    monkeypatch.setenv("ICNET_TRITON_AUTOTUNE", "1")
    assert len(cff._configs()) == len(cff._HALF_TILES) + len(cff._FLOAT_TILES)
