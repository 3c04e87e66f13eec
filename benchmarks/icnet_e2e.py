"""End-to-end ICNet benchmark: the paper's Table 4 (sub4 / sub24 / sub124 at 1025x2049) on this machine.

python -m benchmarks.icnet_e2e [--device cpu|cuda|auto] [--out benchmarks/results] [--quick] [--runners ...]
    [--modes ...] [--batches ...] [--dtypes ...] [--layouts ...] [--input-size H W] [--compile-cache FILE]

Builds: "reference" (plain PyTorch layers) and "fused" (icnet_kernels ops, BatchNorm folded), sharing one
random state_dict. Runners (RUNNERS, in this order unless --runners names others): eager, both builds; on a
GPU CUDA-graph replay of the fused build with its default (native CUDA) and its Triton kernels, the static
inference plan (icnet.plan, benchmarks.e2e_plan) returning logits, returning labels, with its Triton
kernels and tuned per layer, and for
the goal configurations (sub124, float16) torch.compile of the reference (default) and of the fused build
(max-autotune), and the reference's torch.compile max-autotune last; on a CPU, for sub124 in float32 and
bfloat16, torch.compile of the reference with inductor's freezing (weights folded as constants, convolutions
prepacked), and ONNX Runtime and OpenVINO running the ONNX export (benchmarks.e2e_onnx). Each runner is
built, checked, timed and written to the results file before the next one starts (on the CPU, where
runners are timed in alternating rounds, after the configuration's last runner), so a run cut short keeps
what finished.
Rows: compile_s (seconds from building the runner to its first output: compiling, autotuning and graph
capture included), latency p20/p50/p80, fps, peak memory (GPU), argmax agreement with the reference build,
speedup over the reference build run eagerly in the same layout, and for the fused build
epilogue_fallbacks (the convolutions whose fused epilogue fell back to the plain path, and why).
--compile-cache loads torch.compile's artifacts from FILE when it was made on this GPU model with this
torch and Triton (benchmarks.compile_cache), and adds this run's artifacts to it after every compiled runner.

Roofline (benchmarks.network_cost, benchmarks.roofline), the same in every row of a configuration: flops
and conv_flops, the network's definition (the reference build, FlopCounterMode, 2 per multiply-add), and
tflops, flops over p50; dense_flops, what the fused build's exact shortcuts leave of it; min_bytes, the
image read, the logits written and the weights read once (min_bytes_parts), and layerwise_bytes, that plus
every intermediate activation written once and read once. floor_ms = max(min_bytes / bandwidth,
dense_flops / dense rate), layerwise_floor_ms the same with layerwise_bytes, each with its bound and the
percentage of p50 it is (pct_of_roofline_floor, pct_of_layerwise_floor). The peaks (meta.roofline_peaks):
datasheet figures for known GPUs, else the copy bandwidth and dense rate measured in this run (recorded
in meta either way).

Layer groups (benchmarks.layer_groups): the eager rows of both builds carry layer_groups_ms, the median ms
per call of trunk, sub4_branch, ppm, conv5_4, cff_sub24, sub1 and cff_sub12 (those the mode runs), timed
by hooks on ICNet's submodules in separate calls, and head, the total minus those: classifier and final
resizes. On a GPU they also carry layer_groups_kernel_ms, the same groups' kernel durations per call
(torch.profiler): what a CUDA graph replay spends there, without the eager launch gaps.

Writes <out>/icnet-<device>.json and, with matplotlib, a PNG chart beside it; prints tables.
"""

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path

import torch

from benchmarks import compile_cache, e2e_onnx, e2e_plan, layer_groups, network_cost, plot, report, roofline, timing
from benchmarks.case import dtype_name
from icnet import ICNet
from icnet.graphs import CudaGraphRunner
from icnet.layers import epilogue_fallbacks

log = logging.getLogger("benchmarks")
INPUT_SIZE = (1025, 2049)


@dataclass(frozen=True)
class Config:
    mode: str
    batch: int
    dtype: torch.dtype
    channels_last: bool
    size: tuple[int, int] = INPUT_SIZE

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "nchw"

    def describe(self) -> dict:
        return {"mode": self.mode, "batch": self.batch, "dtype": dtype_name(self.dtype), "layout": self.layout,
                "input": [self.batch, 3, *self.size]}


