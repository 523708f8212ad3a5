"""Image datasets for training: the embedded digits, image folders, Hugging Face ``datasets``, timm specs.

The default, :class:`DigitsDataset`, is scikit-learn's bundled handwritten digits (1,797 greyscale 8x8
images of 0-9, UCI Optical Recognition of Handwritten Digits): offline and tiny, so examples, tests and the
recipe run without any download. :func:`load_image_data` turns a ``--data`` spec into train and validation
datasets whose ``transform`` is set later (it depends on the model), and whose validation split is never a
test split unless the caller names one.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Subset

__all__ = ["DigitsDataset", "digits_splits", "DIGITS_CLASSES", "ImageData", "DataSpecError", "load_image_data",
           "set_transform", "HFImageDataset", "HFStreamingImageDataset", "DATA_SPEC_HELP"]

DATA_SPEC_HELP = ("'digits' (embedded, offline), 'imagefolder:PATH' (PATH/train and PATH/val class folders), "
                  "'hf:NAME_OR_PATH' (datasets.load_dataset: a hub id, or a local folder of parquet files or "
                  "class folders), or a timm dataset spec ('torch/cifar100', 'hfds/NAME', 'wds/NAME', ...)")
TIMM_PREFIXES = ("torch/", "hfds/", "hfids/", "tfds/", "wds/")

DIGITS_CLASSES = tuple(str(i) for i in range(10))


def _load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 images (N, 8, 8) scaled 0-255 and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def digits_splits(val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Deterministic stratified train/val split: ``{"train": (images, labels), "val": (images, labels)}``."""
    try:
        from sklearn.model_selection import train_test_split
    except ImportError:  # scikit-learn is an optional (recipes) dependency
        raise ImportError('the embedded digits dataset needs scikit-learn: pip install "chase-timm[recipes]"') from None

    images, labels = _load_digits()
    tr_x, va_x, tr_y, va_y = train_test_split(
        images, labels, test_size=val_fraction, stratify=labels, random_state=seed)
    return {"train": (tr_x, tr_y), "val": (va_x, va_y)}


class DigitsDataset(Dataset):
    """One split of the digits as ``(transform(RGB PIL image), label)`` pairs."""

    classes = DIGITS_CLASSES

    def __init__(self, split: str = "train", transform: Optional[Callable] = None,
                 val_fraction: float = 0.2, seed: int = 0):
        if split not in ("train", "val"):
            raise ValueError(f"DigitsDataset split must be 'train' or 'val', got {split!r}.")
        self.images, self.targets = digits_splits(val_fraction, seed)[split]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index]).convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])


class DataSpecError(ValueError):
    """A ``--data`` spec that cannot be loaded (unknown kind, missing or empty folder, missing split)."""


@dataclass
class ImageData:
    """Train and validation datasets of one spec (``transform`` set later with :func:`set_transform`)."""
    train: Dataset
    val: Dataset
    num_classes: Optional[int]
    train_size: int
    description: str


def set_transform(dataset: Dataset, transform: Callable) -> None:
    """Attach ``transform`` to a dataset returned by :func:`load_image_data` (also through a ``Subset``)."""
    getattr(dataset, "dataset", dataset).transform = transform


def load_image_data(spec: str, *, data_dir: Optional[str] = None, train_split: Optional[str] = None,
                    val_split: Optional[str] = None, val_fraction: float = 0.0, streaming: bool = False,
                    seed: int = 0, rank: int = 0, world_size: int = 1) -> ImageData:
    """Train and validation datasets for a ``--data`` spec (see ``DATA_SPEC_HELP``).

    ``val_fraction`` > 0 holds out that (seeded, identical on every rank) fraction of the train split as the
    validation set instead of reading a validation split. ``streaming`` (``hf:`` only) reads the train split
    as an iterable dataset sharded per rank with ``datasets.distributed.split_dataset_by_node``.
    Raises :class:`DataSpecError` with the fix when the spec cannot be used.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataSpecError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if streaming and not spec.startswith("hf:"):
        raise DataSpecError(f"--streaming needs an 'hf:' dataset, got --data {spec!r}")
    if streaming and val_fraction:
        raise DataSpecError("--streaming reads the train split as a stream, so it cannot hold out --val-fraction of "
                            "it; use the dataset's validation split (--val-split NAME) or drop --streaming")
    if spec == "digits":
        train, val = DigitsDataset("train"), DigitsDataset("val")
        return ImageData(train, val, len(DIGITS_CLASSES), len(train), "digits (embedded, 20 % held out)")
    if spec.startswith("imagefolder:"):
        return _image_folder(spec.split(":", 1)[1], train_split or "train", val_split, val_fraction, seed)
    if spec.startswith("hf:"):
        return _hf_dataset(spec[3:], data_dir, train_split or "train", val_split, val_fraction, streaming, seed,
                           rank, world_size)
    if spec.startswith(TIMM_PREFIXES):
        return _timm_dataset(spec, data_dir, train_split or "train", val_split, val_fraction, seed)
    raise DataSpecError(f"unknown dataset spec --data {spec!r}; use {DATA_SPEC_HELP}")


def _holdout(first: Dataset, second: Dataset, n: int, fraction: float, seed: int) -> Tuple[Subset, Subset]:
    """Disjoint seeded train/val index subsets of two instances of the same data (each keeps its transform)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(fraction * n))
    return Subset(first, sorted(order[n_val:])), Subset(second, sorted(order[:n_val]))


