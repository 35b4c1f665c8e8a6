"""The CUDA availability check stays cheap without an NVIDIA driver, unchanged with one."""

import ctypes

import pytest
import torch

from cl_lightning import gpu_probe
from cl_lightning.gpu_probe import NVML_CHECK_ENV, keep_cuda_check_cheap


def _no_driver(name, *args, **kwargs):
    raise OSError(f"{name}: cannot open shared object file")


def test_without_a_driver_the_nvml_check_is_dropped(monkeypatch):
    monkeypatch.setenv(NVML_CHECK_ENV, "1")
    monkeypatch.setattr(gpu_probe.ctypes, "CDLL", _no_driver)
    before = torch.cuda.is_available()
    assert keep_cuda_check_cheap()
    assert NVML_CHECK_ENV not in gpu_probe.os.environ
    assert torch.cuda.is_available() == before  # the same answer, by the runtime's count


def test_with_a_driver_the_setting_is_kept(monkeypatch):
    monkeypatch.setenv(NVML_CHECK_ENV, "1")
    monkeypatch.setattr(gpu_probe.ctypes, "CDLL", lambda name, *a, **k: object())
    assert not keep_cuda_check_cheap()
    assert gpu_probe.os.environ[NVML_CHECK_ENV] == "1"


@pytest.mark.parametrize("value", [None, "0"])
def test_a_setting_lightning_did_not_make_is_left_alone(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(NVML_CHECK_ENV, raising=False)
    else:
        monkeypatch.setenv(NVML_CHECK_ENV, value)
    monkeypatch.setattr(gpu_probe.ctypes, "CDLL", _no_driver)
    assert not keep_cuda_check_cheap()
    assert gpu_probe.os.environ.get(NVML_CHECK_ENV) == value


def test_driver_probe_matches_loading_the_library():
    try:
        ctypes.CDLL(gpu_probe.NVML_LIBRARY)
        loadable = True
    except OSError:
        loadable = False
    assert gpu_probe.nvidia_driver_present() == loadable
