"""Mutation check: plants realistic bugs in the CPU code one at a time and reports which the tests miss.

Each mutation replaces one exact source snippet (looked up across the tree, so that it survives files
moving; a snippet that is missing or ambiguous stops the run). The run works on a copy of the checkout in
its own folder, with its own build of the extension (CPU only), and never touches the checkout or the
environment's installed package:

    python scripts/mutation_check.py                 # every mutation, its tests, a report on stdout
    python scripts/mutation_check.py --list          # the mutations and the tests that should kill them
    python scripts/mutation_check.py --only cff-blocked-row-block-count --tests tests/test_kernel_paths.py

The copy (default: icnet-mutation-check in the temporary folder) is kept between runs: only the files
that changed are copied again, and the build recompiles only what they touch. The clean copy must pass
every selected test first. A mutation is killed when a selected test fails (or the run crashes or times
out), survives when they all pass. Progress goes to stderr, the report to stdout; the exit status is 0
when every mutation was killed, 1 when one survived, 2 when the run could not be set up.
"""

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATHS = "tests/test_kernel_paths.py"
FOLDS = "tests/test_fold_eps.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    bug: str
    # (original, mutated) pairs, tried in order: the first original found in the tree is planted
    snippets: tuple[tuple[str, str], ...]
    tests: tuple[str, ...]  # pytest node ids: the tests meant to kill it
    prefer: str = ""  # the file to plant in when the snippet occurs in several


