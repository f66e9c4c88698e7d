"""Failure injection: which orders fail how, and how unreliable the reporting is.

A *mix* is text such as ``decline=0.1,shortage=0.05,skew=30`` (the ``demo``
command's ``--mix``, or the ``SAGAADMIN_DEMO_MIX`` setting). Order faults are
chances per order (at most one fault per order, drawn when it is placed and
carried in its data, so every service agrees on it):

==============  ================================================================
``decline``     the payment is declined (not retryable): the saga compensates
``outage``      the payment provider is away for the first attempt: orchestrated,
                the orchestrator's retry succeeds; choreographed, the saga
                fails and waits for an operator's *retry step*
``shortage``    stock is short: the payment is refunded, the saga compensates
``refund_fails`` stock is short and the refund fails too: *compensation failed*
``hang``        the shipping service never answers: the saga is *stuck*
``in_doubt``    the inventory service prepares and never commits: *in doubt*
==============  ================================================================

Reporting faults: ``duplicate`` (chance that a report is sent twice),
``reorder`` (chance that a report is held back behind the next one) and
``skew`` (seconds the shipping service's clock is ahead). A fault hits the
first try only: an operator's command (or a new orchestrator epoch) succeeds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

ORDER_FAULTS = ("decline", "outage", "shortage", "refund_fails", "hang", "in_doubt")
DEFAULT_MIX = (
    "decline=0.08,outage=0.05,shortage=0.06,refund_fails=0.03,hang=0.03,in_doubt=0.03,"
    "duplicate=0.03,reorder=0.03,skew=0"
)


@dataclass(frozen=True)
class Mix:
    decline: float = 0.0
    outage: float = 0.0
    shortage: float = 0.0
    refund_fails: float = 0.0
    hang: float = 0.0
    in_doubt: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    skew: float = 0.0  # seconds, not a chance

    @classmethod
    def parse(cls, text: str) -> Mix:
        """``name=value,...``; raises ValueError naming the bad part."""
        known = {f.name for f in fields(cls)}
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, raw = part.partition("=")
            name = name.strip()
            if not sep or name not in known:
                raise ValueError(
                    f"mix: {part!r} is not name=value with name one of {', '.join(sorted(known))}"
                )
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"mix: {name} must be a number, not {raw!r}") from None
            if name != "skew" and not 0 <= value <= 1:
                raise ValueError(f"mix: {name} is a chance between 0 and 1, not {value}")
            values[name] = value
        if sum(values.get(n, 0.0) for n in ORDER_FAULTS) > 1:
            raise ValueError(f"mix: the chances of {', '.join(ORDER_FAULTS)} add up to more than 1")
        return cls(**values)

    def order_fault(self, rng: random.Random | None = None) -> str:
        """The fault for a new order ("" for none)."""
        roll = (rng or random).random()
        for name in ORDER_FAULTS:
            roll -= getattr(self, name)
            if roll < 0:
                return name
        return ""


def hits(faults: list[str] | None, name: str, *, first_try: bool) -> bool:
    """Whether the order's fault ``name`` applies now (only on the first try)."""
    if not first_try or not faults:
        return False
    if name == "shortage":
        return "shortage" in faults or "refund_fails" in faults
    return name in faults
