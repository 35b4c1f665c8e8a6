"""Image streams on tiny files in each dataset's real on-disk format (no network, no real data).

MNIST: IDX files under ``<root>/MNIST/raw``; CIFAR: the python pickles (torchvision's md5
check is switched off for these synthetic files by a test-only subclass); Tiny-ImageNet:
the official folder layout with tiny JPEGs.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from urllib.error import URLError

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100

from cl_lightning.cli import main
from cl_lightning.plugins import LearnerPlugin, StepOutput
from datamodules import (
    DatasetNotFoundError,
    PermutedMNIST,
    RotatedMNIST,
    SplitCIFAR10,
    SplitCIFAR100,
    SplitMNIST,
    SplitTinyImageNet,
)
from datamodules.augment import random_crop_flip
from datamodules.mnist import rotate_uint8
from datamodules.vision import ImageTensorDataset
from tests.conftest import QUIET_CPU, ROOT, refused, tensorboard_logger

# ----- tiny datasets in their real formats ----------------------------------------------------


def balanced_labels(n_classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(n_classes), per_class)).astype(np.uint8)


def write_idx(path: str, array: np.ndarray) -> None:
    """IDX (LeCun) file of uint8: magic 0x00 0x00 0x08 ndim, big-endian int32 dims, data."""
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 + array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(root: str, train_per_class: int = 20, test_per_class: int = 5) -> dict:
    rng = np.random.default_rng(0)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw)
    out = {}
    for split, prefix, per_class in [("train", "train", train_per_class),
                                     ("test", "t10k", test_per_class)]:
        y = balanced_labels(10, per_class, rng)
        x = rng.integers(0, 256, (len(y), 28, 28), dtype=np.uint8)
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), x)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), y)
        out[split] = (torch.from_numpy(x), torch.from_numpy(y).long())
    return out


def write_cifar(root: str, hundred: bool, train_per_class: int, test_per_class: int) -> dict:
    rng = np.random.default_rng(1)
    n_classes = 100 if hundred else 10
    folder = os.path.join(root, "cifar-100-python" if hundred else "cifar-10-batches-py")
    os.makedirs(folder)
    label_key = "fine_labels" if hundred else "labels"

    def dump(name, obj):
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(obj, f, protocol=2)

    out = {}
    for split, per_class in [("train", train_per_class), ("test", test_per_class)]:
        y = balanced_labels(n_classes, per_class, rng)
        x = rng.integers(0, 256, (len(y), 3 * 32 * 32), dtype=np.uint8)  # CHW rows
        out[split] = (torch.from_numpy(x).view(-1, 3, 32, 32), torch.from_numpy(y).long())
        if hundred:
            dump(split, {"data": x, "fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist()})
        elif split == "test":
            dump("test_batch", {"data": x, "labels": y.tolist()})
        else:
            for i, part in enumerate(np.array_split(np.arange(len(y)), 5), 1):
                dump(f"data_batch_{i}", {"data": x[part], label_key: y[part].tolist()})
    if hundred:
        dump("meta", {"fine_label_names": [f"c{i}" for i in range(100)],
                      "coarse_label_names": [f"s{i}" for i in range(20)]})
    else:
        dump("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return out


class UncheckedCIFAR10(CIFAR10):
    """torchvision's CIFAR-10 reader without the md5 check (the tiny files are synthetic)."""

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class UncheckedCIFAR100(CIFAR100):
    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


@pytest.fixture
def unchecked_cifar(monkeypatch):
    monkeypatch.setattr(SplitCIFAR10, "dataset_cls", UncheckedCIFAR10)
    monkeypatch.setattr(SplitCIFAR100, "dataset_cls", UncheckedCIFAR100)


WNIDS = [f"n{1000 + 7 * i:08d}" for i in range(200)][::-1]  # wnids.txt is not sorted


