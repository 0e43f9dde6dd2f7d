#!/usr/bin/env python3
"""A bounded soak of the built-in server: hostile and normal clients at once, for a few minutes.

    python3 bench/soak.py                 # 120 s of attack, after 20 s of normal traffic alone
    python3 bench/soak.py --seconds 60 --calm 10

One pycolytics.py process on 127.0.0.1. Normal clients post single events over keep-alive
connections, a few at a time, and time every answer. First they run alone (the calm phase),
then with every attacker of issue 9 running against the same server from other loopback
addresses (127.0.9.x): slowloris heads and bodies, blank-line drips, pipelined floods of
requests answered at once, bad framing, bodies announced large and never finished,
connections reset at once, and idle keep-alive connections. The report gives the normal
clients' p50/p99 in both phases, the server's RSS every few seconds, how many normal requests
failed, and whether the database holds exactly what was acknowledged. Everything stops by
itself; nothing leaves this machine.
"""

import argparse
import contextlib
import http.client
import os
import random
import socket
import sqlite3
import struct
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import KEY, rss_kib, single_body, start_pycolytics  # noqa: E402


class Normal:
    """Well-behaved clients: keep-alive, one event per request, every answer timed."""

    def __init__(self, port, clients=4, pause=0.002):
        self.port, self.clients, self.pause = port, clients, pause
        self.latencies, self.failures, self.acknowledged = [], 0, 0
        self.lock = threading.Lock()

    def run(self, stop):
        threads = [threading.Thread(target=self._client, args=(stop,)) for _ in range(self.clients)]
        for thread in threads:
            thread.start()
        return threads

    def _client(self, stop):
        connection = None
        while not stop.is_set():
            try:
                if connection is None:
                    connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                started = time.monotonic()
                connection.request("POST", "/v1.0/event", single_body(), {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                elapsed = time.monotonic() - started
                with self.lock:
                    if response.status == 204:
                        self.acknowledged += 1
                        self.latencies.append(elapsed)
                    else:
                        self.failures += 1
            except (OSError, http.client.HTTPException):
                with self.lock:
                    self.failures += 1
                connection = None
            time.sleep(self.pause)

    def take(self):
        with self.lock:
            latencies, self.latencies = sorted(self.latencies), []
        if not latencies:
            return None
        return (latencies[len(latencies) // 2] * 1000, latencies[int(len(latencies) * 0.99)] * 1000, len(latencies))


def attacker(kind, port, stop, number):
    """One hostile client, looping until `stop`; every socket it opens it closes."""
    source = (f"127.0.9.{number % 250 + 1}", 0)
    event = single_body()
    while not stop.is_set():
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=source) as sock:
                ATTACKS[kind](sock, stop, event)
        stop.wait(0.05)


def slow_head(sock, stop, event):
    for byte in b"POST /v1.0/event HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 200:
        sock.send(bytes([byte]))
        if stop.wait(0.1):
            return


def blank_lines(sock, stop, event):
    while not stop.wait(0.5):
        sock.send(b"\r\n")


def pipelined_flood(sock, stop, event):
    sock.sendall(b"POST /v1.0/events HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n[]" * 500
                 + b"POST /v1.0/event HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\n{" * 500)
    sock.settimeout(5)
    while sock.recv(1 << 16):
        pass


def bad_framing(sock, stop, event):
    sock.sendall(random.choice([b"GET / HTTP/1.1\r\nHost: t\nX: 1\r\n\r\n", b"\x00\x01\x02\r\n\r\n",
                                b"GET / HTTP/1.1\r\n\r\n", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n"]))
    sock.settimeout(5)
    sock.recv(1000)


def unfinished_body(sock, stop, event):
    sock.sendall(b"POST /v1.0/events HTTP/1.1\r\nHost: t\r\nContent-Length: 1048576\r\n\r\n[" + b" " * 900_000)
    stop.wait(12)


def reset_at_once(sock, stop, event):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def idle_keep_alive(sock, stop, event):
    sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    sock.settimeout(5)
    sock.recv(1000)
    stop.wait(4)


ATTACKS = {"slow head": slow_head, "blank lines": blank_lines, "pipelined flood": pipelined_flood,
           "bad framing": bad_framing, "unfinished 1 MiB bodies": unfinished_body, "resets": reset_at_once,
           "idle keep-alive": idle_keep_alive}
ATTACKERS = {"slow head": 40, "blank lines": 40, "pipelined flood": 2, "bad framing": 4,
             "unfinished 1 MiB bodies": 40, "resets": 4, "idle keep-alive": 60}


def phase(normal, seconds, pid, label, samples):
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        time.sleep(min(5, seconds))
        samples.append((label, round(time.monotonic() - started), rss_kib(pid) / 1024))
    return normal.take()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=120, help="length of the attack (default 120)")
    parser.add_argument("--calm", type=int, default=20, help="normal traffic alone before it (default 20)")
    arguments = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="pycolytics-soak-")
    database = os.path.join(folder, "soak.db")
    service = start_pycolytics(database)
    stop_normal, stop_attack = threading.Event(), threading.Event()
    normal = Normal(service.port)
    samples = []
    try:
        normal_threads = normal.run(stop_normal)
        calm = phase(normal, arguments.calm, service.process.pid, "calm", samples)
        attack_threads = [threading.Thread(target=attacker, args=(kind, service.port, stop_attack, n), daemon=True)
                          for kind, many in ATTACKERS.items() for n in range(many)]
        for thread in attack_threads:
            thread.start()
        under_attack = phase(normal, arguments.seconds, service.process.pid, "attack", samples)
    finally:
        stop_attack.set()
        stop_normal.set()
        for thread in normal_threads:
            thread.join(15)
        alive = service.process.poll() is None
        service.stop()
    with contextlib.closing(sqlite3.connect(database)) as connection:
        stored = connection.execute("SELECT count(*) FROM event").fetchone()[0]
    print(f"# soak: {arguments.calm} s calm, then {arguments.seconds} s under attack; "
          f"{sum(ATTACKERS.values())} attackers ({', '.join(f'{n} {kind}' for kind, n in ATTACKERS.items())})")
    print("| phase | normal requests answered 204 | p50 | p99 |")
    print("|---|---:|---:|---:|")
    for label, figures in (("calm", calm), ("under attack", under_attack)):
        if figures:
            print(f"| {label} | {figures[2]:,} | {figures[0]:.2f} ms | {figures[1]:.2f} ms |")
    print(f"- normal requests that failed: {normal.failures}; server alive at the end: {alive}")
    print("- RSS (MiB): " + ", ".join(f"{label} {second} s: {rss:.1f}" for label, second, rss in samples))
    print(f"- acknowledged {normal.acknowledged:,}, stored {stored:,}: "
          + ("every acknowledged event is stored" if stored >= normal.acknowledged else "EVENTS MISSING"))
    return 0 if alive and stored >= normal.acknowledged else 1


if __name__ == "__main__":
    sys.exit(main())
