"""Bundled datasets and flwr-datasets partitioning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flowerpress.tasks import data
from flowerpress.testing import modules_loaded


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.5", "shard:2"])
def test_partitions_are_disjoint_cover_and_reproducible(scheme: str) -> None:
    # Execute
    parts = data.partition_indices("digits", scheme, 10, 0)
    data.partition_rows.cache_clear()
    data._partitioner.cache_clear()
    again = data.partition_indices("digits", scheme, 10, 0)
    # Assert
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)
    assert len(joined) <= len(data.load_pooled("digits", 0, 10).train)
    if scheme != "shard:2":  # shards may leave an incomplete last shard out
        assert len(joined) == len(data.load_pooled("digits", 0, 10).train)
    for a, b in zip(parts, again, strict=True):
        np.testing.assert_array_equal(np.sort(a), np.sort(b))


def test_a_client_loads_only_its_own_partition() -> None:
    # Prepare: a fresh process's caches
    data.partition_rows.cache_clear()
    data._partitioner.cache_clear()
    # Execute
    split = data.load_partition("digits", "iid", 7, 1000, 0)
    # Assert: one partition loaded; IidPartitioner's contiguous shard of the pooled rows
    assert data.partition_rows.cache_info().currsize == 1
    pooled = data.load_pooled("digits", 0, 1000).train
    rows = np.array_split(np.arange(len(pooled.y)), 1000)[7]
    np.testing.assert_array_equal(split.y, pooled.y[rows])


def test_dirichlet_skews_labels_more_than_iid() -> None:
    # Prepare
    y = data.load_pooled("mnist", 0, 20).train.y

    def mean_classes(scheme: str) -> float:
        parts = data.partition_indices("mnist", scheme, 20, 0)
        return float(np.mean([len(np.unique(y[p])) for p in parts]))

    # Execute / Assert
    assert mean_classes("iid") == 10
    assert mean_classes("dirichlet:0.1") < 6
    assert mean_classes("shard:2") < 3  # a shard may straddle two labels


def test_mnist_is_shuffled_real_digits() -> None:
    # Execute
    pooled = data.load_pooled("mnist", 0, 10)
    # Assert: 5,000 digits split 80/20, labels mixed (the raw file is sorted)
    assert len(pooled.train) == 4000 and len(pooled.test) == 1000
    assert pooled.train.x.shape[1:] == (1, 28, 28)
    assert len(np.unique(pooled.test.y[:50])) >= 5


def test_digits_are_scikit_learns_read_without_importing_it() -> None:
    # Prepare
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Execute
    pooled = data._digits(0)
    printed, loaded = modules_loaded(
        "from flowerpress.tasks.data import _digits; p = _digits(0); "
        "print(len(p.train.y) + len(p.test.y))", ["sklearn"], timeout=120)
    # Assert: the same rows (shuffled by the seed) and scikit-learn never imported
    rows = np.concatenate([pooled.train.x, pooled.test.x])
    labels = np.concatenate([pooled.train.y, pooled.test.y])
    order, expected = np.lexsort(rows.T), np.lexsort((bunch.data / 16.0).T)
    np.testing.assert_array_equal(rows[order], bunch.data[expected] / 16.0)
    np.testing.assert_array_equal(labels[order], bunch.target[expected])
    assert (printed, loaded) == ("1797", [])


def test_synthetic_is_naturally_federated() -> None:
    # Execute
    parts = data.partition_indices("synthetic:1,1", "iid", 30, 0)
    pooled = data.load_pooled("synthetic:1,1", 0, 30)
    # Assert: one partition per device; each device's rows share one device id
    assert len(parts) == 30
    for i, idx in enumerate(parts):
        assert set(pooled.groups[idx].tolist()) == {i}  # type: ignore[index]
    assert pooled.train.x.shape[1] == 60


def test_synthetic_generator_is_seeded() -> None:
    # Execute
    a = data.synthetic(0.5, 0.5, num_devices=5, rng=np.random.default_rng(1))
    b = data.synthetic(0.5, 0.5, num_devices=5, rng=np.random.default_rng(1))
    # Assert
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)


def test_synthetic_labels_are_the_argmax_of_each_devices_linear_model() -> None:
    # Prepare: the generator's draws, replayed with the same seed
    x, y, device = data.synthetic(0.5, 0.5, num_devices=20, rng=np.random.default_rng(3))
    rng = np.random.default_rng(3)
    sizes = np.minimum(rng.lognormal(4, 2, 20).astype(np.int64) + 50, 1000)
    cov = np.power(np.arange(1, 61, dtype=np.float64), -1.2)
    expected = []
    for n in sizes:
        u_k, b_k = rng.normal(0, np.sqrt(0.5)), rng.normal(0, np.sqrt(0.5))
        v_k = rng.normal(b_k, 1, 60)
        w, b = rng.normal(u_k, 1, (60, 10)), rng.normal(u_k, 1, 10)
        rows = rng.normal(v_k, np.sqrt(cov), (int(n), 60))
        expected.append(np.argmax(rows @ w + b, axis=1))  # BLAS, as before einsum
    # Assert: the same labels as the BLAS product, row for row
    np.testing.assert_array_equal(y, np.concatenate(expected))
    assert len(x) == len(y) == len(device) == int(sizes.sum())


def test_out_of_range_partition_is_a_clear_error() -> None:
    with pytest.raises(data.DataError, match="partition-id 7 is out of range"):
        data.load_partition("digits", "iid", 7, 4, 0)


def test_hub_path_loads_a_local_dataset_directory(tmp_path: Path) -> None:
    # Prepare: a dataset directory laid out as on the hub (parquet train/test splits)
    import datasets

    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 20)):
        images = rng.integers(0, 255, (n, 8, 8)).astype(np.uint8).tolist()
        table = datasets.Dataset.from_dict({"image": images, "label": (np.arange(n) % 3).tolist()})
        table.to_parquet(str(tmp_path / f"{split}.parquet"))
    name = "hub:" + str(tmp_path)
    # Execute
    part = data.load_partition(name, "iid", 1, 3, 0)
    test = data.load_test(name, 0, 3)
    # Assert
    assert len(part) == 20 and part.x.shape[1:] == (1, 8, 8)
    assert float(part.x.max()) <= 1.0
    assert len(test) == 20
    assert data.num_classes_of(name, 0, 3) == 3


def test_partitioning_leaves_flwr_datasets_plots_unloaded_until_used() -> None:
    # Execute: what a device process does, then what a user plotting partitions does
    plots = ["seaborn", "scipy.stats", "matplotlib.pyplot"]
    printed, loaded = modules_loaded(
        "import sys\n"
        "from flowerpress.tasks.data import partition_rows\n"
        "rows = partition_rows('digits', 'dirichlet:0.5', 8, 0, 3)\n"
        f"before = [m for m in {plots!r} if m in sys.modules]\n"
        "from flwr_datasets.visualization import plot_label_distributions\n"
        "import flwr_datasets\n"
        "print(len(rows) > 0, before, callable(plot_label_distributions),\n"
        "      callable(flwr_datasets.visualization.plot_comparison_label_distribution))",
        plots, timeout=120)
    # Assert: the partition is the library's; the plots load in full once read
    assert printed == "True [] True True"
    assert sorted(loaded) == sorted(plots)
