"""Control requests: the browser's Stop button and questions, answered by the agent.

A node sends each request of a socket to ``<prefix>.<user_id>`` as a NATS
request with the headers ``Agentcast-User`` (the token's user, the same as
the subject's last token), ``Agentcast-Node`` and ``Agentcast-Request`` (the
client's id), and the client's ``data`` object as payload
(docs/publishing.md, section 9). A :class:`ControlListener` subscribes in a
queue group, so each request goes to one instance of the agent service, and
hands over only messages that are such requests; others are logged and
skipped (the client is then told ``timeout``). The same checks as the Rust
``agentcast::control::Listener``.

Requests are delivered at most once: make actions safe to repeat, and
publish what happened as an event (it is stored).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator

from .errors import InvalidRequest
from .events import DEFAULT_MAX_EVENT_BYTES, check_user

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

#: The nodes' default ``--control-prefix``.
DEFAULT_PREFIX = "agentcast.control"
HEADER_USER = "Agentcast-User"
HEADER_NODE = "Agentcast-Node"
HEADER_REQUEST = "Agentcast-Request"

#: Largest reply the node forwards: its ``--max-event-bytes`` default. A
#: larger reply reaches the client as an error, so it is refused here.
MAX_REPLY_BYTES = DEFAULT_MAX_EVENT_BYTES

#: Requests received and not yet taken by the iterating agent. nats-py's
#: default pending limit is far larger; a burst beyond this is dropped by
#: nats-py (and counted as a slow consumer), and those clients are told
#: ``timeout``: a request is worth nothing after the nodes' timeout anyway.
PENDING_REQUESTS = 4096


@dataclass
class ControlRequest:
    """One control request of a user's socket."""

    #: The user whose socket sent it, from the token: trust it, not ``data``.
    user: str
    #: The client's id for the request.
    id: str
    #: The node that sent it.
    node: str
    #: The request's ``data`` object, as the client sent it: check it as that user's input.
    data: dict[str, Any]
    _msg: Msg

    async def reply(self, data: dict[str, Any]) -> None:
        """Answers with a JSON object; the client receives it as ``control_reply``. Only the first answer counts."""
        if not isinstance(data, dict):
            raise TypeError("the reply must be a JSON object (a dict)")
        if not self._msg.reply:
            raise InvalidRequest("the request has no reply subject (it was not sent as a request)")
        body = json.dumps(data, separators=(",", ":")).encode()
        if len(body) > MAX_REPLY_BYTES:
            raise ValueError(f"the reply is {len(body)} bytes; the limit is {MAX_REPLY_BYTES}")
        await self._msg.respond(body)


def parse(prefix: str, msg: Msg) -> ControlRequest:
    """The request in ``msg``, or :class:`InvalidRequest` saying why it is not one."""
    subject = msg.subject
    user = subject[len(prefix) + 1 :] if subject.startswith(prefix + ".") else ""
    try:
        check_user(user)
    except ValueError:
        raise InvalidRequest(f"subject {subject!r} is not {prefix}.<user id>") from None
    headers = msg.headers or {}
    if headers.get(HEADER_USER) != user:
        raise InvalidRequest(f"the {HEADER_USER} header does not name the subject's user")
    request_id = headers.get(HEADER_REQUEST)
    if not request_id:
        raise InvalidRequest(f"no {HEADER_REQUEST} header")
    try:
        data = json.loads(msg.data or b"{}")
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise InvalidRequest("the payload is not a JSON object")
    return ControlRequest(user, request_id, headers.get(HEADER_NODE, ""), data, msg)


class ControlListener:
    """The agent side: ``<prefix>.*`` in a queue group. Iterate it for requests::

        listener = await ControlListener.subscribe(nc, group="my-agents")
        async for req in listener:
            if req.data.get("action") == "cancel":
                ...  # stop the run, if it is req.user's
                await req.reply({"status": "cancelled", "run_id": req.data.get("run_id")})
    """

    def __init__(self, prefix: str, sub: Subscription) -> None:
        self.prefix = prefix
        self._sub = sub

    @classmethod
    async def subscribe(cls, nc: Client, *, group: str, prefix: str = DEFAULT_PREFIX) -> ControlListener:
        sub = await nc.subscribe(f"{prefix}.*", queue=group, pending_msgs_limit=PENDING_REQUESTS)
        # The subscription is known to the server once this returns, so a
        # request sent after it is not lost to "no responders".
        await nc.flush()
        return cls(prefix, sub)

    def __aiter__(self) -> AsyncIterator[ControlRequest]:
        return self._requests()

    async def _requests(self) -> AsyncIterator[ControlRequest]:
        async for msg in self._sub.messages:
            try:
                yield parse(self.prefix, msg)
            except InvalidRequest as e:
                log.warning("not a control request; skipped: %s", e)

    async def close(self) -> None:
        """Unsubscribes; the iteration ends."""
        await self._sub.unsubscribe()
