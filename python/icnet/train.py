"""icnet train: ICNet with cascade label guidance, on one process or many (torchrun).

The recipe of the paper's setting: SGD with momentum 0.9, poly learning rate (power 0.9), weight decay,
random scale / crop / flip, losses at 1/16, 1/8 and 1/4 weighted 0.4 / 0.4 / 1.0 by default. The batch size
is global: with N processes each takes batch_size / N samples of the same global batch, and BatchNorm
statistics span the global batch (icnet.distributed), so N processes compute what one process would.
"""

import csv
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from icnet.cityscapes import IGNORE_INDEX
from icnet.checkpoint import CheckpointError, load_checkpoint, load_weights, read_checkpoint, save_checkpoint
from icnet.data.datasets import Augmented, make_dataset
from icnet.distributed import World, init_from_environment, mean_over_processes, synchronise_batch_norm
from icnet.evaluate import evaluate, percent
from icnet.losses import LOSSES, PIXEL_MEAN_LOSSES, cascade_label_guidance
from icnet.model import ICNet
from icnet.segment import best_device, parse_device

RESUME_KEYS = {"epoch", "iteration", "optimizer", "scheduler", "scaler", "best_miou"}
LOG_FIELDS = ("epoch", "iteration", "lr", "train_loss", "loss_sub4", "loss_sub24", "loss_sub124", "val_miou",
              "val_pixel_accuracy", "seconds")
RUN_FILES = ("log.csv", "last.pt", "best.pt")  # what a run writes into its out folder


@dataclass
class TrainConfig:
    out: str = "runs/icnet"
    dataset: str = "synthetic"          # synthetic | cityscapes | folder
    root: str | None = None
    binary: bool = True                 # folder datasets: any non-zero mask value is the foreground
    num_classes: int | None = None      # folder datasets of class-index masks (binary=False): their classes
    synthetic_size: tuple[int, int] = (256, 512)
    synthetic_train: int = 400
    synthetic_val: int = 100
    epochs: int = 30
    batch_size: int = 8                 # global, over all processes
    crop: tuple[int, int] = (225, 449)  # odd sizes keep every 2x resize of the network exact
    scale_range: tuple[float, float] = (0.75, 1.5)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    loss: str = "cross_entropy"
    branch_weights: tuple[float, float, float] = (0.4, 0.4, 1.0)
    width: float = 0.5
    init: str | None = None             # start from this checkpoint's weights (and channels: pruned models)
    resume: str | None = None           # continue this checkpoint's run: weights, optimiser, schedule, epoch
    amp: bool = False                   # float16 autocast with loss scaling on GPUs, bfloat16 on CPUs
    dtype: str = "float32"              # "float64" for exact comparisons (float32 gradients of a freshly
                                        # initialised ICNet differ from float64 ones by up to ~15%)
    device: str | None = None
    workers: int = 2
    seed: int = 0
    max_iterations: int | None = None   # stop early (tests, smoke runs)
    progress: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size", "synthetic_train", "synthetic_val"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


class GlobalBatchSampler:
    """Batches of a per-epoch permutation drawn from (seed, epoch); each process takes its share
    (positions rank, rank + size, ...) of every global batch. The last incomplete batch is dropped."""

    def __init__(self, length: int, global_batch: int, world: World, seed: int):
        if global_batch % world.size:
            raise ValueError(f"batch_size {global_batch} must be a multiple of the number of processes {world.size}")
        if length < global_batch:
            raise ValueError(f"batch_size {global_batch} is larger than the training set ({length} samples)")
        self.length, self.global_batch, self.world, self.seed, self.epoch = length, global_batch, world, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length // self.global_batch

    def __iter__(self):
        order = np.random.default_rng((self.seed, self.epoch, 1)).permutation(self.length)
        for b in range(len(self)):
            batch = order[b * self.global_batch:(b + 1) * self.global_batch]
            yield batch[self.world.rank::self.world.size].tolist()


def poly_schedule(optimizer, total_iterations: int, power: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: max(0.0, 1 - it / max(1, total_iterations)) ** power)


def parameter_groups(model: torch.nn.Module, weight_decay: float):
    """Weight decay on conv weights only: BatchNorm affines and biases are not decayed."""
    decayed, plain = [], []
    for parameter in model.parameters():
        (decayed if parameter.ndim == 4 else plain).append(parameter)
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _device(config: TrainConfig, world: World) -> torch.device:
    """The configured device (default: a GPU if there is one); a GPU without an index is the one of this
    process's local rank."""
    device = parse_device(config.device) if config.device else best_device()
    if device.type == "cuda" and device.index is None:
        return parse_device(f"cuda:{world.local_rank}")
    return device


def _build_model(config: TrainConfig, num_classes: int):
    if config.init is None:
        return ICNet(num_classes=num_classes, width=config.width, fused=True)
    model, _ = load_checkpoint(config.init, mode="sub124")
    if model.num_classes != num_classes:
        raise ValueError(f"--init {config.init} has {model.num_classes} classes, the dataset {num_classes}")
    return model


