"""The GPU run's driver (scripts/gpu_run.py): its CPU mode end to end, so that the GPU script cannot rot
between GPU runs, and the pieces a GPU run relies on: stage time limits, the parsers of each stage's
output, the compile cache's environment check, the op benchmark's goal cases."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

from benchmarks import cascade_feature_fusion, compile_cache, icnet_e2e, pyramid_pool_sum, run
from scripts.memcheck_cases import FUSION_CASES, PYRAMID_CASES

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_run", REPO / "scripts" / "gpu_run.py")
gpu_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_run)


def _drive(tmp_path, *args, timeout=240):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_run.py"), "--cpu", "--out", str(out),
                             "--work", str(tmp_path / "work"), *args], capture_output=True, text=True,
                            timeout=timeout)
    return result, out, json.loads((out / "summary.json").read_text())


def test_cpu_mode_runs_every_stage_and_bundles_at_most_eight_files(tmp_path):
    result, out, summary = _drive(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    files = sorted(path.name for path in out.iterdir())
    assert len(files) <= 8 and all((out / name).stat().st_size < 16 * 2**20 for name in files)
    assert sorted(summary["files"]) == files
    stages = {stage["name"]: stage for stage in summary["stages"]}
    assert list(stages) == ["preflight", "build", "tests", "memcheck", "ops", "e2e"]
    assert stages["preflight"]["status"] == "ok" and summary["environment"]["torch"] == torch.__version__
    for skipped in ("build", "memcheck"):
        assert stages[skipped]["status"] == "skipped" and "CPU mode" in stages[skipped]["reason"]
    tests = stages["tests"]["results"]
    assert stages["tests"]["status"] == "ok" and tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0
    memcheck = stages["memcheck"]["results"]
    assert memcheck["cases_run"] == len(FUSION_CASES) + len(PYRAMID_CASES) and memcheck["cases_failed"] == []
    assert stages["ops"]["status"] == "ok" and stages["ops"]["results"]["errors"] == 0
    assert stages["e2e"]["status"] == "ok" and stages["e2e"]["results"]["not_measured"] == []
    e2e = json.loads(next(out.glob("icnet-*.json")).read_text())
    assert [row["runner"] for row in e2e["rows"]] == ["reference-eager", "fused-eager"]
    assert all(row["p50_ms"] > 0 and row["compile_s"] > 0 and row["input"] == [1, 3, 33, 65] for row in e2e["rows"])
    ops = json.loads(next(out.glob("ops-*.json")).read_text())
    assert ops["meta"]["goal_cases_only"] and all("p50_ms" in row for row in ops["rows"])
    with tarfile.open(out / "logs.tar.gz") as archive:
        logs = set(archive.getnames())
    assert {f"logs/{stage}.log" for stage in ("preflight", "tests", "memcheck", "ops", "e2e")} <= logs


def test_a_spent_budget_skips_the_remaining_stages_and_still_bundles(tmp_path):
    result, out, summary = _drive(tmp_path, "--budget-s", "5")
    assert result.returncode == 0  # skipped is not failed: the summary says why
    statuses = {stage["name"]: (stage["status"], stage["reason"]) for stage in summary["stages"]}
    for name in ("tests", "ops", "e2e"):
        assert statuses[name][0] == "skipped" and "budget" in statuses[name][1], statuses
    assert (out / "logs.tar.gz").exists()


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan may wait for a reaper that containers lack)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_stage_over_its_limit_is_stopped_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    start = time.monotonic()
    status, code, seconds = gpu_run.run_command([sys.executable, "-c", script], tmp_path / "log", 3, dict(os.environ))
    assert (status, code) == ("timeout", None) and seconds < 15 and time.monotonic() - start < 15
    time.sleep(0.5)
    assert not _running(int(pid_file.read_text()))
    assert "stopped at its time limit" in (tmp_path / "log").read_text()
    assert gpu_run.run_command([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log", 30,
                               dict(os.environ))[:2] == ("failed", 3)


def _gpu_driver(tmp_path, plan):
    args = argparse.Namespace(cpu=False, plan=plan, out=tmp_path / "out", work=tmp_path / "work", budget_s=None)
    driver = gpu_run.Driver(args)
    driver.environment = {"device": "NVIDIA H200", "cuda_available": True}
    return driver


def test_the_memcheck_stage_runs_the_cases_on_the_gpu_under_the_sanitizer_without_the_caching_allocator(tmp_path):
    """A stand-in compute-sanitizer that offers --kernel-name and logs how it was called."""
    sanitizer = tmp_path / "compute-sanitizer"
    sanitizer.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                         "if sys.argv[1:] == ['--help']:\n    print('--kernel-name <filter>')\n"
                         "else:\n    print(json.dumps([sys.argv[1:], os.environ.get("
                         "'PYTORCH_NO_CUDA_MEMORY_CACHING')]))\n")
    sanitizer.chmod(0o755)
    driver = _gpu_driver(tmp_path, "first")
    driver.environment["compute_sanitizer"] = str(sanitizer)
    driver.logs.mkdir(parents=True, exist_ok=True)
    stage = gpu_run.Stage("memcheck", limit_s=60)
    driver.stage_memcheck(stage)
    cases = str(REPO / "scripts" / "memcheck_cases.py")
    expected = ["--tool", "memcheck", "--kernel-name", "kns=icnet", "--error-exitcode", "99", sys.executable, cases,
                "--device", "cuda"]
    assert (stage.status, stage.returncode) == ("ok", 0) and stage.command == [str(sanitizer), *expected]
    logged = json.loads((driver.logs / "memcheck.log").read_text().splitlines()[-1])
    assert logged == [expected, "1"]


@pytest.mark.parametrize("plan, earlier, batches", [("first", False, [1]), ("batch16", False, [16]),
                                                     ("batch16", True, [1, 16])])
def test_the_gpu_run_measures_the_goal_configuration_with_the_runners_in_order(tmp_path, plan, earlier, batches):
    """The GPU stages' command lines, parsed by the benchmarks themselves (a typo would only show on a GPU)."""
    driver = _gpu_driver(tmp_path, plan)
    if earlier:
        driver.results_dir("e2e").mkdir(parents=True)
        (driver.results_dir("e2e") / "icnet-nvidia-h200.json").write_text("{}")
    args = driver.e2e_args()
    assert args[:2] == ["-m", "benchmarks.icnet_e2e"]
    parsed = icnet_e2e._parser().parse_args(args[2:])
    chosen = icnet_e2e.chosen_configs(torch.device("cuda"), parsed)
    assert [(c.mode, c.batch, c.dtype, c.channels_last, c.size) for c in chosen] == [
        ("sub124", batch, torch.float16, True, (1025, 2049)) for batch in batches]
    assert parsed.runners == ["reference-eager", "fused-eager", "fused-cuda-graph", "plan", "plan-labels",
                              "fused-triton-cuda-graph", "reference-compile-max-autotune"]
    assert all(icnet_e2e.RUNNERS[name].applies(chosen[0], torch.device("cuda")) for name in parsed.runners)
    assert parsed.resume == (plan == "batch16")
    assert parsed.compile_cache.name == "torch-compile-cache-nvidia-h200.zip"


