"""The icnet command line."""

import argparse
import sys

from icnet.model import MODES


def _segment(args):
    from icnet.segment import segment  # imported here so that --help does not load torch

    segment(args.inputs, args.out, args.weights, args.mode, args.device, args.dtype, args.batch_size,
            args.channels_last)


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
