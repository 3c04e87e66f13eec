"""The confusion matrix behind the Cityscapes benchmark's numbers: per-class IoU, mIoU, pixel accuracy."""

import torch
import torch.distributed as dist

from icnet.cityscapes import IGNORE_INDEX


class ConfusionMatrix:
    """Pixel counts, matrix[true class, predicted class], over the pixels whose label is not ignore_index.

    The counts stay int64 so a full validation set (hundreds of millions of pixels) sums exactly, and on
    the device of the last update so accumulating GPU batches needs no host round trip per batch.
    A class with neither ground truth nor predictions has IoU NaN and is left out of the mean, as in
    the Cityscapes evaluation; a class predicted but absent from the ground truth scores 0.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> "ConfusionMatrix":
        """Count predicted class ids against label ids: integer tensors of one shape, any shape, any device."""
        predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
        for name, values in (("predictions", predictions), ("labels", labels)):
            if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor of class ids, got {values.dtype}")
        if predictions.shape != labels.shape:
            raise ValueError(f"predictions shape {tuple(predictions.shape)} must equal labels shape "
                             f"{tuple(labels.shape)}")
        if predictions.device != labels.device:
            raise ValueError(f"predictions are on {predictions.device} but labels on {labels.device}")
        predictions, labels = predictions.reshape(-1).long(), labels.reshape(-1).long()
        counted = labels != self.ignore_index
        self._check_range(predictions, labels, counted)
        predictions, labels = predictions[counted], labels[counted]
        counts = torch.bincount(labels * self.num_classes + predictions, minlength=self.num_classes ** 2)
        self.matrix = self.matrix.to(labels.device)
        self.matrix += counts.view(self.num_classes, self.num_classes)
        return self

    def _check_range(self, predictions, labels, counted):
        # An out-of-range id would land in another cell of the flattened bincount and skew every score
        # silently. Predictions are checked on ignored pixels too: an id the model cannot emit is a bug
        # wherever it appears. Both checks come back in one transfer: on a GPU each is a synchronisation.
        c = self.num_classes
        bad_predictions = (predictions < 0) | (predictions >= c)
        bad_labels = counted & ((labels < 0) | (labels >= c))
        any_bad_prediction, any_bad_label = torch.stack([bad_predictions.any(), bad_labels.any()]).tolist()
        if any_bad_prediction:
            found = predictions[bad_predictions][0].item()
            raise ValueError(f"predictions must be class ids in [0, {c}), found {found}")
        if any_bad_label:
            raise ValueError(f"labels must be class ids in [0, {c}) or ignore_index {self.ignore_index}, "
                             f"found {labels[bad_labels][0].item()}")

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add other's counts into this matrix (e.g. from another data shard)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"other has {other.num_classes} classes, this matrix {self.num_classes}")
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    __iadd__ = merge

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the counts of every process, so each rank holds the whole data set's matrix.

        A no-op unless torch.distributed is initialised. Call once after the last update: calling it
        twice counts the other ranks' pixels again.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = self.matrix.device
        if dist.get_backend() == dist.Backend.NCCL:  # NCCL reduces CUDA tensors only
            self.matrix = self.matrix.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)
        self.matrix = self.matrix.to(device)
        return self

    def reset(self) -> None:
        self.matrix.zero_()

    def _counts(self):
        counts = self.matrix.cpu().double()
        true_positives = counts.diagonal()
        return true_positives, counts.sum(dim=1), counts.sum(dim=0)

    def iou(self) -> torch.Tensor:
        """Per-class intersection over union, float64 [num_classes]; NaN where tp + fp + fn == 0."""
        true_positives, labelled, predicted = self._counts()
        return true_positives / (labelled + predicted - true_positives)

    def mean_iou(self) -> float:
        """The mean of iou() over the classes that are not NaN (NaN if all are)."""
        return torch.nanmean(self.iou()).item()

    def class_accuracy(self) -> torch.Tensor:
        """Per-class recall tp / (tp + fn), float64 [num_classes]; NaN for a class with no ground truth."""
        true_positives, labelled, _ = self._counts()
        return true_positives / labelled

    def pixel_accuracy(self) -> float:
        """The fraction of counted pixels predicted correctly (NaN before any are counted)."""
        true_positives, labelled, _ = self._counts()
        return (true_positives.sum() / labelled.sum()).item()

    def __repr__(self) -> str:
        return (f"ConfusionMatrix(num_classes={self.num_classes}, pixels={int(self.matrix.sum())}, "
                f"mean_iou={self.mean_iou():.4f})")