def test_the_runs_an_e2e_stage_left_unmeasured_are_named_in_the_benchmarks_order(tmp_path):
    """A second run that resumes batch 1 and adds batch 16, cut off during batch 1's max-autotune."""
    driver = _gpu_driver(tmp_path, "batch16")
    driver.results_dir("e2e").mkdir(parents=True)
    results = driver.results_dir("e2e") / "icnet-nvidia-h200.json"
    results.write_text("{}")
    args = driver.e2e_args()
    unreadable = gpu_run.summarize_rows(results).get("table", [])
    assert gpu_run.runners_not_measured(unreadable, args)[0] == "batch 1 reference-eager"  # none done
    done = gpu_run.E2E_RUNNERS[:-1]
    results.write_text(json.dumps({"rows": [{"batch": 1, "runner": name} for name in done]}))
    assert gpu_run.runners_not_measured(gpu_run.summarize_rows(results)["table"], args) == (
        ["batch 1 reference-compile-max-autotune"] + [f"batch 16 {name}" for name in gpu_run.E2E_RUNNERS])


def test_the_gpu_tests_run_in_parallel_under_a_per_test_timeout(tmp_path):
    driver = _gpu_driver(tmp_path, "first")
    driver.environment["packages"] = {"xdist": True, "pytest_timeout": True}
    args = driver.tests_args()
    assert args[:2] == ["-m", "pytest"]
    value = {option: args[args.index(option) + 1] for option in ("-p", "--timeout", "-n", "-k", "--ignore-glob")}
    assert value["-p"] == "no:cacheprovider" and value["--timeout"] == "60" and int(value["-n"]) >= 1
    assert value["-k"] == "cuda or gpu" and value["--ignore-glob"] == "tests/test_gpu_driver*"
    driver.environment["packages"] = {}
    assert "-n" not in driver.tests_args() and "--timeout" not in driver.tests_args()


