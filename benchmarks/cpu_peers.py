"""ICNet's fused build against what a user would deploy it with instead on a CPU: torch.compile of the
reference build (inductor, with freezing), and ONNX Runtime and OpenVINO running its ONNX export
(benchmarks.e2e_onnx), timed in alternating rounds in one process.

python -m benchmarks.cpu_peers [--batches 1 4] [--dtypes float32 bfloat16] [--repeats 2] [--threads N] [--out DIR]
python -m benchmarks.cpu_peers --markdown RESULTS_JSON   # the README's tables of a results file

For each dtype and batch, repeated (sub124 at 1025x2049, NCHW, the same random weights as
benchmarks.icnet_e2e): the fused build run eagerly, the compiled reference and the two runtimes, timed
together by benchmarks.icnet_e2e.run_config (its rows: p20/p50/p80, argmax agreement with the reference
build, compile_s, the roofline fields, and the fused build's layer_groups_ms, hook spans); then each ONNX
runtime profiled on its own,
its row's layer_groups_ms the medians of per-call sums of node times by layer group and reorder_ms the
share of its layout reorders. Rows carry the repeat's number. Writes <out>/icnet-cpu-peers-<cpu>.json
(with -<N>-threads before .json under --threads N, and -omp-<policy> where OMP_WAIT_POLICY is set) and
prints p50 per repeat with each runner's ratio to the fused build of the same repeat.
"""

import argparse
import json
import logging
import os
import statistics
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

from benchmarks import e2e_onnx, icnet_e2e, report, roofline, timing

log = logging.getLogger("benchmarks")
RUNNERS = ("fused-eager", "reference-compile-frozen", "onnxruntime", "openvino")
PROFILE_CALLS = 5
# As benchmarks.icnet_e2e on a CPU: at least five alternating rounds.
EFFORT = timing.Effort(cpu_min_run_s=1.0, cpu_min_samples=5, gpu_warmup_ms=0, gpu_rep_ms=0)


def run_peers(config: icnet_e2e.Config, repeat: int, peaks: roofline.Peaks, on_row: Callable[[dict], None]) -> None:
    """One repeat of one configuration: the fused build and the peers timed together, then the peers profiled."""
    device = torch.device("cpu")
    runners = [name for name in RUNNERS if icnet_e2e.RUNNERS[name].applies(config, device)]
    rows = []
    models, x = icnet_e2e.run_config(config, device, EFFORT, peaks, runners, rows.append)
    for row in rows:
        row["repeat"] = repeat
        if row["runner"] in e2e_onnx.PROFILERS and "p50_ms" in row:
            log.info("  profile: %s", row["runner"])
            profile = e2e_onnx.PROFILERS[row["runner"]](models["reference"], x, PROFILE_CALLS)
            row["reorder_ms"] = profile.pop("reorder_ms")
            row["layer_groups_ms"] = profile
        on_row(row)


def cpu_flags() -> dict[str, bool]:
    """The CPU's native bfloat16 (and AMX) support, as /proc/cpuinfo reports it."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return {flag: flag in flags for flag in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")}


def _versions() -> dict[str, str | None]:
    found = {}
    for package in ("onnx", "onnxruntime", "openvino"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def format_peers(rows: list[dict]) -> str:
    """Per configuration and runner: p50 in each repeat, its ratio to the fused build's, argmax agreement."""
    lines = [f"{'batch':>5} {'dtype':9} {'runner':24} {'p50 ms per repeat':>20} {'runner / fused':>16} {'argmax':>9}"]
    for label in dict.fromkeys((r["batch"], r["dtype"]) for r in rows):
        same = [r for r in rows if (r["batch"], r["dtype"]) == label and "p50_ms" in r]
        fused = {r["repeat"]: r["p50_ms"] for r in same if r["runner"] == "fused-eager"}
        for runner in dict.fromkeys(r["runner"] for r in same):
            mine = {r["repeat"]: r for r in same if r["runner"] == runner}
            p50 = " ".join(f"{mine[k]['p50_ms']:.0f}" for k in sorted(mine))
            ratio = " ".join(f"{mine[k]['p50_ms'] / fused[k]:.2f}" for k in sorted(mine) if k in fused)
            agreement = statistics.mean(r["argmax_agreement"] for r in mine.values())
            lines.append(f"{label[0]:>5} {label[1]:9} {runner:24} {p50:>20} {ratio:>16} {100 * agreement:8.3f}%")
    return "\n".join(lines)


PEER_NAMES = {"fused-eager": "fused build", "reference-compile-frozen": "torch.compile", "onnxruntime": "ONNX Runtime",
              "openvino": "OpenVINO"}
GROUP_NAMES = {"trunk": "trunk (1/2 shrink, conv1, pool1, conv2, conv3_1)",
               "sub4_branch": "sub4 branch (1/2 shrink, conv3_rest, conv4, conv5)", "ppm": "pyramid pooling",
               "conv5_4": "conv5_4", "cff_sub24": "CFF sub24", "sub1": "sub1", "cff_sub12": "CFF sub12",
               "head": "head (classifier, final resizes)", "total": "total"}


