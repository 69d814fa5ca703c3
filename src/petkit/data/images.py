"""Image classification tasks: the embedded ``mnist-5k`` and user image folders.

- ``mnist-5k``: the embedded digits (``petkit.data.embedded.mnist_5k``).
- a folder with one sub-folder per class (``cats/1.png``, ``dogs/7.jpg``...): class names are the
  sorted sub-folder names; files are read with Pillow when a batch is built.

Examples are ``{"image": array (H, W) or (H, W, 3) uint8 | file path, "label": int}``; they stay
small. `collate_images` turns a batch into ``pixel_values`` for a ViT: RGB, resized to the model's
input side (bilinear, antialiased), ImageNet-normalised. Nothing is precomputed.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from petkit.core.errors import ConfigError, MissingPackageError
from petkit.data.task import Task, holdout_split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)


def is_image_task(task: Task) -> bool:
    """Whether the task's examples are images."""
    sample = task.train[0] if task.train else task.test[0] if task.test else {}
    return "image" in sample


def load_image_folder(folder: Path, test_fraction: float = 0.2, seed: int = 0) -> Task:
    """A task from `folder/<class>/<image files>`; a seeded stratified test split is carved."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ConfigError(f"image folder {folder} needs >= 2 class sub-folders, found {classes}")
    examples = [{"image": str(f), "label": label}
                for label, name in enumerate(classes)
                for f in sorted((folder / name).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    empty = [c for i, c in enumerate(classes) if not any(e["label"] == i for e in examples)]
    if empty:
        raise ConfigError(f"image folder {folder}: class folder(s) {empty} hold no image "
                          f"({', '.join(IMAGE_SUFFIXES)})")
    train, test = holdout_split(examples, max(1, round(test_fraction * len(examples))), seed)
    return Task(name=folder.name, kind="classification", train=train, test=test,
                label_names=tuple(classes))


def _read(image: Any) -> torch.Tensor:
    """(3, H, W) float in [0, 1] from an array or an image file."""
    if isinstance(image, (str, Path)):
        try:
            from PIL import Image
        except ImportError as err:
            raise MissingPackageError("reading image files needs Pillow. Fix: pip install pillow") from err
        try:
            with Image.open(image) as img:
                image = np.asarray(img.convert("RGB"))
        except OSError as err:
            raise ConfigError(f"cannot read image {image}: {err}") from err
    array = torch.tensor(np.asarray(image), dtype=torch.float32) / 255.0
    if array.dim() == 2:
        array = array.unsqueeze(-1)
    array = array.permute(2, 0, 1)
    return array.expand(3, -1, -1) if array.shape[0] == 1 else array[:3]


def pixel_values(images: list[Any], size: int) -> torch.Tensor:
    """(B, 3, size, size): RGB, resized (bilinear, antialiased), ImageNet-normalised."""
    resized = [F.interpolate(_read(img)[None], size=(size, size), mode="bilinear",
                             align_corners=False, antialias=True)[0] for img in images]
    return (torch.stack(resized) - MEAN) / STD


def collate_images(batch: list[dict], image_size: int) -> dict[str, torch.Tensor]:
    """A batch of image examples -> {"pixel_values", "labels"} for a ViT classifier."""
    if not batch:
        raise ConfigError("cannot collate an empty batch")
    labels = torch.tensor([int(b["labels"] if "labels" in b else b["label"]) for b in batch])
    return {"pixel_values": pixel_values([b["image"] for b in batch], image_size), "labels": labels}


def encode_images(examples: list[dict]) -> list[dict]:
    """The training loop's form: {"image", "labels"}; pixels are made per batch by the collate."""
    return [{"image": e["image"], "labels": int(e["label"])} for e in examples]


def select_classes(examples: list[dict], classes: list[int]) -> list[dict]:
    """Examples of `classes`, relabelled 0..len(classes)-1 in that order (e.g. digits 5-9)."""
    index = {c: i for i, c in enumerate(classes)}
    return [{**e, "label": index[e["label"]]} for e in examples if e["label"] in index]


def few_shot(examples: list[dict], shots: int, seed: int) -> list[dict]:
    """`shots` seeded examples per class (ConfigError if a class has fewer)."""
    by_label: dict[int, list[dict]] = defaultdict(list)
    for e in examples:
        by_label[e["label"]].append(e)
    rng = random.Random(seed)
    picked: list[dict] = []
    for label in sorted(by_label):
        pool = by_label[label]
        if len(pool) < shots:
            raise ConfigError(f"class {label} has {len(pool)} examples, fewer than shots={shots}")
        picked.extend(rng.sample(pool, shots))
    rng.shuffle(picked)
    return picked
