"""The paper's model compression: L1-norm filter pruning, progressively (keep 3/4, fine-tune, keep 1/2,
fine-tune), with the channels physically removed so that the pruned network is smaller and faster.

Channels are removed per channel group (icnet.model: a conv's output with its BatchNorm, every conv that
reads it, and every branch summed into the same residual stream or fusion unit), so the pruned network
stays consistent across residual connections and the CFF inputs. Its width per group is saved in the
checkpoint ("channels"), from which ICNet rebuilds it.
"""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from icnet.checkpoint import load_checkpoint, save_checkpoint
from icnet.data.datasets import make_dataset
from icnet.evaluate import evaluate
from icnet.layers import ConvBN
from icnet.model import ICNet
from icnet.segment import best_device, parse_device
from icnet.train import RUN_FILES, train

FIXED_GROUPS = ("image", "classes")  # the input's channels and the logits are never pruned


@dataclass
class ChannelGroup:
    producers: list[tuple[str, str]] = field(default_factory=list)  # (conv weight key, BatchNorm prefix)
    consumers: list[str] = field(default_factory=list)              # conv weight keys reading the group


def channel_groups(model: ICNet) -> dict[str, ChannelGroup]:
    """Every prunable channel group of model with the state_dict entries that hold its channels."""
    groups: dict[str, ChannelGroup] = {}

    def connect(cin, cout, weight_key, bn_prefix):
        groups.setdefault(cout, ChannelGroup()).producers.append((weight_key, bn_prefix))
        groups.setdefault(cin, ChannelGroup()).consumers.append(weight_key)

    for name, module in model.named_modules():
        tags = getattr(module, "channel_groups", None)
        if tags is None:
            continue
        if isinstance(module, ConvBN):
            connect(*tags, f"{name}.conv.weight", f"{name}.bn")
        elif isinstance(module, nn.Conv2d):  # a classifier: reads a group, writes the logits
            connect(*tags, f"{name}.weight", None)
        else:  # a cascade feature fusion unit: (low, high, out)
            low, high, out = tags
            connect(low, out, f"{name}.conv_low.weight", f"{name}.bn_low")
            connect(high, out, f"{name}.conv_high.weight", f"{name}.bn_high")
    for fixed in FIXED_GROUPS:
        groups.pop(fixed, None)
    return groups


def filter_importance(state: dict, group: ChannelGroup) -> torch.Tensor:
    """The L1 norm of each output filter, summed over the group's producers after dividing each
    producer's norms by their mean: convs summed into one stream are ranked jointly, each counting alike."""
    total = 0
    for weight_key, _ in group.producers:
        norms = state[weight_key].detach().abs().flatten(1).sum(1).double()
        total = total + norms / norms.mean().clamp(min=torch.finfo(torch.float64).tiny)
    return total


def pruned_channels(model: ICNet, keep: float, original: dict[str, int] | None = None) -> dict[str, int]:
    """Channel counts keeping the fraction keep of original's (default: the model's own) in every group."""
    _check_keep(keep)
    original = original or model.channels
    return {group: max(1, int(round(count * keep))) for group, count in original.items()}


def _check_keep(keep: float) -> None:
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")


def prune(model: ICNet, channels: dict[str, int]) -> ICNet:
    """A new ICNet with channels[g] channels in every group g: the filters with the largest L1 norm are
    kept, with their weights, BatchNorm parameters and statistics, and the matching input channels of
    every conv that reads them."""
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    groups = channel_groups(model)
    kept = {}  # ranked on the unpruned weights, before any group narrows a conv's inputs
    for name, group in groups.items():
        count, current = channels[name], model.channels[name]
        if not 1 <= count <= current:
            raise ValueError(f"channels[{name!r}] must be between 1 and the model's {current}, got {count}")
        kept[name] = filter_importance(state, group).topk(count).indices.sort().values
    for name, group in groups.items():
        keep = kept[name]
        producer_keys = [weight_key for weight_key, _ in group.producers]
        producer_keys += [f"{bn}.{entry}" for _, bn in group.producers if bn is not None
                          for entry in ("weight", "bias", "running_mean", "running_var")]
        for key in producer_keys:
            state[key] = state[key].index_select(0, keep.to(state[key].device))
        for key in group.consumers:
            state[key] = state[key].index_select(1, keep.to(state[key].device))
    pruned = ICNet(num_classes=model.num_classes, width=model.width, mode=model.mode, fused=model.fused,
                   channels=dict(channels))
    pruned.load_state_dict(state)  # strict: any channel left inconsistent fails here, by name
    return pruned.to(next(model.parameters()).device).train(model.training)


def _check_out(out: Path, keeps) -> None:
    """A pruning run refuses a folder holding an earlier one's results: each step fine-tunes afresh into
    its subfolder, and a step's earlier files would mix with the new ones."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out} is a file, not a folder")
    earlier = [str(Path(f"keep{keep:g}") / name) for keep in keeps for name in RUN_FILES
               if (out / f"keep{keep:g}" / name).exists()]
    earlier += ["pruning.json"] if (out / "pruning.json").exists() else []
    if earlier:
        raise ValueError(f"out {out} holds an earlier pruning run ({', '.join(earlier)}): choose another folder")


def conv_parameters(model: nn.Module) -> int:
    """Parameters of the convolution weights (the tensors pruning narrows)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))


def progressive_pruning(weights, keeps, finetune) -> list[dict]:
    """The paper's schedule: for each keep in keeps (fractions of the original width, e.g. 0.75, 0.5),
    prune the latest model, then fine-tune it with the training configuration finetune (a TrainConfig;
    its out folder gets one subfolder per step). Returns one summary row per step, also written to
    <out>/pruning.json, with parameter counts and validation mIoU before and after fine-tuning."""
    for keep in keeps:  # all checked before any work
        _check_keep(keep)
    _check_out(Path(finetune.out), keeps)
    model, payload = load_checkpoint(weights, mode="sub124")
    original, class_names = dict(model.channels), payload["class_names"]
    finetune = replace(finetune, num_classes=model.num_classes)
    val_set = make_dataset(finetune.dataset, "val", finetune.root, finetune.binary, finetune.synthetic_val,
                           finetune.synthetic_size, finetune.num_classes)
    device = parse_device(finetune.device) if finetune.device else best_device()

    def miou(candidate):
        return evaluate(candidate.to(device).eval(), val_set, device=device, num_classes=candidate.num_classes,
                        progress=False).mean_iou()

    rows = [{"keep": 1.0, "parameters": _parameters(model), "conv_parameters": conv_parameters(model),
             "val_miou_pruned": None, "val_miou_finetuned": miou(model), "checkpoint": str(weights)}]
    out = Path(finetune.out)
    current = weights
    for keep in keeps:
        model, _ = load_checkpoint(current, mode="sub124")
        pruned = prune(model, pruned_channels(model, keep, original))
        step_dir = out / f"keep{keep:g}"
        save_checkpoint(step_dir / "pruned.pt", pruned, class_names)
        before = miou(pruned)
        rows_step = train(replace(finetune, init=str(step_dir / "pruned.pt"), out=str(step_dir), resume=None))
        current = step_dir / "last.pt"
        rows.append({"keep": keep, "parameters": _parameters(pruned), "conv_parameters": conv_parameters(pruned),
                     "val_miou_pruned": before, "val_miou_finetuned": rows_step[-1]["val_miou"],
                     "checkpoint": str(current)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "pruning.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