def train(config: TrainConfig) -> list[dict]:
    """Runs the configured training; returns the per-epoch log rows (also written to out/log.csv)."""
    out = Path(config.out)
    _check_out(out, config.resume)
    world = init_from_environment(parse_device(config.device) if config.device else best_device())
    device = _device(config, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(config.seed)
    size = config.synthetic_size
    train_set = make_dataset(config.dataset, "train", config.root, config.binary, config.synthetic_train, size,
                             config.num_classes)
    val_set = make_dataset(config.dataset, "val", config.root, config.binary, config.synthetic_val, size,
                           config.num_classes)
    samples = Augmented(train_set, config.crop, config.scale_range, config.seed)
    sampler = GlobalBatchSampler(len(samples), config.batch_size, world, config.seed)
    loader = DataLoader(samples, batch_sampler=sampler, num_workers=config.workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)

    dtype = {"float32": torch.float32, "float64": torch.float64}[config.dtype]
    model = _build_model(config, train_set.num_classes).to(device=device, dtype=dtype).train()
    if world.distributed:
        model = synchronise_batch_norm(model, device)
    trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world.distributed else model
    optimizer = torch.optim.SGD(parameter_groups(model, config.weight_decay), lr=config.lr, momentum=config.momentum)
    total = config.epochs * len(sampler)
    scheduler = poly_schedule(optimizer, total, config.poly_power)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and amp_dtype == torch.float16)
    loss_fn = LOSSES[config.loss]
    pixel_share = _share_of_labelled_pixels if world.distributed and config.loss in PIXEL_MEAN_LOSSES else None

    start_epoch, iteration, best = 0, 0, -1.0
    if config.resume:
        payload = read_checkpoint(config.resume)
        load_weights(model, payload, config.resume)
        state = payload.get("training_state")
        if not isinstance(state, dict) or not RESUME_KEYS <= state.keys():
            raise CheckpointError(f"{config.resume} holds no training state to resume (it was not saved by a "
                                  "training run); start from its weights with --init instead")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, iteration, best = state["epoch"] + 1, state["iteration"], state["best_miou"]
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _keep_log_until(out / "log.csv", start_epoch)
    rows = []
    for epoch in range(start_epoch, config.epochs):
        samples.set_epoch(epoch)
        sampler.set_epoch(epoch)
        model.train()
        started, losses = time.perf_counter(), []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", file=sys.stderr,
                   disable=not (config.progress and world.is_main), leave=False)
        for images, labels in bar:
            images = images.to(device=device, dtype=dtype, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=config.amp):
                outputs = trained(images)
            loss, parts = cascade_label_guidance(outputs, labels, config.branch_weights, loss_fn,
                                                 pixel_share=pixel_share)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            iteration += 1
            reported = mean_over_processes(torch.stack([loss.detach(), *[p.detach() for p in parts]]).double())
            losses.append(reported.tolist())
            bar.set_postfix(loss=f"{reported[0].item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if config.max_iterations and iteration >= config.max_iterations:
                break
        matrix = _validate(model, val_set, device, world, config.progress)
        means = np.mean(losses, axis=0).tolist() if losses else [float("nan")] * 4
        row = {"epoch": epoch + 1, "iteration": iteration, "lr": scheduler.get_last_lr()[0],
               "train_loss": means[0], "loss_sub4": means[1], "loss_sub24": means[2], "loss_sub124": means[3],
               "val_miou": matrix.mean_iou(), "val_pixel_accuracy": matrix.pixel_accuracy(),
               "seconds": time.perf_counter() - started, "iteration_losses": [step[0] for step in losses]}
        rows.append(row)
        if world.is_main:
            _append_log(out / "log.csv", row)
            state = {"epoch": epoch, "iteration": iteration, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "best_miou": max(best, row["val_miou"]), "config": _plain(asdict(config))}
            save_checkpoint(out / "last.pt", model, train_set.class_names, state)
            if row["val_miou"] > best:
                save_checkpoint(out / "best.pt", model, train_set.class_names, state)
            # the epoch's result: on stdout whether or not progress bars run (on stderr)
            print(f"epoch {epoch + 1}/{config.epochs}: loss {row['train_loss']:.4f}, "
                  f"val mIoU {percent(row['val_miou'])}, pixel accuracy {percent(row['val_pixel_accuracy'])} "
                  f"({row['seconds']:.0f} s)", flush=True)
        best = max(best, row["val_miou"])
        if config.max_iterations and iteration >= config.max_iterations:
            break
    return rows


def _share_of_labelled_pixels(labels: torch.Tensor) -> torch.Tensor:
    """This process's labelled pixels over the mean per process. A per-process mean loss times this share,
    averaged over processes by DDP, is the mean over the whole global batch's labelled pixels, as one
    process would compute it, however the ignored pixels (crop padding) fall between processes."""
    local = (labels != IGNORE_INDEX).sum().to(torch.float64)
    return local / mean_over_processes(local).clamp(min=1)


def _validate(model, val_set, device, world: World, progress: bool):
    """Confusion matrix of the whole validation set, each process evaluating every size-th sample."""
    model.eval()
    shard = Subset(val_set, range(world.rank, len(val_set), world.size))
    matrix = evaluate(model, shard, device=device, num_classes=val_set.num_classes,
                      progress=progress and world.is_main)
    matrix.all_reduce()
    model.train()
    return matrix


def _check_out(out: Path, resume: str | None) -> None:
    """A fresh run refuses a folder holding an earlier run's files: its epochs would mix with the earlier
    ones in one log.csv and its checkpoints replace the earlier run's."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out} is a file, not a folder")
    earlier = [name for name in RUN_FILES if (out / name).exists()]
    if earlier and resume is None:
        raise ValueError(f"out {out} holds an earlier training run ({', '.join(earlier)}): continue it with "
                         f"--resume {out / 'last.pt'}, or choose another folder")


def _keep_log_until(path: Path, epoch: int) -> None:
    """A resumed run's log keeps the rows of the epochs its checkpoint had trained (1 to epoch), so epochs
    logged after that checkpoint are not listed twice."""
    if not path.exists():
        return
    with path.open(newline="") as file:
        rows = [row for row in csv.DictReader(file) if int(row["epoch"]) <= epoch]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def _append_log(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=LOG_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({key: row[key] for key in LOG_FIELDS})


def _plain(value):
    """Tuples as lists, so a checkpoint loads with weights_only=True."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value