def test_the_gpu_ops_stage_asks_for_the_goal_cases(tmp_path):
    args = _gpu_driver(tmp_path, "first").ops_args()
    assert args[:2] == ["-m", "benchmarks.run"] and "--goal" in args
    if not torch.cuda.is_available():  # argparse accepts the line; then the missing GPU stops it
        with pytest.raises(SystemExit, match="needs a visible CUDA GPU"):
            run.main(args[2:])


def test_test_outcomes_come_from_junit_or_else_from_the_log(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite><testcase classname="tests.a" name="ok"/>'
                     '<testcase classname="tests.a" name="bad"><failure message="assert 1 == 2&#10;more"/></testcase>'
                     '<testcase classname="tests.a" name="gone"><skipped message="needs a GPU"/></testcase>'
                     '<testcase classname="tests.b" name="broke"><error message="boom"/></testcase>'
                     '</testsuite></testsuites>')
    parsed = gpu_run.parse_junit(junit)
    assert {key: parsed[key] for key in ("passed", "failed", "errors", "skipped")} == {
        "passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert parsed["failures"][0] == {"test": "tests.a::bad", "outcome": "failed", "message": "assert 1 == 2"}
    assert gpu_run.parse_junit(tmp_path / "missing.xml") is None
    log = ("[gw0] [ 50%] PASSED tests/test_x.py::test_a[cuda] \n"
           "[gw1] [ 60%] FAILED tests/test_x.py::test_b[float16] \n"
           "tests/test_y.py::test_c SKIPPED (needs a GPU)\n")
    parsed = gpu_run.parse_pytest_log(log)
    assert (parsed["passed"], parsed["failed"], parsed["skipped"]) == (1, 1, 1)
    assert parsed["failures"] == [{"test": "tests/test_x.py::test_b[float16]", "outcome": "failed", "message": ""}]


def test_memcheck_log_gives_the_sanitizer_errors_and_each_case():
    log = ("========= COMPUTE-SANITIZER\nok cascade_feature_fusion/a/float32/strided max_abs_err=1e-06 (0.1 s)\n"
           "========= Invalid __global__ read of size 4 bytes\n=========     at icnet::kernel+0x10\n"
           "FAIL pyramid_pool_sum/b/float16/contiguous RuntimeError: x (0.2 s)\n========= ERROR SUMMARY: 3 errors\n")
    assert gpu_run.parse_memcheck(log) == {
        "sanitizer_errors": 3, "errors_reported": 1, "first_errors": ["Invalid __global__ read of size 4 bytes"],
        "cases_run": 2, "cases_failed": ["pyramid_pool_sum/b/float16/contiguous"]}
    assert gpu_run.parse_memcheck("killed")["sanitizer_errors"] is None


def test_compile_cache_is_loaded_only_in_the_environment_it_was_made_in(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    # torch's serializer is cumulative within a process: each save returns all that was compiled so far
    made, loaded = [b"first", b"first+second"], []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (made.pop(0), None) if made else None)
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda blob: loaded.append(blob) or "info")
    monkeypatch.setattr(compile_cache, "_SAVED_BY_THIS_PROCESS", {})
    path = tmp_path / "cache.zip"
    assert compile_cache.load(path, cpu)["reason"].startswith("no cache file")
    assert compile_cache.save(path, cpu)["sets"] == 1
    assert compile_cache.save(path, cpu)["sets"] == 1  # the second set holds the first
    monkeypatch.setattr(compile_cache, "_SAVED_BY_THIS_PROCESS", {})  # a later process
    made.append(b"third")
    assert compile_cache.save(path, cpu)["sets"] == 2
    assert compile_cache.save(path, cpu)["sets"] == 2  # nothing new compiled
    assert compile_cache.load(path, cpu) == {"file": "cache.zip", "loaded_sets": 2, "sets": 2,
                                             "reason": "same environment"}
    assert loaded == [b"first+second", b"third"]
    monkeypatch.setattr(compile_cache, "environment", lambda device: {"device": "another GPU"})
    record = compile_cache.load(path, cpu)
    assert record["loaded_sets"] == 0 and record["reason"].startswith("made for")
    with zipfile.ZipFile(path) as archive:
        assert json.loads(archive.read("meta.json"))["torch"] == torch.__version__

    def broken():
        raise RuntimeError("cannot pickle")

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", broken)
    assert compile_cache.save(path, cpu)["error"] == "RuntimeError: cannot pickle"


