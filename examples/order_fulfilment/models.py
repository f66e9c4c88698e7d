"""Each service's own rows. In production every service has its own database;
the demo keeps the four in Saga Admin's
(docs/decisions/0013-demo-services-in-saga-admins-processes.md)."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class Order(models.Model):
    """The order service's aggregate; ``order_id`` is also the saga id."""

    class Status(models.TextChoices):
        CREATED = "created"
        PAID = "paid"
        RESERVED = "reserved"
        SHIPPED = "shipped"
        PAYMENT_FAILED = "payment_failed"
        CANCELLING = "cancelling"
        CANCELLED = "cancelled"
        REFUND_FAILED = "refund_failed"

    order_id = models.CharField(max_length=100, primary_key=True)
    flavour = models.CharField(max_length=20)
    customer = models.CharField(max_length=100)
    sku = models.CharField(max_length=50)
    quantity = models.PositiveIntegerField()
    amount_cents = models.PositiveIntegerField()
    faults = models.JSONField(default=list, blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.CREATED)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.order_id} ({self.status})"


class Payment(models.Model):
    """The payment service's charge for an order (one per order; refunds mark it)."""

    class Status(models.TextChoices):
        CHARGED = "charged"
        REFUNDED = "refunded"

    order_id = models.CharField(max_length=100, unique=True)
    amount_cents = models.PositiveIntegerField()
    status = models.CharField(max_length=20, choices=Status.choices)
    idempotency_key = models.CharField(max_length=200)
    refund_attempts = models.PositiveIntegerField(default=0)
    updated_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"payment for {self.order_id} ({self.status})"


class Stock(models.Model):
    """The inventory service's stock level per SKU."""

    sku = models.CharField(max_length=50, primary_key=True)
    available = models.IntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.sku}: {self.available}"


class Reservation(models.Model):
    """Stock the inventory service holds for an order (prepared, then committed or released)."""

    class Status(models.TextChoices):
        PREPARED = "prepared"
        COMMITTED = "committed"
        RELEASED = "released"

    order_id = models.CharField(max_length=100, unique=True)
    sku = models.CharField(max_length=50)
    quantity = models.PositiveIntegerField()
    status = models.CharField(max_length=20, choices=Status.choices)
    updated_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.quantity} {self.sku} for {self.order_id} ({self.status})"


class Shipment(models.Model):
    """The shipping service's shipment for an order."""

    order_id = models.CharField(max_length=100, unique=True)
    carrier = models.CharField(max_length=50)
    cancelled = models.BooleanField(default=False)  # undone (or never to be booked)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"shipment for {self.order_id}"