def write_tiny(root: str, train_per_class: int = 2, val_per_class: int = 1) -> None:
    rng = np.random.default_rng(2)
    base = os.path.join(root, "tiny-imagenet-200")
    os.makedirs(os.path.join(base, "val", "images"))
    with open(os.path.join(base, "wnids.txt"), "w") as f:
        f.write("\n".join(WNIDS) + "\n")

    def jpeg(path, grey=False):
        arr = rng.integers(0, 256, (64, 64) if grey else (64, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(path, quality=95)

    for c, wnid in enumerate(WNIDS):
        images = os.path.join(base, "train", wnid, "images")
        os.makedirs(images)
        for i in range(train_per_class):
            jpeg(os.path.join(images, f"{wnid}_{i}.JPEG"), grey=(c == 0 and i == 0))
        with open(os.path.join(base, "train", wnid, f"{wnid}_boxes.txt"), "w") as f:
            f.write("".join(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(train_per_class)))
    lines = []
    for k in range(val_per_class * 200):
        wnid = WNIDS[(k * 37) % 200]
        jpeg(os.path.join(base, "val", "images", f"val_{k}.JPEG"))
        lines.append(f"val_{k}.JPEG\t{wnid}\t1\t2\t60\t61\n")
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        f.writelines(lines)


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mnist"))
    return root, write_mnist(root)


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cifar10"))
    return root, write_cifar(root, hundred=False, train_per_class=12, test_per_class=4)


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cifar100"))
    return root, write_cifar(root, hundred=True, train_per_class=3, test_per_class=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny"))
    write_tiny(root)
    return root


def built(cls, root, **kw):
    dm = cls(root=root, download=False, batch_size=2, **kw)
    dm.setup("fit")
    return dm


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """images: (N, C, H, W) uint8 -> normalised float."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s


def stack(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(xs), torch.tensor(ys)


def assert_split(dm, expected_tasks: int, per_task: int) -> None:
    info = dm.info
    assert info.num_tasks == len(dm.tasks) == expected_tasks
    k = info.num_classes // expected_tasks
    assert info.task_classes == tuple(tuple(range(t * k, (t + 1) * k))
                                      for t in range(expected_tasks))
    for t, task in enumerate(dm.tasks):
        assert task.classes == info.task_classes[t]
        for ds in (task.train, task.test):
            assert set(stack(ds)[1].tolist()) == set(task.classes)  # exactly its classes
        assert torch.equal(task.train_targets, stack(task.train)[1])
    assert len(dm.tasks[0].train) == per_task


# ----- split streams --------------------------------------------------------------------------


def test_split_mnist_tasks_hold_their_digits_normalised(mnist):
    root, raw = mnist
    dm = built(SplitMNIST, root)
    assert_split(dm, 5, per_task=40)
    assert dm.input_shape == (1, 28, 28) and dm.scenario == "class-il"
    x_raw, y_raw = raw["train"]
    idx = torch.nonzero((y_raw == 2) | (y_raw == 3)).flatten()  # task 1, file order
    x, y = stack(dm.tasks[1].train)
    assert x.shape == (40, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(y, y_raw[idx])
    torch.testing.assert_close(x, normalise(x_raw[idx].unsqueeze(1), (0.1307,), (0.3081,)))

    class FakeTrainer:
        current_epoch = 1

    dm.trainer = FakeTrainer()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "y", "task"} and batch["x"].shape == (2, 1, 28, 28)
    assert batch["task"].eq(1).all() and set(batch["y"].tolist()) <= {2, 3}


def test_split_mnist_task_il_and_subsampling(mnist):
    root, _ = mnist
    dm = built(SplitMNIST, root, scenario="task-il", train_per_task=7, test_per_task=3,
               subsample_seed=4)
    assert dm.info.scenario == "task-il"
    assert [len(t.train) for t in dm.tasks] == [7] * 5
    assert [len(t.test) for t in dm.tasks] == [3] * 5
    for t, task in enumerate(dm.tasks):
        assert set(stack(task.train)[1].tolist()) <= {2 * t, 2 * t + 1}
    again = built(SplitMNIST, root, scenario="task-il", train_per_task=7, test_per_task=3,
                  subsample_seed=4)
    assert torch.equal(stack(dm.tasks[2].train)[0], stack(again.tasks[2].train)[0])
    other = built(SplitMNIST, root, train_per_task=7, subsample_seed=5)
    assert not torch.equal(stack(dm.tasks[2].train)[0], stack(other.tasks[2].train)[0])
    assert dm.stream_definition()["train_per_task"] == 7


def test_split_mnist_task_il_masks_logits_to_the_task(mnist):
    from cl_lightning.module import ContinualLearner

    dm = SplitMNIST(root=mnist[0], download=False, scenario="task-il")
    learner = ContinualLearner(stream=dm.info)
    logits = learner.mask_logits(torch.zeros(5, 10), torch.arange(5))
    for t in range(5):
        allowed = torch.isfinite(logits[t]) & (logits[t] > -1e30)
        assert allowed.nonzero().flatten().tolist() == [2 * t, 2 * t + 1]


def test_split_cifar10_uses_torchvision_pickles(cifar10, unchecked_cifar):
    root, raw = cifar10
    dm = built(SplitCIFAR10, root)
    assert_split(dm, 5, per_task=24)
    assert dm.input_shape == (3, 32, 32)
    x_raw, y_raw = raw["test"]
    idx = torch.nonzero((y_raw == 8) | (y_raw == 9)).flatten()
    x, y = stack(dm.tasks[4].test)
    assert torch.equal(y, y_raw[idx])
    torch.testing.assert_close(x, normalise(x_raw[idx], SplitCIFAR10.mean, SplitCIFAR10.std))


@pytest.mark.parametrize("per_task, tasks", [(10, 10), (20, 5)])
def test_split_cifar100_classes_per_task(cifar100, unchecked_cifar, per_task, tasks):
    root, raw = cifar100
    dm = built(SplitCIFAR100, root, classes_per_task=per_task)
    assert_split(dm, tasks, per_task=3 * per_task)
    x_raw, y_raw = raw["train"]
    idx = torch.nonzero(y_raw < per_task).flatten()
    torch.testing.assert_close(stack(dm.tasks[0].train)[0],
                               normalise(x_raw[idx], SplitCIFAR100.mean, SplitCIFAR100.std))


def test_split_tiny_imagenet_relabels_val_from_annotations(tiny):
    dm = built(SplitTinyImageNet, tiny, decode_threads=2)
    assert_split(dm, 10, per_task=40)
    assert dm.input_shape == (3, 64, 64)
    wnids = sorted(WNIDS)
    # val_k has wnid WNIDS[(37 k) % 200]; its label is that wnid's sorted position
    base = os.path.join(tiny, "tiny-imagenet-200")
    k = next(k for k in range(200) if wnids.index(WNIDS[(k * 37) % 200]) == 45)  # task 2
    expected = np.asarray(Image.open(os.path.join(base, "val", "images", f"val_{k}.JPEG")))
    expected = normalise(torch.from_numpy(expected).permute(2, 0, 1)[None],
                         SplitTinyImageNet.mean, SplitTinyImageNet.std)[0]
    xs, ys = stack(dm.tasks[2].test)
    matches = [i for i in range(len(xs)) if torch.allclose(xs[i], expected, atol=1e-5)]
    assert len(matches) == 1 and ys[matches[0]] == 45
    # a greyscale training JPEG becomes 3 equal channels
    grey = wnids.index(WNIDS[0])
    task = dm.tasks[grey // 20].train
    assert any(torch.equal(task.images[i, 0], task.images[i, 1])
               and torch.equal(task.images[i, 1], task.images[i, 2])
               for i in range(len(task)) if task.targets[i] == grey)


def test_split_tiny_imagenet_subsample_decodes_only_kept_images(tiny, monkeypatch):
    decoded = []
    original = SplitTinyImageNet.decode

    def spy(self, paths):
        decoded.extend(paths)
        return original(self, paths)

    monkeypatch.setattr(SplitTinyImageNet, "decode", spy)
    dm = built(SplitTinyImageNet, tiny, classes_per_task=100, train_per_task=5,
               test_per_task=4)
    assert [len(t.train) for t in dm.tasks] == [5, 5] and [len(t.test) for t in dm.tasks] == [4, 4]
    assert len(decoded) == 18


# ----- domain streams -------------------------------------------------------------------------


def test_permuted_mnist_permutations_from_the_seed(mnist):
    root, raw = mnist
    dm = built(PermutedMNIST, root, num_tasks=3, perm_seed=7)
    perms = [dm.permutation(t) for t in range(3)]
    assert all(torch.equal(p.sort().values, torch.arange(784)) for p in perms)
    assert not torch.equal(perms[0], torch.arange(784))  # task 0 is permuted by default
    assert not torch.equal(perms[0], perms[1]) and not torch.equal(perms[1], perms[2])
    same = PermutedMNIST(root=root, num_tasks=5, perm_seed=7)  # independent of num_tasks
    assert all(torch.equal(perms[t], same.permutation(t)) for t in range(3))
    assert not torch.equal(PermutedMNIST(perm_seed=8).permutation(1), perms[1])
    assert torch.equal(PermutedMNIST(first_identity=True).permutation(0), torch.arange(784))
    x_raw, y_raw = raw["train"]
    plain = normalise(x_raw.unsqueeze(1), (0.1307,), (0.3081,)).flatten(1)
    for t in range(3):
        assert dm.tasks[t].classes == tuple(range(10))
        x, y = stack(dm.tasks[t].train)
        assert torch.equal(y, y_raw)
        torch.testing.assert_close(x.flatten(1), plain[:, perms[t]])
    assert dm.info.scenario == "domain-il"
    assert dm.stream_definition()["perm_seed"] == 7


def test_permuted_mnist_subsamples_differently_per_task(mnist):
    dm = built(PermutedMNIST, mnist[0], num_tasks=2, train_per_task=30, test_per_task=10,
               first_identity=True)
    assert [len(t.train) for t in dm.tasks] == [30, 30]
    assert [len(t.test) for t in dm.tasks] == [10, 10]
    assert not torch.equal(dm.tasks[0].train.targets, dm.tasks[1].train.targets)


def test_rotated_mnist_angles_from_the_seed(mnist):
    root, raw = mnist
    dm = built(RotatedMNIST, root, num_tasks=3, rotation_seed=1)
    angles = dm.angles
    assert len(angles) == 3 and len(set(angles)) == 3 and all(0 <= a < 180 for a in angles)
    assert RotatedMNIST(num_tasks=5, rotation_seed=1).angles[:3] == angles
    assert RotatedMNIST(num_tasks=3, rotation_seed=2).angles != angles
    x_raw, y_raw = raw["test"]
    xs = []
    for t in range(3):
        x, y = stack(dm.tasks[t].test)
        assert torch.equal(y, y_raw)
        expected = rotate_uint8(x_raw.unsqueeze(1), angles[t])
        torch.testing.assert_close(x, normalise(expected, (0.1307,), (0.3081,)))
        xs.append(x)
    assert not torch.allclose(xs[0], xs[1]) and not torch.allclose(xs[1], xs[2])
    again = built(RotatedMNIST, root, num_tasks=3, rotation_seed=1)
    assert torch.equal(stack(again.tasks[1].test)[0], xs[1])


def test_rotate_uint8_is_per_image_whatever_the_chunk():
    """Chunking is only for speed: any chunk size gives each image's own rotation."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (37, 1, 28, 28), generator=g, dtype=torch.uint8)
    for interpolation in ("bilinear", "nearest"):
        one_by_one = torch.cat([rotate_uint8(images[i:i + 1], 33.3, interpolation)
                                for i in range(len(images))])
        for chunk in (1, 5, 512):
            assert torch.equal(rotate_uint8(images, 33.3, interpolation, chunk=chunk),
                               one_by_one)
        assert not torch.equal(one_by_one, images)


def test_rotated_mnist_rotates_counter_clockwise(mnist):
    root, raw = mnist
    dm = built(RotatedMNIST, root, num_tasks=1, min_angle=90.0, max_angle=90.0)
    expected = torch.rot90(raw["test"][0].unsqueeze(1), 1, dims=(2, 3))
    assert (dm.tasks[0].test.images.int() - expected.int()).abs().max() <= 1


def test_rotated_mnist_nearest_interpolation_only_moves_pixels(mnist):
    """``nearest`` (mammoth's) copies pixels: every output value of an image is one of its
    input values or the black fill; bilinear blends neighbours into new grey levels. The
    option is part of the stream definition (a checkpoint records it)."""
    root, raw = mnist
    near = built(RotatedMNIST, root, num_tasks=1, min_angle=30.0, max_angle=30.0,
                 interpolation="nearest")
    bil = built(RotatedMNIST, root, num_tasks=1, min_angle=30.0, max_angle=30.0)
    src = raw["test"][0]
    new_levels = {"nearest": 0, "bilinear": 0}
    for name, dm in (("nearest", near), ("bilinear", bil)):
        out = dm.tasks[0].test.images[:, 0]
        for i in range(len(src)):
            allowed = set(src[i].unique().tolist()) | {0}
            new_levels[name] += len(set(out[i].unique().tolist()) - allowed)
    assert new_levels["nearest"] == 0 and new_levels["bilinear"] > 0
    assert near.stream_definition()["interpolation"] == "nearest"
    assert bil.stream_definition()["interpolation"] == "bilinear"


# ----- bad input and missing data ---------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SplitCIFAR100(classes_per_task=30), "data.classes_per_task must divide 100"),
        (lambda: SplitMNIST(classes_per_task=3), "data.classes_per_task must divide 10"),
        (lambda: SplitTinyImageNet(classes_per_task=0), "data.classes_per_task must divide 200"),
        (lambda: SplitMNIST(scenario="domain-il"), "data.scenario"),
        (lambda: PermutedMNIST(scenario="class-il"), "data.scenario"),
        (lambda: RotatedMNIST(num_tasks=0), "data.num_tasks"),
        (lambda: RotatedMNIST(min_angle=10, max_angle=5), "data.min_angle"),
        (lambda: RotatedMNIST(interpolation="bicubic"), "data.interpolation"),
        (lambda: SplitCIFAR10(train_per_task=0), "data.train_per_task"),
        (lambda: SplitCIFAR10(crop_padding=-1), "data.crop_padding"),
    ],
)
def test_bad_options_fail_early_naming_the_option(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "make, folder, files",
    [
        (lambda r: SplitMNIST(root=r, download=False), "MNIST/raw", "train-images-idx3-ubyte"),
        (lambda r: PermutedMNIST(root=r, download=False), "MNIST/raw", "t10k-labels-idx1-ubyte"),
        (lambda r: SplitCIFAR10(root=r, download=False), "cifar-10-batches-py", "data_batch_5"),
        (lambda r: SplitCIFAR100(root=r, download=False), "cifar-100-python", "meta"),
        (lambda r: SplitTinyImageNet(root=r, download=False), "tiny-imagenet-200",
         "val/val_annotations.txt"),
    ],
)
def test_missing_data_names_folder_and_files(tmp_path, make, folder, files):
    dm = make(str(tmp_path))
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DatasetNotFoundError) as err:
            step()
        msg = str(err.value)
        assert os.path.join(str(tmp_path), folder) in msg and files in msg
        assert "downloading is off" in msg and "--data.root" in msg


