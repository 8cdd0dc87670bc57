"""Download the peer wheels the GPU check needs into ``.whl/`` (git-ignored; it travels with the checkout).

The GPU machine has its own python3 (3.12, manylinux x86_64, torch + triton + transformers + accelerate)
and no package registry. ``benchmarks/gpu_check.py`` installs what is in ``.whl/`` there with
``pip install --no-index --no-deps --target <tmp>``, so every package it needs that the image lacks is
named here explicitly, at the version the local test suite runs against:

    python benchmarks/fetch_gpu_wheels.py            # into .whl/ at the repository root
    python benchmarks/fetch_gpu_wheels.py --check    # also compare the pins with this environment
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DEST = REPO / ".whl"

# The peers the check compares against, and what they need that the GPU image does not have.
WHEELS = {
    "liger-kernel": "0.8.5",
    "trl": "1.16.0",
    "cut-cross-entropy": "25.1.1",
    "datasets": "5.2.0",  # trl needs it
    "dill": "0.4.1",  # datasets needs it
    "multiprocess": "0.70.19",  # datasets needs it
}
PYTHON_VERSION = "3.12"
# pip matches each manylinux tag exactly; these cover pure-Python wheels and the common binary ones.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
MAX_BYTES = 16 * 2**20  # the checkout travels within 64 MiB, wheels included


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_version(path: Path) -> tuple[str, str]:
    """(normalised distribution name, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return normalise(name), version


def download(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    cmd += [f"{name}=={version}" for name, version in WHEELS.items()]
    subprocess.run(cmd, check=True)
    # One version of each: two wheels of one package stop the whole install on the GPU machine.
    wanted = {normalise(name): version for name, version in WHEELS.items()}
    kept = []
    for path in sorted(dest.glob("*.whl")):
        name, version = wheel_name_version(path)
        if name in wanted and version != wanted[name]:
            print(f"removing stale {path.name}")
            path.unlink()
        elif name not in wanted:
            print(f"note: {path.name} is not in the list (left in place)")
            kept.append(path)
        else:
            kept.append(path)
    missing = set(wanted) - {wheel_name_version(p)[0] for p in kept}
    if missing:
        raise SystemExit(f"no wheel downloaded for {sorted(missing)}")
    return kept


def check_pins() -> list[str]:
    """Pins that differ from the versions installed in this environment (the local test suite's)."""
    out = []
    for name, version in WHEELS.items():
        try:
            local = metadata.version(name)
        except metadata.PackageNotFoundError:
            local = None
        if local != version:
            out.append(f"{name}: pinned {version}, installed here {local or 'not installed'}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="wheel folder (default: .whl/)")
    parser.add_argument("--check", action="store_true", help="compare the pins with this environment")
    args = parser.parse_args(argv)
    if args.check:
        for line in check_pins():
            print("pin differs:", line)
    wheels = download(args.dest)
    total = sum(p.stat().st_size for p in wheels)
    for path in wheels:
        print(f"{path.stat().st_size / 2**20:8.2f} MiB  {path.name}")
    print(f"{total / 2**20:8.2f} MiB  in {len(wheels)} wheels under {args.dest}")
    if total > MAX_BYTES:
        print(f"more than {MAX_BYTES // 2**20} MiB: the checkout may not travel", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
