"""Device description, the printed table and the results file."""

import datetime
import json
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from benchmarks import timing
from icnet.plan_tuning import device_name  # results files name devices as the plan looks them up

REPO_ROOT = Path(__file__).resolve().parent.parent


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _git_commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def package_version(package: str) -> str | None:
    """The installed version of package, None where it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def meta(device: torch.device, copy_gbps: float, dense_tflops: dict[str, dict[str, float]],
         peak_tflops: dict[str, float], quick: bool) -> dict:
    side, batch = timing.DENSE_PROBLEMS[device.type]
    channels, size = timing.CONV_CHANNELS, timing.CONV_MAP
    return {
        "device": device_name(device),
        "device_kind": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_gbps": copy_gbps,
        "peak_tflops": peak_tflops,
        "dense_tflops": dense_tflops,
        "dense_problems": {"mm": f"[{side}, {side}] @ [{side}, {side}]",
                           "conv3x3": f"[{batch}, {channels}, {size}, {size}] conv [{channels}, {channels}, 3, 3], "
                                      "padding 1"},
        "float32_mm_is_tf32": timing.fp32_matmul_uses_tf32(device),
        "quick": quick,
    }


def write_json(path: Path, run_meta: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": run_meta, "rows": rows}, indent=1) + "\n")


def _number(spec: str, suffix: str = ""):
    return lambda value: f"{value:{spec}}{suffix}"


_COLUMNS = (
    ("op", "op", str),
    ("variant", "variant", str),
    ("shape", "shape", lambda shape: "x".join(map(str, shape))),
    ("dtype", "dtype", str),
    ("provider", "provider", str),
    ("p50 ms", "p50_ms", _number(".4g")),
    ("p20 ms", "p20_ms", _number(".4g")),
    ("p80 ms", "p80_ms", _number(".4g")),
    ("GB/s", "gbps", _number(".3g")),
    ("TFLOP/s", "tflops", _number(".3g")),
    ("% floor", "pct_of_roofline_floor", _number(".3g")),
    ("bound", "roofline_bound", str),
    ("max abs err", "max_abs_err", _number(".2e")),
    ("max rel err", "max_rel_err", _number(".2e")),
    ("vs eager", "speedup_vs_eager", _number(".2f", "x")),
    ("error", "error", str),
)


def format_table(rows: list[dict]) -> str:
    cells = [[header for header, _, _ in _COLUMNS]]
    for row in rows:
        cells.append([fmt(row[key]) if row.get(key) is not None else "-" for _, key, fmt in _COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
