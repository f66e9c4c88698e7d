"""The order-fulfilment example: four services (order, payment, inventory, shipping).

Two flavours of the same business saga (create order → charge payment →
reserve stock → create shipment):

* *orchestrated* (``order_orchestrated``): Saga Admin's orchestrator runs it;
  every step is a remote command the service obeys, answered on
  ``sagaadmin.replies`` (``orchestrated.py``);
* *choreographed* (``order_choreographed``): nobody runs it; the services react
  to each other's events on ``shop.events`` through their own outbox and report
  what they do with ``sagaclient`` (``services.py``).

``faults.py`` injects failures, ``host.py`` runs services on the broker,
``traffic.py`` places orders; ``manage.py demo`` puts it together
(docs/client.md walks through it).
"""
