"""Checkpoints: the model's weights with what it takes to rebuild it (classes, width, mode, the width of
every channel group, which pruning changes) and, optionally, training state."""

from pathlib import Path

import torch

from icnet.model import ICNet

FORMAT = "icnet-checkpoint/1"


class CheckpointError(ValueError):
    """A file that is not an ICNet checkpoint, or one that does not fit the model it is loaded into."""


def save_checkpoint(path, model: ICNet, class_names=None, training_state: dict | None = None) -> None:
    payload = {
        "format": FORMAT,
        "config": model_config(model),
        "class_names": list(class_names) if class_names is not None else None,
        "state_dict": model.state_dict(),
        "training_state": training_state,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)


def model_config(model: ICNet) -> dict:
    """The constructor arguments that rebuild model's structure."""
    return {"num_classes": model.num_classes, "width": model.width, "mode": model.mode,
            "channels": dict(model.channels)}


def read_checkpoint(path) -> dict:
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as error:  # torch.load raises many types for a file that is not a checkpoint
        raise CheckpointError(f"{path} is not a readable ICNet checkpoint: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ICNet checkpoint (expected format {FORMAT!r})")
    return payload


def load_checkpoint(path, fused: bool = True, mode: str | None = None) -> tuple[ICNet, dict]:
    """Builds the model the checkpoint describes (optionally in another mode) and loads its weights."""
    payload = read_checkpoint(path)
    config = dict(payload["config"])
    config["mode"] = mode or config["mode"]
    model = ICNet(fused=fused, **config)
    load_weights(model, payload, path)
    return model, payload


def load_weights(model: ICNet, payload: dict, path="checkpoint") -> None:
    """Loads a checkpoint's weights into an existing model, with a clear error when they do not fit."""
    config = payload["config"]
    for key in ("num_classes", "width", "channels"):
        if key in config and config[key] != getattr(model, key):
            raise CheckpointError(f"{path} holds a model with other {key} than this model's "
                                  f"({_difference(config[key], getattr(model, key))})")
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _difference(saved, current) -> str:
    if isinstance(saved, dict) and isinstance(current, dict):
        changed = {k: (saved.get(k), current.get(k)) for k in saved.keys() | current.keys() if saved.get(k) != current.get(k)}
        return ", ".join(f"{k}: checkpoint {a}, model {b}" for k, (a, b) in sorted(changed.items())[:5])
    return f"checkpoint {saved!r}, model {current!r}"
