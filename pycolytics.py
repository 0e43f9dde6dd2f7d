#!/usr/bin/env python3
"""Pycolytics: a tiny, self-hosted collector of analytics events for games and apps.

Clients POST JSON events over HTTP; Pycolytics checks their API key, validates them and
stores them in an SQLite database that you later open with pandas, Jupyter or any SQLite
browser, and draws a dashboard of them. It speaks the API of the original Pycolytics (v1.0),
so its Godot addon works unchanged.

Run it:          python3 pycolytics.py [--config FILE] [--host HOST] [--port PORT]
Look after it:   python3 pycolytics.py keygen | export | prune | forget | backup | copy | privacy | rebuild-summaries
Under gunicorn:  PYCOLYTICS_CONFIG=/etc/pycolytics.ini gunicorn 'pycolytics:create_app()'

One file, standard library only, Python 3.9 or newer; a postgresql:// database (several
collectors, one database) also needs psycopg 3, imported only then. Importing this module
does nothing: no file is read, no database opened and no socket bound until a server
starts or the WSGI callable `application` answers its first request.

The hops of one POST, in the order of this file's sections:
  1. Server._read           the event loop reads the bytes (no thread per connection)
  2. Server._whole_request  frames a request: head limits, Content-Length, pipelining
  3. LoopHooks.take         the application takes it in the loop (WSGI callers: Pycolytics.__call__)
  4. Pycolytics.post_*      rate limit, body read and decompressed
  5. Validator.rows         keys checked, events validated into rows, all or nothing
  6. LoopHooks.turn_ended   every request of the loop's turn goes to the writer together
  7. Writer._commit         one transaction, one fsync, for all of them (SQLiteStore.insert)
  8. Server._answer         each client gets its 204 (or the 503 of a failed commit)
Reads (reports, the dashboard, a player's export) run in the application's ReadPool, off
the loop, each within report_timeout; summaries (section "Summaries") keep them fast.
"""

__version__ = "3.0.0"
__all__ = ["Config", "ConfigError", "HTTPError", "Pycolytics", "Server", "application", "create_app",
           "load_config", "main"]

import argparse
import binascii
import bisect
import collections
import configparser
import contextlib
import copy as copy_module
import datetime
import errno
import functools
import hashlib
import hmac
import io
import itertools
import json
import logging
import math
import operator
import os
import queue
import re
import selectors
import signal
import socket
import sqlite3
import sys
import threading
import time
from http import HTTPStatus
from wsgiref.handlers import format_date_time
from wsgiref.util import is_hop_by_hop

log = logging.getLogger("pycolytics")

###############################################################################
# Limits and constants
###############################################################################

API_VERSION = "1.0.0"

# The original's development key. Accepted only while no key is configured anywhere, so the
# README's curl example works out of the box; start-up warns loudly when it is.
DEV_KEY = "I-am-an-unsecure-dev-key-REPLACE_ME"

EVENT_FIELDS = ("event_type", "application", "version", "platform", "user_id", "session_id")

# Client addresses a counter (rate limit, wrong keys) remembers at most: about 100 bytes each,
# so a flood of addresses costs a few MB before the counter forgets them all and starts afresh.
MAX_TRACKED_CLIENTS = 50_000

# Characters in a client-made event_id at most: room for a UUID, a ULID or a hash.
MAX_EVENT_ID = 100

# Digits in one integer of a request body at most: converting one is quadratic in its length,
# and the interpreter's own limit (sys.get_int_max_str_digits) is this number unless changed.
MAX_INTEGER_DIGITS = 4300

# Times as stored: UTC, as text that SQLite's date functions and pandas read.
TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"

###############################################################################
# Errors
###############################################################################


class HTTPError(Exception):
    """An answer to a request that went wrong: its `status`, `detail` (text, or a 422's list of problems), headers."""

    def __init__(self, status, detail, headers=(), retry_after=None):
        super().__init__(detail)
        self.status = f"{status} {HTTPStatus(status).phrase}"
        self.detail = detail
        self.headers = list(headers)
        if retry_after is not None:  # exposed: browsers show a page's scripts few answer headers unless told
            self.headers += [("Retry-After", str(retry_after)), ("Access-Control-Expose-Headers", "Retry-After")]


def busy(detail, retry_after=1):
    return HTTPError(503, detail, retry_after=retry_after)


def error_answer(error):
    """(status, headers, body) of an HTTPError: the one JSON format of every refusal, the application's or server's."""
    body = json.dumps({"detail": error.detail}).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    return error.status, headers + error.headers, body


INTERNAL_ERROR = error_answer(HTTPError(500, "internal server error"))  # never says more: no tracebacks out


class ConfigError(Exception):
    """A configuration that cannot work; the message names the key and where it came from."""


class UsageError(Exception):
    """A command line that cannot work as given (exit status 2); the message says what to change."""


###############################################################################
# Configuration
###############################################################################


def _items(value):
    """The entries of a list setting: one per line, or separated by commas."""
    return tuple(item for line in value.splitlines() for item in (part.strip() for part in line.split(",")) if item)


def _glimpse(key):
    """A key as a message may show it: never whole, since messages end up in logs."""
    return f"{key[:4]!r}... ({len(key)} characters)"


def _keys(value):
    keys = _items(value)
    for key in keys:
        if not key.isprintable() or any(character.isspace() for character in key):
            raise ValueError(f"the key {_glimpse(key)} holds a space or a control character; separate keys with "
                             "commas or new lines, and start a comment after a key with a space and ; or #")
    return keys


def _number(convert, lowest, highest, accepted):
    """A parser of numbers from `lowest` to `highest`, raising a ValueError saying what is accepted."""
    def parse(value):
        with contextlib.suppress(ValueError):
            number = convert(value)
            if lowest <= number <= highest:  # NaN fails the comparison
                return number
        raise ValueError(f"must be {accepted}")
    return parse


_port = _number(int, 0, 65535, "a whole number from 0 to 65535")
_count = _number(int, 1, math.inf, "a whole number of at least 1, without a unit (like 1000, or 1048576 for 1 MiB)")
_seconds = _number(float, 0.001, 1e6, "a number of seconds from 0.001 to 1000000, like 5 or 0.5")
_days = _number(float, 0, 999_999, "a number of days, or 0 to keep events forever")


def _flag(value):
    word = value.strip().lower()
    if word in ("1", "yes", "true", "on"):
        return True
    if word in ("0", "no", "false", "off"):
        return False
    raise ValueError("must be yes or no")


def _synchronous(value):
    word = value.strip().lower()
    if word not in ("full", "normal", "off", "extra"):
        raise ValueError("must be full, normal, off or extra")
    return word


def _secret(value):
    keys = _keys(value)
    if len(keys) > 1:
        raise ValueError("must be one secret, without commas")
    return keys[0] if keys else ""


def _field_name(value):
    """A key of events' values, as the game-analytics conventions name them."""
    name = value.strip()
    if not name or not name.isprintable() or any(character in name for character in '"\\'):
        raise ValueError("must be a key of the events' value, without quotes or backslashes")
    return name


class TrustedProxies:
    """The addresses and networks (CIDR) of our own reverse proxies: `address in proxies` says if a peer is one."""

    def __init__(self, addresses, networks):
        self.addresses = frozenset(addresses)
        self.networks = tuple(networks)

    def __contains__(self, address):
        if address in self.addresses:
            return True
        if self.networks:
            import ipaddress  # imported already by _proxies, which made the networks
            with contextlib.suppress(ValueError):
                found = ipaddress.ip_address(address)
                found = getattr(found, "ipv4_mapped", None) or found  # a dual-stack socket's ::ffff:10.0.0.1
                return any(found in network for network in self.networks)
        return False


def _address(text):
    """An IP address written as sockets report peers (::1, not 0:0::1); ValueError if not one."""
    family = socket.AF_INET6 if ":" in text else socket.AF_INET
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, text))
    except OSError:
        raise ValueError(text) from None


def _proxies(value):
    addresses, networks = set(), []
    for entry in _items(value):
        try:
            if "/" in entry:
                import ipaddress  # here: 1 MB of memory that only configured networks need
                networks.append(ipaddress.ip_network(entry, strict=False))
            else:
                addresses.add(_address(entry))
        except ValueError:
            raise ValueError(f"{entry!r} is neither an IP address (10.0.0.2, ::1) nor a network "
                             "(10.0.0.0/8, fd00::/8)") from None
    return TrustedProxies(addresses, networks)


ANY_ORIGIN = "*"


def _origins(value):
    """ANY_ORIGIN for "*", else the set of origins (scheme://host[:port]) named."""
    origins = _items(value)
    if "*" in origins:
        return ANY_ORIGIN
    for origin in origins:
        if not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError(f"{origin!r} is not an origin like https://example.com or http://localhost:8060")
    return frozenset(origins)


_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def _rate(value):
    """None for "off", else (requests, seconds) from "60/minute" or "60 per minute"."""
    text = value.strip().lower()
    if text in ("off", "none", "no", ""):
        return None
    found = re.fullmatch(r"(\d+)\s*(?:/|per)\s*(second|minute|hour|day)s?", text)
    if not found or int(found.group(1)) < 1:
        raise ValueError("must be off, or a number of requests per second, minute, hour or day, like 60/minute")
    return int(found.group(1)), _PERIODS[found.group(2)]


# One ini key: its default (as the ini would write it), the function that parses and checks a value (raising
# ValueError with what is accepted), its scope and what it does. scope: "restart" ([pycolytics] only, and only a
# restart changes it), "server" ([pycolytics] only; SIGHUP reloads it), "app" (also in [app:NAME], for its events).
Setting = collections.namedtuple("Setting", "name default parse scope description")

# Every ini key, in the order pycolytics.ini documents them (it shows each with its default).
SETTINGS = (
    Setting("database", "pycolytics.db", str.strip, "restart", "the SQLite database file, or a postgresql:// URL"),
    Setting("api_keys", "", _keys, "app", "the keys clients send in each event's api_key"),
    Setting("host", "127.0.0.1", str.strip, "restart", "the address the built-in server listens on"),
    Setting("port", "8000", _port, "restart", "the port the built-in server listens on"),
    Setting("synchronous", "full", _synchronous, "restart",
            "what a power cut may lose (also PostgreSQL's synchronous_commit)"),
    Setting("quiet", "no", _flag, "server", "no log line per request"),
    Setting("log_addresses", "yes", _flag, "server", "client addresses in the log (no: '-' instead)"),
    Setting("threads", "8", _count, "restart", "threads of the built-in server for requests that may wait"),
    Setting("workers", "1", str.strip, "restart", "no longer used: one process serves (start-up says so if it is set)"),
    Setting("max_connections", "512", _count, "server", "open connections at most; the longest idle makes room"),
    Setting("max_connections_per_address", "64", _count, "server", "open connections from one address at most (503)"),
    Setting("idle_timeout", "5", _seconds, "server", "seconds a kept-alive connection may sit idle"),
    Setting("request_timeout", "10", _seconds, "server",
            "seconds a client has to send a whole request, and to read a whole answer"),
    # HTTP framing limits of the built-in server, as gunicorn's defaults (and 64 KiB for a whole head, which a
    # hundred full-size headers would exceed): no event collector's client nears them; they bound what one can pin.
    Setting("max_request_line", "4094", _count, "server", "bytes in the request line (414)"),
    Setting("max_header_fields", "100", _count, "server", "header fields in one request (431)"),
    Setting("max_header_field", "8190", _count, "server", "bytes in one header field (431)"),
    Setting("max_head_bytes", "65536", _count, "server", "bytes in a whole request head (431)"),
    Setting("max_body_bytes", "1048576", _count, "server", "bytes in one request body (413)"),
    Setting("max_buffered_bytes", "33554432", _count, "server",
            "bytes of request bodies held at once, and of values waiting for the database (503)"),
    Setting("max_batch_events", "1000", _count, "server", "events in one batch (422)"),
    Setting("max_string_length", "255", _count, "server", "characters in each string field of an event (422)"),
    Setting("max_value_bytes", "65536", _count, "server", "bytes of one event's value as compact JSON (422)"),
    Setting("max_value_depth", "32", _count, "server", "nesting of objects and arrays in one event's value (422)"),
    Setting("max_pending_events", "100000", _count, "server", "events waiting for the database at most (then 503)"),
    Setting("busy_timeout", "30", _seconds, "restart",
            "seconds an event waits for its commit at most (a lock, a slow disk), then 503"),
    Setting("rate_limit", "off", _rate, "server", "requests to the event endpoints per client address, like 60/minute"),
    Setting("trusted_proxies", "127.0.0.1, ::1", _proxies, "server", "the proxies whose X-Forwarded-For is believed"),
    Setting("certfile", "", str.strip, "server", "the PEM certificate chain for HTTPS"),
    Setting("keyfile", "", str.strip, "server", "the PEM private key for HTTPS"),
    Setting("cors_origins", "*", _origins, "app", "the web pages (origins) that may post events"),
    Setting("retention_days", "0", _days, "server", "delete the days older than this many days (0 keeps every event)"),
    Setting("read_keys", "", _keys, "server", "the keys that open the dashboard and the report API"),
    Setting("admin_keys", "", _keys, "server", "the keys that erase and export one player's events"),
    Setting("hash_user_ids", "no", _flag, "app", "store user_id and session_id as keyed hashes (needs id_secret)"),
    Setting("id_secret", "", _secret, "server", "the secret of hash_user_ids; changing it splits every player in two"),
    Setting("report_timeout", "10", _seconds, "server", "seconds a report may read the database (then 503)"),
    Setting("report_threads", "2", _count, "restart", "reports read at once; more wait, up to 8 each (then 503)"),
    Setting("purchase_event", "purchase", str.strip, "app", "the event_type of a purchase"),
    Setting("price_field", "price", _field_name, "app", "the key of a purchase's price in its value"),
    Setting("currency_field", "currency", _field_name, "app", "the key of a purchase's currency in its value"),
    Setting("item_field", "item", _field_name, "app", "the key of what was bought in a purchase's value"),
    Setting("level_start_event", "level_start", str.strip, "app", "the event_type of a level started"),
    Setting("level_complete_event", "level_complete", str.strip, "app", "the event_type of a level completed"),
    Setting("level_fail_event", "level_fail", str.strip, "app", "the event_type of a level failed"),
    Setting("level_field", "level", _field_name, "app", "the key of the level in those events' value"),
)
SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}
APP_SETTINGS = tuple(setting.name for setting in SETTINGS if setting.scope == "app")
CONVENTIONS = APP_SETTINGS[APP_SETTINGS.index("purchase_event"):]  # what the game-analytics views read

# Settings whose values are keys: a message about them shows a glimpse of one key, not the value.
SECRET_SETTINGS = ("api_keys", "read_keys", "admin_keys", "id_secret")


def _parse(name, text, where):
    try:
        return SETTINGS_BY_NAME[name].parse(text)
    except ValueError as error:
        shown = "" if name in SECRET_SETTINGS else f" = {text!r}"
        raise ConfigError(f"{where}{name}{shown} is not valid: {error}") from None


class Config:
    """The settings in force, parsed and checked from `raw` (each ini key: its text, where it came from), as
    attributes named after the keys; `apps` holds each [app:NAME] section's own, which for_app() reads first."""

    def __init__(self, raw, apps=None):
        self.sources = {}
        self.apps = {}
        places = {}  # where each key is configured, to refuse a key given two roles
        for application, settings in (apps or {}).items():
            self.apps[application] = {name: _parse(name, text, f"{source}: [app:{application}] ")
                                      for name, (text, source) in settings.items()}
            for key in self.apps[application].get("api_keys", ()):
                _one_place(places, key, f"[app:{application}] api_keys ({settings['api_keys'][1]})")
        for setting in SETTINGS:
            text, source = raw[setting.name]
            setattr(self, setting.name, _parse(setting.name, text, f"{source}: "))
            self.sources[setting.name] = source
        for name in SECRET_SETTINGS[:3]:
            for key in getattr(self, name):
                _one_place(places, key, f"{name} ({self.sources[name]})")
        if not self.database:
            raise ConfigError(f"{self.sources['database']}: database must name a file")
        if bool(self.certfile) != bool(self.keyfile):
            raise ConfigError("HTTPS needs both certfile and keyfile (or neither, for plain HTTP)")
        if not self.id_secret and any(self.for_app(name, "hash_user_ids") for name in [None, *self.apps]):
            raise ConfigError("hash_user_ids needs id_secret, a secret of at least 16 characters "
                              "(python3 pycolytics.py keygen makes one); keep it: a new one makes new ids")
        if self.id_secret and len(self.id_secret) < 16:
            raise ConfigError(f"{self.sources['id_secret']}: id_secret must be at least 16 characters long")

    def for_app(self, application, name):
        """The setting `name` for events of `application`: its [app:NAME] section's, else the global one."""
        return self.apps.get(application, {}).get(name, getattr(self, name))

    @property
    def dev_key_active(self):
        return not self.api_keys and not any(app.get("api_keys") for app in self.apps.values())


def _one_place(places, key, place):
    """Record where `key` is configured; a key in two places (a write key that also opens the
    dashboard, or that two games share) would quietly grant more than either place says."""
    first = places.setdefault(key, place)
    if first != place:
        raise ConfigError(f"the key {_glimpse(key)} is in {first} and in {place}: each key belongs in one place, "
                          "either api_keys (any game), one [app:NAME] (that game), read_keys (the dashboard) "
                          "or admin_keys (erasure)")


def _read_ini(path, raw, apps):
    # A comment may follow a value after a space (`key = value  ; why`), as in the README.
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    try:
        with open(path, encoding="utf-8") as file:
            parser.read_file(file)
    except (OSError, UnicodeDecodeError, configparser.Error) as error:
        raise ConfigError(f"cannot read the configuration file {path}: {error}") from None
    for section in parser.sections():
        application = section[4:].strip() if section.startswith("app:") else ""
        if not application and section != "pycolytics":
            raise ConfigError(f"{path}: unknown section [{section}]; settings go in [pycolytics] and [app:NAME]")
        into, known = raw, SETTINGS_BY_NAME
        if application:
            into = apps[application] = {}
            known = APP_SETTINGS
        for name, value in parser.items(section):
            if name not in known:
                raise ConfigError(f"{path}: unknown key {name!r} in [{section}]; known keys: {', '.join(known)}")
            into[name] = (value, path)


def _read_dotenv(path):
    """The variables of an original Pycolytics `.env` file (NAME=value lines, values maybe quoted)."""
    variables = {}
    with open(path, encoding="utf-8") as file:
        for line in file:
            name, sep, value = line.strip().partition("=")
            if sep and not name.startswith("#"):
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                    value = value[1:-1]
                variables[name.strip()] = value
    return variables


# The original's variables that name a setting; SQLITE_FILE_PATH (which replaced SQLITE_FILE_NAME) wins.
_ORIGINAL_VARIABLES = {"SQLITE_FILE_NAME": "database", "SQLITE_FILE_PATH": "database", "RATE_LIMIT": "rate_limit"}


def _original_variables(environ, dotenv_path):
    """Settings from the original Pycolytics' variables: its `.env` file, then the environment."""
    variables = {}
    if dotenv_path and os.path.isfile(dotenv_path):
        try:
            variables = {name: (value, dotenv_path) for name, value in _read_dotenv(dotenv_path).items()}
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read {dotenv_path}: {error}") from None
    for name in [*_ORIGINAL_VARIABLES, "API_KEYS"]:
        if name in environ:
            variables[name] = (environ[name], f"environment variable {name}")
    settings = {setting: variables[name] for name, setting in _ORIGINAL_VARIABLES.items() if name in variables}
    if "API_KEYS" in variables:
        text, source = variables["API_KEYS"]
        try:
            keys = json.loads(text)
        except ValueError:
            keys = None
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            raise ConfigError(f'{source}: API_KEYS must be a JSON list of strings, like ["key-one", "key-two"]')
        settings["api_keys"] = ("\n".join(keys), source)
    return settings


def load_config(path=None, environ=None, overrides=None, dotenv=".env"):
    """Settings from, weakest first: defaults, the ini file, the environment, `overrides`. The ini file is `path`,
    else $PYCOLYTICS_CONFIG, else ./pycolytics.ini when it exists. The environment is PYCOLYTICS_<KEY> for any key,
    and the original Pycolytics' variables (SQLITE_FILE_PATH, SQLITE_FILE_NAME, API_KEYS, also from its `.env`)."""
    environ = os.environ if environ is None else environ
    raw = {setting.name: (setting.default, "default") for setting in SETTINGS}
    apps = {}
    path = path or environ.get("PYCOLYTICS_CONFIG") or ("pycolytics.ini" if os.path.isfile("pycolytics.ini") else None)
    if path:
        _read_ini(path, raw, apps)
    raw.update(_original_variables(environ, dotenv))
    for variable, value in environ.items():
        if variable.startswith("PYCOLYTICS_") and variable != "PYCOLYTICS_CONFIG":
            name = variable[len("PYCOLYTICS_"):].lower()
            if name not in SETTINGS_BY_NAME:
                raise ConfigError(f"unknown environment variable {variable}; known keys: {', '.join(SETTINGS_BY_NAME)}")
            raw[name] = (value, f"environment variable {variable}")
    for name, value in (overrides or {}).items():
        if value is not None:
            raw[name] = (str(value), f"--{name.replace('_', '-')}")
    return Config(raw, apps)


def restart_only_changes(config, in_force):
    """Warnings for what `config` changes that only a restart puts in force; `config` keeps the
    values in force instead, so it says what the server does and the next reload compares with that."""
    kept = [setting.name for setting in SETTINGS
            if setting.scope == "restart" and getattr(config, setting.name) != getattr(in_force, setting.name)]
    warnings = [f"{name} changed to {getattr(config, name)!r}; that takes a restart, "
                f"the server keeps {getattr(in_force, name)!r}" for name in kept]
    if bool(config.certfile) != bool(in_force.certfile):
        now, then = ("HTTPS", "plain HTTP") if in_force.certfile else ("plain HTTP", "HTTPS")
        warnings.append(f"certfile and keyfile switch to {then}; that takes a restart, the server keeps serving {now}")
        kept += ["certfile", "keyfile"]
    for name in kept:
        setattr(config, name, getattr(in_force, name))
        config.sources[name] = in_force.sources[name]
    return warnings


###############################################################################
# The built-in HTTP/1.1 server
###############################################################################

# How long a refused connection is drained before it is closed; see Server._refuse.
LINGER_SECONDS = 2

# How many bytes one recv() asks for; larger buffers would cost an mmap() per call.
RECV_BYTES = 64 * 1024

# Blank lines skipped before a request line (RFC 9112, 2.2, asks for one at least); more hold a slot for nothing.
MAX_BLANK_LINES = 8

# Pipelined requests a connection may start per turn of the loop: one that pipelines a thousand waits its turn.
PIPELINE_ROUNDS = 16

# How long accepting stops when out of file descriptors, for some to be closed; the kernel's backlog holds newcomers.
ACCEPT_PAUSE_SECONDS = 1.0

# How long a connection that has sent nothing or part of a request, or not read its answer, is safe from eviction when
# all slots are taken: a request arrives within a round trip or two, and newcomers must not evict each other unserved.
GRACE_SECONDS = 2.0

# What the log may hold while stderr cannot take it (a full pipe); more lines are dropped and counted, never waited for.
LOG_BUFFER_BYTES = 1 << 20

# Bytes refused in a request head once its CRLFs are blanked out: control characters but tab, so a bare CR or LF too.
# RFC 9112 (2.2) allows a bare LF as a line end, but proxies that read it otherwise are how requests get smuggled.
_FORBIDDEN_IN_HEAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# A method or a header name: RFC 9110's token (section 5.6.2).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")

# Client text in a log line: control characters become \xNN, so a request cannot forge lines or send escape sequences.
_PRINTABLE = {code: f"\\x{code:02x}" for code in (*range(32), *range(127, 160))}


def _printable(text):
    return text.translate(_PRINTABLE)


class _Request:
    __slots__ = ("method", "path", "query", "version", "headers", "length", "body", "keep_alive", "line")


class _Connection:
    """One client connection, owned by the server's event loop."""

    __slots__ = ("sock", "peer", "buffer", "scanned", "blank_lines", "deadline", "request", "body_start",
                 "reserved", "continued", "busy", "keep_alive", "outbox", "writing", "lingering", "handshaking",
                 "closed", "limited", "since", "watched")

    def __init__(self, sock, peer, deadline, limited):
        self.sock, self.peer = sock, peer
        self.buffer = bytearray()
        self.scanned = 0  # how much of the buffer is known to hold no end of head: heads are searched once
        self.blank_lines = self.body_start = 0
        self.deadline = deadline  # when the loop gives up on it; None while its request is answered
        self.request = None  # a request whose head has arrived and whose body has not, yet
        self.reserved = 0  # body bytes counted against max_buffered_bytes
        self.busy = False  # a whole request is being answered
        self.continued = self.writing = self.lingering = self.handshaking = self.closed = False
        self.keep_alive = True
        self.outbox = b""
        self.limited = limited  # counted against max_connections_per_address
        self.since = time.monotonic()  # when it connected, or began its request
        self.watched = False  # registered with the loop's selector


def _origin(connection):
    """The Origin header of the request the connection is reading, if its head has arrived."""
    return connection.request.headers.get("origin") if connection.request is not None else None


def _cgi_name(name):
    """The environ key of a header (PEP 3333), or "" for a name with "_" (it would pass for its twin with "-")."""
    if name in ("content-length", "content-type"):
        return name.upper().replace("-", "_")
    return "" if "_" in name else "HTTP_" + name.upper().replace("-", "_")


def _split_target(target, method):
    """(path, query) of a request target: a path, an absolute URL (RFC 9112 3.2.2) or OPTIONS' *."""
    if target[0] != "/":
        if target == "*" and method == "OPTIONS":
            return "*", ""
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            raise HTTPError(400, "the request target must be a path, an http(s) URL, or * for OPTIONS")
        ends = [found for found in (rest.find("/"), rest.find("?")) if found >= 0]
        target = rest[min(ends):] if ends else "/"
        if target[0] != "/":
            target = "/" + target
    path, _, query = target.partition("?")
    return path, query


def _parse_head(head, limits):
    """A _Request from the bytes before the blank line; raises HTTPError on bad framing."""
    bad = _FORBIDDEN_IN_HEAD.search(head.replace(b"\r\n", b"  "))
    if bad:
        raise HTTPError(400, f"the request head holds the byte {bad.group()[:1]!r} at offset {bad.start()}: "
                         "lines end with CRLF and hold no control characters")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1] or not parts[2].startswith("HTTP/"):
        raise HTTPError(400, "malformed request line")
    request = _Request()
    request.method, target, request.version = parts
    request.line = lines[0]
    if request.version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are served")
    request.path, request.query = _split_target(target, request.method)
    request.headers = headers = _parse_header_lines(lines[1:], limits)
    if request.version == "HTTP/1.1" and "host" not in headers:
        raise HTTPError(400, "an HTTP/1.1 request needs a Host header")
    if "transfer-encoding" in headers:
        if "content-length" in headers:
            raise HTTPError(400, "both Transfer-Encoding and Content-Length: send one")
        raise HTTPError(411, "send the body with a Content-Length; Transfer-Encoding is not accepted")
    length = headers.get("content-length", "0")
    if not (length.isdigit() and length.isascii()) or len(length) > 18:
        raise HTTPError(400, "Content-Length must be a whole number of bytes")
    request.length = int(length)
    tokens = headers.get("connection", "").lower()
    request.keep_alive = "close" not in tokens if request.version == "HTTP/1.1" else "keep-alive" in tokens
    return request


def _parse_header_lines(lines, limits):
    """{lowercased name: value} of a head's header lines; repeated fields joined with ", "."""
    if len(lines) > limits.max_header_fields:
        raise HTTPError(431, f"at most {limits.max_header_fields} header fields are accepted")
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not (sep and (name.isascii() and name.replace("-", "").isalnum() or _TOKEN.match(name))):
            raise HTTPError(400, f"malformed header line {_printable(line[:40])!r}")
        if len(line) > limits.max_header_field:
            raise HTTPError(431, f"the header {name} is over {limits.max_header_field} bytes")
        name, value = name.lower(), value.strip(" \t")
        if name in headers:
            if name == "host":
                raise HTTPError(400, "more than one Host header")
            if name == "content-length" and value != headers[name]:
                raise HTTPError(400, "conflicting Content-Length headers")
            value = value if name == "content-length" else headers[name] + ", " + value
        headers[name] = value
    return headers


def listening_socket(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=1024)


# What the built-in server needs to know of the configuration, and nothing more.
ServerLimits = collections.namedtuple("ServerLimits", (
    "threads", "max_connections", "max_connections_per_address", "idle_timeout", "request_timeout",
    "max_request_line", "max_header_fields", "max_header_field", "max_head_bytes", "max_body_bytes",
    "max_buffered_bytes", "drain_seconds", "log_requests", "log_addresses", "trusted_proxies"))