MUTATIONS = [
    Mutation("convbn-fold-without-eps", "ConvBN's BatchNorm fold forgets eps",
             ((" + self.bn.eps)", ")"), (" + bn.eps)", ")")),
             (f"{FOLDS}::test_conv_bn_fused_matches_unfused",), prefer="python/icnet/layers.py"),
    Mutation("folded-batch-norm-without-eps", "folded_batch_norm (the CFF module's fold) forgets eps",
             ((" + bn.eps)", ")"),),
             (f"{FOLDS}::test_cascade_feature_fusion_module_fused_matches_unfused",), prefer="icnet_kernels/nn.py"),
    Mutation("folded-batch-norm-unscaled-mean", "the BatchNorm fold's shift subtracts the mean unscaled",
             (("shift = -bn.running_mean.to(dtype) * scale", "shift = -bn.running_mean.to(dtype)"),
              ("shift = -bn.running_mean * scale", "shift = -bn.running_mean")),
             (FOLDS,), prefer="icnet_kernels/nn.py"),
    Mutation("convbn-cache-ignores-versions",
             "the inference cache of folded weights (ConvBN's, the CFF module's) is keyed by storage only",
             (("(t.data_ptr(), t._version)", "t.data_ptr()"),),
             (f"{FOLDS}::test_conv_bn_refolds_when_statistics_change",), prefer="icnet_kernels/nn.py"),
    Mutation("triton-cff-tap-ignores-dilation", "Triton CFF: the taps' row offset ignores the dilation",
             (("ys = y + (tap // 3 - 1) * dilation", "ys = y + (tap // 3 - 1)"),),
             (f"{PATHS}::test_cff_triton_path",), prefer="icnet_kernels/triton/cascade_feature_fusion.py"),
    Mutation("triton-pyramid-cross-bin-terms", "Triton pyramid pooling: the pooled grid masked to its padding "
             "only, so bins mix", (("tl.where(bin_of_row[:, None] == bin_of_row[None, :], pooled, 0.0)",
                                    "tl.where(r_ok[:, None] & r_ok[None, :], pooled, 0.0)"),),
             (f"{PATHS}::test_pyramid_triton_path",), prefer="icnet_kernels/triton/pyramid_pool_sum.py"),
    Mutation("cff-blocked-row-block-count", "CPU CFF blocked path: H / R row blocks, the partial last one dropped",
             (("const int64_t blocks = (s.H + R - 1) / R;", "const int64_t blocks = s.H / R;"),),
             (f"{PATHS}::test_cff_cpu_path",), prefer="csrc/cpu/cascade_feature_fusion.cpp"),
    Mutation("cff-blocked-last-upsampled-row", "CPU CFF blocked path: the last row of up(low) left zero",
             (("if (y >= 0 && y < out_h) upsample_row(", "if (y >= 0 && y < out_h - 1) upsample_row("),),
             (f"{PATHS}::test_cff_cpu_path",), prefer="csrc/cpu/cascade_feature_fusion.cpp"),
    Mutation("cff-tap-first-channel-block-count", "CPU CFF tap-first: Co / 16 channel blocks, the partial one dropped",
             (("const int64_t blocks = (s.Co + kTapFirstChannels - 1) / kTapFirstChannels;",
               "const int64_t blocks = s.Co / kTapFirstChannels;"),),
             (f"{PATHS}::test_cff_cpu_path",), prefer="csrc/cpu/cascade_feature_fusion.cpp"),
    Mutation("cff-tap-first-ignores-dilation", "CPU CFF tap-first: the taps' row offset ignores the dilation",
             (("const int64_t ys = y + (ky - 1) * d;", "const int64_t ys = y + (ky - 1);"),),
             (f"{PATHS}::test_cff_cpu_path",), prefer="csrc/cpu/cascade_feature_fusion.cpp"),
    Mutation("cff-shortcut-bottom-row-else-if", "CPU CFF shortcut: row H-2 uncorrected where it is also row 1",
             (("        if (y == s.H - 2)\n", "        else if (y == s.H - 2)\n"),),
             (f"{PATHS}::test_cff_cpu_path",), prefer="csrc/cpu/cascade_feature_fusion.cpp"),
    Mutation("cff-shortcut-right-column-guard", "CPU CFF shortcut: column W-2 uncorrected on 3-wide maps",
             (("row[s.W - 2] += right[task * s.H + y];", "if (s.W > 3) row[s.W - 2] += right[task * s.H + y];"),),
             (f"{PATHS}::test_cff_cpu_path",), prefer="csrc/cpu/cascade_feature_fusion.cpp"),
    Mutation("cff-output-alias-ignores-dtype", "CPU CFF: 16-bit outputs written into the float32 projection",
             (("std::is_same_v<scalar_t, T> && proj.is_contiguous(format)", "proj.is_contiguous(format)"),),
             (f"{PATHS}::test_cff_cpu_path",), prefer="csrc/cpu/cascade_feature_fusion.cpp"),
    Mutation("winograd-output-transform-sign", "Winograd F(2x2, 3x3): a sign in A^T M flipped",
             (("r[1][j] = m1 - m2 - m3;", "r[1][j] = m1 - m2 + m3;"),),
             (f"{PATHS}::test_cff_cpu_path",), prefer="csrc/cpu/winograd_conv3x3.cpp"),
    Mutation("pyramid-expand-drops-row-tail", "CPU pyramid pooling: only whole groups of four rows written",
             (("for (int64_t h0 = 0; h0 < H; h0 += kRowsTogether) {",
               "for (int64_t h0 = 0; h0 + kRowsTogether <= H; h0 += kRowsTogether) {"),),
             (f"{PATHS}::test_pyramid_cpu_path",), prefer="csrc/cpu/pyramid_pool_sum.cpp"),
    Mutation("pyramid-strided-input-unit-stride", "CPU pyramid pooling: a strided input read as unit-stride",
             (("plane[h * W + w] = static_cast<T>(x[h * in_sh + w * in_sw]);",
               "plane[h * W + w] = static_cast<T>(x[h * in_sh + w]);"),),
             (f"{PATHS}::test_pyramid_cpu_path",), prefer="csrc/cpu/pyramid_pool_sum.cpp"),
    Mutation("pyramid-strided-output-unit-stride", "CPU pyramid pooling: a strided output written as unit-stride",
             (("yrow[w * out_sw] = static_cast<scalar_t>(orow[w]);", "yrow[w] = static_cast<scalar_t>(orow[w]);"),),
             (f"{PATHS}::test_pyramid_cpu_path",), prefer="csrc/cpu/pyramid_pool_sum.cpp"),
    Mutation("pyramid-adaptive-window-floor", "adaptive pooling windows end at floor, not ceil, of (i+1) L / n",
             (("return {(i * len) / n, ((i + 1) * len + n - 1) / n};",
               "return {(i * len) / n, ((i + 1) * len) / n};"),),
             (f"{PATHS}::test_pyramid_cpu_path",), prefer="csrc/common/pyramid_geometry.h"),
    Mutation("pyramid-adjoint-reduces-with-pool", "pyramid pooling's backward reduces with the pooling matrix",
             (("return d == PyramidDirection::kForward ? pool_weight<T>(g, axis, row, p) : interp_weight<T>(g, axis, "
               "row, p);", "return pool_weight<T>(g, axis, row, p);"),),
             (f"{PATHS}::test_pyramid_cpu_path",), prefer="csrc/common/pyramid_geometry.h"),
]

