"""The Triton kernels compile for the GPUs they target, without a GPU, and access memory as intended.

The interpreter checks their arithmetic but not that Triton's compiler accepts them (types, dot shapes,
shared memory), which a GPU session would otherwise find out first. tests/compile_triton_launches.py runs
every launcher on ICNet's shapes and compiles each launch for sm_80 and sm_90 with the specialisation a real
launch gets, so the PTX shows how each kernel reads and writes global memory and the machine code how many
registers it needs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent

# Kernels whose every 16-bit tensor is read and written along its unit-stride channels in channels_last:
# with ICNet's channel counts (multiples of 8) each such access moves 16 bytes (st.global.v4.b32, or a 16-byte
# ld.global.v4 / cp.async), never a single 2-byte element. The segmentation head writes 19 channels (or uint8
# labels) per pixel and pyramid_pool_sum reads one channel plane per program: neither can.
SIXTEEN_BYTE_KERNELS = ("_cascade_feature_fusion_fwd_kernel", "_shortcut_border_kernel", "_conv2d_epilogue_fwd_kernel",
                        "_conv2d_epilogue_sum_kernel", "_max_pool_fwd_kernel", "_pyramid_expansion_epilogue_kernel")


@pytest.fixture(scope="module", params=[80, 90], ids=["sm80", "sm90"])
def compiled(request):
    """(arch, the script's JSON) for one target architecture."""
    # without TRITON_INTERPRET: under it @triton.jit makes interpreted functions, which do not compile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "tests.compile_triton_launches", str(request.param)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("this Triton has no ptxas to compile with")
    assert done.returncode == 0, done.stderr[-3000:]
    return request.param, json.loads(done.stdout)


def test_every_triton_kernel_compiles_as_launched(compiled):
    arch, found = compiled
    launched = {record["kernel"] for record in found["launches"]}
    assert launched == set(found["kernels"]), f"sm_{arch}: kernels never launched: {set(found['kernels']) - launched}"
    wide = {record["kernel"] for record in found["launches"] if record.get("wide")}
    assert wide == {"_cascade_feature_fusion_fwd_kernel", "_shortcut_border_kernel"}


def test_channels_last_16_bit_tiles_move_16_bytes_per_access(compiled):
    arch, found = compiled
    for record in found["launches"]:
        if record["kernel"] not in SIXTEEN_BYTE_KERNELS or record["dtype"] != "float16":
            continue
        accesses = set(record["accesses"])
        what = f"sm_{arch} {record['kernel']} {record['flags']}: {sorted(accesses)}"
        assert "st.global.v4.b32" in accesses, f"no 16-byte stores: {what}"
        assert accesses & {"ld.global.v4.b32", "cp.async 16"}, f"no 16-byte loads: {what}"
        assert not accesses & {"ld.global.b16", "st.global.b16"}, f"2-byte accesses: {what}"


# Shared memory a block may use, by architecture (the opt-in maximum: 163 KiB on sm_80, 227 KiB on sm_90).
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}


# pyramid_pool_sum's program, one channel plane through four small dots, spills a few hundred bytes in float32
# (and in float16 on sm_80) whatever its tile; on a GPU ICNet folds the pyramid pooling into conv5_4 instead.
SPILLS_ALLOWED = {"_pyramid_pool_sum_kernel"}


def test_launches_fit_registers_and_shared_memory(compiled):
    """A kernel that spills registers to its stack runs its inner loop through local memory; one past the
    shared memory limit does not launch."""
    arch, found = compiled
    for record in found["launches"]:
        what = f"sm_{arch} {record['kernel']} {record['dtype']} {record['flags']}"
        assert record["shared_bytes"] <= SHARED_MEMORY_LIMIT[arch], f"{what}: {record['shared_bytes']} bytes shared"
        if record["kernel"] not in SPILLS_ALLOWED:
            assert record["stack_bytes"] == 0, (f"{what}: {record['registers']} registers, "
                                                f"{record['stack_bytes']} bytes of stack")
