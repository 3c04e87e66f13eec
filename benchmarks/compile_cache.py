"""torch.compile's cache artifacts kept with the results, so that max-autotune compiles once per GPU model,
torch and Triton version rather than on every run.

A cache file is a zip archive: meta.json (the environment it was made in) and the blobs that
torch.compiler.save_cache_artifacts returned, each loaded back with torch.compiler.load_cache_artifacts.
Loading only fills the compiler's own on-disk caches: the compile mode and settings stay what the runner
asks for, so a hit gives the program those settings compile, autotuning choices included. A file made
elsewhere (another GPU model, torch or Triton) is left unread and replaced by the next save.
"""

import hashlib
import io
import json
import logging
import zipfile
from importlib import metadata
from pathlib import Path

import torch

from benchmarks import report

log = logging.getLogger("benchmarks")
META = "meta.json"
# The device tool returns files of up to 16 MiB: the oldest blobs give way to the newest beyond that.
MAX_BYTES = 15 * 2**20
# The set this process last saved to each file. torch's serializer is cumulative within a process: each
# save_cache_artifacts() returns everything compiled so far, so a later set holds the earlier one and
# replaces it rather than joining it.
_SAVED_BY_THIS_PROCESS: dict[Path, bytes] = {}


def environment(device: torch.device) -> dict:
    """What a cache's artifacts are valid for."""
    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = None
    return {"device": report.device_name(device), "torch": torch.__version__, "triton": triton,
            "cuda": torch.version.cuda}


def read_blobs(path: Path, device: torch.device) -> tuple[list[bytes], str]:
    """(the blobs of path, why) when path was made in this environment, else ([], why not)."""
    if not path.exists():
        return [], f"no cache file {path.name}"
    try:
        with zipfile.ZipFile(path) as archive:
            made_for = json.loads(archive.read(META))
            if made_for != environment(device):
                return [], f"made for {made_for}, not {environment(device)}"
            return [archive.read(name) for name in sorted(archive.namelist()) if name != META], "same environment"
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        return [], f"unreadable ({type(exc).__name__}: {exc})"


def load(path: Path, device: torch.device) -> dict:
    """Loads path's artifacts into the compiler's caches when they were made in this environment; returns a
    record of what happened for the results' meta."""
    blobs, why = read_blobs(path, device)
    loaded = 0
    for blob in blobs:
        try:
            loaded += torch.compiler.load_cache_artifacts(blob) is not None
        except Exception as exc:  # a set this torch cannot read only costs its compile time
            why = f"a set failed to load ({type(exc).__name__}: {exc})"
    log.info("compile cache %s: %d of %d artifact sets loaded (%s)", path, loaded, len(blobs), why)
    return {"file": path.name, "loaded_sets": loaded, "sets": len(blobs), "reason": why}


def save(path: Path, device: torch.device) -> dict:
    """Adds the artifacts compiled in this process to path, in place of the set this process saved there
    before (rewritten whole, so a run killed meanwhile leaves the previous file)."""
    blobs, _ = read_blobs(path, device)
    try:
        new = torch.compiler.save_cache_artifacts()
    except Exception as exc:  # the measurements matter more than the cache: record why and go on
        log.warning("compile cache: saving failed: %s: %s", type(exc).__name__, exc)
        return {"file": path.name, "error": f"{type(exc).__name__}: {exc}"}
    if new is not None and new[0] not in blobs:
        earlier = _SAVED_BY_THIS_PROCESS.get(path.resolve())
        if earlier in blobs:
            blobs.remove(earlier)
        blobs.append(new[0])
        _SAVED_BY_THIS_PROCESS[path.resolve()] = new[0]
    while len(blobs) > 1 and sum(map(len, blobs)) > MAX_BYTES:
        blobs.pop(0)
    if not blobs:
        return {"file": path.name, "sets": 0, "bytes": 0}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(META, json.dumps(environment(device)))
        for index, blob in enumerate(blobs):  # named in the order they were made
            archive.writestr(f"{index:03d}-{hashlib.sha256(blob).hexdigest()[:16]}.bin", blob)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_bytes(buffer.getvalue())
    partial.replace(path)
    return {"file": path.name, "sets": len(blobs), "bytes": path.stat().st_size}