COMPILED = (".cpp", ".h", ".cu", ".cuh", ".txt")  # a change to these needs the extension rebuilt


def log(message: str):
    print(message, file=sys.stderr, flush=True)


class SetupError(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------------
# the copy

def checkout_files(source: Path, ref: str | None) -> dict[str, bytes]:
    """Path -> content of every file of the checkout: the working tree's tracked and unignored files, or
    those of commit `ref`."""
    if ref is not None:
        archive = subprocess.run(["git", "archive", "--format=tar", ref], cwd=source, check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=source,
                             check=True, capture_output=True).stdout.decode()
    files = {}
    for name in filter(None, listing.split("\0")):
        path = source / name
        if path.is_file():  # listed but deleted in the working tree: gone
            files[name] = path.read_bytes()
    return files


def sync_copy(files: dict[str, bytes], tree: Path):
    """Makes tree hold exactly `files`, rewriting only those whose content differs, so that an incremental
    build recompiles only what changed. Files of an earlier sync that are gone now are removed."""
    manifest = tree / ".mutation-check-files"
    previous = set(manifest.read_text().splitlines()) if manifest.exists() else set()
    written = 0
    for name, content in files.items():
        path = tree / name
        if not path.exists() or path.read_bytes() != content:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            written += 1
    for name in previous - set(files):
        (tree / name).unlink(missing_ok=True)
    manifest.write_text("\n".join(sorted(files)))
    log(f"copy: {written} of {len(files)} files written, {len(previous - set(files))} removed ({tree})")


def build(tree: Path, build_dir: Path, jobs: str, log_path: Path):
    """The extension for CPUs only, in place in the copy, with its own build folder."""
    env = {**os.environ, "ICNET_WITH_CUDA": "0", "MAX_JOBS": jobs}
    start = time.monotonic()
    with open(log_path, "w") as out:
        result = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "--build-temp",
                                 str(build_dir)], cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SetupError(f"build failed (log {log_path}):\n{tail}")
    log(f"build: {time.monotonic() - start:.0f} s")


