"""An in-process Grid for unit tests of ServerApps, ClientApps and mods.

:class:`InProcessGrid` implements Flower's ``Grid`` interface by calling a
real ``ClientApp`` (mods included) in the same process, one ``Context`` per
node. It is a test double for the transport only: the messages, records and
apps are Flower's own. A ClientApp that raises is answered with an error
reply, as a SuperNode does. Faults are injected per node: a node that never
replies, a node whose reply is rewritten (corrupted payloads, NaN updates).
Simulations and deployments use Flower's simulation engine and SuperLink.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

#: Rewrites a node's reply before the server sees it (fault injection).
ReplyTamper = Callable[[Message], Message]


class NotCarried(Exception):  # noqa: N818 (reads as a verdict)
    """Flower itself refuses to carry a message: the sender, the SuperLink or the
    ServerApp's inflation raised (the reply never reaches flowerpress's code)."""


def through_superlink(msg: Message) -> Message:
    """``msg`` as a ServerApp pulls it from Flower 1.41's SuperLink after a SuperNode sent it.

    The calls of the deployment path, in order, with the real transport's
    bytes in between:

    1. SuperNode (``start_client_internal._insert_message``): the message id is
       its object id; the header goes as ``message_to_proto`` of the message
       without content, the content as deflated objects (``get_all_nested_objects``:
       the RecordDict and ArrayRecord as JSON maps of object ids, an Array's
       dtype, shape and stype as JSON, its data in ``ArrayChunk`` objects,
       Metric/ConfigRecords as protobuf).
    2. SuperLink: ``message_from_proto`` of the header (``Fleet.PushMessages``),
       each object checked against its id and head (``ObjectStore.put``), the
       header again as ``message_to_proto`` (``Runtime.PullMessages``).
    3. ServerApp (``HttpGrid.pull_messages``): ``inflate_object_from_contents``
       and the message id set from the header.

    A hostile device is not bound by step 1's Python objects, only by what
    steps 2 and 3 accept; building a message by setting an Array's fields
    directly (any JSON value) and deflating it covers that space.

    Raises
    ------
    NotCarried
        One of the three parties refuses the message (naming which).
    """
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_id,
        no_object_id_recompute,
    )
    from flwr.supercore.inflatable.inflatable_utils import (
        inflate_object_from_contents,
        validate_object_content,
    )

    try:
        with no_object_id_recompute():
            msg.metadata.__dict__["_message_id"] = msg.object_id
            header = message_to_proto(remove_content_from_message(msg)).SerializeToString()
            contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    except Exception as exc:
        raise NotCarried(f"the SuperNode cannot send it: {type(exc).__name__}") from exc
    try:
        from flwr.proto.message_pb2 import Message as ProtoMessage

        stored = message_from_proto(ProtoMessage.FromString(header))
        for oid, content in contents.items():
            if get_object_id(content) != oid:
                raise ValueError(f"object {oid} does not match its content")
            validate_object_content(content)
        pulled = message_to_proto(stored).SerializeToString()
    except Exception as exc:
        raise NotCarried(f"the SuperLink refuses it: {type(exc).__name__}") from exc
    try:
        msg_id = ProtoMessage.FromString(pulled).metadata.message_id
        out = inflate_object_from_contents(msg_id, contents)
        if not isinstance(out, Message):
            raise TypeError(f"inflated a {type(out).__name__}")
        out.metadata.__dict__["_message_id"] = msg_id
    except Exception as exc:  # HttpGrid.pull_messages raises: the poll drops the reply
        raise NotCarried(f"the ServerApp cannot inflate it: {type(exc).__name__}") from exc
    return out


def through_simulation(msg: Message) -> Message:
    """``msg`` as the ServerApp gets it from Flower 1.41's simulation engine.

    The Ray backend returns the ClientApp's reply from its actor by pickling
    it (``ray.get``); the in-memory LinkState and ``InMemoryGrid`` then hand
    the same Python object to the ServerApp. So every Python value survives,
    including ones the deployment path cannot carry (a metric of 10**400).
    """
    import pickle

    try:
        out = pickle.loads(pickle.dumps(msg, protocol=5))
    except Exception as exc:
        raise NotCarried(f"Ray cannot pickle it: {type(exc).__name__}") from exc
    if not isinstance(out, Message):
        raise NotCarried(f"unpickled a {type(out).__name__}")
    return out


@contextmanager
def server_identity(run_id: int = 1, task_id: int = 1) -> Iterator[None]:
    """Set the process-wide identity Flower stamps on server messages, then restore it.

    Inside a Flower runtime the ServerApp process has this identity; a unit
    test that builds server messages directly needs it too.
    """
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, task_id, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


@dataclass
class InProcessGrid(Grid):
    """A Grid whose nodes run ``client_app`` in this process.

    Use it inside :func:`server_identity` (as a Flower runtime would provide).

    Parameters
    ----------
    client_app
        The ClientApp every node runs.
    num_nodes
        Nodes ``1..num_nodes``; node ``i`` holds partition ``i - 1``.
    node_config
        Extra node-config keys every node gets.
    run_config
        The run config (``context.run_config``) every node sees.
    silent
        Node ids that never reply (a crashed or unreachable device).
    tamper
        Per node id, a function that rewrites its replies to train messages.
    transport
        How every reply travels to the server, e.g. :func:`through_superlink`
        (Flower 1.41's deployment path); a reply it refuses to carry
        (:class:`NotCarried`) never arrives. None: the reply object itself.
    """

    client_app: ClientApp
    num_nodes: int
    node_config: Mapping[str, bool | int | float | str] = field(default_factory=dict)
    #: The run config every node's Context carries (``context.run_config``).
    run_config: Mapping[str, bool | int | float | str] = field(default_factory=dict)
    silent: set[int] = field(default_factory=set)
    tamper: dict[int, ReplyTamper] = field(default_factory=dict)
    transport: ReplyTamper | None = None
    pushed: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._run = Run.create_empty(run_id=1)
        self._replies: dict[str, Message] = {}
        self._contexts = {
            n: Context(run_id=1, node_id=n,
                       node_config={"partition-id": n - 1, "num-partitions": self.num_nodes,
                                    **self.node_config},
                       state=RecordDict(), run_config=dict(self.run_config))
            for n in range(1, self.num_nodes + 1)
        }

    def context(self, node_id: int) -> Context:
        """The persistent Context of a node (its ``state`` survives rounds)."""
        return self._contexts[node_id]

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            # 64 hex characters, like the object ids Flower gives pushed messages
            # (so message sizes match a real run's).
            mid = uuid.uuid4().hex + uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            self.pushed.append(msg)
            node = msg.metadata.dst_node_id
            ids.append(mid)
            if node in self.silent:
                continue
            try:
                reply = self.client_app(msg, self._contexts[node])
            except Exception as exc:  # what a SuperNode does with a failed ClientApp
                # A SuperNode answers for a ClientApp that raised; so does this double.
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      reason=f"{type(exc)}:<'{exc}'>"), reply_to=msg)
            if node in self.tamper and msg.metadata.message_type == "train":
                reply = self.tamper[node](reply)
            if self.transport is not None:
                try:
                    reply = self.transport(reply)
                except NotCarried:
                    continue
            self._replies[mid] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]
        return out

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))


def modules_loaded(code: str, modules: Sequence[str], *, cwd: Path | None = None,
                   timeout: float = 300.0) -> tuple[str, list[str]]:
    """Run ``code`` in a fresh interpreter: what it printed, and which of ``modules`` it loaded.

    A process's import weight (CPU seconds and memory at start-up) is paid by
    every device and server process; tests pin it with this.
    """
    probe = (f"\nimport json as _json, sys as _sys\n"
             f"print(_json.dumps([m for m in {list(modules)!r} if m in _sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code + probe], capture_output=True, text=True,
                         timeout=timeout, check=True, cwd=cwd)
    *printed, last = out.stdout.strip().splitlines()
    loaded: list[str] = json.loads(last)
    return "\n".join(printed), loaded
