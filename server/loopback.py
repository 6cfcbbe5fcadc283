"""An in-process Flower Grid: every message goes to a handler per node, through Flower's serialisation.

For tests and benchmarks of the coordinator without a SuperLink. Each instruction and each
reply is deflated into Flower's wire objects and inflated again (exactly what crosses the
network in a real deployment), so the coordinator validates decoded messages and the byte
counts are those Flower transfers. Real deployments use the SuperLink's Grid; nothing in
`server.federation` knows the difference.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Error, Message
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

Handler = Callable[[Message], Message]


def roundtrip(message: Message) -> tuple[Message, int]:
    """The message as the receiver sees it after Flower's (de)serialisation, and its size in bytes."""
    objects = get_all_nested_objects(message)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    size = sum(len(c) for c in contents.values())
    decoded = inflate_object_from_contents(message.object_id, contents)
    assert isinstance(decoded, Message)
    return decoded, size


@dataclass
class Traffic:
    """Bytes and time per direction, for benchmarks."""

    down_bytes: dict[int, int] = field(default_factory=dict)
    up_bytes: dict[int, int] = field(default_factory=dict)
    handler_seconds: float = 0.0
    handler_seconds_by_group: dict[str, float] = field(default_factory=dict)  # group id = round
    replies: list[Message] = field(default_factory=list)


class LoopbackGrid(Grid):
    """Grid over in-process handlers (one per node id); nodes can be added and removed."""

    def __init__(self, handlers: dict[int, Handler], run_id: int = 1) -> None:
        self.handlers = dict(handlers)
        self.silent: set[int] = set()  # connected but never answering (a killed process the SuperLink still lists)
        self.traffic = Traffic()
        self._run: Any = None
        TaskIdentity.run_id = run_id  # messages created by the coordinator need an identity
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 0

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: Any, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.handlers)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LoopbackGrid delivers synchronously; use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LoopbackGrid delivers synchronously; use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies: list[Message] = []
        for message in messages:
            node = message.metadata.dst_node_id
            handler = self.handlers.get(node)
            if handler is None or node in self.silent:  # like a SuperLink timeout: no reply at all
                continue
            received, size = roundtrip(message)
            self.traffic.down_bytes[node] = self.traffic.down_bytes.get(node, 0) + size
            t0 = time.perf_counter()
            try:
                reply = handler(received)
            except Exception as exc:  # the ClientApp raised: Flower sends an error reply
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=received)
            spent = time.perf_counter() - t0
            self.traffic.handler_seconds += spent
            group = received.metadata.group_id
            self.traffic.handler_seconds_by_group[group] = self.traffic.handler_seconds_by_group.get(group, 0.0) + spent
            decoded, size = roundtrip(reply)
            self.traffic.up_bytes[node] = self.traffic.up_bytes.get(node, 0) + size
            self.traffic.replies.append(decoded)
            replies.append(decoded)
        return replies
