"""Segmentation metrics against a direct count and the official Cityscapes evaluation; test-time averaging."""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cityscapes_eval
from cityscapesscripts.helpers.labels import labels as cityscapes_labels, trainId2label
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from torch import nn

from icnet.cityscapes import CLASS_NAMES, IGNORE_INDEX, label_id_to_train_id
from icnet.evaluate import evaluate, format_report, multi_scale_probabilities, report_dict
from icnet.metrics import ConfusionMatrix


def direct_scores(predictions: np.ndarray, labels: np.ndarray, num_classes: int):
    """IoU, per-class accuracy and pixel accuracy counted class by class, without a confusion matrix."""
    counted = labels != IGNORE_INDEX
    iou, accuracy = np.full(num_classes, np.nan), np.full(num_classes, np.nan)
    for k in range(num_classes):
        tp = np.sum((predictions == k) & (labels == k))
        fp = np.sum((predictions == k) & (labels != k) & counted)
        fn = np.sum((predictions != k) & (labels == k))
        if tp + fp + fn:
            iou[k] = tp / (tp + fp + fn)
        if tp + fn:
            accuracy[k] = tp / (tp + fn)
    correct = np.sum((predictions == labels) & counted)
    pixel_accuracy = correct / counted.sum() if counted.any() else np.nan
    return iou, accuracy, pixel_accuracy


@st.composite
def predictions_and_labels(draw):
    num_classes = draw(st.integers(1, 6))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=7))
    prediction_dtype = draw(st.sampled_from([np.uint8, np.int32, np.int64]))
    label_dtype = draw(st.sampled_from([np.uint8, np.int64]))
    predictions = draw(hnp.arrays(prediction_dtype, shape, elements=st.integers(0, num_classes - 1)))
    labels = draw(hnp.arrays(label_dtype, shape, elements=st.integers(0, num_classes - 1) | st.just(IGNORE_INDEX)))
    return num_classes, predictions, labels


