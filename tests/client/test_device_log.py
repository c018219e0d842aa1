"""The device's log file (node config ``log-file``): one line per message, problems too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.error import Error

from flowerpress import protocol
from flowerpress.client.mods import device_log_mod
from flowerpress.deploy.devicelog import remove_device_logs
from flowerpress.testing import server_identity


@pytest.fixture(autouse=True)
def _detach() -> Iterator[None]:
    yield
    remove_device_logs()  # no test leaves a handler on the loggers


def _context(node_config: dict[str, str]) -> Context:
    return Context(run_id=7, node_id=42, node_config=dict(node_config), state=RecordDict(),
                   run_config={})


def _train(server_round: int) -> Message:
    content = RecordDict({protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: server_round})})
    return Message(content, dst_node_id=42, message_type="train")


def test_every_message_is_one_line_with_its_round_time_and_outcome(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "logs" / "device.log"
    context = _context({"log-file": str(path)})
    with server_identity():
        first, second = _train(3), _train(4)

        def ok(msg: Message, ctx: Context) -> Message:
            return Message(RecordDict(), reply_to=msg)

        def refused(msg: Message, ctx: Context) -> Message:
            return Message(Error(code=0, reason="TaskError: device data\nbad file"),
                           reply_to=msg)

        # Execute
        device_log_mod(first, context, ok)
        device_log_mod(second, context, refused)
    # Assert: the directory was created; one line per message
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert "node 42, run 7, train message (round 3): replied in" in lines[0]
    assert "s after the server sent it), ok" in lines[0] and lines[0].endswith(", ok")
    assert lines[1].endswith("error reply: TaskError: device data bad file")


def test_an_exception_is_logged_with_its_traceback_and_raised(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "device.log"

    def broken(msg: Message, ctx: Context) -> Message:
        raise RuntimeError("out of memory")

    # Execute
    with server_identity(), pytest.raises(RuntimeError):
        device_log_mod(_train(1), _context({"log-file": str(path)}), broken)
    # Assert
    text = path.read_text()
    assert "the ClientApp raised" in text and "Traceback" in text and "out of memory" in text


def test_without_log_file_nothing_is_written(tmp_path: Path) -> None:
    # Execute
    with server_identity():
        reply = device_log_mod(_train(1), _context({}),
                               lambda msg, ctx: Message(RecordDict(), reply_to=msg))
    # Assert
    assert not reply.has_error() and list(tmp_path.iterdir()) == []


def test_problems_still_reach_the_supernodes_output(tmp_path: Path) -> None:
    # Prepare: a fresh process without logging configuration, as a ClientApp process is
    import subprocess
    import sys

    code = ("import logging; from pathlib import Path; "
            "from flowerpress.deploy.devicelog import install_device_log; "
            f"install_device_log(Path({str(tmp_path / 'device.log')!r})); "
            "logging.getLogger('flowerpress.client.app').error('flowerpress: bad data'); "
            "logging.getLogger('flowerpress.client.mods').info('one line per message')")
    # Execute
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    # Assert: the error on stderr (what the SuperNode prints) and in the file; INFO only there
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "flowerpress: bad data"
    text = (tmp_path / "device.log").read_text()
    assert "ERROR flowerpress.client.app: flowerpress: bad data" in text
    assert "one line per message" in text