def _image_folder(root: str, train_split: str, val_split: Optional[str], val_fraction: float, seed: int) -> ImageData:
    from timm.data import create_dataset

    splits = [train_split] + ([] if val_fraction else [val_split or "val"])
    for split in splits:
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise DataSpecError(f"--data imagefolder:{root}: {folder} does not exist (expected class folders in "
                                f"{root}/train and {root}/val, or --val-fraction to hold out part of train)")
    load = lambda split: create_dataset("", root=os.path.join(root, split), search_split=False)
    try:
        sets = [load(s) for s in splits]
    except RuntimeError as e:  # timm: "Found 0 images in subfolders of ..."
        raise DataSpecError(f"--data imagefolder:{root}: {e}") from None
    for split, ds in zip(splits, sets):
        if len(ds) == 0:
            raise DataSpecError(f"--data imagefolder:{root}: no images in {os.path.join(root, split)}")
    classes = len(sets[0].reader.class_to_idx)
    if val_fraction:
        train, val = _holdout(sets[0], load(train_split), len(sets[0]), val_fraction, seed)
        return ImageData(train, val, classes, len(train), f"{root}/{train_split} ({val_fraction:.0%} held out)")
    return ImageData(sets[0], sets[1], classes, len(sets[0]), f"{root}/{splits[0]}, {root}/{splits[1]}")


def _timm_dataset(spec: str, root: Optional[str], train_split: str, val_split: Optional[str], val_fraction: float,
                  seed: int) -> ImageData:
    from timm.data import create_dataset

    load = lambda split: create_dataset(spec, root=root, split=split, download=False)
    try:
        train = load(train_split)
        if val_fraction:
            train, val = _holdout(train, load(train_split), len(train), val_fraction, seed)
            where = f"{spec} {train_split} ({val_fraction:.0%} held out)"
        else:
            val = load(val_split or "validation")
            where = f"{spec} {train_split} / {val_split or 'validation'}"
    except Exception as e:  # torchvision/timm raise many types; report the spec instead of a traceback
        raise DataSpecError(f"could not load --data {spec!r} from --data-dir {root!r}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    base = getattr(train, "dataset", train)
    reader = getattr(base, "reader", base)
    classes = getattr(reader, "class_to_idx", None) or getattr(reader, "classes", None)
    return ImageData(train, val, len(classes) if classes else None, len(train), where)


def _features(ds: Any, name: str) -> Tuple[str, str, Optional[int]]:
    """The image column, the label column and the class count of a Hugging Face dataset."""
    import datasets

    features = ds.features or {}
    images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    labels = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)] or [
        k for k in ("label", "labels", "target", "class") if k in features]
    if not images or not labels:
        raise DataSpecError(f"hf:{name} needs an Image column and a label column; it has {dict(features)}")
    label = features[labels[0]]
    return images[0], labels[0], label.num_classes if isinstance(label, datasets.ClassLabel) else None


class HFImageDataset(Dataset):
    """A map-style Hugging Face image dataset as ``(transform(RGB image), label)`` pairs."""

    def __init__(self, ds: Any, image_key: str, label_key: str) -> None:
        self.ds, self.image_key, self.label_key, self.transform = ds, image_key, label_key, None

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int):
        row = self.ds[int(index)]
        img = row[self.image_key].convert("RGB")
        return (self.transform(img) if self.transform else img), int(row[self.label_key])


