"""Benchmark entry point.

python -m benchmarks.run [--ops pyramid_pool_sum ...] [--device cpu|cuda|auto] [--out benchmarks/results] [--quick]
    [--goal] [--providers eager icnet-native ...] [--compile-cache FILE]
python -m benchmarks.run --markdown RESULTS_JSON   # the README's table of a results file

For every case of every op: compute the reference in float64 from the same inputs, run each provider once
and diff it against that reference, then time the providers together (on the CPU in alternating rounds, so
that a noisy neighbour slows them alike). Prints a table to stdout, writes
<out>/ops-<device>.json (meta plus long-form rows, one per case and provider) and, when matplotlib is
installed, a PNG chart beside it. A provider that fails gets a row with an "error" field instead.

Row fields: p20/p50/p80_ms are quantiles of one call's time. gbps and tflops divide the case's minimal
bytes (inputs read once, output written once, min_bytes) and the FLOPs of the op's direct definition
(flops) by p50. floor_ms is the roofline floor, max(min_bytes / copy bandwidth, dense_flops / dense rate),
both rates measured in the same run (meta.copy_gbps; meta.peak_tflops for the case's dtype, the faster of
a large torch.mm and a large 3x3 convolution in meta.dense_tflops). dense_flops counts only the
matrix-multiply arithmetic of the cheapest exact algorithm: below flops for the cascade feature fusion
shortcut, 0 for summed pyramid pooling, which stays purely memory-bound.
roofline_bound says which term sets the floor, and pct_of_roofline_floor is floor_ms as a percentage of
p50, i.e. how close p50 is to the fastest time the memory traffic and the arithmetic allow; for a
memory-bound case it equals gbps as a percentage of meta.copy_gbps. max_rel_err is max_abs_err over the
largest reference magnitude: elementwise ratios are meaningless where the sum crosses zero.
speedup_vs_eager is eager's p50 over this provider's p50.

--goal keeps the cases the GPU goals name (float16 on a GPU, float32 on the CPU; both batches; ICNet's own
CFF geometry, the exact shortcut, at sub24 and sub12; every pyramid pooling case; no other op). The results
file is rewritten after every case, so a run cut short keeps the cases that finished. --compile-cache: see
benchmarks.compile_cache (saved after every case that a torch.compile provider ran).
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from benchmarks import (cascade_feature_fusion, compile_cache, conv2d_epilogue, max_pool, plot, pyramid_pool_sum,
                        report, roofline, segmentation_head, timing)
from benchmarks.case import Case, OpBenchmark

OPS: dict[str, OpBenchmark] = {module.NAME: module for module in (pyramid_pool_sum, cascade_feature_fusion,
                                                                  segmentation_head, max_pool, conv2d_epilogue)}
BASELINE = "eager"

log = logging.getLogger("benchmarks")


def _errors(out: torch.Tensor, expected: torch.Tensor) -> dict:
    if out.shape != expected.shape:
        raise ValueError(f"output shape {tuple(out.shape)} differs from the reference's {tuple(expected.shape)}")
    max_abs = (out.double() - expected).abs().max().item()
    return {"max_abs_err": max_abs, "max_rel_err": max_abs / expected.abs().max().item()}


def _throughput(case: Case, p50_ms: float, copy_gbps: float, peak_tflops: float) -> dict:
    seconds = p50_ms * 1e-3
    floor_ms, bound = roofline.floor_ms(case.min_bytes, case.dense_flops, copy_gbps, peak_tflops)
    return {"gbps": case.min_bytes / seconds / 1e9, "tflops": case.flops / seconds / 1e12, "floor_ms": floor_ms,
            "roofline_bound": bound, "pct_of_roofline_floor": 100 * floor_ms / p50_ms}


GOAL_OPS = (cascade_feature_fusion.NAME, pyramid_pool_sum.NAME)


def goal_case(case: Case, device: torch.device) -> bool:
    """A case the GPU goals name (on the CPU, its float32 twin): the two fused ops at ICNet's own geometry,
    in the goals' dtype."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return case.op in GOAL_OPS and case.dtype == dtype and not case.variant.endswith("-general")


