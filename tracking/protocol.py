"""The telemetry protocol: decoding, validation and upcasting of reported events.

Validation runs on the hot path, so it uses msgspec structs (see
docs/decisions/0002-msgspec-validation.md), not DRF serializers. A request body
is decoded in two passes: first into raw per-event byte slices, then each event
on its own, so one bad event (even one nested too deeply to decode) never
drops the others.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args

import msgspec

from outbox.versions import message_type

CURRENT_VERSION = 1

EventType = Literal[
    "saga.started",
    "saga.completed",
    "saga.failed",
    "saga.compensating",
    "saga.compensated",
    "saga.compensation_failed",
    "saga.cancelled",
    "step.started",
    "step.succeeded",
    "step.failed",
    "step.timed_out",
    "compensation.started",
    "compensation.succeeded",
    "compensation.failed",
    "heartbeat",
    "message.published",
    "message.consumed",
    "tx.prepared",
    "tx.committed",
    "tx.rolled_back",
]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)

Scalar = str | int | float | bool | None
HexTraceId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]
HexSpanId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{16}$")]


class ErrorInfo(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    type: Annotated[str, msgspec.Meta(max_length=200)] = ""
    message: Annotated[str, msgspec.Meta(max_length=4000)] = ""
    retryable: bool | None = None


class MessageInfo(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    version: Annotated[int, msgspec.Meta(ge=1)] = 1


class EventV1(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Protocol version 1, field for field as docs/protocol.md describes it."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    saga_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    type: EventType
    occurred_at: datetime
    version: int = 1
    saga_type: Annotated[str, msgspec.Meta(max_length=100)] = ""
    step: Annotated[str, msgspec.Meta(max_length=100)] = ""
    attempt: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1
    service: Annotated[str, msgspec.Meta(max_length=100)] = ""
    sequence: Annotated[int, msgspec.Meta(ge=0, le=2**62)] | None = None
    deadline: datetime | None = None
    idempotency_key: Annotated[str, msgspec.Meta(max_length=200)] = ""
    message: MessageInfo | None = None
    error: ErrorInfo | None = None
    attributes: Annotated[
        dict[Annotated[str, msgspec.Meta(max_length=100)], Scalar], msgspec.Meta(max_length=64)
    ] = {}
    payload: dict[str, Any] | None = None
    trace_id: HexTraceId = ""
    span_id: HexSpanId = ""


class _Peek(msgspec.Struct):
    """Read before validation: which version to decode, and the id to answer with.

    An event without ``version`` is version 1, now and after later versions exist.
    """

    version: int = 1
    id: Any = None


# --- upcasting -------------------------------------------------------------
# The telemetry protocol is a message type in outbox.versions like any other:
# an upcaster registered there turns a decoded event of version N into N + 1
# (``@upcaster(PROTOCOL, N)``). Version 1 is the first, so the chain is empty
# today; docs/protocol.md says how to add one.
PROTOCOL = "sagaadmin.telemetry"
PROTOCOL_TYPE = message_type(PROTOCOL, current=CURRENT_VERSION)


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str
    message: str


class EventRejected(Exception):
    def __init__(self, field: str, message: str, event_id: str | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.error = FieldError(field, message)
        self.event_id = event_id


class RequestMalformed(Exception):
    """The body as a whole is not a protocol request (400)."""


class TooManyEvents(Exception):
    """More events in one batch than allowed (413)."""


_NAMED = re.compile(r"^Object (?:missing required|contains unknown) field `([^`]*)`")
_AT = re.compile(r"^(?P<msg>.*?)(?: - at (?:`[^`]*` in )?`\$(?P<path>[^`]*)`)?$", re.S)


def _field_error(exc: msgspec.ValidationError) -> EventRejected:
    match = _AT.match(str(exc))
    assert match is not None
    path = (match.group("path") or "").replace("[...]", "").lstrip(".")
    message = match.group("msg")
    if named := _NAMED.match(message):  # "Object missing required field `id`"
        path = f"{path}.{named.group(1)}" if path else named.group(1)
    path = path or "event"
    if message.startswith("Invalid enum value") and path == "type":
        message += "; expected one of: " + ", ".join(EVENT_TYPES)
    return EventRejected(path, message)


def split_body(body: bytes, *, max_events: int) -> list[msgspec.Raw]:
    """Split a request body into one raw slice per event.

    Accepts one event object or ``{"events": [...]}``.
    """
    try:
        top = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
    except msgspec.ValidationError as exc:
        raise RequestMalformed(
            'The body must be a JSON object: one event, or {"events": [...]}.'
        ) from exc
    except (msgspec.DecodeError, RecursionError) as exc:
        raise RequestMalformed(f"The body is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise RequestMalformed(f"The body is not valid UTF-8 JSON: {exc}") from exc
    if "events" not in top:
        return [msgspec.Raw(body)]
    if len(top) != 1:
        extra = sorted(k for k in top if k != "events")
        raise RequestMalformed(f"A batch has only the field 'events'; unexpected: {extra}.")
    try:
        raws = msgspec.json.decode(top["events"], type=list[msgspec.Raw])
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise RequestMalformed("'events' must be a JSON array of event objects.") from exc
    if len(raws) > max_events:
        raise TooManyEvents(f"The batch has {len(raws)} events; at most {max_events} are allowed.")
    return raws


def decode_event(raw: msgspec.Raw | bytes) -> EventV1:
    """Decode and upcast one event; raise :class:`EventRejected` naming the field."""
    try:
        peek = msgspec.json.decode(raw, type=_Peek)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        peek = _Peek()
    try:
        return _decode(raw, peek.version)
    except EventRejected as exc:
        exc.event_id = peek.id if isinstance(peek.id, str) else None
        raise


def event_from_dict(data: dict[str, Any]) -> EventV1:
    """Validate an event built in this process (the OTLP mapping): the same checks as
    :func:`decode_event`, without a JSON round trip. Raises :class:`EventRejected`."""
    try:
        event = msgspec.convert(data, EventV1)
    except msgspec.ValidationError as exc:
        rejected = _field_error(exc)
        rejected.event_id = data.get("id") if isinstance(data.get("id"), str) else None
        raise rejected from exc
    if b"\\u0000" in msgspec.json.encode(event):  # the walk only when a NUL may be there
        _check_no_nul(event)
    _check_rules(event)
    return event


def _decode(raw: msgspec.Raw | bytes, version: int) -> EventV1:
    try:
        if version == CURRENT_VERSION:
            event = msgspec.json.decode(raw, type=EventV1)
        elif version in PROTOCOL_TYPE.supported():
            data = PROTOCOL_TYPE.upcast(version, msgspec.json.decode(raw, type=dict[str, Any]))
            data["version"] = CURRENT_VERSION
            event = msgspec.convert(data, EventV1)
        else:
            raise EventRejected(
                "version",
                f"unsupported protocol version {version}; supported: "
                + ", ".join(map(str, PROTOCOL_TYPE.supported())),
            )
    except msgspec.ValidationError as exc:
        raise _field_error(exc) from exc
    except msgspec.DecodeError as exc:
        raise EventRejected("event", f"not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise EventRejected("payload", "nested too deeply to decode") from exc
    except UnicodeDecodeError as exc:
        raise EventRejected("event", f"not valid UTF-8: {exc}") from exc
    if b"\\u0000" in memoryview(raw).tobytes():  # JSON writes NUL as \u0000: rare, then look
        _check_no_nul(event)
    _check_rules(event)
    return event


# Times outside these bounds are refused: a clock that far off is a bug, not skew, and
# arithmetic near datetime's limits (UTC conversion, tie-breaking by a microsecond) fails.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 1, 1, tzinfo=UTC)


def _check_time(field: str, value: datetime) -> None:
    if value.tzinfo is None:
        raise EventRejected(field, "must be RFC 3339 with a UTC offset (e.g. 'Z')")
    try:
        in_range = EARLIEST <= value < LATEST
    except OverflowError:  # its UTC offset takes it past datetime's range
        in_range = False
    if not in_range:
        raise EventRejected(
            field, "must lie from 1970-01-01T00:00:00Z up to (not including) 9999-01-01T00:00:00Z"
        )


def _nul_at(value: Any, path: str) -> str | None:
    """The path of the first string (value or key) holding a NUL character. Iterative:
    it runs before the payload's depth check, on however deep a value was sent."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                return at
        elif isinstance(node, dict):
            items = list(node.items())
            for key, _ in items:
                if isinstance(key, str) and "\x00" in key:
                    return f"{at}.{key.replace(chr(0), '')}"
            stack.extend((item, f"{at}.{key}") for key, item in reversed(items))
        elif isinstance(node, list | tuple):
            stack.extend((item, f"{at}[{i}]") for i, item in reversed(list(enumerate(node))))
        elif isinstance(node, msgspec.Struct):
            stack.extend(
                (getattr(node, name), f"{at}.{name}" if at else name)
                for name in reversed(node.__struct_fields__)
            )
    return None


