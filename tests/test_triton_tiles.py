"""The Triton CFF kernel's tile lists: each dtype and pass is tuned over its own tiles only."""

import pytest
import torch

triton = pytest.importorskip("triton")
from icnet_kernels.triton import cascade_feature_fusion as cff  # noqa: E402


def every_tile():
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for tiles in cff.TILES.values() for m, n, k, w, s in tiles]


@pytest.mark.parametrize("dtype, kind", [(torch.float32, "float"), (torch.float16, "half"), (torch.bfloat16, "half")])
@pytest.mark.parametrize("gather", [False, True], ids=["taps", "gather"])
def test_each_dtype_and_pass_keeps_its_own_tiles(dtype, kind, gather):
    kept = cff._tiles_for_pass(every_tile(), {"low_ptr": torch.empty(1, dtype=dtype)}, ADD_GATHER=gather,
                               HAS_TAPS=not gather)
    assert sorted(map(cff._tile, kept)) == sorted(cff.TILES[kind, "gather" if gather else "taps"])


def test_untuned_builds_keep_the_first_tile_of_each_list(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("ICNET_TRITON_AUTOTUNE", "0")
    assert [cff._tile(c) for c in cff._configs()] == [tiles[0] for tiles in cff.TILES.values()]
    monkeypatch.setenv("ICNET_TRITON_AUTOTUNE", "1")
    assert len(cff._configs()) == len({tile for tiles in cff.TILES.values() for tile in tiles})
