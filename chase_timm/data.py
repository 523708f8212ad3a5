"""The embedded default dataset: scikit-learn's bundled handwritten digits, offline and tiny.

1,797 greyscale 8x8 images of the digits 0-9 (UCI Optical Recognition of Handwritten Digits), shipped inside
scikit-learn, so examples, tests and the training recipe run without any download. Images come out as RGB
PIL images, ready for ``timm.data.create_transform`` (which also upsamples them to the model's input size).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["DigitsDataset", "digits_splits", "DIGITS_CLASSES"]

DIGITS_CLASSES = tuple(str(i) for i in range(10))


def _load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 images (N, 8, 8) scaled 0-255 and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # scikit-learn is an optional (recipes) dependency
        raise ImportError("The embedded digits dataset needs scikit-learn: pip install 'chase-timm[recipes]'.") from e
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def digits_splits(val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Deterministic stratified train/val split: ``{"train": (images, labels), "val": (images, labels)}``."""
    from sklearn.model_selection import train_test_split

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
