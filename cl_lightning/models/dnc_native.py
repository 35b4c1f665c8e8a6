"""The DNC's C++ kernels, built on first use (``DNC(cpp_kernels="auto" | "link" | "step")``).

Sources, next to this file: ``dnc_link.h`` (the link step of one sample: update and both
directional reads in one pass over its ``N x N`` link, their gradients in one more, where
the PyTorch path makes about 24 passes), ``dnc_link.cpp`` (that step over a batch, behind
:func:`~cl_lightning.models.dnc_kernels.fused_link_read`), ``dnc_memory_step.cpp`` (a
whole memory step with one write head, behind
:func:`~cl_lightning.models.dnc_kernels.fused_memory_step`), ``dnc_time_step.cpp`` (a whole
time step: the LSTM controller and the interface layer around that memory step, behind
:func:`~cl_lightning.models.dnc_kernels.fused_time_step`), ``dnc_sequence.cpp`` (those time
steps over a whole sequence, behind :func:`~cl_lightning.models.dnc_kernels.fused_sequence`)
and ``dnc_native_module.cpp`` (the Python module). The math is in each source's header;
values and gradients equal the reference functions of
:mod:`~cl_lightning.models.dnc_addressing` and the DNC's own PyTorch step to float rounding
(``tests/test_dnc_native.py``).

The first call compiles the sources with ``torch.utils.cpp_extension`` (GCC or Clang and
``ninja`` on the path; about 20 s on two cores) into torch's extension cache
(``TORCH_EXTENSIONS_DIR``, by default under ``~/.cache``); later runs load the cached
library in about a second. The build is specific to the CPU's vector instruction set,
which is part of the library's name.
"""

from __future__ import annotations

import functools
import subprocess
import warnings
from pathlib import Path
from types import ModuleType

import torch

from cl_lightning.checks import OptionError

SOURCES = [Path(__file__).with_name(name) for name in (
    "dnc_native_module.cpp", "dnc_link.cpp", "dnc_memory_step.cpp", "dnc_time_step.cpp",
    "dnc_sequence.cpp")]
OPTION = "model.net.init_args.dnc.cpp_kernels"


def build_flags(capability: str) -> list[str]:
    """Compiler flags for torch's CPU capability (``torch.backends.cpu.get_cpu_capability``):
    AVX2 and FMA where the CPU has them (every AVX-512 CPU does), the baseline otherwise."""
    flags = ["-O3", "-fopenmp"]
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


@functools.cache
def load() -> ModuleType:
    """The compiled extension (built or loaded from the cache once per process).

    Raises:
        BuildFailed: the extension cannot be built here (no compiler or ``ninja``).
    """
    capability = torch.backends.cpu.get_cpu_capability()
    from torch.utils import cpp_extension

    try:
        return cpp_extension.load(
            name=f"cl_lightning_dnc_{capability.lower()}",
            sources=[str(path) for path in SOURCES],
            extra_cflags=build_flags(capability),
        )
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as err:
        raise BuildFailed(failure_reason(err)) from None


class BuildFailed(OptionError):
    """The kernels cannot be built here; ``reason`` is the line of the build that says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"{OPTION} needs GCC or Clang and ninja (pip install ninja) to build its "
            f"kernels, which failed here ({reason}); use {OPTION} none or auto")
        self.reason = reason


def failure_reason(err: BaseException) -> str:
    """The line of a failed build that says why: the compiler's first error, else the
    message's first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    errors = [line for line in lines if ": error:" in line or "fatal error" in line]
    return (errors or lines or [type(err).__name__])[0]


@functools.cache
def available() -> bool:
    """Whether the extension builds (or loads) here; the first failure warns once, in one
    line, that the DNC runs in PyTorch (``cpp_kernels: auto``)."""
    try:
        load()
    except BuildFailed as err:
        warnings.warn(f"{OPTION} auto: the C++ kernels cannot be built here ({err.reason}); "
                      "the DNC runs in PyTorch", stacklevel=3)
        return False
    return True


def usable(state: torch.Tensor) -> bool:
    """Whether the kernels serve a DNC state tensor (the link, the memory) like this one:
    on a CPU, in float32 or float64."""
    return state.device.type == "cpu" and state.dtype in (torch.float32, torch.float64)