@pytest.mark.parametrize(
    "target, make",
    [
        ("torchvision.datasets.mnist.download_and_extract_archive",
         lambda r: SplitMNIST(root=r)),
        ("torchvision.datasets.cifar.download_and_extract_archive",
         lambda r: SplitCIFAR10(root=r)),
        ("datamodules.tiny_imagenet.download_and_extract_archive",
         lambda r: SplitTinyImageNet(root=r)),
    ],
)
def test_failed_download_gives_the_reason_not_a_urllib_trace(tmp_path, monkeypatch, target,
                                                             make):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(target, offline)
    with pytest.raises(DatasetNotFoundError) as err:
        make(str(tmp_path)).prepare_data()
    msg = str(err.value)
    assert "download failed" in msg and "name resolution" in msg and str(tmp_path) in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_corrupted_cifar_files_fail_torchvisions_md5_check_clearly(cifar10):
    with pytest.raises(DatasetNotFoundError, match="could not be read.*corrupted"):
        built(SplitCIFAR10, cifar10[0])


def test_cli_missing_data_stops_with_the_message(tmp_path, capsys):
    args = ["fit", "--data", "datamodules.SplitMNIST", "--data.root", str(tmp_path / "none"),
            "--data.download", "false", "--trainer.logger.save_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false"]
    assert "MNIST not found under" in refused(capsys, main, args)


