"""Part env, and the peers' wheels: versions, the GPU, which peers import; ``pip --target`` of ``.whl/``."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from .config import REPO, Config, GiB, fastpref

WHEEL_DIR = REPO / ".whl"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def install_wheels(folder: Path, log: Callable[[str], None]) -> dict:
    """``pip install --no-index --no-deps --target <tmp>`` of every wheel in ``folder``; lists the
    requirements of those wheels that nothing installed satisfies (what to fetch next time)."""
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        return {"status": "none", "note": f"no wheels in {folder}: peers come from this environment"}
    site = tempfile.mkdtemp(prefix="fastpref-gpu-site-")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--target", site, *map(str, wheels)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    failed = {}
    if done.returncode != 0:  # pip installs all or nothing: then one at a time, to keep what works
        log(done.stdout + done.stderr)
        for wheel in wheels:
            one = subprocess.run(cmd[:-len(wheels)] + [str(wheel)], capture_output=True, text=True, timeout=120)
            if one.returncode != 0:
                failed[wheel.name] = (one.stderr or one.stdout).strip()[-500:]
    info = {"folder": str(folder), "site": site, "wheels": [w.name for w in wheels if w.name not in failed],
            "seconds": round(time.perf_counter() - start, 1)}
    if failed:
        info["failed"] = failed
    status = "ok" if not failed else "partial" if len(failed) < len(wheels) else "failed"
    return {**info, "status": status, "unmet_requirements": unmet_requirements(site)}


def unmet_requirements(site: str) -> list[str]:
    """Requirements (no extras) of the distributions in ``site`` that neither it nor this Python satisfies."""
    from importlib import metadata

    from packaging.requirements import Requirement

    installed = {}
    for dist in metadata.distributions(path=[site] + sys.path):
        installed.setdefault(_normalise(dist.metadata["Name"]), dist.version)
    unmet = []
    for dist in metadata.distributions(path=[site]):
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = installed.get(_normalise(req.name))
            if have is None:
                unmet.append(f"{dist.metadata['Name']} needs {req} (not installed)")
            elif req.specifier and not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{dist.metadata['Name']} needs {req} (have {have})")
    return unmet


PEER_MODULES = {"trl": "trl", "liger-kernel": "liger_kernel", "cut-cross-entropy": "cut_cross_entropy",
                "datasets": "datasets", "accelerate": "accelerate", "transformers": "transformers", "peft": "peft"}


def environment(cfg: Config) -> dict:
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": version("triton"), "fastpref_backends": fastpref.backends(),
            "torch_linear_cross_entropy": hasattr(torch.nn.functional, "linear_cross_entropy"),
            "allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    peers = {}
    for dist, module in PEER_MODULES.items():
        try:
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"no module {module}")
            if not cfg.dry:  # --dry only looks: importing them all takes seconds on a small CPU
                importlib.import_module(module)
            peers[dist] = version(dist) or "?"
        except Exception as error:  # noqa: BLE001 - a broken peer is a finding, not a crash
            peers[dist] = f"not importable: {type(error).__name__}: {str(error)[:200]}"
    info["peers"] = peers
    site = next((p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if "fastpref-gpu-site-" in p), None)
    if site:
        info["from_wheels"] = {d.metadata["Name"]: d.version for d in metadata.distributions(path=[site])}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sm_count=props.multi_processor_count,
                    gpu_memory_GiB=round(props.total_memory / GiB, 1),
                    capability=f"{props.major}.{props.minor}")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    elif not cfg.dry:
        return {"status": "failed", "error": "no CUDA device visible (use --dry on a machine without a GPU)", **info}
    return info
