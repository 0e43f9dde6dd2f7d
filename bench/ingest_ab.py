#!/usr/bin/env python3
"""Ingestion of this pycolytics.py against another one (an older commit's), in turns, in one run.

    git show 407b488:pycolytics.py > /tmp/before.py
    python3 bench/ingest_ab.py /tmp/before.py [--rounds 3] [--seconds 3] [--workers 2] [--new-connections]

Each round starts each server on a new SQLite database (synchronous = full, as by default) and
drives it with batches of 100 events from 100 players in their own sessions, then with single
events (with --new-connections: single events and the Godot client's batches of 12, each on a
connection of its own); the two servers take turns, A B A B, so that a drift of the machine's
speed falls on both. Every cell checks the database against what was acknowledged (bench.py's `measured`).
Prints each round's events per second and the ratio this/other; quote the median ratio.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

TYPES = ["session_start", "level_start", "level_end", "death", "purchase"]


def varied_batch(size):
    """Events of `size` players, each in a session of their own: what the summaries keep per user."""
    return json.dumps([dict(bench.EVENT, user_id=f"p{n}", session_id=f"s{n}", event_type=TYPES[n % len(TYPES)])
                       for n in range(size)]).encode()


def one_round(program, seconds, connections, workers, new_connections):
    cells = [("single events", "/v1.0/event", bench.single_body(), 1)]
    cells.insert(0, ("batches of 12", "/v1.0/events", bench.batch_body(12), 12) if new_connections else
                 ("batches of 100", "/v1.0/events", varied_batch(100), 100))
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        database = os.path.join(folder, "events.db")
        service = bench.start_pycolytics(database, program=[program], environ={"PYCOLYTICS_WORKERS": str(workers)})
        try:
            for name, path, body, events in cells:
                figures[name] = bench.measured(service, database, path, body, events, connections, seconds,
                                               close=new_connections)["events"]
        finally:
            service.stop()
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other", help="the other pycolytics.py (B)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="the workers setting of both servers (default 1)")
    parser.add_argument("--new-connections", action="store_true", help="a new connection for each request")
    arguments = parser.parse_args()
    this = os.path.join(bench.ROOT, "pycolytics.py")
    ratios = {}
    for number in range(arguments.rounds):
        a, b = (one_round(program, arguments.seconds, arguments.connections, arguments.workers,
                          arguments.new_connections) for program in (this, os.path.abspath(arguments.other)))
        for cell in a:
            ratios.setdefault(cell, []).append(a[cell] / b[cell])
            print(f"round {number + 1} {cell:<16} this {a[cell]:>9,.0f}  other {b[cell]:>9,.0f} events/s"
                  f"  this/other {a[cell] / b[cell]:.2f}", flush=True)
    for cell, values in ratios.items():
        print(f"median this/other, {cell}: {statistics.median(values):.2f}  (from {len(values)} rounds)")
    print("every cell's database held what was acknowledged" if all(bench.VERIFIED) else "!! A CELL LOST EVENTS")


if __name__ == "__main__":
    main()