# ----- augmentation ---------------------------------------------------------------------------


def test_random_crop_flip_identity_and_flip():
    x = torch.randn(6, 3, 8, 8)
    out = random_crop_flip(x, padding=0, flip_prob=0.0)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.equal(out, x)
    assert torch.equal(random_crop_flip(x, padding=0, flip_prob=1.0), x.flip(-1))
    g = torch.Generator().manual_seed(0)
    mixed = random_crop_flip(torch.randn(64, 1, 5, 5), padding=0, flip_prob=0.5, generator=g)
    assert mixed.shape == (64, 1, 5, 5)
    xs = torch.randn(64, 1, 5, 5)
    mixed = random_crop_flip(xs, padding=0, generator=torch.Generator().manual_seed(1))
    same = [torch.equal(mixed[i], xs[i]) for i in range(64)]
    flipped = [torch.equal(mixed[i], xs[i].flip(-1)) for i in range(64)]
    assert all(a or b for a, b in zip(same, flipped, strict=True))
    assert 10 < sum(flipped) < 54


def crop_offset(out: torch.Tensor, x: torch.Tensor, padding: int, fill) -> tuple | None:
    """The (dy, dx) at which ``out`` (C, H, W) is a crop of ``x`` padded with ``fill`` (one
    value per channel); None if it is none."""
    c, h, w = x.shape
    padded = torch.as_tensor(fill, dtype=x.dtype).view(c, 1, 1).repeat(1, h + 2 * padding,
                                                                        w + 2 * padding)
    padded[:, padding:padding + h, padding:padding + w] = x
    return next(((dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                 if torch.equal(out, padded[:, dy:dy + h, dx:dx + w])), None)


def test_random_crop_flip_crops_are_shifts_of_the_padded_image():
    b, c, h, w, p = 200, 3, 6, 7, 2
    x = torch.rand(b, c, h, w)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    g = torch.Generator().manual_seed(3)
    out = random_crop_flip(x, padding=p, flip_prob=0.0, fill=fill, generator=g)
    assert out.shape == x.shape
    offsets = set()
    for i in range(b):
        found = crop_offset(out[i], x[i], p, fill)
        assert found is not None, f"sample {i} is not a crop of its padded image"
        offsets.add(found)
    assert len(offsets) == (2 * p + 1) ** 2  # every offset is drawn
    again = random_crop_flip(x, padding=p, flip_prob=0.0, fill=fill,
                             generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)


def test_colour_streams_augment_and_can_switch_it_off():
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    out = SplitCIFAR10().augment(x)
    assert out.shape == x.shape and not torch.equal(out, x)
    assert SplitCIFAR100(augmentation=False).augment(x) is x
    assert SplitTinyImageNet().augment(torch.randn(2, 3, 64, 64)).shape == (2, 3, 64, 64)
    assert SplitMNIST().augment(x) is x
    # the padding is black: -mean/std of each channel
    black = random_crop_flip(torch.full((1, 3, 4, 4), 5.0), padding=4, flip_prob=0.0,
                             fill=[-m / s for m, s in zip(SplitCIFAR10.mean, SplitCIFAR10.std,
                                                          strict=True)],
                             generator=torch.Generator().manual_seed(0))
    assert black.ne(5.0).any()


# ----- one CLI epoch per stream -----------------------------------------------------------


MLP = ("--model.net", "cl_lightning.models.backbones.MLP", "--model.net.hidden", "[16]")


def run_fit(tmp_path, stream: str, root: str, *extra: str, configs=(), net=MLP):
    args = ["fit", *[a for c in configs for a in ("-c", str(ROOT / "configs" / c))],
            *QUIET_CPU, *net,
            "--data", f"datamodules.{stream}", "--data.root", root, "--data.download", "false",
            "--data.epochs_per_task", "1", "--data.batch_size", "8",
            "--evaluation.heatmap", "false", "--trainer.limit_train_batches", "4",
            *tensorboard_logger(tmp_path, stream), *extra]
    cli = main(args)
    with open(os.path.join(cli.trainer.log_dir, "results.json")) as f:
        return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize(
    "stream, data, extra, tasks",
    [
        ("SplitMNIST", "mnist", ["--data.scenario", "task-il"], 5),
        ("PermutedMNIST", "mnist", ["--data.num_tasks", "2", "--data.train_per_task", "64"], 2),
        ("RotatedMNIST", "mnist", ["--data.num_tasks", "2", "--data.train_per_task", "64"], 2),
        ("SplitCIFAR10", "cifar10", [], 5),
        ("SplitCIFAR100", "cifar100", ["--data.classes_per_task", "50"], 2),
        ("SplitTinyImageNet", "tiny", ["--data.classes_per_task", "100",
                                       "--data.train_per_task", "32"], 2),
    ],
)
def test_one_cli_epoch_per_task(tmp_path, request, unchecked_cifar, stream, data, extra, tasks):
    root = request.getfixturevalue(data)
    root = root if isinstance(root, str) else root[0]
    res = run_fit(tmp_path, stream, root, *extra)
    assert res["num_tasks"] == tasks and res["complete"]
    assert len(res["accuracy_matrix"]) == tasks
    assert res["stream"]["stream"] == stream


class AugmentSpy(Callback, LearnerPlugin):
    """Records each training step's raw batch, the inputs the model saw, and the replay mask."""

    plugin_order = 100
    steps: list = []

    def after_step(self, learner, step: StepOutput) -> None:
        AugmentSpy.steps.append((step.batch["x"].detach().clone(), step.inputs.detach().clone(),
                                 step.replay_mask.clone()))


@pytest.mark.slow
def test_replayed_samples_get_the_training_augmentation(tmp_path, cifar10, unchecked_cifar):
    """The buffer stores raw images; the model sees every training row, replayed ones
    included, as a fresh random crop (padding 4, black fill) + flip of it."""
    AugmentSpy.steps = []
    run_fit(tmp_path, "SplitCIFAR10", cifar10[0], "--trainer.limit_train_batches", "4",
            "--data.classes_per_task", "5",
            "--trainer.callbacks+=callbacks.replay.ExperienceReplay",
            "--trainer.callbacks.capacity", "40", "--trainer.callbacks.replay_batch_size", "8",
            "--trainer.callbacks+=tests.test_streams.AugmentSpy")
    fill = [-m / s for m, s in zip(SplitCIFAR10.mean, SplitCIFAR10.std, strict=True)]
    seen_raw = torch.cat([x[~replay] for x, _, replay in AugmentSpy.steps])
    replayed = [(x[replay], inputs[replay]) for x, inputs, replay in AugmentSpy.steps
                if replay.any()]
    assert len(replayed) == 7  # every step after the first (2 tasks x 4 steps)
    raw, seen = torch.cat([r for r, _ in replayed]), torch.cat([s for _, s in replayed])
    assert len(raw) == 7 * 8
    for r, out in zip(raw, seen, strict=True):
        assert (r == seen_raw).flatten(1).all(1).any()  # the buffer kept the raw image
        assert (crop_offset(out, r, 4, fill) is not None  # a crop, or a flipped one
                or crop_offset(out.flip(-1), r, 4, fill) is not None)
    assert sum(not torch.equal(r, out) for r, out in zip(raw, seen, strict=True)) > 40


@pytest.mark.slow
def test_full_agent_one_cli_epoch_per_task_on_colour_images(tmp_path, cifar10, unchecked_cifar):
    """The shipped composition for colour streams (stream + ESMER + agent + agent_cnn + MAML +
    context), shrunk: the CNN encoder's tokens feed the DNC, MAML adapts the head, ESMER
    reports its semantic memory, and every task is trained and evaluated."""
    small = ("--model.net.init_args.cnn_width", "4", "--model.net.init_args.dnc.memory_slots", "8",
             "--model.net.init_args.dnc.word_size", "8",
             "--model.net.init_args.dnc.hidden_size", "16",
             "--model.net.init_args.core_output", "16", "--model.meta.init_args.steps", "2")
    # one epoch per task: ESMER's whole-epoch warm-up would admit nothing (refused)
    res = run_fit(tmp_path, "SplitCIFAR10", cifar10[0], "--trainer.limit_train_batches", "3",
                  "--trainer.callbacks.init_args.warmup_epochs", "0.5",
                  configs=("split_cifar10.yaml", "split_cifar10/esmer_200.yaml",
                           "methods/agent.yaml", "methods/agent_cnn.yaml", "methods/maml.yaml",
                           "methods/context.yaml"), net=small)
    assert res["num_tasks"] == 5 and res["tasks_trained"] == 5 and res["complete"]
    net = res["config"]["model"]["net"]
    assert net["class_path"].endswith("MemoryAgent") and net["init_args"]["encoder"] == "cnn"
    assert res["config"]["model"]["meta"]["init_args"]["steps"] == 2
    assert res["primary_variant"] == "ema/class_il"  # the semantic memory, the rest alongside
    matrices = [res["accuracy_matrix"]] + [res["variants"][v]["accuracy_matrix"]
                                           for v in ("class_il", "task_il", "ema/task_il")]
    for matrix in matrices:  # after each task the tasks trained so far and the next one,
        assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)  # in percent
        for t, row in enumerate(matrix):  # (the stream config's eval_future false)
            assert all(0 <= a <= 100 for a in row[:t + 2]) and all(a is None for a in row[t + 2:])


