#!/usr/bin/env python3
# (named so as not to shadow the standard library's `profile`, which cProfile imports: bench/ is
# first on sys.path when a script here runs)
"""Where one worker's time goes under bench.py's batch load: py-spy samples, summed per thread.

    python3 -m venv /tmp/spy && /tmp/spy/bin/pip install py-spy
    python3 bench/hotspots.py --py-spy /tmp/spy/bin/py-spy            # every sample of a busy thread
    python3 bench/hotspots.py --py-spy /tmp/spy/bin/py-spy --gil      # only samples holding the GIL

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
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pycolytics-profile-") as folder:
        database, raw = os.path.join(folder, "events.db"), os.path.join(folder, "samples.txt")
        service = bench.start_pycolytics(database)
        try:
            spy = subprocess.Popen([arguments.py_spy, "record", "--pid", str(service.process.pid), "--threads",
                                    "--nonblocking", "--format", "raw", "--duration", str(arguments.seconds),
                                    "--output", raw] + (["--gil"] if arguments.gil else []),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result = bench.measured(service, database, "/v1.0/events", bench.batch_body(100), 100, 16,
                                    arguments.seconds)
            spy.wait()
        finally:
            service.stop()
        print(f"batches of 100: {result['events']:,.0f} events/s, database checked: {result['verified']}")
        with open(raw) as samples:
            print("\n".join(summary(samples.read(), arguments.top)))
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
