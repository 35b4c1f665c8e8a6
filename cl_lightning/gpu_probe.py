"""Keep PyTorch's CUDA availability check cheap on machines without an NVIDIA driver.

Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` at import, so that asking whether CUDA is
available never initialises CUDA before worker processes fork. With that setting every
``torch.cuda.is_available()`` tries to load the NVML library first, and when there is no
driver the failed load is repeated on every call: PyTorch's Adam-family optimizers ask once
per step. On a machine without the driver there is nothing for the check to protect (no GPU
can be initialised), so the setting is dropped there and the runtime's own device count,
which answers in about a microsecond, is used instead. Where the driver is installed nothing
changes.
"""

from __future__ import annotations

import ctypes
import os

NVML_CHECK_ENV = "PYTORCH_NVML_BASED_CUDA_CHECK"
NVML_LIBRARY = "libnvidia-ml.so.1"


def nvidia_driver_present() -> bool:
    """Whether the NVIDIA management library (installed with the driver) can be loaded."""
    try:
        ctypes.CDLL(NVML_LIBRARY)
    except OSError:
        return False
    return True


def keep_cuda_check_cheap() -> bool:
    """Drop the NVML-based CUDA check where no driver is installed; return whether it was
    dropped. Call once per process, after Lightning is imported."""
    if os.environ.get(NVML_CHECK_ENV) != "1" or nvidia_driver_present():
        return False
    del os.environ[NVML_CHECK_ENV]
    return True
