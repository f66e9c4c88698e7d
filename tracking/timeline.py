"""The saga detail page's waterfall: steps, attempts and messages on one time axis.

Pure layout: takes the read model and the ordered events, returns positions in
percent of the saga's span so the template draws bars with plain CSS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.utils.dateparse import parse_datetime

from tracking.models import Saga
from tracking.selectors import EventRow


@dataclass(frozen=True, slots=True)
class Bar:
    kind: str  # forward | compensation
    attempt: int
    outcome: str  # running | succeeded | failed | timed_out
    left: float  # percent of the axis
    width: float
    duration_ms: int | None
    label: str


@dataclass(frozen=True, slots=True)
class Lane:
    name: str
    service: str
    status: str
    bars: list[Bar]
    gap_before_ms: int | None  # idle time between the previous step's end and this step's start


@dataclass(frozen=True, slots=True)
class Arrow:
    message: str
    message_id: str
    source: str
    target: str
    left: float
    width: float
    latency_ms: int | None


@dataclass(frozen=True, slots=True)
class Timeline:
    start: datetime | None
    end: datetime | None
    span_ms: int
    lanes: list[Lane] = field(default_factory=list)
    arrows: list[Arrow] = field(default_factory=list)
    ticks: list[tuple[float, str]] = field(default_factory=list)


def _ms(delta: timedelta) -> int:
    return int(delta / timedelta(milliseconds=1))


def _parse(value: Any) -> datetime | None:
    return parse_datetime(value) if isinstance(value, str) else value


def saga_timeline_build(*, saga: Saga, events: list[EventRow], now: datetime) -> Timeline:
    times = [e.occurred_at for e in events]
    if not times:
        return Timeline(start=None, end=None, span_ms=0)
    start = min(times)
    end = max([*times, now]) if saga.ended_at is None else max(times)
    span = max(_ms(end - start), 1)

    def pos(at: datetime | None) -> float:
        return 0.0 if at is None else round(100 * _ms(at - start) / span, 3)

    lanes: list[Lane] = []
    previous_end: datetime | None = None
    for step in saga.steps.all():
        bars = []
        for record in step.attempts:
            began = _parse(record["started_at"]) or _parse(record["ended_at"])
            finished = _parse(record["ended_at"])
            left = pos(began)
            right = pos(finished) if finished else pos(end)
            duration = _ms(finished - began) if began and finished else None
            bars.append(
                Bar(
                    kind=record["kind"],
                    attempt=record["attempt"],
                    outcome=record["outcome"],
                    left=left,
                    width=max(right - left, 0.6),
                    duration_ms=duration,
                    label=f"{'undo ' if record['kind'] == 'compensation' else ''}"
                    f"#{record['attempt']} {record['outcome']}",
                )
            )
        gap = None
        first_start = next(
            (
                _parse(r["started_at"])
                for r in step.attempts
                if r["kind"] == "forward" and r["started_at"]
            ),
            step.started_at,
        )
        if previous_end is not None and first_start is not None:
            gap = _ms(first_start - previous_end)
        previous_end = step.ended_at or previous_end
        lanes.append(Lane(step.name, step.service, step.status, bars, gap))

    published: dict[str, EventRow] = {}
    arrows: list[Arrow] = []
    for e in events:
        message = e.message or {}
        if e.type == "message.published":
            published[message.get("id", "")] = e
        elif e.type == "message.consumed" and message.get("id") in published:
            source = published[message["id"]]
            left = pos(source.occurred_at)
            arrows.append(
                Arrow(
                    message=message.get("name", ""),
                    message_id=message["id"],
                    source=source.service_name,
                    target=e.service_name,
                    left=left,
                    width=max(pos(e.occurred_at) - left, 0.6),
                    latency_ms=_ms(e.occurred_at - source.occurred_at),
                )
            )
    ticks = [
        (pct, f"+{format_duration(span * pct / 100)}") for pct in (0.0, 25.0, 50.0, 75.0, 100.0)
    ]
    return Timeline(start=start, end=end, span_ms=span, lanes=lanes, arrows=arrows, ticks=ticks)


def format_duration(ms: float | None) -> str:
    """1234 -> '1.2 s'; negative values keep their sign; None -> '-'."""
    if ms is None:
        return "-"
    if ms < 0:
        return "-" + format_duration(-ms)
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    if ms < 3_600_000:
        return f"{ms / 60_000:.1f} min"
    return f"{ms / 3_600_000:.1f} h"
