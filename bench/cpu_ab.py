#!/usr/bin/env python3
"""Server CPU time per request, two versions of pycolytics.py side by side, in alternating runs.

    python3 bench/cpu_ab.py OLD/pycolytics.py pycolytics.py [ROUNDS]
    python3 bench/cpu_ab.py OLD/pycolytics.py pycolytics.py 6 --postgres postgresql://127.0.0.1:5432/test
    (for example OLD from `git show 57138d4:pycolytics.py > /tmp/old/pycolytics.py`)

Throughput on a shared machine swings with whatever else runs; the CPU time the server process
itself spends per answered request swings much less. Each round starts each version afresh
(which goes first alternates from round to round), drives single events and then batches of
100 (3 s each, 16 connections, as bench.py does, checked against the database as there) and
divides the process's user+system time by the requests answered; the medians are compared,
and so are the medians of events per second. With --postgres each run writes into a schema of
its own in that database, dropped after.
"""

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(program, postgres, cells, micros, rates, label):
    folder = tempfile.mkdtemp(prefix="pycolytics-cpu-")
    schema, database = bench.postgres_schema(postgres) if postgres else (None, os.path.join(folder, "events.db"))
    try:
        service = bench.start_pycolytics(database, program=[os.path.abspath(program)], cwd=folder)
        try:
            for name, path, body, events in cells:
                before = cpu_seconds(service.process.pid)
                result = bench.measured(service, database, path, body, events, 16, 3)
                spent = cpu_seconds(service.process.pid) - before
                micros[label, name].append(spent / max(1, result["ok"]) * 1e6)
                rates[label, name].append(result["events"])
        finally:
            service.stop()
    finally:
        if schema:
            bench.drop_schema(postgres, schema)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("rounds", nargs="?", type=int, default=3)
    parser.add_argument("--postgres", metavar="URL", help="write into this PostgreSQL database instead of SQLite")
    arguments = parser.parse_args(argv)
    programs = [("old", arguments.old), ("new", arguments.new)]
    cells = (("single", "/v1.0/event", bench.single_body(), 1), ("batch", "/v1.0/events", bench.batch_body(100), 100))
    micros = {(label, cell[0]): [] for label, _ in programs for cell in cells}
    rates = {key: [] for key in micros}
    for number in range(arguments.rounds):
        for label, program in programs if number % 2 == 0 else programs[::-1]:
            one_run(program, arguments.postgres, cells, micros, rates, label)
    for name, *_ in cells:
        old, new = (statistics.median(micros[label, name]) for label, _ in programs)
        print(f"{name}: server CPU per request, old {old:.0f} µs, new {new:.0f} µs, new/old {new / old:.0%}")
        old, new = (statistics.median(rates[label, name]) for label, _ in programs)
        print(f"{name}: events per second, old {old:,.0f}, new {new:,.0f}, new/old {new / old:.0%}")
    return 0 if all(bench.VERIFIED) else 1


if __name__ == "__main__":
    sys.exit(main())
