"""The event envelope of docs/publishing.md, and the checks a publisher makes.

An :class:`Event` serialises to the same JSON object as the Rust ``Event``:
``type``, then ``run_id``, ``thread_id``, ``agent``, ``message_id``, ``delta``
when set, then ``timestamp`` and ``data``. Its ``msg_id`` is the
``Nats-Msg-Id`` header, not part of the payload.
"""

from __future__ import annotations

import datetime
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidEvent

#: The built-in event types. Custom types carry a namespace
#: (``<namespace>.<name>``), so they never collide with a type added here.
BUILT_IN_TYPES = (
    "agent_started",
    "agent_thinking",
    "message_delta",
    "tool_executing",
    "tool_completed",
    "agent_completed",
    "error",
)

#: Longest event type name, in bytes.
MAX_TYPE_LEN = 64

#: Longest ``Nats-Msg-Id``: the stream keeps every id of its duplicate window
#: in memory, so ids are meant to be short.
MAX_MSG_ID_LEN = 256

#: Longest ``message_id`` of a delta event, in characters (docs/publishing.md).
MAX_MESSAGE_ID_CHARS = 128

#: The node's default ``--max-event-bytes``.
DEFAULT_MAX_EVENT_BYTES = 256 * 1024

_USER_ID = re.compile(r"[A-Za-z0-9\-_=@:|+~]{1,128}")
_TYPE_PART = re.compile(r"[a-z0-9_\-]+")


def check_user(user: str) -> str:
    """A user id is one NATS subject token: 1 to 128 ASCII letters, digits or ``-_=@:|+~``."""
    if not _USER_ID.fullmatch(user):
        raise InvalidEvent(f"user id {user!r} is not allowed: use 1 to 128 ASCII letters, digits or -_=@:|+~")
    return user


def check_type(kind: str) -> str:
    """A built-in type, or ``<namespace>.<name>`` of lower-case ASCII letters, digits, ``_`` and ``-``."""
    if kind in BUILT_IN_TYPES:
        return kind
    ok = len(kind.encode()) <= MAX_TYPE_LEN and "." in kind and all(_TYPE_PART.fullmatch(p) for p in kind.split("."))
    if not ok:
        raise InvalidEvent(
            f"event type {kind!r} is not valid: use a built-in type or <namespace>.<name> of ASCII lower-case "
            f"letters, digits, '_' and '-' (at most {MAX_TYPE_LEN} bytes)"
        )
    return kind


def check_msg_id(msg_id: str) -> str:
    """A ``Nats-Msg-Id``: 1 to 256 visible ASCII characters (a CR or LF would start another header)."""
    ok = 0 < len(msg_id) <= MAX_MSG_ID_LEN and all(0x21 <= ord(c) <= 0x7E for c in msg_id)
    if not ok:
        raise InvalidEvent(
            f"message id {msg_id!r} is not valid: use 1 to {MAX_MSG_ID_LEN} visible ASCII characters "
            "(no spaces or control characters)"
        )
    return msg_id


def check_message_id(message_id: str) -> str:
    """A delta event's ``message_id``: 1 to 128 characters."""
    if not 0 < len(message_id) <= MAX_MESSAGE_ID_CHARS:
        raise InvalidEvent(
            f"delta event is not valid: `message_id` is {len(message_id)} characters (a delta event has a string "
            f"`message_id` of 1 to {MAX_MESSAGE_ID_CHARS} characters and a string `delta`)"
        )
    return message_id


def now() -> str:
    """RFC 3339 in UTC with milliseconds, as the envelope's ``timestamp``."""
    t = datetime.datetime.now(datetime.timezone.utc)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_msg_id() -> str:
    """128 random bits in hex: unique without coordination between publishers."""
    return secrets.token_hex(16)


@dataclass
class Event:
    """One event as published. Build it with the class methods; ``msg_id`` is random unless given."""

    type: str
    data: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    thread_id: str | None = None
    agent: str | None = None
    message_id: str | None = None
    delta: str | None = None
    timestamp: str = field(default_factory=now)
    msg_id: str = field(default_factory=new_msg_id)

    # The five agent events, error, custom types and deltas.

    @classmethod
    def agent_started(cls, run_id: str, input: Any) -> Event:
        """A run began; ``input`` is what it was asked."""
        return cls("agent_started", {"input": input}, run_id=run_id)

    @classmethod
    def agent_thinking(cls, run_id: str, text: str) -> Event:
        """Reasoning text the agent chose to show."""
        return cls("agent_thinking", {"text": text}, run_id=run_id)

    @classmethod
    def tool_executing(cls, run_id: str, tool: str, args: Any) -> Event:
        """A tool call began."""
        return cls("tool_executing", {"tool": tool, "args": args}, run_id=run_id)

    @classmethod
    def tool_completed(cls, run_id: str, tool: str, result: Any) -> Event:
        """A tool call returned."""
        return cls("tool_completed", {"tool": tool, "result": result}, run_id=run_id)

    @classmethod
    def agent_completed(cls, run_id: str, output: Any) -> Event:
        """The run finished with ``output``."""
        return cls("agent_completed", {"output": output}, run_id=run_id)

    @classmethod
    def agent_cancelled(cls, run_id: str) -> Event:
        """The run was stopped before it finished: ``agent_completed`` with ``{"status":"cancelled"}``."""
        return cls("agent_completed", {"status": "cancelled"}, run_id=run_id)

    @classmethod
    def error(cls, run_id: str, code: str, message: str) -> Event:
        """The run failed; ``code`` is a short machine-readable reason."""
        return cls("error", {"code": code, "message": message}, run_id=run_id)

    @classmethod
    def custom(cls, kind: str, run_id: str | None, data: dict[str, Any]) -> Event:
        """An event of the caller's own type, ``<namespace>.<name>`` (or any built-in type)."""
        return cls(check_type(kind), dict(data), run_id=run_id)

    @classmethod
    def text_delta(cls, kind: str, run_id: str | None, message_id: str, delta: str) -> Event:
        """Text to append to the message ``message_id``: a delta event of type ``kind``."""
        return cls(check_type(kind), {}, run_id=run_id, message_id=check_message_id(message_id), delta=delta)

    def with_thread(self, thread_id: str) -> Event:
        self.thread_id = thread_id
        return self

    def with_agent(self, agent: str) -> Event:
        self.agent = agent
        return self

    def with_id(self, msg_id: str) -> Event:
        """Sets the ``Nats-Msg-Id``: the same id for the same event published again, and it is stored once."""
        self.msg_id = check_msg_id(msg_id)
        return self

    def check(self) -> None:
        """Raises :class:`InvalidEvent` unless the event follows docs/publishing.md."""
        check_type(self.type)
        check_msg_id(self.msg_id)
        if not isinstance(self.data, dict):
            raise InvalidEvent("event is not a valid envelope: `data` must be a JSON object")
        if (self.message_id is None) != (self.delta is None):
            missing = "delta" if self.delta is None else "message_id"
            raise InvalidEvent(f"delta event is not valid: `{missing}` is missing")
        if self.message_id is not None:
            check_message_id(self.message_id)

    def to_dict(self) -> dict[str, Any]:
        """The payload as a JSON object, in the envelope's field order."""
        out: dict[str, Any] = {"type": self.type}
        for key in ("run_id", "thread_id", "agent", "message_id", "delta"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out["timestamp"] = self.timestamp
        out["data"] = self.data
        return out

    def to_bytes(self) -> bytes:
        """The payload: compact UTF-8 JSON."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()
