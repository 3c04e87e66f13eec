"""The facts about the released network live in the project (docs/NETWORK.md), which states them for its
users, and they hold for the model; nothing in the project points to notes its users do not have."""

import re
from pathlib import Path

import torch
from torch import nn

from icnet import ICNet
from icnet.model import RELEASED_PPM_KERNELS, RELEASED_PPM_STRIDES

ROOT = Path(__file__).resolve().parent.parent
NETWORK = (ROOT / "docs" / "NETWORK.md").read_text()
# spelled in pieces, so that this file does not match itself
UNSHIPPED_NOTES = ("ICNET" + ".md", "shared" + " notes", "/work/" + "shared", "DESIGN" + ".md", "STYLE" + ".md")
PRODUCT = ("README.md", "docs", "python", "icnet_kernels", "benchmarks", "tests", "scripts", "csrc")
TEXT_SUFFIXES = {".py", ".md", ".cpp", ".h", ".cu", ".cuh", ".sh", ".txt", ".toml", ".cfg"}


def product_files():
    for entry in PRODUCT:
        path = ROOT / entry
        yield from ([path] if path.is_file() else (p for p in sorted(path.rglob("*"))
                                                    if p.is_file() and p.suffix in TEXT_SUFFIXES))


def test_no_project_file_points_to_notes_its_users_do_not_have():
    cited = [f"{path.relative_to(ROOT)}: {note}" for path in product_files()
             for note in UNSHIPPED_NOTES if note in path.read_text(errors="replace")]
    assert not cited, cited


def test_the_documented_parameter_counts_are_the_model_s():
    total, convs = (int(n.replace(",", "")) for n in re.search(
        r"([\d,]+) parameters, about 6\.7 million: ([\d,]+) in convolution\s+weights", NETWORK).groups())
    model = ICNet(num_classes=19, width=0.5)
    assert total == sum(p.numel() for p in model.parameters())
    assert convs == sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    heads = int(re.search(r"training-only classifiers\s+account for ([\d,]+)", NETWORK).group(1).replace(",", ""))
    training_only = ("cls_sub4.", "cls_sub24.")
    assert heads == sum(p.numel() for name, p in model.named_parameters() if name.startswith(training_only))


def test_the_documented_pooling_geometry_is_the_model_s():
    rows = re.findall(r"^\| (\d) \| (\d+)x(\d+) \| (\d+)x(\d+) \|$", NETWORK, re.MULTILINE)
    assert [int(r[0]) for r in rows] == [1, 2, 3, 6]
    assert tuple((int(r[1]), int(r[2])) for r in rows) == RELEASED_PPM_KERNELS
    assert tuple((int(r[3]), int(r[4])) for r in rows) == RELEASED_PPM_STRIDES


def test_the_documented_shapes_at_1025x2049_are_the_model_s():
    documented = {name: (1, int(c), int(h), int(w)) for name, c, h, w in re.findall(
        r"^\| `(\w+)` \| 1/\d+ \| (\d+) x (\d+) x (\d+) \|$", NETWORK, re.MULTILINE)}
    assert set(documented) == {"conv3_1", "conv5_4", "sub1", "cff_sub24", "cff_sub12"}
    model = ICNet(fused=True).to("meta").eval()
    shapes = {}
    for name in documented:
        getattr(model, name).register_forward_hook(lambda module, args, out, name=name: shapes.__setitem__(
            name, tuple((out[0] if isinstance(out, tuple) else out).shape)))
    assert tuple(model(torch.empty(1, 3, 1025, 2049, device="meta")).shape) == (1, 19, 1025, 2049)
    assert shapes == documented
    training = re.search(r"outputs for cascade label guidance are (.+?)\.\n", NETWORK, re.DOTALL).group(1)
    expected = [tuple(map(int, dims)) for dims in re.findall(r"(\d+) x (\d+) x (\d+)", training)]
    outputs = model.train()(torch.empty(1, 3, 1025, 2049, device="meta"))
    assert [tuple(o.shape[1:]) for o in outputs] == expected
