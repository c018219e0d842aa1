"""Shared helpers of the secure-aggregation tests: a grid whose devices vanish mid-round."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message

from flowerpress.secagg import messages
from flowerpress.testing import InProcessGrid


@dataclass
class VanishingGrid(InProcessGrid):
    """An InProcessGrid whose node ``n`` stops answering from SecAgg stage ``vanish[n]`` on.

    ``vanish={7: "unmask"}``: node 7 sends its masked input, then disappears.
    """

    vanish: dict[int, str] = field(default_factory=dict)

    def push_messages(self, messages_: Iterable[Message]) -> Iterable[str]:
        pushed = list(messages_)
        ids = list(super().push_messages(pushed))
        for mid, msg in zip(ids, pushed, strict=True):
            stage = messages.stage_of(msg)
            cut = self.vanish.get(msg.metadata.dst_node_id)
            if stage is not None and cut is not None and \
                    messages.STAGES.index(stage) >= messages.STAGES.index(cut):
                self._replies.pop(mid, None)
        return ids