def test_env(tree: Path) -> dict[str, str]:
    """The copy's packages ahead of any installed icnet_kernels / icnet on the path."""
    path = os.pathsep.join([str(tree), str(tree / "python"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path.rstrip(os.pathsep)}


def check_imports_from_copy(tree: Path):
    probe = ("import icnet, icnet_kernels, icnet_kernels._C as c; "
             "print(icnet.__file__); print(icnet_kernels.__file__); print(c.__file__); "
             "print(icnet_kernels.native_available())")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tree, env=test_env(tree), capture_output=True,
                            text=True)
    lines = result.stdout.split()
    if result.returncode != 0 or len(lines) != 4:
        raise SetupError(f"the copy's packages do not import:\n{result.stderr[-2000:]}")
    for found in lines[:3]:
        if not Path(found).resolve().is_relative_to(tree.resolve()):
            raise SetupError(f"the tests would import {found}, outside the copy {tree}")
    if lines[3] != "True":
        raise SetupError("the copy's extension does not load (icnet_kernels.native_available() is False)")


# ---------------------------------------------------------------------------------------------------------------
# planting

@dataclass
class Site:
    path: Path
    original_text: str
    mutated_text: str


def locate(mutation: Mutation, tree: Path, files: list[str]) -> Site:
    """Where the mutation's snippet is: its preferred file if it is there, else the one file holding it."""
    for original, mutated in mutation.snippets:
        holders = [name for name in files if original in (tree / name).read_text(errors="replace")]
        if not holders:
            continue
        name = mutation.prefer if mutation.prefer in holders else None
        if name is None and len(holders) > 1:
            raise SetupError(f"{mutation.name}: snippet {original!r} is in several files {holders}, none of them "
                             f"the preferred {mutation.prefer!r}")
        name = name or holders[0]
        text = (tree / name).read_text()
        if text.count(original) != 1:
            raise SetupError(f"{mutation.name}: snippet {original!r} occurs {text.count(original)} times in {name}")
        return Site(tree / name, text, text.replace(original, mutated))
    raise SetupError(f"{mutation.name}: none of its snippets is in the tree any more "
                     f"({[s for s, _ in mutation.snippets]}): update the mutation list")


@dataclass
class Outcome:
    mutation: Mutation
    site: str
    status: str  # killed / survived / build failed
    detail: str = ""
    seconds: float = 0.0
    killers: list[str] = field(default_factory=list)


def run_tests(tree: Path, tests: list[str], timeout: float, first_failure_only: bool, junit: Path):
    """(returncode or None on timeout, failing test ids, output tail)."""
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *tests]
    if first_failure_only:
        args.insert(4, "-x")
    junit.unlink(missing_ok=True)
    try:
        result = subprocess.run(args, cwd=tree, env=test_env(tree), capture_output=True, text=True, timeout=timeout,
                                start_new_session=True)
    except subprocess.TimeoutExpired as expired:
        return None, [], str(expired.stdout or "")[-2000:]
    failed = []
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    return result.returncode, failed, (result.stdout + result.stderr)[-8000:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=ROOT, help="the checkout to copy (default: this one)")
    parser.add_argument("--ref", help="copy this commit instead of the working tree")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "icnet-mutation-check",
                        help="where the copy and its build live, kept between runs")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations only")
    parser.add_argument("--tests", nargs="+", metavar="NODE", help="run these tests against every mutation "
                        "instead of each one's own")
    parser.add_argument("--all-failures", action="store_true", help="run every selected test, not up to the "
                        "first failure, and list every test that failed")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per test run (default 1200)")
    parser.add_argument("--jobs", default=str(os.cpu_count() or 1), help="parallel compile jobs")
    parser.add_argument("--json", type=Path, help="also write the outcomes, every failing test named, here")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)

    chosen = MUTATIONS
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTATIONS}
        if unknown:
            print(f"mutation_check: unknown mutation(s) {sorted(unknown)}; see --list", file=sys.stderr)
            return 2
        chosen = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name}\t{m.bug}\t{' '.join(m.tests)}")
        return 0
    try:
        return run(args, chosen)
    except (SetupError, subprocess.CalledProcessError) as error:
        print(f"mutation_check: {error}", file=sys.stderr)
        return 2


