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

import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

#: Rewrites a node's reply before the server sees it (fault injection).
ReplyTamper = Callable[[Message], Message]


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
    """

    client_app: ClientApp
    num_nodes: int
    node_config: Mapping[str, bool | int | float | str] = field(default_factory=dict)
    #: The run config every node's Context carries (``context.run_config``).
    run_config: Mapping[str, bool | int | float | str] = field(default_factory=dict)
    silent: set[int] = field(default_factory=set)
    tamper: dict[int, ReplyTamper] = field(default_factory=dict)
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
            self._replies[mid] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]
        return out

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))
