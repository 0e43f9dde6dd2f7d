#!/usr/bin/env python3
"""Server CPU time per request, two versions of pycolytics.py side by side, in alternating runs.

    python3 bench/cpu_ab.py OLD/pycolytics.py pycolytics.py [ROUNDS]
    (for example OLD from `git show 57138d4:pycolytics.py > /tmp/old/pycolytics.py`)

Throughput on a shared machine swings with whatever else runs; the CPU time the server process
itself spends per answered request swings much less. Each round starts each version afresh,
drives single events and then batches of 100 (3 s each, 16 connections, as bench.py does) and
divides the process's user+system time by the requests answered; the medians are compared.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    programs = {"old": argv[0], "new": argv[1]}
    rounds = int(argv[2]) if len(argv) > 2 else 3
    cells = (("single", "/v1.0/event", bench.single_body(), 1), ("batch", "/v1.0/events", bench.batch_body(100), 100))
    micros = {(label, cell[0]): [] for label in programs for cell in cells}
    for _ in range(rounds):
        for label, program in programs.items():
            folder = tempfile.mkdtemp(prefix="pycolytics-cpu-")
            database = os.path.join(folder, "events.db")
            service = bench.start_pycolytics(database, program=[os.path.abspath(program)], cwd=folder)
            try:
                for name, path, body, events in cells:
                    before = cpu_seconds(service.process.pid)
                    result = bench.measured(service, database, path, body, events, 16, 3)
                    spent = cpu_seconds(service.process.pid) - before
                    micros[label, name].append(spent / max(1, result["ok"]) * 1e6)
            finally:
                service.stop()
    for name, *_ in cells:
        old, new = (sorted(micros[label, name])[rounds // 2] for label in programs)
        print(f"{name}: server CPU per request, old {old:.0f} µs, new {new:.0f} µs, new/old {new / old:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