def run_case(op: OpBenchmark, case: Case, device: torch.device, effort: timing.Effort,
             copy_gbps: float, peak_tflops: dict[str, float], providers: list[str] | None = None) -> list[dict]:
    inputs = op.make_inputs(case, device)
    expected = op.reference(case, inputs)
    rows, ready = [], {}
    for provider, build in op.providers(device).items():
        if providers is not None and provider not in providers:
            continue
        row = case.describe() | {"provider": provider}
        log.info("%s %s %s %s: %s", case.op, case.variant, "x".join(map(str, case.shape)), row["dtype"], provider)
        try:
            fn = build(case)
            row |= _errors(fn(*inputs), expected)
            ready[provider] = fn
        except Exception as exc:  # one broken provider must not cost the other rows; its row says why
            row["error"] = timing.error_text(exc)
            log.warning("  failed: %s", row["error"])
        rows.append(row)
    times, failures = timing.time_or_fail({name: (lambda fn=fn: fn(*inputs)) for name, fn in ready.items()},
                                          device, effort)
    for row in rows:
        if row["provider"] in failures:
            row["error"] = failures[row["provider"]]
            log.warning("  %s failed %s", row["provider"], row["error"])
        if row["provider"] in times:
            p20, p50, p80 = times[row["provider"]]
            row |= {"p20_ms": p20, "p50_ms": p50, "p80_ms": p80} | _throughput(case, p50, copy_gbps,
                                                                               peak_tflops[row["dtype"]])
    baseline = next((row for row in rows if row["provider"] == BASELINE and "p50_ms" in row), None)
    for row in rows:
        if baseline is not None and "p50_ms" in row:
            row["speedup_vs_eager"] = baseline["p50_ms"] / row["p50_ms"]
    return rows


def _case_of(row: dict) -> tuple:
    return row["op"], row["variant"], tuple(row["shape"]), row["dtype"]


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def format_markdown(rows: list[dict]) -> str:
    """The README's table: per case, eager's p50 and each other provider's p50 and speedup over eager."""
    providers = [name for name in dict.fromkeys(row["provider"] for row in rows) if name != BASELINE]
    lines = ["| op | variant | shape | dtype | eager ms | "
             + " | ".join(f"{name} ms | {name} vs eager" for name in providers) + " |",
             "|" + "---|" * (5 + 2 * len(providers))]
    for case in dict.fromkeys(_case_of(row) for row in rows):
        of = {row["provider"]: row for row in rows if _case_of(row) == case}
        cells = [_ms(of[BASELINE]["p50_ms"]) if "p50_ms" in of.get(BASELINE, {}) else "-"]
        for name in providers:
            row = of.get(name, {})
            speedup = f"{row['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in row else "-"
            cells += [_ms(row["p50_ms"]), speedup] if "p50_ms" in row else ["-", "-"]
        op, variant, shape, dtype = case
        lines.append(f"| {op} | {variant} | {'x'.join(map(str, shape))} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a visible CUDA GPU; torch.cuda.is_available() is False")
    return torch.device(choice)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time the icnet ops against eager PyTorch and torch.compile.")
    parser.add_argument("--ops", nargs="+", choices=sorted(OPS), default=sorted(OPS))
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for the results file and chart (default: benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="batch 1 only and shorter timing")
    parser.add_argument("--goal", action="store_true", help="only the cases the GPU goals name (see above)")
    parser.add_argument("--providers", nargs="+", metavar="PROVIDER",
                        help="only these providers (eager, compile, compile-max-autotune, icnet-native, icnet-triton)")
    parser.add_argument("--compile-cache", type=Path, metavar="FILE",
                        help="torch.compile artifacts: loaded when made in this environment, extended by this run")
    parser.add_argument("--markdown", type=Path, metavar="RESULTS_JSON",
                        help="print the README's table of an earlier results file and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        print(format_markdown(json.loads(args.markdown.read_text())["rows"]))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    device = _device(args.device)
    effort = timing.QUICK if args.quick else timing.FULL
    work = [(OPS[name], case) for name in args.ops for case in OPS[name].cases(device, args.quick)
            if not args.goal or goal_case(case, device)]
    cache = compile_cache.load(args.compile_cache, device) if args.compile_cache else None
    peaks = roofline.measured_peaks((case.dtype for _, case in work), device, effort,
                                    max(case.min_bytes for _, case in work))
    copy_gbps, dense_tflops, peak_tflops = peaks.gbps, peaks.dense_rates, peaks.tflops
    log.info("copy bandwidth on %s: %.1f GB/s", device, copy_gbps)
    for dtype, rates in dense_tflops.items():
        log.info("dense rates in %s: %s TFLOP/s", dtype,
                 ", ".join(f"{problem} {rate:.3g}" for problem, rate in rates.items()))

    suffix = "-quick" if args.quick else ""
    results_path = args.out / f"ops-{report.slug(report.device_name(device))}{suffix}.json"
    run_meta = report.meta(device, copy_gbps, dense_tflops, peak_tflops, args.quick) | {"goal_cases_only": args.goal}
    if cache is not None:
        run_meta["compile_cache"] = cache
    rows = []
    for op, case in work:
        case_rows = run_case(op, case, device, effort, copy_gbps, peak_tflops, args.providers)
        rows += case_rows
        if args.compile_cache and any(row["provider"].startswith("compile") for row in case_rows):
            run_meta["compile_cache_saved"] = compile_cache.save(args.compile_cache, device)
        report.write_json(results_path, run_meta, rows)  # after every case, so a run cut short keeps its rows
    print(report.format_table(rows))
    log.info("wrote %s", results_path)
    if plot.matplotlib_available():
        log.info("wrote %s", plot.write_plot(results_path))
    else:
        log.info("matplotlib is not installed: no chart (pip install matplotlib, then python -m benchmarks.plot %s)",
                 results_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