def _per_repeat(rows: list[dict], value: Callable[[dict], float]) -> str:
    return ", ".join(f"{value(row):.0f}" for row in sorted(rows, key=lambda row: row["repeat"]))


def format_markdown(rows: list[dict]) -> str:
    """The README's two tables: p50 per repeat of each runner with the faster peer's ratio to the fused build,
    and at batch 1 where the time goes (layer_groups_ms per repeat) for each runner that has them."""
    timed = [row for row in rows if "p50_ms" in row]
    runners = [name for name in RUNNERS if any(row["runner"] == name for row in timed)]
    lines = ["| batch | dtype | " + " | ".join(f"{PEER_NAMES[name]} ms" for name in runners)
             + " | faster peer / fused | fused build's argmax agreement |",
             "|" + "---|" * (len(runners) + 4)]
    for batch, dtype in dict.fromkeys((row["batch"], row["dtype"]) for row in timed):
        same = [row for row in timed if (row["batch"], row["dtype"]) == (batch, dtype)]
        of = {name: [row for row in same if row["runner"] == name] for name in runners}
        cells = [_per_repeat(of[name], lambda row: row["p50_ms"]) or "-" for name in runners]
        by_repeat = {}
        for row in same:
            by_repeat.setdefault(row["repeat"], {})[row["runner"]] = row["p50_ms"]
        ratios = ", ".join(f"{min(t for name, t in times.items() if name != 'fused-eager') / times['fused-eager']:.2f}"
                           for _, times in sorted(by_repeat.items())
                           if "fused-eager" in times and len(times) > 1)
        agreement = statistics.mean(row["argmax_agreement"] for row in of["fused-eager"]) if of["fused-eager"] else None
        lines.append(f"| {batch} | {dtype} | " + " | ".join(cells) + f" | {ratios or '-'} | "
                     + ("-" if agreement is None else f"{100 * agreement:.3f}%") + " |")
    grouped = [row for row in timed if row["batch"] == 1 and row.get("layer_groups_ms")]
    columns = list(dict.fromkeys((row["dtype"], row["runner"]) for row in grouped))
    if columns:
        lines += ["", "| layer group | " + " | ".join(f"{PEER_NAMES[runner]}, {dtype}" for dtype, runner in columns)
                  + " |", "|" + "---|" * (len(columns) + 1)]
        for group, label in GROUP_NAMES.items():
            cells = [_per_repeat([row for row in grouped if (row["dtype"], row["runner"]) == column],
                                 lambda row: row["layer_groups_ms"].get(group, float("nan"))) for column in columns]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mode", choices=("sub4", "sub24", "sub124"), default="sub124")
    parser.add_argument("--input-size", nargs=2, type=int, default=list(icnet_e2e.INPUT_SIZE), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, help="intra-op threads of every runner (default: torch's)")
    parser.add_argument("--out", type=Path, default=report.REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--markdown", type=Path, metavar="RESULTS_JSON",
                        help="print the README's tables of an earlier results file and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        print(format_markdown(json.loads(args.markdown.read_text())["rows"]))
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    dtypes = [getattr(torch, name) for name in args.dtypes]
    configs = [icnet_e2e.Config(args.mode, batch, dtype, False, tuple(args.input_size))
               for dtype in dtypes for batch in args.batches]
    peaks = roofline.measured_peaks(dtypes, device, EFFORT)
    threads = "" if args.threads is None else f"-{args.threads}-threads"
    wait_policy = os.environ.get("OMP_WAIT_POLICY")
    omp = "" if wait_policy is None else f"-omp-{report.slug(wait_policy)}"
    path = args.out / f"icnet-cpu-peers-{report.slug(report.device_name(device))}{threads}{omp}.json"
    run_meta = (report.meta(device, peaks.gbps, peaks.dense_rates, peaks.tflops, False)
                | {"benchmark": "icnet end to end, CPU peers", "input_size": list(args.input_size),
                   "roofline_peaks": peaks.describe(), "peer_versions": _versions(), "cpu_flags": cpu_flags(),
                   "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"), "OMP_WAIT_POLICY": wait_policy,
                   "layer_groups_ms": "peers: medians of per-call sums of node times from the runtime's profiler; "
                                      "fused-eager: hook spans (benchmarks.layer_groups)"})
    rows = []

    def on_row(row: dict) -> None:  # written as each row finishes, so a run cut short keeps what it measured
        rows.append(row)
        report.write_json(path, run_meta, rows)

    for config in configs:  # the repeats of a configuration back to back, so a run cut short has compared some
        for repeat in range(1, args.repeats + 1):
            run_peers(config, repeat, peaks, on_row)
    print(format_peers(rows))
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
