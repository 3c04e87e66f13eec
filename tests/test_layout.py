"""to_memory_format against x.contiguous(memory_format=...): the same values, sizes and strides, for both
directions, every element size, odd shapes and the inputs it hands to ATen."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import icnet_kernels
from icnet_kernels.layout import to_memory_format

NATIVE = pytest.mark.skipif(not icnet_kernels.native_available(), reason="_C not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.uint8, torch.int32, torch.bool]
FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


def random_tensor(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g) * 100
    return values > 0 if dtype == torch.bool else values.to(dtype)


def check(x, memory_format):
    expected = x.contiguous(memory_format=memory_format)
    got = to_memory_format(x, memory_format)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert got.stride() == expected.stride(), (got.stride(), expected.stride())
    assert torch.equal(got, expected)
    return got


@NATIVE
@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 3), c=st.integers(1, 70), h=st.integers(1, 40), w=st.integers(1, 40),
       dtype=st.sampled_from(DTYPES), target=st.sampled_from(sorted(FORMATS)), seed=st.integers(0, 2**31 - 1))
def test_equals_contiguous_on_random_shapes(n, c, h, w, dtype, target, seed):
    memory_format = FORMATS[target]
    source = torch.contiguous_format if memory_format == torch.channels_last else torch.channels_last
    x = random_tensor((n, c, h, w), dtype, seed).contiguous(memory_format=source)
    got = check(x, memory_format)
    if x.numel() and not x.is_contiguous(memory_format=memory_format):
        assert got.data_ptr() != x.data_ptr()


@NATIVE
@pytest.mark.parametrize("shape", [(1, 3, 1025, 2049), (1, 256, 65, 129), (2, 64, 33, 31)],
                         ids=["image", "conv3_1", "odd"])
@pytest.mark.parametrize("target", sorted(FORMATS))
def test_the_networks_switches(shape, target):
    memory_format = FORMATS[target]
    source = torch.contiguous_format if memory_format == torch.channels_last else torch.channels_last
    check(random_tensor(shape, torch.float32, 1).contiguous(memory_format=source), memory_format)


@NATIVE
def test_the_native_op_runs_on_the_cpu_switches():
    x = random_tensor((1, 8, 7, 9), torch.float32, 2)
    with torch.profiler.profile() as profile:
        to_memory_format(x, torch.channels_last)
    assert "icnet::_relayout" in {event.name for event in profile.events()}


@pytest.mark.parametrize("make", [
    lambda: random_tensor((2, 3, 5, 7), torch.float32, 3),                       # already in the layout
    lambda: random_tensor((2, 3, 10, 7), torch.float32, 3)[:, :, ::2],           # strided: neither layout
    lambda: random_tensor((2, 1, 5, 7), torch.float32, 3),                       # one channel: both layouts
    lambda: random_tensor((2, 3, 5, 7), torch.float32, 3).requires_grad_(),      # autograd records it
], ids=["same-layout", "strided", "ambiguous", "autograd"])
@pytest.mark.parametrize("target", sorted(FORMATS))
def test_other_inputs_behave_as_contiguous(make, target):
    x = make()
    got = check(x, FORMATS[target])
    if x.requires_grad:
        assert got.requires_grad and (got.grad_fn is not None or got is x)
    if x.is_contiguous(memory_format=FORMATS[target]):
        assert got is x


@NATIVE
def test_native_op_refuses_an_input_in_neither_layout():
    x = random_tensor((2, 3, 10, 7), torch.float32, 3)[:, :, ::2]
    with pytest.raises(ValueError, match="x must be contiguous"):
        torch.ops.icnet._relayout(x, True)