@pytest.mark.parametrize("cls", [PermutedMNIST, RotatedMNIST])
def test_domain_mnist_heldout_task_is_the_next_task_of_a_longer_stream(mnist, cls):
    root, _ = mnist
    dm = built(cls, root, num_tasks=2, train_per_task=30, test_per_task=10)
    held = dm.heldout_task()
    longer = built(cls, root, num_tasks=3, train_per_task=30, test_per_task=10)
    for mine, theirs in [(held.train, longer.tasks[2].train), (held.test, longer.tasks[2].test)]:
        (xa, ya), (xb, yb) = stack(mine), stack(theirs)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x_new, _ = stack(held.test)  # a new transformation, not one of the trained tasks
    assert not any(torch.equal(x_new, stack(t.test)[0]) for t in dm.tasks)


def test_synthetic_heldout_task_is_the_next_task_of_a_longer_stream():
    from datamodules.synthetic import LinearShiftStream

    kw = dict(train_per_task=40, test_per_task=20, input_dim=6, num_classes=3)
    dm, longer = LinearShiftStream(num_tasks=2, **kw), LinearShiftStream(num_tasks=3, **kw)
    dm.setup("fit")
    longer.setup("fit")
    held = dm.heldout_task()
    assert torch.equal(held.train.tensors[0], longer.tasks[2].train.tensors[0])
    assert torch.equal(held.test.tensors[1], longer.tasks[2].test.tensors[1])
    assert torch.equal(dm.tasks[1].train.tensors[0], longer.tasks[1].train.tensors[0])


