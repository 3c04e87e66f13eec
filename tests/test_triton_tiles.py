"""The Triton CFF kernel's tile lists: each dtype and pass is tuned over its own tiles only, and an untuned
build runs the first tile of its list without the autotuner."""

import pytest
import torch

triton = pytest.importorskip("triton")
from icnet_kernels.triton import cascade_feature_fusion as cff  # noqa: E402


def every_tile():
    return [cff._config(tile) for tiles in cff.TILES.values() for tile in tiles]


@pytest.mark.parametrize("dtype, kind", [(torch.float32, "float"), (torch.float16, "half"), (torch.bfloat16, "half")])
@pytest.mark.parametrize("gather", [False, True], ids=["taps", "gather"])
def test_each_dtype_and_pass_keeps_its_own_tiles(dtype, kind, gather):
    kept = cff._tiles_for_pass(every_tile(), {"low_ptr": torch.empty(1, dtype=dtype)}, ADD_GATHER=gather,
                               HAS_TAPS=not gather)
    assert sorted(map(cff._tile, kept)) == sorted(cff.TILES[kind, "gather" if gather else "taps"])


def test_the_autotuner_may_try_every_tile():
    assert sorted(map(cff._tile, cff._configs())) == sorted({tile for tiles in cff.TILES.values() for tile in tiles})


@pytest.mark.parametrize("dtype, kind", [(torch.float32, "float"), (torch.float16, "half"), (torch.bfloat16, "half")])
@pytest.mark.parametrize("gather", [False, True], ids=["taps", "gather"])
def test_untuned_builds_run_the_first_tile_of_their_list(monkeypatch, dtype, kind, gather):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("ICNET_TRITON_AUTOTUNE", "0")
    assert not cff._tuning()
    assert cff._tile(cff._untuned_config(dtype, gather)) == cff.TILES[kind, "gather" if gather else "taps"][0]
    monkeypatch.setenv("ICNET_TRITON_AUTOTUNE", "1")
    assert cff._tuning()


def test_the_interpreter_runs_one_small_tile_untuned(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ICNET_TRITON_AUTOTUNE", "1")
    assert not cff._tuning()
    assert cff._untuned_config(torch.float16, True).kwargs == {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
