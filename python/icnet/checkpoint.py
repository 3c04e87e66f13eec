"""Checkpoints: the model's weights with what it takes to rebuild it (classes, width, mode, the width of
every channel group, which pruning changes) and, optionally, training state."""

import os
import pickle
from pathlib import Path

import torch

from icnet.model import MODES, ICNet
from icnet.preprocessing import DEFAULT_PREPROCESSING, Preprocessing

FORMAT = "icnet-checkpoint/1"
CONFIG_KEYS = ("num_classes", "width", "mode", "channels")  # ICNet's arguments; channels is optional


class CheckpointError(ValueError):
    """A file that is not an ICNet checkpoint, or one that does not fit the model it is loaded into."""


def save_checkpoint(path, model: ICNet, class_names=None, training_state: dict | None = None,
                    preprocessing: Preprocessing | None = None) -> None:
    payload = {
        "format": FORMAT,
        "config": model_config(model),
        "class_names": list(class_names) if class_names is not None else None,
        "preprocessing": (preprocessing or DEFAULT_PREPROCESSING).to_dict(),
        "state_dict": model.state_dict(),
        "training_state": training_state,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written beside and renamed over path: an interrupted save leaves the previous checkpoint intact
    partial = path.with_name(f".{path.name}.partial")
    try:
        torch.save(payload, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def model_config(model: ICNet) -> dict:
    """The constructor arguments that rebuild model's structure."""
    return {"num_classes": model.num_classes, "width": model.width, "mode": model.mode,
            "channels": dict(model.channels)}


def read_checkpoint(path) -> dict:
    """A checkpoint's contents, checked: a model config, a state_dict of tensors and, if any, one class
    name per class. Every problem is a CheckpointError of one line that names the file."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path} is a folder, not a file") from None
    except Exception as error:  # torch.load raises many types for a file that is not a checkpoint
        # weights_only loading refuses pickled classes, such as a whole model saved by torch.save(model)
        what = ("it holds pickled Python objects (such as a whole model), not only tensors and plain values"
                if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in str(error)
                else "not a file that torch.save wrote, or a damaged one")
        raise CheckpointError(f"{path} is not a readable ICNet checkpoint: {what}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ICNet checkpoint (expected format {FORMAT!r})")
    _check_contents(payload, path)
    return payload


def _check_contents(payload: dict, path) -> None:
    config = payload.get("config")
    if not isinstance(config, dict):
        found = "missing" if config is None else f"a {type(config).__name__}, not a dict"
        raise CheckpointError(f"{path} has no model config (its 'config' entry is {found})")
    missing, unknown = set(CONFIG_KEYS[:3]) - config.keys(), config.keys() - set(CONFIG_KEYS)
    if missing:
        raise CheckpointError(f"{path} has a model config without {', '.join(sorted(missing))}")
    if unknown:
        raise CheckpointError(f"{path} has a model config with unknown entries {', '.join(sorted(map(str, unknown)))}")
    if config["mode"] not in MODES:
        raise CheckpointError(f"{path} has a model config with mode {config['mode']!r}, not one of {MODES}")
    state = payload.get("state_dict")
    if not (isinstance(state, dict)
            and all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items())):
        raise CheckpointError(f"{path} holds no state_dict of tensors")
    names = payload.get("class_names")
    if names is not None:
        if not (isinstance(names, (list, tuple)) and all(isinstance(name, str) for name in names)):
            raise CheckpointError(f"{path} has class_names that are not a list of strings")
        if len(names) != config["num_classes"]:
            raise CheckpointError(f"{path} names {len(names)} classes for a model of {config['num_classes']} classes")


def preprocessing_of(payload: dict, path="checkpoint") -> Preprocessing:
    """The input preprocessing a checkpoint's model expects; checkpoints that predate the record used the
    default (the released model's)."""
    record = payload.get("preprocessing")
    if record is None:
        return DEFAULT_PREPROCESSING
    try:
        return Preprocessing.from_dict(record)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path} records an invalid preprocessing: {error}") from None


def load_checkpoint(path, fused: bool = True, mode: str | None = None) -> tuple[ICNet, dict]:
    """Builds the model the checkpoint describes (optionally in another mode) and loads its weights."""
    payload = read_checkpoint(path)
    config = dict(payload["config"])
    config["mode"] = mode or config["mode"]
    try:
        model = ICNet(fused=fused, **config)
    except ValueError as error:
        raise CheckpointError(f"{path} describes no valid ICNet: {error}") from None
    load_weights(model, payload, path)
    return model, payload


def load_weights(model: ICNet, payload: dict, path="checkpoint") -> None:
    """Loads a checkpoint's weights into an existing model, with a clear error when they do not fit."""
    config = payload["config"]
    for key in ("num_classes", "width", "channels"):
        if key in config and config[key] != getattr(model, key):
            raise CheckpointError(f"{path} holds a model with other {key} than this model's "
                                  f"({_difference(config[key], getattr(model, key))})")
    expected = model.state_dict()
    for key, value in payload["state_dict"].items():
        if key in expected and value.shape != expected[key].shape:
            raise CheckpointError(f"{path} does not fit this model (another width or class count): {key} has shape "
                                  f"{tuple(value.shape)} in the checkpoint, {tuple(expected[key].shape)} in the model")
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _difference(saved, current) -> str:
    if isinstance(saved, dict) and isinstance(current, dict):
        changed = {k: (saved.get(k), current.get(k)) for k in saved.keys() | current.keys() if saved.get(k) != current.get(k)}
        return ", ".join(f"{k}: checkpoint {a}, model {b}" for k, (a, b) in sorted(changed.items())[:5])
    return f"checkpoint {saved!r}, model {current!r}"
