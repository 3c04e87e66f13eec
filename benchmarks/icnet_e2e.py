"""End-to-end ICNet benchmark: the paper's Table 4 (sub4 / sub24 / sub124 at 1025x2049) on this machine.

python -m benchmarks.icnet_e2e [--device cpu|cuda|auto] [--out benchmarks/results] [--quick]

Builds: "reference" (plain PyTorch layers) and "fused" (icnet_kernels ops, BatchNorm folded), sharing one
random state_dict. Runners: eager; on a GPU also torch.compile (default and max-autotune) of the reference
and CUDA-graph replay of the fused build. Rows: latency p20/p50/p80, fps, peak memory (GPU), argmax
agreement with the reference build, speedup over the reference build run eagerly in the same layout.
Writes <out>/icnet-<device>.json and prints a table.
"""

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import report, timing
from icnet import ICNet
from icnet.graphs import CudaGraphRunner

log = logging.getLogger("benchmarks")
INPUT_SIZE = (1025, 2049)


@dataclass(frozen=True)
class Config:
    mode: str
    batch: int
    dtype: torch.dtype
    channels_last: bool

    def describe(self) -> dict:
        return {"mode": self.mode, "batch": self.batch, "dtype": str(self.dtype).removeprefix("torch."),
                "layout": "channels_last" if self.channels_last else "nchw",
                "input": [self.batch, 3, *INPUT_SIZE]}


def configs(device: torch.device, quick: bool) -> list[Config]:
    if device.type == "cpu":
        if quick:
            return [Config("sub124", 1, torch.float32, False)]
        return ([Config(mode, 1, torch.float32, False) for mode in ("sub4", "sub24", "sub124")]
                + [Config("sub124", 1, torch.float32, True)])
    batches = (1,) if quick else (1, 16)
    dtypes = (torch.float16,) if quick else (torch.float32, torch.float16, torch.bfloat16)
    return [Config(mode, batch, dtype, True) for mode in ("sub4", "sub24", "sub124") for batch in batches
            for dtype in dtypes]


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


def runners(models: dict, config: Config, device: torch.device, x: torch.Tensor) -> dict:
    found = {"reference-eager": models["reference"], "fused-eager": models["fused"]}
    if device.type == "cuda":
        found["fused-cuda-graph"] = CudaGraphRunner(models["fused"], x)
        # compiling takes minutes per configuration: the comparisons the goals name, sub124 in float16
        if config.mode == "sub124" and config.dtype == torch.float16:
            torch._dynamo.reset()
            found["reference-compile"] = torch.compile(models["reference"])
            found["reference-compile-max-autotune"] = torch.compile(models["reference"], mode="max-autotune")
    return found


def run_config(config: Config, device: torch.device, effort: timing.Effort) -> list[dict]:
    models = build_models(config, device)
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    x = (torch.randn(config.batch, 3, *INPUT_SIZE, device=device) * 60).to(config.dtype).contiguous(memory_format=layout)
    rows, ready = [], {}
    with torch.inference_mode():
        expected = models["reference"](x).argmax(1)
        for name, fn in runners(models, config, device, x).items():
            row = config.describe() | {"runner": name}
            log.info("icnet %s %s batch %d %s: %s", config.mode, row["dtype"], config.batch, row["layout"], name)
            try:
                row["argmax_agreement"] = (fn(x).argmax(1) == expected).float().mean().item()
                ready[name] = fn
            except Exception as exc:  # a failing runner gets a row that says why
                row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            rows.append(row)
        peak_mb = {}
        if device.type == "cuda":
            for name, fn in ready.items():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                fn(x)
                torch.cuda.synchronize()
                peak_mb[name] = torch.cuda.max_memory_allocated() / 2**20
        times = timing.time_together_ms({name: (lambda fn=fn: fn(x)) for name, fn in ready.items()}, device, effort)
    for row in rows:
        if row["runner"] in times:
            p20, p50, p80 = times[row["runner"]]
            row |= {"p20_ms": p20, "p50_ms": p50, "p80_ms": p80, "fps": config.batch * 1e3 / p50}
            if row["runner"] in peak_mb:
                row["peak_memory_mb"] = peak_mb[row["runner"]]
    base = next((r for r in rows if r["runner"] == "reference-eager" and "p50_ms" in r), None)
    for row in rows:
        if base is not None and "p50_ms" in row:
            row["speedup_vs_reference_eager"] = base["p50_ms"] / row["p50_ms"]
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'mode':7} {'batch':>5} {'dtype':9} {'layout':13} {'runner':32} {'p50 ms':>9} {'fps':>8} {'speedup':>8} {'argmax':>7}"
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['mode']:7} {r['batch']:>5} {r['dtype']:9} {r['layout']:13} {r['runner']:32} {r['error']}")
            continue
        lines.append(f"{r['mode']:7} {r['batch']:>5} {r['dtype']:9} {r['layout']:13} {r['runner']:32} "
                     f"{r['p50_ms']:9.2f} {r['fps']:8.2f} {r.get('speedup_vs_reference_eager', 0):7.2f}x "
                     f"{r['argmax_agreement']:7.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--out", type=Path, default=report.REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    effort = timing.QUICK if args.quick else timing.Effort(cpu_min_run_s=1.0, cpu_min_samples=5,
                                                           gpu_warmup_ms=100, gpu_rep_ms=500)
    rows = [row for config in configs(device, args.quick) for row in run_config(config, device, effort)]
    run_meta = report.meta(device, None, {}, {}, args.quick) | {"benchmark": "icnet end to end"}
    suffix = "-quick" if args.quick else ""
    path = args.out / f"icnet-{report.slug(report.device_name(device))}{suffix}.json"
    report.write_json(path, run_meta, rows)
    print(format_table(rows))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
