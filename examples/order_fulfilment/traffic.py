"""Customers placing orders: in both flavours, at a rate, with a mix of faults."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from django.db import connections, transaction

from examples.order_fulfilment.faults import ORDER_FAULTS, Mix
from examples.order_fulfilment.services import CHOREOGRAPHED, ORCHESTRATED, OrderService
from orchestrator import saga_start
from tracking.models import SagaType
from tracking.policy import saga_type_update

FLAVOURS = ("orchestrated", "choreographed")
CUSTOMERS = ("ada", "grace", "linus", "margaret", "ken", "barbara", "dennis", "frances")
SKUS = {"keyboard": 4900, "monitor": 18900, "mouse": 1900, "dock": 12900, "webcam": 5900}

# Demo thresholds, so stuck and in-doubt sagas show within a minute (set only
# where an admin has not chosen a value).
DEMO_THRESHOLDS = {"stuck_after_seconds": 40, "in_doubt_after_seconds": 20}


def order_new(flavour: str, fault: str, rng: random.Random | None = None) -> dict[str, Any]:
    rng = rng or random.Random()
    sku = rng.choice(sorted(SKUS))
    quantity = rng.randint(1, 3)
    return {
        "order_id": f"{flavour[:3]}-{uuid.uuid4().hex[:10]}",
        "customer": rng.choice(CUSTOMERS),
        "sku": sku,
        "quantity": quantity,
        "amount_cents": SKUS[sku] * quantity,
        "faults": [fault] if fault else [],
    }


def order_place(flavour: str, order: dict[str, Any], orders: OrderService) -> None:
    """Place one order: the orchestrator starts the saga, or the order service does."""
    if flavour == "orchestrated":
        data = {k: v for k, v in order.items() if k != "order_id"}
        with transaction.atomic():
            saga_start(saga_type=ORCHESTRATED, saga_id=order["order_id"], data=data)
    else:
        orders.place(order)


def thresholds_ensure() -> None:
    """The demo's saga types detect quickly (an admin's own values are kept)."""
    for name in (ORCHESTRATED, CHOREOGRAPHED):
        row, _ = SagaType.objects.get_or_create(name=name)
        unset = {f: v for f, v in DEMO_THRESHOLDS.items() if getattr(row, f) is None}
        if unset:
            saga_type_update(name=name, changes=unset, user="demo")


class Traffic:
    """Places orders until ``stop`` or ``duration`` seconds (0: no end)."""

    def __init__(
        self,
        orders: OrderService,
        *,
        rate: float,
        mix: Mix,
        flavours: tuple[str, ...] = FLAVOURS,
        duration: float = 0.0,
        showcase: bool = True,
        say: Callable[[str], None] = print,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate: orders per second, more than 0")
        self.orders, self.rate, self.mix = orders, rate, mix
        self.flavours, self.duration, self.showcase, self.say = flavours, duration, showcase, say
        self.placed: Counter[str] = Counter()

    def run(self, stop: threading.Event) -> None:
        try:
            if self.showcase:  # one order per fault and flavour, so every state shows at once
                for flavour in self.flavours:
                    for fault in ("", *ORDER_FAULTS):
                        self._place(flavour, fault)
                self.say(f"demo: placed {self.placed.total()} showcase orders, one per fault")
            started, n = time.monotonic(), 0
            while not stop.is_set():
                if self.duration and time.monotonic() - started >= self.duration:
                    break
                flavour = self.flavours[n % len(self.flavours)]
                self._place(flavour, self.mix.order_fault())
                n += 1
                if n % 50 == 0:
                    self.say(f"demo: {self.placed.total()} orders placed ({self._summary()})")
                stop.wait(max(0.0, started + n / self.rate - time.monotonic()))
            self.say(f"demo: done placing orders ({self._summary()})")
        finally:
            connections.close_all()

    def _place(self, flavour: str, fault: str) -> None:
        try:
            order_place(flavour, order_new(flavour, fault), self.orders)
        except Exception as exc:  # e.g. SQLite busy: the next order tries again
            self.say(f"demo: could not place an order: {exc}")
            return
        self.placed[fault or "ok"] += 1

    def _summary(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.placed.items()))
