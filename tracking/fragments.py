"""HTML of the dashboard's biggest fragments (saga rows, event rows, the waterfall), in Python.

The template engine spends about half a millisecond on a saga row (a dozen
variable lookups, two dates, a URL reversal); a page of 50 rows cost more
than the SQL behind it several times over. These functions build the same
markup with f-strings, every reported value through :func:`html.escape` (what
Django's ``escape`` does for plain strings, without its lazy-string wrapper),
in about 15 microseconds a row. Templates include the result; the live-update
fragment uses the same functions, so a pushed row is identical to a rendered one.
"""

from __future__ import annotations

import pprint
import re
from collections.abc import Iterable
from datetime import datetime, timedelta
from functools import cache
from html import escape as esc
from typing import Any
from urllib.parse import quote

from django.urls import reverse
from django.utils.safestring import SafeString

from tracking.models import Saga, split_delimited
from tracking.timeline import Timeline, format_duration

DASH = "\u2013"  # an en dash, as the templates show for "none"
_BREAK_AFTER = str.maketrans({c: f"{c}<wbr>" for c in "_.-/:"})
_CAMEL_HUMP = re.compile(r"(?<=[a-z])(?=[A-Z])")  # entities (&lt; &#x27;) have no capitals


def esc_breakable(text: str) -> str:
    """``esc(text)`` with a line-break opportunity after each ``_ . - / :`` and before
    each hump of camelCase: in a narrow column, ``reserve_inventory_for_order`` and
    ``notifyCustomerByEmail`` wrap between their words instead of mid-word (the CSS
    breaks inside a word only when one part alone is too wide)."""
    return breaks_add(esc(text))


def breaks_add(html: str) -> str:
    """The line-break opportunities of :func:`esc_breakable`, in text already escaped
    (no entity holds one of those characters or a capital letter)."""
    return _CAMEL_HUMP.sub("<wbr>", html.translate(_BREAK_AFTER))


@cache
def _detail_prefix() -> str:
    return reverse("saga-detail", args=["x"])[:-1]


def saga_detail_url(saga_id: str) -> str:
    """``reverse("saga-detail", args=[saga_id])`` without the resolver's cost."""
    return _detail_prefix() + quote(saga_id, safe="/~:@!$&'()*+,;=")


def relative_time(at: datetime | None, now: datetime) -> str:
    """'12 s ago', '3 min ago', '5 h ago', '2 d ago' (or 'in 4 s' for a future time)."""
    if at is None:
        return DASH
    seconds = (now - at) / timedelta(seconds=1)
    ahead = seconds < 0
    seconds = abs(seconds)
    if seconds < 1:
        return "now"
    if seconds < 60:
        text = f"{seconds:.0f} s"
    elif seconds < 3600:
        text = f"{seconds // 60:.0f} min"
    elif seconds < 86400:
        text = f"{seconds // 3600:.0f} h"
    else:
        text = f"{seconds // 86400:.0f} d"
    return f"in {text}" if ahead else f"{text} ago"


def time_html(at: datetime | None, now: datetime) -> SafeString:
    """``<time>`` with the machine-readable instant, UTC in the tooltip, relative text shown."""
    if at is None:
        return SafeString(DASH)
    return SafeString(
        f'<time datetime="{at.isoformat()}" title="{at:%Y-%m-%d %H:%M:%S} UTC">'
        f"{relative_time(at, now)}</time>"
    )


def _flags_html(flags: str, open_incidents: str = "") -> SafeString:
    """The row's flags, then its open incidents' kinds; a dash when it has neither."""
    badges = [f'<span class="flag flag-{esc(f)}">{esc(f)}</span>' for f in split_delimited(flags)]
    badges += [incident_badge_html(kind) for kind in split_delimited(open_incidents)]
    return SafeString(" ".join(badges) if badges else DASH)


def incident_badge_html(kind: str) -> SafeString:
    """One open incident's kind as a badge (red, a warning sign so colour is not the only cue)."""
    return SafeString(
        f'<span class="incident incident-{esc(kind)}" title="open incident: {esc(kind)}">'
        f'<span aria-hidden="true">⚠ </span><span class="sr-only">open incident: </span>'
        f"{esc(kind)}</span>"
    )


def incident_badges_html(open_incidents: str) -> SafeString:
    """Badges for a saga's ``open_incidents`` (",stuck,in_doubt,"); empty when none."""
    return SafeString(" ".join(incident_badge_html(k) for k in split_delimited(open_incidents)))


# The fields a row shows (the list query loads only these).
SAGA_ROW_FIELDS = (
    "id",
    "saga_id",
    "version",
    "saga_type",
    "status",
    "current_step",
    "flags",
    "open_incidents",
    "started_at",
    "last_event_at",
    "duration_ms",
)


