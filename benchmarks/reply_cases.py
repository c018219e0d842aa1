"""The costly replies of issue 20, measured on the server path after Flower's transport.

Each reply travels Flower 1.41's deployment path (``through_superlink``) and
then goes through ``validate_train_reply`` and ``message_bytes`` (what the
round's collect phase calls on every reply); CPU is the least of five runs
(``time.process_time``), peak memory ``tracemalloc``'s, as a multiple of the
model's float32 size.

Run::

    python benchmarks/reply_cases.py            # the digits MLP
    python benchmarks/reply_cases.py --model large
"""

from __future__ import annotations

import argparse
import contextlib
import time
import tracemalloc

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from flowerpress import protocol
from flowerpress.testing import server_identity, through_superlink

Weights = list[np.ndarray]


def _model(name: str) -> Weights:
    from hostile_replies import digits_model, large_model

    return digits_model() if name == "digits" else large_model()


def _reply(content: RecordDict) -> Message:
    ins = Message(RecordDict(), dst_node_id=7, message_type="train")
    ins.metadata.__dict__["_message_id"] = "c" * protocol.MESSAGE_ID_CHARS
    return through_superlink(Message(content, reply_to=ins))


def _path(reply: Message, model: Weights) -> None:
    with contextlib.suppress(protocol.UpdateRejected):
        protocol.validate_train_reply(reply, model)
    with contextlib.suppress(protocol.UpdateRejected):
        protocol.message_bytes(reply)


def _cost(reply: Message, model: Weights, repeats: int = 5) -> tuple[float, int]:
    best, peak = float("inf"), 0
    for _ in range(repeats):
        tracemalloc.start()
        start = time.process_time()
        _path(reply, model)
        best = min(best, time.process_time() - start)
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return best, peak


def cases(model: Weights) -> dict[str, Message]:
    """The honest plain reply and the issue's costly ones."""
    local = [w + np.float32(0.01) for w in model]
    big = Array(dtype="float32", shape=(10_000_000,), stype="numpy.ndarray",
                data=b"\0" * 40_000_000)
    many = {f"m{i}": 1.0 for i in range(50_000)}
    return {
        "honest plain reply": _reply(RecordDict({
            "arrays": ArrayRecord(local),
            "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.2})})),
        "a 40 MB plain array": _reply(RecordDict({
            "arrays": ArrayRecord({"w": big}), "metrics": MetricRecord({"num-examples": 10})})),
        "50,000 metrics": _reply(RecordDict({
            "arrays": ArrayRecord(local), "metrics": MetricRecord(many)})),
        "20,000 tiny arrays": _reply(RecordDict({
            "arrays": ArrayRecord({f"a{i}": Array(np.zeros(1, np.float32))
                                   for i in range(20_000)}),
            "metrics": MetricRecord({"num-examples": 10})})),
        "50,000 entries in an extra record": _reply(RecordDict({
            "arrays": ArrayRecord(local), "metrics": MetricRecord({"num-examples": 10}),
            "x": MetricRecord(many)})),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["digits", "large"], default="digits")
    args = parser.parse_args()
    model = _model(args.model)
    model_bytes = sum(int(w.size) for w in model) * 4
    print("| reply | CPU (ms) | peak (x model) |")
    print("|---|---:|---:|")
    with server_identity():
        for name, reply in cases(model).items():
            cpu, peak = _cost(reply, model)
            print(f"| {name} | {cpu * 1e3:.2f} | {peak / model_bytes:.2f} |")


if __name__ == "__main__":
    main()
