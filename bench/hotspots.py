#!/usr/bin/env python3
# (named so as not to shadow the standard library's `profile`, which cProfile imports: bench/ is
# first on sys.path when a script here runs)
"""Where one worker's time goes under bench.py's batch load: py-spy samples, summed per thread.

    python3 -m venv /tmp/spy && /tmp/spy/bin/pip install py-spy
    python3 bench/hotspots.py --py-spy /tmp/spy/bin/py-spy            # every sample of a busy thread
    python3 bench/hotspots.py --py-spy /tmp/spy/bin/py-spy --gil      # only samples holding the GIL
    python3 bench/hotspots.py --py-spy /tmp/spy/bin/py-spy --single   # single events, not batches
    python3 bench/hotspots.py --py-spy /tmp/spy/bin/py-spy --writer   # workers = 2: the database writer

Starts pycolytics (one worker, synchronous=full) on a new database in a temporary folder, drives
batches of 100 events over 16 keep-alive connections (bench.py's load, checked against the
database as there) while `py-spy record --threads --nonblocking` samples it at 100 Hz, then
prints each thread's share of the samples and the functions (file:line) that appear in most
of them. Without --gil a thread waiting in a C call that released the GIL (an fsync in COMMIT,
SQLite's own work) still counts as busy; py-spy leaves out only threads it knows are idle.
"""

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def summary(raw, top):
    """Lines of text: samples per thread, then the `top` frames by samples that include them."""
    per_thread, including = collections.Counter(), collections.Counter()
    for line in raw.splitlines():
        stack, samples = line.rsplit(" ", 1)
        thread, *frames = stack.split(";")
        thread = thread.split(": ", 1)[-1].strip('"')
        per_thread[thread] += int(samples)
        for frame in set(frames):
            including[thread, frame] += int(samples)
    total = sum(per_thread.values())
    lines = [f"{total} samples"]
    lines += [f"  {thread}: {count} ({count / total:.0%})" for thread, count in per_thread.most_common()]
    lines.append("frames in most samples (share of their thread's samples):")
    for (thread, frame), count in including.most_common(top):
        lines.append(f"  {count / per_thread[thread]:4.0%}  {thread:18.18s}  {frame}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--py-spy", default="py-spy", help="the py-spy program (default: py-spy on PATH)")
    parser.add_argument("--seconds", type=int, default=8, help="length of the load and the recording (default 8)")
    parser.add_argument("--gil", action="store_true", help="count only samples of the thread holding the GIL")
    parser.add_argument("--top", type=int, default=40, help="frames listed (default 40)")
    parser.add_argument("--single", action="store_true", help="single events instead of batches of 100")
    parser.add_argument("--writer", action="store_true",
                        help="workers = 2, and sample the database writer process instead")
    arguments = parser.parse_args(argv)
    path, body, events = ("/v1.0/event", bench.single_body(), 1) if arguments.single else \
        ("/v1.0/events", bench.batch_body(100), 100)
    with tempfile.TemporaryDirectory(prefix="pycolytics-profile-") as folder:
        database, raw = os.path.join(folder, "events.db"), os.path.join(folder, "samples.txt")
        service = bench.start_pycolytics(database, environ={"PYCOLYTICS_WORKERS": "2"} if arguments.writer else None)
        try:
            pid = service.process.pid
            if arguments.writer:
                time.sleep(0.5)  # the second worker may still be starting
                pid = min(bench.children(pid))  # forked first: the database writer (its threads say so below)
            spy = subprocess.Popen([arguments.py_spy, "record", "--pid", str(pid), "--threads",
                                    "--nonblocking", "--format", "raw", "--duration", str(arguments.seconds),
                                    "--output", raw] + (["--gil"] if arguments.gil else []),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result = bench.measured(service, database, path, body, events, 16, arguments.seconds)
            spy.wait()
        finally:
            service.stop()
        load = "single events" if arguments.single else "batches of 100"
        print(f"{load}: {result['events']:,.0f} events/s, database checked: {result['verified']}")
        with open(raw) as samples:
            print("\n".join(summary(samples.read(), arguments.top)))
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