def nul_path(value: Any) -> str | None:
    """Where a NUL character is in a decoded JSON value ("a.b[2]", "body" for a bare
    string), or None."""
    path = _nul_at(value, "")
    return None if path is None else (path.lstrip(".") or "body")


def _check_no_nul(event: EventV1) -> None:
    """PostgreSQL stores no NUL character in text or JSON: refuse it, naming the field."""
    if path := _nul_at(event, ""):
        if len(path) > 200:  # deep in a nested value: its start says where
            path = path[:200] + "…"
        raise EventRejected(path, "contains a NUL character (\\u0000), which cannot be stored")


def _check_rules(event: EventV1) -> None:
    _check_time("occurred_at", event.occurred_at)
    if event.deadline is not None:
        _check_time("deadline", event.deadline)
    kind = event.type.partition(".")[0]
    if event.type == "saga.started" and not event.saga_type:
        raise EventRejected("saga_type", "is required on saga.started")
    if kind in ("step", "compensation") and not event.step:
        raise EventRejected("step", f"is required on {event.type}")
    if kind == "message" and event.message is None:
        raise EventRejected("message", f"is required on {event.type}: {{name, id, version}}")


# --- payload hygiene -------------------------------------------------------
REDACTED = "[redacted]"


def payload_depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in node)
    return deepest


