#!/usr/bin/env python3
"""Server CPU time per request, two versions of pycolytics.py side by side, in alternating runs.

    python3 bench/cpu_ab.py OLD/pycolytics.py pycolytics.py [ROUNDS]
    python3 bench/cpu_ab.py OLD/pycolytics.py pycolytics.py 6 --postgres postgresql://127.0.0.1:5432/test
    (for example OLD from `git show 57138d4:pycolytics.py > /tmp/old/pycolytics.py`)

Throughput on a shared machine swings with whatever else runs; the CPU time the server process
itself spends per answered request swings much less. Each round starts each version afresh
(which goes first alternates from round to round), has one client send 3000 single events one
after another (each waits for its own commit: the median round trip is printed too), drives
single events and then batches of 100 (3 s each, 16 connections, as bench.py does, checked
against the database as there) and divides the process's user+system time by the requests
answered; the medians are compared, and so are the medians of events per second. With
--postgres each run writes into a schema of its own in that database, dropped after.
"""

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_client(service, database, count=3000):
    """Single events from one keep-alive client, each sent once the one before is answered:
    what a request costs when no other shares its commit. The median round trip in ms."""
    body = bench.single_body()
    request = (f"POST /v1.0/event HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    before, times = bench.count_rows(database), []
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as client:
        for _ in range(count):
            started = time.perf_counter()
            client.sendall(request)
            answer = client.recv(4096)
            times.append(time.perf_counter() - started)
            if not answer.startswith(b"HTTP/1.1 204"):
                raise RuntimeError(f"the server answered {answer[:40]!r}")
    bench.VERIFIED.append(bench.count_rows(database) - before == count)
    return statistics.median(times) * 1000


def one_run(program, postgres, cells, micros, rates, label):
    folder = tempfile.mkdtemp(prefix="pycolytics-cpu-")
    schema, database = bench.postgres_schema(postgres) if postgres else (None, os.path.join(folder, "events.db"))
    try:
        service = bench.start_pycolytics(database, program=[os.path.abspath(program)], cwd=folder)
        try:
            bench.wait_for_204(service.port)
            before = cpu_seconds(service.process.pid)
            rates[label, "one client"].append(one_client(service, database))
            micros[label, "one client"].append((cpu_seconds(service.process.pid) - before) / 3000 * 1e6)
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
    micros = {(label, name): [] for label, _ in programs for name in ["one client"] + [cell[0] for cell in cells]}
    rates = {key: [] for key in micros}
    for number in range(arguments.rounds):
        for label, program in programs if number % 2 == 0 else programs[::-1]:
            one_run(program, arguments.postgres, cells, micros, rates, label)
    old, new = (statistics.median(micros[label, "one client"]) for label, _ in programs)
    print(f"one client: server CPU per request, old {old:.0f} µs, new {new:.0f} µs, new/old {new / old:.0%}")
    old, new = (statistics.median(rates[label, "one client"]) for label, _ in programs)
    print(f"one client: median round trip, old {old:.3f} ms, new {new:.3f} ms, new/old {new / old:.0%}")
    for name, *_ in cells:
        old, new = (statistics.median(micros[label, name]) for label, _ in programs)
        print(f"{name}: server CPU per request, old {old:.0f} µs, new {new:.0f} µs, new/old {new / old:.0%}")
        old, new = (statistics.median(rates[label, name]) for label, _ in programs)
        print(f"{name}: events per second, old {old:,.0f}, new {new:,.0f}, new/old {new / old:.0%}")
    return 0 if all(bench.VERIFIED) else 1


if __name__ == "__main__":
    sys.exit(main())
