"""flowerpress's ClientApp on a device: data from the device cache, one-line errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, RecordDict

from flowerpress.client import app as app_module
from flowerpress.client.app import client_app
from flowerpress.deploy.cache import DeviceCache
from flowerpress.deploy.data import save_device_data
from flowerpress.protocol import CONFIG, TrainInstruction
from flowerpress.tasks import data as datasets
from flowerpress.tasks.bundled import BundledTask
from flowerpress.tasks.registry import build_task
from flowerpress.testing import server_identity

RUN_CONFIG = {"dataset": "digits", "local-epochs": 1, "batch-size": 16, "lr": 0.1,
              "num-clients": 3, "seed": 0}


def _train_msg(weights: list[np.ndarray]) -> Message:
    content = RecordDict({"arrays": ArrayRecord(weights)})
    content[CONFIG] = TrainInstruction(server_round=1, seed=0, compression="none",
                                       cohort_size=3).to_record()
    msg = Message(content, dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m1"
    return msg


def _context(node_config: dict[str, str | int]) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config=dict(RUN_CONFIG))


@pytest.fixture
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ClientApp call as in a new process: no task or data kept in memory."""
    monkeypatch.setattr(app_module, "_TASKS", {})
    monkeypatch.setattr(app_module, "_DATA", {})


def _weights() -> list[np.ndarray]:
    return build_task("bundled", RUN_CONFIG).initial_weights()


def test_bad_data_file_is_one_error_reply_and_one_log_line(
    tmp_path: Path, fresh_process: None, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a CSV saved under the .npz name
    bad = tmp_path / "data.npz"
    bad.write_text("x,y\n0.1,1\n")
    app = client_app()

    # Execute
    with server_identity(), caplog.at_level(logging.DEBUG):
        msg = _train_msg(_weights())
        reply = app(msg, _context({"data-path": str(bad), "cache-dir": str(tmp_path / "c")}))

    # Assert: an error reply naming the file; one line logged, no traceback
    assert reply.has_error()
    assert str(bad) in reply.error.reason and "not an .npz archive" in reply.error.reason
    assert "\n" not in reply.error.reason and "pickle" not in reply.error.reason
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert "\n" not in errors[0].getMessage()


def test_device_file_of_the_wrong_shape_is_one_line(tmp_path: Path, fresh_process: None) -> None:
    # Prepare: 28x28 images for a digits (64-feature) model
    path = save_device_data(tmp_path / "mnist.npz", np.zeros((4, 1, 28, 28)), [0, 1, 2, 3])
    app = client_app()

    # Execute
    with server_identity():
        reply = app(_train_msg(_weights()), _context({"data-path": str(path)}))

    # Assert
    assert reply.has_error() and "(1, 28, 28)" in reply.error.reason
    assert "\n" not in reply.error.reason


def test_cached_partition_trains_without_loading_the_dataset(
    tmp_path: Path, fresh_process: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the first message computes and caches partition 0 of 3
    config = {"partition-id": 0, "num-partitions": 3, "cache-dir": str(tmp_path / "cache")}
    with server_identity():
        first = client_app()(_train_msg(_weights()), _context(config))
    assert not first.has_error()
    (entry,) = DeviceCache(tmp_path / "cache").entries()

    # Execute: the next message, in a "new process", with the dataset unavailable
    monkeypatch.setattr(app_module, "_TASKS", {})
    monkeypatch.setattr(app_module, "_DATA", {})

    def unavailable(*args: object, **kwargs: object) -> None:
        raise AssertionError("the device loaded the whole dataset")

    monkeypatch.setattr(datasets, "load_pooled", unavailable)
    monkeypatch.setattr(datasets, "load_partition", unavailable)
    with server_identity():
        second = client_app()(_train_msg(_weights()), _context(config))

    # Assert: the same training (same data, same seed) from the cached partition
    assert not second.has_error()
    a = first.content.array_records["arrays"].to_numpy_ndarrays()
    b = second.content.array_records["arrays"].to_numpy_ndarrays()
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert DeviceCache(tmp_path / "cache").entries() == [entry]


def test_cached_partition_equals_the_computed_one(tmp_path: Path) -> None:
    # Prepare
    task = BundledTask(dataset="digits", num_partitions=3)
    config = {"partition-id": 1, "num-partitions": 3, "cache-dir": str(tmp_path)}

    # Execute
    computed = task.load_data(config)
    cached = BundledTask(dataset="digits", num_partitions=3).load_data(config)
    plain = task.load_data({"partition-id": 1, "num-partitions": 3})

    # Assert
    for split in (cached, plain):
        np.testing.assert_array_equal(split.x, computed.x)
        np.testing.assert_array_equal(split.y, computed.y)


def test_hub_model_shape_comes_from_the_cached_partition(tmp_path: Path) -> None:
    # Prepare: a cache entry as a hub partition leaves it (no network in tests)
    task = BundledTask(dataset="hub:someone/tiny", num_partitions=2)
    config = {"partition-id": 0, "num-partitions": 2, "cache-dir": str(tmp_path)}
    from flowerpress.deploy.cache import cache_key
    from flowerpress.tasks.bundled import _library_versions

    key = cache_key("bundled-partition", "hub:someone/tiny", "dirichlet:0.5", 0, 2, 0,
                    *_library_versions("hub:someone/tiny"))
    DeviceCache(tmp_path).put(key, np.zeros((5, 1, 8, 8), np.float32), np.arange(5),
                              {"sample_shape": [1, 8, 8], "num_classes": 7})

    # Execute
    split = task.load_data(config)
    model = task.build_model()

    # Assert: the CNN for 8x8 images and 7 classes, built without the dataset
    assert split.x.shape == (5, 1, 8, 8)
    assert model(__import__("torch").zeros(2, 1, 8, 8)).shape == (2, 7)
