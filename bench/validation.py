#!/usr/bin/env python3
"""What validation costs: parsing and checking request bodies, in one process, no server.

    python3 bench/validation.py                            # this repository's pycolytics.py
    python3 bench/validation.py --against OLD/pycolytics.py   # and another copy, side by side

Two parts. The fast path: a single event, a single event as Godot writes it, and a batch of
100, each parsed and validated into rows (Pycolytics.ingest without the writer), best of
several runs. Then hostile bodies: each shape grows from 1 KiB, doubling, up to max_body_bytes
(1 MiB) or until one run takes over a second, and the table shows the time at about 64 KiB and
at the largest size: sixteen times the first for 1 MiB is linear, 256 times quadratic.
Standard library only; nothing is stored.
"""

import argparse
import datetime
import gc
import importlib.util
import json
import os
import sys
import time
import timeit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KEY = "bench-key-0123456789"
MAX_BODY = 1048576
SLOW = 1.0  # seconds: a shape stops growing once one run takes longer

EVENT = {
    "event_type": "level_started", "application": "my-game", "version": "1.0.2", "platform": "Linux",
    "user_id": "3f2a9c1e", "session_id": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "value": {"level": 3, "score": 12345, "weapon": "bow"}, "api_key": KEY,
}
# Godot's addon: fixed field order, an empty version, no spaces, a float written as Godot does.
GODOT_EVENT = (
    '{"event_type":"startup","application":"My Game","version":"","platform":"Linux",'
    '"user_id":"1a2b3c4d","session_id":"' + "ab" * 32 + '","value":{"fps":59.94},"api_key":"' + KEY + '"}'
)


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def validate(module):
    """A function validating one body into rows, as the server does, for events or one event."""
    config = module.load_config(environ={}, overrides={"database": ":memory:", "api_keys": KEY, "quiet": "yes"})
    validator = module.Validator(config, module.Keyring(config))
    received = datetime.datetime.now(datetime.timezone.utc)

    def run(body, batch):
        try:
            return validator.rows(module.parse_json(body), batch, body, received)
        except module.HTTPError as error:
            return error
        except Exception as error:  # what the application would answer with a 500
            return Crash(error)
    return run


class Crash:
    status = "500"

    def __init__(self, error):
        self.error = error


def event_bytes(value):
    """A valid event with `value` (JSON bytes) as its value."""
    return json.dumps(dict(EVENT, value=None)).encode().replace(b'"value": null', b'"value": ' + value)