class HFStreamingImageDataset(IterableDataset):
    """A streaming Hugging Face image dataset, already sharded for this rank, as ``(image, label)`` pairs; each rank
    yields ``length`` rows (shards of uneven size are cut to the shortest, so DDP ranks stay in step)."""

    def __init__(self, ds: Any, image_key: str, label_key: str, length: int) -> None:
        self.ds, self.image_key, self.label_key, self.length, self.transform = ds, image_key, label_key, length, None

    def set_epoch(self, epoch: int) -> None:
        self.ds.set_epoch(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator:
        for row in itertools.islice(self.ds, self.length):  # every rank the same count: no rank waits forever
            img = row[self.image_key].convert("RGB")
            yield (self.transform(img) if self.transform else img), int(row[self.label_key])


def _rows_every_rank_gets(stream: Any, size: int, world_size: int) -> int:
    """Rows ``split_dataset_by_node`` gives every rank at least, in any epoch: it deals whole shards (in an order
    reshuffled each epoch) when their number divides by the world size, else every world_size-th row."""
    if world_size == 1 or stream.n_shards % world_size:
        return size // world_size
    rows = sorted(sum(1 for _ in stream.shard(stream.n_shards, i).select_columns([])) for i in range(stream.n_shards))
    return sum(rows[:stream.n_shards // world_size])  # the unluckiest rank holds the smallest shards


# Not timm's hfds/hfids readers (still reachable as those specs): they read fixed 'image'/'label' columns and no
# data_dir, and hfids needs num_samples for local files and evens ranks out by repeating rows up to ceil(N/world)
# (timm 1.0.31 reader_hfids.py), where hf: finds the columns itself and cuts every rank to its smallest share.
def _hf_dataset(name: str, data_dir: Optional[str], train_split: str, val_split: Optional[str], val_fraction: float,
                streaming: bool, seed: int, rank: int, world_size: int) -> ImageData:
    import datasets
    from datasets.distributed import split_dataset_by_node

    try:
        builder = datasets.load_dataset_builder(name, data_dir=data_dir)
    except Exception as e:  # missing folder, unknown hub id, no network
        reason = str(e).splitlines()[0] if str(e) else ""
        raise DataSpecError(f"could not find --data hf:{name} (a hub dataset id or a local folder of parquet "
                            f"files / class folders): {type(e).__name__}: {reason}") from None
    splits = sorted(builder.config.data_files or {})
    if train_split not in splits:
        raise DataSpecError(f"hf:{name} has splits {splits}, no {train_split!r}; pass --train-split")
    if not val_fraction:
        val_split = val_split or next((s for s in ("validation", "val", "valid") if s in splits), None)
        if val_split not in splits:
            raise DataSpecError(f"hf:{name} has splits {splits} and no validation split; pass --val-fraction 0.1 "
                                "to hold out part of train (or --val-split NAME)")
    load = lambda split, stream=False: datasets.load_dataset(name, data_dir=data_dir, split=split, streaming=stream)
    if streaming:
        train = load(train_split, stream=True).shuffle(seed=seed, buffer_size=1000)
        size = builder.info.splits[train_split].num_examples if builder.info.splits else None
        if not size:  # local files: count the rows once, cheaply (no images decoded)
            size = sum(1 for _ in load(train_split, stream=True).select_columns([]))
        image_key, label_key, classes = _features(train, name)
        shard = split_dataset_by_node(train, rank=rank, world_size=world_size)
        val = HFImageDataset(load(val_split), image_key, label_key)
        per_rank = _rows_every_rank_gets(load(train_split, stream=True), size, world_size)
        return ImageData(HFStreamingImageDataset(shard, image_key, label_key, per_rank), val,
                         classes, size, f"hf:{name} {train_split} (streaming, {world_size} shard(s)) / {val_split}")
    train = load(train_split)
    image_key, label_key, classes = _features(train, name)
    if val_fraction:
        parts = train.train_test_split(test_size=val_fraction, seed=seed)
        train_ds, val_ds = parts["train"], parts["test"]
        where = f"hf:{name} {train_split} ({val_fraction:.0%} held out)"
    else:
        train_ds, val_ds = train, load(val_split)
        where = f"hf:{name} {train_split} / {val_split}"
    if len(train_ds) == 0:
        raise DataSpecError(f"hf:{name}: the {train_split!r} split is empty")
    return ImageData(HFImageDataset(train_ds, image_key, label_key), HFImageDataset(val_ds, image_key, label_key),
                     classes, len(train_ds), where)
