"""Checkpoint files that a crash cannot destroy, and clear errors for unreadable ones.

:class:`AtomicCheckpointIO` is the Lightning ``CheckpointIO`` plugin every checkpoint of a
run goes through (``trainer.save_checkpoint``, so task-end, epoch-end, interrupt and user
saves alike; :class:`~callbacks.checkpoint.TaskCheckpoint` installs it). A save serialises
the checkpoint to memory, writes it to a temporary file in the target's directory, flushes
and fsyncs it, then renames it over the target with ``os.replace`` (atomic on POSIX and
Windows for a file on one filesystem) and fsyncs the directory. A crash or a full disk
during the save leaves the previous file as it was, plus at most a ``.tmp`` file that the
next save replaces.

Loading turns the unpickling/zip errors of a truncated or corrupted file into a message
that names the file and the way out.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cl_lightning.checks import MissingFileError, UsageError

__all__ = ["AtomicCheckpointIO", "UnreadableCheckpointError", "atomic_write_bytes"]


class UnreadableCheckpointError(UsageError, ValueError):
    """A checkpoint file exists but cannot be read (truncated, corrupted, not a checkpoint)."""


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old or its new content.

    The bytes go to a temporary file in the same directory (same filesystem, so the rename
    is atomic), which is fsynced and then renamed over ``path``; the directory is fsynced so
    the rename itself survives a power loss. On any error the temporary file is removed and
    ``path`` is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; give the usual 0666 & ~umask
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _to_cpu(storage: Any, location: Any) -> Any:
    return storage  # TorchCheckpointIO's default map_location


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic local writes and readable load errors.

    Remote paths (``s3://`` and other fsspec protocols) fall back to Lightning's own
    writer: object stores replace an object atomically on upload anyway.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "AtomicCheckpointIO.save_checkpoint does not take storage_options; "
                "use a custom CheckpointIO plugin to pass them"
            )
        path = str(path)
        if "://" in path:
            super().save_checkpoint(checkpoint, path)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getbuffer())

    def load_checkpoint(self, path: _PATH, map_location: Any | None = _to_cpu,
                        weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location,
                                           weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as err:  # zip/pickle/EOF errors of a damaged file
            if not os.path.isfile(str(path)):
                raise
            raise UnreadableCheckpointError(unreadable_message(str(path), err)) from err


def check_readable_checkpoint(path: str) -> None:
    """Fail with a one-line message if ``path`` is missing or not a readable checkpoint
    (memory-mapped, so a large file is not read into memory)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"ckpt_path: no file {path}; give the path of a .ckpt file, "
                               "or 'last' to resume the newest run of this experiment")
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # zip/pickle/EOF errors of a damaged file
        raise UnreadableCheckpointError(unreadable_message(path, err)) from err


def unreadable_message(path: str, err: BaseException) -> str:
    """The message for a checkpoint file that cannot be read: what, why, what to do."""
    directory = os.path.dirname(os.path.abspath(path))
    others = sorted(f for f in os.listdir(directory)
                    if f.endswith(".ckpt") and f != os.path.basename(path))
    hint = (f" Other checkpoints in {directory}: {', '.join(others)}; pass one with "
            "--ckpt_path PATH." if others else "")
    why = str(err).split(". ")[0][:120]
    return (
        f"--ckpt_path {path}: the file is not a readable checkpoint "
        f"({os.path.getsize(path)} bytes; {type(err).__name__}: {why}). It is "
        "truncated or corrupted (for example copied while being written, or written by a "
        "version without atomic saves)." + hint +
        " Or start a new run without --ckpt_path."
    )
