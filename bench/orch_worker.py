"""One orchestrator worker process of bench/orchestrator.py: start its share of sagas, drain.

Prints one JSON line: {"t0", "t_started", "t1", "started", "transitions"} (wall-clock
seconds; ``t_started``: when its last saga was started and the draining began).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sagaadmin.settings.base")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--saga-type", required=True)
    parser.add_argument("--ids", required=True, help="first:last:step of the saga numbers")
    parser.add_argument("--tag", required=True)
    parser.add_argument(
        "--start-group", type=int, default=50, help="sagas per sagas_start call (1: saga_start)"
    )
    args = parser.parse_args()
    import django

    django.setup()
    import bench.orch_sagas  # noqa: F401  (defines the saga types)
    from orchestrator import saga_start, sagas_start
    from orchestrator.worker import Worker

    first, last, step = (int(x) for x in args.ids.split(":"))
    t0 = time.time()
    numbers = list(range(first, last, step))
    group = max(1, args.start_group)
    for at in range(0, len(numbers), group):
        chunk = numbers[at : at + group]
        if group == 1:
            saga_start(
                saga_type=args.saga_type, saga_id=f"{args.tag}-{chunk[0]}", data={"n": chunk[0]}
            )
        else:
            sagas_start(
                saga_type=args.saga_type, sagas=[(f"{args.tag}-{i}", {"n": i}) for i in chunk]
            )
    started = len(numbers)
    t_started = time.time()
    transitions = Worker(batch=50).drain()
    print(
        json.dumps(
            {
                "t0": t0,
                "t_started": t_started,
                "t1": time.time(),
                "started": started,
                "transitions": transitions,
            }
        )
    )


if __name__ == "__main__":
    main()
