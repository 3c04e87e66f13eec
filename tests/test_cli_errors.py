"""User mistakes on the command line end in one `icnet: ...` line on stderr and a non-zero exit, with
nothing written; the model, checkpoints and image reading reject what they cannot handle correctly."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from icnet import ICNet
from icnet.checkpoint import CheckpointError, load_checkpoint, load_weights, read_checkpoint, save_checkpoint
from icnet.cli import main as icnet_main
from icnet.images import read_rgb

TINY = dict(num_classes=19, width=0.125)
SMALL_EVAL = ["--synthetic-size", "33x65", "--synthetic-val", "1", "--no-progress"]
SMALL_DATA = ["--synthetic-size", "33x65", "--synthetic-train", "2", "--synthetic-val", "1", "--workers", "0",
              "--no-progress", "--batch-size", "2", "--crop", "33x65", "--epochs", "1", "--max-iterations", "1"]


def fails(capsys, argv, *fragments):
    """Runs the CLI and checks that it exits non-zero with one `icnet:` line naming every fragment."""
    code = icnet_main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, err
    assert len(lines) == 1 and lines[0].startswith("icnet: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def write_rgb(path, size=(33, 49), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def write_truncated(path):
    write_rgb(path, (64, 96), seed=5)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint(path, ICNet(**TINY))
    return path


def segment(inputs, out, weights, *extra):
    return ["segment", *map(str, inputs), "--out", str(out), "--weights", str(weights), *extra]


# --- images -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["text", "truncated", "random bytes"])
def test_segment_rejects_an_unreadable_image_in_one_line(tmp_path, capsys, weights, kind):
    path = tmp_path / ("notes.txt" if kind == "text" else "bad.png")
    if kind == "text":
        path.write_text("not an image\n")
    elif kind == "truncated":
        write_truncated(path)
    else:
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    fails(capsys, segment([path], tmp_path / "out", weights), path.name)
    assert not (tmp_path / "out").exists()


def test_segment_checks_every_image_of_a_folder_before_writing_any_output(tmp_path, capsys, weights):
    images = tmp_path / "images"
    write_rgb(images / "a.png")
    write_truncated(images / "b.png")
    write_rgb(images / "c.png", seed=2)
    (images / "d.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    line = fails(capsys, segment([images], tmp_path / "out", weights), "b.png", "d.jpg", "2 of 4")
    assert "a.png" not in line and not (tmp_path / "out").exists()


def test_segment_refuses_two_inputs_that_would_write_the_same_outputs(tmp_path, capsys, weights):
    write_rgb(tmp_path / "x" / "street.png")
    write_rgb(tmp_path / "y" / "street.jpg")
    fails(capsys, segment([tmp_path / "x", tmp_path / "y"], tmp_path / "out", weights), "street_trainIds.png")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"meta": {"device": "x"}, "rows": [{"plan_choices": '
                                     '{"ppm": 3}, "plan_timings_ms": {}}]}'])
def test_segment_rejects_a_bad_plan_choices_file_in_one_line(tmp_path, capsys, weights, content):
    image = write_rgb(tmp_path / "a.png")
    (tmp_path / "results.json").write_text(content)
    fails(capsys, segment([image], tmp_path / "out", weights, "--plan-choices", str(tmp_path / "results.json")),
          "plan choices", "results.json")
    fails(capsys, segment([image], tmp_path / "out", weights, "--plan-choices", str(tmp_path / "missing.json")),
          "--plan-choices", "missing.json")
    assert not (tmp_path / "out").exists()


def test_segment_refuses_plan_choices_where_no_plan_runs(tmp_path, capsys, weights):
    image = write_rgb(tmp_path / "a.png")
    (tmp_path / "results.json").write_text('{"meta": {"device": "x"}, "rows": []}')
    for extra, why in ((["--device", "cpu"], "CUDA devices"), (["--no-plan"], "plan=False")):
        fails(capsys, segment([image], tmp_path / "out", weights, "--plan-choices", str(tmp_path / "results.json"),
                              *extra), "plan_choices", why)
    assert not (tmp_path / "out").exists()


def test_a_16_bit_png_is_scaled_to_8_bits_not_saturated(tmp_path):
    wide = np.random.default_rng(3).integers(0, 65536, (20, 30), dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = read_rgb(tmp_path / "deep.png")
    expected = np.round(wide / 257.0).astype(np.uint8)
    assert rgb.dtype == np.uint8 and rgb.shape == (20, 30, 3)
    assert np.array_equal(rgb, np.repeat(expected[..., None], 3, axis=2))


def test_a_floating_point_image_is_rejected(tmp_path):
    from icnet.images import ImageError

    Image.fromarray(np.random.default_rng(0).random((8, 8)).astype(np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(ImageError, match="f.tif"):
        read_rgb(tmp_path / "f.tif")


def test_segment_rejects_an_empty_folder_and_bad_batch_sizes(tmp_path, capsys, weights):
    (tmp_path / "empty").mkdir()
    fails(capsys, segment([tmp_path / "empty"], tmp_path / "out", weights), "no images", "empty")
    image = write_rgb(tmp_path / "a.png")
    for size in ("0", "-1"):
        fails(capsys, segment([image], tmp_path / "out", weights, "--batch-size", size), "--batch-size", size)
    assert not (tmp_path / "out").exists()


def test_segment_refuses_an_out_that_is_a_file(tmp_path, capsys, weights):
    image = write_rgb(tmp_path / "a.png")
    (tmp_path / "out").write_text("keep me")
    fails(capsys, segment([image], tmp_path / "out", weights), "--out", "out")
    assert (tmp_path / "out").read_text() == "keep me"


# --- devices ------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys, weights):
    image = write_rgb(tmp_path / "a.png")
    fails(capsys, segment([image], tmp_path / "out", weights, "--device", "cuda"), "--device", "cuda")
    fails(capsys, ["train", "--out", str(tmp_path / "run"), "--device", "cuda", *SMALL_DATA], "--device")
    fails(capsys, ["evaluate", "--weights", str(weights), "--device", "cuda:3", *SMALL_EVAL], "cuda:3")
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_a_device_that_does_not_exist_is_one_line(tmp_path, capsys, weights):
    image = write_rgb(tmp_path / "a.png")
    fails(capsys, segment([image], tmp_path / "out", weights, "--device", "bogus"), "--device", "bogus")
    fails(capsys, ["train", "--out", str(tmp_path / "run"), "--device", "bogus", *SMALL_DATA], "bogus")


def test_train_gives_cuda_without_an_index_this_process_s_gpu(monkeypatch):
    """torch.cuda.set_device needs an index: a bare --device cuda means the process's local GPU."""
    from icnet import segment as segment_module
    from icnet.distributed import World
    from icnet.train import TrainConfig, _device

    monkeypatch.setattr(segment_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(segment_module.torch.cuda, "device_count", lambda: 2)
    assert _device(TrainConfig(device="cuda"), World(1, 2, 1)) == torch.device("cuda", 1)
    assert _device(TrainConfig(device="cuda:0"), World(1, 2, 1)) == torch.device("cuda", 0)
    assert _device(TrainConfig(device=None), World(0, 1, 0)) == torch.device("cuda", 0)


# --- checkpoints --------------------------------------------------------------------------------------

def test_a_checkpoint_of_another_width_or_class_count_is_a_checkpoint_error(tmp_path):
    save_checkpoint(tmp_path / "narrow.pt", ICNet(**TINY))
    payload = read_checkpoint(tmp_path / "narrow.pt")
    for other in (ICNet(num_classes=19, width=0.25), ICNet(num_classes=5, width=0.125)):
        without_config_check = {**payload, "config": {"mode": "sub124"}}
        with pytest.raises(CheckpointError, match="shape"):
            load_weights(other, without_config_check, "narrow.pt")
    # a state_dict that does not fit its own config (a hand-edited or mixed-up file)
    mixed = {**payload, "state_dict": ICNet(num_classes=19, width=0.25).state_dict()}
    torch.save(mixed, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="mixed.pt .*shape"):
        load_checkpoint(tmp_path / "mixed.pt")


def test_resume_and_init_with_another_width_or_class_count_are_one_line(tmp_path, capsys):
    save_checkpoint(tmp_path / "wide.pt", ICNet(num_classes=19, width=0.25), training_state=None)
    save_checkpoint(tmp_path / "five.pt", ICNet(num_classes=5, width=0.125))
    fails(capsys, ["train", "--out", str(tmp_path / "a"), "--width", "0.125", "--resume", str(tmp_path / "wide.pt"),
                   *SMALL_DATA], "wide.pt")
    fails(capsys, ["train", "--out", str(tmp_path / "b"), "--init", str(tmp_path / "five.pt"), *SMALL_DATA],
          "five.pt", "5 classes")


def test_resume_from_a_checkpoint_without_training_state_is_one_line(tmp_path, capsys):
    save_checkpoint(tmp_path / "plain.pt", ICNet(**TINY))
    fails(capsys, ["train", "--out", str(tmp_path / "run"), "--width", "0.125", "--resume",
                   str(tmp_path / "plain.pt"), *SMALL_DATA], "plain.pt", "--init")


@pytest.mark.parametrize("damage", ["no config", "config not a dict", "unknown config key", "bad mode",
                                    "random bytes", "a pickled object", "names of the wrong length",
                                    "names not strings", "no state_dict"])
def test_damaged_checkpoints_are_one_line_checkpoint_errors(tmp_path, capsys, damage):
    path = tmp_path / "damaged.pt"
    save_checkpoint(path, ICNet(**TINY), class_names=[f"c{i}" for i in range(19)])
    payload = torch.load(path, weights_only=True)
    if damage == "random bytes":
        path.write_bytes(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif damage == "a pickled object":
        torch.save(ICNet(**TINY), path)
    else:
        if damage == "no config":
            del payload["config"]
        elif damage == "config not a dict":
            payload["config"] = [19, 0.125]
        elif damage == "unknown config key":
            payload["config"]["depth"] = 50
        elif damage == "bad mode":
            payload["config"]["mode"] = "sub8"
        elif damage == "names of the wrong length":
            payload["class_names"] = ["road", "sky"]
        elif damage == "names not strings":
            payload["class_names"] = list(range(19))
        elif damage == "no state_dict":
            del payload["state_dict"]
        torch.save(payload, path)
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    assert "damaged.pt" in message and "\n" not in message and "weights_only" not in message, message
    image = write_rgb(tmp_path / "a.png")
    fails(capsys, segment([image], tmp_path / "out", path), "damaged.pt")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_is_saved_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_checkpoint(path, ICNet(**TINY))
    before = path.read_bytes()

    def interrupted(obj, file, *args, **kwargs):
        with open(file, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, ICNet(**TINY))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.pt"]


# --- the model's constructor --------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes", [0, -1, 2.5, True, "19"])
def test_icnet_rejects_a_class_count_that_is_not_a_positive_integer(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        ICNet(num_classes=num_classes, width=0.125)


@pytest.mark.parametrize("width", [0, -0.5, float("nan"), "0.5", True])
def test_icnet_rejects_a_width_that_is_not_a_positive_number(width):
    with pytest.raises(ValueError, match="width"):
        ICNet(width=width)


# --- evaluate -----------------------------------------------------------------------------------------

def write_folder_dataset(root, masks, image_sizes=None, mode="L"):
    """root/val/images/<i>.png and root/val/masks/<i>.png from the given label arrays."""
    for i, mask in enumerate(masks):
        size = image_sizes[i] if image_sizes else mask.shape
        write_rgb(root / "val" / "images" / f"{i}.png", size, seed=i)
        (root / "val" / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8), mode=mode).save(root / "val" / "masks" / f"{i}.png")


def evaluate_folder(root, weights, *extra):
    return ["evaluate", "--weights", str(weights), "--dataset", "folder", "--root", str(root), "--no-progress",
            *extra]


def test_evaluate_rejects_an_unreadable_image_and_writes_no_scores(tmp_path, capsys):
    save_checkpoint(tmp_path / "binary.pt", ICNet(num_classes=2, width=0.125))
    write_folder_dataset(tmp_path / "data", [np.zeros((33, 49)), np.ones((33, 49))])
    write_truncated(tmp_path / "data" / "val" / "images" / "1.png")
    fails(capsys, evaluate_folder(tmp_path / "data", tmp_path / "binary.pt", "--json", str(tmp_path / "s.json")),
          "1.png")
    assert not (tmp_path / "s.json").exists()


def test_evaluate_rejects_masks_of_another_size_than_their_images(tmp_path, capsys):
    save_checkpoint(tmp_path / "binary.pt", ICNet(num_classes=2, width=0.125))
    write_folder_dataset(tmp_path / "data", [np.ones((20, 30))], image_sizes=[(33, 49)])
    fails(capsys, evaluate_folder(tmp_path / "data", tmp_path / "binary.pt"), "0.png", "20x30", "33x49")


def test_evaluate_multiclass_masks_from_the_command_line(tmp_path, capsys):
    """Class-index masks (here palette PNGs, whose pixel values are the indices) score against the
    checkpoint's classes; the report names them."""
    rng = np.random.default_rng(4)
    masks = [rng.integers(0, 3, (33, 49)) for _ in range(2)]
    masks[1][:4] = 255
    root = tmp_path / "data"
    for i, mask in enumerate(masks):
        write_rgb(root / "val" / "images" / f"{i}.png", mask.shape, seed=i)
        (root / "val" / "masks").mkdir(parents=True, exist_ok=True)
        indexed = Image.fromarray(mask.astype(np.uint8), mode="P")
        indexed.putpalette([255, 255, 255, 0, 0, 0, 90, 90, 90] + [0, 0, 0] * 253)
        indexed.save(root / "val" / "masks" / f"{i}.png")
    model = ICNet(num_classes=3, width=0.125)
    save_checkpoint(tmp_path / "three.pt", model, class_names=["road", "car", "sky"])
    assert icnet_main(evaluate_folder(root, tmp_path / "three.pt", "--multiclass-masks",
                                      "--json", str(tmp_path / "s.json"))) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert list(scores["classes"]) == ["road", "car", "sky"]
    from icnet.data.datasets import make_dataset
    from icnet.evaluate import evaluate
    expected = evaluate(load_checkpoint(tmp_path / "three.pt")[0].eval(),
                        [(image, torch.from_numpy(mask.astype(np.int64)))
                         for (image, _), mask in zip(make_dataset("folder", "val", root, binary=True), masks)],
                        num_classes=3, progress=False)
    assert scores["pixels"] == int(expected.matrix.sum()) == 2 * 33 * 49 - 4 * 49
    assert scores["mean_iou"] == pytest.approx(expected.mean_iou())
    # a checkpoint without class names gets numbered ones
    save_checkpoint(tmp_path / "unnamed.pt", model)
    assert icnet_main(evaluate_folder(root, tmp_path / "unnamed.pt", "--multiclass-masks")) == 0
    assert "class 2" in capsys.readouterr().out
    # a mask value beyond the checkpoint's classes
    masks[0][0, 0] = 7
    Image.fromarray(masks[0].astype(np.uint8), mode="L").save(root / "val" / "masks" / "0.png")
    fails(capsys, evaluate_folder(root, tmp_path / "three.pt", "--multiclass-masks"), "0.png", "7")


def test_train_with_multiclass_masks_needs_and_uses_the_class_count(tmp_path, capsys):
    rng = np.random.default_rng(6)
    for split in ("train", "val"):
        for i in range(2):
            write_rgb(tmp_path / "data" / split / "images" / f"{i}.png", (33, 65), seed=i)
            (tmp_path / "data" / split / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 4, (33, 65)).astype(np.uint8)).save(
                tmp_path / "data" / split / "masks" / f"{i}.png")
    common = ["--dataset", "folder", "--root", str(tmp_path / "data"), "--width", "0.125", *SMALL_DATA]
    fails(capsys, ["train", "--out", str(tmp_path / "run"), "--multiclass-masks", *common], "--num-classes")
    fails(capsys, ["train", "--out", str(tmp_path / "run"), "--num-classes", "4", *common], "--multiclass-masks")
    assert icnet_main(["train", "--out", str(tmp_path / "run"), "--multiclass-masks", "--num-classes", "4",
                       *common]) == 0
    model, payload = load_checkpoint(tmp_path / "run" / "last.pt")
    assert model.num_classes == 4 and len(payload["class_names"]) == 4


@pytest.mark.parametrize("scale", ["0", "-1", "nan", "inf"])
def test_evaluate_rejects_scales_that_are_not_positive(tmp_path, capsys, weights, scale):
    fails(capsys, ["evaluate", "--weights", str(weights), "--scales", "1", scale, *SMALL_EVAL], "--scales", scale)


def test_multi_scale_probabilities_rejects_a_bad_scale():
    from icnet.evaluate import multi_scale_probabilities
    with pytest.raises(ValueError, match="scales"):
        multi_scale_probabilities(lambda x: x, torch.zeros(1, 3, 8, 8), (8, 8), scales=(1.0, 0.0))


@pytest.mark.parametrize("option", ["--synthetic-val", "--synthetic-train"])
@pytest.mark.parametrize("count", ["0", "-3"])
def test_synthetic_counts_must_be_positive(tmp_path, capsys, weights, option, count):
    fails(capsys, ["evaluate", "--weights", str(weights), *SMALL_EVAL, option, count], option, count)
    from icnet.data.datasets import make_dataset
    with pytest.raises(ValueError, match="count"):
        make_dataset("synthetic", "val", synthetic_count=int(count))


def test_evaluate_refuses_a_json_path_it_cannot_write_before_evaluating(tmp_path, capsys, weights):
    (tmp_path / "scores").mkdir()
    fails(capsys, ["evaluate", "--weights", str(weights), *SMALL_EVAL, "--json", str(tmp_path / "scores")],
          "--json", "scores")
    fails(capsys, ["evaluate", "--weights", str(weights), *SMALL_EVAL, "--json",
                   str(tmp_path / "nowhere" / "s.json")],
          "--json", "nowhere")


# --- train --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--batch-size", "-1"), ("--epochs", "0"),
                                           ("--workers", "-1"), ("--max-iterations", "0"), ("--lr", "-0.1")])
