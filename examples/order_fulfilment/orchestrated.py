"""The orchestrated flavour: Saga Admin's orchestrator runs the order saga.

Every step is a remote command through the outbox (``sagaadmin.commands``,
type ``<service>.<command>``) that the service obeys and answers on
``sagaadmin.replies`` (``services.py``: the ``step_*`` methods). A declined
payment is not retryable; a provider outage is, so the orchestrator's second
attempt goes through. The last two steps wait long for an answer, so a hung
carrier shows as *stuck* and an undecided participant as *in doubt* until an
operator acts (retry step: a new epoch, and the service answers).
"""

from __future__ import annotations

from examples.order_fulfilment.services import ORCHESTRATED
from orchestrator import RetryPolicy, Step, saga_define

QUICK = RetryPolicy(max_attempts=3, backoff_base=1.0, backoff_max=10.0)

ORDER_SAGA = saga_define(
    ORCHESTRATED,
    service="orchestrator",
    steps=[
        Step(
            "create_order",
            kind="remote",
            service="order",
            command="create_order",
            retry=QUICK,
            timeout=30,
        ),
        Step(
            "charge_payment",
            kind="remote",
            service="payment",
            command="charge",
            undo_command="refund",
            retry=QUICK,
            timeout=30,
        ),
        Step(
            "reserve_stock",
            kind="remote",
            service="inventory",
            command="reserve",
            undo_command="release",
            retry=QUICK,
            timeout=600,
        ),
        Step(
            "create_shipment",
            kind="remote",
            service="shipping",
            command="create_shipment",
            retry=QUICK,
            timeout=600,
        ),
    ],
)
