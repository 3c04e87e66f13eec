"""Compiles every Triton kernel as its launcher launches it on a GPU, without a GPU: python -m
tests.compile_triton_launches ARCH prints JSON: "kernels", the names of every Triton kernel of
icnet_kernels.triton, and "launches", one record per compiled launch (kernel, dtype, layout, its boolean and
integer constexprs, the global memory accesses of its PTX: ld/st.global with their widths, and the bytes of
each cp.async copy; and from the machine code, the registers per thread and the bytes spilled to the stack).

The launchers run on CPU tensors of ICNet's shapes with the kernels' launch replaced by a compile for
sm_ARCH that takes the arguments' specialisation (integers equal to 1, multiples of 16, pointer alignment)
exactly as a launch does; nothing runs. Must run without TRITON_INTERPRET (tests/test_triton_ahead_of_time.py
starts it so).
"""

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile

os.environ["ICNET_TRITON_AUTOTUNE"] = "0"  # one tile per dtype: the one an untuned build runs

import torch  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile, make_backend  # noqa: E402
from triton.runtime import jit  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

import icnet_kernels.triton  # noqa: E402

from icnet.model import PPM_BINS  # noqa: E402
from icnet_kernels.triton import (cascade_feature_fusion, cff_shortcut_border, conv2d_epilogue,  # noqa: E402
                                  max_pool, pyramid_expansion_epilogue, pyramid_pool_sum, segmentation_head)

ACCESS = re.compile(r"(?:ld|st)\.global[.\w]*")
ASYNC_COPY = re.compile(r"cp\.async\.\w+\.shared\.global[^;]*?, (0x\w+|\d+)")  # its operand: the bytes copied
RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+)")


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of the kernel in cubin, as cuobjdump reports them: a
    kernel that spills registers keeps them on its stack."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", file.name], check=True,
                                capture_output=True, text=True).stdout
    registers, stack = RESOURCES.search(report).groups()
    return int(registers), int(stack)


def tensor(*shape, dtype, memory_format=torch.contiguous_format):
    """Zeros of shape; 4-D ones in memory_format."""
    t = torch.zeros(shape, dtype=dtype)
    return t.contiguous(memory_format=memory_format) if len(shape) == 4 else t


def launch_cff_units(dtype, memory_format) -> None:
    """The sub12 and sub24 units (the exact shortcut), and sub24 without align_corners (the general path)."""
    for cl, ch, h, w, align_corners in ((128, 64, 65, 129, True), (256, 256, 33, 65, True), (256, 256, 33, 65, False)):
        cascade_feature_fusion.cascade_feature_fusion_triton(
            tensor(1, cl, h, w, dtype=dtype, memory_format=memory_format),
            tensor(1, ch, 2 * h - 1, 2 * w - 1, dtype=dtype, memory_format=memory_format),
            tensor(128, cl, 3, 3, dtype=dtype), tensor(128, ch, dtype=dtype), tensor(128, dtype=dtype), 2,
            align_corners)


def launch_every_kernel(dtype, memory_format) -> None:
    def t(*shape):
        return tensor(*shape, dtype=dtype, memory_format=memory_format)

    launch_cff_units(dtype, memory_format)
    conv2d_epilogue.conv2d_epilogue_triton(t(1, 64, 129, 257), t(64, 64, 3, 3), t(64), t(1, 64, 129, 257), 1, 1, 1,
                                           True, 1, (129, 257))
    conv2d_epilogue.conv2d_epilogue_triton(t(1, 256, 33, 65), t(256, 256, 3, 3), t(256), t(1, 256, 33, 65), 1, 2, 2,
                                           True, 4, (33, 65))  # split-K: partial sums, then their sum
    max_pool.max_pool_triton(t(1, 64, 257, 513), 3, 2, 1)
    tables = pyramid_expansion_epilogue.pyramid_fold_tables(33, 65, PPM_BINS, align_corners=True)
    pyramid_expansion_epilogue.pyramid_expansion_epilogue_triton(
        t(1, 256, 33, 65), torch.zeros(1, 256, tables.cells), t(256), tables, True)
    pyramid_pool_sum.pyramid_pool_sum_triton(t(1, 256, 33, 65), PPM_BINS, None, None, True)
    for labels in (False, True):
        segmentation_head.segmentation_head_triton(t(1, 128, 129, 257), t(19, 128), t(19), 8, labels)


def every_kernel() -> list[str]:
    """The names of the Triton kernels defined in icnet_kernels.triton's modules."""
    names = set()
    for module_info in pkgutil.iter_modules(icnet_kernels.triton.__path__):
        module = importlib.import_module(f"icnet_kernels.triton.{module_info.name}")
        for name, value in vars(module).items():
            if isinstance(value, (jit.JITFunction, Autotuner)) and name.endswith("_kernel"):
                names.add(name)
    return sorted(names)


def main(arch: int) -> None:
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    records = []
    case = {}

    def compile_launch(kernel, *args, grid, warmup, **kwargs):
        binder = jit.create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        compiled = compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
        ptx = compiled.asm["ptx"]
        registers, stack = resource_usage(compiled.asm["cubin"])
        flags = {kernel.arg_names[path[0]]: value for path, value in constexprs.items()
                 if isinstance(value, (bool, int))}
        accesses = set(ACCESS.findall(ptx)) | {f"cp.async {int(size, 0)}" for size in ASYNC_COPY.findall(ptx)}
        records.append({"kernel": kernel.__name__, **case, "flags": flags, "accesses": sorted(accesses),
                        "registers": registers, "stack_bytes": stack, "shared_bytes": compiled.metadata.shared})

    jit.JITFunction.run = compile_launch
    pyramid_expansion_epilogue.triton_usable = lambda device: True  # its launcher checks the device itself

    for dtype, layout in ((torch.float16, "channels_last"), (torch.float32, "contiguous")):
        if arch != 90 and dtype == torch.float32:
            continue  # float32's full-precision dots compile slowly; sm_90 covers them
        case.update(dtype=str(dtype).removeprefix("torch."), layout=layout)
        launch_every_kernel(dtype, torch.channels_last if layout == "channels_last" else torch.contiguous_format)

    # int64 offsets, which only a batch item of 2^31 elements reaches: the CFF launches with WIDE set
    case.update(dtype="float16", layout="channels_last", wide=True)
    for module in (cascade_feature_fusion, cff_shortcut_border):
        module.needs_wide_index = lambda *args: True
    launch_cff_units(torch.float16, torch.channels_last)
    json.dump({"kernels": every_kernel(), "launches": records}, sys.stdout)


if __name__ == "__main__":
    main(int(sys.argv[1]))
