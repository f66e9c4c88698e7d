"""The four services: their business rules, the events they react to, the commands they obey.

Every handler runs inside the inbox transaction of the message that caused it
(``host.py``): its rows, its outbox messages and the inbox record commit
together, and its reports go to Saga Admin after that commit (``sagaclient``,
so a report never describes a change that rolled back).

Choreographed flow (events on ``shop.events``, key = order id)::

    order      place            -> order.created
    payment    order.created    -> payment.processed | payment.failed
    inventory  payment.processed-> stock.decremented | stock.failed
    payment    stock.failed     -> payment.refunded  | refund.failed
    shipping   stock.decremented-> shipment.created
    order      shipment.created -> saga.completed;  payment.refunded -> saga.compensated;
               payment.failed   -> saga.compensated (declined) or saga.failed (provider away)
               refund.failed    -> saga.compensation_failed

Commands (``sagaadmin.commands``, type ``<service>.<action>``): with a
``reply_to`` they are the orchestrator's remote steps (answered on
``sagaadmin.replies``); without, an operator's action on a choreographed saga,
reported with ``attributes.command_id`` so Saga Admin follows its progress.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

import outbox
from examples.order_fulfilment.faults import hits
from examples.order_fulfilment.models import Order, Payment, Reservation, Shipment, Stock
from orchestrator.engine import REPLIES_TOPIC
from orchestrator.replies import REPLY_TYPE
from outbox.inbox import Incoming
from outbox.versions import message_type

log = logging.getLogger(__name__)

EVENTS_TOPIC = "shop.events"
ORCHESTRATED = "order_orchestrated"
CHOREOGRAPHED = "order_choreographed"
STEPS = ("create_order", "charge_payment", "reserve_stock", "create_shipment")
# Order statuses a forward event may move on from, and those an undo may end.
FORWARD = ("created", "paid", "reserved", "payment_failed")  # a retried payment moves on
UNDOABLE = ("created", "paid", "reserved", "payment_failed", "cancelling", "refund_failed")
EVENT_TYPES = (
    "order.created",
    "order.cancelling",
    "payment.processed",
    "payment.failed",
    "payment.refunded",
    "refund.failed",
    "stock.decremented",
    "stock.failed",
    "shipment.created",
)
for _name in EVENT_TYPES:
    message_type(_name)

NO_REPLY = object()  # a command handler's answer when the service "hangs"


class Refused(Exception):
    """A command or step the service could not carry out (the error it reports)."""

    def __init__(self, type: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.type, self.retryable = type, retryable

    def error(self) -> dict[str, Any]:
        return {"type": self.type, "message": str(self), "retryable": self.retryable}


class Service:
    """Base: reporting after commit, publishing events, dispatching messages to handlers."""

    name = ""

    def __init__(self, reporter: Any) -> None:
        self.reporter = reporter  # a sagaclient.Reporter (or None: report nothing)

    # -- reporting -------------------------------------------------------------------

    def report(
        self, type: str, saga_id: str, saga_type: str = CHOREOGRAPHED, **fields: Any
    ) -> None:
        """Report one event to Saga Admin once the current transaction committed."""
        if self.reporter is None:
            return
        command_id = fields.pop("command_id", None)
        if command_id:
            fields["attributes"] = {**fields.get("attributes", {}), "command_id": command_id}
        reporter = self.reporter
        transaction.on_commit(lambda: reporter.event(type, saga_id, saga_type=saga_type, **fields))

    def emit(self, type: str, order: dict[str, Any], **extra: Any) -> None:
        """Publish a domain event through this service's outbox (and report it published)."""
        message = outbox.publish(
            topic=EVENTS_TOPIC, key=order["order_id"], type=type, payload={**order, **extra}
        )
        self.report(
            "message.published",
            order["order_id"],
            message={"name": type, "id": str(message.message_id), "version": 1},
        )

    # -- dispatch --------------------------------------------------------------------

    def events(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {}

    def on_event(self, message: Incoming) -> None:
        handler = self.events().get(message.type)
        if handler is None or not isinstance(message.payload, dict):
            return
        self.report(
            "message.consumed",
            message.key,
            message={"name": message.type, "id": message.id, "version": message.version},
        )
        handler(message.payload)

    def on_command(self, message: Incoming) -> None:
        command = message.payload
        if not message.type.startswith(f"{self.name}.") or not isinstance(command, dict):
            return
        action = str(command.get("action", ""))
        if command.get("reply_to"):
            self._orchestrated(action, command)
            return
        handler = getattr(self, f"command_{action}", None)
        if handler is None:
            log.warning("%s: cannot %s (command %s)", self.name, action, command.get("command_id"))
            return
        order = _order(command.get("saga_id", ""))
        if order is None:
            log.warning("%s: no order %s for %s", self.name, command.get("saga_id"), action)
            return
        handler(order, command)

    def _orchestrated(self, action: str, command: dict[str, Any]) -> None:
        handler = getattr(self, f"step_{action}", None)
        data = _SagaData(command.get("data") or {})
        # a fault hits the first try only: not a retry, a new epoch or a restarted saga
        first_try = (
            command.get("epoch") == 1
            and command.get("attempt") == 1
            and not data.get("restarted_from")
        )
        try:
            if handler is None:
                raise Refused("UnknownCommand", f"{self.name} cannot {action}", retryable=False)
            result = handler(data, command, first_try)
        except Refused as refused:
            self._reply(command, ok=False, error=refused.error())
            return
        if result is not NO_REPLY:
            self._reply(command, ok=True, result=result)

    @staticmethod
    def _reply(command: dict[str, Any], *, ok: bool, result: Any = None, error: Any = None) -> None:
        outbox.publish(
            topic=command.get("reply_to") or REPLIES_TOPIC,
            key=command["saga_id"],
            type=REPLY_TYPE,
            payload={
                "command_id": command["command_id"],
                "ok": ok,
                "result": result,
                "error": error,
            },
        )


class _SagaData(dict[str, Any]):
    """An orchestrated saga's data: a field it lacks is a refusal that names it (a saga
    started through the API with other data), not a KeyError retried until the command
    goes dead."""

    def __missing__(self, key: str) -> Any:
        raise Refused("BadData", f"the saga's data has no {key!r}", retryable=False)


def _order(order_id: str) -> dict[str, Any] | None:
    row = Order.objects.filter(order_id=order_id).first()
    return order_dict(row) if row else None


def order_dict(row: Order) -> dict[str, Any]:
    return {
        "order_id": row.order_id,
        "customer": row.customer,
        "sku": row.sku,
        "quantity": row.quantity,
        "amount_cents": row.amount_cents,
        "faults": list(row.faults),
    }


def _step_fields(command: dict[str, Any] | None, attempt: int = 1) -> dict[str, Any]:
    if command is None:
        return {"attempt": attempt}
    return {
        "attempt": int(command.get("attempt") or attempt),
        "idempotency_key": command.get("idempotency_key") or None,
        "command_id": command.get("command_id"),
    }


# -- order ------------------------------------------------------------------------------


class OrderService(Service):
    """Owns the order: starts the choreographed saga and ends it."""

    name = "order"

    def place(self, order: dict[str, Any]) -> None:
        """A customer's order (choreographed): the saga starts here."""
        with transaction.atomic():
            Order.objects.create(flavour="choreographed", **order)
            oid = order["order_id"]
            self.report(
                "saga.started",
                oid,
                attributes={"order_id": oid, "customer": order["customer"], "sku": order["sku"]},
            )
            self.report("step.started", oid, step="create_order", attempt=1)
            self.report("step.succeeded", oid, step="create_order", attempt=1)
            self.emit("order.created", order)

    def events(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {
            "payment.processed": lambda o: self._status(o, Order.Status.PAID, FORWARD),
            "stock.decremented": lambda o: self._status(o, Order.Status.RESERVED, FORWARD),
            "shipment.created": self._shipped,
            "payment.failed": self._payment_failed,
            "payment.refunded": self._refunded,
            "refund.failed": self._refund_failed,
        }

    @staticmethod
    def _status(order: dict[str, Any], status: str, allowed: tuple[str, ...] = ()) -> bool:
        """Move the order to ``status`` (only from ``allowed`` ones, when given): a late
        event never overwrites an undo in progress. True if it moved."""
        rows = Order.objects.filter(order_id=order["order_id"])
        if allowed:
            rows = rows.filter(status__in=allowed)
        return rows.update(status=status, updated_at=timezone.now()) > 0

    def _shipped(self, order: dict[str, Any]) -> None:
        if self._status(order, Order.Status.SHIPPED, FORWARD):
            self.report("saga.completed", order["order_id"])
        # else: being undone; shipping cancels the booking on order.cancelling

    def _payment_failed(self, order: dict[str, Any]) -> None:
        if order.get("retryable"):  # the provider was away: wait for an operator
            self._status(order, Order.Status.PAYMENT_FAILED)
            self.report("saga.failed", order["order_id"], error=order.get("error"))
        else:
            self._cancel(order, ended="saga.compensated")

    def _refunded(self, order: dict[str, Any]) -> None:
        self._cancel(order, ended="saga.compensated", command_id=order.get("command_id"))

    def _refund_failed(self, order: dict[str, Any]) -> None:
        self._status(order, Order.Status.REFUND_FAILED)
        self.report("saga.compensation_failed", order["order_id"], error=order.get("error"))

    def _cancel(self, order: dict[str, Any], *, ended: str, command_id: Any = None) -> None:
        oid = order["order_id"]
        if not self._status(order, Order.Status.CANCELLED, UNDOABLE):
            return  # cancelled already (a redelivered or late event)
        self.report("compensation.started", oid, step="create_order", command_id=command_id)
        self.report("compensation.succeeded", oid, step="create_order", command_id=command_id)
        self.report(ended, oid, command_id=command_id)

    # operator commands on choreographed sagas (the order service owns the saga)

    def command_compensate(self, order: dict[str, Any], command: dict[str, Any]) -> None:
        self._undo(order, command, ended="saga.compensated")

    def command_cancel(self, order: dict[str, Any], command: dict[str, Any]) -> None:
        self._undo(order, command, ended="saga.cancelled")

    def _undo(self, order: dict[str, Any], command: dict[str, Any], *, ended: str) -> None:
        row = Order.objects.select_for_update().get(order_id=order["order_id"])
        if row.status in (Order.Status.PAID, Order.Status.RESERVED):
            row.status, row.updated_at = Order.Status.CANCELLING, timezone.now()
            row.save(update_fields=["status", "updated_at"])
            self.report("saga.compensating", row.order_id, command_id=command["command_id"])
            self.emit("order.cancelling", order, command_id=command["command_id"])
        elif row.status in (Order.Status.CREATED, Order.Status.PAYMENT_FAILED):
            self._cancel(order, ended=ended, command_id=command["command_id"])
        else:
            log.info("order: %s is %s; nothing to undo", row.order_id, row.status)

    def command_retry_compensation(self, order: dict[str, Any], command: dict[str, Any]) -> None:
        """The refund failed: ask for the undo again (the payment service refunds)."""
        self._status(order, Order.Status.CANCELLING)
        self.emit("order.cancelling", order, command_id=command["command_id"])

    def command_terminate(self, order: dict[str, Any], command: dict[str, Any]) -> None:
        self._status(order, Order.Status.CANCELLED)
        self.report(
            "saga.cancelled",
            order["order_id"],
            error={"type": "terminated", "message": command.get("reason") or "terminated"},
            command_id=command["command_id"],
        )

    # orchestrated steps

    def step_create_order(
        self, data: dict[str, Any], command: dict[str, Any], first_try: bool
    ) -> Any:
        fields = {k: data[k] for k in ("customer", "sku", "quantity", "amount_cents", "faults")}
        row, _ = Order.objects.get_or_create(
            order_id=command["saga_id"], defaults={"flavour": "orchestrated", **fields}
        )
        return {"order_id": row.order_id}

    def step_undo_create_order(
        self, data: dict[str, Any], command: dict[str, Any], first_try: bool
    ) -> Any:
        Order.objects.filter(order_id=command["saga_id"]).update(
            status=Order.Status.CANCELLED, updated_at=timezone.now()
        )
        return {"cancelled": True}


# -- payment ----------------------------------------------------------------------------


class PaymentService(Service):
    """Charges and refunds."""

    name = "payment"

    def events(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {
            "order.created": lambda o: self.charge(o, first_try=True),
            "stock.failed": lambda o: self.refund(o, first_try=True),
            "order.cancelling": self._cancelling,
        }

    def charge(
        self, order: dict[str, Any], *, first_try: bool, command: dict[str, Any] | None = None
    ) -> None:
        oid = order["order_id"]
        fields = _step_fields(command)
        self.report("step.started", oid, step="charge_payment", **fields)
        try:
            payment = _charge(order, first_try=first_try, key=f"{oid}:charge")
        except Refused as refused:
            fields.pop("idempotency_key", None)
            self.report("step.failed", oid, step="charge_payment", error=refused.error(), **fields)
            self.emit("payment.failed", order, retryable=refused.retryable, error=refused.error())
            return
        fields.pop("idempotency_key", None)
        self.report("step.succeeded", oid, step="charge_payment", **fields)
        self.emit("payment.processed", order, payment_id=payment.pk)

    def refund(
        self, order: dict[str, Any], *, first_try: bool, command: dict[str, Any] | None = None
    ) -> None:
        oid = order["order_id"]
        command_id = command["command_id"] if command else None
        attempt = _refund_attempt(oid)
        self.report(
            "compensation.started",
            oid,
            step="charge_payment",
            attempt=attempt,
            command_id=command_id,
        )
        try:
            _refund(order, first_try=first_try)
        except Refused as refused:
            self.report(
                "compensation.failed",
                oid,
                step="charge_payment",
                attempt=attempt,
                error=refused.error(),
                command_id=command_id,
            )
            self.emit("refund.failed", order, error=refused.error())
            return
        self.report(
            "compensation.succeeded",
            oid,
            step="charge_payment",
            attempt=attempt,
            command_id=command_id,
        )
        self.emit("payment.refunded", order, command_id=command_id)

    def _cancelling(self, order: dict[str, Any]) -> None:
        if Payment.objects.filter(order_id=order["order_id"], status="charged").exists():
            self.refund(order, first_try=False, command={"command_id": order.get("command_id")})
        else:  # nothing was charged (the step was skipped): the order may cancel now
            self.emit("payment.refunded", order, refunded=False, command_id=order.get("command_id"))

    # operator commands

    def command_retry_step(self, order: dict[str, Any], command: dict[str, Any]) -> None:
        if command.get("step") == "charge_payment":
            self.charge(order, first_try=False, command=command)

    def command_skip_step(self, order: dict[str, Any], command: dict[str, Any]) -> None:
        oid, fields = order["order_id"], _step_fields(command)
        fields.pop("idempotency_key", None)
        fields["attributes"] = {"skipped": "true"}
        self.report("step.started", oid, step="charge_payment", **fields)
        self.report("step.succeeded", oid, step="charge_payment", **fields)
        self.emit("payment.processed", order, payment_id=None)

    # orchestrated steps

    def step_charge(self, data: dict[str, Any], command: dict[str, Any], first_try: bool) -> Any:
        order = {**data, "order_id": command["saga_id"]}
        payment = _charge(order, first_try=first_try, key=command["idempotency_key"])
        return {"payment_id": payment.pk, "amount_cents": payment.amount_cents}

    def step_refund(self, data: dict[str, Any], command: dict[str, Any], first_try: bool) -> Any:
        _refund({**data, "order_id": command["saga_id"]}, first_try=first_try)
        return {"refunded": True}


def _charge(order: dict[str, Any], *, first_try: bool, key: str) -> Payment:
    if hits(order.get("faults"), "decline", first_try=first_try):
        raise Refused("PaymentDeclined", "card declined by the issuer", retryable=False)
    if hits(order.get("faults"), "outage", first_try=first_try):
        raise Refused("ProviderUnavailable", "payment provider timed out", retryable=True)
    payment, _ = Payment.objects.get_or_create(
        order_id=order["order_id"],
        defaults={
            "amount_cents": order["amount_cents"],
            "status": Payment.Status.CHARGED,
            "idempotency_key": key,
        },
    )
    return payment


def _refund_attempt(order_id: str) -> int:
    """The refund's attempt number: one more than before (kept on the payment)."""
    payment = Payment.objects.select_for_update().filter(order_id=order_id).first()
    if payment is None:
        return 1
    payment.refund_attempts += 1
    payment.save(update_fields=["refund_attempts"])
    return payment.refund_attempts


def _refund(order: dict[str, Any], *, first_try: bool) -> None:
    if hits(order.get("faults"), "refund_fails", first_try=first_try):
        raise Refused("RefundRejected", "refund rejected: card account closed", retryable=False)
    Payment.objects.filter(order_id=order["order_id"]).update(
        status=Payment.Status.REFUNDED, updated_at=timezone.now()
    )


# -- inventory --------------------------------------------------------------------------


class InventoryService(Service):
    """Reserves stock as a two-phase participant (prepare, then commit or release)."""

    name = "inventory"

    def events(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {
            "payment.processed": lambda o: self.reserve(o, first_try=True),
            "order.cancelling": self._cancelling,
        }

    def reserve(
        self, order: dict[str, Any], *, first_try: bool, command: dict[str, Any] | None = None
    ) -> None:
        oid, fields = order["order_id"], _step_fields(command)
        self.report("step.started", oid, step="reserve_stock", **fields)
        fields.pop("idempotency_key", None)
        try:
            committed = self._reserve(order, first_try=first_try, saga_type=CHOREOGRAPHED)
        except Refused as refused:
            self.report("step.failed", oid, step="reserve_stock", error=refused.error(), **fields)
            self.emit("stock.failed", order, error=refused.error())
            return
        if committed:
            self.report("step.succeeded", oid, step="reserve_stock", **fields)
            self.emit("stock.decremented", order)

    def _reserve(self, order: dict[str, Any], *, first_try: bool, saga_type: str) -> bool:
        """Prepare, then commit; False when the participant "never commits" (in doubt)."""
        oid = order["order_id"]
        if hits(order.get("faults"), "shortage", first_try=first_try):
            raise Refused("OutOfStock", f"only 0 of {order['sku']} left", retryable=False)
        stock, _ = Stock.objects.select_for_update().get_or_create(
            sku=order["sku"], defaults={"available": 1_000_000}
        )
        reservation, created = Reservation.objects.get_or_create(
            order_id=oid,
            defaults={
                "sku": order["sku"],
                "quantity": order["quantity"],
                "status": Reservation.Status.PREPARED,
            },
        )
        if created:
            stock.available -= order["quantity"]
            stock.save(update_fields=["available"])
            self.report("tx.prepared", oid, saga_type, step="reserve_stock")
        if hits(order.get("faults"), "in_doubt", first_try=first_try):
            return False
        if reservation.status == Reservation.Status.PREPARED:
            reservation.status, reservation.updated_at = (
                Reservation.Status.COMMITTED,
                timezone.now(),
            )
            reservation.save(update_fields=["status", "updated_at"])
            self.report("tx.committed", oid, saga_type, step="reserve_stock")
        return True

    def _release(self, order_id: str, saga_type: str, command_id: Any = None) -> bool:
        reservation = (
            Reservation.objects.select_for_update()
            .filter(order_id=order_id)
            .exclude(status=Reservation.Status.RELEASED)
            .first()
        )
        if reservation is None:
            return False
        was_prepared = reservation.status == Reservation.Status.PREPARED
        reservation.status, reservation.updated_at = Reservation.Status.RELEASED, timezone.now()
        reservation.save(update_fields=["status", "updated_at"])
        Stock.objects.filter(sku=reservation.sku).update(
            available=F("available") + reservation.quantity
        )
        if was_prepared:
            self.report("tx.rolled_back", order_id, saga_type, step="reserve_stock")
        return True

    def _cancelling(self, order: dict[str, Any]) -> None:
        oid, command_id = order["order_id"], order.get("command_id")
        if Reservation.objects.filter(order_id=oid).exclude(status="released").exists():
            self.report("compensation.started", oid, step="reserve_stock", command_id=command_id)
            self._release(oid, CHOREOGRAPHED)
            self.report("compensation.succeeded", oid, step="reserve_stock", command_id=command_id)

    # operator commands

    def command_retry_step(self, order: dict[str, Any], command: dict[str, Any]) -> None:
        if command.get("step") == "reserve_stock":
            self.reserve(order, first_try=False, command=command)

    # orchestrated steps

    def step_reserve(self, data: dict[str, Any], command: dict[str, Any], first_try: bool) -> Any:
        order = {**data, "order_id": command["saga_id"]}
        if not self._reserve(order, first_try=first_try, saga_type=ORCHESTRATED):
            return NO_REPLY  # prepared, and then nothing: the orchestrator waits, in doubt
        return {"reserved": order["quantity"]}

    def step_release(self, data: dict[str, Any], command: dict[str, Any], first_try: bool) -> Any:
        self._release(command["saga_id"], ORCHESTRATED)
        return {"released": True}


# -- shipping ---------------------------------------------------------------------------


class ShippingService(Service):
    """Books the shipment, the saga's last step (nothing after it can fail, so no undo)."""

    name = "shipping"

    def events(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {
            "stock.decremented": lambda o: self.ship(o, first_try=True),
            "order.cancelling": self._cancelling,
        }

    def ship(
        self, order: dict[str, Any], *, first_try: bool, command: dict[str, Any] | None = None
    ) -> None:
        oid, fields = order["order_id"], _step_fields(command)
        self.report("step.started", oid, step="create_shipment", **fields)
        if hits(order.get("faults"), "hang", first_try=first_try):
            return  # the carrier's API never answers: stuck
        fields.pop("idempotency_key", None)
        if _ship(oid) is None:  # the order is being undone: no booking
            self.report("step.failed", oid, step="create_shipment", error=CANCELLED, **fields)
            return
        self.report("step.succeeded", oid, step="create_shipment", **fields)
        self.emit("shipment.created", order)

    def _cancelling(self, order: dict[str, Any]) -> None:
        """The order is being undone: cancel a booking, or make sure none is made later."""
        oid, command_id = order["order_id"], order.get("command_id")
        shipment, created = Shipment.objects.select_for_update().get_or_create(
            order_id=oid, defaults={"carrier": "", "cancelled": True}
        )
        if not created and not shipment.cancelled:
            self.report("compensation.started", oid, step="create_shipment", command_id=command_id)
            shipment.cancelled = True
            shipment.save(update_fields=["cancelled"])
            self.report(
                "compensation.succeeded", oid, step="create_shipment", command_id=command_id
            )

    # operator commands

    def command_retry_step(self, order: dict[str, Any], command: dict[str, Any]) -> None:
        if command.get("step") == "create_shipment":
            self.ship(order, first_try=False, command=command)

    def command_skip_step(self, order: dict[str, Any], command: dict[str, Any]) -> None:
        oid, fields = order["order_id"], _step_fields(command)
        fields.pop("idempotency_key", None)
        self.report(
            "step.succeeded",
            oid,
            step="create_shipment",
            attributes={"skipped": "true"},
            **fields,
        )
        self.emit("shipment.created", order)

    # orchestrated steps

    def step_create_shipment(
        self, data: dict[str, Any], command: dict[str, Any], first_try: bool
    ) -> Any:
        if hits(data.get("faults"), "hang", first_try=first_try):
            return NO_REPLY
        shipment = _ship(command["saga_id"])
        if shipment is None:
            raise Refused("Cancelled", "the booking was cancelled", retryable=False)
        return {"shipment_id": shipment.pk}

    def step_undo_create_shipment(
        self, data: dict[str, Any], command: dict[str, Any], first_try: bool
    ) -> Any:
        """An operator compensates an orchestrated saga at its last step: cancel the booking."""
        cancelled = Shipment.objects.filter(order_id=command["saga_id"], cancelled=False).update(
            cancelled=True
        )
        return {"cancelled": bool(cancelled)}


CANCELLED = {"type": "Cancelled", "message": "the order is being undone", "retryable": False}


def _ship(order_id: str) -> Shipment | None:
    """Book (once per order); None when the order's booking was cancelled."""
    shipment, _ = Shipment.objects.get_or_create(order_id=order_id, defaults={"carrier": "DHL"})
    return None if shipment.cancelled else shipment


SERVICES: dict[str, type[Service]] = {
    cls.name: cls for cls in (OrderService, PaymentService, InventoryService, ShippingService)
}
