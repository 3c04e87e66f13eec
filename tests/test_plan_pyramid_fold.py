"""The inference plan with pyramid pooling folded into conv5_4 (backend "fold" of the plan's ppm layer) against
the plan without the fold and the reference build, on the plan's CPU twin (the fold's kernel interpreted);
its place among the tunable choices."""

import pytest
import torch

import icnet_kernels
import icnet_kernels.triton.pyramid_expansion_epilogue as fold_kernel
from icnet import ICNet, plan_tuning
from icnet.plan import InferencePlan
from tests.helpers import GPU, TRITON_INTERPRETED
from tests.test_icnet_model import randomize_batch_norm
from tests.test_plan import EXACT, INEXACT, built, ops_of_a_call, reference_model

pytestmark = pytest.mark.skipif(not icnet_kernels.native_available(), reason="the plan runs the native CPU ops")
cpu_twin = pytest.mark.skipif(not TRITON_INTERPRETED, reason="the CPU twin's fold needs the Triton interpreter")

FOLD = {"ppm": "fold"}


def close(actual, expected, scale):
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3 * scale)


@pytest.fixture
def fold_calls(monkeypatch):
    """Counts the fold kernel's launches (a Triton launch does not reach the dispatcher)."""
    calls = []
    launch = fold_kernel.pyramid_expansion_epilogue_triton

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return launch(*args, **kwargs)

    monkeypatch.setattr(fold_kernel, "pyramid_expansion_epilogue_triton", counted)
    return calls


@cpu_twin
@pytest.mark.parametrize("mode,size,layout,seed", [("sub124", EXACT, "channels_last", 1),
                                                   ("sub4", INEXACT, "contiguous", 0),
                                                   ("sub24", INEXACT, "channels_last", 1)],
                         ids=["sub124-exact-channels_last", "sub4-inexact", "sub24-inexact-channels_last"])
def test_the_folded_plan_matches_the_unfolded_plan_and_the_reference_build(mode, size, layout, seed, fold_calls):
    image, expected, unfolded, _ = built(mode, size, layout, seed)
    plan = InferencePlan(reference_model(mode, seed), image, choices=FOLD)
    assert plan.choices["ppm"] == "fold" and unfolded.choices["ppm"] is None
    fold_calls.clear()
    names = ops_of_a_call(plan, image)
    assert len(fold_calls) == 1 and "pyramid_pool_sum" not in names  # the pyramid sum is never made
    logits, unfolded_logits = plan(image), unfolded(image)
    assert logits.shape == expected.shape and logits.stride() == unfolded_logits.stride()
    scale = expected.abs().max().item()
    close(logits, unfolded_logits, 1e-2 * scale)
    close(logits, expected, scale)


@cpu_twin
def test_the_folded_labels_plan_agrees_with_the_reference_build(fold_calls):
    image, expected, _, _ = built("sub124", EXACT)
    labels = InferencePlan(reference_model("sub124"), image, labels=True, choices=FOLD)(image)
    assert len(fold_calls) >= 1 and labels.dtype == torch.uint8
    assert (labels == expected.argmax(1)).float().mean() >= 0.998


@cpu_twin
def test_the_fold_runs_conv5_4_on_its_chosen_triton_convolution(fold_calls):
    """conv5_4 without its bias and ReLU on the Triton implicit GEMM, then the fold's epilogue (a narrow
    ICNet, an eighth of PSPNet50's width, keeps the interpreted convolution short)."""
    torch.manual_seed(2)
    model = randomize_batch_norm(ICNet(mode="sub4", width=0.125, fused=False), 2).eval()
    image = torch.randn(1, 3, *INEXACT, generator=torch.Generator().manual_seed(2)) * 60
    with torch.no_grad():
        expected = model(image)
    plan = InferencePlan(model, image, choices={**FOLD, "conv5_4": "triton"})
    fold_calls.clear()
    names = ops_of_a_call(plan, image)
    assert names.count("conv2d_epilogue_triton") == 1 and len(fold_calls) == 1
    close(plan(image), expected, expected.abs().max().item())


@cpu_twin
def test_the_fold_is_a_tunable_choice_on_gpus():
    image, _, unfolded, _ = built("sub4", INEXACT)
    ppm = unfolded.network.ppm
    assert "fold" in plan_tuning.candidates(ppm, torch.device("cuda"))
    assert "fold" not in plan_tuning.candidates(ppm, torch.device("cpu"))  # the interpreter is a test tool
    with pytest.raises(ValueError, match="choices"):
        InferencePlan(reference_model("sub4"), image, choices={"ppm": "folded"})
    for backend in ("native", "reference"):  # a named pyramid backend runs the pyramid op, unfolded
        plan = InferencePlan(reference_model("sub4"), image, backend=backend)
        assert plan.choices["ppm"] == backend


@cpu_twin
def test_tuning_times_the_fold_beside_the_pyramid_op(monkeypatch, fold_calls):
    """With the fold among the candidates (as on a GPU), measuring times it against the pyramid op, both with
    conv5_4, and the plan keeps the faster; the result matches the reference build either way."""
    image, expected, _, _ = built("sub4", INEXACT)
    plain = plan_tuning.candidates
    monkeypatch.setattr(plan_tuning, "candidates", lambda layer, device: (
        ["fold", "native"] if hasattr(layer, "fold_backends") else plain(layer, device)))
    plan = InferencePlan(reference_model("sub4"), image, tune=True)
    assert set(plan.timings["ppm"]) == {"fold", "native"} and fold_calls
    assert plan.choices["ppm"] == min(plan.timings["ppm"], key=plan.timings["ppm"].get)
    close(plan(image), expected, expected.abs().max().item())


@pytest.mark.skipif(not GPU, reason="needs a GPU")
def test_on_cuda_the_plan_folds_by_default():
    image, expected, _, _ = built("sub124", EXACT)
    image = image.cuda()
    model = reference_model("sub124").cuda()
    folded, unfolded = InferencePlan(model, image), InferencePlan(model, image, choices={"ppm": "reference"})
    assert folded.choices["ppm"] == "fold"
    scale = expected.abs().max().item()
    close(folded(image).cpu(), unfolded(image).cpu(), 1e-2 * scale)
    close(folded(image).cpu(), expected, scale)
