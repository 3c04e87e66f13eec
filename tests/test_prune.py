"""Filter pruning: channels removed consistently across residual streams and fusion units."""

import pytest
import torch

from icnet import ICNet
from icnet.checkpoint import load_checkpoint, save_checkpoint
from icnet.prune import channel_groups, conv_parameters, prune, pruned_channels
from tests.test_icnet_model import randomize_batch_norm


def kill_channels(model: ICNet, keep: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Makes a random (1 - keep) of every group's channels dead (all producers' filters zero, BN output 0):
    they then contribute nothing, so removing exactly them must leave the eval output unchanged."""
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    alive = {}
    for name, group in channel_groups(model).items():
        count = model.channels[name]
        dead = torch.randperm(count, generator=generator)[: count - max(1, round(count * keep))]
        for weight_key, bn in group.producers:
            state[weight_key][dead] = 0
            state[f"{bn}.bias"][dead] = 0
            state[f"{bn}.running_mean"][dead] = 0
        alive[name] = torch.ones(count, dtype=torch.bool).index_fill_(0, dead, False)
    return alive


@pytest.mark.parametrize("fused", [False, True])
def test_pruning_dead_channels_leaves_the_output_unchanged(fused):
    torch.manual_seed(0)
    model = randomize_batch_norm(ICNet(num_classes=7, width=0.25, fused=fused)).eval()
    with torch.no_grad():
        kill_channels(model, 0.5)
    image = torch.randn(2, 3, 65, 129)
    with torch.no_grad():
        expected = model(image)
        pruned = prune(model, pruned_channels(model, 0.5))
        actual = pruned(image)
    assert pruned.channels == {g: max(1, round(c * 0.5)) for g, c in model.channels.items()}
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_half_width_quarters_the_pruned_convs_and_round_trips_through_a_checkpoint(tmp_path):
    model = ICNet(num_classes=19, width=0.5)
    pruned = prune(model, pruned_channels(model, 0.5))
    # every conv but the two reading the image and the three classifiers loses half its inputs and outputs
    edge = {"conv1.0.conv", "sub1.0.conv", "cls_sub4", "cls_sub24", "cls_sub124"}
    for (name, before), after in zip(model.named_modules(), dict(pruned.named_modules()).values()):
        if isinstance(before, torch.nn.Conv2d) and name not in edge:
            assert before.weight.numel() == 4 * after.weight.numel(), name
    assert 3.9 < conv_parameters(model) / conv_parameters(pruned) < 4.0
    save_checkpoint(tmp_path / "pruned.pt", pruned)
    loaded, payload = load_checkpoint(tmp_path / "pruned.pt")
    assert loaded.channels == pruned.channels and payload["config"]["channels"] == pruned.channels
    assert loaded.eval()(torch.randn(1, 3, 65, 129)).shape == (1, 19, 65, 129)


def test_pruning_keeps_the_filters_with_the_largest_l1_norm():
    model = ICNet(num_classes=3, width=0.25)
    with torch.no_grad():
        weight = model.sub1[0].conv.weight  # sole producer of group "sub1.0"
        weight.copy_(torch.arange(weight.shape[0], dtype=torch.float32).reshape(-1, 1, 1, 1).expand_as(weight))
    pruned = prune(model, pruned_channels(model, 0.5))
    kept = pruned.sub1[0].conv.weight[:, 0, 0, 0]
    assert torch.equal(kept, torch.arange(weight.shape[0] // 2, weight.shape[0], dtype=torch.float32))


def test_bad_pruning_requests_are_rejected():
    model = ICNet(num_classes=3, width=0.25)
    with pytest.raises(ValueError, match="keep"):
        pruned_channels(model, 1.5)
    too_wide = dict(model.channels, conv5=model.channels["conv5"] + 1)
    with pytest.raises(ValueError, match="conv5"):
        prune(model, too_wide)
    with pytest.raises(ValueError, match="channel group"):
        ICNet(channels={"conv5": 3})


def test_cli_prune_progressively_with_fine_tuning(tmp_path, capsys):
    import json

    from icnet.cli import main as icnet_main

    save_checkpoint(tmp_path / "trained.pt", ICNet(num_classes=19, width=0.25))
    assert icnet_main(["prune", "--weights", str(tmp_path / "trained.pt"), "--out", str(tmp_path / "pruned"),
                       "--keep", "0.75", "0.5", "--epochs", "1", "--max-iterations", "1", "--batch-size", "2",
                       "--crop", "49x97", "--synthetic-size", "64x128", "--synthetic-train", "2",
                       "--synthetic-val", "1", "--workers", "0", "--no-progress"]) == 0
    rows = json.loads((tmp_path / "pruned" / "pruning.json").read_text())
    assert [row["keep"] for row in rows] == [1.0, 0.75, 0.5]
    assert rows[0]["conv_parameters"] > rows[1]["conv_parameters"] > rows[2]["conv_parameters"]
    final, _ = load_checkpoint(rows[-1]["checkpoint"])
    assert final.channels == pruned_channels(ICNet(width=0.25), 0.5)
    assert "keep 0.5" in capsys.readouterr().out
