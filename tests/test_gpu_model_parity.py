"""On a GPU: the fused ICNet against the reference build, in every dtype and layout the GPU runs, with the
device's free memory filled with NaN first so that an uninitialised read fails the comparison."""

import pytest
import torch

import icnet_kernels
from icnet import ICNet
from tests.test_icnet_model import randomize_batch_norm

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
              pytest.mark.usefixtures("nan_device_memory")]

CASES = [pytest.param(torch.float32, False, id="float32-nchw"),
         pytest.param(torch.float32, True, id="float32-channels_last"),
         pytest.param(torch.float16, True, id="float16-channels_last"),
         pytest.param(torch.bfloat16, True, id="bfloat16-channels_last")]
# (batch, height, width): a small odd size with two images, and the paper's full-resolution image
SIZES = [pytest.param((2, 97, 161), id="2x97x161"), pytest.param((1, 1025, 2049), id="1x1025x2049")]
# How far the fused build's argmax agreement with the float64 result may fall below the reference build's in
# the same dtype: 16-bit logits of near-tied classes swap in either build.
AGREEMENT_SLACK = {torch.float32: 0.001, torch.float16: 0.01, torch.bfloat16: 0.02}


def _builds(backend):
    torch.manual_seed(0)
    reference = randomize_batch_norm(ICNet(mode="sub124", fused=False)).eval()
    fused = ICNet(mode="sub124", fused=True).eval()
    fused.load_state_dict(reference.state_dict())
    if backend is not None:
        for module in fused.modules():
            if hasattr(module, "backend"):
                module.backend = backend
    return reference.cuda(), fused.cuda()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype, channels_last", CASES)
@pytest.mark.parametrize("backend", [pytest.param(None, id="default"), pytest.param("triton", id="triton")])
def test_fused_build_matches_the_reference_on_a_gpu(backend, dtype, channels_last, size):
    if backend is None and not icnet_kernels.native_cuda_available():
        pytest.skip("_C built without CUDA")
    reference, fused = _builds(backend)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    image = torch.randn(*size[:1], 3, *size[1:], device="cuda") * 60
    # models converted outside inference mode: the fused build's caches check the weights' version counters
    reference.double()
    with torch.inference_mode():
        exact = reference(image.double())
    reference.to(dtype=dtype, memory_format=layout)
    fused.to(dtype=dtype, memory_format=layout)
    x = image.to(dtype).contiguous(memory_format=layout)
    with torch.inference_mode():
        same_precision, out = reference(x), fused(x)
    assert out.dtype == dtype and out.is_contiguous(memory_format=layout)
    assert torch.isfinite(out).all()
    err = (out.double() - exact).abs().max().item()
    err_torch = (same_precision.double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert err <= 2 * err_torch + 1e-3 * scale, f"error {err:.3e} > 2 x torch's {err_torch:.3e} + 1e-3 x {scale:.3g}"
    agreement = (out.argmax(1) == exact.argmax(1)).float().mean().item()
    torch_agreement = (same_precision.argmax(1) == exact.argmax(1)).float().mean().item()
    assert agreement >= torch_agreement - AGREEMENT_SLACK[dtype], (agreement, torch_agreement)
