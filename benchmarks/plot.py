"""Bar charts of the results files written by benchmarks.run and benchmarks.icnet_e2e.

python -m benchmarks.plot benchmarks/results/ops-<device>.json writes ops-<device>.png beside it: per op,
the p50 time of each provider per case (whiskers from p20 to p80), and how close each comes to the roofline
floor (the larger of the memory time at the copy bandwidth and the compute time at the dense FLOP rate,
both measured in the same run).
For an end-to-end file (icnet-<device>.json): the p50 latency of each runner per configuration, and per
configuration the layer-group times of the reference and fused builds stacked, head on top.
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _case_label(row: dict) -> str:
    return f"{'x'.join(map(str, row['shape']))}\n{row['dtype']}\n{row['variant']}"


def _config_label(row: dict) -> str:
    return f"{row['mode']}\nbatch {row['batch']}\n{row['dtype']}\n{row['layout']}"


def _grouped_bars(axis, rows: list[dict], cases: list[str], providers: list[str], key: str,
                  case_label=_case_label, series: str = "provider") -> None:
    width = 0.8 / len(providers)
    for index, provider in enumerate(providers):
        offset = (index - (len(providers) - 1) / 2) * width
        plotted = [(cases.index(case_label(row)) + offset, row) for row in rows
                   if row[series] == provider and row.get(key) is not None]
        positions = [position for position, _ in plotted]
        heights = [row[key] for _, row in plotted]
        whiskers = None
        if key == "p50_ms":
            whiskers = [[row["p50_ms"] - row["p20_ms"] for _, row in plotted],
                        [row["p80_ms"] - row["p50_ms"] for _, row in plotted]]
        axis.bar(positions, heights, width, yerr=whiskers, label=provider, capsize=2)
    axis.set_xticks(range(len(cases)), cases, fontsize=7)


def _ops_figure(plt, rows: list[dict]):
    ops = list(dict.fromkeys(row["op"] for row in rows))
    figure, axes = plt.subplots(len(ops), 2, figsize=(16, 5 * len(ops)), squeeze=False)
    for (time_axis, roofline_axis), op in zip(axes, ops):
        op_rows = [row for row in rows if row["op"] == op]
        cases = list(dict.fromkeys(_case_label(row) for row in op_rows))
        providers = list(dict.fromkeys(row["provider"] for row in op_rows))
        _grouped_bars(time_axis, op_rows, cases, providers, "p50_ms")
        time_axis.set_yscale("log")
        time_axis.set_ylabel("p50 time per call (ms), log scale")
        time_axis.set_title(f"{op}: time")
        time_axis.legend(fontsize=8)
        _grouped_bars(roofline_axis, op_rows, cases, providers, "pct_of_roofline_floor")
        roofline_axis.set_ylabel("roofline floor as % of p50")
        roofline_axis.set_title(f"{op}: share of the roofline floor")
    return figure


def _icnet_figure(plt, rows: list[dict]):
    figure, (time_axis, groups_axis) = plt.subplots(1, 2, figsize=(18, 6))
    configs = list(dict.fromkeys(_config_label(row) for row in rows))
    runners = list(dict.fromkeys(row["runner"] for row in rows))
    _grouped_bars(time_axis, rows, configs, runners, "p50_ms", _config_label, "runner")
    floors = {_config_label(row): row for row in rows if "floor_ms" in row}
    for key, style, name in (("floor_ms", "-", "roofline floor"), ("layerwise_floor_ms", ":", "layerwise floor")):
        time_axis.hlines([row[key] for row in floors.values()], [configs.index(c) - 0.45 for c in floors],
                         [configs.index(c) + 0.45 for c in floors], colors="black", linestyles=style, label=name)
    time_axis.set_yscale("log")
    time_axis.set_ylabel("p50 latency per call (ms), log scale")
    time_axis.set_title("ICNet end to end: latency and roofline floors")
    time_axis.legend(fontsize=8)

    grouped = [row for row in rows if "layer_groups_ms" in row]
    # forward order, head (the untimed rest) on top: the modes run different groups, so no one row has them all
    groups = [*dict.fromkeys(group for row in grouped for group in row["layer_groups_ms"]
                             if group not in ("head", "total")), "head"]
    labels = [f"{_config_label(row)}\n{row['runner'].removesuffix('-eager')}" for row in grouped]
    bottoms = [0.0] * len(grouped)
    colors = plt.get_cmap("tab10")
    for index, group in enumerate(groups):
        heights = [row["layer_groups_ms"].get(group, 0.0) for row in grouped]
        groups_axis.bar(range(len(grouped)), heights, 0.7, bottom=bottoms, label=group, color=colors(index % 10))
        bottoms = [bottom + height for bottom, height in zip(bottoms, heights)]
    groups_axis.set_xticks(range(len(grouped)), labels, fontsize=7)
    groups_axis.set_ylabel("median ms per call (head: total minus the timed groups)")
    groups_axis.set_title("where the time goes: layer groups, reference vs fused")
    groups_axis.legend(fontsize=8)
    return figure


def write_plot(results_path: Path) -> Path:
    """Writes the chart as a PNG next to results_path and returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or assumed
    import matplotlib.pyplot as plt

    results = json.loads(results_path.read_text())
    rows = [row for row in results["rows"] if "error" not in row]
    if not rows:
        raise ValueError(f"{results_path} holds no successful rows to plot")
    meta = results["meta"]
    end_to_end = meta.get("benchmark") == "icnet end to end"
    figure = (_icnet_figure if end_to_end else _ops_figure)(plt, rows)
    figure.suptitle(f"{meta['device']} ({meta['device_kind']}), torch {meta['torch']}, "
                    f"commit {meta['git_commit'][:10]}")
    figure.tight_layout()
    png_path = results_path.with_suffix(".png")
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return png_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path,
                        help="a JSON file written by python -m benchmarks.run or python -m benchmarks.icnet_e2e")
    args = parser.parse_args(argv)
    if not matplotlib_available():
        print("benchmarks.plot needs matplotlib: pip install 'icnet-kernels[bench]' (or pip install matplotlib)",
              file=sys.stderr)
        return 1
    print(write_plot(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
