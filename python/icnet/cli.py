"""The icnet command line: segment, train, evaluate, prune, export, convert."""

import argparse
import math
import sys
from pathlib import Path

from icnet.model import MODES

DATASETS = ("synthetic", "cityscapes", "folder")


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, e.g. 225x449, got {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return height, width


def _number(convert, accept, expected):
    """An argparse type: text converted by convert, which accept must hold for."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: 0 < v < math.inf, "a positive number")
_non_negative_float = _number(float, lambda v: 0 <= v < math.inf, "a number >= 0")
_fraction = _number(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")


def _out_folder(text: str) -> str:
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return text


def _segment_out(text: str) -> str:
    """segment's --out: a folder, or the video file to write for one video."""
    from icnet.video import is_video

    return text if is_video(text) and not Path(text).is_dir() else _out_folder(text)


def _existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file" if Path(text).exists() else f"no such file: {text}")
    return text


def _new_file(text: str) -> str:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder of {text} does not exist")
    return text


def _device(text: str) -> str:
    from icnet.api import parse_device  # only when --device is given: it loads torch

    try:
        parse_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, where it has one to show; examples keep their lines."""

    def _get_help_string(self, action):
        default = action.default
        if not action.option_strings or default is None or default is argparse.SUPPRESS or isinstance(default, bool):
            return action.help
        shown = " ".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)
        return f"{action.help or ''} (default: {shown.replace('%', '%%')})".lstrip()


class _Parser(argparse.ArgumentParser):
    """The root and every subcommand: help with defaults, and a usage error as one line on stderr."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"icnet: {message} (see {self.prog} --help)\n")


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[1].startswith("Original Traceback"):
        # raised in a data loader process: the original message ends the traceback, after its type's name
        return lines[-1].split(": ", 1)[-1]
    return " ".join(line.strip() for line in lines)


def _check_dataset_arguments(args) -> None:
    if not args.binary and args.dataset != "folder":
        raise ValueError("--multiclass-masks applies to --dataset folder only")
    if getattr(args, "num_classes", None) is not None and args.binary:
        raise ValueError("--num-classes applies to --dataset folder with --multiclass-masks only "
                         "(the other datasets define their classes)")


def _segment(args):
    from icnet.segment import segment  # imported here so that --help does not load torch
    from icnet.video import is_video, segment_videos

    videos = [path for path in args.inputs if is_video(path)]
    if videos and len(videos) < len(args.inputs):
        raise ValueError("segment either videos or images in one run, not both")
    if videos:
        segment_videos(videos, args.out, args.weights, args.mode, args.device, args.dtype, args.batch_size,
                       args.channels_last, args.video_output, args.plan, args.plan_choices)
        return
    segment(args.inputs, args.out, args.weights, args.mode, args.device, args.dtype, args.batch_size,
            args.channels_last, args.plan, args.plan_choices)


def _convert(args):
    from icnet.convert import convert  # imported here so that --help does not load torch

    print(convert(args.caffemodel, args.out, args.ignore_extra_layers).summary(args.verbose))
    print(f"wrote {args.out}")


def _export(args):
    import json

    from icnet.export import export_onnx  # imported here so that --help does not load torch
    from icnet.segment import build_segmenter

    segmenter = build_segmenter(args.weights, args.mode, "cpu", None, False)
    metadata = {"icnet.class_names": json.dumps(list(segmenter.class_names)),
                "icnet.preprocessing": json.dumps(segmenter.preprocessing.to_dict())}
    opset = {} if args.opset is None else {"opset": args.opset}
    try:
        print(export_onnx(segmenter.model, args.onnx, args.size, args.batch, args.dynamic_batch, args.dynamic_size,
                          metadata=metadata, **opset))
    except ModuleNotFoundError as error:
        sys.exit(f"icnet: {error}")


def _add_dataset_arguments(parser):
    parser.add_argument("--dataset", choices=DATASETS, default="synthetic",
                        help="synthetic street scenes, a Cityscapes folder, or ROOT/<split>/{images,masks}")
    parser.add_argument("--root", help="the dataset's folder (cityscapes, folder)")
    parser.add_argument("--multiclass-masks", dest="binary", action="store_false",
                        help="folder dataset: mask values are class indices, 255 ignored (without it: binary, "
                             "non-zero = foreground)")
    parser.add_argument("--synthetic-size", type=_size, default="256x512", metavar="HxW", help="synthetic scene size")
    parser.add_argument("--synthetic-train", type=_positive_int, default=400, help="synthetic training scenes")
    parser.add_argument("--synthetic-val", type=_positive_int, default=100, help="synthetic validation scenes")
    parser.add_argument("--device", type=_device, help="cuda, cuda:1, cpu (default: a GPU if there is one)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _add_training_arguments(parser):
    _add_dataset_arguments(parser)
    parser.add_argument("--out", required=True, type=_out_folder,
                        help="folder for checkpoints (last.pt, best.pt) and log.csv")
    parser.add_argument("--epochs", type=_positive_int, default=30, help="passes over the training set")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="global batch over all processes")
    parser.add_argument("--crop", type=_size, default="225x449", metavar="HxW", help="training crop")
    parser.add_argument("--scale-range", type=_positive_float, nargs=2, default=(0.75, 1.5), metavar=("MIN", "MAX"),
                        help="random scaling of each training sample")
    parser.add_argument("--lr", type=_positive_float, default=0.01, help="initial learning rate (poly schedule)")
    parser.add_argument("--momentum", type=_non_negative_float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight-decay", type=_non_negative_float, default=1e-4, help="on conv weights")
    parser.add_argument("--loss", choices=("cross_entropy", "bce_dice", "focal_dice"), default="cross_entropy",
                        help="per-branch loss")
    parser.add_argument("--branch-weights", type=_non_negative_float, nargs=3, default=(0.4, 0.4, 1.0),
                        metavar=("SUB4", "SUB24", "SUB124"), help="cascade label guidance weights")
    parser.add_argument("--amp", action="store_true", help="mixed precision (float16 on GPUs, bfloat16 on CPUs)")
    parser.add_argument("--workers", type=_non_negative_int, default=2, help="data loader processes")
    parser.add_argument("--seed", type=int, default=0, help="of the initial weights and the augmentation")
    parser.add_argument("--max-iterations", type=_positive_int, help="stop after this many iterations")


def _training_config(args, **overrides):
    from icnet.train import TrainConfig

    fields = ("out", "dataset", "root", "binary", "synthetic_size", "synthetic_train", "synthetic_val", "epochs",
              "batch_size", "crop", "scale_range", "lr", "momentum", "weight_decay", "loss", "branch_weights",
              "amp", "device", "workers", "seed", "max_iterations", "progress")
    values = {name: getattr(args, name) for name in fields}
    values["scale_range"], values["branch_weights"] = tuple(args.scale_range), tuple(args.branch_weights)
    return TrainConfig(**values, **overrides)


def _train(args):
    from icnet.train import train

    _check_dataset_arguments(args)
    train(_training_config(args, width=args.width, init=args.init, resume=args.resume, num_classes=args.num_classes))


def _evaluate(args):
    import json

    from icnet.checkpoint import load_checkpoint, preprocessing_of
    from icnet.data.datasets import make_dataset
    from icnet.evaluate import evaluate, format_report, report_dict
    from icnet.preprocessing import Preprocessed
    from icnet.api import best_device, parse_device

    _check_dataset_arguments(args)
    device = best_device() if args.device is None else parse_device(args.device)
    model, payload = load_checkpoint(args.weights, mode=args.mode)
    synthetic_count = args.synthetic_train if args.split == "train" else args.synthetic_val
    dataset = make_dataset(args.dataset, args.split, args.root, args.binary, synthetic_count, args.synthetic_size,
                           model.num_classes)
    dataset = Preprocessed(dataset, preprocessing_of(payload, args.weights))  # what the checkpoint's model expects
    model = model.to(device).eval()
    matrix = evaluate(model, dataset, device=device, flip=args.flip, scales=args.scales,
                      num_classes=model.num_classes, progress=args.progress)
    names = payload["class_names"] or dataset.class_names
    if args.json:
        Path(args.json).write_text(json.dumps(report_dict(matrix, names), indent=2) + "\n")
    print(format_report(matrix, names))


def _prune(args):
    from icnet.evaluate import percent
    from icnet.prune import progressive_pruning

    _check_dataset_arguments(args)
    rows = progressive_pruning(args.weights, args.keep, _training_config(args))
    for row in rows:
        size = f"{row['parameters']} parameters ({row['conv_parameters']} in convs)"
        if row["val_miou_pruned"] is None:
            print(f"keep {row['keep']:g} (the trained model): {size}, val mIoU {percent(row['val_miou_finetuned'])}")
        else:
            print(f"keep {row['keep']:g}: {size}, val mIoU {percent(row['val_miou_pruned'])} after pruning, "
                  f"{percent(row['val_miou_finetuned'])} after fine-tuning")


EXAMPLES = {
    "segment": """examples:
  icnet segment street.png more_images/ --weights icnet.pt --out segmented/
  icnet segment frames/ --weights icnet.pt --out segmented/ --device cuda --dtype float16 --batch-size 4

Every image is read before any output is written: an unreadable one stops the run, naming it.""",
    "train": """examples:
  icnet train --out runs/synthetic --epochs 20 --batch-size 8 --workers 1
  icnet train --out runs/synthetic --resume runs/synthetic/last.pt --epochs 30
  icnet train --out runs/cars --dataset folder --root data/cars --loss bce_dice
  icnet train --out runs/parts --dataset folder --root data/parts --multiclass-masks --num-classes 5
  torchrun --nproc-per-node 2 -m icnet.cli train --out runs/two --batch-size 16

The defaults train for 30 epochs over 400 synthetic scenes. Each epoch prints its loss and validation
mIoU (in percent) on stdout; OUT/log.csv holds the same scores as fractions. An OUT that holds an
earlier run (log.csv, last.pt, best.pt) is refused unless --resume continues it; the resumed log keeps
the epochs up to the checkpoint's and adds the new ones.""",
    "evaluate": """examples:
  icnet evaluate --weights runs/synthetic/best.pt
  icnet evaluate --weights runs/synthetic/best.pt --scales 1.0 1.5 2.0 --flip --json scores.json
  icnet evaluate --weights runs/city/best.pt --dataset cityscapes --root data/cityscapes

Scores print in percent; the --json file holds them as fractions.""",
    "prune": """examples:
  icnet prune --weights runs/synthetic/best.pt --out runs/pruned --keep 0.75 0.5 --epochs 4""",
    "export": """examples:
  icnet export --onnx icnet.onnx --weights icnet.pt
  icnet export --onnx icnet-any-size.onnx --weights icnet.pt --dynamic-batch --dynamic-size

The graph takes the image preprocessed as for the PyTorch model (its metadata_props icnet.preprocessing
says how: channel order, means, stds) and returns the logits at the image's size.""",
}


def parser() -> argparse.ArgumentParser:
    root = _Parser(prog="icnet", description="ICNet real-time semantic segmentation",
                   epilog="examples:\n" + "\n".join(text.splitlines()[1] for text in EXAMPLES.values())
                   + "\n\n'icnet COMMAND --help' lists a command's options with their defaults.")
    commands = root.add_subparsers(dest="command", required=True)

    seg = commands.add_parser("segment", help="segment images: class maps (trainIds) and colour overlays",
                              epilog=EXAMPLES["segment"])
    seg.add_argument("inputs", nargs="+", help="image files or folders, or video files (.mp4, .mov, .mkv, ...)")
    seg.add_argument("--weights", help="checkpoint (without it the model is untrained)")
    seg.add_argument("--out", required=True, type=_segment_out,
                     help="output folder; for one video, also the video file to write")
    seg.add_argument("--mode", choices=MODES, default="sub124", help="the branch whose output is used")
    seg.add_argument("--device", type=_device, help="cuda, cuda:1, cpu (default: a GPU if there is one)")
    seg.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                     help="the model's precision")
    seg.add_argument("--batch-size", type=_positive_int, default=1, help="images of one size run together")
    seg.add_argument("--channels-last", action="store_true", help="run the model in channels_last layout")
    seg.add_argument("--video-output", choices=("overlay", "color"), default="overlay",
                     help="videos: the overlay with its legend, or the colour mask alone")
    seg.add_argument("--no-plan", dest="plan", action="store_const", const=False,
                     help="on a GPU, run the model itself instead of an inference plan per batch shape "
                          "(a CUDA graph; plans are for GPUs only)")
    seg.add_argument("--plan-choices", type=_existing_file, metavar="RESULTS.json",
                     help="the plans' tuned per-layer backends, from the end-to-end benchmark's results file "
                          "(its plan-tuned row for this GPU, mode, dtype, layout and batch shape; untuned "
                          "without one)")
    seg.set_defaults(run=_segment)

    fit = commands.add_parser("train", help="train with cascade label guidance (torchrun for several processes)",
                              epilog=EXAMPLES["train"])
    _add_training_arguments(fit)
    fit.add_argument("--num-classes", type=_positive_int,
                     help="with --multiclass-masks: the number of classes (mask values 0 to N-1)")
    fit.add_argument("--width", type=_positive_float, default=0.5,
                     help="channel multiplier of PSPNet50 (0.5: released)")
    fit.add_argument("--init", help="start from this checkpoint's weights")
    fit.add_argument("--resume", help="continue the run saved in this checkpoint (e.g. OUT/last.pt); without "
                                      "it an OUT holding an earlier run is refused")
    fit.set_defaults(run=_train)

    score = commands.add_parser("evaluate", help="mIoU, per-class IoU and pixel accuracy over a dataset",
                                epilog=EXAMPLES["evaluate"])
    _add_dataset_arguments(score)
    score.add_argument("--weights", required=True, help="the checkpoint to score; its classes are the dataset's")
    score.add_argument("--split", default="val", help="the dataset's split")
    score.add_argument("--mode", choices=MODES, default="sub124", help="the branch whose output is scored")
    score.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    score.add_argument("--scales", type=_positive_float, nargs="+", default=(1.0,),
                       help="image scales to average over, e.g. 0.75 1.0 1.25")
    score.add_argument("--json", type=_new_file, help="also write the scores to this JSON file")
    score.set_defaults(run=_evaluate)

    shrink = commands.add_parser("prune", help="progressive L1 filter pruning with fine-tuning",
                                 epilog=EXAMPLES["prune"])
    _add_training_arguments(shrink)
    shrink.add_argument("--weights", required=True, help="the trained model to prune")
    shrink.add_argument("--keep", type=_fraction, nargs="+", default=(0.75, 0.5),
                        help="fractions of the original width, pruned and fine-tuned in turn")
    shrink.set_defaults(run=_prune)

    onnx = commands.add_parser("export", help="the network as standard ONNX (ONNX Runtime, OpenVINO, TensorRT)",
                               epilog=EXAMPLES["export"])
    onnx.add_argument("--onnx", required=True, type=_new_file, metavar="OUT.onnx", help="the ONNX file to write")
    onnx.add_argument("--weights", help="checkpoint (without it the model is untrained)")
    onnx.add_argument("--mode", choices=MODES, default="sub124", help="the branch whose output is used")
    onnx.add_argument("--size", type=_size, default="1025x2049", metavar="HxW",
                      help="the input size the graph is traced at (its fixed size without --dynamic-size)")
    onnx.add_argument("--batch", type=_positive_int, default=1,
                      help="the input batch the graph is traced at (its fixed batch without --dynamic-batch)")
    onnx.add_argument("--dynamic-batch", action="store_true", help="any batch")
    onnx.add_argument("--dynamic-size", action="store_true", help="any height and width from 161")
    onnx.add_argument("--opset", type=_positive_int, help="ONNX opset (default: icnet.export.OPSET, 18)")
    onnx.set_defaults(run=_export)

    caffe = commands.add_parser("convert", help="the authors' released Caffe weights (.caffemodel) as a checkpoint")
    caffe.add_argument("caffemodel", help="icnet_cityscapes_*.caffemodel, bnnomerge or merged")
    caffe.add_argument("--out", required=True, help="the checkpoint to write, e.g. icnet.pt")
    caffe.add_argument("--ignore-extra-layers", action="store_true",
                       help="leave out layers with weights that the released network does not have")
    caffe.add_argument("--verbose", action="store_true", help="list every layer and the parameters it became")
    caffe.set_defaults(run=_convert)
    return root


def main(argv=None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exit:  # --help, or a usage error, already reported
        return exit.code or 0
    try:
        args.run(args)
    except (OSError, ValueError) as error:  # the user's files, arguments or machine: one line, no traceback
        print(f"icnet: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