def configs(device: torch.device, quick: bool) -> list[Config]:
    if device.type == "cpu":
        if quick:
            return [Config("sub124", 1, torch.float32, False)]
        return ([Config(mode, 1, torch.float32, False) for mode in ("sub4", "sub24", "sub124")]
                + [Config("sub124", 1, torch.float32, True)])
    batches = (1,) if quick else (1, 16)
    dtypes = (torch.float16,) if quick else (torch.float32, torch.float16, torch.bfloat16)
    every = [Config(mode, batch, dtype, True) for mode in ("sub4", "sub24", "sub124") for batch in batches
             for dtype in dtypes]
    # the configurations the goals name first, so a run cut short has measured them
    return sorted(every, key=lambda config: (config.mode, config.dtype) != ("sub124", torch.float16))


def build_models(config: Config, device: torch.device) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    reference = ICNet(mode=config.mode, fused=False).eval()
    for module in reference.modules():  # non-trivial statistics, so the folded BatchNorm is exercised
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 1.5)
            module.running_mean.normal_(0, 0.1)
    fused = ICNet(mode=config.mode, fused=True).eval()
    fused.load_state_dict(reference.state_dict())
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    return {name: model.to(device=device, dtype=config.dtype, memory_format=layout)
            for name, model in (("reference", reference), ("fused", fused))}


def _goal(config: Config) -> bool:
    """The configuration the goals name: compiling takes minutes per configuration, so only it is compiled."""
    return config.mode == "sub124" and config.dtype == torch.float16


def _on_gpu(config: Config, device: torch.device) -> bool:
    return device.type == "cuda"


def _compiled(mode: str | None = None, options: dict | None = None) -> Callable:
    # mode="max-autotune" replays CUDA graphs (cudagraph trees) as well as autotuning the kernels; the fused
    # build compiles with its icnet ops kept whole.
    def wrap(model, x):
        torch._dynamo.reset()
        return torch.compile(model, mode=mode, options=options)
    return wrap