def fill(head, unit, tail, size):
    """head + unit * n + tail, n as large as fits in `size` bytes."""
    return head + unit * max(1, (size - len(head) - len(tail)) // len(unit)) + tail


HOSTILE = [
    # (name, path is a batch, body of about `size` bytes)
    ("Godot fallback, an unterminated string of \\\"", True, lambda size: fill(b'"', b'\\"', b"", size)),
    ("[nan, nan, ...]", True, lambda size: fill(b"[", b"nan,", b"nan]", size)),
    ("[\"\", \"\", ..., nan]: strings in the fallback", True, lambda size: fill(b"[", b'"",', b"nan]", size)),
    ("strings with \\v in the fallback", True, lambda size: fill(b'["', b"\\v", b'",nan]', size)),
    ("one event, value [1e999, ...], wrong key", False,
     lambda size: fill(b'{"api_key":"x","value":{"a":[', b"1e999,", b"1]}}", size)),
    ("1e999 nested 900 deep, wrong key", False,
     lambda size: b'{"api_key":"x","value":' + b'{"a":' * 899 + b"1e999" + b"}" * 900),
    ("one value of [1,1,...] (over 64 KiB)", False,
     lambda size: fill(b'{"api_key":"' + KEY.encode() + b'","value":{"a":[', b"1,", b"1]}}", size)),
    ("events with values of [[],[],...] just under 64 KiB, then a 7", True,
     lambda size: fill(b"[", event_bytes(b'{"a":[' + b"[]," * 21800 + b"[]]}") + b",", b"7]", size)),
    ("events with every field wrong", True,
     lambda size: fill(b"[", b'{"event_type":1,"application":1,"version":1,"platform":1,"user_id":1,"session_id":1,'
                             b'"value":1,"api_key":"' + KEY.encode() + b'","timestamp":"x","sent_at":"y","event_id":1},',
                       b"7]", min(size, 150 * 1000))),
    ("integers of 4300 digits", False,
     lambda size: fill(b'{"api_key":"' + KEY.encode() + b'","value":{"a":[', b"7" * 4300 + b",", b"1]}}", size)),
    ("[\"\\ud83d\\ude00\", ...]: surrogate pairs", True, lambda size: fill(b"[", b'"\\ud83d\\ude00",', b'""]', size)),
    ("timestamps of 1,000 fraction digits", True,
     lambda size: b"[" + b",".join([json.dumps(dict(EVENT, timestamp="2024-05-01T12:00:00." + "1" * 1000 + "x"))
                                    .encode()] * max(1, min(1000, size // 1400))) + b"]"),
]


def best(function, repeat):
    gc.collect()
    return min(timeit.repeat(function, number=1, repeat=repeat))


def fast_path(modules, repeat):
    """The time to validate valid bodies, in each module; the best of `repeat` turns."""
    bodies = [
        ("a single event", json.dumps(EVENT).encode(), False, 2000),
        ("a single event as Godot writes it", GODOT_EVENT.encode(), False, 2000),
        ("a batch of 100 events", json.dumps([EVENT] * 100).encode(), True, 100),
    ]
    print("## The fast path: parse and validate, µs per request (best of %d)\n" % repeat)
    print("| body | " + " | ".join(label for label, _ in modules) + (" | this ÷ against |" if len(modules) > 1 else ""))
    print("|---|" + "---:|" * (len(modules) + (len(modules) > 1)))
    for name, body, batch, number in bodies:
        cells = [float("inf")] * len(modules)
        for _ in range(repeat):  # taking turns, so that a noisy moment hurts every column alike
            for column, (_, run) in enumerate(modules):
                assert isinstance(run(body, batch), list), name
                spent = timeit.timeit(lambda: run(body, batch), number=number) / number * 1e6
                cells[column] = min(cells[column], spent)
        ratio = f" {cells[1] / cells[0]:.0%} |" if len(cells) > 1 else ""
        print(f"| {name} | " + " | ".join(f"{cell:.1f}" for cell in cells) + " |" + ratio)
    print()


def grow(run, make, batch, repeat):
    """[(body bytes, seconds, answer)] for one shape at sizes doubling from 1 KiB, until too slow."""
    results, size, seen = [], 1024, set()
    while size <= MAX_BODY:
        body = make(size)[:MAX_BODY]
        size *= 2
        if len(body) in seen:  # a shape that does not grow this far
            continue
        seen.add(len(body))
        answer = getattr(run(body, batch), "status", "rows")
        spent = best(lambda: run(body, batch), repeat)
        results.append((len(body), spent, answer.split()[0]))
        if spent > SLOW:
            break
    return results


def hostile(modules, repeat):
    """Each hostile shape at growing sizes, in each module: the time at 64 KiB and at the largest size."""
    print("## Hostile bodies: ms to parse and validate (best of several), at about 64 KiB and at the largest size\n")
    print("Linear time: the largest body costs its size ratio times the 64 KiB one (16 for 1 MiB). "
          f"A shape stops growing once a run takes over {SLOW:.0f} s.\n")
    header = "| shape | answer | " + " | ".join(f"{label}: 64 KiB | {label}: largest" for label, _ in modules) + " |"
    print(header)
    print("|---|---|" + "---:|---:|" * len(modules))
    for name, batch, make in HOSTILE:
        cells, answer = [], ""
        for _, run in modules:
            results = grow(run, make, batch, repeat)
            near = min(results, key=lambda result: abs(result[0] - 65536))
            largest = results[-1]
            answer = largest[2]
            cells.append(f"{near[1] * 1000:.1f} ms ({near[0] // 1024} KiB)")
            cells.append(f"{largest[1] * 1000:.1f} ms ({largest[0] // 1024} KiB)")
        print(f"| {name} | {answer} | " + " | ".join(cells) + " |")
    print()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", metavar="PYCOLYTICS_PY", help="another pycolytics.py to measure side by side")
    parser.add_argument("--repeat", type=int, default=15, help="turns per measurement; the best one counts")
    parser.add_argument("--fast-only", action="store_true", help="only the fast path")
    args = parser.parse_args(argv)
    modules = [("this", validate(load(os.path.join(ROOT, "pycolytics.py"), "pycolytics_this")))]
    if args.against:
        modules.insert(0, ("against", validate(load(args.against, "pycolytics_against"))))
    print(f"Python {sys.version.split()[0]}; columns: " + ", ".join(label for label, _ in modules) + "\n")
    fast_path(modules, args.repeat)
    if not args.fast_only:
        hostile(modules, min(args.repeat, 5))


if __name__ == "__main__":
    sys.exit(main())
