"""Training: it learns, it resumes, and two processes (gloo, CPU) compute what one process computes."""

import json
import os
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from icnet.cli import main as icnet_main
from icnet.distributed import GlobalBatchNorm2d, World
from icnet.train import GlobalBatchSampler, TrainConfig, train


def tiny_config(out, **overrides) -> TrainConfig:
    values = dict(out=str(out), synthetic_size=(64, 128), synthetic_train=8, synthetic_val=2, epochs=1,
                  batch_size=4, crop=(49, 97), scale_range=(0.75, 1.25), width=0.25, workers=0, progress=False)
    return TrainConfig(**(values | overrides))


def test_training_on_synthetic_scenes_lowers_the_loss_and_raises_miou_well_above_chance(tmp_path):
    config = tiny_config(tmp_path, synthetic_size=(128, 256), synthetic_train=96, synthetic_val=16, epochs=4,
                         batch_size=8, crop=(113, 225), width=0.5, lr=0.02, seed=1)
    rows = train(config)
    first, last = rows[0], rows[-1]
    # 9 classes occur in the scenes: a constant prediction of the commonest class scores about 1/9 x its IoU
    assert last["val_miou"] > 0.3, rows
    assert last["train_loss"] < 0.6 * first["iteration_losses"][0], rows
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "log.csv").read_text().count("\n") == 1 + len(rows)


def test_cli_train_resume_and_evaluate(tmp_path, capsys):
    common = ["--synthetic-size", "64x128", "--synthetic-train", "8", "--synthetic-val", "2", "--batch-size", "4",
              "--crop", "49x97", "--workers", "0", "--no-progress"]
    assert icnet_main(["train", "--out", str(tmp_path), "--epochs", "1", "--width", "0.25", *common]) == 0
    shutil.copy(tmp_path / "last.pt", tmp_path / "epoch1.pt")
    for _ in range(2):  # the second resume starts again from epoch 1's checkpoint, after epoch 2 was logged
        assert icnet_main(["train", "--out", str(tmp_path), "--epochs", "2", "--width", "0.25",
                           "--resume", str(tmp_path / "epoch1.pt"), *common]) == 0
        log = (tmp_path / "log.csv").read_text().splitlines()
        assert [line.split(",")[:2] for line in log[1:]] == [["1", "2"], ["2", "4"]]  # resumed at epoch 2, step 3
    capsys.readouterr()
    assert icnet_main(["evaluate", "--weights", str(tmp_path / "last.pt"), "--synthetic-size", "64x128",
                       "--synthetic-val", "2", "--flip", "--json", str(tmp_path / "scores.json")]) == 0
    assert "mIoU" in capsys.readouterr().out
    assert 0 <= json.loads((tmp_path / "scores.json").read_text())["mean_iou"] <= 1
    assert icnet_main(["train", "--out", str(tmp_path), "--dataset", "cityscapes", *common]) == 2


def test_global_batches_are_split_across_processes():
    single = list(GlobalBatchSampler(10, 4, World(), seed=3))
    ranks = [list(GlobalBatchSampler(10, 4, World(rank, 2), seed=3)) for rank in range(2)]
    assert len(single) == 2 and all(len(batch) == 4 for batch in single)
    for b, batch in enumerate(single):
        assert sorted(ranks[0][b] + ranks[1][b]) == sorted(batch)
    with pytest.raises(ValueError, match="multiple"):
        GlobalBatchSampler(10, 3, World(0, 2), seed=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world_size, port, job, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        result = job(rank, out)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result))


def _run_distributed(job, tmp_path, world_size=2):
    mp.spawn(_distributed_worker, args=(world_size, _free_port(), job, tmp_path), nprocs=world_size)
    return json.loads((tmp_path / "result.json").read_text())


def _batch_norm_job(rank, out):
    """Rank r normalises its half of a fixed batch with GlobalBatchNorm2d."""
    dist.init_process_group("gloo")
    x = torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bn = GlobalBatchNorm2d(3, dtype=torch.float64)
    mine = x[rank::2].clone().requires_grad_()
    y = bn(mine)
    (y * torch.arange(y.numel(), dtype=torch.float64).reshape(y.shape)).sum().backward()
    grads = [torch.zeros_like(mine) for _ in range(2)]
    dist.all_gather(grads, mine.grad)
    outputs = [torch.zeros_like(y) for _ in range(2)]
    dist.all_gather(outputs, y.detach())
    return {"y": [o.tolist() for o in outputs], "grad": [g.tolist() for g in grads],
            "running_mean": bn.running_mean.tolist(), "running_var": bn.running_var.tolist()}


def test_global_batch_norm_over_two_processes_equals_batch_norm_of_the_whole_batch(tmp_path):
    result = _run_distributed(_batch_norm_job, tmp_path)
    x = torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    whole = x.clone().requires_grad_()
    y = bn(whole)
    # each rank weighted its half by arange over its own elements: rebuild the same weights for the whole batch
    weights = torch.zeros_like(y)
    half = torch.arange(y[0::2].numel(), dtype=torch.float64).reshape(y[0::2].shape)
    weights[0::2], weights[1::2] = half, half
    (y * weights).sum().backward()
    for rank in range(2):
        assert torch.allclose(torch.tensor(result["y"][rank], dtype=torch.float64), y[rank::2].detach(), atol=1e-12)
        assert torch.allclose(torch.tensor(result["grad"][rank], dtype=torch.float64), whole.grad[rank::2],
                              atol=1e-12)
    assert torch.allclose(torch.tensor(result["running_mean"], dtype=torch.float64), bn.running_mean, atol=1e-12)
    assert torch.allclose(torch.tensor(result["running_var"], dtype=torch.float64), bn.running_var, atol=1e-12)


def _training_job(rank, out):
    rows = train(tiny_config(out / f"rank{rank}", epochs=2, max_iterations=3, dtype="float64"))
    return [loss for row in rows for loss in row["iteration_losses"]]


def test_two_process_training_follows_the_single_process_loss_trajectory(tmp_path):
    """In float64: float32 gradients of a freshly initialised ICNet are too sensitive to summation order
    (up to ~15% apart from float64 ones, one process or two) for a trajectory comparison to mean anything."""
    torch.set_num_threads(1)
    try:
        single = [loss for row in train(tiny_config(tmp_path / "single", epochs=2, max_iterations=3, dtype="float64"))
                  for loss in row["iteration_losses"]]
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    distributed = _run_distributed(_training_job, tmp_path)
    assert len(single) == len(distributed) == 3
    assert single[0] > single[-1] or not np.allclose(single, single[0])  # the weights really changed
    # measured: equal at step 1, ~2e-7 apart at step 2, ~6e-6 at step 3 (per-process BatchNorm: ~1e-2)
    np.testing.assert_allclose(distributed, single, rtol=5e-5)