def test_domain_mnist_raw_pixels_option(mnist):
    root, raw = mnist
    dm = built(PermutedMNIST, root, num_tasks=1, normalize=False)
    x, _ = stack(dm.tasks[0].train)
    expected = (raw["train"][0].float() / 255).flatten(1)[:, dm.permutation(0)]
    torch.testing.assert_close(x.flatten(1), expected)
    assert dm.stream_definition()["normalize"] is False
    assert built(PermutedMNIST, root, num_tasks=1).stream_definition()["normalize"] is True


@pytest.mark.parametrize("perm", [False, True])
def test_image_dataset_batched_items_equal_single_items(perm):
    """The DataLoader's batched fetch (``__getitems__``) gives the items ``__getitem__``
    gives, bit for bit, with and without a pixel permutation, on 3 channels."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 3, 4, 5), dtype=torch.uint8, generator=g)
    pixel_perm = torch.randperm(60, generator=g) if perm else None
    ds = ImageTensorDataset(images, torch.arange(7), (0.1, 0.2, 0.3), (0.5, 0.6, 0.7),
                            pixel_perm=pixel_perm)
    batch = ds.__getitems__([5, 0, 5, 3])
    for (x, y), i in zip(batch, [5, 0, 5, 3], strict=True):
        x1, y1 = ds[i]
        assert y == y1 == i and torch.equal(x, x1)
    expected = (images[3].float() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)) / \
        torch.tensor([0.5, 0.6, 0.7]).view(3, 1, 1)
    if perm:
        expected = expected.flatten()[pixel_perm].view(3, 4, 5)
    torch.testing.assert_close(batch[3][0], expected)


@pytest.mark.parametrize("kind", ["image", "tensor", "noisy", "per-item"])
def test_task_view_batch_equals_collated_items(kind):
    """A stream loader's batch, gathered at once by ``TaskView.__getitems__``, equals the
    default collation of the single items bit for bit (keys, dtypes, values), for image
    and tensor datasets, with noisy labels, and through a ``Subset`` (the eval loaders);
    a dataset that cannot gather falls back to one item per index."""
    from torch.utils.data import DataLoader, Subset, TensorDataset, default_collate

    from datamodules.base import TaskView, collate

    g = torch.Generator().manual_seed(1)
    if kind == "tensor" or kind == "per-item":
        base = TensorDataset(torch.randn(9, 3, generator=g), torch.arange(9) % 4)
        if kind == "per-item":
            base = Subset(base, range(9))  # no batch(): item by item
    else:
        images = torch.randint(0, 256, (9, 1, 4, 4), dtype=torch.uint8, generator=g)
        base = ImageTensorDataset(images, torch.arange(9) % 4, (0.1,), (0.3,),
                                  pixel_perm=torch.randperm(16, generator=g))
    labels = torch.randint(0, 4, (9,), generator=g) if kind == "noisy" else None
    view = TaskView(base, task=2, labels=labels)
    indices = [4, 0, 8, 4, 1]
    expected = default_collate([view[i] for i in indices])
    for got in (collate(view.__getitems__(indices)),
                next(iter(DataLoader(Subset(view, indices), batch_size=5, collate_fn=collate)))):
        assert list(got) == list(expected)
        for key, value in expected.items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    assert isinstance(view.__getitems__(indices), list) == (kind == "per-item")
