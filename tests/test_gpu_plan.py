"""On a GPU: the inference plan's CUDA-graph replay against the reference build in float64, on NaN-filled
device memory, logits and labels, in the dtypes and layouts the GPU runs; its second stream against one."""

import pytest
import torch

from icnet import ICNet
from icnet.plan import InferencePlan
from tests.test_icnet_model import randomize_batch_norm

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
              pytest.mark.usefixtures("nan_device_memory")]

CASES = [pytest.param(torch.float32, False, id="float32-nchw"),
         pytest.param(torch.float16, True, id="float16-channels_last"),
         pytest.param(torch.bfloat16, True, id="bfloat16-channels_last")]
# (batch, height, width): an 8k+1 size (every exact path) with two images, an even one (the resizes)
SIZES = [pytest.param((2, 257, 513), id="2x257x513"), pytest.param((1, 130, 194), id="1x130x194")]
RELATIVE_TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.05, torch.bfloat16: 0.1}
MIN_AGREEMENT = {torch.float32: 0.999, torch.float16: 0.99, torch.bfloat16: 0.98}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype, channels_last", CASES)
def test_plan_replays_match_the_reference_on_a_gpu(dtype, channels_last, size):
    torch.manual_seed(0)
    model = randomize_batch_norm(ICNet(mode="sub124", fused=False)).eval().cuda()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    image = torch.randn(size[0], 3, *size[1:], device="cuda") * 60
    with torch.inference_mode():
        exact = model.double()(image.double())
    model.float()
    x = image.to(dtype).contiguous(memory_format=layout)
    plan = InferencePlan(model, x)
    labels_plan = InferencePlan(model, x, labels=True)
    logits = plan(x).clone()
    labels = labels_plan(x).clone()
    assert logits.dtype == dtype and logits.is_contiguous(memory_format=layout) and torch.isfinite(logits).all()
    err = (logits.double() - exact).abs().max().item()
    assert err <= RELATIVE_TOLERANCE[dtype] * exact.abs().max().item()
    expected = exact.argmax(1)
    assert (logits.argmax(1) == expected).float().mean() >= MIN_AGREEMENT[dtype]
    assert labels.dtype == torch.uint8 and (labels == expected).float().mean() >= MIN_AGREEMENT[dtype]
    # a replay on another input writes the same static buffer with that input's result
    other = (torch.randn_like(image) * 60).to(dtype).contiguous(memory_format=layout)
    assert plan(other).data_ptr() == plan(x).data_ptr()
    torch.testing.assert_close(plan(x), logits, rtol=0, atol=0)


def test_the_second_stream_changes_no_value():
    """The full-resolution branch on its own stream (the default) gives what one stream gives."""
    torch.manual_seed(0)
    model = randomize_batch_norm(ICNet(mode="sub124", fused=False)).eval().cuda()
    x = (torch.randn(2, 3, 257, 513, device="cuda") * 60).half().contiguous(memory_format=torch.channels_last)
    together = InferencePlan(model, x)(x).clone()
    alone = InferencePlan(model, x, concurrent=False)(x).clone()
    torch.testing.assert_close(together, alone, rtol=1e-3, atol=1e-3 * alone.abs().max().item())
    assert (together.argmax(1) == alone.argmax(1)).float().mean() >= 0.999


def test_a_tuned_plan_matches_the_reference_on_a_gpu():
    """tune=True times every convolution (cuDNN or Triton) and the fused ops' implementations; whatever it
    keeps gives the reference's result."""
    torch.manual_seed(0)
    model = randomize_batch_norm(ICNet(mode="sub124", fused=False)).eval().cuda()
    image = torch.randn(1, 3, 257, 513, device="cuda") * 60
    with torch.inference_mode():
        exact = model.double()(image.double())
    model.float()
    x = image.half().contiguous(memory_format=torch.channels_last)
    plan = InferencePlan(model, x, tune=True)
    assert plan.timings and all(len(times) > 1 for times in plan.timings.values())
    logits = plan(x)
    assert (logits.argmax(1) == exact.argmax(1)).float().mean() >= MIN_AGREEMENT[torch.float16]