def _cpu_peer(config: Config, device: torch.device) -> bool:
    """The configurations the CPU peers are compared in (benchmarks.cpu_peers): sub124, float32 or bfloat16."""
    return device.type == "cpu" and config.mode == "sub124" and config.dtype in (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class Runner:
    """How a runner is made: prepare picks (or copies) the model it runs from the builds, outside the peak
    memory measurement; wrap(model, x) turns it into the callable that is timed; applies says for which
    configurations and devices it runs; compiles marks the torch.compile runners (the cache is saved after
    each)."""
    prepare: Callable[[dict], torch.nn.Module]
    wrap: Callable = field(default=lambda model, x: model)
    applies: Callable[[Config, torch.device], bool] = field(default=lambda config, device: True)
    compiles: bool = False


def _goal_on_gpu(config: Config, device: torch.device) -> bool:
    return _on_gpu(config, device) and _goal(config)


# prepare: the build itself
_reference, _fused = itemgetter("reference"), itemgetter("fused")

RUNNERS: dict[str, Runner] = {
    "reference-eager": Runner(_reference),
    "fused-eager": Runner(_fused),
    "fused-cuda-graph": Runner(_fused, CudaGraphRunner, _on_gpu),
    "fused-triton-cuda-graph": Runner(lambda models: with_backend(models["fused"], "triton"), CudaGraphRunner,
                                      _on_gpu),
    # the static inference plan (benchmarks.e2e_plan): logits, labels without logits, Triton kernels, tuned
    "plan": Runner(_reference, e2e_plan.plan_runner(labels=False), _on_gpu),
    "plan-labels": Runner(_reference, e2e_plan.plan_runner(labels=True), _on_gpu),
    "plan-triton": Runner(_reference, e2e_plan.plan_runner(False, "triton"), _goal_on_gpu),
    "plan-tuned": Runner(_reference, e2e_plan.plan_runner(False, tune=True), _goal_on_gpu),
    "reference-compile": Runner(_reference, _compiled(None), _goal_on_gpu, compiles=True),
    "fused-compile-max-autotune": Runner(_fused, _compiled("max-autotune"), _goal_on_gpu, compiles=True),
    "reference-compile-max-autotune": Runner(_reference, _compiled("max-autotune"), _goal_on_gpu, compiles=True),
    # the CPU peers: torch.compile of the reference build with freezing (the weights become constants of the
    # graph, so inductor folds them and prepacks the convolutions' weights for oneDNN: what PyTorch recommends
    # for inference on a CPU), and ONNX Runtime and OpenVINO running its ONNX export (benchmarks.e2e_onnx;
    # skipped when not installed)
    "reference-compile-frozen": Runner(_reference, _compiled(options={"freezing": True}), _cpu_peer,
                                       compiles=True),
    "onnxruntime": Runner(_reference, e2e_onnx.onnxruntime_runner, e2e_onnx.runs_onnxruntime),
    "openvino": Runner(_reference, e2e_onnx.openvino_runner, e2e_onnx.runs_openvino),
}


def with_backend(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """A copy of the fused build whose icnet ops all run the named backend."""
    copy = deepcopy(model)
    for module in copy.modules():
        if hasattr(module, "backend"):
            module.backend = backend
    return copy


def _device_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _allocated_mb(device: torch.device) -> float:
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device) / 2**20


def build_and_check(runner: Runner, model: torch.nn.Module, x: torch.Tensor, expected: torch.Tensor) -> tuple:
    """Builds one runner; returns (callable, seconds to its first output, argmax agreement with the reference
    build, peak memory in MB on a GPU, else None).

    Peak memory is what this runner alone would hold at its busiest: its model's weights, the input, what it
    keeps between calls (a graph's static buffers, compiled constants) and the most its call allocates on top.
    A CUDA graph's replays allocate nothing (its memory is taken when it is captured), so a graph runner's
    peak is read over its capture; cudagraph trees (compile max-autotune) record on their second call, so
    every other runner's peak is read over its second call, with the first one's compiling behind it.
    """
    on_gpu = x.device.type == "cuda"
    if on_gpu:
        start_mb = _allocated_mb(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
    start = time.perf_counter()
    fn = runner.wrap(model, x)
    first = fn(x)
    if on_gpu:
        torch.cuda.synchronize(x.device)
    compile_s = time.perf_counter() - start
    agreement = (e2e_plan.predicted_labels(first) == expected).float().mean().item()
    if not on_gpu:
        return fn, compile_s, agreement, None
    if not isinstance(fn, CudaGraphRunner):
        torch.cuda.reset_peak_memory_stats(x.device)
        fn(x)
        torch.cuda.synchronize(x.device)
    peak = torch.cuda.max_memory_allocated(x.device) / 2**20 - start_mb
    input_mb = x.numel() * x.element_size() / 2**20
    return fn, compile_s, agreement, _device_bytes(model) / 2**20 + input_mb + max(peak, 0.0)


# Calls per build for the layer-group medians: each CPU call of the full network takes a good part of a
# second on a few cores; on a GPU a call takes milliseconds.
LAYER_GROUP_CALLS = {"cpu": 5, "cuda": 25}
EAGER_RUNNERS = ("reference-eager", "fused-eager")


def run_config(config: Config, device: torch.device, effort: timing.Effort, peaks: roofline.Peaks,
               runners: list[str], on_row: Callable[[dict], None]) -> tuple[dict, torch.Tensor]:
    """Measures the named runners on one configuration in their order, handing each finished row to on_row;
    returns the models and the input they ran, for a caller that profiles them after."""
    models = build_models(config, device)
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    cost = network_cost.icnet_cost(config.mode, config.batch, config.dtype, layout, config.size)
    x = torch.randn(config.batch, 3, *config.size, device=device) * 60
    x = x.to(config.dtype).contiguous(memory_format=layout)
    pending = []  # (row, callable, model) built but not yet timed

    def finish(built):
        """Times the built runners and writes their rows; a runner that fails only when timed (out of
        memory under the timer's repetitions, say) gets a row that says so, and the runners after it run."""
        times, failures = timing.time_or_fail({row["runner"]: (lambda fn=fn: fn(x)) for row, fn, _ in built},
                                              device, effort)
        for row, _, model in built:
            if row["runner"] in failures:
                row["error"] = failures[row["runner"]]
                log.warning("  failed %s", row["error"])
                on_row(row)
                continue
            p20, p50, p80 = times[row["runner"]]
            row |= {"p20_ms": p20, "p50_ms": p50, "p80_ms": p80, "fps": config.batch * 1e3 / p50}
            row |= cost | _roofline_fields(cost, p50, peaks, row["dtype"])
            if row["runner"] in EAGER_RUNNERS:
                log.info("  layer groups: %s", row["runner"])
                try:
                    row["layer_groups_ms"] = layer_groups.layer_group_ms(model, x, LAYER_GROUP_CALLS[device.type])
                    if device.type == "cuda":
                        row["layer_groups_kernel_ms"] = layer_groups.layer_group_kernel_ms(
                            model, x, LAYER_GROUP_CALLS[device.type])
                except Exception as exc:  # the row keeps its times
                    row["layer_groups_error"] = timing.error_text(exc)
                    log.warning("  layer groups failed: %s", row["layer_groups_error"])
            on_row(row)

    with torch.inference_mode():
        expected = models["reference"](x).argmax(1)
        for name in runners:
            runner = RUNNERS[name]
            row = config.describe() | {"runner": name}
            log.info("icnet %s %s batch %d %s: %s", config.mode, row["dtype"], config.batch, row["layout"], name)
            try:
                with torch.inference_mode(False):  # a copied model's tensors must keep their version counters
                    model = runner.prepare(models)
                fn, row["compile_s"], row["argmax_agreement"], peak = build_and_check(runner, model, x, expected)
                row |= e2e_plan.row_fields(fn)
                if peak is not None:
                    row["peak_memory_mb"] = peak
                if getattr(model, "fused", False):
                    row["epilogue_fallbacks"] = epilogue_fallbacks(model)
            except Exception as exc:  # a failing runner gets a row that says why
                row["error"] = timing.error_text(exc)
                log.warning("  failed: %s", row["error"])
                on_row(row)
                continue
            pending.append((row, fn, model))
            if device.type == "cuda":  # each timed alone: its row is written before the next runner starts
                finish(pending)
                pending = []
        if pending:  # on the CPU the runners take turns, so that a slow spell falls on all of them alike
            finish(pending)
    return models, x


def with_speedups(rows: list[dict]) -> list[dict]:
    """Each timed row's speedup over the reference build run eagerly in the same configuration."""
    base = {_config_label(r): r["p50_ms"] for r in rows if r["runner"] == "reference-eager" and "p50_ms" in r}
    for row in rows:
        if "p50_ms" in row and _config_label(row) in base:
            row["speedup_vs_reference_eager"] = base[_config_label(row)] / row["p50_ms"]
    return rows


def _roofline_fields(cost: dict, p50_ms: float, peaks: roofline.Peaks, dtype: str) -> dict:
    rate = peaks.tflops[dtype]
    floor_ms, bound = roofline.floor_ms(cost["min_bytes"], cost["dense_flops"], peaks.gbps, rate)
    layerwise_ms, layerwise_bound = roofline.floor_ms(cost["layerwise_bytes"], cost["dense_flops"], peaks.gbps, rate)
    return {"tflops": cost["flops"] / p50_ms / 1e9,
            "floor_ms": floor_ms, "roofline_bound": bound, "pct_of_roofline_floor": 100 * floor_ms / p50_ms,
            "layerwise_floor_ms": layerwise_ms, "layerwise_bound": layerwise_bound,
            "pct_of_layerwise_floor": 100 * layerwise_ms / p50_ms}


CONFIG_KEYS = ("mode", "batch", "dtype", "layout", "input")


def row_config(row: dict) -> dict:
    return {key: row[key] for key in CONFIG_KEYS}


def _rows_done(path: Path) -> list[dict]:
    """The rows of an earlier, possibly interrupted run of this benchmark, [] when there is none."""
    if not path.exists():
        return []
    return json.loads(path.read_text())["rows"]


def _config_label(row: dict) -> str:
    return f"{row['mode']} batch {row['batch']} {row['dtype']} {row['layout']}"


def format_table(rows: list[dict]) -> str:
    head = (f"{'mode':7} {'batch':>5} {'dtype':9} {'layout':13} {'runner':32} {'p50 ms':>9} {'fps':>8} "
            f"{'speedup':>8} {'argmax':>7} {'TFLOP/s':>8} {'% floor':>8} {'% layerwise':>11} {'compile s':>9}")
    lines = [head]
    for r in rows:
        label = f"{r['mode']:7} {r['batch']:>5} {r['dtype']:9} {r['layout']:13} {r['runner']:32} "
        if "error" in r:
            lines.append(label + r["error"])
            continue
        lines.append(label + f"{r['p50_ms']:9.2f} {r['fps']:8.2f} {r.get('speedup_vs_reference_eager', 0):7.2f}x "
                     f"{r['argmax_agreement']:7.4f} {r['tflops']:8.3g} {r['pct_of_roofline_floor']:8.3g} "
                     f"{r['pct_of_layerwise_floor']:11.3g} {r.get('compile_s', float('nan')):9.1f}")
    return "\n".join(lines)


def format_roofline(rows: list[dict]) -> str:
    """One line per configuration: what the network must compute and move, and the floors that sets."""
    lines = ["roofline per configuration (GFLOP: definition / dense; GB: min / layerwise; floor ms: min / layerwise)"]
    for r in {_config_label(r): r for r in rows if "floor_ms" in r}.values():
        lines.append(f"{_config_label(r):40} {r['flops'] / 1e9:7.2f} / {r['dense_flops'] / 1e9:7.2f} GFLOP  "
                     f"{r['min_bytes'] / 1e9:6.3f} / {r['layerwise_bytes'] / 1e9:6.3f} GB  "
                     f"floor {r['floor_ms']:8.3f} ms ({r['roofline_bound']}) / {r['layerwise_floor_ms']:8.3f} ms "
                     f"({r['layerwise_bound']})")
    return "\n".join(lines)


def format_layer_groups(rows: list[dict]) -> str:
    """Per configuration, the median ms of each layer group in each eager build (head: total minus the rest),
    and on a GPU the ms of the kernels each group launches."""
    blocks = []
    for key, title in (("layer_groups_ms", "layer groups, ms"), ("layer_groups_kernel_ms", "kernel ms")):
        blocks += _layer_group_blocks(rows, key, title)
    return "\n\n".join(blocks)


def _layer_group_blocks(rows: list[dict], key: str, title: str) -> list[str]:
    blocks = []
    for label in dict.fromkeys(_config_label(r) for r in rows if key in r):
        builds = {r["runner"]: r[key] for r in rows if key in r and _config_label(r) == label}
        lines = [f"{title + ':':17} {label:38} " + " ".join(f"{runner:>16}" for runner in builds)]
        for group in dict.fromkeys(g for times in builds.values() for g in times):
            lines.append(f"  {group:54} " + " ".join(f"{times.get(group, float('nan')):16.2f}"
                                                    for times in builds.values()))
        blocks.append("\n".join(lines))
    return blocks


def format_markdown(rows: list[dict]) -> str:
    """The README's table: one line per configuration and runner, with the compiled reference where measured."""
    lines = ["| mode | batch | dtype | layout | runner | p50 ms | fps | peak MB | vs eager | vs compile max-autotune "
             "| argmax agreement |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    autotuned = {_config_label(r): r["p50_ms"] for r in rows
                 if r["runner"] == "reference-compile-max-autotune" and "p50_ms" in r}
    for r in rows:
        if "p50_ms" not in r:
            lines.append(f"| {r['mode']} | {r['batch']} | {r['dtype']} | {r['layout']} | {r['runner']} | "
                         f"failed: {r.get('error', '?')} | | | | | |")
            continue
        versus = autotuned.get(_config_label(r))
        vs_autotuned = f"{versus / r['p50_ms']:.2f}x" if versus else "-"
        peak = f"{r['peak_memory_mb']:.0f}" if "peak_memory_mb" in r else "-"
        lines.append(f"| {r['mode']} | {r['batch']} | {r['dtype']} | {r['layout']} | {r['runner']} | {r['p50_ms']:.3g} "
                     f"| {r['fps']:.4g} | {peak} | {r['speedup_vs_reference_eager']:.2f}x "
                     f"| {vs_autotuned} | {100 * r['argmax_agreement']:.2f}% |")
    return "\n".join(lines)


def chosen_configs(device: torch.device, args: argparse.Namespace) -> list[Config]:
    """configs(device, quick), narrowed to the modes, batches, dtypes and layouts asked for, at the input size."""
    chosen = [Config(c.mode, c.batch, c.dtype, c.channels_last, tuple(args.input_size))
              for c in configs(device, args.quick)
              if (not args.modes or c.mode in args.modes) and (not args.batches or c.batch in args.batches)
              and (not args.dtypes or dtype_name(c.dtype) in args.dtypes)
              and (not args.layouts or c.layout in args.layouts)]
    if not chosen:
        raise SystemExit("icnet_e2e: no configuration of this device matches --modes/--batches/--dtypes/--layouts")
    return chosen


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--out", type=Path, default=report.REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in the results file and measure only the missing runners")
    parser.add_argument("--markdown", type=Path, metavar="RESULTS_JSON",
                        help="print the README table of an earlier results file and exit")
    parser.add_argument("--runners", nargs="+", choices=list(RUNNERS), default=list(RUNNERS),
                        help="the runners to measure, in this order (default: all, in RUNNERS' order)")
    parser.add_argument("--modes", nargs="+", choices=("sub4", "sub24", "sub124"))
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--layouts", nargs="+", choices=("nchw", "channels_last"))
    parser.add_argument("--input-size", nargs=2, type=int, default=list(INPUT_SIZE), metavar=("H", "W"))
    parser.add_argument("--compile-cache", type=Path, metavar="FILE",
                        help="torch.compile artifacts: loaded when made in this environment, extended by this run")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.markdown:
        print(format_markdown(json.loads(args.markdown.read_text())["rows"]))
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    effort = timing.QUICK if args.quick else timing.Effort(cpu_min_run_s=1.0, cpu_min_samples=5,
                                                           gpu_warmup_ms=100, gpu_rep_ms=500)
    chosen = chosen_configs(device, args)
    cache = compile_cache.load(args.compile_cache, device) if args.compile_cache else None
    measured = roofline.measured_peaks((config.dtype for config in chosen), device, effort)
    peaks = measured
    if device.type == "cuda":
        peaks = roofline.datasheet_peaks(report.device_name(device), timing.fp32_matmul_uses_tf32(device)) or measured
    log.info("roofline peaks (%s): %.1f GB/s, %s TFLOP/s", peaks.source, peaks.gbps,
             ", ".join(f"{dtype} {rate:.3g}" for dtype, rate in peaks.tflops.items()))
    group_spans = {group: [list(point) for point in span] for group, span in layer_groups.GROUPS.items()}
    run_meta = (report.meta(device, measured.gbps, measured.dense_rates, measured.tflops, args.quick)
                | {"benchmark": "icnet end to end", "input_size": list(args.input_size),
                   "roofline_peaks": peaks.describe(),
                   "layer_groups": group_spans | {layer_groups.HEAD: "total minus the groups that ran"}})
    if cache is not None:
        run_meta["compile_cache"] = cache
    suffix = "-quick" if args.quick else ""
    path = args.out / f"icnet-{report.slug(report.device_name(device))}{suffix}.json"
    rows = _rows_done(path) if args.resume else []

    def on_row(row: dict) -> None:  # every row is written as it finishes, so a run cut short keeps it
        rows.append(row)
        if args.compile_cache and RUNNERS[row["runner"]].compiles:
            run_meta["compile_cache_saved"] = compile_cache.save(args.compile_cache, device)
        report.write_json(path, run_meta, with_speedups(rows))

    for config in chosen:
        done = {row["runner"] for row in rows if row_config(row) == config.describe()}
        todo = [name for name in args.runners if name not in done and RUNNERS[name].applies(config, device)]
        if done:
            log.info("already measured for %s: %s", config.describe(), ", ".join(sorted(done)))
        if todo:
            run_config(config, device, effort, peaks, todo, on_row)
    report.write_json(path, run_meta, with_speedups(rows))
    print(format_table(rows), format_roofline(rows), format_layer_groups(rows), sep="\n\n")
    log.info("wrote %s", path)
    if plot.matplotlib_available():
        log.info("wrote %s", plot.write_plot(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
