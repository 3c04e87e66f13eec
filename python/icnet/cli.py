"""The icnet command line: segment, train, evaluate, prune, export."""

import argparse
import sys

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


def _segment(args):
    from icnet.segment import segment  # imported here so that --help does not load torch

    segment(args.inputs, args.out, args.weights, args.mode, args.device, args.dtype, args.batch_size,
            args.channels_last)


def _export(args):
    from icnet.export import export_onnx  # imported here so that --help does not load torch
    from icnet.segment import build_model

    model, _ = build_model(args.weights, args.mode, "cpu", None, False)
    opset = {} if args.opset is None else {"opset": args.opset}
    try:
        print(export_onnx(model, args.onnx, args.size, args.batch, args.dynamic_batch, args.dynamic_size, **opset))
    except ModuleNotFoundError as error:
        sys.exit(f"icnet: {error}")


def _add_dataset_arguments(parser):
    parser.add_argument("--dataset", choices=DATASETS, default="synthetic",
                        help="synthetic street scenes, a Cityscapes folder, or ROOT/<split>/{images,masks}")
    parser.add_argument("--root", help="the dataset's folder (cityscapes, folder)")
    parser.add_argument("--multiclass-masks", dest="binary", action="store_false",
                        help="folder dataset: mask values are class indices (default: binary, non-zero = foreground)")
    parser.add_argument("--synthetic-size", type=_size, default=(256, 512), help="synthetic scene size HxW")
    parser.add_argument("--synthetic-train", type=int, default=400, help="synthetic training scenes")
    parser.add_argument("--synthetic-val", type=int, default=100, help="synthetic validation scenes")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: a GPU if there is one)")


def _add_training_arguments(parser):
    _add_dataset_arguments(parser)
    parser.add_argument("--out", required=True, help="folder for checkpoints (last.pt, best.pt) and log.csv")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch over all processes")
    parser.add_argument("--crop", type=_size, default=(225, 449), help="training crop HxW")
    parser.add_argument("--scale-range", type=float, nargs=2, default=(0.75, 1.5), metavar=("MIN", "MAX"))
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--loss", choices=("cross_entropy", "bce_dice", "focal_dice"), default="cross_entropy")
    parser.add_argument("--branch-weights", type=float, nargs=3, default=(0.4, 0.4, 1.0),
                        metavar=("SUB4", "SUB24", "SUB124"), help="cascade label guidance weights")
    parser.add_argument("--amp", action="store_true", help="mixed precision (float16 on GPUs, bfloat16 on CPUs)")
    parser.add_argument("--workers", type=int, default=2, help="data loader processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-iterations", type=int, help="stop after this many iterations")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


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

    train(_training_config(args, width=args.width, init=args.init, resume=args.resume))


def _evaluate(args):
    import json

    import torch

    from icnet.checkpoint import load_checkpoint
    from icnet.data.datasets import make_dataset
    from icnet.evaluate import evaluate, format_report, report_dict
    from icnet.segment import best_device

    device = best_device() if args.device is None else torch.device(args.device)
    model, payload = load_checkpoint(args.weights, mode=args.mode)
    synthetic_count = args.synthetic_train if args.split == "train" else args.synthetic_val
    dataset = make_dataset(args.dataset, args.split, args.root, args.binary, synthetic_count, args.synthetic_size)
    model = model.to(device).eval()
    matrix = evaluate(model, dataset, device=device, flip=args.flip, scales=args.scales,
                      num_classes=model.num_classes)
    names = payload["class_names"] or dataset.class_names
    print(format_report(matrix, names))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report_dict(matrix, names), file, indent=2)


def _prune(args):
    from icnet.prune import progressive_pruning

    rows = progressive_pruning(args.weights, args.keep, _training_config(args))
    for row in rows:
        before = "-" if row["val_miou_pruned"] is None else f"{row['val_miou_pruned']:.4f}"
        print(f"keep {row['keep']:g}: {row['parameters']} parameters ({row['conv_parameters']} in convs), "
              f"val mIoU pruned {before}, fine-tuned {row['val_miou_finetuned']:.4f}")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="icnet", description="ICNet real-time semantic segmentation")
    commands = root.add_subparsers(dest="command", required=True)

    seg = commands.add_parser("segment", help="segment images: class maps (trainIds) and colour overlays")
    seg.add_argument("inputs", nargs="+", help="image files or folders")
    seg.add_argument("--weights", help="checkpoint (without it the model is untrained)")
    seg.add_argument("--out", required=True, help="output folder")
    seg.add_argument("--mode", choices=MODES, default="sub124")
    seg.add_argument("--device", help="cuda, cuda:1, cpu (default: a GPU if there is one)")
    seg.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    seg.add_argument("--batch-size", type=int, default=1)
    seg.add_argument("--channels-last", action="store_true")
    seg.set_defaults(run=_segment)

    fit = commands.add_parser("train", help="train with cascade label guidance (torchrun for several processes)")
    _add_training_arguments(fit)
    fit.add_argument("--width", type=float, default=0.5, help="channel multiplier of PSPNet50 (0.5: released)")
    fit.add_argument("--init", help="start from this checkpoint's weights")
    fit.add_argument("--resume", help="continue the run saved in this checkpoint (e.g. OUT/last.pt)")
    fit.set_defaults(run=_train)

    score = commands.add_parser("evaluate", help="mIoU, per-class IoU and pixel accuracy over a dataset")
    _add_dataset_arguments(score)
    score.add_argument("--weights", required=True)
    score.add_argument("--split", default="val")
    score.add_argument("--mode", choices=MODES, default="sub124")
    score.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    score.add_argument("--scales", type=float, nargs="+", default=(1.0,), help="e.g. 0.75 1.0 1.25")
    score.add_argument("--json", help="also write the scores to this JSON file")
    score.set_defaults(run=_evaluate)

    shrink = commands.add_parser("prune", help="progressive L1 filter pruning with fine-tuning")
    _add_training_arguments(shrink)
    shrink.add_argument("--weights", required=True, help="the trained model to prune")
    shrink.add_argument("--keep", type=float, nargs="+", default=(0.75, 0.5),
                        help="fractions of the original width, pruned and fine-tuned in turn")
    shrink.set_defaults(run=_prune)

    onnx = commands.add_parser("export", help="the network as standard ONNX (ONNX Runtime, OpenVINO, TensorRT)")
    onnx.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    onnx.add_argument("--weights", help="checkpoint (without it the model is untrained)")
    onnx.add_argument("--mode", choices=MODES, default="sub124")
    onnx.add_argument("--size", type=_size, default=(1025, 2049), help="input size HxW the graph is traced at")
    onnx.add_argument("--batch", type=int, default=1, help="input batch the graph is traced at")
    onnx.add_argument("--dynamic-batch", action="store_true", help="any batch")
    onnx.add_argument("--dynamic-size", action="store_true", help="any height and width from 161")
    onnx.add_argument("--opset", type=int, help="ONNX opset (default: icnet.export.OPSET)")
    onnx.set_defaults(run=_export)
    return root


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"icnet: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
