"""icnet.load(...).predict(...): every kind of input gives the class maps of the checkpoint's model on its
recorded preprocessing; colorize and overlay; segment's colour masks and legends; preprocessing records."""

import numpy as np
import pytest
import torch
from PIL import Image

import icnet
from icnet import ICNet
from icnet.checkpoint import CheckpointError, load_checkpoint, preprocessing_of, read_checkpoint, save_checkpoint
from icnet.cityscapes import CLASS_NAMES, PALETTE
from icnet.cli import main as icnet_main
from icnet.images import preprocess
from icnet.preprocessing import DEFAULT_PREPROCESSING, Preprocessed, Preprocessing
from icnet.visualize import colorize, overlay, palette_for

TINY = dict(num_classes=19, width=0.125)
OTHER = Preprocessing(channel_order="RGB", mean=(120.0, 110.0, 100.0), std=(60.0, 58.0, 57.0))


def random_rgb(size=(33, 49), seed=0, batch=None):
    shape = (*size, 3) if batch is None else (batch, *size, 3)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    model = ICNet(**TINY)
    for module in model.modules():  # BN statistics that make every layer matter
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    save_checkpoint(folder / "default.pt", model, class_names=CLASS_NAMES)
    save_checkpoint(folder / "other.pt", model, class_names=CLASS_NAMES, preprocessing=OTHER)
    return folder, model.eval()


def expected_labels(model, rgb_images, preprocessing=DEFAULT_PREPROCESSING):
    x = torch.stack([preprocessing(rgb) for rgb in rgb_images])
    with torch.no_grad():
        return model(x).argmax(1).to(torch.uint8).numpy()


def test_predict_takes_paths_pil_images_arrays_and_tensors(checkpoints, tmp_path):
    folder, model = checkpoints
    segmenter = icnet.load(folder / "default.pt", device="cpu")
    rgb = random_rgb()
    expected = expected_labels(model, [rgb])[0]
    Image.fromarray(rgb).save(tmp_path / "a.png")
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)
    for image in (tmp_path / "a.png", str(tmp_path / "a.png"), Image.fromarray(rgb), rgb, rgb.astype(np.float32)):
        labels = segmenter.predict(image)
        assert isinstance(labels, np.ndarray) and labels.dtype == np.uint8 and np.array_equal(labels, expected)
    for image in (tensor, tensor.float()):
        labels = segmenter.predict(image)
        assert isinstance(labels, torch.Tensor) and torch.equal(labels, torch.from_numpy(expected))


def test_predict_takes_batches_and_lists_of_any_sizes(checkpoints):
    folder, model = checkpoints
    segmenter = icnet.load(folder / "default.pt", device="cpu", batch_size=2)
    batch = random_rgb(seed=1, batch=3)  # more images than batch_size
    expected = expected_labels(model, list(batch))
    assert np.array_equal(segmenter.predict(batch), expected)
    assert torch.equal(segmenter.predict(torch.from_numpy(batch).permute(0, 3, 1, 2)), torch.from_numpy(expected))
    small, large = random_rgb((20, 31), seed=2), random_rgb((41, 65), seed=3)
    results = segmenter.predict([small, large, torch.from_numpy(small).permute(2, 0, 1), batch[0], batch])
    assert [r.shape for r in results] == [(20, 31), (41, 65), (20, 31), (33, 49), (3, 33, 49)]
    assert np.array_equal(results[1], expected_labels(model, [large])[0])
    assert torch.equal(results[2], torch.from_numpy(results[0]))
    assert np.array_equal(results[3], expected[0]) and np.array_equal(results[4], expected)


def test_predict_applies_the_recorded_preprocessing(checkpoints):
    folder, model = checkpoints
    rgb = random_rgb(seed=4)
    segmenter = icnet.load(folder / "other.pt", device="cpu")
    assert segmenter.preprocessing == OTHER
    labels = segmenter.predict(rgb)
    assert np.array_equal(labels, expected_labels(model, [rgb], OTHER)[0])
    assert not np.array_equal(labels, expected_labels(model, [rgb])[0])


def test_the_default_preprocessing_is_the_released_one():
    rgb = random_rgb(seed=5)
    x = DEFAULT_PREPROCESSING(rgb)
    assert torch.equal(x, preprocess(rgb))
    bgr_minus_mean = rgb[..., ::-1].astype(np.float64) - np.array([103.939, 116.779, 123.68])
    assert np.allclose(x.permute(1, 2, 0).numpy(), bgr_minus_mean, atol=1e-4)
    assert DEFAULT_PREPROCESSING.to_dict() == {"channel_order": "BGR", "mean": [123.68, 116.779, 103.939],
                                               "std": [1.0, 1.0, 1.0]}


def test_a_checkpoint_without_a_preprocessing_record_loads_with_the_default(checkpoints, tmp_path):
    folder, model = checkpoints
    payload = read_checkpoint(folder / "other.pt")
    del payload["preprocessing"]
    torch.save(payload, tmp_path / "old.pt")
    assert preprocessing_of(read_checkpoint(tmp_path / "old.pt")) == DEFAULT_PREPROCESSING
    assert icnet.load(tmp_path / "old.pt", device="cpu").preprocessing == DEFAULT_PREPROCESSING
    load_checkpoint(tmp_path / "old.pt")
    payload["preprocessing"] = {"channel_order": "BRG", "mean": [0, 0, 0], "std": [1, 1, 1]}
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt .*channel_order"):
        icnet.load(tmp_path / "bad.pt", device="cpu")