class Server:
    """An HTTP/1.1 server for a WSGI application, from the standard library only.

    One thread, the event loop (serve_forever's caller), owns every socket and writes every answer; it reads without
    blocking until a request is whole, so slow and idle clients cost a buffer, never a thread. A request runs the
    application in one of `threads` threads, unless the application takes it in the loop through `app.loop_hooks`
    (LoopHooks): take(environ, respond) returns False (a thread runs it then) or takes the request and calls
    respond(status, headers, body) once, from any thread, never blocking the loop; turn_ended() after each turn of
    the loop; server_answered(status, origin) hears of each answer the server gives by itself and returns headers to
    add (CORS); server_trouble(problem) hears what keeps it from serving, or None once it serves again.

    Everything a client can make it hold is bounded (connections, bodies, heads, times, the work of one turn for one
    connection); nothing a client sends is handled by recursion; an error serving one connection closes only it.
    """

    def __init__(self, app, limits, listener, tls=None, reload=None):
        """`listener`: a bound, listening socket; `tls`: an SSLContext; `reload`: called after request_reload()."""
        self.app, self.limits, self.reload = app, limits, reload
        self.hooks = getattr(app, "loop_hooks", None)
        self._tls = tls
        self._tls_pending = ()  # the TLS errors that mean "not yet" on a non-blocking socket
        if tls is not None:
            import ssl  # loaded already by whoever made `tls`; plain HTTP never needs it

            self._tls_pending = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
        self.listener = listener
        self.listener.setblocking(False)
        self.server_address = self.listener.getsockname()[:2]
        self._problem = None  # what keeps the server from serving as it should now
        self.log = sys.stderr
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._answers_announced = False  # a wake-up for answers from other threads is pending
        self._loop_thread = None
        self._jobs = queue.SimpleQueue()
        self._finished = collections.deque()  # answers to send: (connection, request, status, headers, body)
        self._ready = collections.deque()  # connections whose buffer may hold their next request
        self._idle = collections.OrderedDict()  # served connections waiting for the next request, or lingering
        self._fresh = collections.OrderedDict()  # connections that have sent nothing yet, oldest first
        self._reading = collections.OrderedDict()  # connections part of whose request has come, oldest first
        self._stalled = collections.OrderedDict()  # connections with answers they are slow to read, oldest first
        self._connections = {}
        self._per_address = collections.Counter()  # open connections by client address
        self._reserved = 0  # body bytes announced by requests being read or answered
        self._busy = 0  # requests being answered
        self._accept_again = 0.0  # when to accept again after running out of file descriptors
        self._reload_requested = self._stopping = self._listening = False
        self._workers, self._failures_logged = [], set()

    @property
    def url(self):
        host, port = self.server_address
        return f"{'https' if self._tls else 'http'}://{'[' + host + ']' if ':' in host else host}:{port}"

    def reconfigure(self, limits, tls):
        """New limits for what comes next, and the certificate (HTTPS stays on or off until a restart)."""
        self.limits = limits
        if (tls is None) == (self._tls is None):
            self._tls = tls

    def request_reload(self, *_signal_args):
        """Ask the loop to call `reload` soon. Any thread, or a signal handler."""
        self._reload_requested = True
        self._wake()

    def shutdown(self, *_signal_args):
        """Stop accepting; serve_forever answers what it has read, then returns. Any thread."""
        self._stopping = True
        self._wake()

    def _wake(self):
        try:
            self._wake_writer.send(b"\0")
        except OSError:
            pass  # a wake-up is already pending, or the server is closed

    def serve_forever(self):
        self._loop_thread = threading.get_ident()
        self._workers = [threading.Thread(target=self._work, name=f"pycolytics-{n}", daemon=True)
                         for n in range(self.limits.threads)]
        for worker in self._workers:
            worker.start()
        self._selector.register(self._wake_reader, selectors.EVENT_READ, (self._take_wake_ups, None))
        self._listen(True)
        next_sweep = time.monotonic() + 1
        drain_by = None
        try:
            while True:
                timeout = 0 if self._ready or self._finished else 1.0
                for key, _ in self._selector.select(timeout):
                    self._guarded(*key.data)
                self._serve_ready()
                if self.hooks is not None:
                    self._guarded(self.hooks.turn_ended)
                if self._reload_requested and self.reload is not None:
                    self._reload_requested = False
                    self._guarded(self.reload)
                now = time.monotonic()
                if self._stopping:
                    if drain_by is None:
                        drain_by = now + self.limits.drain_seconds
                        self._stop_reading()
                    if not self._busy or now > drain_by:
                        return
                if now >= next_sweep:
                    self._guarded(self._sweep, None, now)
                    next_sweep = now + 1
        finally:
            self._close_everything()

    def _guarded(self, function, connection=None, *arguments):
        """Call function(connection, *arguments); an error closes that connection, never the loop."""
        try:
            function(*arguments) if connection is None else function(connection, *arguments)
        except Exception as error:  # a bug, or an OS error nobody foresaw: one connection pays, not all
            self._connection_failed(connection, error)

    def _connection_failed(self, connection, error):
        """Log an unexpected error once (its traceback the first time), and close its connection."""
        where = (type(error), getattr(error.__traceback__, "tb_lineno", 0))
        first = where not in self._failures_logged and len(self._failures_logged) < 100
        self._failures_logged.add(where)
        log.error("unexpected %r while serving %s; closing the connection", error,
                  connection.peer if connection is not None else "the server", exc_info=first)
        if connection is not None:
            try:
                self._close(connection)
            except Exception:  # its socket is beyond saving; forget it
                self._connections.pop(connection.sock, None)

    def _serve_ready(self):
        """Send finished answers and start pipelined requests: each connection a few per turn."""
        for _ in range(PIPELINE_ROUNDS):
            while self._finished:
                self._guarded(self._answer, *self._finished.popleft())
            if not self._ready:
                return
            for _ in range(len(self._ready)):
                self._guarded(self._advance, self._ready.popleft())

    def _take_wake_ups(self):
        try:
            while len(self._wake_reader.recv(4096)) == 4096:  # a shorter read took them all
                pass
        except (BlockingIOError, InterruptedError):
            pass
        # Only now, before _serve_ready takes the answers: one queued from now on wakes the loop again.
        self._answers_announced = False

    def _listen(self, on):
        on = on and not self._stopping and time.monotonic() >= self._accept_again
        if on and not self._listening:
            self._selector.register(self.listener, selectors.EVENT_READ, (self._accept, None))
        elif not on and self._listening:
            self._selector.unregister(self.listener)
        self._listening = on

    def _accept(self):
        for _ in range(64):  # a few per turn: a flood of newcomers must not starve the rest
            if len(self._connections) >= self.limits.max_connections and not self._make_room():
                self._listen(False)  # full: the kernel's backlog holds newcomers until a connection closes
                return
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(error)
                    return
                continue  # a connection reset while it waited in the backlog
            self._welcome(sock, peer[0])

    def _welcome(self, sock, address):
        """Take a new connection into the loop, or turn it away if its address holds too many."""
        limited = address not in self.limits.trusted_proxies  # a proxy speaks for many clients
        if limited and self._per_address[address] >= self.limits.max_connections_per_address:
            self._turn_away(sock)
            return
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError:  # reset already (some Pythons read from the socket in wrap_socket)
            sock.close()
            return
        if limited:
            self._per_address[address] += 1
        connection = _Connection(sock, address, time.monotonic() + self.limits.request_timeout, limited)
        connection.handshaking = self._tls is not None
        self._connections[sock] = self._fresh[sock] = connection
        self._watch(connection, selectors.EVENT_READ, self._read)

    def _turn_away(self, sock):
        """Close a connection at once, with a 503 if it speaks plain HTTP: nothing of it is kept,
        not even its head (so only a page allowed from any origin may read why)."""
        refusal = self._refusal(busy(
            f"too many connections from your address at once (max_connections_per_address = "
            f"{self.limits.max_connections_per_address}); close one, or connect again shortly", 5))
        if self._tls is None:
            self._send_now(sock, refusal)
        sock.close()

    def _make_room(self):
        """Close the connection idle (or lingering) longest, else the oldest that has sent nothing or part of a
        request (a 408 for that one), or not read its answers, for GRACE_SECONDS; False if none may go."""
        if self._idle:
            self._close(self._idle.popitem(last=False)[1])
            return True
        expired = time.monotonic() - GRACE_SECONDS
        for waiting in (self._fresh, self._reading, self._stalled):
            if waiting and next(iter(waiting.values())).since < expired:
                connection = waiting.popitem(last=False)[1]
                if waiting is not self._stalled and (connection.buffer or connection.request is not None):
                    self._send_now(connection.sock, self._refusal(HTTPError(
                        408, "the server is full and this request was too slow to arrive"), _origin(connection)))
                self._close(connection)
                return True
        return False

    def _trouble(self, problem):
        self._problem = problem
        if self.hooks is not None:
            self.hooks.server_trouble(problem)

    def _pause_accepting(self, error):
        if self._problem is None:
            log.warning("cannot accept connections: %s; trying again in %s s", error.strerror, ACCEPT_PAUSE_SECONDS)
            self._trouble(f"out of file descriptors ({error.strerror}): new connections wait")
        self._accept_again = time.monotonic() + ACCEPT_PAUSE_SECONDS
        self._listen(False)
        self._make_room()  # one idle connection's descriptor lets the next request in

    def _watch(self, connection, events, callback):
        if connection.watched:
            self._selector.modify(connection.sock, events, (callback, connection))  # no system call if the same
        else:
            self._selector.register(connection.sock, events, (callback, connection))
            connection.watched = True

    def _read(self, connection):
        sock = connection.sock
        if connection.busy:  # more came while a request is answered: it waits in the kernel till then
            self._selector.unregister(sock)
            connection.watched = False
            return
        try:
            if connection.handshaking:
                sock.do_handshake()
                connection.handshaking = False
            data = sock.recv(RECV_BYTES)
            while self._tls and data and sock.pending():  # decrypted bytes that select() cannot see
                data += sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError) + self._tls_pending:  # or half a TLS record, or a handshake
            return
        except OSError:  # also a failed handshake or a broken TLS record (ssl.SSLError)
            data = b""
        if not data:
            self._close(connection)
        elif not connection.lingering:
            if self._idle.pop(sock, None) or self._fresh.pop(sock, None):  # a request begins
                self._begin_request(connection)
            connection.buffer += data
            self._advance(connection)

    def _advance(self, connection):
        """Start answering the connection's next request if it is whole; refuse bad framing at once."""
        if connection.closed or connection.busy:
            return
        try:
            request = self._whole_request(connection)
        except HTTPError as error:
            self._refuse(connection, error)
            return
        if request is None:
            return
        self._reading.pop(connection.sock, None)
        connection.busy = True  # nothing more is read until this is answered (see _read)
        connection.deadline = None
        self._busy += 1
        if request.path == "*":  # OPTIONS *: a question about the server, which answers it
            if self.hooks is not None:
                self.hooks.server_answered("200 OK", None)
            self._respond(connection, request, "200 OK", [("Allow", "GET, HEAD, POST, OPTIONS")], b"")
            return
        environ = self._environ(connection, request)
        respond = functools.partial(self._respond, connection, request)
        if self.hooks is None or not self.hooks.take(environ, respond):
            self._jobs.put((connection, request, environ))

    def _whole_request(self, connection):
        """The connection's next request if all of it has arrived, else None; raises HTTPError."""
        buffer, limits = connection.buffer, self.limits
        if connection.request is None:
            while buffer[:2] == b"\r\n":
                del buffer[:2]
                connection.blank_lines += 1
                if connection.blank_lines > MAX_BLANK_LINES:
                    raise HTTPError(400, "too many blank lines before the request line")
            end = buffer.find(b"\r\n\r\n", max(connection.scanned - 3, 0))
            line_end = buffer.find(b"\r\n", 0, limits.max_request_line + 2)
            if line_end < 0 and len(buffer) > limits.max_request_line:
                raise HTTPError(414, f"the request line is over {limits.max_request_line} bytes")
            if (end if end >= 0 else len(buffer)) > limits.max_head_bytes:
                raise HTTPError(431, f"the request head is over {limits.max_head_bytes} bytes")
            if end < 0:
                connection.scanned = len(buffer)
                return None
            connection.request = request = _parse_head(bytes(buffer[:end]), limits)
            self._reserve(connection, request.length)  # a refusal may read the request's Origin
            connection.body_start = end + 4
        request = connection.request
        end = connection.body_start + request.length
        if len(buffer) < end:
            if not connection.continued and request.version == "HTTP/1.1" and \
                    request.headers.get("expect", "").lower() == "100-continue":
                connection.continued = True
                self._send_now(connection.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
            return None
        request.body = bytes(buffer[connection.body_start:end])
        del buffer[:end]
        connection.request = None
        connection.continued = False
        connection.scanned = connection.blank_lines = 0
        return request

    def _begin_request(self, connection):
        """The first bytes of a request have come: from now it has request_timeout to arrive whole."""
        connection.since = time.monotonic()
        connection.deadline = connection.since + self.limits.request_timeout
        self._reading[connection.sock] = connection

    def _reserve(self, connection, length):
        """Count a body against the limits before it is read: one body, and all bodies together. A body that one
        recv() takes whole costs no more than a head (max_connections bounds those), so small batches still pass."""
        if length > self.limits.max_body_bytes:
            raise HTTPError(413, f"the request body is {length} bytes; at most {self.limits.max_body_bytes} "
                                 "are accepted")
        if length > RECV_BYTES and self._reserved + length > self.limits.max_buffered_bytes:
            raise busy("the server is receiving too many request bodies at once; send this again shortly")
        self._reserved += length
        connection.reserved = length

    def _release(self, connection):
        """Forget what the connection's request held: a place among the busy, its body's bytes."""
        if connection.busy:
            connection.busy = False
            self._busy -= 1
        self._reserved -= connection.reserved
        connection.reserved = 0

    def _respond(self, connection, request, status, headers, body):
        """The answer to a request, from any thread: the loop sends it."""
        self._finished.append((connection, request, status, headers, body))
        if not self._answers_announced and threading.get_ident() != self._loop_thread:
            self._answers_announced = True  # one wake-up for a commit's many answers
            self._wake()

    def _answer(self, connection, request, status, headers, body):
        if connection.closed or not connection.busy:
            return  # closed while it was answered (the client left, or the drain gave up on it)
        connection.keep_alive = keep_alive = request.keep_alive and not self._stopping
        head = [f"HTTP/1.1 {status}", f"Date: {format_date_time(time.time())}", f"Server: pycolytics/{__version__}"]
        head += [f"{name}: {value}" for name, value in headers]
        sized = any(name.lower() == "content-length" for name, _ in headers)
        if not sized and status[0] != "1" and status[:3] not in ("204", "304"):
            head.append(f"Content-Length: {len(body)}")
        head.append("Connection: keep-alive" if keep_alive else "Connection: close")
        if self.limits.log_requests:
            self._log(connection, request, status, len(body))
        head = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        connection.outbox = head if request.method == "HEAD" else head + body
        self._flush(connection)

    def _flush(self, connection):
        """Send what the connection's answer still has to send; then wait for its next request. A slow reader has
        request_timeout from the first answer it did not take at once to read all: pipelining more buys no time."""
        try:
            sent = connection.sock.send(connection.outbox)
        except (BlockingIOError, InterruptedError) + self._tls_pending:
            sent = 0
        except OSError:
            self._close(connection)
            return
        connection.outbox = connection.outbox[sent:]
        if connection.outbox:
            if not connection.writing:  # the client reads slowly: wait until it can take more
                connection.writing = True
                if connection.sock not in self._stalled:
                    connection.since = time.monotonic()
                    self._stalled[connection.sock] = connection
                connection.deadline = connection.since + self.limits.request_timeout
                self._watch(connection, selectors.EVENT_WRITE, self._flush)
            return
        connection.writing = False
        self._release(connection)
        if not connection.keep_alive:
            self._close(connection)
            return
        self._watch(connection, selectors.EVENT_READ, self._read)
        if connection.buffer:  # a pipelined request arrived with this one: its turn comes in the loop
            if connection.sock not in self._stalled:
                self._begin_request(connection)
            self._ready.append(connection)
        else:
            self._stalled.pop(connection.sock, None)
            connection.deadline = time.monotonic() + self.limits.idle_timeout
            self._idle[connection.sock] = connection

    def _send_now(self, sock, data):
        try:
            sock.send(data)
        except OSError:
            pass  # the client is gone or not reading; the loop notices soon enough

    def _refuse(self, connection, error):
        """Answer a request that will not be read, then close without resetting the answer away: closing a socket
        with unread input sends a reset, which can destroy the answer before the client reads it; so shut down our
        side and discard what still comes for a moment (a "lingering close", as Apache and nginx do)."""
        try:
            connection.sock.send(self._refusal(error, _origin(connection)))
            connection.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(connection)
            return
        self._release(connection)
        self._reading.pop(connection.sock, None)
        self._stalled.pop(connection.sock, None)
        connection.lingering = True
        connection.buffer = bytearray()
        connection.request = None
        connection.deadline = time.monotonic() + LINGER_SECONDS
        self._idle[connection.sock] = connection  # the first to go when slots run out

    def _refusal(self, error, origin=None):
        """The answer to a request the server refuses by itself, readable by the page of `origin` if it may post."""
        status, headers, body = error_answer(error)
        if self.hooks is not None:
            headers = headers + self.hooks.server_answered(status, origin)
        head = [f"HTTP/1.1 {status}", f"Date: {format_date_time(time.time())}"]
        head += [f"{name}: {value}" for name, value in headers]
        return ("\r\n".join(head + ["Connection: close"]) + "\r\n\r\n").encode("latin-1") + body

    def _sweep(self, now):
        """Close connections that idled, dawdled or lingered past their deadline; accept again."""
        for connection in list(self._connections.values()):
            if connection.deadline is not None and connection.deadline < now:
                arriving = connection.buffer or connection.request is not None
                if arriving and not (connection.lingering or connection.writing):
                    self._refuse(connection, HTTPError(408, "the request took too long to arrive"))
                else:
                    self._close(connection)
        if not self._listening:
            self._listen(True)  # when full, the next accept sees whether a newcomer's grace is over
        if self._problem is not None and now > self._accept_again + 5 * ACCEPT_PAUSE_SECONDS:
            log.info("accepting connections again")
            self._trouble(None)

    def _close(self, connection):
        if self._connections.pop(connection.sock, None) is None:
            return
        connection.closed = True
        for waiting in (self._idle, self._fresh, self._reading, self._stalled):
            waiting.pop(connection.sock, None)
        self._release(connection)
        if connection.limited:
            self._per_address[connection.peer] -= 1
            if not self._per_address[connection.peer]:
                del self._per_address[connection.peer]
        if connection.watched:
            self._selector.unregister(connection.sock)
        connection.sock.close()
        self._listen(True)

    def _stop_reading(self):
        """The start of a stop: no new connections, and none that has not sent a whole request."""
        self._listen(False)
        for connection in list(self._connections.values()):
            if not connection.busy:
                self._close(connection)

    def _close_everything(self):
        for _ in self._workers:
            self._jobs.put(None)
        give_up = time.monotonic() + 1  # the drain has waited already; a worker still busy is a daemon
        for worker in self._workers:
            worker.join(max(0.0, give_up - time.monotonic()))
        for connection in list(self._connections.values()):
            self._close(connection)
        for closable in (self.listener, self._selector, self._wake_reader, self._wake_writer):
            closable.close()

    def _work(self):
        """A worker thread's loop: requests the application does not take in the loop."""
        for connection, request, environ in iter(self._jobs.get, None):  # None: the server stops
            try:
                answer = self._call_application(environ, request.method)
            except Exception:
                log.exception("error while answering %s", _printable(request.line))
                answer = INTERNAL_ERROR
            self._respond(connection, request, *answer)

    def _call_application(self, environ, method):
        """Run the WSGI application (PEP 3333) for one request: (status, headers, body)."""
        answer, written = [], []

        def start_response(status, headers, exc_info=None):
            if exc_info is None and answer:  # with exc_info: nothing is sent before the return, the new answer wins
                raise AssertionError("start_response called a second time without exc_info")
            answer[:] = [status, headers]
            return written.append

        chunks = self.app(environ, start_response)
        try:
            written.extend(chunks)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        status, headers = answer
        headers = [(name, value) for name, value in headers if not is_hop_by_hop(name)]
        body = b"".join(written)
        if method != "HEAD" or not any(name.lower() == "content-length" for name, _ in headers):
            headers = [(name, value) for name, value in headers if name.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
        return status, headers, body

    def _environ(self, connection, request):
        path = request.path
        if "%" in path:
            from urllib.parse import unquote_to_bytes  # here: it costs memory that plain paths never need

            path = unquote_to_bytes(path).decode("latin-1")
        host, port = self.server_address
        environ = {
            "REQUEST_METHOD": request.method, "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": request.query,
            "SERVER_NAME": host, "SERVER_PORT": str(port), "SERVER_PROTOCOL": request.version,
            "REMOTE_ADDR": connection.peer, "wsgi.version": (1, 0), "wsgi.url_scheme": "https" if self._tls else "http",
            "wsgi.input": io.BytesIO(request.body), "wsgi.errors": self.log,
            "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        }
        for name, value in request.headers.items():
            key = _cgi_name(name)
            if key:
                environ[key] = value
        return environ

    def _log(self, connection, request, status, length):
        client = "-"
        if self.limits.log_addresses:
            forwarded = request.headers.get("x-forwarded-for")
            client = client_address(connection.peer, forwarded, self.limits.trusted_proxies)
        when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime())
        try:
            self.log.write(f'{_printable(client)} - - [{when}] "{_printable(request.line)}" {status[:3]} {length}\n')
        except (OSError, ValueError):
            pass  # stderr is broken; serve() logs through a LogSink, which never raises


###############################################################################
# The WSGI application
###############################################################################

JSON_TYPE = ("Content-Type", "application/json")
HTML_TYPE = ("Content-Type", "text/html; charset=utf-8")
NO_CONTENT = ("204 No Content", [], b"")

# How a route runs: in the server's loop (it never waits), in the application's ReadPool (it reads the
# database, within report_timeout), or in a thread of the server's (it may wait a little: /healthz).
IN_LOOP, READS, WAITS = "in the loop", "reads", "waits"


def _ok(body, content_type, *headers):
    """(status, headers, body) of a 200 answer."""
    return "200 OK", [content_type, ("Content-Length", str(len(body))), *headers], body


def read_body(environ, limit):
    """The request body, at most `limit` bytes; never reads more than limit + 1."""
    length = environ.get("CONTENT_LENGTH") or ""
    if not length:
        body = environ["wsgi.input"].read(limit + 1) if environ.get("wsgi.input_terminated") else b""
        if len(body) > limit:
            raise HTTPError(413, f"the request body is over {limit} bytes; at most {limit} are accepted")
        return body
    if not length.isdigit():
        raise HTTPError(400, "Content-Length must be a whole number of bytes")
    if int(length) > limit:
        raise HTTPError(413, f"the request body is {length} bytes; at most {limit} are accepted")
    body = environ["wsgi.input"].read(int(length))
    if len(body) < int(length):
        raise HTTPError(400, "the request body is shorter than its Content-Length")
    return body


def decompress(body, encoding, limit):
    """A gzip or deflate body decompressed, to at most `limit` bytes: a bomb is refused early. Every member of a
    gzip body is read; bytes after the end (of deflate, of the last member) are a 400: what is acknowledged is read."""
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise HTTPError(415, f"Content-Encoding {encoding} is not supported: send gzip, deflate or identity")
    import zlib  # here: most servers never see a compressed body
    # 47 reads a gzip or a zlib header; -15 is raw deflate, which some clients send as "deflate".
    for window in (47, -15) if encoding == "deflate" else (47,):
        data, rest = b"", body
        try:
            while True:
                decompressor = zlib.decompressobj(window)
                data += decompressor.decompress(rest, limit + 1 - len(data))
                if len(data) > limit or decompressor.unconsumed_tail:
                    raise HTTPError(413, f"the request body decompresses to over {limit} bytes; "
                                         f"at most {limit} are accepted")
                if not decompressor.eof:
                    raise HTTPError(400, f"the {encoding} body is cut short")
                rest = decompressor.unused_data
                if not rest or not encoding.endswith("gzip"):
                    break
        except zlib.error:
            if rest is not body:  # a member read whole, then bytes that are not one
                raise HTTPError(400, f"the {encoding} body holds bytes after its end") from None
            continue
        if rest:
            raise HTTPError(400, f"the {encoding} body holds {len(rest)} bytes after its end")
        return data
    raise HTTPError(400, f"the request body is not valid {encoding} data")


# What a Host (or X-Forwarded-Host) may be to be written into a page: a name or an address, and a port;
# else the server's own name is written. An X-Forwarded-Prefix: a path of RFC 3986's unreserved characters
# and percent-escapes, nothing that needs quoting in HTML or in the shell command the /docs page shows.
_HOST = re.compile(r"(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_PREFIX = re.compile(r"(?:/[A-Za-z0-9._~%-]*)*")
# Where the cached documentation names the application's own address, which each answer replaces with
# the one it was asked at (public_url). RFC 2606 reserves .invalid: no page says it.
_OWN_ADDRESS = "http://pycolytics.invalid"


def _last(header):
    """The last value of a comma-separated header: the one the nearest proxy, the trusted one, set."""
    return header.rpartition(",")[2].strip()


def public_url(environ, trusted_proxies):
    """The application's address as the player used it, without a trailing slash: as wsgiref's application_uri
    builds it, except that a trusted proxy's X-Forwarded-Proto and -Host win (nginx's request says neither)."""
    scheme = environ.get("wsgi.url_scheme", "http")
    host = environ.get("HTTP_HOST", "")
    if environ.get("REMOTE_ADDR") in trusted_proxies:  # the test client_address() makes of a peer
        proto = _last(environ.get("HTTP_X_FORWARDED_PROTO", "")).lower()
        scheme = proto if proto in ("http", "https") else scheme
        host = _last(environ.get("HTTP_X_FORWARDED_HOST", "")) or host
    if not _HOST.fullmatch(host):
        host, port = environ.get("SERVER_NAME", "localhost"), environ.get("SERVER_PORT", "")
        host = f"[{host}]" if ":" in host else host
        if port and port != {"http": "80", "https": "443"}[scheme]:
            host += ":" + port
    return f"{scheme}://{host}{public_path(environ, trusted_proxies)}"


def public_path(environ, trusted_proxies):
    """The path the application is at, as the player used it ("" at the root, else "/analytics"): SCRIPT_NAME
    after a trusted proxy's X-Forwarded-Prefix (the path nginx took off before passing the request on)."""
    prefix = ""
    if environ.get("REMOTE_ADDR") in trusted_proxies:
        prefix = _last(environ.get("HTTP_X_FORWARDED_PREFIX", ""))
        prefix = prefix.rstrip("/") if _PREFIX.fullmatch(prefix) else ""
    from urllib.parse import quote  # here: only the answers that name their own address need it
    return prefix + quote(environ.get("SCRIPT_NAME", "").rstrip("/"), encoding="latin-1")


class Pycolytics:
    """The WSGI application, `Pycolytics(config)(environ, start_response)`; the built-in server uses `loop_hooks`."""

    def __init__(self, config):
        self.store = store_for(config)
        self.metrics = Metrics()
        self.writer = Writer(config, self.store, self.metrics)
        self.reads = ReadPool(config.report_threads)
        self.loop_hooks = LoopHooks(self)
        self.server_problem = None  # the built-in server's own trouble, which /healthz tells
        self.reconfigure(config)

    def reconfigure(self, config):
        """Put new settings in force (keys, limits, documentation, the routes to them); the database stays."""
        keyring = Keyring(config)
        self.validator = Validator(config, keyring)
        self.rate_limiter = RateLimiter(config.rate_limit) if config.rate_limit else None
        self.reports = Reports(config, self.store, self.writer, keyring)
        self.players = Players(config, self.store, keyring)
        origins = [config.for_app(name, "cors_origins") for name in (None, *config.apps)]
        self._every_origin = [("Access-Control-Allow-Origin", "*")] if ANY_ORIGIN in origins else None
        self._origins = frozenset().union(*(found for found in origins if found is not ANY_ORIGIN))
        self._openapi = json.dumps(openapi_document(config, _OWN_ADDRESS), indent=2).encode()
        self._docs = docs_page(config, _OWN_ADDRESS).encode()
        preflight = (self.preflight, IN_LOOP)
        routes = {
            "/v1.0/event": {"POST": (functools.partial(self.post_events, batch=False), IN_LOOP), "OPTIONS": preflight},
            "/v1.0/events": {"POST": (self.post_events, IN_LOOP), "OPTIONS": preflight},
            "/v1.0/client.js": {"GET": (client_script, IN_LOOP)},
            "/docs": {"GET": (self.get_docs, IN_LOOP)},
            "/openapi.json": {"GET": (self.get_openapi, IN_LOOP)},
            "/metrics": {"GET": (self.get_metrics, IN_LOOP)},
            "/": {"GET": (self.get_index, IN_LOOP)},
            "/healthz": {"GET": (self.get_health, WAITS)},
            "/dashboard": {"GET": (self.reports.dashboard, READS)},
            "/v1.0/player/erase": {"POST": (self.players.answer, READS)},
            "/v1.0/player/export": {"POST": (self.players.answer, READS)},
            **{f"/v1.0/report{view}": {"GET": (self.reports.answer, READS)} for view in REPORT_VIEWS},
        }
        for methods in routes.values():
            if "GET" in methods:
                methods["HEAD"] = methods["GET"]
        self._routes = routes
        self.config = self.writer.config = config

    def open(self):
        """Open the database now instead of at the first event, so a bad path stops start-up."""
        self.writer.start()

    def close(self):
        self.writer.close()
        self.reads.close()

    def __call__(self, environ, start_response):
        """Plain WSGI: a posted request waits here until its events are committed."""
        answer = self.answer(environ)
        if isinstance(answer, list):  # rows to store
            try:
                self.writer.start()
                self.writer.write(answer)
                answer = NO_CONTENT
            except HTTPError as error:
                answer = error_answer(error)
        status, headers, body = self.finish(environ, answer)
        start_response(status, headers)
        return [body]

    def answer(self, environ, runs=None):
        """The answer to a request, (status, headers, body), or the rows it asks to store: the one
        way in of both WSGI and the loop hooks. `runs`: answer only a route that runs so."""
        try:
            handler, how = self.route(environ)
            if runs is not None and how != runs:
                return how
            return handler(environ)
        except HTTPError as error:
            return error_answer(error)
        except Exception:
            log.exception("error while answering %s %s", environ.get("REQUEST_METHOD"),
                          environ.get("PATH_INFO", "").encode("unicode_escape").decode("ascii"))
            return INTERNAL_ERROR

    def finish(self, environ, answer):
        """Every answer, whichever way it leaves: counted, readable by the pages allowed to, and
        without a body for HEAD (its headers stay those of GET: RFC 9110, section 9.3.2)."""
        status, headers, body = answer
        self.metrics.request(status)
        if environ.get("REQUEST_METHOD") == "HEAD":
            body = b""
        return status, headers + self.cors_headers(environ.get("HTTP_ORIGIN")), body

    def cors_headers(self, origin):
        """What lets a page from `origin` read the answer (browser games, web apps), if it may."""
        if self._every_origin:
            return self._every_origin  # the same list for every answer: callers only add it to theirs
        if origin in self._origins:
            return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        return [("Vary", "Origin")]

    def route(self, environ):
        """(handler, how it runs) for a request; raises 404 or 405."""
        methods = self._routes.get(environ.get("PATH_INFO") or "/")
        if methods is None:
            root = public_path(environ, self.config.trusted_proxies)
            raise HTTPError(404, f"no such endpoint: {root}{environ.get('PATH_INFO')}; "
                                 f"events go to {root}/v1.0/event or {root}/v1.0/events")
        found = methods.get(environ["REQUEST_METHOD"])
        if found is None:
            allowed = ", ".join(methods)
            raise HTTPError(405, f"{environ['REQUEST_METHOD']} is not allowed here; use {allowed}",
                            [("Allow", allowed)])
        return found

    def preflight(self, environ):  # a browser asking whether it may POST here: yes, for a day
        return "204 No Content", [("Access-Control-Allow-Methods", "POST, OPTIONS"),
                                  ("Access-Control-Allow-Headers", "Content-Type, Content-Encoding"),
                                  ("Access-Control-Max-Age", "86400")], b""

    def post_events(self, environ, batch=True):
        """The rows a posted request asks to store; raises HTTPError for anything wrong with it."""
        body = read_body(environ, self.config.max_body_bytes)
        if self.rate_limiter is not None:
            self.rate_limiter.check(client_address(environ.get("REMOTE_ADDR"), environ.get("HTTP_X_FORWARDED_FOR"),
                                                   self.config.trusted_proxies))
        encoding = environ.get("HTTP_CONTENT_ENCODING")
        if encoding and encoding.lower() != "identity":
            body = decompress(body, encoding.lower(), self.config.max_body_bytes)
        received = datetime.datetime.now(datetime.timezone.utc)
        return self.validator.rows(parse_json(body), batch, body, received, environ.get("HTTP_ORIGIN"))

    def get_docs(self, environ):
        address = _escape(public_url(environ, self.config.trusted_proxies))
        return _ok(self._docs.replace(_OWN_ADDRESS.encode(), address.encode()), HTML_TYPE)

    def get_openapi(self, environ):
        address = json.dumps(public_url(environ, self.config.trusted_proxies))[1:-1]
        return _ok(self._openapi.replace(_OWN_ADDRESS.encode(), address.encode()), JSON_TYPE)

    def get_health(self, environ):
        problem = self.writer.health()
        document = {"status": "unavailable" if problem or self.server_problem else "ok",
                    "database": problem or "accepts writes", "writer": self.writer.state(), "version": __version__}
        if self.server_problem:
            document["server"] = self.server_problem
        _, headers, body = _ok(json.dumps(document).encode(), JSON_TYPE, ("Cache-Control", "no-store"))
        return ("503 Service Unavailable" if problem or self.server_problem else "200 OK"), headers, body

    def get_metrics(self, environ):
        return _ok(self.metrics.text().encode(), ("Content-Type", "text/plain; version=0.0.4"))

    def get_index(self, environ):
        # Paths, not addresses: a client that reached this page can reach them the same way.
        root = public_path(environ, self.config.trusted_proxies)
        body = json.dumps({"name": "pycolytics", "version": __version__, "api": API_VERSION, "docs": root + "/docs",
                           "openapi": root + "/openapi.json", "dashboard": root + "/dashboard"}).encode()
        return _ok(body, JSON_TYPE)


class LoopHooks:
    """The built-in server's way into Pycolytics (the hooks Server documents): what never waits is answered in the
    loop, reads go to the ReadPool, the events of one turn of the loop go to the writer together (one fsync)."""

    def __init__(self, app):
        self.app = app
        self._rows, self._requests = [], []

    def take(self, environ, respond):
        app = self.app
        answer = app.answer(environ, runs=IN_LOOP)
        if answer == WAITS:
            return False
        if answer == READS:
            try:
                app.reads.submit(functools.partial(self._read, environ, respond))
                return True
            except HTTPError as error:
                answer = error_answer(error)
        elif isinstance(answer, list):  # rows to store
            if answer:
                self._rows += answer
                self._requests.append((environ, respond))
                return True
            answer = NO_CONTENT
        respond(*app.finish(environ, answer))
        return True

    def _read(self, environ, respond):
        respond(*self.app.finish(environ, self.app.answer(environ)))

    def turn_ended(self):
        if not self._requests:
            return
        rows, requests = self._rows, self._requests
        self._rows, self._requests = [], []
        try:
            self.app.writer.start()
            self.app.writer.submit(rows, functools.partial(self._committed, requests))
        except HTTPError as error:
            self._committed(requests, error)

    def _committed(self, requests, error=None):
        """Called by the writer thread once a turn's rows are stored, or could not be: answer them all."""
        status, headers, body = NO_CONTENT if error is None else error_answer(error)
        self.app.metrics.request(status, len(requests))
        for environ, respond in requests:
            respond(status, headers + self.app.cors_headers(environ.get("HTTP_ORIGIN")), body)

    def server_answered(self, status, origin):
        self.app.metrics.request(status)
        return self.app.cors_headers(origin)

    def server_trouble(self, problem):
        self.app.server_problem = problem


# Reads waiting for a thread of the ReadPool, per thread, at most: a dashboard reloaded in a
# hurry waits its turn; a flood of reports gets 503 rather than a queue that grows.
READS_WAITING = 8
# How much lower a reader thread's priority is than the server's own (Linux's nice, 0 to 19): on a
# busy machine a report then takes the CPU the loop and the writer leave, not theirs.
READER_NICENESS = 10


class ReadPool:
    """The threads that answer the requests that read the database, off the server's loop:
    `threads` at once and READS_WAITING more in line each; beyond that, 503 at once."""

    def __init__(self, threads):
        self.threads = threads
        self._jobs = queue.Queue(maxsize=threads * READS_WAITING)
        self._started = []
        self._lock = threading.Lock()

    def submit(self, job):
        with self._lock:
            if len(self._started) < self.threads:
                name = f"pycolytics-reader-{len(self._started)}"
                thread = threading.Thread(target=self._work, name=name, daemon=True)
                self._started.append(thread)
                thread.start()
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise busy(f"{self.threads * (READS_WAITING + 1)} reports are being read or waiting: "
                       "ask again shortly", 5) from None

    def _work(self):
        try:  # Linux: a thread's own nice value, so that the loop and the writer get the CPU before a report
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), READER_NICENESS)
        except (AttributeError, OSError):  # not Linux (a whole process there), or not allowed
            pass
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # a job answers its own errors: this is a bug, and the next job still runs
                log.exception("a read failed")

    def close(self):
        for _ in self._started:
            try:
                self._jobs.put_nowait(None)
            except queue.Full:
                break  # daemons: they end with the process


def create_app(config=None):
    """A ready application; for `gunicorn 'pycolytics:create_app()'`, which then fails fast on bad settings."""
    app = Pycolytics(config or load_config())
    app.open()
    return app


class _LazyApplication:
    """The module's `application`: builds the real one from the environment at its first request, since
    servers that fork workers import the module first, so nothing may be opened at import."""

    def __init__(self):
        self._forget()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self):
        # Also in a forked child: it must not share its parent's writer thread (which did not survive the fork).
        self._lock = threading.Lock()
        self._app = None

    def __call__(self, environ, start_response):
        app = self._app
        if app is None:
            with self._lock:
                if self._app is None:
                    self._app = create_app()
                app = self._app
        return app(environ, start_response)


application = _LazyApplication()


###############################################################################
# Keys and limits
###############################################################################

# Wrong keys (read or admin) one client address may present per minute before it waits for the
# next: a person mistyping stays below it, a guesser is held to a few guesses a minute...
KEY_FAILURES = 5
# ...and all addresses together: guessing from many addresses stops after this many a minute
# (a key then waits up to a minute too; keygen's keys are 256 bits, so guessing is hopeless anyway).
KEY_FAILURES_IN_ALL = 100
KEY_WINDOW = 60


def client_address(peer, forwarded_for, trusted_proxies):
    """The sender of a request: its peer, unless that is a trusted proxy that names another. Each proxy appends
    to X-Forwarded-For the address it received from: the last that is not one of ours sent it; the rest could lie."""
    if not forwarded_for or peer not in trusted_proxies:
        return peer
    for hop in reversed(forwarded_for.split(",")):
        hop = hop.strip()
        if hop not in trusted_proxies:
            return hop or peer
    return peer


