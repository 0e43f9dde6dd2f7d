#!/usr/bin/env python3
"""Instructions the server executes per request, two versions of pycolytics.py side by side, under callgrind.

    apt-get install -y valgrind
    python3 bench/instructions.py OLD/pycolytics.py pycolytics.py [--requests 1000]
    (for example OLD from `git show 37418ec:pycolytics.py > /tmp/old/pycolytics.py`)

On a shared 2-core machine two runs of the same code by cpu_ab.py can differ by 10% in CPU
time per request; an instruction count is the same from run to run (a few hundred per request
apart here), whatever else the machine does. Each version runs under `valgrind --tool=callgrind`
(about 50 times slower) with counting off while it starts; one keep-alive client sends 200
requests to warm it up, then counting is switched on for --requests more, each sent once the
one before is answered (so each is its own commit, and no timing decides how requests group),
first single events and then batches of 100. Everything the process executes is counted: the
event loop, the writer thread and SQLite, the summaries between commits. The database is then
checked against what was acknowledged, as in bench.py. Instructions are not time (a cache miss
or an fsync costs no instructions), so a change that moves work into a wait is judged by
cpu_ab.py and bench.py, not here.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def request_bytes(path, body):
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def connected(port, deadline=120.0):
    given_up = time.monotonic() + deadline
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=30)
        except OSError:
            if time.monotonic() > given_up:
                raise
            time.sleep(0.5)


def send(client, request, count):
    for _ in range(count):
        client.sendall(request)
        answer = client.recv(4096)
        if not answer.startswith(b"HTTP/1.1 204"):
            raise RuntimeError(f"the server answered {answer[:60]!r}")


def counted(output):
    """The instructions in a callgrind output file (its `totals:` line)."""
    with open(output, errors="replace") as profile:
        for line in profile:
            if line.startswith("totals:"):
                return int(line.split()[1])
    raise RuntimeError(f"{output} has no totals line")


def per_request(program, path, body, events, count):
    """Instructions per request of `count` sequential requests to a fresh server running `program`."""
    with tempfile.TemporaryDirectory(prefix="pycolytics-instructions-") as folder:
        port, database, output = bench.free_port(), os.path.join(folder, "events.db"), os.path.join(folder, "cg.out")
        environ = dict(os.environ, PYCOLYTICS_API_KEYS=bench.KEY, PYCOLYTICS_SYNCHRONOUS="full")
        server = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={output}",
             sys.executable, os.path.abspath(program), "--port", str(port), "--database", database, "--quiet"],
            env=environ, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            request = request_bytes(path, body)
            with connected(port) as client:
                send(client, request, 200)
                subprocess.run(["callgrind_control", "--instr=on", str(server.pid)], check=True, capture_output=True)
                send(client, request, count)
                subprocess.run(["callgrind_control", "--instr=off", str(server.pid)], check=True,
                               capture_output=True)
        finally:
            server.terminate()
            server.wait(120)
        bench.VERIFIED.append(bench.count_rows(database) == (200 + count) * events)
        return counted(output) / count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--requests", type=int, default=1000, help="requests counted per cell (default 1000)")
    arguments = parser.parse_args(argv)
    cells = [("single event", "/v1.0/event", bench.single_body(), 1),
             ("batch of 100", "/v1.0/events", bench.batch_body(100), 100)]
    for name, path, body, events in cells:
        old, new = (per_request(program, path, body, events, arguments.requests)
                    for program in (arguments.old, arguments.new))
        print(f"{name}: instructions per request, old {old:,.0f}, new {new:,.0f}, new/old {new / old:.1%}")
    print(f"every database held every acknowledged event: {all(bench.VERIFIED)}")
    return 0 if all(bench.VERIFIED) else 1


if __name__ == "__main__":
    sys.exit(main())
