"""The DNC's link step as a C++ kernel (``dnc_link.cpp``), built on first use.

:func:`~cl_lightning.models.dnc_kernels.fused_link_read` runs it on a CPU when a DNC has
``link_kernel="cpp"``: the link update and both directional reads in one pass over each
``N x N`` link matrix, and their gradients in one more, where the ATen path makes about 24
passes. The math is in the source's header; values and gradients equal the ATen path's to
float rounding (``tests/test_dnc_link_native.py``).

The first call compiles the source with ``torch.utils.cpp_extension`` (a C++ compiler and
``ninja`` on the path; about half a minute) into torch's extension cache
(``TORCH_EXTENSIONS_DIR``, by default under ``~/.cache``); later runs load the cached
library in about a second. The build is specific to the CPU's vector instruction set, which
is part of the library's name.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from types import ModuleType

import torch

from cl_lightning.checks import OptionError

SOURCE = Path(__file__).with_name("dnc_link.cpp")
OPTION = "model.net.init_args.dnc.link_kernel"


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
        OptionError: the extension cannot be built here (no compiler or ``ninja``).
    """
    capability = torch.backends.cpu.get_cpu_capability()
    from torch.utils import cpp_extension

    try:
        return cpp_extension.load(
            name=f"cl_lightning_dnc_link_{capability.lower()}",
            sources=[str(SOURCE)],
            extra_cflags=build_flags(capability),
        )
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OptionError(
            f"{OPTION} cpp needs a C++ compiler and ninja (pip install ninja) to build its "
            f"kernel, which failed here ({first_line}); use {OPTION} aten") from None


def usable(link: torch.Tensor) -> bool:
    """Whether the kernel serves this link tensor (CPU, float32 or float64)."""
    return link.device.type == "cpu" and link.dtype in (torch.float32, torch.float64)
