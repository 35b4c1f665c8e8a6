"""Split Tiny-ImageNet (class-IL / task-IL): 200 classes of 64x64 colour images.

Files: the official ``tiny-imagenet-200.zip`` extracted under ``root``::

    tiny-imagenet-200/wnids.txt                        the 200 class ids (WordNet ids)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG       500 training images per class
    tiny-imagenet-200/val/images/*.JPEG                50 per class, used as the test set
    tiny-imagenet-200/val/val_annotations.txt          filename <TAB> wnid <TAB> bbox...

Class ``i`` is the ``i``-th wnid in sorted order (ImageFolder's convention). The training
images are listed ImageFolder-style (``torchvision.datasets.ImageFolder.make_dataset``);
the val images are relabelled from ``val_annotations.txt``.

Decoding: when the stream is built, the images it keeps (all, or the ``train_per_task`` /
``test_per_task`` subsample) are decoded once with PIL, in ``decode_threads`` threads, and
held in memory as ``uint8`` tensors (the full training set is 1.2 GB), so training never
touches the disk. Nothing is cached on disk; a full build decodes 110000 JPEGs, which takes
tens of seconds. Augmentation: random 64x64 crop of the image padded by 4 (black) +
horizontal flip per sample, on the batch's device (the DER/mammoth protocol).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.utils import download_and_extract_archive

from cl_lightning.checks import require_at_least
from datamodules.vision import (
    CropFlipAugmentation,
    ImageSource,
    SplitImageStream,
    SplitScenario,
    missing_files,
    open_dataset,
)

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_IMAGENET_FILES = ["wnids.txt", "train/<wnid>/images/*.JPEG", "val/images/*.JPEG",
                       "val/val_annotations.txt"]
"""What the folder must hold (as shown in messages)."""
_CHECKED = ["wnids.txt", "train", "val/images", "val/val_annotations.txt"]

Index = tuple[list[str], torch.Tensor]  # image paths, labels (N,) int64


class SplitTinyImageNet(CropFlipAugmentation, SplitImageStream):
    """Split Tiny-ImageNet: 10 tasks of 20 classes (sorted wnid order), 64x64x3.

    Args:
        root: folder that holds ``tiny-imagenet-200/`` (the extracted official zip).
        download: download and extract ``tiny-imagenet-200.zip`` (248 MB) into ``root`` if
            the folder is missing.
        classes_per_task: classes per task; must divide 200 (default 20 -> 10 tasks).
        train_per_task: keep at most this many training samples per task, drawn at random
            with ``subsample_seed`` (null: all, 500 per class); only kept images are decoded.
        test_per_task: the same for the test (val) samples of each task (null: all, 50 per
            class).
        subsample_seed: seed of the subsampling draws.
        augmentation: random crop + horizontal flip of every training batch.
        crop_padding: padding of the random crop, pixels.
        decode_threads: threads that decode the JPEGs when the stream is built.
        scenario: ``class-il`` or ``task-il``.
        **kwargs: the options of :class:`ContinualDataModule` (batch_size, ...).
    """

    dataset_name = "Tiny-ImageNet"
    total_classes = 200
    image_shape = (3, 64, 64)
    mean = (0.4802, 0.4481, 0.3975)
    std = (0.2770, 0.2691, 0.2821)

    def __init__(
        self,
        root: str = "data",
        download: bool = True,
        classes_per_task: int = 20,
        train_per_task: int | None = None,
        test_per_task: int | None = None,
        subsample_seed: int = 0,
        augmentation: bool = True,
        crop_padding: int = 4,
        decode_threads: int = 4,
        scenario: SplitScenario = "class-il",
        **kwargs: Any,
    ) -> None:
        require_at_least(0, "data.", crop_padding=crop_padding)
        require_at_least(1, "data.", decode_threads=decode_threads)
        super().__init__(classes_per_task=classes_per_task, root=root, download=download,
                         train_per_task=train_per_task, test_per_task=test_per_task,
                         subsample_seed=subsample_seed, scenario=scenario, **kwargs)
        self.augmentation, self.crop_padding = augmentation, crop_padding
        self.decode_threads = decode_threads

    @property
    def folder(self) -> str:
        return os.path.join(self.root, "tiny-imagenet-200")

    def _open(self, train: bool) -> Index:
        def open_fn(download: bool) -> Index:
            if download:
                download_and_extract_archive(TINY_IMAGENET_URL, self.root,
                                             md5=TINY_IMAGENET_MD5)
            return self._index(train)

        return open_dataset(self.dataset_name, self.folder, _CHECKED, open_fn, self.download,
                            shown=TINY_IMAGENET_FILES)

    def prepare_data(self) -> None:
        if missing_files(self.folder, _CHECKED):
            self._open(True)

    def wnids(self) -> list[str]:
        """The class ids in label order (sorted)."""
        with open(os.path.join(self.folder, "wnids.txt")) as f:
            wnids = sorted({line.strip() for line in f if line.strip()})
        if len(wnids) != self.total_classes:
            raise ValueError(f"{os.path.join(self.folder, 'wnids.txt')} lists {len(wnids)} "
                             f"classes, expected {self.total_classes}")
        return wnids

    def _index(self, train: bool) -> Index:
        """Paths and labels of the train split (ImageFolder-style) or of the val split
        (labels from val_annotations.txt)."""
        class_to_idx = {w: i for i, w in enumerate(self.wnids())}
        if train:
            samples = ImageFolder.make_dataset(os.path.join(self.folder, "train"),
                                               class_to_idx, extensions=(".jpeg", ".jpg"))
        else:
            samples = []
            ann = os.path.join(self.folder, "val", "val_annotations.txt")
            with open(ann) as f:
                for n, line in enumerate(f, 1):
                    fields = line.rstrip("\n").split("\t")
                    if len(fields) < 2 or fields[1] not in class_to_idx:
                        raise ValueError(f"{ann}:{n}: expected 'filename<TAB>wnid...' with a "
                                         f"wnid of wnids.txt, got {line.strip()!r}")
                    samples.append((os.path.join(self.folder, "val", "images", fields[0]),
                                    class_to_idx[fields[1]]))
        paths = [p for p, _ in samples]
        return paths, torch.tensor([c for _, c in samples], dtype=torch.long)

    def decode(self, paths: list[str]) -> torch.Tensor:
        """JPEG files -> (N, 3, 64, 64) uint8 (grey images converted to RGB)."""
        h, w = self.image_shape[1:]
        out = torch.empty(len(paths), 3, h, w, dtype=torch.uint8)

        def one(i: int) -> None:
            with Image.open(paths[i]) as im:
                arr = np.array(im.convert("RGB"))  # a writable copy
            if arr.shape != (h, w, 3):
                raise ValueError(f"{paths[i]}: expected a {w}x{h} image, got "
                                 f"{arr.shape[1]}x{arr.shape[0]}")
            out[i] = torch.from_numpy(arr).permute(2, 0, 1)

        with ThreadPoolExecutor(self.decode_threads) as pool:
            list(pool.map(one, range(len(paths))))
        return out

    def read_split(self, train: bool) -> ImageSource:
        paths, targets = self._open(train)
        return targets, lambda idx: self.decode([paths[i] for i in idx.tolist()])
