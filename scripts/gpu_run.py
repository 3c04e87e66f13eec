"""One GPU run that builds, tests, memchecks and measures the project in about 8 minutes, and bundles what
it finds into at most 8 files.

    python3 scripts/gpu_run.py --out DIR                  # the run: about 8 minutes on one H100/H200
    python3 scripts/gpu_run.py --out DIR --plan batch16   # the optional second run: about 4 minutes
    python3 scripts/gpu_run.py --out DIR --cpu            # the same driver on tiny shapes, no GPU (CI)

Stages, in order, each under a time limit of its own (never past the run's budget, --budget-s), so a
stage that runs out of time is stopped and the stages before it keep their results:
  preflight  the device, driver, torch, Triton, cuDNN, compute-sanitizer and the Python packages present
  build      the extension for sm_90 only, CUDA forced on (a build without its CUDA kernels fails)
  tests      the GPU tests (every test whose name or id says cuda or gpu) in parallel (pytest-xdist),
             each under pytest-timeout, the small "gpu" hypothesis profile, Triton autotuning off
  memcheck   compute-sanitizer memcheck of icnet's own kernels over scripts/memcheck_cases.py
  ops        op benchmarks of the goal cases (benchmarks.run --goal): eager, native CUDA and Triton
  e2e        ICNet sub124, float16, channels_last, batch 1, runners in the goals' order with the reference's
             torch.compile max-autotune last, a row written per runner; all the time the budget has left.
             The second run first completes batch 1 where the first run on this machine was cut short,
             then measures batch 16, into the same results file
The torch.compile cache (benchmarks.compile_cache) comes from the working folder of an earlier run on this
machine, else from benchmarks/results/, and is used only when it was made on this GPU model with this
torch and Triton; the run returns it extended.

The output folder receives, rewritten after every stage: summary.json (environment, each stage's status,
seconds, limit and parsed results: test counts and failures, memcheck errors and cases, result rows),
logs.tar.gz (every stage's full log, the tests' JUnit XML), ops-<gpu>.json and icnet-<gpu>.json (the
benchmarks' results files; the second run's icnet file holds the first run's rows too when it ran on the same
machine) and torch-compile-cache-<gpu>.zip.
In CPU mode the build is skipped (the installed extension is used) and so is memcheck, each with its
reason; the memcheck cases then run once each on the CPU kernels, and everything else runs on tiny shapes.
Python packages the GPU machine lacks travel as wheels in .whl/ (see the README) and are installed first.
"""

import argparse
import datetime
import glob
import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# (stage, the most seconds it may take); the run's budget caps each further.
PLANS = {
    "first": (("preflight", 30), ("build", 240), ("tests", 120), ("memcheck", 75), ("ops", 75), ("e2e", 480)),
    "batch16": (("preflight", 30), ("build", 120), ("e2e", 480)),
    "cpu": (("preflight", 30), ("build", 0), ("tests", 120), ("memcheck", 60), ("ops", 90), ("e2e", 120)),
}
BUDGET_S = {"first": 470, "batch16": 230, "cpu": 300}
RESERVE_S = 8  # kept back from the budget for the last bundle
MIN_STAGE_S = 10
# The five runners in its order, with the inference plan (logits, then labels) after the fused
# build's CUDA graph: the plan against compile max-autotune in the same run is the number the goals name,
# and max-autotune stays last so that a run cut short keeps everything before it.
E2E_RUNNERS = ("reference-eager", "fused-eager", "fused-cuda-graph", "plan", "plan-labels",
               "fused-triton-cuda-graph", "reference-compile-max-autotune")
# torch.compile of a single op autotunes for tens of seconds per case: the whole network's max-autotune, in
# the e2e stage, is the comparison the goals name.
OP_PROVIDERS = ("eager", "icnet-native", "icnet-triton")
PREFLIGHT = r"""
import importlib.util, json, shutil, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info |= {"device": props.name, "capability": list(torch.cuda.get_device_capability(0)),
             "multiprocessors": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1)}
else:
    from benchmarks import report
    info["device"] = report.device_name(torch.device("cpu"))
info["packages"] = {name: importlib.util.find_spec(name) is not None
                    for name in ("xdist", "pytest_timeout", "hypothesis", "cityscapesscripts", "matplotlib")}
from benchmarks.report import package_version
# the build runs without isolation, on these: the SPDX license in pyproject.toml needs setuptools 77
info["versions"] = {name: package_version(name) for name in ("setuptools", "numpy", "cmake", "ninja")}
import icnet_kernels
info["extension"] = {"native": icnet_kernels.native_available(), "cuda": icnet_kernels.native_cuda_available()}
print(json.dumps(info))
"""


