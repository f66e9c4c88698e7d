"""Saga definitions in plain Python: an ordered list of steps, registered by name.

    from orchestrator import Step, RetryPolicy, saga_define

    saga_define(
        "order",
        service="order",
        steps=[
            Step("create_order", action=create_order, compensation=cancel_order),
            Step("charge_payment", kind="remote", service="payment", command="charge",
                 retry=RetryPolicy(max_attempts=5), timeout=30),
            Step("reserve_stock", kind="tcc", action=reserve, confirm=commit, compensation=release),
            Step("create_shipment", action=create_shipment),
        ],
    )

Kinds (docs/orchestrator.md):

* ``local``: ``action(ctx)`` runs in the worker, inside the step's transaction:
  what it writes to the database commits with the step or not at all; its
  return value (JSON) is the step's result, visible to later steps as
  ``ctx.results[name]``. ``compensation(ctx)`` undoes it.
* ``remote``: a command message goes to ``service`` through the outbox; the
  step completes when the service answers (a reply message or
  ``step.succeeded`` / ``step.failed`` telemetry naming the command id).
* ``tcc`` (try-confirm-cancel, a two-phase participant): ``action`` prepares
  (reported ``tx.prepared``), ``confirm`` commits when the whole saga
  succeeded (``tx.committed``), ``compensation`` cancels (``tx.rolled_back``).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from orchestrator.context import StepContext

Action = Callable[["StepContext"], Any]
Kind = Literal["local", "remote", "tcc"]


class StepFailed(Exception):
    """Raise from an action to fail the attempt with a type and a retryable flag of your own."""

    def __init__(self, message: str, *, type: str = "StepFailed", retryable: bool = True) -> None:
        super().__init__(message)
        self.type = type
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how soon a failed attempt (or compensation) runs again.

    Delay before attempt n+1: ``min(backoff_max, backoff_base * 2 ** (n - 1))``,
    scaled by a random factor in ``[1 - jitter, 1]`` (so retries of many sagas
    spread out). ``non_retryable``: exception types that fail at once;
    :class:`StepFailed` carries its own flag.
    """

    max_attempts: int = 3
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    jitter: float = 0.5
    non_retryable: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts: at least 1")
        if self.backoff_base < 0 or self.backoff_max < 0 or not 0 <= self.jitter <= 1:
            raise ValueError("backoff_base, backoff_max >= 0 and 0 <= jitter <= 1")

    def delay(self, attempt: int, rng: random.Random | None = None) -> timedelta:
        base = min(self.backoff_max, self.backoff_base * 2 ** max(attempt - 1, 0))
        factor = 1 - self.jitter * (rng or random).random()
        return timedelta(seconds=base * factor)

    def retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, StepFailed):
            return exc.retryable
        return not isinstance(exc, self.non_retryable)


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    action: Action | None = None
    compensation: Action | None = None
    confirm: Action | None = None  # tcc only
    kind: Kind = "local"
    service: str = ""  # remote: who runs it (and whose circuit breaker counts)
    command: str = ""  # remote: the action name in the command message
    undo_command: str = ""  # remote: the compensation's action name (default "undo_<command>")
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    compensation_retry: RetryPolicy | None = None  # default: ``retry``
    timeout: float = 30.0  # seconds; an attempt that takes longer failed

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 100:
            raise ValueError("name: 1 to 100 characters")
        if self.kind not in ("local", "remote", "tcc"):
            raise ValueError(f"{self.name}: kind must be local, remote or tcc")
        if self.kind in ("local", "tcc") and self.action is None:
            raise ValueError(f"{self.name}: a {self.kind} step needs an action")
        if self.kind == "remote" and not (self.service and self.command):
            raise ValueError(f"{self.name}: a remote step needs service= and command=")
        if self.timeout <= 0:
            raise ValueError(f"{self.name}: timeout must be positive")

    @property
    def undo_action(self) -> str:
        return self.undo_command or f"undo_{self.command}"

    @property
    def undo_retry(self) -> RetryPolicy:
        return self.compensation_retry or self.retry

    @property
    def has_compensation(self) -> bool:
        return self.compensation is not None or self.kind == "remote"


@dataclass(frozen=True, slots=True)
class SagaDefinition:
    name: str
    steps: tuple[Step, ...]
    service: str  # the service the orchestrator reports this saga as

    def step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(f"{self.name} has no step {name!r}")

    def index(self, name: str) -> int:
        return [s.name for s in self.steps].index(name)


_registry: dict[str, SagaDefinition] = {}
_lock = threading.Lock()


def saga_define(
    name: str, *, steps: Sequence[Step], service: str = "orchestrator"
) -> SagaDefinition:
    """Register a saga type (re-registering the same name replaces it, e.g. on reload)."""
    if not name or len(name) > 100:
        raise ValueError("name: 1 to 100 characters")
    if not steps:
        raise ValueError(f"{name}: a saga needs at least one step")
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"{name}: step names must be unique")
    definition = SagaDefinition(name, tuple(steps), service)
    with _lock:
        _registry[name] = definition
    return definition


def definition_get(name: str) -> SagaDefinition:
    try:
        return _registry[name]
    except KeyError:
        raise UnknownSagaType(name) from None


def definitions_list() -> list[SagaDefinition]:
    return sorted(_registry.values(), key=lambda d: d.name)


class UnknownSagaType(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"saga_type: no saga type {name!r} is defined")
        self.name = name
