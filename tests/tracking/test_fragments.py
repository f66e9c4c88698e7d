"""Rows built in Python: same links as the URL resolver, relative times, escaping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.urls import reverse

from tracking.fragments import esc_breakable, relative_time, saga_detail_url

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "saga_id", ["order-1", "a/b/c", "with space", "ü-ñ", "q?x=1&y=2#f", "50%", "<x>"]
)
def test_the_detail_link_is_the_one_reverse_builds(saga_id) -> None:
    assert saga_detail_url(saga_id) == reverse("saga-detail", args=[saga_id])


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.2, "now"),
        (12, "12 s ago"),
        (59.4, "59 s ago"),
        (60, "1 min ago"),
        (3599, "59 min ago"),
        (3600 * 5 + 10, "5 h ago"),
        (86400 * 3 + 5, "3 d ago"),
        (-4, "in 4 s"),
    ],
)
def test_relative_times(seconds, text) -> None:
    assert relative_time(NOW - timedelta(seconds=seconds), NOW) == text
    assert relative_time(None, NOW) == "\u2013"


@pytest.mark.parametrize(
    ("name", "html"),
    [
        ("charge", "charge"),
        ("reserve_inventory", "reserve_<wbr>inventory"),
        ("billing.v2-eu", "billing.<wbr>v2-<wbr>eu"),
        ("orders/ship:now", "orders/<wbr>ship:<wbr>now"),
        ("notifyCustomerByEmail", "notify<wbr>Customer<wbr>By<wbr>Email"),
        ("HTTPRetry", "HTTPRetry"),
        # escaped first: no break inside an entity, and markup stays text
        ("<a_b>&'\"", "&lt;a_<wbr>b&gt;&amp;&#x27;&quot;"),
    ],
)
def test_step_names_break_at_their_separators(name, html) -> None:
    assert esc_breakable(name) == html


def test_the_breakable_filter_escapes_once() -> None:
    from django.template import engines

    template = engines["django"].from_string(
        "{% load saga_tags %}{{ name|breakable }} | {{ names|join:', '|breakable }}"
    )
    html = template.render({"name": "a&b_cD", "names": ["x&y", "p-q"]})
    assert html == "a&amp;b_<wbr>c<wbr>D | x&amp;y, p-<wbr>q"