def run(args, chosen: list[Mutation]) -> int:
    start = time.monotonic()
    tree, build_dir = args.workdir / "tree", args.workdir / "build"
    tree.mkdir(parents=True, exist_ok=True)
    files = checkout_files(args.source.resolve(), args.ref)
    sync_copy(files, tree)
    # library code anywhere in the tree; not the tests, nor this script (it holds every snippet)
    sources = sorted(name for name in files if name.endswith((".py", *COMPILED)) and not name.startswith("tests/")
                     and name != Path(__file__).resolve().relative_to(ROOT).as_posix())
    sites = {m.name: locate(m, tree, sources) for m in chosen}  # every snippet found before anything runs
    build_log = args.workdir / "build.log"
    build(tree, build_dir, args.jobs, build_log)
    check_imports_from_copy(tree)
    tests_of = {m.name: list(args.tests or m.tests) for m in chosen}
    baseline = sorted({t.split("::")[0] for tests in tests_of.values() for t in tests})
    log(f"baseline: {' '.join(baseline)} on the unmutated copy")
    code, failed, tail = run_tests(tree, baseline, args.timeout, False, args.workdir / "junit.xml")
    if code != 0:
        raise SetupError(f"the unmutated copy fails its tests ({failed or 'timeout'}):\n{tail}")
    log(f"baseline: passed ({time.monotonic() - start:.0f} s so far)")

    # Python mutations first: they run on the clean build, which a restored C++ mutation leaves stale
    order = sorted(chosen, key=lambda m: sites[m.name].path.suffix in COMPILED)
    outcomes = []
    for i, m in enumerate(order, 1):
        site = sites[m.name]
        compiled = site.path.suffix in COMPILED
        where = str(site.path.relative_to(tree))
        log(f"[{i}/{len(order)}] {m.name}: {where}")
        t0 = time.monotonic()
        site.path.write_text(site.mutated_text)
        try:
            if compiled:
                try:
                    build(tree, build_dir, args.jobs, build_log)
                except SetupError as error:
                    outcomes.append(Outcome(m, where, "build failed", str(error).splitlines()[0],
                                            time.monotonic() - t0))
                    continue
            code, failed, tail = run_tests(tree, tests_of[m.name], args.timeout, not args.all_failures,
                                           args.workdir / "junit.xml")
        finally:
            site.path.write_text(site.original_text)
        if code is None:
            outcome = Outcome(m, where, "killed", f"timeout after {args.timeout:.0f} s")
        elif code == 0:
            outcome = Outcome(m, where, "survived")
        elif failed:
            outcome = Outcome(m, where, "killed", killers=failed)
        elif code < 0:  # no report from pytest: name the test from the fault handler's traceback
            in_test = re.findall(r'File "[^"]*tests/[^"]+", line \d+ in (test_\w+)', tail)
            outcome = Outcome(m, where, "killed", f"crashed (signal {-code})"
                              + (f" in {in_test[-1]}" if in_test else ""))
        else:
            outcome = Outcome(m, where, "killed", f"pytest exit {code}: {tail.strip().splitlines()[-1:]}")
        outcome.seconds = time.monotonic() - t0
        outcomes.append(outcome)
        log(f"    {outcome.status} in {outcome.seconds:.0f} s {outcome.killers[:1] or outcome.detail}")

    seconds = time.monotonic() - start
    report(outcomes, seconds)
    if args.json:
        args.json.write_text(json.dumps({"seconds": round(seconds), "source": str(args.source), "ref": args.ref,
                                         "outcomes": [{"mutation": o.mutation.name, "bug": o.mutation.bug,
                                                       "file": o.site, "status": o.status, "detail": o.detail,
                                                       "seconds": round(o.seconds), "failed_tests": o.killers}
                                                      for o in outcomes]}, indent=1))
    return 0 if all(o.status == "killed" for o in outcomes) else 1


def report(outcomes: list[Outcome], seconds: float):
    print("| mutation | file | bug | result | by |")
    print("|---|---|---|---|---|")
    for o in outcomes:
        shown = [k.split("::", 1)[-1] for k in o.killers[:3]]
        more = f" (+{len(o.killers) - 3} more)" if len(o.killers) > 3 else ""
        by = "<br>".join(shown) + more if o.killers else o.detail
        print(f"| {o.mutation.name} | {o.site} | {o.mutation.bug} | {o.status} ({o.seconds:.0f} s) | {by} |")
    killed = sum(o.status == "killed" for o in outcomes)
    print(f"\n{killed} of {len(outcomes)} mutations killed; "
          f"survived: {[o.mutation.name for o in outcomes if o.status == 'survived'] or 'none'}; "
          f"build failed: {[o.mutation.name for o in outcomes if o.status == 'build failed'] or 'none'}; "
          f"{seconds / 60:.1f} min in all")


if __name__ == "__main__":
    sys.exit(main())
