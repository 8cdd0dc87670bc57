"""Build script: pyproject.toml holds the metadata; this file adds the C++ CPU kernels (csrc/).

The kernels are a PyTorch C++ extension, ``fastpref.ops._cpu_rows``, compiled with ninja. A torch
extension only loads with the torch it was built against, so it is compiled against the torch of the
environment fastpref is installed into: ``pip install -e .`` and ``pip install .`` both work, with
or without ``--no-build-isolation`` (run.sh uses it). torch is deliberately not a build requirement:
pip would put the newest release into the isolated build environment, not the installed one.

``FASTPREF_BUILD_CPP`` decides what happens when the kernels cannot be built:

* unset or ``auto``: build them; if that is impossible (torch not installed, no C++ compiler, a
  compile error), install fastpref without them and print why (``pip -v`` shows it). fastpref
  then uses its PyTorch row kernels on CPU and warns once at run time (``fastpref.backends()``).
* ``1``: build them or fail the install.
* ``0``: do not build them.
"""

import os
import site
import sys

from setuptools import setup

EXTENSION = "fastpref.ops._cpu_rows"
SOURCES = ["csrc/extension.cpp", "csrc/rows_isa.cpp"]
HEADERS = ["csrc/rows.h", "csrc/rows_kernels.inc"]
# No -march: the binary must run on any x86-64; rows_isa.cpp adds AVX2 / AVX-512 variants itself.
# -fno-trapping-math lets the compiler vectorise the selects in the kernels (no code here reads FP
# exception flags); -ffp-contract=fast lets it use FMA where the target has it.
UNIX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math"]
MSVC_FLAGS = ["/O2", "/openmp:experimental"]


def _say(message: str) -> None:
    print(f"fastpref setup.py: {message}", file=sys.stderr)


def _ninja_on_path() -> None:
    """Put the `ninja` pip package's binary on PATH: pip runs this script without activating the venv."""
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _import_cpp_extension():
    """``torch.utils.cpp_extension`` of the torch that fastpref will run with.

    Under pip's build isolation, torch is not on sys.path, but the interpreter is still the one of
    the target environment: its site-packages (hidden by the isolation) hold the installed torch.
    """
    try:
        from torch.utils import cpp_extension
    except ImportError:
        sys.path.extend(p for p in site.getsitepackages() if os.path.isdir(os.path.join(p, "torch")))
        from torch.utils import cpp_extension
    return cpp_extension


def _cpp_extension() -> dict:
    """setup() arguments that build the kernels, or {} when they are not to be (or cannot be) built."""
    mode = os.environ.get("FASTPREF_BUILD_CPP", "auto").strip().lower()
    if mode == "0":
        return {}
    required = mode == "1"
    skipped = "installing without the C++ CPU kernels (fastpref will use its PyTorch row kernels)"
    try:
        cpp_extension = _import_cpp_extension()
    except ImportError as err:
        if required:
            raise SystemExit(f"fastpref: FASTPREF_BUILD_CPP=1 but torch is not installed here ({err})")
        _say(f"torch is not installed here ({err}); {skipped}.")
        return {}
    BuildExtension, CppExtension = cpp_extension.BuildExtension, cpp_extension.CppExtension

    class BuildKernels(BuildExtension):
        def build_extensions(self) -> None:
            try:
                super().build_extensions()
            except Exception as err:  # no compiler, a compile error, ...: the package works without the kernels
                if required:
                    raise
                _say(f"building {EXTENSION} failed ({type(err).__name__}: {err}); {skipped}.")
                self.extensions = []  # nothing to copy into the package

    _ninja_on_path()
    flags = MSVC_FLAGS if os.name == "nt" else UNIX_FLAGS
    extension = CppExtension(
        EXTENSION,
        SOURCES,
        depends=HEADERS,
        extra_compile_args=flags,
        extra_link_args=[] if os.name == "nt" else ["-fopenmp"],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildKernels}}


setup(**_cpp_extension())