@given(predictions_and_labels())
def test_confusion_matrix_matches_direct_count(case):
    num_classes, predictions, labels = case
    matrix = ConfusionMatrix(num_classes).update(torch.from_numpy(predictions), torch.from_numpy(labels))
    iou, accuracy, pixel_accuracy = direct_scores(predictions, labels, num_classes)
    assert matrix.matrix.dtype == torch.int64
    assert int(matrix.matrix.sum()) == np.sum(labels != IGNORE_INDEX)
    np.testing.assert_allclose(matrix.iou().numpy(), iou, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(matrix.class_accuracy().numpy(), accuracy, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(matrix.pixel_accuracy(), pixel_accuracy, rtol=1e-12, equal_nan=True)
    present = iou[~np.isnan(iou)]
    np.testing.assert_allclose(matrix.mean_iou(), present.mean() if present.size else np.nan,
                               rtol=1e-12, equal_nan=True)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    labels = torch.tensor([[0, 0, 1, IGNORE_INDEX], [1, 1, 0, 0]])
    predictions = torch.tensor([[0, 3, 1, 2], [1, 0, 0, 0]])  # 2 only on an ignored pixel, 3 never true
    matrix = ConfusionMatrix(5).update(predictions, labels)
    iou = matrix.iou()
    assert iou[0].item() == pytest.approx(3 / 5) and iou[1].item() == pytest.approx(2 / 3)
    assert math.isnan(iou[2]) and math.isnan(iou[4]) and iou[3].item() == 0.0
    assert matrix.mean_iou() == pytest.approx((3 / 5 + 2 / 3 + 0) / 3)
    assert math.isnan(matrix.class_accuracy()[3]) and matrix.pixel_accuracy() == pytest.approx(5 / 7)


def test_updates_merge_and_reset():
    rng = np.random.default_rng(0)
    predictions, labels = rng.integers(0, 4, (2, 6, 9)), rng.integers(0, 4, (2, 6, 9))
    labels[rng.random(labels.shape) < 0.2] = IGNORE_INDEX
    whole = ConfusionMatrix(4).update(torch.from_numpy(predictions), torch.from_numpy(labels))
    first = ConfusionMatrix(4).update(torch.from_numpy(predictions[0]), torch.from_numpy(labels[0]))
    second = ConfusionMatrix(4).update(torch.from_numpy(predictions[1]), torch.from_numpy(labels[1]))
    first += second
    assert torch.equal(first.matrix, whole.matrix)
    assert torch.equal(ConfusionMatrix(4).merge(whole).merge(whole).matrix, 2 * whole.matrix)
    with pytest.raises(ValueError, match="classes"):
        first.merge(ConfusionMatrix(5))
    first.reset()
    assert not first.matrix.any() and math.isnan(first.mean_iou()) and math.isnan(first.pixel_accuracy())


def test_bad_inputs_are_refused_and_leave_the_counts_alone():
    matrix = ConfusionMatrix(3).update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    before = matrix.matrix.clone()
    with pytest.raises(ValueError, match=r"predictions must be class ids in \[0, 3\), found 3"):
        matrix.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="predictions must be class ids.*found -1"):
        matrix.update(torch.tensor([-1, 0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must be class ids.*found 7"):
        matrix.update(torch.tensor([0, 1]), torch.tensor([7, 1]))
    with pytest.raises(ValueError, match=r"predictions shape \(2, 3\) must equal labels shape \(3, 2\)"):
        matrix.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="predictions must be an integer tensor"):
        matrix.update(torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        matrix.update(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.bool))
    assert torch.equal(matrix.matrix, before)
    # a prediction on an ignored pixel may be anything the model emits, but is still checked
    with pytest.raises(ValueError, match="predictions"):
        matrix.update(torch.tensor([5]), torch.tensor([IGNORE_INDEX]))


def test_all_reduce_is_a_no_op_without_a_process_group():
    matrix = ConfusionMatrix(3).update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    before = matrix.matrix.clone()
    assert matrix.all_reduce() is matrix and torch.equal(matrix.matrix, before)


def _all_reduce_worker(rank, world_size, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        matrix = ConfusionMatrix(3).update(torch.tensor([rank, 2]), torch.tensor([0, rank]))
        results[rank] = matrix.all_reduce().matrix.tolist()
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_the_matrices_of_every_process(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_all_reduce_worker, args=(2, tmp_path / "rendezvous", results), nprocs=2)
    expected = ConfusionMatrix(3).update(torch.tensor([0, 2, 1, 2]), torch.tensor([0, 0, 0, 1])).matrix.tolist()
    assert results[0] == expected and results[1] == expected


# Labels Cityscapes counts as ground truth but leaves out of every score, e.g. 0 unlabeled, 1 ego vehicle.
IGNORED_LABEL_IDS = [label.id for label in cityscapes_labels if label.ignoreInEval and label.id >= 0]


def test_agrees_with_the_official_cityscapes_evaluation(tmp_path):
    rng = np.random.default_rng(2018)
    train_to_label_id = np.array([trainId2label[t].id for t in range(len(CLASS_NAMES))], dtype=np.uint8)
    ours = ConfusionMatrix(len(CLASS_NAMES))
    prediction_files, ground_truth_files = [], []
    for i in range(4):
        # ground truth only from trainIds 0-14, predictions also 17 (never true: IoU 0); 15, 16, 18 absent (NaN)
        truth = rng.integers(0, 15, (32, 64))
        guess = np.where(rng.random(truth.shape) < 0.6, truth, rng.choice([*range(13), 17], truth.shape))
        truth_ids = train_to_label_id[truth]
        ignored = rng.random(truth.shape) < 0.15
        truth_ids[ignored] = rng.choice(IGNORED_LABEL_IDS, ignored.sum())
        prediction_files.append(str(tmp_path / f"pred_{i}.png"))
        ground_truth_files.append(str(tmp_path / f"gt_{i}_labelIds.png"))
        Image.fromarray(train_to_label_id[guess]).save(prediction_files[-1])
        Image.fromarray(truth_ids).save(ground_truth_files[-1])
        ours.update(torch.from_numpy(guess), torch.from_numpy(label_id_to_train_id()[truth_ids]))

    # evaluateImgLists takes its options as an argument: a copy of the module's defaults keeps the module
    # untouched; no instance scores (they need *_instanceIds.png), no JSON file, no printing.
    options = copy.copy(cityscapes_eval.args)
    options.evalInstLevelScore, options.JSONOutput, options.quiet = False, False, True
    official = cityscapes_eval.evaluateImgLists(prediction_files, ground_truth_files, options)

    iou = ours.iou().tolist()
    for train_id, name in enumerate(CLASS_NAMES):
        np.testing.assert_allclose(official["classScores"][name], iou[train_id], atol=1e-6, equal_nan=True,
                                   err_msg=name)
    assert sum(math.isnan(v) for v in iou) == 3 and iou[17] == 0.0
    assert official["averageScoreClasses"] == pytest.approx(ours.mean_iou(), abs=1e-6)


class RampLogits(nn.Module):
    """Logits known in closed form: height * c_k + w_k * image[:, 0] + s_k * column / (width - 1).

    Given an image whose channel 0 is a ramp 0..1 across the width, every term is linear in the
    normalised column, which bilinear align_corners resizing reproduces exactly at any size; the
    height term tells the scales apart and the column term (not flip-equivariant) the mirrored views.
    """

    def __init__(self, c, w, s):
        super().__init__()
        self.c, self.w, self.s = c[:, None, None], w[:, None, None], s[:, None, None]

    def forward(self, x):
        height, width = x.shape[-2:]
        column = torch.linspace(0, 1, width)
        return height * self.c + self.w * x[:, :1] + self.s * column


def ramp_image(height, width, generator):
    image = torch.rand(3, height, width, generator=generator)
    image[0] = torch.linspace(0, 1, width)
    return image


def test_multi_scale_flip_probabilities_match_a_hand_computation():
    generator = torch.Generator().manual_seed(0)
    c, w, s = (torch.randn(4, generator=generator) for _ in range(3))
    model = RampLogits(0.3 * c, w, s)
    image = ramp_image(8, 16, generator)
    label_size = (10, 31)  # larger than the image: every view is resized to it
    u = torch.linspace(0, 1, label_size[1])
    expected = torch.zeros(4, *label_size)
    for height in (8, 4, 12):  # scales 1, 0.5, 1.5
        for column in (u, 1 - u):  # the mirrored view sees the column term reversed
            logits = height * 0.3 * c[:, None] + w[:, None] * u + s[:, None] * column
            expected += logits.softmax(dim=0)[:, None, :].expand(4, *label_size) / 6
    actual = multi_scale_probabilities(model, image[None], label_size, scales=(1.0, 0.5, 1.5), flip=True)
    torch.testing.assert_close(actual[0], expected, atol=1e-6, rtol=1e-5)

    labels = torch.randint(0, 4, label_size, generator=generator)
    labels[0] = IGNORE_INDEX
    matrix = evaluate(model, [(image, labels)], flip=True, scales=(1.0, 0.5, 1.5), progress=False)
    assert torch.equal(matrix.matrix, ConfusionMatrix(4).update(expected.argmax(dim=0), labels).matrix)
    single = evaluate(model, [(image, labels)], progress=False)
    at_scale_one = (8 * 0.3 * c[:, None] + (w + s)[:, None] * u).argmax(dim=0).expand(*label_size)
    assert torch.equal(single.matrix, ConfusionMatrix(4).update(at_scale_one, labels).matrix)


class LabelsInChannelZero(nn.Module):
    """A perfect predictor: the image carries its class ids in channel 0."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        return 10.0 * nn.functional.one_hot(x[:, 0].long(), self.num_classes).permute(0, 3, 1, 2).float()


def test_perfect_predictor_scores_one_over_batches_and_single_samples():
    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 4, (2, 12, 20), generator=generator)
    single = torch.randint(0, 4, (12, 20), generator=generator)
    samples = [(batch[:, None].expand(2, 3, 12, 20).float(), batch.clone()),
               (single[None].expand(3, 12, 20).float(), single.clone())]
    samples[1][1][:, :5] = IGNORE_INDEX
    model = LabelsInChannelZero(6).train()
    matrix = evaluate(model, samples, flip=True, progress=False)
    assert model.training, "evaluate puts the model back in its previous mode"
    assert matrix.num_classes == 6 and int(matrix.matrix.sum()) == 2 * 12 * 20 + 12 * 15
    assert matrix.mean_iou() == 1.0 and matrix.pixel_accuracy() == 1.0
    assert math.isnan(matrix.iou()[4]) and math.isnan(matrix.iou()[5])


def test_empty_samples_need_num_classes():
    model = LabelsInChannelZero(3)
    assert evaluate(model, [], num_classes=3, progress=False).matrix.sum() == 0
    with pytest.raises(ValueError, match="num_classes"):
        evaluate(model, [], progress=False)


def test_reports_name_every_class_and_survive_strict_json():
    matrix = ConfusionMatrix(3).update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, IGNORE_INDEX]))
    names = ("road", "sidewalk", "building")
    report = report_dict(matrix, names)
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert report["classes"]["building"] == {"iou": None, "accuracy": None}
    assert report["mean_iou"] == pytest.approx(0.5) and report["pixel_accuracy"] == pytest.approx(2 / 3)
    text = format_report(matrix, names)
    assert all(name in text for name in names) and "50.00" in text and "66.67" in text and "n/a" in text
    with pytest.raises(ValueError, match="class_names"):
        format_report(matrix, names[:2])
