"""What the command line shows is consistent: --help gives every option's default and examples, mIoU is
printed in percent (with a % sign) by train, evaluate and prune alike and stored as a fraction in their
files, and the epoch summary is a result on stdout whether or not progress bars run."""

import csv
import json
import re

import pytest

from icnet import ICNet
from icnet.checkpoint import save_checkpoint
from icnet.cli import main as icnet_main
from icnet.cli import parser

TINY_RUN = ["--synthetic-size", "33x65", "--synthetic-train", "2", "--synthetic-val", "1", "--workers", "0",
            "--batch-size", "2", "--crop", "33x65", "--epochs", "1", "--max-iterations", "1", "--width", "0.125"]
PERCENT = r"(\d+\.\d\d)%"


def subcommands():
    return parser()._subparsers._group_actions[0].choices


@pytest.mark.parametrize("command, defaults", [
    ("segment", ["--batch-size", "(default: 1)", "--mode", "(default: sub124)"]),
    ("train", ["--epochs", "(default: 30)", "--synthetic-train", "(default: 400)", "(default: 256x512)",
               "(default: 225x449)", "(default: 0.4 0.4 1.0)", "(default: 0.01)"]),
    ("evaluate", ["--scales", "(default: 1.0)", "(default: val)"]),
    ("prune", ["--keep", "(default: 0.75 0.5)"]),
])
def test_help_shows_defaults_and_examples(capsys, command, defaults):
    assert icnet_main([command, "--help"]) == 0
    text = capsys.readouterr().out
    for fragment in defaults:
        assert fragment in text, (fragment, text)
    assert "examples:" in text and f"icnet {command} " in text.split("examples:")[1]
    assert "(default: None)" not in text and "(default: False)" not in text


def test_every_option_says_what_it_does():
    for name in ("segment", "train", "evaluate", "prune"):
        for action in subcommands()[name]._actions:
            assert action.help, (name, action.option_strings or action.dest)


def test_root_help_lists_an_example_of_every_command(capsys):
    assert icnet_main(["--help"]) == 0
    examples = capsys.readouterr().out.split("examples:")[1]
    for name in ("segment", "train", "evaluate", "prune"):
        assert f"icnet {name} " in examples


@pytest.mark.parametrize("progress", [True, False], ids=["progress bars", "no progress bars"])
def test_train_prints_its_epoch_summary_on_stdout_in_percent(tmp_path, capsys, progress):
    argv = ["train", "--out", str(tmp_path), *TINY_RUN] + ([] if progress else ["--no-progress"])
    assert icnet_main(argv) == 0
    captured = capsys.readouterr()
    summaries = [line for line in captured.out.splitlines() if line.startswith("epoch 1/1:")]
    assert len(summaries) == 1 and "val mIoU" not in captured.err, captured
    with open(tmp_path / "log.csv") as file:
        logged = next(csv.DictReader(file))
    printed_miou, printed_accuracy = map(float, re.findall(PERCENT, summaries[0]))
    assert 0 <= float(logged["val_miou"]) <= 1
    assert printed_miou == pytest.approx(100 * float(logged["val_miou"]), abs=0.005)
    assert printed_accuracy == pytest.approx(100 * float(logged["val_pixel_accuracy"]), abs=0.005)


def test_evaluate_prints_percent_and_writes_fractions(tmp_path, capsys):
    save_checkpoint(tmp_path / "w.pt", ICNet(num_classes=19, width=0.125))
    assert icnet_main(["evaluate", "--weights", str(tmp_path / "w.pt"), "--synthetic-size", "33x65",
                       "--synthetic-val", "2", "--no-progress", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    scores = json.loads((tmp_path / "s.json").read_text())
    miou = float(re.search(r"^mIoU\s+" + PERCENT, out, re.MULTILINE).group(1))
    accuracy = float(re.search(r"^pixel accuracy\s+" + PERCENT, out, re.MULTILINE).group(1))
    assert miou == pytest.approx(100 * scores["mean_iou"], abs=0.005)
    assert accuracy == pytest.approx(100 * scores["pixel_accuracy"], abs=0.005)


def test_prune_prints_percent_and_no_placeholder_for_the_trained_model(tmp_path, capsys):
    save_checkpoint(tmp_path / "trained.pt", ICNet(num_classes=19, width=0.25))
    assert icnet_main(["prune", "--weights", str(tmp_path / "trained.pt"), "--out", str(tmp_path / "pruned"),
                       "--keep", "0.5", "--no-progress", *TINY_RUN[:-2]]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = json.loads((tmp_path / "pruned" / "pruning.json").read_text())
    trained = next(line for line in lines if line.startswith("keep 1 "))
    pruned = next(line for line in lines if line.startswith("keep 0.5:"))
    assert " -" not in trained and "(the trained model)" in trained
    assert float(re.findall(PERCENT, trained)[0]) == pytest.approx(100 * rows[0]["val_miou_finetuned"], abs=0.005)
    before, after = map(float, re.findall(PERCENT, pruned))
    assert before == pytest.approx(100 * rows[1]["val_miou_pruned"], abs=0.005)
    assert after == pytest.approx(100 * rows[1]["val_miou_finetuned"], abs=0.005)
    assert all(0 <= row["val_miou_finetuned"] <= 1 for row in rows)