class WindowCounts:
    """How many times each key (a client address) was counted in the current fixed window, for MAX_TRACKED_CLIENTS
    keys at most: past that, earlier windows' keys are forgotten, and if none is, every count starts afresh."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = {}  # key -> [window number, count in it]

    def count(self, key, window, add=1):
        with self._lock:
            counted = self._counts.get(key)
            if counted is None or counted[0] != window:
                if counted is None and len(self._counts) >= MAX_TRACKED_CLIENTS:
                    self._counts = {old: seen for old, seen in self._counts.items() if seen[0] == window}
                    if len(self._counts) >= MAX_TRACKED_CLIENTS:
                        self._counts.clear()
                counted = self._counts[key] = [window, 0]
            counted[1] += add
            return counted[1]


def _window(seconds, now=None):
    """(the window's number, seconds until the next one, at least 1) of fixed windows of `seconds`."""
    now = time.monotonic() if now is None else now
    window = int(now // seconds)
    return window, max(1, math.ceil((window + 1) * seconds - now))


class RateLimiter:
    """At most `requests` per `seconds` from one client address, counted in fixed windows."""

    def __init__(self, limit):
        self.requests, self.seconds = limit
        self.per = {seconds: name for name, seconds in _PERIODS.items()}[self.seconds]
        self._counts = WindowCounts()

    def check(self, address, now=None):
        window, wait = _window(self.seconds, now)
        if self._counts.count(address, window) > self.requests:
            raise HTTPError(429, f"more than {self.requests} requests per {self.per} from {address}: "
                                 f"send again in {wait} s", retry_after=wait)


class KeyGuard:
    """Holds back guessers of keys: after KEY_FAILURES wrong keys in a minute from an address, or KEY_FAILURES_IN_ALL
    from all, 429 until the minute ends. Only each address's first in a minute is logged: guessers cannot fill it."""

    def __init__(self, what, log_addresses=True):
        self.what = what
        self.log_addresses = log_addresses
        self._counts = WindowCounts()

    def check(self, address, now=None):
        window, wait = _window(KEY_WINDOW, now)
        if self._counts.count(address, window, 0) >= KEY_FAILURES:
            raise HTTPError(429, f"{KEY_FAILURES} wrong {self.what} keys in a minute from this address: "
                                 f"try again in {wait} s", retry_after=wait)
        if self._counts.count(None, window, 0) >= KEY_FAILURES_IN_ALL:
            raise HTTPError(429, f"over {KEY_FAILURES_IN_ALL} wrong {self.what} keys in a minute from all addresses "
                                 f"together: try again in {wait} s", retry_after=wait)

    def failed(self, address, now=None):
        window, _ = _window(KEY_WINDOW, now)
        if self._counts.count(None, window) == KEY_FAILURES_IN_ALL:
            log.warning("%d wrong %s keys in a minute: every address waits for the next", KEY_FAILURES_IN_ALL,
                        self.what)
        if self._counts.count(address, window) == 1:
            log.warning("a wrong %s key from %s (more from it this minute are counted, not logged)", self.what,
                        repr(address) if self.log_addresses else "a client")


ALL_APPLICATIONS = frozenset({"*"})  # what a global key may send events for


def presented_key(environ):
    """The key a request presents: an HTTP Basic password (any user name) or a Bearer token."""
    scheme, _, credentials = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    if scheme.lower() == "basic":
        import base64  # here: only the dashboard reads credentials
        with contextlib.suppress(binascii.Error, UnicodeDecodeError):
            return base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")[2]
    return None


def _matches(known, key):
    """Which of `known` (bytes) `key` (str) is: all are compared, each in constant time."""
    try:
        candidate = key.encode("utf-8")
    except UnicodeEncodeError:
        return []
    return [each for each in known if hmac.compare_digest(each, candidate)]


class Keyring:
    """The keys a server accepts, and what each is for: api_keys any application's events, an [app:NAME]'s only
    NAME's (a key leaked out of one game cannot write into another's); read_keys the dashboard and the report API;
    admin_keys erasing and exporting a player's events. No key is good for two of these (Config refuses it)."""

    def __init__(self, config):
        entries = [(key, None) for key in config.api_keys]
        entries += [(key, name) for name, app in config.apps.items() for key in app.get("api_keys", ())]
        self.dev_key_active = not entries
        # Each key's application (None: any); Config keeps a key to one place, so to one application.
        self._writes = {key.encode("utf-8"): name for key, name in (entries or [(DEV_KEY, None)])}
        self._known = {"read": [key.encode() for key in config.read_keys],
                       "admin": [key.encode() for key in config.admin_keys]}
        self._every_key = [*self._writes, *self._known["read"], *self._known["admin"]]
        self._guards = {kind: KeyGuard(kind, config.log_addresses) for kind in self._known}
        self._trusted_proxies = config.trusted_proxies

    def applications(self, key):
        """The applications `key` may send events for: ALL_APPLICATIONS, a set of names, or None if unknown."""
        if key is None:  # the original treated a missing key as its development key
            return ALL_APPLICATIONS if self.dev_key_active else None
        names = {self._writes[known] for known in _matches(self._writes, key)}
        return ALL_APPLICATIONS if None in names else frozenset(names) or None

    def authorize(self, environ, kind, off):
        """Let the request through if it presents one of the `kind` keys ("read" or "admin"); else
        403 (none configured: `off` says how to turn it on; or a key of another kind), 401 or 429."""
        if not self._known[kind]:
            raise HTTPError(403, off)
        key = presented_key(environ)
        if key:  # without a key (a browser's first request) it is asked for one, throttled or not: no guess
            guard = self._guards[kind]
            address = client_address(environ.get("REMOTE_ADDR"), environ.get("HTTP_X_FORWARDED_FOR"),
                                     self._trusted_proxies)
            guard.check(address)
            if _matches(self._known[kind], key):
                return
            if _matches(self._every_key, key):  # a key, of another kind
                raise HTTPError(403, f"this key may not do this: it needs one of {kind}_keys")
            guard.failed(address)
        realm = "pycolytics dashboard" if kind == "read" else "pycolytics admin"
        raise HTTPError(401, f"this needs one of {kind}_keys: as the password of HTTP Basic, or a Bearer token",
                        [("WWW-Authenticate", f'Basic realm="{realm}", charset="UTF-8"')])


###############################################################################
# Validation: from request bytes to rows
###############################################################################

# Stand-ins for an escaped backslash and an escaped quote while a body's strings are told apart from the rest
# (see _nulls_outside_strings): lone surrogates, which no text decoded from UTF-8 can hold.
_ESCAPED_BACKSLASH, _ESCAPED_QUOTE = "\ud800", "\ud801"
# An escaped UTF-16 surrogate: the only way a JSON text can smuggle in a string that is not valid Unicode (a lone
# surrogate). Bodies without one skip the per-string check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # in a decoded string: lone, as the decoder pairs what it can
_MISSING = object()


def _compact_encoder():
    """A function writing compact JSON (no spaces, Unicode as is) through a C encoder built once: json.dumps() builds
    one at every call, which costs as much as encoding an event's value. Values from json.loads hold no cycles."""
    options = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if make_encoder is None:  # a Python without the C accelerator
        return options.encode
    encode = make_encoder(None, options.default, json.encoder.encode_basestring, None, ":", ",", False, False, False)

    def compact_json(value):
        return "".join(encode(value, 0))

    return compact_json


_compact_json = _compact_encoder()


def _nulls_outside_strings(text, words, escaped_backslash, escaped_quote):
    """JSON-like `text` with each of `words` replaced by null wherever it lies outside strings, by linear C string
    methods (nothing backtracks): once escaped backslashes (paired left to right) and escaped quotes are stand-ins
    `text` cannot hold, the even pieces between quotes lie outside strings. No JSON word holds one of `words`."""
    pieces = text.replace("\\\\", escaped_backslash).replace('\\"', escaped_quote).split('"')
    outside = '"'.join(pieces[::2])
    for word in words:
        outside = outside.replace(word, "null")
    pieces[::2] = outside.split('"')
    return '"'.join(pieces).replace(escaped_quote, '\\"').replace(escaped_backslash, "\\\\")


def _mend_godot(text):
    """`text` with Godot's JSON quirks made JSON: bare nan, inf and -inf as null, \\v as \\u000b.
    A text that is not JSON stays so: its quotes and backslashes stay where they were."""
    if "\\v" in text:  # Godot escapes a vertical tab as \v, which JSON lacks
        text = text.replace("\\\\", _ESCAPED_BACKSLASH).replace("\\v", "\\u000b").replace(_ESCAPED_BACKSLASH, "\\\\")
    if "nan" in text or "inf" in text:
        text = _nulls_outside_strings(text, ("-nan", "-inf", "nan", "inf"), _ESCAPED_BACKSLASH, _ESCAPED_QUOTE)
    return text


def _finite_json(value):
    """Compact JSON of a value holding NaN or Infinity, each written as null; None if it nests too deep to encode."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))  # NaN and Infinity, about to be mended
    except RecursionError:
        return None
    # The encoder escapes every control character, so NUL and SOH can stand in for escapes.
    return _nulls_outside_strings(text, ("-Infinity", "Infinity", "NaN"), "\0", "\1")


def _non_finite_to_null(name):
    return None


def _bounded_int(digits):
    if len(digits) > MAX_INTEGER_DIGITS and len(digits.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise ValueError("integer too long")
    return int(digits)


# Python 3.9.14+, 3.10.7+ and 3.11+ refuse to convert integers of over 4300 digits (quadratic) by themselves, in C:
# sys.get_int_max_str_digits(). Elsewhere, or where that limit is lifted (PYTHONINTMAXSTRDIGITS=0), every integer's
# length is checked first, in Python, which doubles the parse time of a body full of numbers.
_C_INT_DIGITS = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
_PARSE_INT = None if 0 < _C_INT_DIGITS <= MAX_INTEGER_DIGITS else _bounded_int
_INT_DIGITS = _C_INT_DIGITS if _PARSE_INT is None else MAX_INTEGER_DIGITS  # the limit in force


# Built once: json.loads() given any option builds a decoder and its C scanner at every call, which cost a sixth of
# validating a single event. Shared by threads as json.loads() shares its own. The lenient one is for Godot's JSON:
# control characters other than \b\f\n\r\t\v raw in strings.
_DECODER = json.JSONDecoder(parse_constant=_non_finite_to_null, parse_int=_PARSE_INT)
_LENIENT_DECODER = json.JSONDecoder(parse_constant=_non_finite_to_null, parse_int=_PARSE_INT, strict=False)


def parse_json(body):
    """The document in a request body; non-finite numbers become None. Raises a 400."""
    if not body:
        raise HTTPError(400, "the request body is empty: send a JSON object (or, to /v1.0/events, an array of them)")
    try:
        text = body.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        raise HTTPError(400, f"the request body is not UTF-8 (bad byte at offset {error.start})") from None
    first_error = None
    for decoder in (_DECODER, _LENIENT_DECODER):  # JSON, else Godot's JSON mended
        try:
            return decoder.decode(text if first_error is None else _mend_godot(text))
        except json.JSONDecodeError as error:
            first_error = first_error or error
        except RecursionError:  # the decoder recurses in C, as deep as the interpreter lets it
            raise HTTPError(400, "the request body nests arrays or objects too deeply") from None
        except ValueError:  # an integer too long to convert
            raise HTTPError(400, f"the request body holds an integer of over {_INT_DIGITS} digits") from None
    message = first_error.msg[:-3] if first_error.msg.endswith(" at") else first_error.msg
    raise HTTPError(400, f"the request body is not valid JSON: {message} at line {first_error.lineno} "
                         f"column {first_error.colno}")


def _nests_deeper(document, limit):
    """Whether arrays and objects nest more than `limit` deep in `document`: a level at a time, no recursion
    (one comprehension a level is five times faster than a stack, for thousands of small arrays)."""
    level = [document]
    for _ in range(limit):
        level = [child for node in level for child in (node.values() if type(node) is dict else node)
                 if type(child) is dict or type(child) is list]
        if not level:
            return False
    return True


# A NUL's escape in compact JSON: \u0000 after an even run of backslashes (after an odd one, the first backslash of
# \u0000 is a character of the string). Linear: only a run's start is tried.
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _holds_nul(text):
    """Whether any key or string in compact JSON `text` holds a NUL character."""
    return "\\u0000" in text and _ESCAPED_NUL.search(text) is not None


# Problems one refusal lists at most. Enough to fix a client from; all of them could cost 50 ms and a 1.2 MB answer
# for 150 kB of events with every field wrong (1 kB once gzipped).
MAX_PROBLEMS = 100


class Validator:
    """Turns a parsed request body into rows for the `event` table, or says what is wrong. A fast path only decides
    "valid", with C-speed checks; the events it refuses are examined again, field by field, by the slow path, the
    authority on what is wrong (it lists the first MAX_PROBLEMS)."""

    def __init__(self, config, keyring):
        self.keyring = keyring
        self.default_origins = config.cors_origins
        self.app_origins = {name: app["cors_origins"] for name, app in config.apps.items() if "cors_origins" in app}
        self.hash_ids = id_hasher(config)
        self.max_batch_events = config.max_batch_events
        self.max_string_length = config.max_string_length
        self.max_value_bytes = config.max_value_bytes
        self.max_value_depth = config.max_value_depth
        self._fields = operator.itemgetter(*EVENT_FIELDS)

    def rows(self, document, batch, body, received, origin=None):
        """Row tuples (the six strings, value JSON, time, received_at, event_id), or an HTTPError for the lot."""
        if batch and not isinstance(document, list):
            raise HTTPError(422, [_problem(["body"], "expected a JSON array of events", "array_type")])
        if batch and len(document) > self.max_batch_events:
            message = (f"a batch holds at most {self.max_batch_events} events and this one has {len(document)}: "
                       "send it in smaller batches")
            raise HTTPError(422, [_problem(["body"], message, "too_long")])
        events = document if batch else (document,)
        # Cheap facts about the whole body that let most events skip checks: a body with few brackets cannot nest
        # deeply (a batch of more events than that has too many: not worth counting them all), and one without
        # \uD800-style escapes holds no surrogates (memchr finds no backslash in 1 us; the pattern took 20).
        shallow = len(events) <= self.max_value_depth and body.count(b"{") + body.count(b"[") <= self.max_value_depth
        check_unicode = b"\\" in body and _SURROGATE_ESCAPE.search(body) is not None
        times = (received, received.strftime(TIME_FORMAT))
        rows, unauthorized, forbidden, verdicts, invalid = [], [], [], {}, []
        value_problems = {}  # id(event) -> what is wrong with its value, as the fast path found it
        for index, event in enumerate(events):
            row = self._fast_row(event, shallow, check_unicode, times, value_problems)
            if row is None:
                invalid.append(index)
                if type(event) is not dict:
                    continue
            else:
                rows.append(row)
            key = event.get("api_key")
            if key is None or type(key) is str:  # any other type is a 422 problem
                if key not in verdicts:
                    verdicts[key] = self.keyring.applications(key)
                allowed = verdicts[key]
                if allowed is None:
                    unauthorized.append(index)
                elif row is not None and (allowed is not ALL_APPLICATIONS or origin is not None):
                    forbidden += self._refusal(index, row[1], allowed, origin, batch)
        # Keys first: a sender without a valid key learns nothing about its events.
        if unauthorized:
            which = f" in events {', '.join(map(str, unauthorized))}" if batch else ""
            raise HTTPError(401, f"invalid or missing api_key{which}")
        if forbidden:
            more = f"; and {len(forbidden) - MAX_PROBLEMS} more events" if len(forbidden) > MAX_PROBLEMS else ""
            raise HTTPError(403, "; ".join(forbidden[:MAX_PROBLEMS]) + more)
        if invalid:
            problems = self._listed_problems(events, invalid, batch, shallow, check_unicode, received, value_problems)
            raise HTTPError(422, problems)
        return rows

    def _listed_problems(self, events, invalid, batch, shallow, check_unicode, received, value_problems):
        """The problems of the `invalid` events (indexes), at most MAX_PROBLEMS of them and then a note."""
        problems = []
        for index in invalid:
            where = ["body", index] if batch else ["body"]
            problems += self._problems(events[index], where, shallow, check_unicode, received, value_problems)
            if len(problems) > MAX_PROBLEMS or len(problems) == MAX_PROBLEMS and index != invalid[-1]:
                message = (f"at most {MAX_PROBLEMS} problems are listed and this list stops at event {index}: "
                           "fix these and send again")
                return problems[:MAX_PROBLEMS] + [_problem(["body"], message, "too_many_problems")]
        return problems

    def _refusal(self, index, application, allowed, origin, batch):
        """Why an event with a good key is still refused ([] if it is not): its application's rules."""
        where = f"event {index}: " if batch else ""
        if allowed is not ALL_APPLICATIONS and application not in allowed:
            names = ", ".join(sorted(repr(name) for name in allowed))
            return [f"{where}this api_key is for application {names}, not {application!r}"]
        origins = self.app_origins.get(application, self.default_origins)
        if origin is not None and origins is not ANY_ORIGIN and origin not in origins:
            return [f"{where}pages from {origin} may not send events for application {application!r}"]
        return []

    def _fast_row(self, event, shallow, check_unicode, times, value_problems):
        """The event's row if it is valid, else None (noting only a problem of its value)."""
        try:
            fields = self._fields(event)
            joined = "".join(fields)  # raises TypeError unless every field is a string
        except (KeyError, TypeError):
            return None
        if max(map(len, fields)) > self.max_string_length or "\0" in joined or type(event) is not dict:
            return None
        key = event.get("api_key")
        if key is not None and type(key) is not str:
            return None
        text, problem = self._value_text(event.get("value", _MISSING), shallow, check_unicode)
        if problem:
            value_problems[id(event)] = problem  # finding it may have cost encoding a megabyte: the list reuses it
            return None
        if check_unicode and _SURROGATE.search(joined):
            return None
        if self.hash_ids is not None:
            fields = self.hash_ids(fields)
        if "timestamp" in event or "sent_at" in event or "event_id" in event:
            when, event_id, problems = _client_fields(event, times[0], check_unicode)
            return None if problems else fields + (text, when, times[1], event_id)
        return fields + (text, times[1], times[1], None)

    def _problems(self, event, where, shallow, check_unicode, received, value_problems):
        """Every problem of one event, each naming its field."""
        if not isinstance(event, dict):
            return [_problem(where, "expected a JSON object (one event)", "object_type")]
        problems = []
        for name in EVENT_FIELDS:
            value = event.get(name)
            if name not in event:
                problems.append(_problem(where + [name], "is required", "missing"))
            elif value is None:
                problems.append(_problem(where + [name], "must be a string, not null", "string_type"))
            elif type(value) is not str:
                problems.append(_problem(where + [name], "must be a string", "string_type"))
            elif len(value) > self.max_string_length:
                message = f"is longer than {self.max_string_length} characters"
                problems.append(_problem(where + [name], message, "string_too_long"))
            elif check_unicode and _SURROGATE.search(value):
                problems.append(_problem(where + [name], "holds an unpaired UTF-16 surrogate", "unicode"))
            elif "\0" in value:  # many readers of SQLite text stop at a NUL
                problems.append(_problem(where + [name], "holds a NUL character (\\u0000)", "nul"))
        key = event.get("api_key")
        if key is not None and type(key) is not str:
            problems.append(_problem(where + ["api_key"], "must be a string", "string_type"))
        problem = value_problems.get(id(event)) or self._value_text(event.get("value", _MISSING), shallow,
                                                                     check_unicode)[1]
        if problem:
            problems.append(_problem(where + ["value"], *problem))
        for name, message, kind in _client_fields(event, received, check_unicode)[2]:
            problems.append(_problem(where + [name], message, kind))
        return problems

    def _value_text(self, value, shallow, check_unicode):
        """(compact JSON of an event's value, None), or (None, (message, kind)) saying what is wrong."""
        if value is _MISSING or type(value) is dict and not value:
            return "{}", None
        if type(value) is not dict:
            return None, ("must be a JSON object", "dict_type")
        try:
            text = _compact_json(value)
        except ValueError:  # a non-finite float, as from 1e999
            text = _finite_json(value)
        except RecursionError:
            text = None
        depth = self.max_value_depth  # a text of n characters nests at most n/2 deep, and as deep as it has brackets
        if text is None or (not shallow and len(text) > 2 * depth and text.count("{") + text.count("[") > depth
                            and _nests_deeper(value, depth)):
            return None, (f"nests objects and arrays more than {depth} deep", "too_deep")
        if len(text) * 4 > self.max_value_bytes or check_unicode:
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError:
                return None, ("holds an unpaired UTF-16 surrogate", "unicode")
            if size > self.max_value_bytes:
                return None, (f"is {size} bytes as JSON; at most {self.max_value_bytes} are stored", "too_large")
        # PostgreSQL's jsonb cannot hold a NUL character, and readers of SQLite text stop at one: refused on both alike
        if _holds_nul(text):
            return None, ("holds a NUL character (\\u0000) in a string", "nul")
        return text, None


# The range of client times taken as given: the Unix epoch to the end of year 9999.
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_LAST_SECOND = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)


# Characters in a client's time written as text, at most: ISO 8601 with nanoseconds and a zone takes 35. Longer
# text is refused unread, so a time costs the pattern below a bounded effort.
MAX_TIME_TEXT = 64

# ISO 8601 / RFC 3339 as clients write it: a date, maybe a time (T or space) with seconds and a fraction, maybe a
# zone (none means UTC). Parsed here because datetime.fromisoformat reads less of it before Python 3.11.
_ISO_8601 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)(?:[Tt ](\d\d):(\d\d)(?::(\d\d)(?:[.,](\d+))?)?)?\s*"
    r"(?:([Zz])|([+-])(\d\d):?(\d\d))?"
)


def _client_time(value):
    """A UTC datetime from ISO 8601 text or Unix seconds, or None if `value` is neither."""
    try:
        if type(value) in (int, float):
            moment = datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
        elif type(value) is str and len(value) <= MAX_TIME_TEXT and _ISO_8601.fullmatch(value.strip()):
            *year_to_second, fraction, _, sign, zone_hours, zone_minutes = _ISO_8601.fullmatch(value.strip()).groups()
            micro = int((fraction or "0")[:6].ljust(6, "0"))
            moment = datetime.datetime(*(int(n or 0) for n in year_to_second), micro, tzinfo=datetime.timezone.utc)
            if sign:
                moment -= int(sign + "1") * datetime.timedelta(hours=int(zone_hours), minutes=int(zone_minutes))
        else:
            return None
    except (ValueError, OverflowError, OSError):  # not a date, or out of any calendar's range
        return None
    return moment if _EPOCH <= moment <= _LAST_SECOND else None


def _client_fields(event, received, check_unicode):
    """(time, event_id, problems) from an event's optional timestamp, sent_at and event_id. The time is the client's
    timestamp shifted by how far its clock was off (received - sent_at), and never later than the receive time."""
    timestamp, sent_at = event.get("timestamp"), event.get("sent_at")
    happened, sent, when = _client_time(timestamp), _client_time(sent_at), received  # None for None
    problems = [(name, "must be ISO 8601 text (2024-05-01T12:00:00Z) or Unix seconds, from 1970 to 9999", "datetime")
                for name, given, parsed in (("timestamp", timestamp, happened), ("sent_at", sent_at, sent))
                if given is not None and parsed is None]
    if happened is not None:
        try:
            when = happened if sent is None else received - (sent - happened)
        except OverflowError:  # clocks centuries apart: the estimate falls off the calendar
            when = received if sent < happened else _EPOCH
        when = min(max(when, _EPOCH), received)
    event_id = event.get("event_id")
    problem = None if event_id is None else _event_id_problem(event_id, check_unicode)
    if problem:
        problems.append(("event_id", *problem))
    return when.strftime(TIME_FORMAT), event_id, problems


def _event_id_problem(event_id, check_unicode):
    """(message, kind) if a client's `event_id` cannot be stored, else None."""
    if type(event_id) is not str or not 0 < len(event_id) <= MAX_EVENT_ID:
        return f"must be a string of 1 to {MAX_EVENT_ID} characters", "event_id"
    if "\0" in event_id:  # PostgreSQL's text cannot hold one: the whole group commit would fail
        return "holds a NUL character (\\u0000)", "nul"
    if check_unicode and _SURROGATE.search(event_id):
        return "holds an unpaired UTF-16 surrogate", "unicode"
    return None


def _problem(location, message, kind):
    """One entry of a 422 answer, shaped like FastAPI's so the original's clients read it."""
    if len(location) > 1 and isinstance(location[1], int):
        message = f"event {location[1]}: " + (f"{location[2]!r} " if len(location) > 2 else "") + message
    elif len(location) > 1:
        message = f"{location[1]!r} {message}"
    return {"loc": location, "msg": message, "type": kind}


def id_hasher(config):
    """None when no application hashes its players' ids, else a function giving an event's six string fields
    with user_id and session_id hashed where its application says so (hash_user_ids): HMAC-SHA256 with
    id_secret, 32 hex digits. The same id always gives the same hash, so players and sessions still count."""
    hashing = {name for name in [None, *config.apps] if config.for_app(name, "hash_user_ids")}
    if not hashing:
        return None
    secret, named = config.id_secret.encode(), set(config.apps)

    def hashed(fields):
        if (fields[1] if fields[1] in named else None) in hashing:
            return fields[:4] + (hash_id(secret, fields[4]), hash_id(secret, fields[5]))
        return fields

    return hashed


def hash_id(secret, text):
    return hmac.new(secret, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:32]


###############################################################################
# The writer: one thread commits the events of many requests together
###############################################################################

# A /healthz answer may be this old, so a flood of them costs the database nothing; after a failed write, the
# writer tries a small one this often, so health recovers with no traffic.
HEALTH_CACHE_SECONDS = 1
HEALTH_PROBE_SECONDS = 3
# A commit that has run this long makes /healthz 503: the writer is stuck (a lock, a dying disk).
WRITER_STUCK_SECONDS = 5
# Seconds beyond busy_timeout before the writer gives up on a commit: time for the database's own timeout error
# (a lock, a statement) to come first, and say why; and how often it looks.
WRITE_GRACE = 2
WATCH_SECONDS = 0.25
# Rows one pruning or erasing step deletes: a transaction this small holds the write lock for milliseconds.
PRUNE_STEP_ROWS = 500
# Summarising waits for a pause in the events: this long without a commit. A commit that comes during a step waits
# for it, so steps are kept to the pauses...
SUMMARY_IDLE_SECONDS = 0.05
# ...unless events keep coming and this many wait to be summarised: then steps take SUMMARY_SHARE of the writer's
# time at most, the rest is for commits (a report asks the writer to catch up first, Writer.catch_up).
SUMMARY_BACKLOG = 20_000
SUMMARY_SHARE = 0.05
# Events one summarising step reads: as many as the last step took SUMMARY_STEP_SECONDS for, from SUMMARY_MIN_ROWS
# to SUMMARY_STEP_ROWS. 2,000 events from as many new players took 25 ms (bench/README.md, "Summaries in SQL").
SUMMARY_STEP_SECONDS = 0.005
SUMMARY_MIN_ROWS = 50
SUMMARY_STEP_ROWS = 2000


class _Waiting:
    """Rows waiting for their commit, the characters of their values, and the function to call once with how it went."""

    __slots__ = ("rows", "size", "committed", "since", "answered")

    def __init__(self, rows, size, committed):
        self.rows, self.size, self.committed, self.since, self.answered = rows, size, committed, time.monotonic(), False

    def answer(self, error):
        if not self.answered:  # a commit given up on answers 503 once, even if it ends later
            self.answered = True
            self.committed(error)