def saga_row_html(saga: Saga, now: datetime) -> SafeString:
    """One row of the saga list (columns as in ``saga_list.html``'s header)."""
    saga_id = esc(saga.saga_id)
    return SafeString(
        f'<tr id="row-{saga.pk}" data-saga-id="{saga_id}" data-version="{saga.version}">'
        f'<td><a href="{esc(saga_detail_url(saga.saga_id))}">{saga_id}</a></td>'
        f'<td data-label="Type">{esc_breakable(saga.saga_type) or DASH}</td>'
        f'<td data-label="Status"><span class="status status-{esc(saga.status)}">'
        f"{esc(saga.status)}</span></td>"
        f'<td data-label="Step">{esc_breakable(saga.current_step) or DASH}</td>'
        f'<td data-label="Flags">{_flags_html(saga.flags, saga.open_incidents)}</td>'
        f'<td data-label="Started">{time_html(saga.started_at, now)}</td>'
        f'<td data-label="Last activity">{time_html(saga.last_event_at, now)}</td>'
        f'<td data-label="Duration">'
        f"{DASH if saga.duration_ms is None else format_duration(saga.duration_ms)}</td></tr>"
    )


def saga_rows_html(sagas: Iterable[Saga], now: datetime) -> SafeString:
    return SafeString("".join(saga_row_html(s, now) for s in sagas))


def skew_ms(event: Any) -> int:
    """Reporter clock minus server receive time, in milliseconds."""
    return int((event.occurred_at - event.received_at) / timedelta(milliseconds=1))


def _event_details_html(event: Any) -> str:
    out = ""
    error = event.error
    if error:
        message = error.get("message")
        out += f'<div class="err">{esc(str(error.get("type", "")))}'
        out += f": {esc(str(message))}</div>" if message else "</div>"
    if event.message:
        name, message_id = event.message.get("name", ""), event.message.get("id", "")
        out += f'<div>{esc(str(name))} <span class="mono">{esc(str(message_id))}</span></div>'
    if event.payload or event.attributes:
        out += f"<details><summary>payload</summary><pre>{esc(pprint.pformat(event.payload))}</pre>"
        if event.attributes:
            out += f"<pre>{esc(pprint.pformat(event.attributes))}</pre>"
        out += "</details>"
    return out


def event_row_html(event: Any, number: int, skew_threshold_ms: int) -> SafeString:
    """One row of a saga's event table: both clocks, the skew marked, details collapsed."""
    skew = skew_ms(event)
    skewed = abs(skew) > skew_threshold_ms
    return SafeString(
        f"<tr><td>{number}</td>"
        f'<td><span class="etype etype-{esc(event.type.replace(".", ""))}">'
        f"{esc(event.type)}</span></td>"
        f"<td>{esc(event.step) or DASH}</td><td>{event.attempt}</td>"
        f"<td>{esc(event.service_name)}</td>"
        f'<td class="mono">{event.occurred_at:%H:%M:%S.%f}</td>'
        f'<td class="mono">{event.received_at:%H:%M:%S.%f}</td>'
        f'<td class="{"skewed" if skewed else ""}">{format_duration(skew)}'
        f"{' ⚠ skewed' if skewed else ''}</td>"
        f"<td>{_event_details_html(event)}"
        f'<small class="mono">{esc(event.event_id)}</small></td></tr>'
    )


def event_rows_html(events: Iterable[Any], first_number: int, skew_threshold_ms: int) -> SafeString:
    return SafeString(
        "".join(event_row_html(e, n, skew_threshold_ms) for n, e in enumerate(events, first_number))
    )


def waterfall_html(timeline: Timeline) -> SafeString:
    """The detail page's waterfall: a time axis, one lane per step, one per message arrow."""
    span = format_duration(timeline.span_ms)
    out = [
        f'<div class="waterfall" role="img" aria-label="Waterfall of steps and attempts over '
        f'{span}"><div class="axis" aria-hidden="true">',
        *(f'<span style="left: {pct}%">{esc(label)}</span>' for pct, label in timeline.ticks),
        "</div>",
    ]
    for lane in timeline.lanes:
        waited = f" · waited {format_duration(lane.gap_before_ms)}" if lane.gap_before_ms else ""
        out.append(
            f'<div class="lane"><div class="lane-name"><strong>{esc_breakable(lane.name)}</strong>'
            f"<small>{esc_breakable(lane.service)} · {esc(lane.status)}{waited}</small></div>"
            '<div class="lane-track">'
        )
        for bar in lane.bars:
            text = f"{esc(bar.label)} {format_duration(bar.duration_ms)}"
            out.append(
                f'<span class="bar bar-{esc(bar.kind)} out-{esc(bar.outcome)}" '
                f'style="left: {bar.left}%; width: {bar.width}%" title="{text}">{text}</span>'
            )
        out.append("</div></div>")
    for arrow in timeline.arrows:
        latency = format_duration(arrow.latency_ms)
        out.append(
            f'<div class="lane"><div class="lane-name"><strong>{esc_breakable(arrow.source)} → '
            f"{esc_breakable(arrow.target)}</strong><small>{esc_breakable(arrow.message)}</small></div>"
            f'<div class="lane-track"><span class="arrow" style="left: {arrow.left}%; '
            f'width: {arrow.width}%" title="{esc(arrow.message)} ({esc(arrow.message_id)}) '
            f'{latency}">{esc(arrow.message)} → {latency}</span></div></div>'
        )
    out.append("</div>")
    return SafeString("".join(out))
