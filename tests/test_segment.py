"""icnet segment's routing: inference plans on CUDA devices (one per batch shape, tested here through the
plan's CPU twin against the model itself), the model elsewhere or with --no-plan; each image decoded once;
class names for checkpoints that record none; one device parser."""

import numpy as np
import pytest
import torch
from PIL import Image

import icnet
import icnet_kernels
from icnet import ICNet, api, plan as plan_module, segment as segment_module, video
from icnet.api import Segmenter, uses_plan
from icnet.checkpoint import save_checkpoint
from icnet.cityscapes import CLASS_NAMES
from icnet.images import read_rgb
from icnet.plan import LabelPlans
from icnet.preprocessing import DEFAULT_PREPROCESSING
from icnet.segment import segment
from icnet.visualize import overlay, palette_for
from tests.test_icnet_model import randomize_batch_norm

TINY = dict(num_classes=19, width=0.125)
needs_native = pytest.mark.skipif(not icnet_kernels.native_available(), reason="the plan runs the native CPU ops")


def write_images(folder, sizes, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index, size in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_batch_norm(ICNet(**TINY), seed=3).eval()
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint(path, model, class_names=CLASS_NAMES)
    return path, model


class BuiltPlans(LabelPlans):
    """LabelPlans that records the inputs it built a plan for and the calls it served."""
    built, calls = [], []

    def plan_for(self, x):
        if (tuple(x.shape), x.dtype, x.device, plan_module.memory_format_of(x)) not in self.plans:
            BuiltPlans.built.append(tuple(x.shape))
        return super().plan_for(x)

    def __call__(self, x):
        BuiltPlans.calls.append(tuple(x.shape))
        return super().__call__(x)


@pytest.fixture
def recorded_plans(monkeypatch):
    BuiltPlans.built, BuiltPlans.calls = [], []
    monkeypatch.setattr(api, "LabelPlans", BuiltPlans)
    return BuiltPlans


def test_plans_are_the_default_on_cuda_devices_only():
    assert uses_plan(torch.device("cuda"), 19) and uses_plan(torch.device("cuda", 1), 256)
    assert not uses_plan(torch.device("cpu"), 19)
    assert not uses_plan(torch.device("cuda"), 300)  # its labels would not fit a plan's uint8
    model = ICNet(**TINY)
    cpu = Segmenter(model, CLASS_NAMES, DEFAULT_PREPROCESSING, torch.device("cpu"), torch.float32, False)
    assert cpu.plans is None
    forced = Segmenter(model, CLASS_NAMES, DEFAULT_PREPROCESSING, torch.device("cpu"), torch.float32, False, plan=True)
    assert isinstance(forced.plans, LabelPlans)
    with pytest.raises(ValueError, match="plan: .*256"):
        Segmenter(ICNet(num_classes=300, width=0.125), [str(i) for i in range(300)], DEFAULT_PREPROCESSING,
                  torch.device("cpu"), torch.float32, False, plan=True)
    with pytest.raises(ValueError, match="plan_choices"):
        Segmenter(model, CLASS_NAMES, DEFAULT_PREPROCESSING, torch.device("cpu"), torch.float32, False,
                  plan_choices={"ppm": "reference"})


def agrees_with_the_model(labels: np.ndarray, logits: torch.Tensor) -> None:
    """labels equal the model's argmax wherever its top two logits are clearly apart, and at 99.8% of all
    pixels (the plan folds BatchNorm and reorders sums: a near-tie may fall the other way)."""
    expected = logits.argmax(0).numpy()
    top2 = logits.topk(2, dim=0).values
    clear = (top2[0] - top2[1] > 1e-3 * logits.abs().max()).numpy()
    assert clear.mean() > 0.9
    assert np.array_equal(labels[clear], expected[clear])
    assert (labels == expected).mean() >= 0.998


@needs_native
def test_segment_through_plans_writes_the_model_s_class_maps(tmp_path, weights, recorded_plans, capsys):
    """Three images of one size at batch 2 (a batch of two, then the shorter last one) and one of another
    size: a plan per batch shape, each used for its batches, and the class maps of the model itself."""
    path, model = weights
    sizes = [(33, 49), (33, 49), (33, 49), (41, 65)]
    images = write_images(tmp_path / "images", sizes)
    segment([images], tmp_path / "plan", path, device="cpu", batch_size=2, plan=True)
    assert recorded_plans.built == [(2, 3, 33, 49), (1, 3, 33, 49), (1, 3, 41, 65)]
    assert recorded_plans.calls == recorded_plans.built
    segment([images], tmp_path / "model", path, device="cpu", batch_size=2, plan=False)
    assert len(recorded_plans.calls) == 3  # the model path builds and calls no plan
    capsys.readouterr()
    for index in range(len(sizes)):
        rgb = read_rgb(images / f"{index}.png")
        with torch.no_grad():
            logits = model(DEFAULT_PREPROCESSING(rgb)[None])[0]
        planned = np.asarray(Image.open(tmp_path / "plan" / f"{index}_trainIds.png"))
        agrees_with_the_model(planned, logits)
        agrees_with_the_model(np.asarray(Image.open(tmp_path / "model" / f"{index}_trainIds.png")), logits)
        colour = np.asarray(Image.open(tmp_path / "plan" / f"{index}_color.png"))
        assert np.array_equal(colour, palette_for(19)[planned])


@needs_native
def test_videos_go_through_the_same_plans(tmp_path, weights, recorded_plans, monkeypatch):
    path, _ = weights
    seen = []

    def segmenter_seen(source, target, segmenter, output):
        seen.append(segmenter)
        return video.VideoResult(source, target, 0, 0.0, 0.0)

    monkeypatch.setattr(video, "segment_video", segmenter_seen)
    (tmp_path / "clip.mp4").write_bytes(b"")
    video.segment_videos([tmp_path / "clip.mp4"], tmp_path / "out.mp4", path, device="cpu", batch_size=2, plan=True)
    assert isinstance(seen[0].plans, BuiltPlans)
    frames = np.random.default_rng(1).integers(0, 256, (3, 33, 49, 3), dtype=np.uint8)
    planned = seen[0].predict(frames)
    assert recorded_plans.built == [(2, 3, 33, 49), (1, 3, 33, 49)]
    plain = icnet.load(path, device="cpu", batch_size=2, plan=False).predict(frames)
    assert planned.dtype == plain.dtype == np.uint8 and (planned == plain).mean() >= 0.998
    with pytest.raises(ValueError, match="device 'bogus'"):
        video.segment_videos([tmp_path / "clip.mp4"], tmp_path / "out.mp4", path, device="bogus")


class StaticBufferPlan:
    """Stands in for a CUDA plan: its output is one buffer that every call overwrites."""
    builds = 0

    def __init__(self, model, example, labels, choices, **options):
        StaticBufferPlan.builds += 1
        self.out = torch.empty(example.shape[0], *example.shape[2:], dtype=torch.uint8)

    def __call__(self, x):
        self.out.copy_(x[:, 0] > 0)
        return self.out


def test_label_plans_copy_the_static_output_and_keep_the_latest_few(monkeypatch):
    monkeypatch.setattr(plan_module, "InferencePlan", StaticBufferPlan)
    StaticBufferPlan.builds = 0
    plans = LabelPlans(ICNet(**TINY), max_plans=2)
    first, second = torch.randn(1, 3, 5, 7), torch.randn(1, 3, 5, 7)
    a, b = plans(first), plans(second)
    assert torch.equal(a, (first[:, 0] > 0).to(torch.uint8)) and torch.equal(b, (second[:, 0] > 0).to(torch.uint8))
    assert StaticBufferPlan.builds == 1
    plans(torch.randn(2, 3, 5, 7))
    plans(first)                       # the first shape is the most recent again
    plans(torch.randn(1, 3, 6, 7))     # so the batch of two goes
    assert StaticBufferPlan.builds == 3 and [key[0] for key in plans.plans] == [(1, 3, 5, 7), (1, 3, 6, 7)]
    plans(torch.randn(2, 3, 5, 7))
    assert StaticBufferPlan.builds == 4
    plans(first.contiguous(memory_format=torch.channels_last))  # another layout: another plan
    assert StaticBufferPlan.builds == 5


def test_segment_decodes_each_image_once_while_they_fit_the_budget(tmp_path, weights, monkeypatch, capsys):
    path, _ = weights
    images = write_images(tmp_path / "images", [(33, 49)] * 3)
    reads = []

    def counting_read(image):
        reads.append(image.name)
        return read_rgb(image)

    monkeypatch.setattr(segment_module, "read_rgb", counting_read)
    segment([images], tmp_path / "once", path, device="cpu")
    assert sorted(reads) == ["0.png", "1.png", "2.png"]
    reads.clear()
    monkeypatch.setattr(segment_module, "KEPT_DECODED_BYTES", 2 * 33 * 49 * 3)  # two images fit
    segment([images], tmp_path / "over", path, device="cpu")
    assert sorted(reads) == ["0.png", "1.png", "2.png", "2.png"]
    capsys.readouterr()
    for index in range(3):
        name = f"{index}_trainIds.png"
        assert np.array_equal(np.asarray(Image.open(tmp_path / "once" / name)),
                              np.asarray(Image.open(tmp_path / "over" / name)))


def test_a_checkpoint_without_class_names_gets_names_for_its_own_class_count(tmp_path, capsys):
    five = ICNet(num_classes=5, width=0.125)
    save_checkpoint(tmp_path / "five.pt", five)
    save_checkpoint(tmp_path / "nineteen.pt", ICNet(**TINY))
    names = tuple(f"class {i}" for i in range(5))
    assert segment_module.build_segmenter(tmp_path / "five.pt", "sub124", "cpu", torch.float32, False).class_names \
        == names
    assert icnet.load(tmp_path / "five.pt", device="cpu").class_names == names
    assert icnet.load(tmp_path / "nineteen.pt", device="cpu").class_names == CLASS_NAMES
    untrained = segment_module.build_segmenter(None, "sub4", "cpu", torch.float32, False)
    assert untrained.class_names == CLASS_NAMES and untrained.model.mode == "sub4"
    assert "untrained" in capsys.readouterr().err
    images = write_images(tmp_path / "images", [(65, 97)])
    segment([images], tmp_path / "out", tmp_path / "five.pt", device="cpu")
    labels = np.asarray(Image.open(tmp_path / "out" / "0_trainIds.png"))
    picture = np.asarray(Image.open(tmp_path / "out" / "0_overlay.png"))
    assert labels.max() < 5
    assert np.array_equal(picture, overlay(read_rgb(images / "0.png"), labels, palette_for(5), names))


def test_one_device_parser_for_segment_the_api_and_videos(weights):
    path, _ = weights
    assert segment_module.parse_device is api.parse_device
    assert api.parse_device("cpu") == api.parse_device(torch.device("cpu")) == torch.device("cpu")
    for bad, message in (("gpu0", "not a device name"), ("meta", "not supported")):
        with pytest.raises(ValueError, match=f"device '{bad}' is {message}"):
            icnet.load(path, device=bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' is not available"):
            icnet.load(path, device="cuda")