class Writer:
    """The one thread that writes: commits all the rows queued by many requests with one fsync, then answers them.
    The queue is bounded: when full, requests get 503 and Retry-After rather than held in memory. No event waits
    longer than busy_timeout for its answer: a longer commit is interrupted, and what waited is answered 503 and not
    committed later (unless an fsync the disk never finishes stores it: a retry with an event_id stores it once).
    Between commits it summarises new events for reports, prunes (retention_days) and probes a failed database."""

    def __init__(self, config, store, metrics):
        self.config, self.store, self.metrics = config, store, metrics
        self.last_error = None  # what the last write (a commit or a probe) failed with
        self._probe_due = 0.0
        self._wrote_at = -HEALTH_CACHE_SECONDS  # when a write last succeeded
        self._health_lock = threading.Lock()
        self._checked, self._checked_at, self._checking = None, -HEALTH_CACHE_SECONDS, False
        self._lock = threading.Lock()
        self._wakeup, self._summarised = threading.Condition(self._lock), threading.Condition(self._lock)
        self._queue, self._queued_rows, self._queued_bytes = [], 0, 0
        self._closed = False
        self._thread = self._connection = None
        self._reconnect_at, self._unreachable = 0.0, None  # when to try again; why the last reconnection failed
        self._committing_since = None  # while a commit runs
        self._give_up_at = None  # (when, connection, group) while a commit runs
        self._stuck = False  # a commit ran past busy_timeout: new rows get 503 until it ends
        self._pass_pruned = 0  # by the steps of this pass, so far
        self._prune_due = time.monotonic() + 60  # retention_days: a minute after start, then hourly
        self._summary_behind = store.summaries  # whether events may wait to be summarised
        self._summary_next = 0.0  # under load, summarising takes SUMMARY_SHARE of the time at most
        self._summary_rows = SUMMARY_STEP_ROWS
        self._summary_retry_at = 0.0  # after a step failed
        self._summary_upto = 0  # the last event id summarised, as this writer knows
        self._unsummarised = 0  # events committed since its last step (a guess: other processes write too)
        self._catch_up_to = 0  # a reader waits for the summaries to reach this id
        self._committed_at = -SUMMARY_IDLE_SECONDS  # when the last group was committed

    def start(self):
        """Open the database (raising if it cannot be) and start the writer thread."""
        with self._lock:
            if self._thread is None and not self._closed:
                self._connection = self.store.connect()
                self._thread = threading.Thread(target=self._run, name="pycolytics-writer", daemon=True)
                self._thread.start()
                threading.Thread(target=self._watch, name="pycolytics-writer-watch", daemon=True).start()

    def submit(self, rows, committed):
        """Queue `rows`; the writer thread calls committed(error) once they are stored (error None) or not."""
        with self._lock:
            if self._closed:
                raise busy("the server is shutting down; send the events again shortly", 5)
            if self._stuck:
                raise busy(f"the database has not finished a commit for {self.config.busy_timeout:g} s; "
                           "send the events again shortly", 5)
            size = sum(len(row[6]) for row in rows)  # rows are EVENT_FIELDS, then value, time, received_at, event_id
            if self._queued_rows and (self._queued_rows + len(rows) > self.config.max_pending_events
                                      or self._queued_bytes + size > self.config.max_buffered_bytes):
                raise busy("the server is busy writing other events; send these again shortly")
            waiting = _Waiting(rows, size, committed)
            self._queue.append(waiting)
            self._queued_rows += len(rows)
            self._queued_bytes += size
            self._wakeup.notify()
        return waiting

    def write(self, rows):
        """Return once `rows` are committed; raise a 503 if they cannot be (WSGI's way)."""
        answers = queue.SimpleQueue()
        waiting = self.submit(rows, answers.put)
        try:  # the writer answers by then, if it runs
            error = answers.get(timeout=self.config.busy_timeout + WRITE_GRACE + 1)
        except queue.Empty:  # answered 503, and taken out of the queue if still there
            with self._lock:
                if waiting in self._queue:
                    self._queue.remove(waiting)
                    self._queued_rows -= len(waiting.rows)
                    self._queued_bytes -= waiting.size
            waiting.answer(busy("the database did not answer in time; send the events again shortly", 5))
            error = answers.get()
        if error is not None:
            raise error

    def close(self):
        """Commit everything queued, then stop the thread and close the database."""
        with self._lock:
            self._closed = True
            self._wakeup.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def prune_soon(self):
        """Apply retention_days now rather than at the next hourly round (after a reload, say)."""
        with self._lock:
            self._prune_due = 0
            self._wakeup.notify()

    def catch_up(self, last_id, timeout):
        """Summarise up to event `last_id` before anything but commits; whether that was done in `timeout` seconds."""
        with self._lock:
            if self._thread is None or self.last_error is not None:
                return False
            self._catch_up_to = max(self._catch_up_to, last_id)
            self._summary_behind = True
            self._wakeup.notify()
            return self._summarised.wait_for(lambda: self._summary_upto >= last_id, timeout)

    def _run(self):
        try:
            while True:
                with self._lock:
                    while not self._queue and not self._closed:
                        wait = self._idle_wait()
                        if wait is not None and wait <= 0:
                            break
                        self._wakeup.wait(wait)
                    if not self._queue and self._closed:
                        return
                    group, self._queue, self._queued_rows, self._queued_bytes = self._queue, [], 0, 0
                now = time.monotonic()
                if group:
                    self._commit(group)
                    waits = self._catch_up_to > self._summary_upto  # a report
                    if self._summary_due() is not None and now >= self._summary_retry_at and (waits or (
                            self._unsummarised > SUMMARY_BACKLOG and now >= self._summary_next)):
                        self._summarise()  # under load, a step between commits: paced, unless a report waits
                elif self.last_error is not None and now >= self._probe_due:
                    self._probe()
                elif self.config.retention_days and now >= self._prune_due:
                    self._prune_due = self._prune()
                elif self._summary_due() is not None and now >= self._summary_due():
                    self._summarise()
        finally:
            if self._connection is not None:
                self._connection.close()

    def _idle_wait(self):
        """Seconds until the writer has work besides commits (a probe, a pruning step), or None."""
        due = [self._probe_due] if self.last_error is not None else []
        if self.config.retention_days:
            due.append(self._prune_due)
        if self._summary_due() is not None:
            due.append(self._summary_due())
        return min(due) - time.monotonic() if due else None

    def _connected(self):
        """The writer's connection, opened again if it was lost or its file replaced (once a second at most)."""
        problem = self._connection is not None and self.store.detached(self._connection)
        if problem:
            log.error("%s: opening the database again", problem)
            self._forget_lost(ConnectionError(problem))
        if self._connection is None:
            if time.monotonic() < self._reconnect_at:
                raise ConnectionError(self._unreachable or "the database connection is lost; reconnecting")
            self._reconnect_at = time.monotonic() + 1
            try:
                self._connection = self.store.connect()
            except Exception as error:  # the database's errors, or its file still gone
                self._unreachable = str(error)
                raise
            log.info("reconnected to the database")
        return self._connection

    def health(self):
        """Why the database would not take events now, or None. Mostly instant, so that a flood of /healthz costs
        the database nothing: a failed write is known, a recent one says enough, and else one check runs at a time,
        once in HEALTH_CACHE_SECONDS at most (meanwhile callers get the last result); it waits a few seconds at most."""
        since = self._committing_since
        if since is not None and time.monotonic() - since > WRITER_STUCK_SECONDS:
            return f"a commit has been running for {time.monotonic() - since:.0f} s (a lock, or a slow disk)"
        error = self.last_error
        if error is not None:
            return f"the last write failed: {self.store.describe(error)}"
        with self._health_lock:
            now = time.monotonic()
            if now - self._wrote_at < HEALTH_CACHE_SECONDS:
                return None
            if self._checking or now - self._checked_at < HEALTH_CACHE_SECONDS:
                return self._checked
            self._checking = True
        problem = None
        try:
            connection = self._connection
            problem = (connection is not None and self.store.detached(connection)) or self.store.problem()
        finally:
            with self._health_lock:
                self._checked, self._checked_at, self._checking = problem, time.monotonic(), False
        return problem

    def state(self):
        """What the writer does, in words, for /healthz."""
        since = self._committing_since
        if since is not None:
            return f"committing for {time.monotonic() - since:.1f} s"
        if self.last_error is not None:
            return "its last write failed; it tries again every few seconds"
        return "waiting for events" if self._thread is not None else "not started"

    def _probe(self):
        """A small write while the last one failed: health recovers without waiting for events."""
        before = str(self.last_error)
        try:
            self.store.probe(self._connected())
        except Exception as error:  # still failing, for any of a commit's reasons
            if str(error) != before:
                log.error("the database still takes no writes: %s", error)
            self._failed(error)
            return
        self._succeeded()
        log.info("the database takes writes again")

    def _failed(self, error):
        self.last_error = error
        self._probe_due = time.monotonic() + HEALTH_PROBE_SECONDS
        self._forget_lost(error)

    def _succeeded(self):
        self.last_error = None
        self._wrote_at = time.monotonic()

    def _summary_due(self):
        """When the next summarising step may come, or None: none is needed, or the database fails.
        Now, while a report waits for it; else once no commit came for SUMMARY_IDLE_SECONDS."""
        if self.last_error is not None:
            return None
        if self._catch_up_to > self._summary_upto:
            return self._summary_retry_at
        return max(self._summary_retry_at, self._committed_at + SUMMARY_IDLE_SECONDS) if self._summary_behind else None

    def _summarise(self):
        """One step of summarising new events for reports; under load, SUMMARY_SHARE of the time at most."""
        started, limit = time.monotonic(), self._summary_rows
        try:
            read, upto = self.store.summarise(self._connected(), limit, self.config)
        except SummaryPostponed:
            self._summary_retry_at = time.monotonic() + 1
            return
        except Exception as error:  # the database's errors, or a lost connection: reports read the events meanwhile
            self._forget_lost(error)
            log.warning("could not summarise events for reports (trying again in a minute): %s", error)
            self._summary_retry_at = time.monotonic() + 60
            self._summary_behind = False  # the next commit says so again
            return
        took = time.monotonic() - started
        with self._lock:
            self._summary_behind = read == limit
            self._summary_upto = upto
            self._unsummarised = max(0, self._unsummarised - read) if self._summary_behind else 0
            self._summarised.notify_all()
        if self._summary_behind:  # a whole step: its time per event says how many fit in the next
            fit = int(SUMMARY_STEP_SECONDS * read / max(took, 1e-9))
            self._summary_rows = max(SUMMARY_MIN_ROWS, min(SUMMARY_STEP_ROWS, fit))
        self._summary_next = time.monotonic() + took * (1 - SUMMARY_SHARE) / SUMMARY_SHARE

    def _prune(self):
        """One small step of deleting events past retention_days, between commits; when to step next. Whole days
        go, before the midnight retention_days before today's, so that summaries forget whole days too."""
        today = datetime.datetime.now(datetime.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        before = (today - datetime.timedelta(days=self.config.retention_days)).strftime(TIME_FORMAT)
        try:
            deleted, changed = self.store.prune(self._connected(), before)
        except Exception as error:  # the database's errors, or a lost connection
            self._forget_lost(error)
            log.warning("could not prune old events (%d deleted before that): %s", self._pass_pruned, error)
        else:
            self.metrics.prune(deleted)
            self._pass_pruned += deleted
            if deleted or changed:
                return time.monotonic()  # more to delete: the next step comes between commits
            log.info("retention_days = %g: deleted %d events from before %s", self.config.retention_days,
                     self._pass_pruned, before[:19])
        self._pass_pruned = 0
        return time.monotonic() + 3600

    def _commit(self, group):
        """Commit the rows of `group` in one transaction and answer each request, within busy_timeout of the oldest
        one's arrival, or 503 for all of them (and for what queued meanwhile)."""
        started = self._committing_since = time.monotonic()
        rows = list(itertools.chain.from_iterable(waiting.rows for waiting in group))
        left = group[0].since + self.config.busy_timeout + WRITE_GRACE - started
        error, inserted = None, 0
        try:
            if left <= 0:  # they waited for a commit before theirs that took nearly busy_timeout
                raise TimeoutError(f"the events waited over busy_timeout = {self.config.busy_timeout:g} s")
            connection = self._connected()
            self._give_up_at = (started + left, connection, group)
            try:
                inserted = self.store.insert(connection, rows)
            except LostBeforeCommit as lost:  # found dead before anything was committed: once more, afresh
                if any(waiting.answered for waiting in group):
                    raise  # given up on and answered 503 already: not stored later
                self._forget_lost(lost)
                self._reconnect_at = 0
                inserted = self.store.insert(self._connected(), rows)
        except Exception as failure:  # the database is full, gone, unreachable, locked or too slow
            log.error("could not store %d events: %s", len(rows), failure)
            self._failed(failure)
            error = busy("the database could not store the events; send them again shortly", 5)
        finally:
            self._committing_since = self._give_up_at = None
            with self._lock:
                self._stuck = False
        if error is None:
            if any(waiting.answered for waiting in group):
                log.warning("%d events were answered 503 but their commit, given up on, ended in the end: "
                            "a retry with their event_ids is stored once", len(rows))
            self._succeeded()
            self._committed_at = time.monotonic()
            self._summary_behind = self.store.summaries
            self._unsummarised += inserted
            self.metrics.commit(time.monotonic() - started, inserted)  # new rows, not retried event_ids
        for waiting in group:
            waiting.answer(error)

    def _watch(self):
        """Gives up on a commit that runs past its time (the writer thread, inside it, cannot)."""
        while not self._closed:
            time.sleep(WATCH_SECONDS)
            running = self._give_up_at
            if running is not None and time.monotonic() > running[0] and running is self._give_up_at:
                self._give_up_at = None
                self._give_up(*running[1:])

    def _give_up(self, connection, group):
        """busy_timeout has passed for the oldest rows of a running commit (another thread's call): interrupt it,
        answer its rows and what is queued 503, and take no rows till it ends."""
        log.error("a commit of %d requests' events ran past busy_timeout = %g s: interrupting it",
                  len(group), self.config.busy_timeout)
        self.store.interrupt(connection)
        error = busy(f"the database did not commit within busy_timeout = {self.config.busy_timeout:g} s; "
                     "send the events again shortly", 5)
        with self._lock:
            self._stuck = True
            queued, self._queue, self._queued_rows, self._queued_bytes = self._queue, [], 0, 0
        for waiting in group + queued:
            waiting.answer(error)

    def _forget_lost(self, error):
        """Drop a connection that `error` says is gone, so the next commit opens a new one."""
        if self._connection is not None and (isinstance(error, ConnectionError) or self.store.lost(error)):
            with contextlib.suppress(Exception):  # closing what is already broken: nothing more to learn
                self._connection.close()
            self._connection = None


class Metrics:
    """Counters and a histogram for /metrics, in Prometheus' text format. Thread-safe."""

    # Commit latency buckets, in seconds: an fsync on an SSD is ~1 ms, on an SD card ~10-100 ms.
    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

    def __init__(self):
        self._lock = threading.Lock()
        self.stored = self.pruned = self.commit_seconds = 0
        self.commits = [0] * (len(self.BUCKETS) + 1)  # in the bucket each falls in; the last is past every bound
        self.requests = collections.Counter()  # by status

    def request(self, status, count=1):
        with self._lock:
            self.requests[status[:3]] += count

    def commit(self, seconds, stored):
        with self._lock:
            self.stored += stored
            self.commit_seconds += seconds
            self.commits[bisect.bisect_left(self.BUCKETS, seconds)] += 1

    def prune(self, deleted):
        with self._lock:
            self.pruned += deleted

    def text(self):
        with self._lock:
            commits, requests = list(itertools.accumulate(self.commits)), sorted(self.requests.items())
            stored, pruned, seconds = self.stored, self.pruned, self.commit_seconds
        return "\n".join([
            "# HELP pycolytics_events_stored_total Events committed to the database.",
            "# TYPE pycolytics_events_stored_total counter", f"pycolytics_events_stored_total {stored}",
            "# HELP pycolytics_requests_total Requests answered, by HTTP status.",
            "# TYPE pycolytics_requests_total counter",
            *(f'pycolytics_requests_total{{status="{status}"}} {count}' for status, count in requests),
            "# HELP pycolytics_commit_seconds Time to commit one group of events, fsync included.",
            "# TYPE pycolytics_commit_seconds histogram",
            *(f'pycolytics_commit_seconds_bucket{{le="{le}"}} {n}' for le, n in zip(self.BUCKETS + ("+Inf",), commits)),
            f"pycolytics_commit_seconds_sum {seconds:.6f}", f"pycolytics_commit_seconds_count {commits[-1]}",
            "# HELP pycolytics_events_pruned_total Events deleted for being older than retention_days.",
            "# TYPE pycolytics_events_pruned_total counter", f"pycolytics_events_pruned_total {pruned}"]) + "\n"


###############################################################################
# Storage: SQLite and PostgreSQL
###############################################################################

# The original Pycolytics' table, column for column as SQLModel created it, so databases made by either program
# open in the other. Only a new table gets Pycolytics' own index, on `time` (docs/storage.md, "Indexes"). An
# existing one keeps its indexes, and gains at start-up the ADDED_COLUMNS and the EVENT_ID_INDEX: no migration step.
SCHEMA = """
CREATE TABLE IF NOT EXISTS event (
    event_type VARCHAR NOT NULL, application VARCHAR NOT NULL, version VARCHAR NOT NULL,
    platform VARCHAR NOT NULL, user_id VARCHAR NOT NULL, session_id VARCHAR NOT NULL,
    value JSON NOT NULL, id INTEGER NOT NULL, time DATETIME NOT NULL, PRIMARY KEY (id)
);
CREATE INDEX IF NOT EXISTS ix_event_time ON event (time);
"""

# Columns Pycolytics adds to the original's table: adding one rewrites nothing (instant on any size of table),
# and the original can still write into it.
ADDED_COLUMNS = (
    ("received_at", "DATETIME"),  # the server's receive time, when `time` is the client's
    ("event_id", "VARCHAR"),  # a client-made id: a retried event is stored once
)
# An event_id is unique per application, among the rows that have one: two games that both number their events
# 1, 2, 3 keep all of them. Older Pycolytics made it unique across applications (OLD_EVENT_ID_INDEX): replaced.
EVENT_ID_INDEX = ("CREATE UNIQUE INDEX IF NOT EXISTS ix_event_application_event_id ON event (application, event_id)"
                  " WHERE event_id IS NOT NULL")
OLD_EVENT_ID_INDEX = "ix_event_event_id"

# Only a conflict on EVENT_ID_INDEX is ignored: the retry of an acknowledged event is stored once. Any other
# constraint a row breaks (one an operator added) fails the commit: 503, never a 204 for a row not stored.
_INSERT_INTO = ("INSERT INTO event (event_type, application, version, platform, user_id, session_id, value, time,"
                " received_at, event_id)")
_ON_CONFLICT = " ON CONFLICT (application, event_id) WHERE event_id IS NOT NULL DO NOTHING"
INSERT = _INSERT_INTO + " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" + _ON_CONFLICT

# SQLite takes a group as INSERTs of many rows each: the driver binds a statement's parameters in one C call and
# gives the GIL up once per statement, where executemany does at every row. 64 rows are 640 parameters, within
# SQLite's 999 before 3.32. Up to 64 rows are one statement that SQLite commits by itself, without BEGIN and
# COMMIT: two waits for the GIL fewer (bench/README.md, "Issue 14", second and fourth rounds).
INSERT_CHUNK_ROWS = 64


@functools.lru_cache(maxsize=None)  # one statement per size: INSERT_CHUNK_ROWS of them at most
def _insert_rows(count):
    return INSERT.replace("(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * count))


def _chunks(count):
    """(start, size) pieces of `count` rows: whole INSERT_CHUNK_ROWS, then powers of two (7 shapes at most)."""
    start, size = 0, INSERT_CHUNK_ROWS
    while start < count:
        while size > count - start:
            size //= 2
        yield start, size
        start += size


# The files of one SQLite database in WAL mode: deleting or replacing any of them under a
# running server loses what is committed to it (https://www.sqlite.org/howtocorrupt.html).
DATABASE_FILES = ("", "-wal", "-shm")


@contextlib.contextmanager
def transaction(connection):
    """BEGIN IMMEDIATE ... COMMIT around the block, ROLLBACK if it fails. IMMEDIATE takes the write lock at BEGIN
    (waiting busy_timeout), so a transaction never fails half-way for want of it. After some errors (SQLITE_FULL,
    SQLITE_IOERR) SQLite has rolled back already and a ROLLBACK fails too: the error raised is always the first."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            try:
                connection.execute("ROLLBACK")
            except sqlite3.Error as error:  # the first error is the one to report; this one only hides it
                log.warning("rollback failed too: %s", error)
        raise


class SQLiteConnection(sqlite3.Connection):
    files = {}  # {suffix: (st_dev, st_ino)} of each of the database's files it opened (_file_ids)
    conventions = None  # the game-analytics conventions its summaries were last made with


def _file_ids(path):
    """{suffix: (st_dev, st_ino)} of each of the database's files that exists now."""
    found = {}
    for suffix in DATABASE_FILES:
        with contextlib.suppress(FileNotFoundError):
            status = os.stat(path + suffix)
            found[suffix] = (status.st_dev, status.st_ino)
    return found


def connect(path, synchronous="full", busy_timeout=30.0, create=True):
    """A connection with Pycolytics' pragmas; creates the database (unless not `create`) and its table if missing.
    WAL lets readers (pandas, the dashboard) work while events are written; the busy timeout makes writers in
    other processes wait their turn instead of failing with "database is locked"."""
    target = path if create else "file:" + urllib_quote(os.path.abspath(path)) + "?mode=rw"
    connection = sqlite3.connect(target, timeout=busy_timeout, isolation_level=None, check_same_thread=False,
                                 uri=not create, factory=SQLiteConnection)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(f"PRAGMA synchronous={_synchronous(synchronous)}")
        exists = connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'event'").fetchone()
        if not exists:
            connection.executescript(SCHEMA)
        columns, indexes = _columns(connection), _indexes(connection)
        missing = [name for name in EVENT_FIELDS + ("value", "id", "time") if name not in columns]
        if missing:
            raise sqlite3.DatabaseError(f"its table 'event' lacks the columns {', '.join(missing)}")
        if (any(name not in columns for name, _ in ADDED_COLUMNS) or OLD_EVENT_ID_INDEX in indexes
                or "ix_event_application_event_id" not in indexes):  # else no write lock is taken at each start
            _upgrade(connection, announce=bool(exists))
        ensure_summaries(connection, SQLITE)
        connection.files = _file_ids(path)
    except BaseException:
        connection.close()
        raise
    return connection


def _columns(connection):
    return {row[1] for row in connection.execute("PRAGMA table_info(event)")}


def _indexes(connection):
    return {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}


def _upgrade(connection, announce):
    """Give the table the ADDED_COLUMNS and the EVENT_ID_INDEX; another process may be doing the same. The old index
    on event_id alone guarantees no two rows share one, so the new one is always created, in the same transaction
    as the old one goes: no moment lets a duplicate in."""
    with transaction(connection):
        columns = _columns(connection)
        for name, kind in ADDED_COLUMNS:
            if name not in columns:
                connection.execute(f"ALTER TABLE event ADD COLUMN {name} {kind}")
                if announce:
                    log.info("upgraded the database: added the column event.%s", name)
        connection.execute(EVENT_ID_INDEX)
        if OLD_EVENT_ID_INDEX in _indexes(connection):
            connection.execute(f"DROP INDEX {OLD_EVENT_ID_INDEX}")
            log.info("upgraded the database: event_id is unique per application (index %s replaces %s)",
                     "ix_event_application_event_id", OLD_EVENT_ID_INDEX)


def urllib_quote(path):
    from urllib.parse import quote  # here: only connections opened by URI (read-only, or never creating) need it
    return quote(path)


def read_only(path):
    """A connection that can only read `path`, and fails rather than create a missing file."""
    return sqlite3.connect("file:" + urllib_quote(os.path.abspath(path)) + "?mode=ro", uri=True, isolation_level=None)


class DatabaseGone(sqlite3.OperationalError):
    """The database file the server opened was deleted or replaced, or has not come back."""


def _user():
    try:
        import pwd  # here: only a refusal to start names the user
        return f"the user {pwd.getpwuid(os.geteuid()).pw_name}"
    except (ImportError, KeyError):
        return f"the user id {os.geteuid()}"


def unwritable(path):
    """Why this process could not write an SQLite database at `path`, in plain words, or None."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        return (f"{path} is a directory, not a database file (name a file in it, such as "
                f"{os.path.join(path, 'pycolytics.db')})")
    if not os.path.isdir(folder):
        return f"the folder {folder} does not exist (create it, or name a database in an existing folder)"
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        return f"the folder {folder} is on a read-only file system"
    if not os.access(folder, os.W_OK | os.X_OK):
        return (f"{_user()} may not write in the folder {folder}: SQLite creates the database's -wal and -shm "
                "files beside it, so the folder needs write (w) and search (x) permission")
    for name in (path + suffix for suffix in DATABASE_FILES):
        if os.path.exists(name) and not os.access(name, os.R_OK | os.W_OK):
            return f"{_user()} may not write the file {name}: it needs read (r) and write (w) permission"
    return None


class Deadlines:
    """Calls a function once its deadline passes, from one thread of its own: what bounds a wait that cannot
    bound itself (a commit, a report's statements, libpq on a peer that acknowledges TCP but never answers:
    keepalives and tcp_user_timeout only notice one that stops acknowledging)."""

    IDLE_SECONDS = 60  # the thread ends after this long with nothing to watch

    def __init__(self):
        self._changed = threading.Condition()
        self._watched = {}  # token: [deadline, function, fired]
        self._thread = None
        self._wakes_at = 0.0  # when the thread wakes next (it looks again then)

    @contextlib.contextmanager
    def after(self, seconds, function):
        """Within the block, function() is called once, `seconds` from now; yields [deadline, function, fired]."""
        entry, token = [time.monotonic() + seconds, function, False], object()
        with self._changed:
            self._watched[token] = entry
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pycolytics-deadlines", daemon=True)
                self._thread.start()
            if entry[0] < self._wakes_at:  # woken only when it must wake sooner: once a commit, it need not
                self._changed.notify()
        try:
            yield entry
        finally:
            with self._changed:
                del self._watched[token]

    def _run(self):
        while True:
            with self._changed:
                now = time.monotonic()
                due = [entry for entry in self._watched.values() if entry[0] <= now and not entry[2]]
                for entry in due:
                    entry[2] = True
                waiting = [entry[0] - now for entry in self._watched.values() if not entry[2]]
                if not due:
                    self._wakes_at = now + (max(0.01, min(waiting)) if waiting else self.IDLE_SECONDS)
                    if not self._changed.wait(self._wakes_at - now) and not self._watched:
                        self._thread = None
                        return
            for entry in due:  # outside the lock: a function may take locks of its own
                try:
                    entry[1]()
                except Exception:  # one broken function must not stop the others' deadlines
                    log.exception("a deadline's function failed")


class ReportTooSlow(Exception):
    """A read ran past its time budget and was interrupted."""


class Store:
    """What a storage backend provides: SQLiteStore and PostgresStore. The writer, /healthz, the reports, export,
    prune and forget use only this (backup and copy ask: they are SQLite's backup and a move into PostgreSQL).

      kind, dialect, errors        its name (for messages), its SQL (SQLITE, POSTGRESQL), the driver's exceptions
      summaries                    whether it keeps summaries between reports ("Summaries")
      connect()                    the write connection; makes or upgrades the schema
      reading(seconds)             a context: a connection for reading only, interrupted after `seconds`
      insert(connection, rows)     store rows in one transaction; how many were new (not a known event_id)
      prune(connection, before)    one small step of deleting what is older than `before`; what it deleted
      summarise(connection, limit, config)  one step of keeping the summaries: (events read, last id summarised)
      probe(connection)            make one small write, raising whatever stops it (health recovering)
      interrupt(connection)        make a call on `connection` in another thread fail now
      detached(connection)         why `connection` no longer reaches the configured database, or None
      lost(error)                  whether `error` means the connection is gone and a new one is needed
      columns(connection)          the event table's column names
      rows(connection, query, parameters)   the rows of a SELECT, streamed in constant memory
      problem()                    why the database would not take events now, or None; waits a few seconds at most
      describe(error)              `error` in words that /healthz may show (no hosts, users or passwords)
      exists()                     whether the database is there already (commands never create one)
    """

    summaries = False

    def __init__(self, config):
        self.config = config
        self.deadlines = Deadlines()

    def exists(self):
        return True

    def detached(self, connection):
        return None

    def summarise(self, connection, limit, config):
        return 0, 0

    def rows(self, connection, query, parameters):
        return connection.execute(query, parameters)

    @contextlib.contextmanager
    def reading(self, seconds):
        connection = self.read(seconds)
        interrupt = functools.partial(self.interrupt, connection)
        with contextlib.closing(connection), self.deadlines.after(seconds, interrupt) as watch:
            try:
                yield connection
            except self.errors as error:
                if watch[2]:
                    raise ReportTooSlow(str(error)) from None
                raise


# /healthz answers 503 when the database's disk has less free space than this, or the write lock takes longer.
MIN_FREE_DISK = 16 * 2**20
HEALTH_TIMEOUT = 2


class SQLiteStore(Store):
    """Events in an SQLite file: the default, standard library only. Only the first connection may create the file:
    if it is deleted or replaced while the server runs, the writer reopens the path only when a database is there
    again (put back, or restored from a backup), and events get 503 meanwhile. A restart creates a new, empty one."""

    kind = "SQLite"
    summaries = True

    def __init__(self, config):
        super().__init__(config)
        self.dialect = SQLITE
        self.errors = (sqlite3.Error,)
        self._files = None  # the files the last connect() opened
        self._path = os.path.abspath(config.database)

    def connect(self):
        path = self.config.database
        if self._files is None:
            problem = unwritable(path)
            if problem:
                raise ConfigError(f"{self.config.sources['database']}: cannot write the database {path}: {problem}")
        elif not os.path.exists(path):
            raise DatabaseGone(f"the database file {self._path} is gone (deleted or moved while the "
                               "server ran): put it back, or restart the server to start a new, empty one")
        else:
            self._refuse_a_stale_log(path)
        connection = connect(path, self.config.synchronous, self.config.busy_timeout, create=self._files is None)
        self._files = connection.files
        return connection

    def _refuse_a_stale_log(self, path):
        """A database put back beside the -wal of the one deleted would take that log's pages as its own."""
        before, now = self._files, _file_ids(path)
        if before.get("") != now.get("") and before.get("-wal") is not None and before.get("-wal") == now.get("-wal"):
            raise DatabaseGone(f"the database file {self._path} was replaced, but its -wal file is the "
                               "deleted database's: move the -wal and -shm files away, then it is opened again")

    def exists(self):
        return os.path.exists(self.config.database)

    def detached(self, connection):
        """Why `connection` no longer writes into the file at the configured path, or None: asked
        before and after every commit (a -wal deleted before one is found before it goes there)."""
        now = _file_ids(self._path)
        for suffix, ids in connection.files.items():
            if suffix not in now and not os.path.isdir(os.path.dirname(self._path)):
                return f"the folder of the database file {self._path} was deleted or moved while the server ran"
            if suffix not in now:
                return f"the database file {self._path + suffix} was deleted while the server ran"
            if now[suffix] != ids:
                return f"the database file {self._path + suffix} was replaced while the server ran"
        return None

    def insert(self, connection, rows):
        """Insert `rows` in one transaction; return how many were new (not an event_id already stored).
        DatabaseGone: the file was deleted or replaced meanwhile, the rows went to a file nobody will open again."""
        changes = connection.total_changes
        if 0 < len(rows) <= INSERT_CHUNK_ROWS:  # one statement: a transaction by itself, atomic
            connection.execute(_insert_rows(len(rows)), list(itertools.chain.from_iterable(rows)))
        else:
            with transaction(connection):
                for start, size in _chunks(len(rows)):
                    connection.execute(_insert_rows(size), list(itertools.chain(*rows[start:start + size])))
        self._still_there(connection)
        return connection.total_changes - changes

    def _still_there(self, connection):
        problem = self.detached(connection)
        if problem:
            raise DatabaseGone(problem)

    def prune(self, connection, before, limit=PRUNE_STEP_ROWS):
        """One step of deleting events older than `before` (stored time text) and then, a day at
        a time, the summaries of the days before its day: (events deleted, summary rows changed)."""
        with transaction(connection):
            deleted = connection.execute(
                "DELETE FROM event WHERE id IN (SELECT id FROM event WHERE time < ? ORDER BY id LIMIT ?)",
                (before, limit)).rowcount
            changed = 0 if deleted == limit else forget_before(connection, SQLITE, before, limit)
        return deleted, changed

    def summarise(self, connection, limit, config):
        """One step of summarising up to `limit` new events ("Summaries"): (read, last id summarised). Without an
        fsync of its own: a summary lost to a power cut is made again from the events, and the next commit's fsync
        makes it durable. It never waits for the write lock, which another process may hold for long (a backup, a
        notebook): SummaryPostponed, the writer's commits come first."""
        synchronous = _synchronous(self.config.synchronous)
        if synchronous != "off":
            connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA busy_timeout=0")
        try:
            with transaction(connection):
                found = summarise(connection, SQLITE, limit, config)
        except sqlite3.OperationalError as error:
            if "locked" in str(error) or "busy" in str(error):
                raise SummaryPostponed(str(error)) from None
            raise
        finally:
            connection.execute(f"PRAGMA synchronous={synchronous}")
            connection.execute(f"PRAGMA busy_timeout={int(self.config.busy_timeout * 1000)}")
        self._still_there(connection)
        return found

    def probe(self, connection):
        """Commit a write that changes nothing (user_version rewritten as it is): lock, log and fsync all work."""
        with transaction(connection):
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            connection.execute(f"PRAGMA user_version = {int(version)}")
        self._still_there(connection)

    def interrupt(self, connection):
        connection.interrupt()

    def lost(self, error):
        return isinstance(error, DatabaseGone)  # a new connection helps only when its file was replaced

    def describe(self, error):
        return str(error)  # SQLite's messages name no host, user or database

    def read(self, seconds=None):
        """Never creates a missing database. Temporary tables (a report's) go to a file, the page cache is 8 MiB:
        memory stays small on any database."""
        connection = read_only(self.config.database)
        connection.execute("PRAGMA temp_store=FILE")
        connection.execute("PRAGMA cache_size=-8192")
        return connection

    def columns(self, connection):
        return _columns(connection)

    def problem(self):
        try:
            space = os.statvfs(os.path.dirname(self._path))
            if space.f_bavail * space.f_frsize < MIN_FREE_DISK:
                return "the disk is almost full"
            connection = sqlite3.connect("file:" + urllib_quote(self._path) + "?mode=rw", uri=True,
                                         timeout=HEALTH_TIMEOUT, isolation_level=None)
            with contextlib.closing(connection), transaction(connection):  # can we take the write lock?
                pass
        except (OSError, sqlite3.Error) as error:
            return str(error)
        return None


# PostgreSQL's table: the same columns, with its own types for JSON and times.
POSTGRES_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS event (event_type VARCHAR NOT NULL, application VARCHAR NOT NULL,"
    " version VARCHAR NOT NULL, platform VARCHAR NOT NULL, user_id VARCHAR NOT NULL, session_id VARCHAR NOT NULL,"
    " value JSONB NOT NULL, id BIGSERIAL PRIMARY KEY, time TIMESTAMPTZ NOT NULL, received_at TIMESTAMPTZ,"
    " event_id VARCHAR)",
    "CREATE INDEX IF NOT EXISTS ix_event_time ON event (time)",
    EVENT_ID_INDEX,
    f"DROP INDEX IF EXISTS {OLD_EVENT_ID_INDEX}",
)
POSTGRES_SCHEMA_READY = (
    "SELECT to_regclass('event') IS NOT NULL AND to_regclass('ix_event_time') IS NOT NULL"
    " AND to_regclass('ix_event_application_event_id') IS NOT NULL AND to_regclass('ix_event_event_id') IS NULL"
)
# Times travel as the same UTC text as in SQLite (the session's time zone is UTC). The conflict target is the
# event_id index only: any other (a primary key behind rows imported with their ids) is an error, never a 204.
POSTGRES_INSERT = (_INSERT_INTO + " VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s::timestamptz, %s::timestamptz, %s)"
                   + _ON_CONFLICT)
# The same for a whole group in one statement, its rows as one JSON array of arrays: the driver adapts one
# parameter instead of ten per row, and the collector spends less than half the CPU on a batch (docs/scale-out.md).
# ->> gives back each string as encoded and null as NULL; rows go in in the array's order, so of two rows with
# one event_id the first is stored and the second skipped, as one statement after another would do.
POSTGRES_INSERT_GROUP = (
    _INSERT_INTO + " SELECT fields->>0, fields->>1, fields->>2, fields->>3, fields->>4, fields->>5,"
    " (fields->>6)::jsonb, (fields->>7)::timestamptz, (fields->>8)::timestamptz, fields->>9"
    " FROM json_array_elements(%s::json) WITH ORDINALITY AS given (fields, place) ORDER BY place" + _ON_CONFLICT
)
# Characters of a group's JSON text at most: PostgreSQL holds no value over 1 GB, a character is at most 4 bytes
# of UTF-8. Only a max_buffered_bytes raised far beyond its default makes such a group: it goes row by row.
MAX_JSON_GROUP_CHARS = 200_000_000
# Every session's settings, in one round trip: waits for a lock and statements bounded as SQLite's busy_timeout
# bounds them; synchronous_commit = on whatever the server's default, so a 204 means the commit is on disk (and
# on a synchronous standby, if there is one).
POSTGRES_SESSION = ("SELECT set_config('TimeZone', 'UTC', false), set_config('lock_timeout', %s, false),"
                    " set_config('statement_timeout', %s, false), set_config('synchronous_commit', %s, false)")
# synchronous = normal (or off) relaxes commits as on SQLite: a crash of the database server may lose the last
# commits, a crash of the collector loses nothing.
POSTGRES_SYNCHRONOUS_COMMIT = {"full": "on", "normal": "off", "off": "off"}
# The statement that ends a group's transaction: after it is sent, a lost connection leaves the outcome unknown
# (a 503; a retry with event_ids is safe), never a silent second try.
POSTGRES_COMMIT = "COMMIT"
# Seconds beyond busy_timeout before a connection is cut: time for the server's own timeout error to come first.
POSTGRES_GRACE = 5


class LostBeforeCommit(ConnectionError):
    """Gone before COMMIT was sent: nothing of the transaction is stored, so the same rows on a new connection are."""


def _cut(connection):
    """Shut the connection's socket down beneath libpq: a call blocked on it fails at once."""
    with contextlib.suppress(Exception):  # already closed: nothing is blocked on it
        with socket.fromfd(connection.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM) as duplicate:
            duplicate.shutdown(socket.SHUT_RDWR)


class PostgresStore(Store):
    """Events in PostgreSQL (or a database that speaks its protocol), for several collectors. The driver, psycopg 3,
    is imported only here: SQLite users never need it. Every wait is bounded by busy_timeout: connecting, a lock, a
    statement, a silent network (keepalives, tcp_user_timeout) and a peer that answers TCP but nothing else
    (Deadlines cuts it). It keeps no summaries: with several collectors its ids commit out of order, so "every id up
    to n is summarised" could skip one; its reports summarise the events they read ("Summaries")."""

    kind = "PostgreSQL"

    def __init__(self, config):
        super().__init__(config)
        try:
            import psycopg
        except ImportError:
            raise ConfigError(f"{config.sources['database']}: a postgresql:// database needs the psycopg 3 driver: "
                              'python3 -m pip install "psycopg[binary]"') from None
        self.psycopg = psycopg
        self.dialect = POSTGRESQL
        self.errors = (psycopg.Error,)
        self._told = None  # the last health problem logged, so a polling balancer logs it once

    def _open(self, seconds, statements=True, schema=False):
        """A connection whose waits end after `seconds`; `statements`: a statement's too (not for export, whose
        one query may rightly take long); `schema`: with the table and its indexes made if missing."""
        whole = max(2, math.ceil(seconds))  # libpq counts whole seconds, and at least 2
        # autocommit: every transaction is an explicit BEGIN, so none is ever left open by a stray statement
        # (and rolled back, unseen, when it closes). The URL's own application_name, if any, wins.
        connection = self.psycopg.connect(self.config.database, autocommit=True, connect_timeout=whole, keepalives=1,
                                          keepalives_idle=max(1, whole // 2), keepalives_interval=1, keepalives_count=3,
                                          tcp_user_timeout=whole * 1000, fallback_application_name="pycolytics")
        try:
            locks = int(seconds * 1000)
            # a second more for a statement, so that a lock wait fails as one (and says so)
            statement = str(locks + 1000) if statements else "0"
            synchronous = POSTGRES_SYNCHRONOUS_COMMIT.get(self.config.synchronous, "on")
            with self._watched(connection, seconds):
                connection.execute(POSTGRES_SESSION, (str(locks), statement, synchronous))
                if schema and not connection.execute(POSTGRES_SCHEMA_READY).fetchone()[0]:
                    self._create_schema(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _watched(self, connection, seconds=None):
        return self.deadlines.after((seconds or self.config.busy_timeout) + POSTGRES_GRACE,
                                    functools.partial(_cut, connection))

    def connect(self):
        return self._open(self.config.busy_timeout, schema=True)

    def _create_schema(self, connection):
        for attempt in range(3):  # collectors starting together may race to create it
            try:
                with connection.transaction():
                    for statement in POSTGRES_SCHEMA:
                        connection.execute(statement)
                return
            except (self.psycopg.errors.UniqueViolation, self.psycopg.errors.DuplicateTable):
                if attempt == 2:
                    raise

    def insert(self, connection, rows):
        """Insert `rows` in one transaction; return how many were new (not an event_id already
        stored). LostBeforeCommit: the connection was gone before COMMIT was sent."""
        committing = False
        group = _compact_json(rows)
        with self._watched(connection) as watch:
            try:
                with connection.cursor() as cursor:
                    cursor.execute("BEGIN")
                    if len(group) <= MAX_JSON_GROUP_CHARS:
                        cursor.execute(POSTGRES_INSERT_GROUP, (group,))
                    else:
                        cursor.executemany(POSTGRES_INSERT, rows)
                    inserted = max(0, cursor.rowcount)
                    committing = True
                    # statement_timeout never covers a COMMIT (the server disables it): the deadline bounds it
                    cursor.execute(POSTGRES_COMMIT)
            except self.psycopg.Error as error:
                if committing or watch[2]:
                    raise  # the commit's outcome is unknown, or the database hung: 503
                if connection.broken:
                    raise LostBeforeCommit(f"the database connection was lost before the commit: {error}") from error
                with contextlib.suppress(self.psycopg.Error):  # the next BEGIN says if the connection is broken
                    connection.execute("ROLLBACK")
                raise
        return inserted

    def prune(self, connection, before, limit=PRUNE_STEP_ROWS):
        with self._watched(connection), connection.transaction():
            return connection.execute("DELETE FROM event WHERE id IN"
                                      " (SELECT id FROM event WHERE time < %s::timestamptz ORDER BY id LIMIT %s)",
                                      (before, limit)).rowcount, 0

    def interrupt(self, connection):
        _cut(connection)

    def lost(self, error):
        return isinstance(error, (self.psycopg.OperationalError, self.psycopg.InterfaceError))

    def read(self, seconds=None):
        """A connection for reading; with `seconds`, each statement is bounded by it (a report's). Its
        numerics (sums of integers) come as int, or float, as SQLite gives them, not as Decimal."""
        connection = self._open(seconds or self.config.busy_timeout, statements=seconds is not None)

        class Number(self.psycopg.adapt.Loader):
            def load(self, data):
                text = bytes(data).decode()
                return int(text) if text.lstrip("-").isdigit() else float(text)

        connection.adapters.register_loader("numeric", Number)
        return connection

    def columns(self, connection):
        return {row[0] for row in connection.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'event'"
            " AND table_schema = current_schema()")}

    def problem(self):
        """In general words (the driver's details, which name hosts and databases, go to the log). It takes the lock
        an insert takes, so a table locked by a migration shows."""
        try:
            connection = self._open(HEALTH_TIMEOUT)
            with contextlib.closing(connection), self._watched(connection, HEALTH_TIMEOUT):
                self.probe(connection)
        except self.psycopg.Error as error:
            problem = self.describe(error)
            detail = str(error).strip() or type(error).__name__
            if detail != self._told:
                log.warning("health check: %s: %s", problem, detail)
                self._told = detail
            return problem
        self._told = None
        return None

    def probe(self, connection):
        with connection.transaction():
            connection.execute("LOCK TABLE event IN ROW EXCLUSIVE MODE")  # the lock an insert takes

    def rows(self, connection, query, parameters):
        """Through a server-side cursor, in a read-only transaction of its own: PostgreSQL streams them."""
        with connection.transaction():
            connection.execute("SET TRANSACTION READ ONLY")
            with connection.cursor("export") as cursor:
                yield from cursor.execute(query, parameters)

    def describe(self, error):
        """In general words: the driver's own text names hosts, ports, users and databases, and belongs in the log."""
        errors = self.psycopg.errors
        if isinstance(error, errors.LockNotAvailable):
            return "the event table is locked by another session"
        if isinstance(error, errors.QueryCanceled):
            return "the database did not answer in time"
        if isinstance(error, (errors.ReadOnlySqlTransaction, errors.UndefinedTable)):
            return "the database does not take events (read-only, or no event table)"
        if isinstance(error, self.psycopg.IntegrityError):
            return "the database refused the events as a conflict (the log says which)"
        if isinstance(error, (self.psycopg.OperationalError, self.psycopg.InterfaceError, ConnectionError)):
            return "the database cannot be reached"
        return "the database refused the request (the log says why)"


def store_for(config):
    """The storage `config.database` names: postgresql://... or an SQLite file."""
    if config.database.startswith(("postgresql://", "postgres://")):
        return PostgresStore(config)
    return SQLiteStore(config)


###############################################################################
# Summaries: what reports read instead of every event
###############################################################################

# A report of a year would read every event of it (minutes on a Raspberry Pi, memory that grows with the players),
# so reports count players in SQL over summaries: tables of one row per player and what they did, made from the
# events in small steps (docs/reports.md describes each). Days are numbers (days since 1970-01-01, UTC), times
# microseconds. Every row but pycolytics_names' belongs to one player, so erasing a player deletes rows.
# On SQLite the writer keeps them between commits, for the events after pycolytics_summary's last_id (in id order:
# a late event counts like any other). Filtered reports, PostgreSQL (whose ids several collectors commit out of
# order) and summaries far behind summarise the events they read into temporary tables of the same names.
SUMMARY_VERSION = 3
SUMMARY_TABLES = (
    ("pycolytics_users", "application TEXT, user_id TEXT, first_day INT, last_day INT", "application, user_id"),
    ("pycolytics_user_days", "application TEXT, user_id TEXT, day INT, version TEXT, platform TEXT",
     "application, user_id, day, version, platform"),
    ("pycolytics_sessions", "application TEXT, user_id TEXT, session_id TEXT, day INT, first_us INT, last_us INT",
     "application, user_id, session_id, day"),
    ("pycolytics_type_users", "application TEXT, user_id TEXT, event_type TEXT, last_day INT",
     "application, user_id, event_type"),
    ("pycolytics_levels", "application TEXT, user_id TEXT, level TEXT, day INT, starts INT, completes INT, fails INT,"
                          " first_start_us INT NULL, first_complete_us INT NULL", "application, user_id, level, day"),
    ("pycolytics_purchases", "application TEXT, user_id TEXT, us INT, event INT, day INT, currency TEXT, item TEXT,"
                             " price REAL", "application, user_id, us, event"),
    ("pycolytics_names", "day INT, application TEXT, field TEXT, name TEXT, events INT",
     "day, application, field, name"),
)
SUMMARY_KEYS = {name: key for name, _, key in SUMMARY_TABLES}
# The tables of summaries that earlier Pycolytics kept: dropped when the database is opened.
OLD_SUMMARY_TABLES = ("pycolytics_summarised", "pycolytics_days", "pycolytics_sessions", "pycolytics_presence",
                      "pycolytics_spans", "pycolytics_name_events")
# The events of one step, with what the game-analytics conventions read from their values.
STEP_COLUMNS = ("id INT, application TEXT, user_id TEXT, session_id TEXT, event_type TEXT, version TEXT,"
                " platform TEXT, day INT NULL, us INT NULL, kind TEXT NULL, level TEXT NULL, price REAL NULL,"
                " currency TEXT, item TEXT")
# Which kind of event each event_type is, per application ("" for those without a section).
CONVENTION_KINDS = (("start", "level_start_event"), ("complete", "level_complete_event"),
                    ("fail", "level_fail_event"), ("purchase", "purchase_event"))
EPOCH_DAY = datetime.date(1970, 1, 1)


class Dialect(collections.namedtuple("Dialect", "mark time day microseconds least greatest number text label integer"
                                                " real table_options time_text value_text")):
    """What the SQL of the two backends says differently. Fields with {0}, {1} are templates of
    expressions; `mark` is a query parameter, `time` one compared with a stored time."""

    __slots__ = ()

    def sql(self, text):
        """`text` with ? as this dialect's parameter marks."""
        return text if self.mark == "?" else text.replace("?", self.mark)


_SQLITE_PATH = "'$.\"' || {1} || '\"'"  # a key of `value` as a JSON path; keys hold no quotes (_field_name)
SQLITE = Dialect(
    mark="?", time="?",
    day="CAST(strftime('%s', substr({0}, 1, 10)) AS INTEGER) / 86400",
    microseconds="CAST(strftime('%s', substr({0}, 1, 19)) AS INTEGER) * 1000000 + CAST(substr({0}, 21, 6) AS INTEGER)",
    least="min(coalesce({0}, {1}), coalesce({1}, {0}))", greatest="max(coalesce({0}, {1}), coalesce({1}, {0}))",
    number=f"CASE WHEN json_type({{0}}, {_SQLITE_PATH}) IN ('integer', 'real')"
           f" THEN json_extract({{0}}, {_SQLITE_PATH}) END",
    text=f"CASE WHEN json_type({{0}}, {_SQLITE_PATH}) = 'text' THEN json_extract({{0}}, {_SQLITE_PATH}) END",
    label=f"CASE WHEN json_type({{0}}, {_SQLITE_PATH}) IN ('integer', 'real', 'text')"
          f" THEN CAST(json_extract({{0}}, {_SQLITE_PATH}) AS TEXT) END",
    integer="INTEGER", real="REAL", table_options=" WITHOUT ROWID", time_text="{0}", value_text="value")
POSTGRESQL = Dialect(
    mark="%s", time="%s::timestamptz",
    day="((({0}) AT TIME ZONE 'UTC')::date - DATE '1970-01-01')",
    microseconds="CAST(EXTRACT(EPOCH FROM {0}) * 1000000 AS BIGINT)",
    least="LEAST({0}, {1})", greatest="GREATEST({0}, {1})",
    number="CASE WHEN jsonb_typeof({0} -> {1}) = 'number' THEN ({0} ->> {1})::float8 END",
    text="CASE WHEN jsonb_typeof({0} -> {1}) = 'string' THEN {0} ->> {1} END",
    label="CASE WHEN jsonb_typeof({0} -> {1}) IN ('number', 'string') THEN {0} ->> {1} END",
    integer="BIGINT", real="DOUBLE PRECISION", table_options="",
    time_text="to_char({0} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')", value_text="value::text")


def _day_number(day):
    return (day - EPOCH_DAY).days


def _day(number):
    return EPOCH_DAY + datetime.timedelta(days=number)


def _typed(dialect, columns):
    """Column definitions ("name TYPE[ NULL], ...") in the dialect's types, NOT NULL unless NULL."""
    return ", ".join(column.replace(" INT", " " + dialect.integer).replace(" REAL", " " + dialect.real)
                     + ("" if column.endswith("NULL") else " NOT NULL") for column in columns.split(", "))


def _create_tables(connection, dialect, temporary=False):
    """The summary tables, or temporary ones of the same names (which then hide the others)."""
    kind = "TEMP TABLE" if temporary else "TABLE"
    for name, columns, key in SUMMARY_TABLES:
        connection.execute(f"CREATE {kind} IF NOT EXISTS {name} ({_typed(dialect, columns)}, PRIMARY KEY ({key}))"
                           f"{dialect.table_options}")
    if not temporary:
        connection.execute("CREATE INDEX IF NOT EXISTS ix_pycolytics_users_first_day ON pycolytics_users (first_day)")


def ensure_summaries(connection, dialect):
    """Give an SQLite database its summary tables; rebuild them if some are missing or are an
    earlier Pycolytics' (dropping tables by hand must not leave reports silently wrong)."""
    present = {name for name, in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    ours = {name for name, _, _ in SUMMARY_TABLES} | {"pycolytics_summary"}
    state = "pycolytics_summary" in present and connection.execute("SELECT version FROM pycolytics_summary").fetchone()
    if ours <= present and state == (SUMMARY_VERSION,):
        return
    stale = (present & ours) | (present & set(OLD_SUMMARY_TABLES))
    with transaction(connection):
        if stale:
            log.warning("the summaries for reports are incomplete or an older version's (%d of %d tables): "
                        "building them again from the events", len(present & ours), len(ours))
        for name in stale:
            connection.execute(f"DROP TABLE {name}")
        _create_tables(connection, dialect)
        connection.execute("CREATE TABLE pycolytics_summary (version INTEGER NOT NULL, last_id INTEGER NOT NULL,"
                           " last_time TEXT, conventions TEXT)")
        connection.execute("INSERT INTO pycolytics_summary VALUES (?, 0, NULL, NULL)", (SUMMARY_VERSION,))


def conventions(config):
    """Each application's conventions as rows (application, kind, event_type, level, price,
    currency, item field), "" for the applications without a section of their own."""
    rows = []
    for application in (None, *sorted(config.apps)):
        fields = [config.for_app(application, name) for name in ("level_field", "price_field", "currency_field",
                                                                 "item_field")]
        rows += [(application or "", kind, config.for_app(application, name), *fields)
                 for kind, name in CONVENTION_KINDS]
    return rows


def _use_conventions(connection, dialect, config):
    """Fill the connection's temporary table of conventions; their text, to keep with the summaries."""
    rows = conventions(config)
    text = json.dumps(rows)
    if getattr(connection, "conventions", None) != text:
        connection.execute("CREATE TEMP TABLE IF NOT EXISTS pycolytics_conventions (application TEXT, kind TEXT,"
                           " event_type TEXT, level_field TEXT, price_field TEXT, currency_field TEXT,"
                           " item_field TEXT)")
        connection.execute("DELETE FROM pycolytics_conventions")
        for row in rows:
            connection.execute(dialect.sql("INSERT INTO pycolytics_conventions VALUES (?, ?, ?, ?, ?, ?, ?)"), row)
        with contextlib.suppress(AttributeError):  # psycopg's connections take no attributes
            connection.conventions = text
    return text


def _fill_step(connection, dialect, where, parameters):
    """The events `where` picks (a condition on `event AS e`) into the temporary table pycolytics_step."""
    connection.execute(f"CREATE TEMP TABLE IF NOT EXISTS pycolytics_step ({_typed(dialect, STEP_COLUMNS)})")
    connection.execute("DELETE FROM pycolytics_step")
    value = "e.value"
    connection.execute(dialect.sql(
        f"INSERT INTO pycolytics_step SELECT e.id, e.application, e.user_id, e.session_id, e.event_type, e.version,"
        f" e.platform, {dialect.day.format('e.time')}, {dialect.microseconds.format('e.time')}, c.kind,"
        f" {dialect.label.format(value, 'c.level_field')}, {dialect.number.format(value, 'c.price_field')},"
        f" coalesce({dialect.text.format(value, 'c.currency_field')}, ''),"
        f" coalesce({dialect.text.format(value, 'c.item_field')}, '')"
        f" FROM event AS e LEFT JOIN pycolytics_conventions AS c ON c.event_type = e.event_type"
        f" AND c.application = CASE WHEN EXISTS (SELECT 1 FROM pycolytics_conventions AS n"
        f" WHERE n.application = e.application) THEN e.application ELSE '' END WHERE {where}"), parameters)


def _add_step(connection, dialect):
    """Add the events of pycolytics_step to the summaries (or to the temporary tables hiding them)."""
    least, greatest, add = dialect.least, dialect.greatest, "{0} + {1}"

    def merge(table, select, where="", grouped=None, **merged):
        """Insert the rows `select` makes of the step's events, grouped by the table's key if some columns are
        `merged` into a row already there: each by its template of (the value there, the new one)."""
        key = SUMMARY_KEYS[table]
        sets = ", ".join(f"{name} = " + how.format(f"{table}.{name}", f"excluded.{name}")
                         for name, how in merged.items())
        group = f" GROUP BY {grouped or key}" if merged else ""
        connection.execute(f"INSERT INTO {table} SELECT {select} FROM pycolytics_step WHERE day IS NOT NULL{where}"
                           f"{group} ON CONFLICT " + (f"({key}) DO UPDATE SET {sets}" if merged else "DO NOTHING"))

    merge("pycolytics_users", "application, user_id, min(day), max(day)", first_day=least, last_day=greatest)
    merge("pycolytics_user_days", "DISTINCT application, user_id, day, version, platform")
    merge("pycolytics_sessions", "application, user_id, session_id, day, min(us), max(us)",
          first_us=least, last_us=greatest)
    merge("pycolytics_type_users", "application, user_id, event_type, max(day)", last_day=greatest)
    merge("pycolytics_levels", "application, user_id, level, day, sum(CASE WHEN kind = 'start' THEN 1 ELSE 0 END),"
          " sum(CASE WHEN kind = 'complete' THEN 1 ELSE 0 END), sum(CASE WHEN kind = 'fail' THEN 1 ELSE 0 END),"
          " min(CASE WHEN kind = 'start' THEN us END), min(CASE WHEN kind = 'complete' THEN us END)",
          " AND kind IN ('start', 'complete', 'fail') AND level IS NOT NULL",
          starts=add, completes=add, fails=add, first_start_us=least, first_complete_us=least)
    merge("pycolytics_purchases", "application, user_id, us, id, day, currency, item, price",
          " AND kind = 'purchase' AND price IS NOT NULL")
    for field in RANKED:
        merge("pycolytics_names", f"day, application, '{field}', {field}, count(*)",
              grouped=f"day, application, {field}", events=add)


class SummaryPostponed(Exception):
    """Another connection holds the write lock: the summarising step waits for the next pause."""


def summarise(connection, dialect, limit, config):
    """One step of keeping an SQLite database's summaries, in the caller's transaction: up to `limit` events after the
    last summarised, or of the old rows deleted while they are made again. (events read or rows deleted, last id)."""
    made_with = _use_conventions(connection, dialect, config)
    last_id, last_time, kept_with = connection.execute(
        "SELECT last_id, last_time, conventions FROM pycolytics_summary").fetchone()
    if last_id > 0 and kept_with != made_with:
        log.info("the game-analytics conventions (purchase_event, level_field, ...) changed: summarising every "
                 "event again; reports read the events meanwhile")
        last_id = restart_summaries(connection)
    elif last_id > 0 and connection.execute("SELECT time FROM event WHERE id = ?",
                                            (last_id,)).fetchone() != (last_time,):
        log.info("the last summarised event was deleted: summarising every event again")
        last_id = restart_summaries(connection)
    if last_id < 0:  # being made again: first the old rows go, in steps
        cleared = sum(_delete_some(connection, name, "1 = 1", (), limit) for name, _, _ in SUMMARY_TABLES)
        if cleared:
            return cleared, -1
        connection.execute("UPDATE pycolytics_summary SET last_id = 0, last_time = NULL")
        last_id = 0
    _fill_step(connection, dialect, "e.id IN (SELECT id FROM event WHERE id > ? ORDER BY id LIMIT ?)", (last_id, limit))
    read, top = connection.execute("SELECT count(*), max(id) FROM pycolytics_step").fetchone()
    if not read:
        connection.execute("UPDATE pycolytics_summary SET conventions = ?", (made_with,))
        return 0, last_id
    _add_step(connection, dialect)
    top_time, = connection.execute("SELECT time FROM event WHERE id = ?", (top,)).fetchone()
    connection.execute("UPDATE pycolytics_summary SET last_id = ?, last_time = ?, conventions = ?",
                       (top, top_time, made_with))
    return read, top


def restart_summaries(connection):
    """Have the summaries made again from the first event, in steps (the caller's transaction)."""
    connection.execute("UPDATE pycolytics_summary SET last_id = -1, last_time = NULL")
    return -1


def summarised_up_to(connection):
    """The last event id the summaries hold (-1 while they are being made again)."""
    return connection.execute("SELECT last_id FROM pycolytics_summary").fetchone()[0]


def _delete_some(connection, table, condition, parameters, limit):
    """Delete up to `limit` rows of `table` that meet `condition`; how many."""
    key = SUMMARY_KEYS[table]
    return connection.execute(f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} WHERE {condition}"
                              " LIMIT ?)", (*parameters, limit)).rowcount


def forget_before(connection, dialect, before, limit):
    """One step of taking the events pruned before `before` out of the summaries (the caller's transaction); how many
    rows changed. Whole days (retention_days) go row by row; a moment within a day has them made again."""
    if not before.endswith(" 00:00:00.000000"):
        if summarised_up_to(connection) > 0:
            restart_summaries(connection)
        return 0
    day = _day_number(datetime.date.fromisoformat(before[:10]))
    changed = 0
    for table, condition in (("pycolytics_names", "day < ?"), ("pycolytics_user_days", "day < ?"),
                             ("pycolytics_sessions", "day < ?"), ("pycolytics_levels", "day < ?"),
                             ("pycolytics_purchases", "day < ?"), ("pycolytics_type_users", "last_day < ?"),
                             ("pycolytics_users", "last_day < ?")):
        changed += _delete_some(connection, table, condition, (day,), limit - changed)
        if changed >= limit:
            return changed
    moved = connection.execute("SELECT application, user_id FROM pycolytics_users WHERE first_day < ? LIMIT ?",
                               (day, limit - changed)).fetchall()
    for player in moved:  # the first day left: they have one, or their last day went too
        connection.execute("UPDATE pycolytics_users SET first_day = (SELECT min(day) FROM pycolytics_user_days"
                           " WHERE application = ? AND user_id = ?) WHERE application = ? AND user_id = ?", player * 2)
    return changed + len(moved)


def summarise_events(connection, dialect, config, query):
    """Summaries of the events a report reads, in temporary tables that hide the kept ones: every event up to the end
    of the report's last day that its filters but the application pick."""
    _create_tables(connection, dialect, temporary=True)
    for name, _, _ in SUMMARY_TABLES:
        connection.execute(f"DELETE FROM {name}")  # on SQLite, the temporary one
    _use_conventions(connection, dialect, config)
    filters, values = _filters(query, "e.")  # not the application: the report's Reader chooses it (and lists others)
    end = (query.until + datetime.timedelta(days=1)).isoformat()
    _fill_step(connection, dialect, f"e.time < {dialect.time}{filters}", [end, *values])
    _add_step(connection, dialect)


###############################################################################
# Reports: the figures of the report API and the dashboard
###############################################################################

DASHBOARD_DAYS = 30  # the days up to today the dashboard and the report show when none are asked for
MAX_REPORT_DAYS = 366  # the longest range one report reads: a year, leap day included
# The days a report may name: stored times start at the Unix epoch, and the last day leaves room
# for the day after `until`, the range's end.
FIRST_REPORT_DAY = EPOCH_DAY
LAST_REPORT_DAY = datetime.date(9999, 12, 30)
REPORT_TOP = 20  # rows of a ranking before "(other)": a million versions must not become a million rows of HTML
RETENTION_DAYS = (1, 2, 3, 4, 5, 6, 7, 14, 30)  # the days after a player's first that retention looks at
# Weekly cohorts smaller than this are folded into the next (the last into the one before), unless
# the query says min_cohort: a share of three players says nothing.
MIN_COHORT = 10
CHURN_DAYS = 7  # a player without an event in this many days up to the range's end has stopped (churn_days)
# Levels a progression lists at most, and bins of a histogram at most; a numeric field with at most
# FEW_VALUES distinct values is also given value by value (levels 1 to 40).
MAX_LEVELS = 200
HISTOGRAM_BINS = 20
FEW_VALUES = 40
MAX_FUNNEL_STEPS = 10
MAX_QUERY_FIELDS = 40  # query fields parsed at most: a report has a dozen; more is not a dashboard talking
# A report first has the writer summarise what came since the summaries were last made, if that is
# at most CATCH_UP_EVENTS events and takes at most CATCH_UP_SECONDS; otherwise (the summaries are
# being made, of an imported database say) it summarises the events it reads itself.
CATCH_UP_EVENTS = 100_000
CATCH_UP_SECONDS = 2.0
# Session lengths drawn as bars on the dashboard: (upper bound in seconds, label).
SESSION_BUCKETS = ((60, "< 1 min"), (300, "1-5 min"), (900, "5-15 min"), (1800, "15-30 min"),
                   (3600, "30-60 min"), (7200, "1-2 h"), (math.inf, "2 h +"))
# The days (since a player's first) of their first purchase, as the revenue view groups them.
FIRST_PURCHASE_DAYS = ((0, "day 0"), (1, "day 1"), (7, "days 2-7"), (30, "days 8-30"), (math.inf, "after day 30"))
DAY_COLUMNS = ("events", "users", "new_users", "sessions")  # a report's days' columns, as its JSON and CSV order them
RANKED = ("event_type", "version", "platform")  # the fields a report ranks: its lists are named after them, with an s
# A report with filters is the report of a database that held only the events that match them.
REPORT_FILTERS = ("application", "event_type", "version", "platform")
REPORT_VIEWS = ("", "/funnel", "/values", "/retention", "/revenue", "/progression", "/stickiness", "/versions")

ReportQuery = collections.namedtuple("ReportQuery", ("since", "until") + REPORT_FILTERS)


def _query_fields(query, longest):
    """{name: last value} and {name: every value} of a query string; 400 for one no dashboard sends."""
    from urllib.parse import parse_qs  # here: only the reports read a query string
    try:
        every = parse_qs(query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise HTTPError(400, f"a report takes at most {MAX_QUERY_FIELDS} query fields") from None
    for name, values in every.items():
        for value in values:
            if len(value) > longest or "\x00" in value:
                raise HTTPError(400, f"{name[:40]!r} must be at most {longest} characters, without NUL")
    return {name: values[-1] for name, values in every.items()}, every


def _report_day(fields, name, default):
    text = fields.get(name)
    if not text:
        return default
    try:
        day = datetime.date.fromisoformat(text)
    except ValueError:
        raise HTTPError(400, f"{name} must be a date like 2024-05-01, not {text[:40]!r}") from None
    if not FIRST_REPORT_DAY <= day <= LAST_REPORT_DAY:
        raise HTTPError(400, f"{name} must be a day from {FIRST_REPORT_DAY} to {LAST_REPORT_DAY}")
    return day


def report_query(fields, today):
    """The ReportQuery of the fields of a query string; a 400 names what is wrong."""
    until = _report_day(fields, "until", min(today, LAST_REPORT_DAY))
    since = _report_day(fields, "since", max(FIRST_REPORT_DAY, until - datetime.timedelta(days=DASHBOARD_DAYS - 1)))
    if since > until:
        raise HTTPError(400, f"since ({since}) must not be after until ({until})")
    if (until - since).days + 1 > MAX_REPORT_DAYS:
        raise HTTPError(400, f"a report covers at most {MAX_REPORT_DAYS} days; since {since} to until {until} "
                             f"is {(until - since).days + 1}")
    return ReportQuery(since, until, *(fields.get(name) or None for name in REPORT_FILTERS))


def _whole(fields, name, default, highest):
    text = fields.get(name) or str(default)
    if not text.isdigit() or not 1 <= int(text) <= highest:
        raise HTTPError(400, f"{name} must be a whole number from 1 to {highest}, not {text[:40]!r}")
    return int(text)


def _funnel_steps(fields, every):
    """The steps of a funnel: `steps=a,b,c`, or the dashboard's `step` fields when that is empty."""
    steps = [step.strip() for step in (fields.get("steps") or "").split(",") if step.strip()]
    steps = steps or [step for step in every.get("step", ()) if step]
    if not steps:
        raise HTTPError(400, "a funnel needs steps: event types separated by commas, like "
                             "steps=tutorial_start,tutorial_end")
    if len(steps) > MAX_FUNNEL_STEPS:
        raise HTTPError(400, f"a funnel has at most {MAX_FUNNEL_STEPS} steps, not {len(steps)}")
    return tuple(steps)


def _value_field(fields):
    field = fields.get("field")
    if not field or any(character in field for character in '"\\') or not field.isprintable():
        raise HTTPError(400, "field must name a key of the events' value, like field=level "
                             "(no quotes or backslashes)")
    return field


def _today():
    return datetime.datetime.now(datetime.timezone.utc).date()


def _seconds(microseconds):
    """A length as the reports give it: seconds, to the millisecond (0, not 0.0)."""
    return round(microseconds / 1_000_000, 3) or 0


def _shorter_than(seconds):
    """The microseconds below which a length is given (by _seconds) as under `seconds`."""
    near = round(seconds * 1_000_000) - 500
    return next(length for length in range(near - 2, near + 3) if _seconds(length) >= seconds)


def _share(part, whole):
    return round(part / whole, 4) if whole else None


def _level_order(level):
    """The key that sorts levels as a game numbers them: numbers by value first, then names."""
    try:
        return 0, float(level), ""
    except ValueError:
        return 1, 0.0, level


def _filters(query, prefix=""):
    """The conditions of a query's filters but the application's, on `event`, and their values."""
    chosen = [name for name in RANKED if getattr(query, name) is not None]
    return "".join(f" AND {prefix}{name} = ?" for name in chosen), [getattr(query, name) for name in chosen]


class Reader:
    """The SQL of one report over the summaries (or the temporary tables that hide them), its days as numbers. Every
    count is SQL's; what comes back to Python is a few rows per day, per name or per level, never per player."""

    def __init__(self, connection, dialect, query, today):
        self.connection, self.dialect, self.query, self.today = connection, dialect, query, today
        self.first, self.last = _day_number(query.since), _day_number(query.until)
        self.observed = _day_number(min(query.until, today))  # the last day whose returns are known
        self.days = [query.since + datetime.timedelta(days=n) for n in range(self.last - self.first + 1)]
        self.app, self.app_value = ("", []) if query.application is None else (" AND application = ?",
                                                                               [query.application])
        self.range = {"since": query.since.isoformat(), "until": query.until.isoformat(),
                      "application": query.application}  # what every view's answer starts with

    def _sql(self, sql, parameters):
        """`sql` with each {app} (or {app:alias}) the application's condition, and its parameters:
        an {app} comes after every other parameter of the statement."""
        found = re.findall(r"\{app(?::\w+)?\}", sql)
        sql = re.sub(r"\{app:(\w+)\}", self.app.replace("application", r"\1.application"), sql)
        return self.dialect.sql(sql.replace("{app}", self.app)), list(parameters) + self.app_value * len(found)

    def events(self):
        """The condition on `event` of the range's events that the filters pick (but for {app}), and its values."""
        filters, values = _filters(self.query)
        time, since, end = self.dialect.time, self.query.since, self.query.until + datetime.timedelta(days=1)
        return f"time >= {time} AND time < {time}{filters}", [since.isoformat(), end.isoformat(), *values]

    def rows(self, sql, *parameters):
        return self.connection.execute(*self._sql(sql, parameters)).fetchall()

    def one(self, sql, *parameters):
        return self.rows(sql, *parameters)[0][0]

    def players(self, table, by=None, where=None, *parameters, distinct="DISTINCT"):
        """How many players `table` holds on the range's days (or where `where`), or {value(s) of `by`: how many};
        distinct="" for a table that has one row per player (and `by`) already, which saves a sort."""
        if where is None:
            where, parameters = "day BETWEEN ? AND ?", (self.first, self.last)
        if by is None:
            return self.one(f"SELECT count(*) FROM (SELECT {distinct} application, user_id FROM {table}"
                            f" WHERE {where}{{app}}) AS p", *parameters)
        rows = self.rows(f"SELECT {by}, count(*) FROM (SELECT {distinct} application, user_id, {by} FROM {table}"
                         f" WHERE {where}{{app}}) AS p GROUP BY {by}", *parameters)
        return {row[0] if len(row) == 2 else tuple(row[:-1]): row[-1] for row in rows}

    def rank(self, table, column, count, share):
        """The nearest-rank `share` (0.5: the median) of `column` over the `count` rows of `table`."""
        offset = max(1, math.ceil(share * count)) - 1
        return self.one(f"SELECT {column} FROM {table} ORDER BY {column} LIMIT 1 OFFSET ?", offset)

    def newcomers(self):
        """{day: players whose first day it is} of the range."""
        return dict(self.rows("SELECT first_day, count(*) FROM pycolytics_users WHERE first_day BETWEEN ? AND ?{app}"
                              " GROUP BY first_day", self.first, self.last))

    def temporary(self, name, select, *parameters):
        """A temporary table `name` filled by `select` (on disk on SQLite, in work_mem on PostgreSQL)."""
        self.connection.execute(f"DROP TABLE IF EXISTS {name}")
        self.connection.execute(*self._sql(f"CREATE TEMP TABLE {name} AS {select}", parameters))


def _daily(reader):
    """The per-day columns of a report (DAY_COLUMNS)."""
    first, last = reader.first, reader.last
    events = reader.rows("SELECT day, sum(events) FROM pycolytics_names WHERE field = 'platform'"
                         " AND day BETWEEN ? AND ?{app} GROUP BY day", first, last)
    sessions = reader.rows("SELECT day, count(*) FROM (SELECT DISTINCT application, session_id, day FROM"
                           " pycolytics_sessions WHERE day BETWEEN ? AND ?{app}) AS s GROUP BY day", first, last)
    found = (dict(events), reader.players("pycolytics_user_days", "day"), reader.newcomers(), dict(sessions))
    return {name: [figures.get(day, 0) or 0 for day in range(first, last + 1)]
            for name, figures in zip(DAY_COLUMNS, found)}


def _returns(reader):
    """{(first day, days after): players back that day} for the players who first came in the range."""
    days = ", ".join(str(after) for after in RETENTION_DAYS)
    return {(first, after): count for first, after, count in reader.rows(
        "SELECT first_day, after, count(*) FROM (SELECT DISTINCT u.application, u.user_id, u.first_day,"
        " r.day - u.first_day AS after FROM pycolytics_users AS u JOIN pycolytics_user_days AS r"
        " ON r.application = u.application AND r.user_id = u.user_id AND r.day > u.first_day"
        f" AND r.day <= u.first_day + {RETENTION_DAYS[-1]} WHERE u.first_day BETWEEN ? AND ? AND r.day <= ?{{app:u}})"
        f" AS returned WHERE after IN ({days}) GROUP BY first_day, after", reader.first, reader.last, reader.observed)}


def _retention_rows(reader, cohorts, returns):
    """Per cohort of first days [(first, last day number)]: its players and the share back on each day."""
    sizes = reader.newcomers()
    rows = []
    for first, last in cohorts:
        players = sum(sizes.get(day, 0) for day in range(first, last + 1))
        row = {"cohort": _day(first).isoformat(), "users": players}
        for after in RETENTION_DAYS:
            seen = [day for day in range(first, last + 1) if day + after <= reader.observed]
            row[f"day_{after}"] = _share(sum(returns.get((day, after), 0) for day in seen),
                                         sum(sizes.get(day, 0) for day in seen)) if seen else None
        rows.append(row)
    return rows


def _sessions(reader):
    """Count, nearest-rank median and 90th percentile of the range's sessions' lengths, sessions per
    player, and how many fall in each of SESSION_BUCKETS; lengths sorted by SQL in a temporary table."""
    reader.temporary("pycolytics_lengths", "SELECT max(last_us) - min(first_us) AS length FROM pycolytics_sessions"
                                           " WHERE day BETWEEN ? AND ?{app} GROUP BY application, session_id",
                     reader.first, reader.last)
    count = reader.one("SELECT count(*) FROM pycolytics_lengths")
    ranks = [max(1, math.ceil(share * count)) for share in (0.5, 0.9)]
    at = dict(reader.rows("SELECT n, length FROM (SELECT length, row_number() OVER (ORDER BY length) AS n"
                          " FROM pycolytics_lengths) AS ranked WHERE n IN (?, ?)", *ranks)) if count else {}
    bounds = [_shorter_than(bound) for bound, _ in SESSION_BUCKETS[:-1]]
    sums = ", ".join(f"sum(CASE WHEN length < {bound} THEN 1 ELSE 0 END)" for bound in bounds)
    shorter = reader.rows(f"SELECT {sums} FROM pycolytics_lengths")[0] if count else [0] * len(bounds)
    cumulative = [0] + [n or 0 for n in shorter] + [count]
    median, p90 = (_seconds(at[rank]) if count else 0 for rank in ranks)
    return {"count": count, "median_seconds": median, "p90_seconds": p90}, [
        cumulative[n + 1] - cumulative[n] for n in range(len(SESSION_BUCKETS))]


def _top(counts, total_events, other_users=None):
    """The REPORT_TOP largest of (name, events, users) rows sorted by events, then "(other)" for the rest."""
    rows = [{"name": name, "events": events, "users": users} for name, events, users in counts[:REPORT_TOP]]
    if len(counts) > REPORT_TOP:
        rest = {"name": "(other)", "events": total_events - sum(row["events"] for row in rows)}
        if other_users is not None:
            rest["users"] = other_users
        rows.append(rest)
    return rows


def _ranking(reader, field, newest):
    """The top names of `field` by events, with their players, and "(other)" for the rest."""
    events = reader.rows("SELECT name, sum(events) FROM pycolytics_names WHERE field = ? AND day BETWEEN ? AND ?{app}"
                         " GROUP BY name", field, reader.first, reader.last)
    events.sort(key=lambda row: (-row[1], row[0].encode("utf-8", "surrogatepass")))
    top = [name for name, _ in events[:REPORT_TOP]]
    if not top:
        return []
    marks = ", ".join("?" * len(top))
    if field != "event_type":
        table, where, parameters = "pycolytics_user_days", "day BETWEEN ? AND ?", [reader.first, reader.last]
    elif reader.last >= newest:  # no day after the range: a last day in it or later means a day in it
        table, where, parameters = "pycolytics_type_users", "last_day >= ?", [reader.first]
    else:
        table, (where, parameters) = "event", reader.events()
    users = reader.players(table, field, f"{where} AND {field} IN ({marks})", *parameters, *top,
                           distinct="" if table == "pycolytics_type_users" else "DISTINCT")
    other = None
    if len(events) > REPORT_TOP:
        other = reader.players(table, None, f"{where} AND {field} NOT IN ({marks})", *parameters, *top)
    return _top([(name, count, users.get(name, 0)) for name, count in events], sum(n for _, n in events), other)


def build_report(reader):
    """The report (see docs/reports.md), and the extra figures the dashboard draws."""
    columns = _daily(reader)
    players = reader.players("pycolytics_user_days")
    retention = _retention_rows(reader, [(day, day) for day in range(reader.first, reader.last + 1)], _returns(reader))
    sessions, lengths = _sessions(reader)
    sessions["per_user"] = round(sessions["count"] / players, 2) if players else 0
    # the application's newest day, not every application's: one game's events of today must not
    # send another's rankings up to yesterday to the events
    newest = reader.one("SELECT max(day) FROM pycolytics_names WHERE day >= ?{app}", reader.first) or 0
    report = {**reader.range, "totals": {"events": sum(columns["events"]), "users": players,
                                         "new_users": sum(columns["new_users"]), "sessions": sessions["count"]},
              "days": [dict(date=day.isoformat(), **{name: columns[name][n] for name in DAY_COLUMNS})
                       for n, day in enumerate(reader.days)],
              "retention": [row for row in retention if row["users"]], "sessions": sessions,
              **{f"{field}s": _ranking(reader, field, newest) for field in RANKED}}
    return report, {"session_lengths": lengths}


def build_retention(reader, minimum):
    """Daily and weekly cohorts, and D1, D7, D30 of the whole range (each cohort weighted by its players)."""
    returns, sizes = _returns(reader), reader.newcomers()
    daily = _retention_rows(reader, [(day, day) for day in range(reader.first, reader.last + 1)], returns)

    def small(first, last):
        return sum(sizes.get(day, 0) for day in range(first, last + 1)) < minimum

    folded = []
    for start in range(reader.first, reader.last + 1, 7):  # a small cohort joins the next; the last, the one before
        if folded and small(*folded[-1]):
            folded[-1][1] = min(start + 6, reader.last)
        else:
            folded.append([start, min(start + 6, reader.last)])
    if len(folded) > 1 and small(*folded[-1]):
        last_week = folded.pop()
        folded[-1][1] = last_week[1]
    weekly = _retention_rows(reader, folded, returns)
    whole = _retention_rows(reader, [(reader.first, reader.last)], returns)
    averages = {name: value for name, value in whole[0].items() if name.startswith("day_")}
    return {**reader.range, "min_cohort": minimum, "new_users": whole[0]["users"], "average": averages,
            "weekly": [row for row in weekly if row["users"]], "daily": [row for row in daily if row["users"]]}


def build_stickiness(reader):
    """DAU, WAU (players of the 7 days up to each day), MAU (30 days) and DAU/MAU, per day."""
    gaps = reader.rows(
        "SELECT day, CASE WHEN next IS NULL OR next - day > 30 THEN 30 ELSE next - day END AS gap, count(*) FROM"
        " (SELECT day, lead(day) OVER (PARTITION BY application, user_id ORDER BY day) AS next FROM"
        " (SELECT DISTINCT application, user_id, day FROM pycolytics_user_days WHERE day BETWEEN ? AND ?{app}) AS d)"
        " AS n GROUP BY 1, 2", reader.first - 29, reader.last)
    size, first = len(reader.days), reader.first
    counts = {window: [0] * (size + 1) for window in (1, 7, 30)}
    for day, gap, players in gaps:  # a player counts for each day from this one until the next they play
        for window, changes in counts.items():
            start, stop = max(day, first) - first, min(day + min(gap, window), reader.last + 1) - first
            if start < stop:
                changes[start] += players
                changes[stop] -= players
    totals = {window: list(itertools.accumulate(changes))[:size] for window, changes in counts.items()}
    return {**reader.range, "days": [
        {"date": day.isoformat(), "dau": totals[1][n], "wau": totals[7][n], "mau": totals[30][n],
         "dau_mau": _share(totals[1][n], totals[30][n])} for n, day in enumerate(reader.days)]}


def build_versions(reader):
    """Events and players per version and day, for the REPORT_TOP versions with most events."""
    ranking = _ranking(reader, "version", 0)
    top = [row["name"] for row in ranking if row["name"] != "(other)"]
    if not top:
        return {**reader.range, "versions": [], "days": []}
    marks = ", ".join("?" * len(top))
    events = {(day, name): count for day, name, count in reader.rows(
        "SELECT day, name, sum(events) FROM pycolytics_names WHERE field = 'version' AND day BETWEEN ? AND ?"
        f" AND name IN ({marks}){{app}} GROUP BY day, name", reader.first, reader.last, *top)}
    users = reader.players("pycolytics_user_days", "day, version", f"day BETWEEN ? AND ? AND version IN ({marks})",
                           reader.first, reader.last, *top)
    rows = [{"date": day.isoformat(), "version": name, "events": events.get((reader.first + n, name), 0),
             "users": users.get((reader.first + n, name), 0)} for n, day in enumerate(reader.days) for name in top]
    return {**reader.range, "versions": ranking, "days": rows}


def build_revenue(reader):
    """Revenue per day and currency, paying players, conversion, ARPDAU, ARPPU, first purchases and
    the top items, from the purchases of the range (see docs/reports.md). No currency is converted."""
    def sales(by, order=""):
        return reader.rows(f"SELECT {by}, sum(price), count(*) FROM pycolytics_purchases WHERE day BETWEEN ? AND ?"
                           f"{{app}} GROUP BY {by}{order}", reader.first, reader.last)

    players, paying = reader.players("pycolytics_user_days"), reader.players("pycolytics_purchases")
    active_days = collections.Counter(reader.players("pycolytics_user_days", "day"))
    payers_per_day = collections.Counter(reader.players("pycolytics_purchases", "day"))
    buyers = reader.players("pycolytics_purchases", "day, currency")
    payers = reader.players("pycolytics_purchases", "currency")
    player_days = sum(active_days.values())
    items = sorted(sales("currency, item"), key=lambda row: (-row[2], row[0], row[1]))
    return {**reader.range, "players": players, "paying_users": paying, "conversion": _share(paying, players),
            "currencies": [{"currency": currency, "revenue": round(total, 6), "purchases": count,
                            "paying_users": payers.get(currency, 0), "arppu": round(total / payers[currency], 6),
                            "arpdau": round(total / player_days, 6) if player_days else None}
                           for currency, total, count in sales("currency", " ORDER BY 2 DESC")],
            "days": [{"date": _day(day).isoformat(), "currency": currency, "revenue": round(total, 6),
                      "purchases": count, "paying_users": buyers[day, currency], "active_users": active_days[day],
                      "conversion": _share(payers_per_day[day], active_days[day]),
                      "arpdau": round(total / active_days[day], 6) if active_days[day] else None}
                     for day, currency, total, count in sorted(sales("day, currency"))],
            "first_purchase": _first_purchases(reader),
            "items": [{"currency": currency, "item": item, "revenue": round(total, 6), "purchases": count}
                      for currency, item, total, count in items[:REPORT_TOP]]}


def _first_purchases(reader):
    """How many players made their first purchase ever in the range, by days since their first day."""
    bounds = [bound for bound, _ in FIRST_PURCHASE_DAYS[:-1]]
    bucket = "CASE " + " ".join(f"WHEN f.day - u.first_day <= {bound} THEN {n}" for n, bound in enumerate(bounds))
    found = dict(reader.rows(
        f"SELECT {bucket} ELSE {len(bounds)} END, count(*) FROM (SELECT application, user_id, min(day) AS day FROM"
        " pycolytics_purchases GROUP BY application, user_id) AS f JOIN pycolytics_users AS u ON u.application ="
        " f.application AND u.user_id = f.user_id WHERE f.day BETWEEN ? AND ?{app:f} GROUP BY 1",
        reader.first, reader.last))
    return [{"days": label, "users": found.get(n, 0)} for n, (_, label) in enumerate(FIRST_PURCHASE_DAYS)]


def build_progression(reader, churn_days):
    """Per level: players who started, completed and failed it, the completion rate, the median attempts per completion
    and time to complete, and how many players who stopped had it as their last level (see docs/reports.md)."""
    reader.temporary("pycolytics_progress", "SELECT application, user_id, level, sum(starts) AS starts, sum(completes)"
                     " AS completes, sum(fails) AS fails, min(first_start_us) AS first_start, min(first_complete_us)"
                     " AS first_complete, coalesce(min(first_start_us), min(first_complete_us)) AS reached FROM"
                     " pycolytics_levels WHERE day BETWEEN ? AND ?{app} GROUP BY application, user_id, level",
                     reader.first, reader.last)
    counts = {level: figures for level, *figures in reader.rows(
        "SELECT level, sum(CASE WHEN starts > 0 THEN 1 ELSE 0 END), sum(CASE WHEN completes > 0 THEN 1 ELSE 0 END),"
        " sum(CASE WHEN fails > 0 THEN 1 ELSE 0 END) FROM pycolytics_progress GROUP BY level")}
    attempts = dict(reader.rows(_median_per_level(f"CAST(starts AS {reader.dialect.real}) / completes",
                                                  "completes > 0")))
    times = dict(reader.rows(_median_per_level("first_complete - first_start",
                                               "first_complete IS NOT NULL AND first_start IS NOT NULL")))
    end = min(reader.last, reader.observed)
    stopped = dict(reader.rows(
        "SELECT level, count(*) FROM (SELECT level, row_number() OVER (PARTITION BY application, user_id ORDER BY"
        " reached DESC, level) AS n FROM pycolytics_progress AS p WHERE NOT EXISTS (SELECT 1 FROM pycolytics_user_days"
        " AS d WHERE d.application = p.application AND d.user_id = p.user_id AND d.day > ? AND d.day <= ?))"
        " AS last_levels WHERE n = 1 GROUP BY level", end - churn_days, end))
    levels = sorted(counts, key=_level_order)
    rows = [{"level": level, "started": started, "completed": completed, "failed": failed,
             "completion_rate": _share(completed, started),
             "median_attempts": round(attempts[level], 2) if level in attempts else None,
             "median_seconds_to_complete": _seconds(max(0, times[level])) if level in times else None,
             "last_level_of_churned": stopped.get(level, 0)}
            for level in levels[:MAX_LEVELS] for started, completed, failed in [counts[level]]]
    return {**reader.range, "churn_days": churn_days, "churned": sum(stopped.values()),
            "more_levels": max(0, len(levels) - MAX_LEVELS), "levels": rows}


def _median_per_level(figure, condition):
    """SQL of (level, the nearest-rank median of `figure`) over the players of pycolytics_progress."""
    return (f"SELECT level, x FROM (SELECT level, x, row_number() OVER (PARTITION BY level ORDER BY x) AS n,"
            f" count(*) OVER (PARTITION BY level) AS total FROM (SELECT level, {figure} AS x FROM pycolytics_progress"
            f" WHERE {condition}) AS figures) AS ranked WHERE n = (total + 1) / 2")


def build_funnel(reader, steps):
    """How many players did steps[0], then steps[1] at or after that, and so on, in the range:
    each step's first time per player after the one before, in temporary tables."""
    where, values = reader.events()
    reached = []
    for n, step in enumerate(steps):
        reader.temporary(f"pycolytics_funnel_{n}", f"SELECT application, user_id, time FROM event WHERE {where}"
                                                   " AND event_type = ?{app}", *values, step)
        if n == 0:
            reader.temporary("pycolytics_reached", "SELECT application, user_id, min(time) AS time FROM"
                                                   " pycolytics_funnel_0 GROUP BY application, user_id")
        else:
            reader.connection.execute(f"CREATE INDEX pycolytics_funnel_index_{n} ON pycolytics_funnel_{n}"
                                      " (application, user_id, time)")
            reader.temporary("pycolytics_next", f"SELECT r.application, r.user_id, min(s.time) AS time FROM"
                                                f" pycolytics_reached AS r JOIN pycolytics_funnel_{n} AS s ON"
                                                " s.application = r.application AND s.user_id = r.user_id AND"
                                                " s.time >= r.time GROUP BY r.application, r.user_id")
            reader.temporary("pycolytics_reached", "SELECT * FROM pycolytics_next")
        reached.append({"name": step, "users": reader.one("SELECT count(*) FROM pycolytics_reached")})
    return {**reader.range, "steps": reached}


def build_values(reader, field):
    """value[field] of the range's events of one type: numbers as count, min, p50, p90, max, sum, a
    histogram and, when they are few, value by value; strings and true/false as a ranking."""
    if reader.dialect is POSTGRESQL:
        path, kind, item = field, "jsonb_typeof(value -> ?)", "value ->> ?"
    else:
        path, kind, item = f'$."{field}"', "json_type(value, ?)", "json_extract(value, ?)"
    where, values = reader.events()
    reader.temporary("pycolytics_values", f"SELECT {kind} AS kind, CAST({item} AS TEXT) AS item FROM event"
                                          f" WHERE {where}{{app}}", path, path, *values)
    kinds = dict(reader.rows("SELECT kind, count(*) FROM pycolytics_values GROUP BY kind"))
    numeric, textual = ("integer", "real", "number"), ("text", "string", "true", "false", "boolean")  # as SQL lists too
    numbers = _numbers(reader, numeric) if any(kinds.get(kind) for kind in numeric) else None
    strings = reader.rows("SELECT CASE WHEN kind IN ('true', 'false') THEN kind ELSE item END AS name, count(*)"
                          f" FROM pycolytics_values WHERE kind IN {textual} GROUP BY 1")
    strings.sort(key=lambda row: (-row[1], row[0]))
    total = sum(kinds.values())
    return {**reader.range, "event_type": reader.query.event_type, "field": field, "events": total,
            "missing": total - sum(kinds.get(kind, 0) for kind in numeric + textual), "numbers": numbers,
            "strings": [{"value": row["name"], "events": row["events"]} for row in _top(
                [(value, events, None) for value, events in strings], sum(count for _, count in strings))]}


def _numbers(reader, kinds):
    """Statistics of the numbers of pycolytics_values, its histogram and (if few) its values."""
    reader.temporary("pycolytics_numbers", f"SELECT CAST(item AS {reader.dialect.real}) AS x FROM pycolytics_values"
                                           f" WHERE kind IN {kinds}")
    count, lowest, highest, total = reader.rows("SELECT count(*), min(x), max(x), sum(x) FROM pycolytics_numbers")[0]

    def plain(number):
        return int(number) if float(number).is_integer() and abs(number) < 2**53 else number

    p50, p90 = (plain(reader.rank("pycolytics_numbers", "x", count, share)) for share in (0.5, 0.9))
    stats = {"count": count, "min": plain(lowest), "p50": p50, "p90": p90, "max": plain(highest), "sum": plain(total)}
    few = reader.rows(f"SELECT x, count(*) FROM pycolytics_numbers GROUP BY x ORDER BY x LIMIT {FEW_VALUES + 1}")
    stats["values"] = [{"value": plain(x), "events": n} for x, n in few] if len(few) <= FEW_VALUES else None
    whole = not reader.one("SELECT count(*) FROM pycolytics_numbers WHERE x <> round(x)")
    width = _bin_width(lowest, highest, whole)
    counted = dict(reader.rows("SELECT CAST((x - ?) / ? AS INTEGER) AS bin, count(*) FROM pycolytics_numbers"
                               " GROUP BY 1", lowest, width))
    stats["histogram"] = [{"from": plain(lowest + n * width), "to": plain(lowest + (n + 1) * width),
                           "events": counted.get(n, 0)} for n in range(max(counted, default=0) + 1)]
    return stats


def _bin_width(lowest, highest, whole):
    """A round width (1, 2 or 5 times a power of ten; whole numbers for whole numbers) that cuts
    lowest..highest into HISTOGRAM_BINS bins at most."""
    spread = highest - lowest
    width = 10 ** math.floor(math.log10(spread / HISTOGRAM_BINS)) if spread > 0 else 1
    width = next(width * step for step in (1, 2, 5, 10) if spread / (width * step) < HISTOGRAM_BINS)
    return max(1, round(width)) if whole else width


def _csv(header, rows):
    """CSV bytes of dict rows; a text cell that a spreadsheet would run as a formula starts with a
    quote (OWASP's advice: https://owasp.org/www-community/attacks/CSV_Injection)."""
    import csv  # here: only CSV answers and exports need it
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows([_inert(row[name]) for name in header] for row in rows)
    return out.getvalue().encode()


def _inert(cell):
    """A CSV cell that a spreadsheet shows as text instead of running it as a formula (which these start)."""
    return "'" + cell if isinstance(cell, str) and cell.startswith(("=", "+", "-", "@", "\t", "\r")) else cell


# Each view of the report API: what builds it from (reader, fields, every), whether it reads the
# summaries, and the list of its JSON that its CSV gives (None: JSON only), with the columns.
_RETENTION_COLUMNS = ("cohort", "users") + tuple(f"day_{after}" for after in RETENTION_DAYS)
VIEWS = {
    "report": (lambda reader, *_: build_report(reader)[0], True, "days", ("date",) + DAY_COLUMNS),
    "funnel": (lambda reader, fields, every: build_funnel(reader, _funnel_steps(fields, every)), False, "steps",
               ("name", "users")),
    "values": (lambda reader, fields, _: build_values(reader, _value_field(fields)), False, None, None),
    "retention": (lambda reader, fields, _: build_retention(reader, _whole(fields, "min_cohort", MIN_COHORT, 10**9)),
                  True, "weekly", _RETENTION_COLUMNS),
    "revenue": (lambda reader, *_: build_revenue(reader), True, "days",
                ("date", "currency", "revenue", "purchases", "paying_users", "active_users", "conversion", "arpdau")),
    "progression": (lambda reader, fields, _: build_progression(reader, _whole(fields, "churn_days", CHURN_DAYS,
                                                                               MAX_REPORT_DAYS)), True, "levels",
                    ("level", "started", "completed", "failed", "completion_rate", "median_attempts",
                     "median_seconds_to_complete", "last_level_of_churned")),
    "stickiness": (lambda reader, *_: build_stickiness(reader), True, "days", ("date", "dau", "wau", "mau", "dau_mau")),
    "versions": (lambda reader, *_: build_versions(reader), True, "days", ("date", "version", "events", "users")),
}


class Reports:
    """The report API (/v1.0/report...) and the dashboard: read with one of read_keys (the write
    keys that ship inside games never open them), each within report_timeout."""

    def __init__(self, config, store, writer, keyring):
        self.config, self.store, self.writer, self.keyring = config, store, writer, keyring

    def _authorized(self, environ):
        self.keyring.authorize(environ, "read", "the dashboard and the report API are off: set read_keys "
                                                "in the configuration to open them")
        fields, every = _query_fields(environ.get("QUERY_STRING", ""), self.config.max_string_length)
        return fields, every, report_query(fields, _today())

    def answer(self, environ):
        """(status, headers, body) for /v1.0/report and its views."""
        fields, every, query = self._authorized(environ)
        view = (environ.get("PATH_INFO") or "").rpartition("/v1.0/report")[2].strip("/") or "report"
        build, summaries, listed, columns = VIEWS[view]
        chosen, offered = fields.get("format") or "json", ("json", "csv") if listed else ("json",)
        if chosen not in offered:
            raise HTTPError(400, f"format must be {' or '.join(offered)}, not {chosen[:40]!r}")
        if view == "values" and not query.event_type:
            raise HTTPError(400, "values needs event_type: the type of the events whose value to break down")
        document = self.read(query, summaries, lambda reader: build(reader, fields, every))
        if chosen == "csv":
            name = f"pycolytics-{view}-{query.since}-{query.until}.csv"
            return _ok(_csv(columns, document[listed]), ("Content-Type", "text/csv; charset=utf-8"),
                       ("Content-Disposition", f'attachment; filename="{name}"'), ("Cache-Control", "no-store"))
        return _ok(json.dumps(document).encode(), JSON_TYPE, ("Cache-Control", "no-store"))

    def dashboard(self, environ):
        """The dashboard page: every view of one application (the busiest, unless one is chosen)."""
        started = time.monotonic()
        fields, every, query = self._authorized(environ)

        def figures(reader):
            events = reader.rows("SELECT application, sum(events) FROM pycolytics_names WHERE field = 'platform'"
                                 " AND day BETWEEN ? AND ? GROUP BY application", reader.first, reader.last)
            busiest = [name for name, _ in sorted(events, key=lambda row: (-row[1], row[0].encode()))[:REPORT_TOP]]
            if "application" not in fields and busiest:  # one game, not every game mixed
                reader = Reader(reader.connection, reader.dialect, query._replace(application=busiest[0]), reader.today)
            report, extras = build_report(reader)
            found = {"report": report, "query": reader.query, "fields": fields, **extras, "applications": busiest}
            for name in ("retention", "revenue", "progression", "stickiness", "versions"):
                found[name] = VIEWS[name][0](reader, fields, every)
            if fields.get("steps") or any(every.get("step", ())):
                found["funnel"] = build_funnel(reader, _funnel_steps(fields, every))
            if fields.get("of") and fields.get("field"):
                found["values"] = build_values(Reader(reader.connection, reader.dialect, reader.query._replace(
                    event_type=fields["of"]), reader.today), _value_field(fields))
            return found

        parts = self.read(query, True, figures)
        body = dashboard_html(parts, time.monotonic() - started).encode()
        return _ok(body, HTML_TYPE, ("Cache-Control", "no-store"), ("Referrer-Policy", "no-referrer"),
                   ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self';"
                                               " frame-ancestors 'none'"))

    def read(self, query, summaries, build):
        """build(a Reader of `query`) within report_timeout; 503 if it takes longer or cannot read."""
        seconds = self.config.report_timeout
        try:
            with self.store.reading(seconds) as connection:
                if summaries:
                    self._summaries_for(connection, query)
                return build(Reader(connection, self.store.dialect, query, _today()))
        except ReportTooSlow:
            raise busy(f"the report took longer than report_timeout = {seconds:g} s and was stopped: ask for fewer "
                       "days, or raise report_timeout", 5) from None
        except self.store.errors as error:
            log.warning("could not read a report: %s", error)
            raise busy(f"the database could not be read: {self.store.describe(error)}", 5) from None

    def _summaries_for(self, connection, query):
        """Read the kept summaries if they can answer `query` and are up to date (the writer catches
        up first if it is a little behind); else summarise the events into temporary tables."""
        if self.store.summaries and all(getattr(query, name) is None for name in RANKED):
            try:
                done, made_with = connection.execute("SELECT last_id, conventions FROM pycolytics_summary").fetchone()
                newest = connection.execute("SELECT max(id) FROM event").fetchone()[0] or 0
            except sqlite3.OperationalError:  # no summaries yet: a database no server of this version opened
                done = newest = made_with = -1
            if made_with not in (None, -1, json.dumps(conventions(self.config))):  # to be made again
                self.writer.catch_up(newest, 0)  # the writer starts on it; this report reads the events
                done = -1
            if 0 <= done and (newest <= done or newest - done <= CATCH_UP_EVENTS
                              and self.writer.catch_up(newest, CATCH_UP_SECONDS)):
                connection.execute("BEGIN")  # one snapshot of the summaries for every query of the report
                return
        summarise_events(connection, self.store.dialect, self.config, query)


###############################################################################
# Players: erasing and exporting one player's events
###############################################################################

# Event ids one erasing step looks through (a few milliseconds of SQLite's time), and the events
# one export answer holds at most (the next answer starts after the id its header gives).
ERASE_STEP_IDS = 20_000
MAX_PLAYER_EXPORT = 50_000
# Tables whose rows belong to one player each, under (application, user_id).
PLAYER_TABLES = tuple(name for name, _, key in SUMMARY_TABLES if key.startswith("application, user_id"))
EXPORT_COLUMNS = ("id", "time", "received_at", "event_type", "application", "version", "platform",
                  "user_id", "session_id", "value", "event_id")


def _player_rows(config, user_id, application):
    """The condition on one player's rows (of `application`, or of any), its values, and the user_ids it names: the
    id itself, or its hash where its application hashes ids."""
    hashing = {name for name in [None, *config.apps] if config.for_app(name, "hash_user_ids")}
    if application is None:
        ids = [user_id] + ([hash_id(config.id_secret.encode(), user_id)] if hashing else [])
    elif (application if application in config.apps else None) in hashing:
        ids = [hash_id(config.id_secret.encode(), user_id)]
    else:
        ids = [user_id]
    where = f"user_id IN ({', '.join('?' * len(ids))})" + ("" if application is None else " AND application = ?")
    return where, ids + ([] if application is None else [application]), ids


def erase_player(store, connection, config, user_id, application=None):
    """Delete every event of one player (of `application`, or of any) and their summaries' rows, ERASE_STEP_IDS ids a
    short transaction; how many events went. Events that arrive after it began are kept (opt the player out)."""
    where, parameters, ids = _player_rows(config, user_id, application)
    dialect = store.dialect
    top = connection.execute("SELECT max(id) FROM event").fetchone()[0] or 0
    removed, applications = 0, set()
    for after in range(0, top, ERASE_STEP_IDS):
        with _write(store, connection):
            found = connection.execute(dialect.sql(
                f"SELECT id, {dialect.day.format('time')}, application, event_type, version, platform FROM event"
                f" WHERE id > ? AND id <= ? AND {where}"), [after, after + ERASE_STEP_IDS] + parameters).fetchall()
            if not found:
                continue
            if store.summaries:
                _uncount(connection, [row for row in found if row[0] <= summarised_up_to(connection)])
            connection.execute(dialect.sql(f"DELETE FROM event WHERE id IN ({', '.join('?' * len(found))})"),
                               [row[0] for row in found])
        removed += len(found)
        applications |= {row[2] for row in found}
    if store.summaries:
        with _write(store, connection):
            applications |= {name for name, in connection.execute(f"SELECT DISTINCT application FROM pycolytics_users"
                                                                  f" WHERE {where}", parameters)}
            for table, name in itertools.product(PLAYER_TABLES, applications):
                connection.execute(f"DELETE FROM {table} WHERE application = ? AND user_id IN"
                                   f" ({', '.join('?' * len(ids))})", [name] + ids)
    log.info("erased a player's events at an admin's request: %d events%s", removed,
             "" if application is None else f" of application {application!r}")
    return removed


def _write(store, connection):
    return transaction(connection) if store.summaries else connection.transaction()


def _uncount(connection, rows):
    """Take erased events, summarised already, out of pycolytics_names (the rest of the summaries are per player)."""
    counts = collections.Counter((day, application, field, name) for _, day, application, *names in rows
                                 for field, name in zip(RANKED, names))
    for (day, application, field, name), count in counts.items():
        connection.execute("UPDATE pycolytics_names SET events = events - ? WHERE day = ? AND application = ?"
                           " AND field = ? AND name = ?", (count, day, application, field, name))
    connection.execute("DELETE FROM pycolytics_names WHERE events <= 0")


def _export_columns(store, connection):
    """EXPORT_COLUMNS as text in SQL, NULL for those an older table lacks."""
    present, dialect = store.columns(connection), store.dialect
    texts = {"time": dialect.time_text.format("time"), "received_at": dialect.time_text.format("received_at"),
             "value": dialect.value_text}
    return ", ".join(texts.get(name, name) if name in present else f"NULL AS {name}" for name in EXPORT_COLUMNS)


def player_events(store, connection, config, user_id, application=None, after_id=0, limit=None):
    """The rows (EXPORT_COLUMNS) of one player's events in id order, streamed, after `after_id`."""
    where, parameters, _ = _player_rows(config, user_id, application)
    limited = f" LIMIT {int(limit)}" if limit else ""
    return store.rows(connection, store.dialect.sql(f"SELECT {_export_columns(store, connection)} FROM event"
                                                    f" WHERE {where} AND id > ? ORDER BY id{limited}"),
                      parameters + [after_id])


def _record(row):
    record = dict(zip(EXPORT_COLUMNS, row))
    record["value"] = json.loads(record["value"]) if isinstance(record["value"], str) else record["value"]
    return json.dumps(record, ensure_ascii=False) + "\n"


class Players:
    """POST /v1.0/player/erase and /v1.0/player/export, with one of admin_keys: one player's events, named by the body:
    {"user_id": raw id (also where stored hashed), "application": optional, "after_id": export's, optional}."""

    def __init__(self, config, store, keyring):
        self.config, self.store, self.keyring = config, store, keyring

    def answer(self, environ):
        self.keyring.authorize(environ, "admin", "erasing and exporting players is off: set admin_keys in the "
                                                 "configuration to turn it on")
        document = parse_json(read_body(environ, self.config.max_body_bytes))
        user_id, application, after_id = self._player(document)
        if environ.get("PATH_INFO", "").endswith("/erase"):
            with contextlib.closing(self.store.connect()) as connection:
                removed = erase_player(self.store, connection, self.config, user_id, application)
            return _ok(json.dumps({"removed": removed, "application": application}).encode(), JSON_TYPE)
        return self._export(user_id, application, after_id)

    def _player(self, document):
        if not isinstance(document, dict):
            raise HTTPError(422, "the body must be a JSON object like {\"user_id\": \"3f2a9c1e\"}")
        user_id, application = document.get("user_id"), document.get("application")
        after_id = document.get("after_id", 0)
        if type(user_id) is not str or not user_id:
            raise HTTPError(422, "'user_id' must be the player's id, a non-empty string")
        if application is not None and type(application) is not str:
            raise HTTPError(422, "'application' must be a string, or left out for every application")
        if type(after_id) is not int or after_id < 0:
            raise HTTPError(422, "'after_id' must be a whole number: the last id of the answer before")
        return user_id, application, after_id

    def _export(self, user_id, application, after_id):
        seconds = self.config.report_timeout
        try:
            with self.store.reading(seconds) as connection:
                rows = list(player_events(self.store, connection, self.config, user_id, application, after_id,
                                          MAX_PLAYER_EXPORT + 1))
        except ReportTooSlow:
            raise busy(f"the export took longer than report_timeout = {seconds:g} s", 5) from None
        headers = [("Cache-Control", "no-store")]
        if len(rows) > MAX_PLAYER_EXPORT:
            rows = rows[:MAX_PLAYER_EXPORT]
            headers.append(("Pycolytics-Next-After-Id", str(rows[-1][0])))
        body = "".join(map(_record, rows)).encode()
        return _ok(body, ("Content-Type", "application/x-ndjson; charset=utf-8"), *headers)

###############################################################################
# The dashboard: /dashboard, drawn by the server as SVG
###############################################################################

def _escape(text):
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _link(path, fields):
    """A URL relative to the page, so the dashboard works under any path prefix."""
    from urllib.parse import urlencode  # here: only the dashboard writes links

    chosen = {name: value for name, value in fields.items() if value}
    return _escape(path + ("?" + urlencode(chosen) if chosen else ""))


def _days_svg(days, series, label, lines=False):
    """Series [(name, values)] over the days: stacked bars per day (classes bar0, bar1...), or with `lines` a line
    each (line0, line1...); with its scale, and about eight date labels under it whatever the range."""
    width, height, left, bottom = 760, 200, 56, 24
    axis, room = height - bottom, height - bottom - 10
    heights = ([value for _, values in series for value in values] if lines else
               [sum(values[n] for _, values in series) for n in range(len(days))])
    top, step = max(heights, default=0) or 1, (width - left) / max(1, len(days))
    marks = []
    if lines:
        for index, (name, values) in enumerate(series):
            points = " ".join(f"{left + n * step + step / 2:.1f},{axis - room * value / top:.1f}"
                              for n, value in enumerate(values))
            marks.append(f'<polyline class="line line{index}" points="{points}"><title>{_escape(name)}</title>'
                         '</polyline>')
    else:
        for n, day in enumerate(days):
            base = axis
            for index, (name, values) in enumerate(series):
                tall = room * values[n] / top
                if values[n]:
                    marks.append(f'<rect class="bar bar{index}" x="{left + n * step + step * 0.1:.1f}" '
                                 f'y="{base - tall:.1f}" width="{step * 0.8:.1f}" height="{tall:.1f}">'
                                 f'<title>{day}: {values[n]:,} {_escape(name)}</title></rect>')
                base -= tall
    every = max(1, math.ceil(len(days) / 8))
    marks += [f'<text x="{left + n * step + step / 2:.1f}" y="{height - 6}" text-anchor="middle">{day[5:]}</text>'
              for n, day in enumerate(days) if n % every == 0]
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{_escape(label)}">'
            f'<line x1="{left}" y1="{axis}" x2="{width}" y2="{axis}" class="axis"/>'
            f'<text x="{left - 6}" y="16" text-anchor="end">{top:,}</text>'
            f'<text x="{left - 6}" y="{axis}" text-anchor="end">0</text>{"".join(marks)}</svg>')


def _legend(names):
    return '<p class="legend">' + " ".join(f'<span class="key{n}">&#9632; {_escape(name)}</span>'
                                           for n, name in enumerate(names)) + "</p>"


def _ranking_svg(items, label, shares=False):
    """Horizontal bars for (name, count) items, with their share of the first when `shares`."""
    if not items:
        return '<p class="empty">No events in this range.</p>'
    width, row, names = 420, 26, 150
    top = max(value for _, value in items) or 1
    first = items[0][1] or 1
    bars = []
    for n, (name, value) in enumerate(items):
        y, long = n * row, (width - names - 110) * value / top
        shown = str(name) if len(str(name)) <= 20 else str(name)[:19] + "\u2026"
        note = f" ({100 * value / first:.0f}%)" if shares else ""
        bars.append(f'<rect class="bar" x="{names}" y="{y + 4}" width="{long:.1f}" height="{row - 8}">'
                    f'<title>{_escape(name)}: {value:,}{note}</title></rect>'
                    f'<text x="{names - 6}" y="{y + 18}" text-anchor="end">{_escape(shown or "(empty)")}</text>'
                    f'<text x="{names + long + 6:.1f}" y="{y + 18}">{value:,}{note}</text>')
    return (f'<svg class="chart ranking" viewBox="0 0 {width} {row * len(items)}" role="img" '
            f'aria-label="{_escape(label)}">{"".join(bars)}</svg>')


def _options(names, chosen):
    return "".join(f'<option value="{_escape(name)}"{" selected" if name == chosen else ""}>{_escape(name)}</option>'
                   for name in names)


def _seconds_text(seconds):
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def _funnel_section(parts, hidden, types):
    typed, funnel = parts["fields"].get("steps", ""), parts.get("funnel")
    picks = "".join(f'<select name="step"><option value="">step {n + 1}</option>{_options(types, None)}</select>'
                    for n in range(4))
    form = (f'<form method="get" action="dashboard">{hidden}<label>Steps <input name="steps" size="40" '
            f'value="{_escape(typed)}" placeholder="tutorial_start,tutorial_step,tutorial_end"></label> or {picks}'
            f'<button type="submit">Count</button></form>')
    if funnel is None:
        return form + '<p class="empty">Type event types separated by commas, or pick them.</p>'
    items = [(step["name"], step["users"]) for step in funnel["steps"]]
    return form + _ranking_svg(items, "funnel", shares=True)


# The dashboard's style sheet: one page, no files to serve, no scripts. Series n of a chart is drawn in the nth
# colour: its bars (bar0, bar1...), its line (line0...) and its legend's key (key0...).
PALETTE = ("#3d7be0", "#e0793d", "#4caf7a", "#9b6ad6", "#d6b43d", "#8a93a6")
DASHBOARD_CSS = """\
body{font:15px/1.4 system-ui,sans-serif;margin:0;color:#1d2433;background:#f5f6f8}
header{background:#1d2433;color:#fff;padding:12px 24px} header h1{font-size:20px;margin:0 0 8px}
form{display:flex;gap:10px;flex-wrap:wrap;align-items:center;margin:4px 0 8px}
input,select,button{font:inherit;padding:3px 6px} main{max-width:1100px;margin:0 auto;padding:16px 24px}
.totals{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:16px}
.totals div{background:#fff;border-radius:8px;padding:12px 20px} .totals b{display:block;font-size:28px}
section{background:#fff;border-radius:8px;padding:12px 20px;margin:16px 0}
h2{font-size:17px;margin:4px 0 8px} .grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:16px}
.grid section{margin:0} .chart{width:100%;height:auto} .ranking{max-width:560px} .chart text{font-size:13px;fill:#3b4356}
.bar{fill:#3d7be0} .axis{stroke:#c5cad3} .line{fill:none;stroke-width:2.5} .empty{color:#5b6477}
.legend{margin:0 0 4px;font-size:14px} .legend span{margin-right:12px}
.scroll{overflow-x:auto} table{border-collapse:collapse} td,th{padding:3px 8px;text-align:right;font-size:14px}
.retention td.future{background:#fafafa} .numbers td,.numbers th{border-bottom:1px solid #e3e6eb}
header a{color:#cfe0ff} footer{color:#5b6477;font-size:13px;padding:0 24px 24px;text-align:center}
""" + "".join(f".bar{n}{{fill:{colour}}} .line{n}{{stroke:{colour}}} .key{n}{{color:{colour}}}\n"
              for n, colour in enumerate(PALETTE))


def _table(header, rows):
    """An HTML table of already formatted cells (escaped here)."""
    head = "".join(f"<th>{_escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(f"<td>{_escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table class="numbers"><tr>{head}</tr>{body}</table></div>'


def _percent(share):
    return "" if share is None else f"{100 * share:.0f}%"


def _retention_section(retention):
    if not retention["weekly"]:
        return '<p class="empty">No new players in this range.</p>'
    cells, average = [], retention["average"]
    for row in retention["weekly"]:
        shares = "".join('<td class="future"></td>' if row[f"day_{after}"] is None else
                         f'<td style="background:rgba(61,123,224,{0.08 + 0.92 * row[f"day_{after}"]:.2f})'
                         f'{";color:#fff" if row[f"day_{after}"] > 0.5 else ""}">{_percent(row[f"day_{after}"])}</td>'
                         for after in RETENTION_DAYS)
        cells.append(f"<tr><th>{row['cohort']}</th><td>{row['users']:,}</td>{shares}</tr>")
    head = "".join(f"<th>day {after}</th>" for after in RETENTION_DAYS)
    back = ", ".join(f'day {after}: <b>{_percent(average[f"day_{after}"]) or "-"}</b>' for after in (1, 7, 30))
    return (f'<p>Of the {retention["new_users"]:,} new players of the range, back on {back} (each cohort weighted by '
            f'its players; weeks with fewer than {retention["min_cohort"]} new players are folded into the next).</p>'
            f'<div class="scroll"><table class="retention"><tr><th>week from</th><th>new players</th>{head}</tr>'
            f'{"".join(cells)}</table></div>')


def _stickiness_section(stickiness, dates):
    days = stickiness["days"]
    if not any(day["mau"] for day in days):
        return '<p class="empty">No players in this range.</p>'
    shares = [day["dau_mau"] for day in days if day["dau_mau"] is not None]
    series = [(name.upper(), [day[name] for day in days]) for name in ("dau", "wau", "mau")]
    return (_legend(["DAU", "WAU", "MAU"]) + _days_svg(dates, series, "daily, weekly and monthly players", lines=True)
            + f'<p class="empty">DAU/MAU {_percent(sum(shares) / len(shares))} on average; on the last day '
              f'{_percent(days[-1]["dau_mau"])}.</p>')


def _versions_section(versions, dates):
    top = [row["name"] for row in versions["versions"] if row["name"] != "(other)"][:5]
    if not top:
        return '<p class="empty">No events in this range.</p>'
    per_day = {(row["date"], row["version"]): row["events"] for row in versions["days"]}
    series = [(name, [per_day.get((day, name), 0) for day in dates]) for name in top]
    table = _table(("version", "events", "players"), [(row["name"], f"{row['events']:,}", f"{row.get('users', 0):,}")
                                                      for row in versions["versions"]])
    return _legend(top) + _days_svg(dates, series, "events per version and day") + table


def _revenue_section(revenue, dates):
    if not revenue["currencies"]:
        return '<p class="empty">No purchases in this range (events of type purchase_event, with a price).</p>'
    main = revenue["currencies"][0]["currency"]
    per_day = {row["date"]: row["revenue"] for row in revenue["days"] if row["currency"] == main}
    table = _table(("currency", "revenue", "purchases", "paying players", "ARPPU", "ARPDAU"), [
        (row["currency"] or "(none)", f"{row['revenue']:,.2f}", f"{row['purchases']:,}", f"{row['paying_users']:,}",
         f"{row['arppu']:,.2f}", "" if row["arpdau"] is None else f"{row['arpdau']:,.4f}")
        for row in revenue["currencies"]])
    return (f'<p>{revenue["paying_users"]:,} paying players of {revenue["players"]:,}: conversion '
            f'<b>{_percent(revenue["conversion"]) or "-"}</b>.</p>' + table
            + f"<h3>Revenue per day ({_escape(main or '(no currency)')})</h3>"
            + _days_svg(dates, [(main, [per_day.get(day, 0) for day in dates])], "revenue per day")
            + '<div class="grid"><div><h3>First purchase, days after the first day</h3>'
            + _ranking_svg([(row["days"], row["users"]) for row in revenue["first_purchase"]], "first purchases")
            + "</div><div><h3>Top items</h3>" + _ranking_svg(
                [(f"{row['item'] or '(none)'} ({row['currency']})", round(row["revenue"], 2)) for row in revenue["items"]],
                "top items by revenue") + "</div></div>")


def _progression_section(progression):
    levels = progression["levels"]
    if not levels:
        return '<p class="empty">No level events in this range (level_start_event, level_complete_event, ...).</p>'
    table = _table(("level", "started", "completed", "failed", "completion", "attempts (median)", "time to complete",
                    "stopped here"), [
        (row["level"], f"{row['started']:,}", f"{row['completed']:,}", f"{row['failed']:,}",
         _percent(row["completion_rate"]), "" if row["median_attempts"] is None else row["median_attempts"],
         "" if row["median_seconds_to_complete"] is None else _seconds_text(row["median_seconds_to_complete"]),
         f"{row['last_level_of_churned']:,}") for row in levels])
    return (f'<p>{progression["churned"]:,} players stopped playing (no event in the last '
            f'{progression["churn_days"]} days of the range); their last level:</p>'
            + _ranking_svg([(row["level"], row["last_level_of_churned"]) for row in levels
                            if row["last_level_of_churned"]], "where players stop") + table)


def _values_section(parts, hidden, types):
    fields, values = parts["fields"], parts.get("values")
    form = (f'<form method="get" action="dashboard">{hidden}<label>Event type <select name="of">'
            f'{_options(types, fields.get("of"))}</select></label> <label>value field <input name="field" '
            f'value="{_escape(fields.get("field", ""))}" placeholder="level"></label><button type="submit">Break down'
            f'</button></form>')
    if values is None:
        return form + '<p class="empty">What level do players die on? Pick the event type and its value\'s field.</p>'
    shown, numbers = [], values["numbers"]
    if numbers:
        stats = {name: numbers[name] for name in ("count", "min", "p50", "p90", "max", "sum")}
        shown.append(_table(stats, [[f"{value:,}" for value in stats.values()]]))
        if numbers["values"] is not None:
            shown.append(_ranking_svg([(row["value"], row["events"]) for row in numbers["values"]], "events per value"))
        else:
            shown.append(_ranking_svg([(f"{row['from']:,} to {row['to']:,}", row["events"])
                                       for row in numbers["histogram"]], "histogram"))
    if values["strings"]:
        shown.append(_ranking_svg([(row["value"], row["events"]) for row in values["strings"]], "values"))
    shown.append(f'<p class="empty">{values["events"]:,} events of {_escape(values["event_type"])}; '
                 f'{values["missing"]:,} without a number or text in {_escape(values["field"])}.</p>')
    return form + "".join(shown)


def _dashboard_header(query, filters, chosen, choices, applications):
    """The dashboard's title, its form (application, days, filters) and the links to its data."""
    applications = sorted(set(applications) | ({query.application} if query.application else set()))
    return f"""<header><h1>Pycolytics{" &middot; " + _escape(query.application) if query.application else ""}</h1>
<form method="get" action="dashboard">
<label>Application <select name="application"><option value=""{"" if query.application else " selected"}>all</option>
{_options(applications, query.application)}</select></label>
<label>From <input type="date" name="since" value="{query.since}"></label>
<label>to <input type="date" name="until" value="{query.until}"></label>
<label>Event type <input name="event_type" list="event_types" size="12" value="{_escape(filters["event_type"])}">
</label><label>Version <input name="version" list="versions" size="8" value="{_escape(filters["version"])}"></label>
<label>Platform <input name="platform" list="platforms" size="8" value="{_escape(filters["platform"])}"></label>
<button type="submit">Show</button>{"".join(f'<datalist id="{key}">{_options(names, None)}</datalist>'
                                            for key, names in choices.items())}</form>
<a href="{_link("v1.0/report", dict(chosen, format="csv"))}">Download the days as CSV</a> &middot;
<a href="{_link("v1.0/report", chosen)}">the report as JSON</a></header>"""


def dashboard_html(parts, seconds):
    report, fields, query = parts["report"], parts["fields"], parts["query"]
    totals, dates = report["totals"], [day["date"] for day in report["days"]]
    column = {name: [day[name] for day in report["days"]] for name in DAY_COLUMNS}
    filters = {name: fields.get(name, "") for name in REPORT_FILTERS}
    chosen = dict(filters, application=query.application or "", since=query.since.isoformat(),
                  until=query.until.isoformat())
    hidden = "".join(f'<input type="hidden" name="{name}" value="{_escape(value)}">'
                     for name, value in chosen.items() if value or name == "application")
    choices = {key: [row["name"] for row in report[key] if row["name"] != "(other)"]
               for key in ("event_types", "versions", "platforms")}
    empty = '<p class="empty">No events in this range.</p>'
    median = report["sessions"]["median_seconds"]
    returning = [users - new for users, new in zip(column["users"], column["new_users"])]
    lengths = [(label, n) for (_, label), n in zip(SESSION_BUCKETS, parts["session_lengths"])]
    ranked = {title: _ranking_svg([(row["name"], row["events"]) for row in report[key]], title)
              for title, key in (("Event types", "event_types"), ("Platforms", "platforms"))}
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Pycolytics dashboard</title>
<style>
{DASHBOARD_CSS}</style></head><body>
{_dashboard_header(query, filters, chosen, choices, parts["applications"])}
<main>
<div class="totals"><div><b>{totals["events"]:,}</b>events</div><div><b>{totals["users"]:,}</b>players</div>
<div><b>{totals["new_users"]:,}</b>new players</div><div><b>{totals["sessions"]:,}</b>sessions</div>
<div><b>{_seconds_text(median)}</b>median session</div></div>
<section><h2>Events per day</h2>{_days_svg(dates, [("events", column["events"])], "events per day")
                                   if totals["events"] else empty}</section>
<section><h2>New and returning players per day</h2>{_legend(["new players", "returning players"]) + _days_svg(
    dates, [("new players", column["new_users"]), ("returning players", returning)], "new and returning players")
    if totals["events"] else empty}</section>
<section><h2>Retention: the share of each week's new players back on the days after their first</h2>
{_retention_section(parts["retention"])}</section>
<section><h2>Daily, weekly and monthly players</h2>{_stickiness_section(parts["stickiness"], dates)}</section>
<section><h2>Revenue</h2>{_revenue_section(parts["revenue"], dates)}</section>
<section><h2>Progression: levels</h2>{_progression_section(parts["progression"])}</section>
<section><h2>Versions</h2>{_versions_section(parts["versions"], dates)}</section>
<div class="grid">
<section><h2>Session length</h2>{_ranking_svg(lengths, "session lengths") if totals["sessions"] else empty}
<p class="empty">median {_seconds_text(median)}, 90% under {_seconds_text(report["sessions"]["p90_seconds"])},
{report["sessions"]["per_user"]} sessions per player</p></section>
{"".join(f"<section><h2>{title}</h2>{svg}</section>" for title, svg in ranked.items())}
</div>
<section><h2>Funnel</h2>{_funnel_section(parts, hidden, choices["event_types"])}</section>
<section><h2>Values</h2>{_values_section(parts, hidden, choices["event_types"])}</section>
</main>
<footer>Pycolytics {__version__} &middot; days in UTC &middot; drawn in {seconds * 1000:.0f} ms</footer>
</body></html>
"""

###############################################################################
# Documentation: /openapi.json and /docs
###############################################################################

def _event_schema(config):
    strings = {name: {"type": "string", "maxLength": config.max_string_length} for name in EVENT_FIELDS}
    return {"type": "object", "required": list(EVENT_FIELDS), "properties": dict(
        strings, value={"type": "object", "default": {}, "description": "Anything, as a JSON object."},
        api_key={"type": "string", "description": "One of the server's API keys."},
        timestamp=_client_time_schema("When the event happened, by the client's clock."),
        sent_at=_client_time_schema("When the client sent the request, by its clock: corrects a wrong clock."),
        event_id={"type": "string", "minLength": 1, "maxLength": MAX_EVENT_ID, "description": "A unique id made by "
                  "the client: an event whose id is stored for the same application is not stored again."},
    ), "additionalProperties": True}


def _client_time_schema(description):
    return {"description": description + " ISO 8601 text (UTC unless it says) or Unix seconds.", "oneOf": [
        {"type": "string", "pattern": _ISO_8601.pattern},
        {"type": "number", "minimum": 0, "maximum": _LAST_SECOND.timestamp()}]}


# Every answer the event endpoints give, written once: /docs and /openapi.json show this table,
# and a test holds README.md's table to the same statuses. (Framing refusals, 404 and 405 come
# from any path; they are here because a client of the event endpoints meets them too.)
EVENT_ANSWERS = (
    ("204", "Stored: the events are committed to the database."),
    ("400", "The body is empty, not UTF-8 or not JSON (the detail says where), or the request is malformed."),
    ("401", "A missing or unknown api_key (the detail names the events of a batch)."),
    ("403", "A key of another game, or a web page from an origin that may not send this game's events."),
    ("404", "No such path."),
    ("405", "A method this path does not take (Allow lists those it does)."),
    ("411", "A chunked body: send a Content-Length."),
    ("413", "The body is over its size limit, also once decompressed."),
    ("414", "The request line is over its size limit."),
    ("415", "A Content-Encoding other than gzip, deflate or identity."),
    ("422", "Invalid events, or too many in a batch: the detail lists every problem with its event and field."),
    ("429", "Over the rate limit: send again after Retry-After seconds."),
    ("431", "Too many header fields, or one too large."),
    ("503", "Busy, stopping, or the database cannot take events now: send again after Retry-After seconds."),
)


def openapi_document(config, url):
    """The OpenAPI 3 description of the API served at `url` (as public_url() gives it)."""
    error = {"$ref": "#/components/schemas/Error"}
    answers = {status: {"description": text} if status == "204" else
               {"description": text, "content": {"application/json": {"schema": error}}}
               for status, text in EVENT_ANSWERS}
    batch = {"type": "array", "items": {"$ref": "#/components/schemas/Event"}, "maxItems": config.max_batch_events}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Pycolytics Event API", "version": API_VERSION, "description": f"Pycolytics {__version__}"},
        "servers": [{"url": url}],
        "paths": dict({
            "/v1.0/event": _post("Store one event", {"$ref": "#/components/schemas/Event"}, answers),
            "/v1.0/events": _post("Store a batch of events, all or nothing", batch, answers),
        }, **_report_paths(error, config.max_string_length)),
        "components": {"schemas": {
            "Event": _event_schema(config),
            "Error": {"type": "object", "required": ["detail"], "properties": {"detail": {}}},
        }, "securitySchemes": {f"{kind}Key{how}": {"type": "http", "scheme": scheme} for kind in ("read", "admin")
                               for how, scheme in (("", "bearer"), ("AsPassword", "basic"))}},
    }


def _post(summary, schema, responses, security=None):
    """A POST operation with a JSON body of `schema`; `security` the schemes of the key it takes, if any."""
    operation = {"summary": summary, "security": security,
                 "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
                 "responses": responses}
    return {"post": {name: value for name, value in operation.items() if value is not None}}


def _keyed_failures(kind, error):
    """The failures documented for an endpoint that takes a `kind` ("read" or "admin") key."""
    return {code: {"description": text, "content": {"application/json": {"schema": error}}} for code, text in (
        ("400", "A bad query or body: the detail says which field."), ("401", f"No {kind} key, or a wrong one."),
        ("413", "A body over max_body_bytes."), ("422", "A body that does not name a player as it should."),
        ("403", f"Off (no {kind}_keys configured), or a key of another kind."),
        ("429", f"Too many wrong {kind} keys: retry after Retry-After seconds."),
        ("503", "The database could not be read, or the report took longer than report_timeout."))}


def _report_paths(error, longest):
    """The report API's and the player endpoints' paths; /docs defines every figure."""
    def parameter(name, description, required=False):
        return {"name": name, "in": "query", "required": required, "description": description,
                "schema": {"type": "string", "maxLength": longest}}

    common = [parameter("since", "First day (UTC, YYYY-MM-DD, inclusive); default 29 days before until."),
              parameter("until", "Last day (inclusive); default today. At most 366 days from since."),
              parameter("application", "Only this application's events; a user is then a user_id."),
              parameter("event_type", "Only events of this type."), parameter("version", "Only this version."),
              parameter("platform", "Only this platform.")]

    answers = {"application/json": {"schema": {"type": "object"}}, "text/csv": {"schema": {"type": "string"}}}

    def get(summary, parameters=()):
        return {"get": {"summary": summary, "parameters": common + list(parameters) + [
            parameter("format", "json (the default) or csv")], "security": [{"readKey": []}, {"readKeyAsPassword": []}],
            "responses": dict({"200": {"description": summary, "content": answers}},
                              **_keyed_failures("read", error))}}

    def post(summary, content):
        body = {"type": "object", "required": ["user_id"], "properties": {
            "user_id": {"type": "string", "minLength": 1}, "application": {"type": "string"},
            "after_id": {"type": "integer", "minimum": 0}}}
        return _post(summary, body, dict({"200": {"description": summary, "content": content}},
                                         **_keyed_failures("admin", error)),
                     [{"adminKey": []}, {"adminKeyAsPassword": []}])

    return {
        "/v1.0/report": get("Events, players, new players, sessions per day; retention; session lengths; rankings"),
        "/v1.0/report/funnel": get("Players who did each step at or after the one before", [
            parameter("steps", "Event types separated by commas, at most 10.", True)]),
        "/v1.0/report/values": get("The distribution of one field of the value of one event type", [
            parameter("field", "A key of the events' value.", True)]),
        "/v1.0/report/retention": get("Daily and weekly cohorts and the range's D1 to D30", [
            parameter("min_cohort", f"Weekly cohorts with fewer new players join the next; default {MIN_COHORT}.")]),
        "/v1.0/report/revenue": get("Revenue per day and currency, paying players, conversion, ARPDAU, ARPPU, items"),
        "/v1.0/report/progression": get("Per level: started, completed, failed, attempts, time, where players stop", [
            parameter("churn_days", f"Days without an event after which a player has stopped; default {CHURN_DAYS}.")]),
        "/v1.0/report/stickiness": get("DAU, WAU, MAU and DAU/MAU per day"),
        "/v1.0/report/versions": get("Events and players per version and day"),
        "/v1.0/player/erase": post("Erase every event of one player: {\"removed\": N}", {
            "application/json": {"schema": {"type": "object"}}}),
        "/v1.0/player/export": post("Every event of one player, as JSON Lines", {
            "application/x-ndjson": {"schema": {"type": "string"}}}),
    }


DOCS_CSS = ("body{font:16px/1.5 system-ui,sans-serif;max-width:50em;margin:2em auto;padding:0 1em}"
            "code,pre{background:#f4f4f4}pre{padding:1em;overflow:auto}td{padding:.2em .8em;vertical-align:top}")


def docs_page(config, url):
    """The /docs page of the API served at `url` (as public_url() gives it, HTML-escaped)."""
    example = {"event_type": "level_started", "application": "my-game", "version": "1.0.2", "platform": "Linux",
               "user_id": "3f2a9c1e", "session_id": "a81c0f", "value": {"level": 3}, "api_key": DEV_KEY}
    rows = "".join(f"<tr><td><code>{name}</code></td><td>string, required, at most {config.max_string_length} "
                   "characters</td></tr>" for name in EVENT_FIELDS)
    answers = "".join(f"<tr><td>{status}</td><td>{_escape(text)}</td></tr>\n" for status, text in EVENT_ANSWERS)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Pycolytics Event API</title>
<style>{DOCS_CSS}</style></head><body>
<h1>Pycolytics Event API {API_VERSION}</h1>
<p>Pycolytics {__version__}. The machine-readable description is <a href="openapi.json">openapi.json</a>.</p>
<h2>POST /v1.0/event</h2><p>One event, as a JSON object:</p>
<pre>{json.dumps(example, indent=2)}</pre>
<h2>POST /v1.0/events</h2>
<p>A JSON array of at most {config.max_batch_events} events. All or nothing: if any event is refused, none is stored.</p>
<h2>Fields</h2><table>{rows}
<tr><td><code>value</code></td><td>a JSON object, optional (default <code>{{}}</code>), at most {config.max_value_bytes}
bytes as JSON and {config.max_value_depth} levels deep</td></tr>
<tr><td><code>api_key</code></td><td>one of the server's keys (a game's own key is good for that game only)</td></tr>
<tr><td><code>timestamp</code></td><td>optional: when it happened, by the client's clock; ISO 8601
(<code>2024-05-01T12:00:00Z</code>, UTC unless it says) or Unix seconds</td></tr>
<tr><td><code>sent_at</code></td><td>optional: when the client sent the request, by the same clock; the server then
corrects the clock's error. The stored <code>time</code> is the best estimate of when the event happened, never in
the future; <code>received_at</code> keeps the receive time.</td></tr>
<tr><td><code>event_id</code></td><td>optional: the client's unique string of at most {MAX_EVENT_ID} characters; an
event whose id is already stored for the same application is acknowledged, not stored again: retries are safe</td></tr>
</table><p>Other fields are ignored. The body may be at most {config.max_body_bytes} bytes, also after decompression
(<code>Content-Encoding: gzip</code> or <code>deflate</code>); any Content-Type is accepted, so browsers can post
<code>text/plain</code> without a preflight. Every answer carries CORS headers for allowed origins, and
<code>OPTIONS</code> answers preflights.</p>
<h2>Answers</h2><table>{answers}</table>
<p>Every error has a JSON body <code>{{"detail": ...}}</code> saying what to fix.</p>
{CLIENT_AND_OPERATIONS_DOCS}
{REPORTS_DOCS.format(days=DASHBOARD_DAYS, longest=MAX_REPORT_DAYS, top=REPORT_TOP, cohort=MIN_COHORT,
                     churn=CHURN_DAYS, bins=HISTOGRAM_BINS, few=FEW_VALUES, levels=MAX_LEVELS)}
{_conventions_docs(config)}
{PLAYERS_DOCS.format(export=MAX_PLAYER_EXPORT)}
{_privacy_html(config)}
<h2>Example</h2>
<pre>curl -i {url}/v1.0/event -H 'Content-Type: application/json' -d '{json.dumps(example)}'</pre>
</body></html>
"""


CLIENT_AND_OPERATIONS_DOCS = """<h2>GET /v1.0/client.js: the browser client</h2>
<p>A small script without dependencies, for games and apps in a browser (Godot and Unity web exports, for
example). No key is needed to load it; browsers cache it and revalidate it by its ETag.</p>
<pre>&lt;script src="https://analytics.example.com/v1.0/client.js"&gt;&lt;/script&gt;
&lt;script&gt;
  Pycolytics.init({url: "https://analytics.example.com", apiKey: "...", application: "my-game",
                   version: "1.0.2", platform: "Web"});
  Pycolytics.track("level_started", {level: 3});
&lt;/script&gt;</pre>
<p><code>url</code> is the collector's base address (a trailing slash does not matter). Each event gets the
<code>user_id</code> kept in localStorage (with <code>persistentUser: false</code>, a new one per page load), a
<code>session_id</code> new with each page load, its <code>timestamp</code> and a fresh <code>event_id</code>.
Events go in batches of <code>batchSize</code> (default 20) or every <code>interval</code> seconds (default 5),
with <code>sent_at</code>; bodies over 1 KiB are gzip-compressed where the browser has
<code>CompressionStream</code> (which costs one preflight, which the browser then caches); smaller ones go as
<code>text/plain</code> without a preflight.</p>
<p>Nothing is lost and nothing is stored twice: events wait in localStorage until the collector acknowledges
them (at most <code>maxQueue</code>, default 1000; when it is full the oldest are dropped and counted). A network
error, 408, 429 or 5xx is sent again with the same <code>event_id</code>s, after an exponential backoff (1 s,
doubling, at most 60 s, with jitter) and never before <code>Retry-After</code>. Any other 4xx is not sent again
and is logged to the console once per page; after a 422 only the events it names are dropped. When the page is
hidden or closed the queue also goes out with <code>navigator.sendBeacon</code> (up to 60 kB) and stays queued,
since a beacon's answer is never seen: the next page load sends it again, and its <code>event_id</code>s make
that safe. <code>Pycolytics.flush()</code> sends now; <code>Pycolytics.stats()</code> says how many events are
<code>queued</code>, <code>dropped</code> (in total) and <code>refused</code> (by this page).</p>
<h2>Operations</h2>
<p><code>GET /healthz</code>: 200 while the database takes writes, 503 when it does not.
<code>GET /metrics</code>: Prometheus counters. <code>GET /dashboard</code>: charts of the events, opened with a read
key (HTTP Basic password or <code>Authorization: Bearer</code>).</p>"""

PLAYERS_DOCS = """<h2>Players' data: erase, export, and what is kept</h2>
<p><code>POST /v1.0/player/erase</code> and <code>POST /v1.0/player/export</code>, with one of
<code>admin_keys</code> (read and write keys get 403), take <code>{{"user_id": "...", "application": "..."}}</code>
(the application may be left out: every application). Erasing deletes every event of the player, in small steps,
and their rows of the summaries, and answers <code>{{"removed": N}}</code> (0 for an unknown player; asking twice
is harmless); the log says an erasure happened, without the id. Exporting answers the player's events as JSON
Lines, at most {export} at a time: when there are more, the header
<code>Pycolytics-Next-After-Id</code> gives the <code>after_id</code> of the next request. Both take the raw id,
also where it is stored hashed. The same from the command line:
<code>python3 pycolytics.py forget --user ID</code> and <code>export --user ID</code>.</p>"""


REPORTS_DOCS = """<h2>Reports: GET /v1.0/report and its views</h2>
<p>The figures behind the dashboard, as JSON (or CSV with <code>format=csv</code>: the list each view names), with
a read key. Query: <code>since</code> and <code>until</code> (UTC days, inclusive; default the last {days} days up to
today; at most {longest} days), <code>application</code>, and the filters <code>event_type</code>,
<code>version</code>, <code>platform</code> (a filtered report is that of a database holding only the matching
events). Any bad query is a 400 with <code>detail</code>. Each list is a list of flat records, so pandas takes it
as it is: <code>pd.json_normalize(report["days"])</code>, or <code>pd.read_csv(url + "&amp;format=csv",
storage_options={{"Authorization": "Bearer READ_KEY"}})</code>. Reports read summaries, and each may take
<code>report_timeout</code> seconds at most (then 503).</p>
<ul><li><code>/v1.0/report</code>: <code>days</code>, one row per day of the range, zeros included (CSV: these). A
player (user) is a <code>user_id</code> within the application when one is given, an (application, user_id) pair
otherwise; a session likewise. <code>new_users</code> of a day: players whose first event ever (in the whole
database) falls on that day. <code>retention</code>: per day with new players, <code>day_N</code> is the share of
them with an event on exactly the N-th day after (1 to 7, 14 and 30; <code>null</code> while that day is after until
or today). <code>sessions</code>: distinct session_ids; a session lasts from its first to its last event in the
range; <code>median_seconds</code> and <code>p90_seconds</code> are nearest-rank percentiles; <code>per_user</code>
is sessions / players. <code>event_types</code>, <code>versions</code>, <code>platforms</code>: the top {top} by
events, with their players, then one <code>"(other)"</code> row for the rest.</li>
<li><code>/retention?min_cohort=N</code>: the same <code>daily</code> cohorts, <code>weekly</code> ones (the new
players of each 7 days from since; a week with fewer than N, default {cohort}, joins the next, and the last such
joins the one before; CSV: these), and <code>average</code>: D1 to D30 of all the range's new players together (each
cohort weighted by its players; a day counts only the players whose day N has come).</li>
<li><code>/stickiness</code>: per day <code>dau</code> (players that day), <code>wau</code> and <code>mau</code>
(players of the 7 and 30 days up to it) and <code>dau_mau</code>.</li>
<li><code>/versions</code>: the top {top} versions by events, and per day and version its events and players.</li>
<li><code>/revenue</code>: from purchase events (below). Per day and currency: <code>revenue</code> (the sum of
prices), <code>purchases</code>, <code>paying_users</code>, <code>active_users</code>, <code>conversion</code>
(players who paid that day / players that day) and <code>arpdau</code> (revenue / players that day). Per currency
over the range: the same, <code>arppu</code> (revenue / paying players) and <code>arpdau</code> (revenue / the
range's player-days). <code>conversion</code> of the range: paying players / players. <code>first_purchase</code>:
the players whose first purchase ever falls in the range, by days after their first day. <code>items</code>: the
top {top} (currency, item) by revenue. No currency is converted: one line per currency.</li>
<li><code>/progression?churn_days=N</code>: per level (numbers by value, then names; {levels} at most): players who
<code>started</code>, <code>completed</code> and <code>failed</code> it in the range, <code>completion_rate</code>
(completed / started), <code>median_attempts</code> (per player who completed it: starts / completions),
<code>median_seconds_to_complete</code> (first completion after first start) and <code>last_level_of_churned</code>:
of the players with no event in the last N days of the range (default {churn}), how many reached this level last
(the level they reached, or first completed, latest).</li>
<li><code>/funnel?steps=a,b,c</code>: the players who did <code>a</code>, then <code>b</code> at or after their
first <code>a</code>, then <code>c</code> at or after that <code>b</code>, within the range.</li>
<li><code>/values?event_type=E&amp;field=F</code>: <code>value[F]</code> of the events of type E: numbers as
count, min, p50, p90, max, sum, a <code>histogram</code> of at most {bins} bins of a round width, and
<code>values</code>, value by value, when there are {few} distinct values or fewer (levels 1 to 40); strings (and
true/false) as the top {top} with "(other)"; <code>missing</code> counts events without a number or string
there.</li></ul>
"""


def _conventions_docs(config):
    """The game-analytics conventions in force, for /docs."""
    rows = "".join(f"<tr><td><code>{name}</code></td><td><code>{_escape(getattr(config, name))}</code></td>"
                   f"<td>{_escape(SETTINGS_BY_NAME[name].description)}</td></tr>" for name in CONVENTIONS)
    return (f"<h2>Purchases and levels</h2><p>The revenue and progression views read events by these conventions "
            f"(settings, also per <code>[app:NAME]</code>; a change makes the summaries again):</p><table>{rows}</table>"
            "<p>A purchase is an event of <code>purchase_event</code> whose value has a number at "
            "<code>price_field</code>; <code>currency_field</code> and <code>item_field</code> are text (missing: "
            "empty). A level event's level is the number or text at <code>level_field</code>.</p>")


def privacy_facts(config):
    """What this server keeps of players, as (heading, sentences): for /docs, `privacy` and the stores' forms."""
    hashing = sorted(name or "every application without a section" for name in [None, *config.apps]
                     if config.for_app(name, "hash_user_ids"))
    kept = (f"Events are deleted {config.retention_days:g} days after the midnight (UTC) of their day, whole days at a "
            "time, with their summaries." if config.retention_days else
            "Events are kept until deleted: retention_days = 0. Choose a retention (pycolytics.ini recommends one).")
    return [
        ("What is stored, per event", [
            "event_type, application, version, platform, user_id, session_id and value: as the game sends them "
            "(value holds whatever the game puts in it).",
            "time (when it happened, by the client's clock if given), received_at, event_id (if the client made one).",
            "Not stored: the api_key, the client's IP address, its headers, cookies or anything else of the request.",
            "Summaries for reports (tables pycolytics_*) hold per player the days, sessions, levels and purchases "
            "made from the same events; they go with the events."]),
        ("Identifiers", [
            ("user_id and session_id are stored as keyed hashes (HMAC-SHA256 with id_secret) for: "
             + ", ".join(hashing) + ". They are pseudonymous, not anonymous: the same player gets the same hash."
             ) if hashing else "user_id and session_id are stored as the game sends them (hash_user_ids = no).",
            "The browser client keeps a random user id in the browser's localStorage, unless the page asks for "
            "consent first (Pycolytics.init({consent: \"pending\"})) or opts out."]),
        ("How long", [kept]),
        ("Logs", [
            "The access log names each request's client address." if config.log_addresses and not config.quiet else
            "The log names no client address." if not config.log_addresses else "No access log (quiet = yes)."]),
        ("Players' requests", [
            "Erase one player: python3 pycolytics.py forget --user ID, or POST /v1.0/player/erase with an admin key.",
            "Give a player their data: python3 pycolytics.py export --user ID, or POST /v1.0/player/export."]),
        ("For the stores' privacy forms", [
            "Data collected: app activity (app interactions: the events) and an identifier (the user_id)"
            + (", stored hashed" if hashing else "") + "; purchase history if the game sends purchase events.",
            "Shared with third parties: no; it stays on this server. Used for tracking across other companies' apps: "
            "no. Used for: analytics.",
            "Encrypted in transit: " + ("yes (HTTPS)." if config.certfile else "only if served over HTTPS "
                                        "(certfile, or a TLS proxy in front)."),
            "Players may ask for deletion: yes (above)."]),
    ]


def _privacy_html(config):
    return "".join(f"<h3>{_escape(heading)}</h3><ul>" + "".join(f"<li>{_escape(line)}</li>" for line in lines) + "</ul>"
                   for heading, lines in privacy_facts(config))


###############################################################################
# The browser client: /v1.0/client.js
###############################################################################

# Kept here, like the dashboard's markup, so that the collector stays one file.
CLIENT_JS = r"""/* Pycolytics browser client, served by the collector at /v1.0/client.js (documented at /docs).
   Pycolytics.init({url, apiKey, application, version, platform, consent}); Pycolytics.track(type, value);
   Pycolytics.setConsent("granted" | "denied" | "pending"); Pycolytics.optOut() is setConsent("denied").
   Events wait in localStorage until acknowledged; each has an event_id, so a batch sent again is stored once. */
(function (global) {
  "use strict";
  if (global.Pycolytics) return;

  const MAX_BATCH_BYTES = 262144;  // a quarter of the collector's default body limit
  const BEACON_BYTES = 60000;  // browsers refuse beacons beyond 64 KiB in flight
  const COMPRESS_FROM = 1024;  // smaller bodies go as they are: gzip would save little
  const REQUEST_TIMEOUT = 30000;  // ms before a request without an answer counts as failed
  const MAX_BACKOFF = 60000;  // ms between retries at most, before jitter
  const MAX_RETRY_AFTER = 600;  // seconds of a Retry-After taken at most

  let settings = null, keys = null, local = null, userId = null, sessionId = null, consent = null;
  let sending = false, timer = null, timerAt = 0, retryAt = 0, failures = 0, refused = 0;
  let complained = false, warned = false;  // each once per page: a game may track thousands of events
  // Events tracked during the current task, saved together when it ends: rewriting the queue in
  // localStorage takes milliseconds when it is long, and a game may track many events in one frame.
  let unsaved = [], size = 0;
  const memory = new Map();  // the queue when localStorage is blocked (storage off, sandboxed frame)

  function localStorageOrNull() {
    try {
      global.localStorage.getItem(keys.queue);
      return global.localStorage;
    } catch (error) {
      return null;
    }
  }

  function read(key) {
    try {
      return local ? local.getItem(key) : (memory.get(key) ?? null);
    } catch (error) {
      return null;
    }
  }

  function write(key, text) {
    try {
      if (local) local.setItem(key, text);
      else memory.set(key, text);
      return true;
    } catch (error) {
      return false;  // over the storage quota
    }
  }

  function stored() {
    try {
      const events = JSON.parse(read(keys.queue) || "[]");
      return Array.isArray(events) ? events : [];
    } catch (error) {
      return [];
    }
  }

  function queued() {
    if (unsaved.length) save();
    return stored();
  }

  function save() {
    const events = stored().concat(unsaved);
    unsaved = [];
    keep(events);
  }

  function keep(events) {
    let dropped = Math.max(0, events.length - settings.maxQueue);
    events = events.slice(dropped);
    while (!write(keys.queue, JSON.stringify(events))) {
      if (!events.length) local = null;  // not even an empty queue fits: keep it in memory
      const oldest = Math.ceil(events.length / 2);
      dropped += oldest;
      events = events.slice(oldest);
    }
    size = events.length;
    if (dropped) {
      count(dropped);
      if (!warned) console.warn("Pycolytics: the queue is full; the oldest events are dropped (see Pycolytics.stats())");
      warned = true;
    }
  }

  function count(dropped) {
    write(keys.dropped, String((Number(read(keys.dropped)) || 0) + dropped));
  }

  function forget(batch) {
    const ids = new Set(batch.map((event) => event.event_id));
    keep(queued().filter((event) => !ids.has(event.event_id)));
    return ids.size;
  }

  function newId() {
    const bytes = new Uint8Array(16);
    if (global.crypto && global.crypto.getRandomValues) global.crypto.getRandomValues(bytes);
    else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
    return Array.from(bytes, (byte) => (byte + 256).toString(16).slice(1)).join("");
  }

  function positive(value, otherwise) {
    return typeof value === "number" && value > 0 ? value : otherwise;
  }

  function accepted(value, caller) {
    if (["pending", "granted", "denied"].includes(value)) return value;
    throw new TypeError(caller + ': consent must be "pending", "granted" or "denied"');
  }

  function init(options) {
    options = options || {};
    const absent = ["url", "apiKey", "application"].find((name) => !options[name] || typeof options[name] !== "string");
    if (absent) throw new TypeError(`Pycolytics.init: ${absent} is required`);
    // Not given: granted, so that pages written before consent existed keep working as they did.
    const wanted = options.consent === undefined ? "granted" : accepted(options.consent, "Pycolytics.init");
    settings = {
      url: options.url.replace(/\/+$/, "") + "/v1.0/events", apiKey: options.apiKey, application: options.application,
      version: String(options.version ?? ""), platform: String(options.platform ?? "Web"),
      batchSize: Math.min(positive(options.batchSize, 20), 1000), interval: positive(options.interval, 5) * 1000,
      maxQueue: positive(options.maxQueue, 1000), persistentUser: options.persistentUser !== false,
    };
    const prefix = "pycolytics:" + options.application + ":";
    keys = {prefix, queue: prefix + "queue", user: prefix + "user", dropped: prefix + "dropped"};
    // Until consent is granted, the queue and the user id live in memory, as where localStorage is blocked.
    [local, consent, userId, sessionId] = [null, "pending", newId(), newId()];
    change(wanted);
  }

  function setConsent(value) {
    const wanted = accepted(value, "Pycolytics.setConsent");
    if (!settings) throw new Error("Pycolytics.setConsent: call Pycolytics.init first");
    change(wanted);
  }

  function change(wanted) {
    const was = consent;
    consent = wanted;
    if (wanted === "denied") erase();
    else if (wanted === "pending") local = null;
    else if (was !== "granted") grant();
  }

  function grant() {
    const waiting = queued(), dropped = Number(read(keys.dropped)) || 0;  // in memory until now
    memory.delete(keys.queue);  // the user id stays: where localStorage is blocked it is kept there
    memory.delete(keys.dropped);
    local = localStorageOrNull();
    if (settings.persistentUser) write(keys.user, userId = read(keys.user) || userId);
    if (dropped) count(dropped);
    // One player is one user: what they did before saying yes goes under the id they have now.
    unsaved = waiting.map((event) => Object.assign(event, {user_id: userId}));
    size = queued().length;
    schedule(0);  // what earlier pages left unacknowledged, and what waited for consent
  }

  // Every key of this client goes, those of older versions too; the in-memory queue with them.
  function erase() {
    unsaved = [];
    memory.clear();
    const storage = localStorageOrNull();
    for (const key of storage ? Object.keys(storage) : []) if (key.startsWith(keys.prefix)) storage.removeItem(key);
    local = null;  // so that the answer of a request still in flight saves nothing
  }

  function track(type, value = {}) {
    if (!settings) throw new Error("Pycolytics.track: call Pycolytics.init first");
    if (consent === "denied") return null;
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      throw new TypeError("Pycolytics.track: value must be an object, like {level: 3}");
    }
    const event = {
      event_type: String(type), application: settings.application, version: settings.version,
      platform: settings.platform, user_id: userId, session_id: sessionId,
      value: JSON.parse(JSON.stringify(value)), api_key: settings.apiKey,
      timestamp: new Date().toISOString(), event_id: newId(),
    };
    if (unsaved.push(event) === 1) Promise.resolve().then(save);
    schedule(size + unsaved.length >= settings.batchSize ? 0 : settings.interval);
    return event.event_id;
  }

  function schedule(delay) {
    const at = Math.max(Date.now() + delay, retryAt);
    if (sending || (timer !== null && timerAt <= at)) return;
    clearTimeout(timer);
    timerAt = at;
    timer = setTimeout(send, at - Date.now());
  }

  function send() {
    timer = null;
    if (consent !== "granted") return;  // a timer set before consent was withdrawn
    const batch = nextBatch(queued());
    if (!batch.length) return;
    sending = true;
    Promise.resolve(batch).then(post)
      .then((response) => answered(batch, response), () => later(null))
      .catch(() => later(null))
      .then((retrying) => {
        sending = false;
        const left = queued().length;
        if (left) schedule(retrying || left >= settings.batchSize ? 0 : settings.interval);
      });
  }

  function nextBatch(events) {
    const batch = [];
    let bytes = 2;
    for (const event of events) {
      bytes += JSON.stringify(event).length + 1;
      if (batch.length >= settings.batchSize || (batch.length && bytes > MAX_BATCH_BYTES)) break;
      batch.push(event);
    }
    return batch;
  }

  function post(batch) {
    const sentAt = new Date().toISOString();
    const text = JSON.stringify(batch.map((event) => ({...event, sent_at: sentAt})));
    return compressed(text).then((body) => {
      // text/plain needs no preflight; Content-Encoding does, which the browser then caches
      const headers = {"Content-Type": "text/plain"};
      if (typeof body !== "string") headers["Content-Encoding"] = "gzip";
      const abort = new AbortController();
      const timeout = setTimeout(() => abort.abort(), REQUEST_TIMEOUT);
      return fetch(settings.url, {method: "POST", headers, body, credentials: "omit", signal: abort.signal})
        .finally(() => clearTimeout(timeout));
    });
  }

  function compressed(text) {
    if (text.length < COMPRESS_FROM || typeof CompressionStream !== "function") return Promise.resolve(text);
    const stream = new Blob([text]).stream().pipeThrough(new CompressionStream("gzip"));
    return new Response(stream).arrayBuffer().catch(() => text);
  }

  // true when the batch is to be sent again (after retryAt), false when it is done with
  function answered(batch, response) {
    const status = response.status;
    if (status < 300) {
      forget(batch);
      failures = 0;
      return false;
    }
    if (status === 408 || status === 429 || status >= 500) return later(response.headers.get("Retry-After"));
    return response.json().catch(() => null).then((answer) => {
      refuse(status === 422 ? namedEvents(answer, batch) : batch, status, answer);
      return false;
    });
  }

  function later(retryAfter) {
    failures += 1;
    const backoff = Math.min(MAX_BACKOFF, 1000 * 2 ** (failures - 1)) * (0.5 + Math.random());
    let asked = /^\s*\d+\s*$/.test(retryAfter || "") ? Number(retryAfter) : (Date.parse(retryAfter) - Date.now()) / 1000;
    asked = Math.min(asked > 0 ? asked : 0, MAX_RETRY_AFTER) * 1000;
    retryAt = Date.now() + Math.max(backoff, asked ? asked + Math.random() * 1000 : 0);
    return true;
  }

  // A 422 names the events it refuses; the others go again.
  function namedEvents(answer, batch) {
    const problems = answer && Array.isArray(answer.detail) ? answer.detail : [];
    const named = problems.map((problem) => problem && Array.isArray(problem.loc) && batch[problem.loc[1]]);
    return named.some(Boolean) ? named.filter(Boolean) : batch;
  }

  function refuse(events, status, answer) {
    refused += forget(events);
    failures = 0;
    const text = `Pycolytics: the collector refused ${events.length} event(s) with HTTP ${status}; they are dropped`;
    if (!complained) console.error(text + ", not sent again. Later refusals are not logged.", answer && answer.detail);
    complained = true;
  }

  // The page is going away, or may be killed in the background: a beacon is the last chance.
  // Its answer is never seen, so the events stay queued and the next page sends them again.
  function beacon() {
    if (consent !== "granted" || !navigator.sendBeacon) return;
    const sentAt = new Date().toISOString(), parts = [];
    let bytes = 2;
    for (const event of queued()) {
      const text = JSON.stringify({...event, sent_at: sentAt});
      bytes += new Blob([text]).size + 1;
      if (bytes > BEACON_BYTES) break;
      parts.push(text);
    }
    if (parts.length) navigator.sendBeacon(settings.url, new Blob(["[" + parts.join(",") + "]"], {type: "text/plain"}));
  }

  global.addEventListener("pagehide", beacon);
  global.document.addEventListener("visibilitychange", () => global.document.visibilityState === "hidden" && beacon());

  global.Pycolytics = {
    init, track, setConsent,
    optOut: () => setConsent("denied"),
    flush: () => settings && schedule(0),
    stats: () => ({queued: settings ? queued().length : 0, dropped: settings ? Number(read(keys.dropped)) || 0 : 0,
                   refused, failures, consent}),
  };
})(window);
"""

_CLIENT_BODY = CLIENT_JS.encode()
# A page keeps the script for an hour, then revalidates it by its ETag (304 until it changes). A cross-origin isolated
# page (COEP require-corp, as Godot 4's threaded web export needs) loads another origin's script only if it says it may.
_CLIENT_HEADERS = [("ETag", f'"{binascii.crc32(_CLIENT_BODY):08x}"'), ("Cache-Control", "public, max-age=3600"),
                   ("Cross-Origin-Resource-Policy", "cross-origin")]


def client_script(environ):
    """GET /v1.0/client.js: the script, or a 304 when the browser's copy is this one."""
    etag = _CLIENT_HEADERS[0][1]
    tags = (environ.get("HTTP_IF_NONE_MATCH") or "").split(",")
    if any(tag.strip() in ("*", etag, "W/" + etag) for tag in tags):
        return "304 Not Modified", list(_CLIENT_HEADERS), b""
    return _ok(_CLIENT_BODY, ("Content-Type", "text/javascript; charset=utf-8"), *_CLIENT_HEADERS)


###############################################################################
# The server's process: signals, reloads, systemd, the log
###############################################################################

def server_limits(config):
    """The ServerLimits of `config`: its settings of the same names, and two made of others."""
    made = {"drain_seconds": config.request_timeout + config.busy_timeout, "log_requests": not config.quiet}
    return ServerLimits(**{name: getattr(config, name) for name in ServerLimits._fields if name not in made}, **made)


def serve(config, load=None):
    """Run the built-in server until SIGTERM or SIGINT; return the exit status. SIGHUP puts load()'s Config in force."""
    tls = tls_context(config)
    try:
        app = Pycolytics(config)
        app.open()
    except ConfigError:
        raise
    except Exception as error:  # the database's own errors, whichever it is
        log.error("cannot open the database %s: %s", _redacted(config.database), error)
        return 1
    try:
        server = Server(app, server_limits(config), listening_socket(config.host, config.port), tls=tls,
                        reload=lambda: _reload(app, server, load))
    except OSError as error:
        log.error("cannot serve on %s:%s: %s", config.host, config.port, error)
        app.close()
        return 1
    server.log = sink = _log_to_sink()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, server.shutdown)
    if load is not None and hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, server.request_reload)
    _warn_about(config)
    log.info("Pycolytics %s listening on %s (database: %s)", __version__, server.url, _redacted(config.database))
    notify_systemd("READY=1")
    try:
        server.serve_forever()
    finally:
        notify_systemd("STOPPING=1")
        app.close()
    log.info("stopped; every acknowledged event is committed")
    sink.drain()
    return 0


def _reload(app, server, load):
    """Read the configuration again and put it in force; a bad one changes nothing."""
    notify_systemd(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        config = load()
        warnings = restart_only_changes(config, app.config)
        tls = tls_context(config)
    except ConfigError as error:
        log.error("reload failed; the configuration in force stays: %s", error)
    else:
        for warning in warnings:
            log.warning("%s", warning)
        app.reconfigure(config)
        server.reconfigure(server_limits(config), tls)
        if config.retention_days:
            app.writer.prune_soon()
        _warn_about(config)
        log.info("configuration reloaded" + (" except what takes a restart" if warnings else ""))
    notify_systemd("READY=1")


def tls_context(config):
    """An SSLContext for HTTPS with config's certificate (TLS 1.2 at least), or None for plain HTTP. ssl is
    imported only here: OpenSSL costs 3.5 MB that plain-HTTP servers (and those behind nginx) never need."""
    if not config.certfile:
        return None
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    for name in ("certfile", "keyfile"):
        try:
            open(getattr(config, name), "rb").close()
        except OSError as error:
            raise ConfigError(f"cannot load {name} {getattr(config, name)}: {error.strerror} (a PEM file is needed)") from None
    try:
        context.load_cert_chain(config.certfile, config.keyfile, password=functools.partial(_no_pass_phrase, config))
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"cannot load certfile {config.certfile} with keyfile {config.keyfile}: {error}") from None
    return context


def _no_pass_phrase(config):
    """Called by OpenSSL for an encrypted key, instead of a prompt that would stop the loop (or wait under systemd)."""
    raise ConfigError(f"keyfile {config.keyfile} is encrypted; give it unencrypted, readable only by the server "
                      "(openssl pkey -in ENCRYPTED.pem -out KEY.pem)")


def notify_systemd(state):
    """Tell systemd our state (Type=notify): READY=1, RELOADING=1, STOPPING=1. A no-op elsewhere."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address[0] == "@":  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as error:
        log.warning("cannot notify systemd at %s: %s", address, error)


class LogSink:
    """A stream for log lines that never blocks and never raises: stderr can stall (a pipe nobody reads) or break
    (`| tee` died), which would stop the event loop. Lines wait in a bounded buffer for a thread of their own; when
    it is full they are dropped, and the next line that fits says how many."""

    def __init__(self, stream, limit=LOG_BUFFER_BYTES):
        self._stream, self._limit = stream, limit
        self._lines = collections.deque()
        self._size = self._dropped = 0
        self._ready = threading.Condition(threading.Lock())
        self._thread = threading.Thread(target=self._run, name="pycolytics-log", daemon=True)
        self._thread.start()

    def write(self, text):
        with self._ready:
            if self._size + len(text) > self._limit:
                self._dropped += 1
                return
            if self._dropped:
                text = f"[{self._dropped} log lines dropped: the log could not keep up]\n{text}"
                self._dropped = 0
            if not self._lines:
                self._ready.notify()
            self._lines.append(text)
            self._size += len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        pass  # the thread flushes; a caller must not wait for stderr

    def drain(self, timeout=1.0):
        """Give the thread a moment to write what is buffered (at exit)."""
        deadline = time.monotonic() + timeout
        while self._lines and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run(self):
        while True:
            with self._ready:
                while not self._lines:
                    self._ready.wait()
                text = "".join(self._lines)
                self._lines.clear()
                self._size = 0
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError):
                pass  # stderr is closed or broken: the server goes on without its log


def _log_to_sink():
    """Route the log's stderr handlers through a LogSink, so that no log line can block or stop serving."""
    sink = LogSink(sys.stderr)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
            handler.setStream(sink)
    return sink


def _redacted(database):
    """A database to show in logs: a file's absolute path, a URL without its password."""
    if "://" not in database:
        return os.path.abspath(database)
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", database)


def _warn_about(config):
    """What start-up and each reload warn about: the public development key, keeping events forever."""
    if config.workers != "1":
        log.warning("workers = %s: no longer used, one process serves (it took single events faster than two;"
                    " docs/performance.md)", config.workers)
    if config.dev_key_active:
        log.warning("no api_keys are configured: accepting the public development key %r. "
                    "Set api_keys before you ship a game.", DEV_KEY)
    if not config.retention_days:
        log.info("retention_days = 0: events are kept forever; choose a retention (pycolytics.ini says why)")


###############################################################################
# The command line
###############################################################################


def keygen(arguments, config):
    import secrets  # here: serving never needs it
    print(secrets.token_urlsafe(32))
    return 0


def _moment(text, option):
    """A stored-time text from a command line time (ISO 8601 or Unix seconds)."""
    moment = _client_time(float(text) if re.fullmatch(r"-?\d+(\.\d*)?", text) else text)
    if moment is None:
        raise UsageError(f"{option} {text!r} is not a time: give ISO 8601 (2024-05-01, 2024-05-01T12:00Z) or Unix seconds")
    return moment.strftime(TIME_FORMAT)


def _existing_store(config):
    """The store of config.database, which must exist: a typo in --database is an error, not a new empty file."""
    store = store_for(config)
    if not store.exists():
        raise UsageError(f"there is no database {os.path.abspath(config.database)}: check --database "
                         "or the configuration's database (only the server creates a database)")
    return store


def export(arguments, config):
    import csv  # here: serving never needs it
    moments = {option: _moment(getattr(arguments, option), f"--{option}")
               for option in ("since", "until") if getattr(arguments, option)}
    if arguments.output and os.path.exists(arguments.output) and not arguments.force:
        raise UsageError(f"{arguments.output} exists; pass --force to overwrite it")
    store = _existing_store(config)
    connection = store.read()
    rows = (_events(store, connection, arguments, moments) if arguments.user is None else  # a player's own data
            player_events(store, connection, config, arguments.user, arguments.application))
    chosen = arguments.format or ("csv" if arguments.user is None else "jsonl")
    output = open(arguments.output, "w", encoding="utf-8", newline="") if arguments.output else sys.stdout
    count = 0
    try:
        writer = csv.writer(output) if chosen == "csv" else None
        if writer:
            writer.writerow(EXPORT_COLUMNS)
        for count, row in enumerate(rows, 1):
            writer.writerow([_inert(cell) for cell in row]) if writer else output.write(_record(row))
        output.flush()
    except BrokenPipeError:  # the reader has what it wanted (`export | head`)
        if output is not sys.stdout:
            raise
        return 0
    finally:
        if output is not sys.stdout:
            output.close()
        rows.close()
        connection.close()
    log.info("exported %d events", count)
    return 0


def _events(store, connection, arguments, moments):
    """The rows (EXPORT_COLUMNS) of the events an export asks for, in id order, streamed."""
    conditions, parameters = [], []
    if arguments.application is not None:
        conditions.append("application = ?")
        parameters.append(arguments.application)
    scan = "+time" if store.dialect is SQLITE else "time"  # the unary + keeps SQLite in id order, off the time index
    for option, comparison in (("since", ">="), ("until", "<")):
        if option in moments:
            conditions.append(f"{scan} {comparison} {store.dialect.time}")
            parameters.append(moments[option])
    where = " WHERE " + " AND ".join(conditions) if conditions else ""
    return store.rows(connection, store.dialect.sql(f"SELECT {_export_columns(store, connection)} FROM event{where}"
                                                    " ORDER BY id"), parameters)


def _asked(arguments, question, refusal):
    """Whether to go on: --yes, or yes at the terminal; a UsageError without a terminal to ask on."""
    if arguments.yes:
        return True
    if not sys.stdin.isatty():
        raise UsageError(refusal + " (standard input is not a terminal to ask on)")
    answer = input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    if not answer:
        log.info("deleted nothing")
    return answer


def prune(arguments, config):
    before = _moment(arguments.before, "--before")
    store = _existing_store(config)
    with contextlib.closing(store.read()) as connection:
        found = connection.execute(store.dialect.sql(f"SELECT count(*) FROM event WHERE time < {store.dialect.time}"),
                                   (before,)).fetchone()[0]
    log.info("%d events are from before %s", found, before)
    if arguments.dry_run or not found or not _asked(
            arguments, f"Delete {found} events from before {before}?",
            f"this would delete {found} events; pass --yes to delete them without a question"):
        return 0 if arguments.dry_run or not found else 1
    deleted = 0
    with contextlib.closing(store.connect()) as connection:
        while True:
            step, changed = store.prune(connection, before)
            deleted += step
            if not step and not changed:
                break
            time.sleep(0.01)  # the server's writer gets its turn between steps
    log.info("deleted %d events from before %s", deleted, before)
    return 0


def forget(arguments, config):
    store = _existing_store(config)
    where = f" of application {arguments.application!r}" if arguments.application else " of every application"
    if not _asked(arguments, f"Erase every event of this player{where}?",
                  "this erases a player's events; pass --yes to erase them without a question"):
        return 1
    with contextlib.closing(store.connect()) as connection:
        removed = erase_player(store, connection, config, arguments.user, arguments.application)
    print(json.dumps({"removed": removed, "application": arguments.application}))
    return 0


def privacy(arguments, config):
    for heading, lines in privacy_facts(config):
        print(heading + "".join("\n  - " + line for line in lines))
    return 0


def rebuild_summaries(arguments, config):
    store = _existing_store(config)
    if not store.summaries:
        raise UsageError("only an SQLite database keeps summaries; PostgreSQL's reports read the events")
    read, upto = 1, -1
    with contextlib.closing(store.connect()) as connection:
        try:
            with transaction(connection):
                restart_summaries(connection)
            log.info("summarising every event again; reports read the events until it is done")
            while read:
                read, upto = store.summarise(connection, SUMMARY_STEP_ROWS, config)
                time.sleep(0.002)  # the server's writer gets its turn between steps
        except SummaryPostponed:  # the server's writer holds the lock: it carries on from here
            log.info("the running server goes on summarising")
            return 0
    log.info("the summaries are made again, up to event %d", upto)
    return 0


def backup(arguments, config):
    if not isinstance(_existing_store(config), SQLiteStore):
        raise UsageError("backup copies an SQLite database; for PostgreSQL use its own tools (pg_dump)")
    if os.path.exists(arguments.file) and not arguments.force:
        raise UsageError(f"{arguments.file} exists; pass --force to overwrite it")
    partial = arguments.file + ".partial"
    with contextlib.closing(read_only(config.database)) as source, contextlib.closing(sqlite3.connect(partial)) as copy:
        source.backup(copy, pages=1024, sleep=0.005)  # a few MB a step: a running server's writer gets its turns
    os.replace(partial, arguments.file)
    log.info("backed up %s to %s", config.database, arguments.file)
    return 0


# Events one step of `copy` moves, in one PostgreSQL transaction with its progress mark.
COPY_STEP_ROWS = 5000
# `copy` knows a source by an id kept inside it, not by its path: a moved database resumes, another one
# at the same path is new. The target keeps how far each source has been copied.
COPY_IDENTITY = "CREATE TABLE IF NOT EXISTS pycolytics_identity (id VARCHAR NOT NULL)"
COPY_PROGRESS = "CREATE TABLE IF NOT EXISTS pycolytics_copied (source VARCHAR PRIMARY KEY, last_id BIGINT NOT NULL)"


def _identity(path, busy_timeout):
    """The id of the SQLite database at `path`, made and stored in it if it has none yet."""
    with contextlib.closing(read_only(path)) as reader:
        if reader.execute("SELECT 1 FROM sqlite_master WHERE name = 'pycolytics_identity'").fetchone():
            found = reader.execute("SELECT id FROM pycolytics_identity").fetchone()
            if found:
                return found[0]
    uri = "file:" + urllib_quote(os.path.abspath(path)) + "?mode=rw"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None)) as writer:
        with transaction(writer):  # IMMEDIATE: two copies starting together make one id
            writer.execute(COPY_IDENTITY)
            found = writer.execute("SELECT id FROM pycolytics_identity").fetchone() or (os.urandom(16).hex(),)
            writer.execute("INSERT INTO pycolytics_identity (id) SELECT ? WHERE NOT EXISTS"
                           " (SELECT 1 FROM pycolytics_identity)", found)
    return found[0]


def copy_events(arguments, config):
    if not isinstance(_existing_store(config), SQLiteStore):
        raise UsageError("copy reads an SQLite database: name it with --database FILE")
    target_config = copy_module.copy(config)
    target_config.database = arguments.to
    target = store_for(target_config)
    if not isinstance(target, PostgresStore):
        raise UsageError(f"--to {arguments.to!r} is not a postgresql:// URL")
    origin = _identity(config.database, config.busy_timeout)
    copied = seen = 0
    with contextlib.closing(read_only(config.database)) as source, contextlib.closing(target.connect()) as destination:
        with destination.transaction():
            destination.execute(COPY_PROGRESS)
        mark = destination.execute("SELECT last_id FROM pycolytics_copied WHERE source = %s", (origin,)).fetchone()
        last, present = mark[0] if mark else 0, _columns(source)
        optional = ", ".join(name if name in present else f"NULL AS {name}" for name, _ in ADDED_COLUMNS)
        while True:
            rows = source.execute("SELECT id, event_type, application, version, platform, user_id, session_id, value,"
                                  f" time, {optional} FROM event WHERE id > ? ORDER BY id LIMIT ?",
                                  (last, COPY_STEP_ROWS)).fetchall()
            if not rows:
                break
            last = rows[-1][0]
            with destination.transaction(), destination.cursor() as cursor:
                cursor.executemany(POSTGRES_INSERT, [row[1:] for row in rows])
                copied += max(0, cursor.rowcount)
                cursor.execute("INSERT INTO pycolytics_copied (source, last_id) VALUES (%s, %s)"
                               " ON CONFLICT (source) DO UPDATE SET last_id = excluded.last_id", (origin, last))
            seen += len(rows)
    log.info("copied %d events of database %s into %s (%d more were there already)",
             copied, origin, _redacted(arguments.to), seen - copied)
    return 0


def _global_options(default):
    """The options of every command, before or after its name; `default` SUPPRESS in a command's copy,
    so that an option given before the name still counts."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--config", metavar="FILE", default=default,
                         help="the ini file to read (sections [pycolytics], [app:NAME])")
    options.add_argument("--host", default=default,
                         help="the address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    options.add_argument("--port", default=default, help="the port to listen on (default 8000)")
    options.add_argument("--database", metavar="FILE_OR_URL", default=default,
                         help="the SQLite database file, or a postgresql:// URL (default pycolytics.db)")
    options.add_argument("--quiet", action="store_const", const="yes", default=default, help="do not log each request")
    return options


# Each command: (function, one line for the list of commands, a description for its --help, its own options).
_YES = ("--yes", dict(action="store_true", help="without asking (needed when not on a terminal)"))
COMMANDS = {
    "keygen": (keygen, "print a new random API key",
               "Print a new random key, 32 bytes from the operating system's random source, for any *_keys.", []),
    "export": (export, "write events as CSV or JSON lines (pandas reads both); --user: one player's",
               "Write events in the order they were stored, as CSV or JSON lines, row by row in constant memory. In "
               "CSV, a text cell that starts with = + - @, a tab or a carriage return gets a ' in front, so that a "
               "spreadsheet shows it rather than running it as a formula; JSON lines hold every value exactly. "
               "--user ID writes one player's events (JSON lines unless --format says csv).", [
                   ("--format", dict(choices=("csv", "jsonl"), help="csv (default) or jsonl (default with --user)")),
                   ("--user", dict(metavar="ID", help="only this player's events (their raw user_id)")),
                   ("--application", dict(metavar="NAME", help="only this application's events")),
                   ("--since", dict(metavar="T", help="only events at or after T (ISO 8601 or Unix seconds, UTC)")),
                   ("--until", dict(metavar="T", help="only events before T")),
                   ("--output", dict(metavar="FILE", help="write to FILE instead of standard output")),
                   ("--force", dict(action="store_true", help="overwrite --output FILE if it exists"))]),
    "forget": (forget, "erase one player's events, in small steps",
               "Erase every event of the player --user ID (of --application NAME, or of every application) and their "
               "rows of the report summaries, in small steps that never hold up a running server; it prints how many "
               "events it removed. The raw id is given also where ids are stored hashed.", [
                   ("--user", dict(metavar="ID", required=True, help="the player's user_id, as the game sends it")),
                   ("--application", dict(metavar="NAME", help="only this application's events of the player")), _YES]),
    "privacy": (privacy, "print what is kept of players, and for how long",
                "Print which fields are stored, for how long, whether ids are hashed, and answers for the stores' "
                "privacy forms, as this configuration makes them.", []),
    "rebuild-summaries": (rebuild_summaries, "make the summaries for reports again from the events",
                          "Make the summaries that reports read again from the events (after events were deleted by "
                          "hand, say), in small steps; a running server answers reports from the events meanwhile.", []),
    "prune": (prune, "delete events older than a time, in small steps",
              "Delete the events whose time is before T, 500 at a time so that a running server is never held up. It "
              "says how many first, and asks (on a terminal) before deleting unless --yes; --dry-run only counts.", [
                  ("--before", dict(metavar="T", required=True, help="delete events before T (ISO 8601 or Unix seconds)")),
                  ("--dry-run", dict(action="store_true", help="only say how many events would be deleted")), _YES]),
    "backup": (backup, "copy the database consistently, while the server runs",
               "Copy the SQLite database into FILE with SQLite's online backup: consistent even while the server "
               "writes. An existing FILE is replaced only with --force.", [
                   ("file", dict(metavar="FILE", help="where to write the copy")),
                   ("--force", dict(action="store_true", help="replace FILE if it exists"))]),
    "copy": (copy_events, "move an SQLite database's events into PostgreSQL (resumable)",
             "Copy the events of the SQLite database (--database FILE) into a PostgreSQL database (--to URL) in steps "
             "of 5000, each committed with its progress in the target: run it again after an interruption (or for "
             "newer events) and it resumes, copying each event once.", [
                 ("--to", dict(metavar="URL", required=True, help="postgresql://USER@HOST:PORT/DBNAME"))]),
}


def _parser():
    parser = argparse.ArgumentParser(
        prog="pycolytics.py", parents=[_global_options(None)],
        description="Collect analytics events over HTTP into an SQLite or PostgreSQL database. With no command, serve.",
        epilog="The options above work before or after a command (pycolytics.py prune --database events.db ...). "
               "Settings come from, strongest first: these options, PYCOLYTICS_<KEY> environment variables (and the "
               "original Pycolytics' SQLITE_FILE_PATH, API_KEYS and RATE_LIMIT), the ini file, the defaults. The ini "
               "file is --config, else $PYCOLYTICS_CONFIG, else ./pycolytics.ini if present; pycolytics.ini in the "
               "repository documents every key.")
    parser.add_argument("--version", action="version", version=f"pycolytics {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary, description, options) in COMMANDS.items():
        command = commands.add_parser(name, help=summary, description=description,
                                      parents=[_global_options(argparse.SUPPRESS)])
        for option, keywords in options:
            command.add_argument(option, **keywords)
    return parser


def main(argv=None):
    arguments = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    overrides = {name: getattr(arguments, name) for name in ("host", "port", "database", "quiet")}
    load = functools.partial(load_config, arguments.config, overrides=overrides)
    try:
        config = load()
        return serve(config, load) if arguments.command is None else COMMANDS[arguments.command][0](arguments, config)
    except ConfigError as error:
        log.error("bad configuration: %s", error)
        return 2
    except UsageError as error:
        log.error("%s: %s", arguments.command, error)
        return 2
    except Exception as error:  # OSError, or the database's own errors
        log.error("%s failed: %s", arguments.command or "serving", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