def test_train_rejects_counts_and_rates_out_of_range(tmp_path, capsys, option, value):
    fails(capsys, ["train", "--out", str(tmp_path / "run"), *SMALL_DATA, option, value], option, value)
    assert not (tmp_path / "run").exists()


def test_train_refuses_an_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "run").write_text("keep me")
    fails(capsys, ["train", "--out", str(tmp_path / "run"), "--width", "0.125", *SMALL_DATA], "--out")
    assert (tmp_path / "run").read_text() == "keep me"


@pytest.mark.parametrize("earlier", ["log.csv", "last.pt", "best.pt"])
def test_train_refuses_an_out_holding_an_earlier_run_without_resume(tmp_path, capsys, earlier):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / earlier).write_text("the earlier run's")
    fails(capsys, ["train", "--out", str(tmp_path / "run"), "--width", "0.125", *SMALL_DATA], earlier, "--resume")
    assert [p.name for p in (tmp_path / "run").iterdir()] == [earlier]
    assert (tmp_path / "run" / earlier).read_text() == "the earlier run's"


def test_a_bad_training_image_read_in_a_loader_process_is_one_line(tmp_path, capsys):
    for split in ("train", "val"):
        for i in range(2):
            write_rgb(tmp_path / "data" / split / "images" / f"{i}.png", (33, 65), seed=i)
            (tmp_path / "data" / split / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((33, 65), np.uint8)).save(tmp_path / "data" / split / "masks" / f"{i}.png")
    write_truncated(tmp_path / "data" / "train" / "images" / "1.png")
    argv = ["train", "--out", str(tmp_path / "run"), "--dataset", "folder", "--root", str(tmp_path / "data"),
            "--width", "0.125", *SMALL_DATA, "--workers", "1"]
    fails(capsys, argv, "1.png")


@pytest.mark.parametrize("earlier", ["keep0.75/log.csv", "keep0.5/last.pt", "pruning.json"])
def test_prune_refuses_an_out_holding_an_earlier_pruning_run(tmp_path, capsys, earlier):
    save_checkpoint(tmp_path / "trained.pt", ICNet(num_classes=19, width=0.125))
    (tmp_path / "pruned" / earlier).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "pruned" / earlier).write_text("the earlier run's")
    fails(capsys, ["prune", "--weights", str(tmp_path / "trained.pt"), "--out", str(tmp_path / "pruned"),
                   "--keep", "0.75", "0.5", "--epochs", "1", *SMALL_DATA], earlier, "another folder")
    assert (tmp_path / "pruned" / earlier).read_text() == "the earlier run's"
    assert not (tmp_path / "pruned" / "keep0.75" / "pruned.pt").exists()