@dataclass
class Stage:
    name: str
    status: str = "pending"  # ok, failed, timeout, skipped
    seconds: float = 0.0
    limit_s: float = 0.0
    returncode: int | None = None
    command: list[str] = field(default_factory=list)
    reason: str | None = None
    results: dict = field(default_factory=dict)


def slug(name: str) -> str:
    """As benchmarks.report.slug, which the results files are named by."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_command(command: list[str], log: Path, limit_s: float, env: dict) -> tuple[str, int | None, float]:
    """(status, return code, seconds) of command run under a time limit in a process group of its own, its
    output appended to log; on the limit the whole group is stopped (TERM, then KILL)."""
    start = time.monotonic()
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(command)}\n".encode())
        out.flush()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=limit_s)
            return ("ok" if code == 0 else "failed"), code, time.monotonic() - start
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
            out.write(f"\n== stopped at its time limit of {limit_s:.0f} s\n".encode())
            return "timeout", None, time.monotonic() - start


def parse_junit(path: Path) -> dict | None:
    """Counts and the failing tests (with the first line of each message) of a JUnit XML file."""
    if not path.exists():
        return None
    root = ElementTree.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
            continue
        key = {"failure": "failed", "error": "errors", "skipped": "skipped"}[outcome.tag]
        counts[key] += 1
        if key != "skipped":
            message = (outcome.get("message") or outcome.text or "").strip().splitlines()
            failures.append({"test": name, "outcome": key, "message": message[0][:300] if message else ""})
    return counts | {"failures": failures}


_OUTCOMES = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
# xdist's "[gw0] [ 50%] PASSED tests/x.py::t" and plain pytest's "tests/x.py::t PASSED"
_OUTCOME = re.compile(rf"\b({_OUTCOMES})\b.*?(tests/\S+::\S+)|(tests/\S+::\S+) ({_OUTCOMES})")


def parse_pytest_log(text: str) -> dict:
    """What a verbose pytest log says about each test that finished: the stand-in for the JUnit file when
    the stage was stopped before pytest could write it."""
    outcomes = {}
    for match in _OUTCOME.finditer(text):
        outcome, test = (match.group(1), match.group(2)) if match.group(1) else (match.group(4), match.group(3))
        outcomes[test] = outcome
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped",
           "XFAIL": "skipped"}
    for outcome in outcomes.values():
        counts[key[outcome]] += 1
    failures = [{"test": test, "outcome": key[outcome], "message": ""} for test, outcome in outcomes.items()
                if key[outcome] in ("failed", "errors")]
    return counts | {"failures": failures, "from": "log (the stage stopped before the JUnit file was written)"}


def parse_memcheck(text: str) -> dict:
    """compute-sanitizer's error count (its summary, printed at exit), the errors it reported as they came
    (all there is when the stage was stopped) and the cases' verdicts, from the memcheck log."""
    summary = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    reported = re.findall(r"^========= (Invalid .*|Program hit .*|Malformed .*|Misaligned .*)$", text, flags=re.MULTILINE)
    cases = re.findall(r"^(ok|FAIL) (\S+)", text, flags=re.MULTILINE)
    return {"sanitizer_errors": int(summary[-1]) if summary else None, "errors_reported": len(reported),
            "first_errors": reported[:5], "cases_run": len(cases),
            "cases_failed": [name for verdict, name in cases if verdict == "FAIL"]}


def summarize_rows(path: Path) -> dict:
    """The result rows of a benchmark's results file, cut to what says whether and how each one ran."""
    if not path.exists():
        return {"rows": 0}
    try:
        rows = json.loads(path.read_text())["rows"]
    except (ValueError, KeyError) as exc:  # a file cut off mid-write by the stage's time limit
        return {"rows": 0, "unreadable": f"{type(exc).__name__}: {exc}"}
    keep = ("op", "variant", "shape", "mode", "batch", "dtype", "layout", "provider", "runner", "p50_ms",
            "compile_s", "max_rel_err", "argmax_agreement", "speedup_vs_eager", "speedup_vs_reference_eager",
            "epilogue_fallbacks", "layer_groups_error", "error")
    return {"rows": len(rows), "errors": sum("error" in row for row in rows),
            "table": [{key: row[key] for key in keep if key in row} for row in rows]}


