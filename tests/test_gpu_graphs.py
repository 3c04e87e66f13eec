"""CudaGraphRunner: its replay equals eager, and weights changed after the capture are never replayed stale.
The weight-version bookkeeping is tested on the CPU too."""

import pytest
import torch

from benchmarks.icnet_e2e import with_backend
from icnet import ICNet
from icnet.graphs import CudaGraphRunner, weights_version
from tests.test_icnet_model import randomize_batch_norm

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_weights_version_follows_writes_moves_and_replacements():
    model = ICNet(mode="sub4", width=0.25).eval()
    modules = list(model.modules())
    before = weights_version(modules)
    with torch.inference_mode():
        model(torch.randn(1, 3, 33, 65))
    assert weights_version(modules) == before  # inference reads, it does not write
    with torch.inference_mode():
        model.conv5_4.conv.weight.add_(1)
    in_place = weights_version(modules)
    assert in_place != before
    model.conv5_4.bn.running_var.data = model.conv5_4.bn.running_var.data.clone()
    assert weights_version(modules) != in_place
    replaced = weights_version(modules)
    model.conv5_4.conv.weight = torch.nn.Parameter(model.conv5_4.conv.weight.detach().clone())
    assert weights_version(modules) != replaced
    state = model.state_dict()
    loaded = weights_version(modules)
    model.load_state_dict(state)
    assert weights_version(modules) != loaded



def test_a_model_of_inference_tensors_is_refused_by_name():
    """Their in-place changes leave no trace, so a graph could not know to capture again."""
    with torch.inference_mode():
        model = ICNet(mode="sub4", width=0.25).eval()
    with pytest.raises(ValueError, match=r"model: \S+ is an inference tensor"):
        CudaGraphRunner(model, torch.randn(1, 3, 33, 65))

def _model(dtype, layout, backend=None):
    torch.manual_seed(0)
    model = randomize_batch_norm(ICNet(mode="sub124")).eval().to(device="cuda", dtype=dtype, memory_format=layout)
    return with_backend(model, backend) if backend else model


@GPU
@pytest.mark.usefixtures("nan_device_memory")
@pytest.mark.parametrize("backend", [None, "triton"], ids=["default", "triton"])
@pytest.mark.parametrize("dtype, layout", [(torch.float32, torch.contiguous_format),
                                           (torch.float16, torch.channels_last)], ids=["float32-nchw", "float16-nhwc"])
def test_graph_replay_equals_eager(backend, dtype, layout):
    model = _model(dtype, layout, backend)
    x = (torch.randn(2, 3, 97, 161, device="cuda") * 60).to(dtype).contiguous(memory_format=layout)
    runner = CudaGraphRunner(model, x)
    for image in (x, (torch.randn_like(x.float()) * 60).to(dtype)):
        with torch.inference_mode():
            expected = model(image)
        torch.testing.assert_close(runner(image).clone(), expected)
    assert runner.captures == 1


@GPU
def test_weights_changed_after_capture_are_captured_again_or_refused():
    model = _model(torch.float16, torch.channels_last)
    x = (torch.randn(1, 3, 97, 161, device="cuda") * 60).half().contiguous(memory_format=torch.channels_last)
    runner = CudaGraphRunner(model, x)
    strict = CudaGraphRunner(model, x, recapture=False)
    before = runner(x).clone()
    with torch.inference_mode():
        model.cls_sub124.weight.mul_(-1)
        model.conv1[0].bn.running_var.mul_(4)  # a change that only the folded weights carry
        expected = model(x)
    assert not torch.equal(expected, before)
    torch.testing.assert_close(runner(x).clone(), expected)
    assert runner.captures == 2
    with pytest.raises(RuntimeError, match="changed after this CUDA graph was captured"):
        strict(x)
