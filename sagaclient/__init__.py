"""sagaclient: report sagas to Saga Admin from any Python 3.9+ service (standard library only).

    from sagaclient import Reporter

    reporter = Reporter("http://sagaadmin:8000", key="sak_...", service="order",
                        spool_path="/var/lib/order/sagaadmin.spool")
    with reporter.saga("order-42", "order", attributes={"order_id": 42}) as saga:
        with saga.step("charge_payment"):
            charge()
    reporter.close()

Reporting never blocks or raises into your code: events go to a bounded queue
that a background thread sends in batches, retrying with backoff on network
errors, 429, 500, 502, 503 and 504 (honouring ``Retry-After``); with ``spool_path`` set, what
cannot be queued or sent by ``close()`` is kept in a file and sent after a
restart. See docs/client.md.
"""

from sagaclient.reporter import Reporter, SagaScope
from sagaclient.webhook import InvalidSignature, command_verify, signature_valid

__all__ = ["InvalidSignature", "Reporter", "SagaScope", "command_verify", "signature_valid"]