def runners_not_measured(rows: list[dict], args: list[str]) -> list[str]:
    """The e2e runs that args (the benchmark's command line) asks for and rows (summarize_rows' table) have
    no row of, in the order the benchmark runs them: after a stage stopped at its time limit, the first was
    running."""
    def listed(option):
        start = args.index(option) + 1
        return list(itertools.takewhile(lambda arg: not arg.startswith("--"), args[start:]))

    done = {(row.get("batch"), row.get("runner")) for row in rows}
    return [f"batch {batch} {runner}" for batch in listed("--batches") for runner in listed("--runners")
            if (int(batch), runner) not in done]


class Driver:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cpu = args.cpu
        self.plan = "cpu" if args.cpu else args.plan
        self.out = args.out
        self.work = args.work / self.plan
        self.logs = self.work / "logs"
        self.started = time.monotonic()
        self.deadline = self.started + (args.budget_s or BUDGET_S[self.plan])
        self.stages: list[Stage] = []
        self.environment: dict = {}
        self.notes: list[str] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(REPO / "python"),
                                                               self.env.get("PYTHONPATH")]))
        if self.cpu:  # tiny shapes gain nothing from threads, and spinning threads suffer most on a busy machine
            self.env["OMP_NUM_THREADS"] = "1"

    # -- paths
    @property
    def device_slug(self) -> str:
        return slug(self.environment.get("device", "unknown"))

    def cache_file(self) -> Path:
        return self.args.work / f"torch-compile-cache-{self.device_slug}.zip"

    def results_dir(self, stage: str) -> Path:
        """The e2e results live beside the plans' folders, so that the second run can extend the first's."""
        return self.args.work / "e2e" if stage == "e2e" else self.work / stage

    # -- the run
    def run(self) -> int:
        fresh = [self.work] + ([self.results_dir("e2e")] if self.plan != "batch16" else [])
        for folder in fresh:
            if folder.exists():
                shutil.rmtree(folder)
        self.logs.mkdir(parents=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self._install_wheels()
        for name, cap in PLANS[self.plan]:
            stage = Stage(name)
            self.stages.append(stage)
            remaining = self.deadline - time.monotonic() - RESERVE_S
            stage.limit_s = round(min(cap, remaining), 1)
            skip = self._skip_reason(name)
            if skip:
                stage.status, stage.reason = "skipped", skip
            elif stage.limit_s < MIN_STAGE_S:
                stage.status, stage.reason = "skipped", f"the run's budget is spent ({remaining:.0f} s left)"
            else:
                try:
                    getattr(self, f"stage_{name}")(stage)
                except Exception as exc:  # the driver's own failure: the bundle still says what happened
                    stage.status, stage.reason = "failed", f"driver: {type(exc).__name__}: {exc}"
            print(f"== {name}: {stage.status} in {stage.seconds:.0f} s (limit {stage.limit_s:.0f} s)"
                  + (f": {stage.reason}" if stage.reason else ""), file=sys.stderr, flush=True)
            self.bundle()
            if name == "build" and stage.status not in ("ok", "skipped"):
                self.notes.append("the build failed: the stages after it need the extension and were not run")
                break
        self.bundle()
        self._print_summary()
        return 0 if all(stage.status in ("ok", "skipped") for stage in self.stages) else 1

    def _skip_reason(self, name: str) -> str | None:
        if self.cpu and name == "build":
            return "CPU mode: the installed extension is used (the GPU run builds it for sm_90)"
        if name == "preflight" or self.environment.get("cuda_available") or self.cpu:
            return None
        return "no GPU is visible to torch" if self.environment else "the preflight failed (see its log)"

    def _install_wheels(self) -> None:
        wheels = sorted(glob.glob(str(REPO / ".whl" / "*.whl")))
        if not wheels:
            return
        target = self.args.work / "site"
        code = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                               "--no-compile", "--upgrade", "--target", str(target), *wheels],
                              capture_output=True, text=True)
        self.notes.append(f"installed {len(wheels)} carried wheels into {target}" if code.returncode == 0
                          else f"installing the carried wheels failed: {code.stderr.strip()[-300:]}")
        self.env["PYTHONPATH"] = os.pathsep.join([str(target), self.env["PYTHONPATH"]])

    def _python(self, stage: Stage, args: list[str], env: dict | None = None, log_name: str | None = None,
                launcher: tuple[str, ...] = ()) -> None:
        """Runs this Python with args as the stage's command (under launcher, a wrapping tool's command line,
        where given), logged to logs/<log_name or the stage's name>.log."""
        stage.command = [*launcher, sys.executable, *args]
        log = self.logs / f"{log_name or stage.name}.log"
        stage.status, stage.returncode, stage.seconds = run_command(stage.command, log, stage.limit_s,
                                                                    env or self.env)
        stage.seconds = round(stage.seconds, 1)

    # -- stages
    def stage_preflight(self, stage: Stage) -> None:
        log = self.logs / "preflight.log"
        if shutil.which("nvidia-smi"):
            run_command(["nvidia-smi"], log, 15, self.env)
            run_command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                         "--format=csv"], log, 15, self.env)
        else:
            stage.reason = "nvidia-smi not found"
        start = time.monotonic()
        try:
            result = subprocess.run([sys.executable, "-c", PREFLIGHT], cwd=REPO, env=self.env, capture_output=True,
                                    text=True, timeout=stage.limit_s)
        except subprocess.TimeoutExpired:
            stage.status, stage.reason = "timeout", "importing torch and the extension took too long"
            return
        with open(log, "a") as out:
            out.write(result.stdout + result.stderr)
        stage.seconds = round(time.monotonic() - start, 1)
        stage.returncode = result.returncode
        if result.returncode != 0:
            stage.status, stage.reason = "failed", (result.stderr.strip().splitlines() or ["?"])[-1]
            return
        self.environment = json.loads(result.stdout.strip().splitlines()[-1])
        self.environment["compute_sanitizer"] = _sanitizer()
        self.environment["git_commit"] = _git("rev-parse", "HEAD")
        self.environment["uncommitted_files"] = len((_git("status", "--porcelain") or "").splitlines())
        stage.status = "ok"
        if not self.environment["packages"]["cityscapesscripts"]:
            self.notes.append("cityscapesscripts is missing: the test modules that import it fail to collect "
                              "(carry its wheels in .whl/, see the README)")

    def stage_build(self, stage: Stage) -> None:
        env = dict(self.env, TORCH_CUDA_ARCH_LIST="9.0", ICNET_WITH_CUDA="1", MAX_JOBS=str(os.cpu_count() or 8))
        self._python(stage, ["-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."],
                     env)
        if stage.status != "ok":
            return
        # A built extension whose CUDA kernels do not load would turn every native CUDA test into a skip.
        check = subprocess.run([sys.executable, "-c", "import icnet_kernels; print(icnet_kernels.native_available(), "
                                "icnet_kernels.native_cuda_available())"], cwd=REPO, env=self.env,
                               capture_output=True, text=True, timeout=120)
        with open(self.logs / "build.log", "a") as log:
            log.write(check.stdout + check.stderr)
        stage.results = {"extension_loads": check.stdout.split() == ["True", "True"]}
        if not stage.results["extension_loads"]:
            stage.status, stage.reason = "failed", "the extension built, but it or its CUDA kernels do not load"

    def tests_args(self) -> list[str]:
        args = ["-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfE", "--junitxml", str(self.junit_file()),
                "-k", "cuda or gpu", "--ignore-glob", "tests/test_gpu_driver*", "tests"]
        packages = self.environment.get("packages", {})
        if packages.get("xdist"):
            args[2:2] = ["-n", str(min(8, os.cpu_count() or 1))]
        if packages.get("pytest_timeout"):
            args[2:2] = ["--timeout", "60"]
        return args

    def junit_file(self) -> Path:
        return self.logs / "tests-junit.xml"

    def stage_tests(self, stage: Stage) -> None:
        packages = self.environment.get("packages", {})
        if not packages.get("xdist"):
            self.notes.append("pytest-xdist is missing: the tests ran one at a time")
        if not packages.get("pytest_timeout"):
            self.notes.append("pytest-timeout is missing: no per-test time limit")
        args, junit = self.tests_args(), self.junit_file()
        env = dict(self.env, HYPOTHESIS_PROFILE="gpu", ICNET_TRITON_AUTOTUNE="0")
        self._python(stage, args, env)
        parsed = parse_junit(junit) or parse_pytest_log((self.logs / "tests.log").read_text(errors="replace"))
        stage.results = parsed
        # pytest exits 5 when nothing was collected, 1 when a test failed
        if stage.status == "failed" and parsed["failed"] + parsed["errors"] == 0 and stage.returncode != 5:
            stage.reason = f"pytest exited {stage.returncode}"

    def stage_memcheck(self, stage: Stage) -> None:
        sanitizer = self.environment.get("compute_sanitizer")
        cases = [str(REPO / "scripts" / "memcheck_cases.py")]
        if self.cpu or not sanitizer:
            stage.reason = ("CPU mode: compute-sanitizer needs a GPU" if self.cpu else "compute-sanitizer not found")
            stage.reason += "; the memcheck cases ran once each on the CPU kernels instead"
            self._python(stage, [*cases, "--device", "cpu", "--smoke"])
            stage.results = parse_memcheck((self.logs / "memcheck.log").read_text(errors="replace"))
            stage.results["cases_status"] = stage.status
            stage.status = "skipped" if stage.status == "ok" else stage.status
            return
        # Only icnet's own kernels are instrumented (their names hold the namespace), with the filter option
        # this compute-sanitizer has; without the caching allocator every tensor is its own allocation, so an
        # access past its end is caught.
        kernel_filter = _sanitizer_kernel_filter(sanitizer)
        if kernel_filter is None:
            self.notes.append("compute-sanitizer offers no kernel filter: every kernel was instrumented")
        self._python(stage, [*cases, "--device", "cuda"], dict(self.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1"),
                     launcher=(sanitizer, "--tool", "memcheck", *(kernel_filter or []), "--error-exitcode", "99"))
        text = (self.logs / "memcheck.log").read_text(errors="replace")
        stage.results = parse_memcheck(text)
        if "Device not supported" in text:  # seen under gVisor, where the sanitizer cannot attach
            stage.reason = "compute-sanitizer does not support this device on this machine"

    def ops_args(self) -> list[str]:
        args = ["-m", "benchmarks.run", "--goal", "--out", str(self.results_dir("ops")),
                "--compile-cache", str(self.cache_file())]
        if self.cpu:
            return args + ["--device", "cpu", "--quick", "--ops", "pyramid_pool_sum", "--providers", "eager",
                           "icnet-native"]
        return args + ["--device", "cuda", "--providers", *OP_PROVIDERS]

    def e2e_args(self) -> list[str]:
        out = self.results_dir("e2e")
        args = ["-m", "benchmarks.icnet_e2e", "--out", str(out), "--modes", "sub124",
                "--compile-cache", str(self.cache_file())]
        if self.cpu:
            return args + ["--device", "cpu", "--quick", "--batches", "1", "--dtypes", "float32", "--layouts",
                           "nchw", "--input-size", "33", "65", "--runners", "reference-eager", "fused-eager"]
        batches = ["1"]
        if self.plan == "batch16":
            earlier = _only(out, "icnet-*.json").exists()
            batches = ["1", "16"] if earlier else ["16"]
            args.append("--resume")
        return args + ["--device", "cuda", "--batches", *batches, "--dtypes", "float16", "--layouts",
                       "channels_last", "--runners", *E2E_RUNNERS]

    def stage_ops(self, stage: Stage) -> None:
        self._seed_cache()
        self._python(stage, self.ops_args())
        stage.results = summarize_rows(_only(self.results_dir("ops"), "ops-*.json"))

    def stage_e2e(self, stage: Stage) -> None:
        self._seed_cache()
        args = self.e2e_args()
        if "--resume" in args:
            self.notes.append("e2e: batch 1 completed where this machine's first run left off, then batch 16"
                              if args[args.index("--batches") + 1] == "1" else
                              "e2e: no first run on this machine: batch 16 only")
        self._python(stage, args)
        found = _only(self.results_dir("e2e"), "icnet-*.json")
        stage.results = summarize_rows(found)
        stage.results["not_measured"] = runners_not_measured(stage.results.get("table", []), args)
        if stage.status == "timeout" and stage.results["not_measured"]:
            since = time.time() - found.stat().st_mtime if found.exists() else stage.seconds
            self.notes.append(f"e2e stopped at its time limit while {stage.results['not_measured'][0]} ran, "
                              f"{since:.0f} s after the last row was written")

    def _seed_cache(self) -> None:
        """The working folder's cache (an earlier run on this machine) or else the committed one."""
        committed = REPO / "benchmarks" / "results" / self.cache_file().name
        if not self.cache_file().exists() and committed.exists():
            shutil.copy(committed, self.cache_file())

    # -- the bundle
    def bundle(self) -> None:
        """Rewrites the output folder: at most 8 files, whatever stage the run is in."""
        files = {}
        for stage, pattern in (("ops", "ops-*.json"), ("e2e", "icnet-*.json")):
            found = _only(self.results_dir(stage), pattern)
            if found.exists():
                files[found.name] = found
        if self.cache_file().exists() and self.environment:
            files[self.cache_file().name] = self.cache_file()
        for name, source in files.items():
            shutil.copy(source, self.out / name)
        with tarfile.open(self.out / "logs.tar.gz.partial", "w:gz") as archive:
            archive.add(self.logs, arcname="logs")
        (self.out / "logs.tar.gz.partial").replace(self.out / "logs.tar.gz")
        summary = {"plan": self.plan, "cpu_mode": self.cpu,
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "budget_s": round(self.deadline - self.started), "elapsed_s": round(time.monotonic() - self.started),
                   "environment": self.environment, "stages": [vars(stage) for stage in self.stages],
                   "notes": self.notes, "files": sorted([*files, "logs.tar.gz", "summary.json"])}
        partial = self.out / "summary.json.partial"
        partial.write_text(json.dumps(summary, indent=1) + "\n")
        partial.replace(self.out / "summary.json")

    def _print_summary(self) -> None:
        for stage in self.stages:
            results = stage.results
            detail = ""
            if stage.name == "tests" and results:
                detail = (f"{results['passed']} passed, {results['failed']} failed, {results['errors']} errors, "
                          f"{results['skipped']} skipped")
            elif stage.name == "memcheck" and results:
                detail = (f"sanitizer errors {results['sanitizer_errors']}, {results['cases_run']} cases, "
                          f"{len(results['cases_failed'])} failed")
            elif stage.name in ("ops", "e2e") and results:
                detail = f"{results['rows']} rows, {results.get('errors', 0)} errors"
            print(f"{stage.name:10} {stage.status:8} {stage.seconds:6.0f} s / {stage.limit_s:4.0f} s  {detail}")
        for note in self.notes:
            print(f"note: {note}")
        print(f"bundle in {self.out}: {', '.join(sorted(path.name for path in self.out.iterdir()))}")


def _only(folder: Path, pattern: str) -> Path:
    """The one file in folder matching pattern (the benchmarks name theirs for the device), else a path that
    does not exist."""
    found = sorted(folder.glob(pattern)) if folder.exists() else []
    return found[0] if found else folder / pattern.replace("*", "none")


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer") or next(iter(sorted(glob.glob("/usr/local/cuda*/bin/compute-sanitizer"))),
                                                      None)
    return found


def _sanitizer_kernel_filter(sanitizer: str) -> list[str] | None:
    """The arguments that restrict instrumentation to kernels whose names hold "icnet", as this version of
    compute-sanitizer spells them (--kernel-name in recent ones, --kernel-regex in older ones)."""
    try:
        help_text = subprocess.run([sanitizer, "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for option in ("--kernel-name", "--kernel-regex"):
        if option in help_text:
            return [option, "kns=icnet"]
    return None


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the bundle (at most 8 files)")
    parser.add_argument("--plan", choices=("first", "batch16"), default="first")
    parser.add_argument("--cpu", action="store_true", help="no GPU: tiny shapes, no build, no memcheck")
    parser.add_argument("--budget-s", type=float, help="the whole run's seconds (default: the plan's)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/icnet-gpu-run"),
                        help="working folder; kept between runs on the same machine (the compile cache)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("torch") is None:
        print("gpu_run: torch is not installed for this python", file=sys.stderr)
        return 2
    return Driver(args).run()


if __name__ == "__main__":
    sys.exit(main())