def test_evaluate_and_segment_apply_the_recorded_preprocessing(checkpoints, tmp_path, capsys):
    folder, model = checkpoints
    from icnet.data.datasets import make_dataset

    dataset = make_dataset("synthetic", "val", synthetic_count=1, synthetic_size=(33, 65))
    rgb, _ = dataset.sample(0)
    image, _ = Preprocessed(dataset, OTHER)[0]
    assert torch.equal(image, OTHER(rgb))
    for name in ("default", "other"):
        assert icnet_main(["evaluate", "--weights", str(folder / f"{name}.pt"), "--synthetic-size", "33x65",
                           "--synthetic-val", "1", "--no-progress"]) == 0
    reports = capsys.readouterr().out.split("pixel accuracy")
    assert reports[0] != reports[1]  # the two checkpoints hold one model: only the preprocessing differs
    Image.fromarray(rgb).save(tmp_path / "scene.png")
    assert icnet_main(["segment", str(tmp_path / "scene.png"), "--weights", str(folder / "other.pt"),
                       "--out", str(tmp_path / "out")]) == 0
    labels = np.asarray(Image.open(tmp_path / "out" / "scene_trainIds.png"))
    assert np.array_equal(labels, expected_labels(model, [rgb], OTHER)[0])


def test_segment_writes_the_colour_mask_and_an_overlay_with_a_legend(checkpoints, tmp_path):
    folder, model = checkpoints
    rgb = random_rgb((257, 513), seed=6)
    Image.fromarray(rgb).save(tmp_path / "street.png")
    assert icnet_main(["segment", str(tmp_path / "street.png"), "--weights", str(folder / "default.pt"),
                       "--out", str(tmp_path / "out")]) == 0
    labels = np.asarray(Image.open(tmp_path / "out" / "street_trainIds.png"))
    colour = np.asarray(Image.open(tmp_path / "out" / "street_color.png"))
    assert np.array_equal(colour, PALETTE[labels])
    picture = np.asarray(Image.open(tmp_path / "out" / "street_overlay.png"))
    assert np.array_equal(picture, overlay(rgb, labels, PALETTE, CLASS_NAMES))


def test_colorize_maps_classes_to_the_palette_and_unknown_labels_to_black():
    labels = np.random.default_rng(7).integers(0, 19, (30, 40))
    labels[0, :5] = 255
    colours = colorize(labels)
    assert np.array_equal(colours[1:], PALETTE[labels[1:]]) and not colours[0, :5].any()
    with pytest.raises(ValueError, match="labels"):
        colorize(np.zeros((2, 3, 4), np.int64))


def test_overlay_blends_the_mask_and_lists_the_classes_present():
    rgb = random_rgb((200, 300), seed=8)
    labels = np.zeros((200, 300), np.int64)
    labels[:, 150:] = 13  # road and car
    plain = overlay(rgb, labels, legend=False)
    assert np.array_equal(plain, np.round(0.5 * rgb + 0.5 * PALETTE[labels]).astype(np.uint8))
    with_legend = overlay(rgb, labels)
    changed = np.argwhere((with_legend != plain).any(-1))
    assert len(changed) and changed[:, 0].max() < 60 and changed[:, 1].max() < 120  # a box in the top-left
    # the legend lists the classes present: more classes, a taller box
    labels[150:, :] = 10
    taller = np.argwhere((overlay(rgb, labels) != overlay(rgb, labels, legend=False)).any(-1))
    assert taller[:, 0].max() > changed[:, 0].max()
    for bad in (dict(image=rgb[..., :2]), dict(labels=labels[:10]), dict(alpha=1.5)):
        arguments = {**dict(image=rgb, labels=labels), **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            overlay(**arguments)


def test_palette_for_other_class_counts_keeps_classes_apart():
    assert np.array_equal(palette_for(19), PALETTE)
    palette = palette_for(40)
    assert palette.shape == (40, 3) and len({tuple(c) for c in palette}) == 40


@pytest.mark.parametrize("image, message", [
    (np.zeros((4, 5)), "image arrays"), (np.zeros((4, 5, 4), np.uint8), "image arrays"),
    (torch.zeros(4, 5, 3), "image tensors"), (torch.zeros(3, 4, 5, dtype=torch.int32), "uint8 or floating"),
    (np.zeros((0, 5, 3), np.uint8), "empty"), ([], "empty list"), (42, "path, a PIL image")])
def test_predict_rejects_what_is_not_an_image(checkpoints, image, message):
    folder, _ = checkpoints
    with pytest.raises(ValueError, match=message):
        icnet.load(folder / "default.pt", device="cpu").predict(image)


def test_load_rejects_a_bad_device_or_batch_size(checkpoints):
    folder, _ = checkpoints
    with pytest.raises(ValueError, match="device 'gpu0'"):
        icnet.load(folder / "default.pt", device="gpu0")
    with pytest.raises(ValueError, match="batch_size"):
        icnet.load(folder / "default.pt", device="cpu", batch_size=0)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        icnet.load(folder / "default.pt", device="cpu").predict([np.zeros((4, 5, 3), np.uint8), "missing.png"])


def test_load_picks_the_fastest_settings_for_the_device(checkpoints):
    folder, _ = checkpoints
    segmenter = icnet.load(folder / "default.pt", device="cpu")
    assert segmenter.dtype == torch.float32 and segmenter.model.fused and not segmenter.model.training
    assert icnet.load(folder / "default.pt", device="cpu", dtype=torch.bfloat16).dtype == torch.bfloat16
    assert icnet.api.best_settings(torch.device("cuda")) == (torch.float16, True)