def test_goal_cases_are_float16_icnet_geometry_at_both_batches():
    cuda = torch.device("cuda")
    chosen = [case for module in run.OPS.values() for case in module.cases(cuda, False) if run.goal_case(case, cuda)]
    assert {case.op for case in chosen} == {cascade_feature_fusion.NAME, pyramid_pool_sum.NAME}
    assert {case.dtype for case in chosen} == {torch.float16}
    cff = sorted((case.variant, case.shape[0]) for case in chosen if case.op == cascade_feature_fusion.NAME)
    assert cff == [("sub12-shortcut", 1), ("sub12-shortcut", 16), ("sub24-shortcut", 1), ("sub24-shortcut", 16)]
    ppm = [case for case in chosen if case.op == pyramid_pool_sum.NAME]
    assert {case.shape[0] for case in ppm} == {1, 16} and {case.variant for case in ppm} == {"adaptive",
                                                                                              "icnet-explicit"}


def test_an_op_provider_failing_when_timed_gets_a_row_that_says_so(monkeypatch):
    def out_of_memory(fns, device, effort):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(run.timing, "time_together_ms", out_of_memory)
    cpu = torch.device("cpu")
    case = pyramid_pool_sum.cases(cpu, True)[0]
    rows = run.run_case(pyramid_pool_sum, case, cpu, run.timing.QUICK, 1.0, {"float32": 1.0}, ["eager", "icnet-native"])
    assert [row["provider"] for row in rows] == ["eager", "icnet-native"]
    assert all(row["error"] == "while timed: OutOfMemoryError: CUDA out of memory" and "p50_ms" not in row
               for row in rows)


def test_the_op_benchmarks_readme_table_comes_from_the_rows():
    def row(provider, p50, **extra):
        return {"op": "pyramid_pool_sum", "variant": "adaptive", "shape": [16, 1024, 33, 65], "dtype": "float32",
                "provider": provider, "p50_ms": p50} | extra
    rows = [row("eager", 1080.4), row("icnet-native", 122.2, speedup_vs_eager=8.84),
            {"op": "pyramid_pool_sum", "variant": "adaptive", "shape": [16, 1024, 33, 65], "dtype": "float32",
             "provider": "icnet-triton", "error": "needs a GPU"}]
    table = run.format_markdown(rows).splitlines()
    assert table[0] == ("| op | variant | shape | dtype | eager ms | icnet-native ms | icnet-native vs eager "
                        "| icnet-triton ms | icnet-triton vs eager |")
    assert table[2] == "| pyramid_pool_sum | adaptive | 16x1024x33x65 | float32 | 1080 | 122 | 8.84x | - | - |"