def redact_keys() -> frozenset[str]:
    """``SAGAADMIN_PAYLOAD_REDACT_KEYS``, lower-cased: the keys whose values are secrets."""
    from django.conf import settings

    return frozenset(k.lower() for k in settings.SAGAADMIN["PAYLOAD_REDACT_KEYS"])


def redacted(value: Any) -> Any:
    """``value`` with the configured secret keys' values replaced (pages and the API)."""
    return redact(value, redact_keys())


def redact(value: Any, keys: frozenset[str]) -> Any:
    if isinstance(value, dict):
        return {k: (REDACTED if k.lower() in keys else redact(v, keys)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, keys) for v in value]
    return value


def clean_payload(
    payload: dict[str, Any] | None, *, max_bytes: int, max_depth: int, redact_keys: frozenset[str]
) -> tuple[dict[str, Any] | None, str | None]:
    """Check depth, redact, cap size. Returns (payload, warning)."""
    if payload is None:
        return None, None
    if (depth := payload_depth(payload)) > max_depth:
        raise EventRejected("payload", f"nested {depth} levels deep; at most {max_depth} allowed")
    payload = redact(payload, redact_keys)
    size = len(msgspec.json.encode(payload))
    if size > max_bytes:
        return (
            {"_truncated": True, "_size_bytes": size},
            f"payload of {size} bytes replaced by a marker (limit {max_bytes})",
        )
    return payload, None


def normalise_times(event: EventV1) -> EventV1:
    """Times in UTC, as they are stored: the same instant written with another
    offset is the same event (a duplicate, not a conflict)."""
    return msgspec.structs.replace(
        event,
        occurred_at=event.occurred_at.astimezone(UTC),
        deadline=event.deadline.astimezone(UTC) if event.deadline else None,
    )


def content_hash(event: EventV1) -> str:
    """SHA-256 of the event's canonical encoding (sorted keys, defaults omitted)."""
    return hashlib.sha256(msgspec.json.encode(event, order="deterministic")).hexdigest()
