"""The Triton kernels compile for the GPUs they target, without a GPU: the interpreter checks their arithmetic
but not that Triton's compiler accepts them (types, dot shapes, shared memory), which a GPU session would
otherwise find out first. Every kernel is compiled with the tiles its launcher uses on a GPU (the CFF kernel
with the first tile of each dtype, the one an untuned build runs)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent

# Run without TRITON_INTERPRET: under it @triton.jit makes interpreted functions, which do not compile.
COMPILE = r"""
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from icnet_kernels.triton import (cascade_feature_fusion, cff_shortcut_border, conv2d_epilogue, max_pool,
                                   pyramid_expansion_epilogue, pyramid_pool_sum, segmentation_head)

target = GPUTarget("cuda", int(sys.argv[1]), 32)
TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


# pointers: {argument: type}; floats: the float32 scalar arguments; every other argument is an int32
def compile_kernel(kernel, pointers, constexprs, num_warps, floats=(), num_stages=3):
    signature = {name: pointers.get(name, "constexpr" if name in constexprs else "fp32" if name in floats else "i32")
                 for name in kernel.arg_names}
    triton.compile(ASTSource(kernel, signature, constexprs), target=target,
                   options={"num_warps": num_warps, "num_stages": num_stages})


def precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


for dtype in (torch.float32, torch.float16):
    block_x, block_k, block_c, warps = segmentation_head._tiles(19, 128, 2049)
    for labels in (False, True):
        pointers = {"feat_ptr": TYPES[dtype], "weight_ptr": TYPES[dtype], "bias_ptr": TYPES[dtype],
                    "out_ptr": "*u8" if labels else TYPES[dtype]}
        compile_kernel(segmentation_head._segmentation_head_fwd_kernel, pointers,
                       {"ZOOM": 8, "LABELS": labels, "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
                        "BLOCK_X": block_x, "BLOCK_K": block_k, "BLOCK_C": block_c}, warps)
    block_p, block_c, warps = max_pool._tiles(64)
    compile_kernel(max_pool._max_pool_fwd_kernel, {"x_ptr": TYPES[dtype], "out_ptr": TYPES[dtype]},
                   {"KERNEL": 3, "STRIDE": 2, "PADDING": 1, "BLOCK_P": block_p, "BLOCK_C": block_c}, warps)
    block_m, block_n, block_k, warps = conv2d_epilogue._tiles(dtype)
    tensors = {name: TYPES[dtype] for name in ("x_ptr", "w_ptr", "bias_ptr", "res_ptr", "out_ptr")}
    for split_k in (1, 4):
        compile_kernel(conv2d_epilogue._conv2d_epilogue_fwd_kernel, {**tensors, "part_ptr": "*fp32"},
                       {"KSIZE": 3, "STRIDE": 1, "PADDING": 2, "DILATION": 2, "SPLIT_K": split_k, "HAS_RESIDUAL": True,
                        "RELU": True, "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
                        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, warps)
    compile_kernel(conv2d_epilogue._conv2d_epilogue_sum_kernel, {**tensors, "part_ptr": "*fp32"},
                   {"SPLIT_K": 4, "HAS_RESIDUAL": True, "RELU": True, "BLOCK_M": block_m, "BLOCK_N": block_n}, warps)

    block_p, block_c, block_k, warps = pyramid_expansion_epilogue._tiles()
    compile_kernel(pyramid_expansion_epilogue._pyramid_expansion_epilogue_kernel,
                   {"y_ptr": TYPES[dtype], "grid_ptr": "*fp32", "bias_ptr": TYPES[dtype], "out_ptr": TYPES[dtype],
                    "expand_h_ptr": "*fp32", "expand_w_ptr": "*fp32", "row_h_ptr": "*i32", "row_w_ptr": "*i32"},
                   {"RELU": True, "PRECISION": precision(dtype), "BLOCK_P": block_p, "BLOCK_C": block_c,
                    "BLOCK_K": block_k}, warps)
    compile_kernel(pyramid_pool_sum._pyramid_pool_sum_kernel,
                   {"x_ptr": TYPES[dtype], "out_ptr": TYPES[dtype], "reduce_h_ptr": "*fp32", "reduce_w_ptr": "*fp32",
                    "expand_h_ptr": "*fp32", "expand_w_ptr": "*fp32", "bin_ptr": "*i32"},
                   {"BLOCK_H": 32, "BLOCK_W": 128, "BLOCK_R": 16, "PRECISION": precision(dtype)}, 4)

    block_m, block_n, block_k, warps = cff_shortcut_border._tiles(dtype)
    compile_kernel(cff_shortcut_border._shortcut_border_kernel,
                   {"low_ptr": TYPES[dtype], "w_ptr": TYPES[dtype], "corr_ptr": "*fp32"},
                   {"WIDE": False, "PRECISION": precision(dtype), "BLOCK_M": block_m, "BLOCK_N": block_n,
                    "BLOCK_K": block_k}, warps, floats=("zoom_x",))
    tile = (cascade_feature_fusion._FLOAT_TILES if dtype == torch.float32 else cascade_feature_fusion._HALF_TILES)[0]
    cff_pointers = {name: TYPES[dtype] for name in ("low_ptr", "high_ptr", "w_low_ptr", "w_high_ptr", "bias_ptr")}
    cff_pointers.update(gather_ptr="*fp32", corr_ptr="*fp32", out_ptr=TYPES[dtype])
    passes = {"general": dict(RESIZE=True, HAS_TAPS=True, HAS_PROJ=True, ADD_GATHER=False, ADD_BORDER=False,
                              EPILOGUE=True),
              "low-resolution conv": dict(RESIZE=False, HAS_TAPS=True, HAS_PROJ=False, ADD_GATHER=False,
                                          ADD_BORDER=False, EPILOGUE=False),
              "shortcut pass": dict(RESIZE=True, HAS_TAPS=False, HAS_PROJ=True, ADD_GATHER=True, ADD_BORDER=True,
                                    EPILOGUE=True)}
    for name, flags in passes.items():
        pointers = {**cff_pointers, "out_ptr": "*fp32"} if name == "low-resolution conv" else cff_pointers
        for wide in (False, True) if name == "shortcut pass" else (False,):
            compile_kernel(cascade_feature_fusion._cascade_feature_fusion_fwd_kernel.fn, pointers,
                           {"ALIGN": True, **flags, "WIDE": wide, "PRECISION": precision(dtype),
                            "BLOCK_M": tile[0], "BLOCK_N": tile[1], "BLOCK_K": tile[2]}, tile[3],
                           floats=("scale_y", "scale_x", "zoom_y", "zoom_x"), num_stages=tile[4])
print("compiled")
"""


@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
def test_triton_kernels_compile_for_the_gpus_they_target(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", COMPILE, str(arch)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("this Triton has no ptxas to compile with")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
