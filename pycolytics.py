#!/usr/bin/env python3
"""Pycolytics: a tiny, self-hosted collector of analytics events for games and apps.

Clients POST JSON events over HTTP; Pycolytics checks their API key, validates them and
stores them in an SQLite database that you later open with pandas, Jupyter or any SQLite
browser. It speaks the API of the original Pycolytics (v1.0), so its Godot addon works
unchanged.

Run it:          python3 pycolytics.py [--config FILE] [--host HOST] [--port PORT]
Look after it:   python3 pycolytics.py keygen | export | prune | backup | copy   (--help says how)
Under gunicorn:  PYCOLYTICS_CONFIG=/etc/pycolytics.ini gunicorn 'pycolytics:create_app()'

One file, standard library only, Python 3.9 or newer; a postgresql:// database (several
collectors, one database) also needs psycopg 3, imported only then. Importing this module
does nothing: no file is read, no database opened and no socket bound until a server
starts or the WSGI callable `application` answers its first request.
"""

__version__ = "2.0.0"
__all__ = ["Config", "ConfigError", "Pycolytics", "Server", "application", "create_app", "load_config", "main"]

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
import io
import itertools
import json
import logging
import marshal
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
from wsgiref.handlers import format_date_time
from wsgiref.util import is_hop_by_hop

# The constant-time comparison behind hmac.compare_digest when Python has no OpenSSL (with
# OpenSSL, hmac uses _hashlib's, which is just as constant-time); importing hmac loads OpenSSL:
# 3.5 MB of memory (a fifth of the idle footprint) for one comparison.
from _operator import _compare_digest as compare_digest

log = logging.getLogger("pycolytics")

###############################################################################
# Limits and constants
###############################################################################

API_VERSION = "1.0.0"

# The original's development key. Accepted only while no key is configured anywhere, so the
# README's curl example works out of the box; start-up warns loudly when it is.
DEV_KEY = "I-am-an-unsecure-dev-key-REPLACE_ME"

EVENT_FIELDS = ("event_type", "application", "version", "platform", "user_id", "session_id")

# How long a refused connection is drained before it is closed; see Server._refuse.
LINGER_SECONDS = 2

# How many bytes one recv() asks for; larger buffers would cost an mmap() per call.
RECV_BYTES = 64 * 1024

# Client addresses the rate limiter remembers at most: about 100 bytes each, so a flood of
# addresses costs a few MB before the limiter forgets them all and starts counting afresh.
MAX_TRACKED_CLIENTS = 50_000

# /healthz answers 503 when the database's disk has less free space than this, and when
# the write lock cannot be had within HEALTH_TIMEOUT seconds.
MIN_FREE_DISK = 16 * 2**20
HEALTH_TIMEOUT = 2
# A /healthz answer may be this old, so a flood of them costs the database nothing; after a
# failed write, the writer tries a small one this often, so health recovers with no traffic.
HEALTH_CACHE_SECONDS = 1
HEALTH_PROBE_SECONDS = 3

# Characters in a client-made event_id at most: room for a UUID, a ULID or a hash.
MAX_EVENT_ID = 100

# Digits in one integer of a request body at most: converting one is quadratic in its length,
# and the interpreter's own limit (sys.get_int_max_str_digits) is this number unless changed.
MAX_INTEGER_DIGITS = 4300

# What an [app:NAME] section may set, for that application's events only.
APP_SETTINGS = ("api_keys", "cors_origins")

# Settings that only a restart changes; a reload (SIGHUP) says so when they differ.
RESTART_SETTINGS = ("database", "host", "port", "threads", "workers", "synchronous", "busy_timeout")

# Worker processes at most (workers = N): each holds its own connections and threads, and
# more than a few per core only adds memory.
MAX_WORKERS = 64

# With workers = N, the counts by client address of rate_limit and max_connections_per_address
# live in fixed tables that every worker shares: an address's hash picks a set of this many
# entries, and a lookup reads that set only (plus one entry per worker for connections).
ADDRESS_SET_ENTRIES = 8

# A worker process that dies is replaced, but at most this many times per minute: a worker
# that crashes at start must not become a fork loop. Beyond it, replacements wait their turn.
WORKER_RESTARTS_PER_MINUTE = 5

# With workers = N on SQLite, the workers hand their rows to one writer process over a Unix
# socket. A send that waits longer than this means the other side is stuck: the connection is
# dropped and the events it carried get 503.
WRITER_TIMEOUT = 10
# A database writer that has left a message unanswered this long makes /healthz 503 (its
# events wait, and get 503 after busy_timeout + 30 s).
WRITER_SILENT_SECONDS = 5
# Why the shared writer's last write failed, as /healthz of every worker shows it: at most this.
WRITER_PROBLEM_BYTES = 1024

###############################################################################
# Errors
###############################################################################


class HTTPError(Exception):
    """An answer to a request that went wrong; `status` says how, `detail` says what to fix."""

    status = "500 Internal Server Error"

    def __init__(self, detail, headers=()):
        super().__init__(detail)
        self.detail = detail
        self.headers = list(headers)


class BadRequest(HTTPError):
    status = "400 Bad Request"


class Unauthorized(HTTPError):
    status = "401 Unauthorized"


class Forbidden(HTTPError):
    status = "403 Forbidden"


class NotFound(HTTPError):
    status = "404 Not Found"


class MethodNotAllowed(HTTPError):
    status = "405 Method Not Allowed"


class LengthRequired(HTTPError):
    status = "411 Length Required"


class PayloadTooLarge(HTTPError):
    status = "413 Payload Too Large"


class URITooLong(HTTPError):
    status = "414 URI Too Long"


class UnsupportedMediaType(HTTPError):
    status = "415 Unsupported Media Type"


class UnprocessableEntity(HTTPError):
    status = "422 Unprocessable Entity"


def _retry_after(seconds):
    # Browsers show a page's scripts only a few answer headers unless told; a client must
    # read this one to know when to send again.
    return [("Retry-After", str(seconds)), ("Access-Control-Expose-Headers", "Retry-After")]


class TooManyRequests(HTTPError):
    status = "429 Too Many Requests"

    def __init__(self, detail, retry_after):
        super().__init__(detail, _retry_after(retry_after))


class HeaderFieldsTooLarge(HTTPError):
    status = "431 Request Header Fields Too Large"


class RequestTimeout(HTTPError):
    status = "408 Request Timeout"


class ServiceUnavailable(HTTPError):
    status = "503 Service Unavailable"

    def __init__(self, detail, retry_after=1):
        super().__init__(detail, _retry_after(retry_after))


class VersionNotSupported(HTTPError):
    status = "505 HTTP Version Not Supported"


class ConfigError(Exception):
    """A configuration that cannot work; the message names the key and where it came from."""


###############################################################################
# Configuration
###############################################################################


def _text(value):
    return value.strip()


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
            raise ValueError(
                f"the key {_glimpse(key)} holds a space or a control character; separate keys with commas "
                "or new lines, and start a comment after a key with a space and ; or #"
            )
    return keys


def _number(value, convert, lowest, highest, accepted):
    """`value` as a number from `lowest` to `highest`, or a ValueError saying what is accepted."""
    try:
        number = convert(value)
    except ValueError:
        number = None
    if number is None or not lowest <= number <= highest:  # NaN fails the comparison too
        raise ValueError(f"must be {accepted}")
    return number


def _port(value):
    return _number(value, int, 0, 65535, "a whole number from 0 to 65535")


def _count(value):
    return _number(value, int, 1, math.inf, "a whole number of at least 1, without a unit (like 1000, or 1048576 for 1 MiB)")


def _seconds(value):
    return _number(value, float, 0.001, 1e6, "a number of seconds from 0.001 to 1000000, like 5 or 0.5")


def _days(value):
    return _number(value, float, 0, 999_999, "a number of days, or 0 to keep events forever")


def _workers(value):
    if value.strip().lower() == "auto":
        return min(os.cpu_count() or 1, MAX_WORKERS)
    return _number(value, int, 1, MAX_WORKERS, f"auto, or a whole number from 1 to {MAX_WORKERS}")


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


class TrustedProxies:
    """The addresses and networks (CIDR) of our own reverse proxies; `address in proxies` says
    whether a peer is one. Exact addresses are one set lookup: the common case stays one hash."""

    __slots__ = ("addresses", "networks")

    def __init__(self, addresses, networks):
        self.addresses = frozenset(addresses)
        self.networks = tuple(networks)

    def __contains__(self, address):
        if address in self.addresses:
            return True
        if not self.networks:
            return False
        import ipaddress  # imported already by _proxies, which made the networks

        try:
            found = ipaddress.ip_address(address)
        except ValueError:
            return False
        found = getattr(found, "ipv4_mapped", None) or found  # a dual-stack socket's ::ffff:10.0.0.1
        return any(found in network for network in self.networks)


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
            raise ValueError(
                f"{entry!r} is neither an IP address (10.0.0.2, ::1) nor a network (10.0.0.0/8, fd00::/8)"
            ) from None
    return TrustedProxies(addresses, networks)


def _origins(value):
    """ANY_ORIGIN for "*", else the set of origins (scheme://host[:port]) named."""
    origins = _items(value)
    if "*" in origins:
        return ANY_ORIGIN
    for origin in origins:
        if not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError(f"{origin!r} is not an origin like https://example.com or http://localhost:8060")
    return frozenset(origins)


ANY_ORIGIN = "*"


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


class Setting(collections.namedtuple("Setting", "name default parse description")):
    """One ini key: its default (as the ini would write it), the function that parses and checks
    a value (raising ValueError with what is accepted), and one line about it."""

    __slots__ = ()


# Every ini key, in the order pycolytics.ini documents them (it shows each with its default).
SETTINGS = (
    Setting("database", "pycolytics.db", _text, "the SQLite database file, or a postgresql:// URL"),
    Setting("api_keys", "", _keys, "the keys clients send in each event's api_key"),
    Setting("host", "127.0.0.1", _text, "the address the built-in server listens on"),
    Setting("port", "8000", _port, "the port the built-in server listens on"),
    Setting("synchronous", "full", _synchronous, "what a power cut may lose (also PostgreSQL's synchronous_commit)"),
    Setting("quiet", "no", _flag, "no log line per request"),
    Setting("threads", "8", _count, "worker threads of the built-in server for requests that may wait"),
    Setting("workers", "1", _workers, "processes of the built-in server, each with its own loop; auto: one per core"),
    Setting("max_connections", "512", _count, "open connections at most; the longest idle makes room"),
    Setting("max_connections_per_address", "64", _count, "open connections from one client address at most (503)"),
    Setting("idle_timeout", "5", _seconds, "seconds a kept-alive connection may sit idle"),
    Setting("request_timeout", "10", _seconds, "seconds a client has to send a whole request"),
    # HTTP framing limits of the built-in server, as gunicorn's defaults (and 64 KiB for a
    # whole head, which a hundred full-size headers would exceed): no client of an event
    # collector comes near them, and they bound what one connection can pin.
    Setting("max_request_line", "4094", _count, "bytes in the request line (414)"),
    Setting("max_header_fields", "100", _count, "header fields in one request (431)"),
    Setting("max_header_field", "8190", _count, "bytes in one header field (431)"),
    Setting("max_head_bytes", "65536", _count, "bytes in a whole request head (431)"),
    Setting("max_body_bytes", "1048576", _count, "bytes in one request body (413)"),
    Setting("max_buffered_bytes", "33554432", _count,
            "bytes of request bodies held at once, and of values waiting for the database (503)"),
    Setting("max_batch_events", "1000", _count, "events in one batch (422)"),
    Setting("max_string_length", "255", _count, "characters in each string field of an event (422)"),
    Setting("max_value_bytes", "65536", _count, "bytes of one event's value as compact JSON (422)"),
    Setting("max_value_depth", "32", _count, "nesting of objects and arrays in one event's value (422)"),
    Setting("max_pending_events", "100000", _count, "events waiting for the database at most (then 503)"),
    Setting("busy_timeout", "30", _seconds, "seconds a write waits for another process holding the database"),
    Setting("rate_limit", "off", _rate, "requests to the event endpoints per client address, like 60/minute"),
    Setting("trusted_proxies", "127.0.0.1, ::1", _proxies, "reverse proxies whose X-Forwarded-For is believed"),
    Setting("certfile", "", _text, "the PEM certificate chain for HTTPS"),
    Setting("keyfile", "", _text, "the PEM private key for HTTPS"),
    Setting("cors_origins", "*", _origins, "the web pages (origins) that may post events"),
    Setting("retention_days", "0", _days, "delete the days older than this many days, hourly (0 keeps every event)"),
    Setting("read_keys", "", _keys, "the keys that open the dashboard"),
)
SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}


# Settings whose values are keys: a message about them shows a glimpse of one key, not the value.
SECRET_SETTINGS = ("api_keys", "read_keys")


def _parse(name, text, where):
    """A setting's value parsed, or a ConfigError naming `where` it came from, the key, the value
    and what is accepted."""
    try:
        return SETTINGS_BY_NAME[name].parse(text)
    except ValueError as error:
        shown = "" if name in SECRET_SETTINGS else f" = {text!r}"
        raise ConfigError(f"{where}{name}{shown} is not valid: {error}") from None


class Config:
    """The settings in force, parsed and checked; attributes are named after the ini keys."""

    def __init__(self, raw, apps=None):
        """`raw` maps each ini key to (text, where it came from); `apps` each [app:NAME] to its raw keys."""
        self.sources = {}
        self.apps = {}
        places = {}  # where each key is configured, to refuse a key given two roles
        for application, settings in (apps or {}).items():
            self.apps[application] = {}
            for name, (text, source) in settings.items():
                self.apps[application][name] = _parse(name, text, f"{source}: [app:{application}] ")
            for key in self.apps[application].get("api_keys", ()):
                _one_place(places, key, f"[app:{application}] api_keys ({settings['api_keys'][1]})")
        for name, _, _, _ in SETTINGS:
            text, source = raw[name]
            setattr(self, name, _parse(name, text, f"{source}: "))
            self.sources[name] = source
        for name in SECRET_SETTINGS:
            for key in getattr(self, name):
                _one_place(places, key, f"{name} ({self.sources[name]})")
        if not self.database:
            raise ConfigError(f"{self.sources['database']}: database must name a file")
        if bool(self.certfile) != bool(self.keyfile):
            raise ConfigError("HTTPS needs both certfile and keyfile (or neither, for plain HTTP)")

    @property
    def dev_key_active(self):
        return not self.api_keys and not any(app.get("api_keys") for app in self.apps.values())


def _one_place(places, key, place):
    """Record where `key` is configured; a key in two places (a write key that also opens the
    dashboard, or that two games share) would quietly grant more than either place says."""
    first = places.setdefault(key, place)
    if first != place:
        raise ConfigError(
            f"the key {_glimpse(key)} is in {first} and in {place}: each key belongs in one place, "
            "either api_keys (any game), one [app:NAME] (that game), or read_keys (the dashboard)"
        )


def _read_ini(path, raw, apps):
    # A comment may follow a value after a space (`key = value  ; why`), as in the README.
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    try:
        with open(path, encoding="utf-8") as file:
            parser.read_file(file)
    except (OSError, UnicodeDecodeError, configparser.Error) as error:
        raise ConfigError(f"cannot read the configuration file {path}: {error}") from None
    for section in parser.sections():
        if section.startswith("app:") and section[4:].strip():
            application = section[4:].strip()
            apps[application] = {}
            for name, value in parser.items(section):
                if name not in APP_SETTINGS:
                    raise ConfigError(f"{path}: unknown key {name!r} in [{section}]; known keys: {', '.join(APP_SETTINGS)}")
                apps[application][name] = (value, path)
        elif section != "pycolytics":
            raise ConfigError(f"{path}: unknown section [{section}]; settings go in [pycolytics] and [app:NAME]")
    if parser.has_section("pycolytics"):
        for name, value in parser.items("pycolytics"):
            if name not in SETTINGS_BY_NAME:
                raise ConfigError(f"{path}: unknown key {name!r} in [pycolytics]; known keys: {', '.join(SETTINGS_BY_NAME)}")
            raw[name] = (value, path)


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


def _original_variables(environ, dotenv_path):
    """Settings from the original Pycolytics' variables: its `.env` file, then the environment."""
    variables = {}
    if dotenv_path and os.path.isfile(dotenv_path):
        try:
            variables.update(_read_dotenv(dotenv_path))
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read {dotenv_path}: {error}") from None
        variables = {name: (value, dotenv_path) for name, value in variables.items()}
    for name in ("SQLITE_FILE_NAME", "SQLITE_FILE_PATH", "API_KEYS", "RATE_LIMIT"):
        if name in environ:
            variables[name] = (environ[name], f"environment variable {name}")
    settings = {}
    # SQLITE_FILE_PATH replaced SQLITE_FILE_NAME in the original; both named the whole path.
    for name in ("SQLITE_FILE_NAME", "SQLITE_FILE_PATH"):
        if name in variables:
            settings["database"] = variables[name]
    if "RATE_LIMIT" in variables:
        settings["rate_limit"] = variables["RATE_LIMIT"]
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
    """Settings from, weakest first: defaults, the ini file, the environment, `overrides`.

    The ini file is `path`, else $PYCOLYTICS_CONFIG, else ./pycolytics.ini when it exists.
    The environment is PYCOLYTICS_<KEY> for any key, and the original Pycolytics' variables
    (SQLITE_FILE_PATH, SQLITE_FILE_NAME, API_KEYS, also read from its `.env` file).
    """
    environ = os.environ if environ is None else environ
    raw = {setting.name: (setting.default, "default") for setting in SETTINGS}
    apps = {}
    path = path or environ.get("PYCOLYTICS_CONFIG")
    if path:
        _read_ini(path, raw, apps)
    elif os.path.isfile("pycolytics.ini"):
        _read_ini("pycolytics.ini", raw, apps)
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


###############################################################################
# Validation: from request bytes to rows
###############################################################################

# Stand-ins for an escaped backslash and an escaped quote while a body's strings are told
# apart from the rest (see _nulls_outside_strings): lone surrogates, which no text decoded
# from UTF-8 can hold.
_ESCAPED_BACKSLASH, _ESCAPED_QUOTE = "\ud800", "\ud801"
# An escaped UTF-16 surrogate: the only way a JSON text can smuggle in a string that is not
# valid Unicode (a lone surrogate). Bodies without one skip the per-string check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_MISSING = object()


def _compact_encoder(allow_nan=False):
    """A function writing compact JSON (no spaces, Unicode as is) through the C encoder.

    json.dumps() builds a new C encoder at every call, which costs more than encoding a
    typical event's value; this one is built once. Values come from json.loads, so they
    hold no cycles and need no cycle check (markers=None).
    """
    options = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=allow_nan)
    make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if make_encoder is None:  # a Python without the C accelerator
        return options.encode
    encode = make_encoder(None, options.default, json.encoder.encode_basestring, None, ":", ",", False, False,
                          allow_nan)

    def compact_json(value):
        return "".join(encode(value, 0))

    return compact_json


_compact_json = _compact_encoder()
_json_with_non_finite = _compact_encoder(allow_nan=True)  # NaN, Infinity: for a value about to be mended


def _nulls_outside_strings(text, words, escaped_backslash, escaped_quote):
    """JSON-like `text` with each of `words` replaced by null wherever it lies outside strings.

    A few passes of C string methods, each linear: no regular expression, so nothing can
    backtrack. Replacing escaped backslashes first, left to right, pairs up every run of
    them; once escaped quotes are replaced too, every quote left opens or closes a string,
    and the even pieces between quotes lie outside strings. The two stand-ins are characters
    `text` cannot hold. Outside strings no JSON word holds any of `words`, so replacing one
    that is part of a longer word leaves that word as wrong as it was.
    """
    pieces = text.replace("\\\\", escaped_backslash).replace('\\"', escaped_quote).split('"')
    outside = '"'.join(pieces[::2])
    for word in words:
        outside = outside.replace(word, "null")
    pieces[::2] = outside.split('"')
    return '"'.join(pieces).replace(escaped_quote, '\\"').replace(escaped_backslash, "\\\\")


def _mend_godot(text):
    """`text` with Godot's JSON quirks made JSON: bare nan, inf and -inf (its non-finite
    floats) as null, and \\v in strings as \\u000b.

    In a text that is not JSON the escapes may be paired wrongly, but quotes and backslashes
    stay where they were, so the mended text is not JSON either.
    """
    if "\\v" in text:  # Godot escapes a vertical tab as \v, which JSON lacks
        text = text.replace("\\\\", _ESCAPED_BACKSLASH).replace("\\v", "\\u000b")
        text = text.replace(_ESCAPED_BACKSLASH, "\\\\")
    if "nan" in text or "inf" in text:
        text = _nulls_outside_strings(text, ("-nan", "-inf", "nan", "inf"), _ESCAPED_BACKSLASH, _ESCAPED_QUOTE)
    return text


def _finite_json(value):
    """Compact JSON of a value holding NaN or Infinity, each written as null; None if the
    interpreter's C encoder cannot go as deep as the value nests."""
    try:
        text = _json_with_non_finite(value)
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


# Python 3.9.14+, 3.10.7+ and 3.11+ refuse to convert integers of over 4300 digits (a quadratic
# conversion) by themselves, in C: sys.get_int_max_str_digits(). Elsewhere, or where that limit
# is lifted (PYTHONINTMAXSTRDIGITS=0), every integer's length is checked first, in Python,
# which doubles the parse time of a body full of numbers.
_C_INT_DIGITS = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
_PARSE_INT = None if 0 < _C_INT_DIGITS <= MAX_INTEGER_DIGITS else _bounded_int
_INT_DIGITS = _C_INT_DIGITS if _PARSE_INT is None else MAX_INTEGER_DIGITS  # the limit in force


# Built once: json.loads() given any option builds a decoder and its C scanner at every call,
# which cost a sixth of validating a single event. Shared by threads as json.loads() shares its own.
_DECODER = json.JSONDecoder(parse_constant=_non_finite_to_null, parse_int=_PARSE_INT)
# Godot's JSON: control characters other than \b\f\n\r\t\v raw in strings.
_LENIENT_DECODER = json.JSONDecoder(parse_constant=_non_finite_to_null, parse_int=_PARSE_INT, strict=False)


def parse_json(body):
    """The document in a request body; non-finite numbers become None. Raises BadRequest."""
    if not body:
        raise BadRequest("the request body is empty: send a JSON object (or, to /v1.0/events, an array of them)")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRequest(f"the request body is not UTF-8 (bad byte at offset {error.start})") from None
    if text[0] == "\ufeff":
        text = text[1:]
    try:
        return _decode(_DECODER, text)
    except json.JSONDecodeError as error:
        first_error = error
    try:
        return _decode(_LENIENT_DECODER, _mend_godot(text))
    except json.JSONDecodeError:
        message = first_error.msg[:-3] if first_error.msg.endswith(" at") else first_error.msg
        raise BadRequest(f"the request body is not valid JSON: {message} "
                         f"at line {first_error.lineno} column {first_error.colno}") from None


def _decode(decoder, text):
    """decoder.decode(text); BadRequest for what it cannot convert, JSONDecodeError for what is not JSON."""
    try:
        return decoder.decode(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:  # the decoder recurses in C, as deep as the interpreter lets it
        raise BadRequest("the request body nests arrays or objects too deeply") from None
    except ValueError:  # an integer too long to convert
        raise BadRequest(f"the request body holds an integer of over {_INT_DIGITS} digits") from None


def _nests_deeper(document, limit):
    """Whether arrays and objects nest more than `limit` deep in `document`.

    A loop over the levels, no recursion; each level is one comprehension, about five times
    faster than a stack of nodes, which matters for a value of thousands of small arrays.
    """
    level = [document]
    for _ in range(limit):
        level = [child for node in level for child in (node.values() if type(node) is dict else node)
                 if type(child) is dict or type(child) is list]
        if not level:
            return False
    return True


def _holds_nul(document):
    """Whether any key or string in `document` holds a NUL character, without recursion."""
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if "\0" in node:
                return True
        elif isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _is_unicode(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def client_address(peer, forwarded_for, trusted_proxies):
    """The sender of a request: its peer, unless that is a trusted proxy that names another.

    Each proxy appends the address it received from to X-Forwarded-For, so the sender is the
    last address in it that is not one of our own proxies; anything before it could be forged.
    """
    if not forwarded_for or peer not in trusted_proxies:
        return peer
    for hop in reversed(forwarded_for.split(",")):
        hop = hop.strip()
        if hop not in trusted_proxies:
            return hop or peer
    return peer


class RateLimiter:
    """At most `requests` per `seconds` from one client address, counted in fixed windows.

    `shared`: with workers = N, the counts of every worker (the Scoreboard's AddressCounts), so
    that the limit is the whole server's; by default this process's own.
    """

    def __init__(self, limit, shared=None):
        self.requests, self.seconds = limit
        self.per = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}[self.seconds]
        self._lock = threading.Lock()
        self._windows = {}  # address -> [window number, requests so far in it]
        self._shared = shared

    def check(self, address, now=None):
        """Count one request from `address`; raise TooManyRequests if it is one too many."""
        now = time.monotonic() if now is None else now  # CLOCK_MONOTONIC: one clock for every process
        window = int(now // self.seconds)
        with self._lock:
            counted = self._count(address, window)
        if counted > self.requests:
            wait = max(1, math.ceil((window + 1) * self.seconds - now))
            raise TooManyRequests(
                f"more than {self.requests} requests per {self.per} from {address}: send again in {wait} s", wait
            )

    def _count(self, address, window):
        """Count one request from `address` in `window`: how many it has sent in it."""
        if self._shared is not None:
            return self._shared.count(address, window)
        counted = self._windows.get(address)
        if counted is not None and counted[0] == window:
            counted[1] += 1
            return counted[1]
        if counted is None and len(self._windows) >= MAX_TRACKED_CLIENTS:
            self._forget(window)
        self._windows[address] = [window, 1]
        return 1

    def _forget(self, window):
        for address in [address for address, counted in self._windows.items() if counted[0] != window]:
            del self._windows[address]
        if len(self._windows) >= MAX_TRACKED_CLIENTS:
            self._windows.clear()  # this many senders at once: start over rather than grow


ALL_APPLICATIONS = frozenset({"*"})  # what a global key may send events for


class Keyring:
    """The API keys a server accepts, compared in constant time, and what each is for.

    A key of [pycolytics] is good for any application; a key of [app:NAME] only for NAME,
    so a key that leaks out of one game cannot write into another's data.
    """

    def __init__(self, config):
        entries = [(key, None) for key in config.api_keys]
        entries += [(key, name) for name, app in config.apps.items() for key in app.get("api_keys", ())]
        self.dev_key_active = not entries
        self._keys = [(key.encode("utf-8"), name) for key, name in (entries or [(DEV_KEY, None)])]

    def applications(self, key):
        """The applications `key` may send events for: ALL_APPLICATIONS, a set of names, or None if unknown."""
        if key is None:
            # The original treated a missing key as its development key.
            return ALL_APPLICATIONS if self.dev_key_active else None
        try:
            candidate = key.encode("utf-8")
        except UnicodeEncodeError:
            return None
        names, everything = set(), False
        for known, name in self._keys:
            if compare_digest(known, candidate):
                everything |= name is None
                names.add(name)
        return ALL_APPLICATIONS if everything else frozenset(names) or None


# Problems one refusal lists at most. Enough to fix a client from; all of them could cost 50 ms
# and a 1.2 MB answer for 150 kB of events with every field wrong (1 kB once gzipped).
MAX_PROBLEMS = 100


class Validator:
    """Turns a parsed request body into rows for the `event` table, or says what is wrong.

    Every event first takes a fast path that only decides "valid" with C-speed checks. The
    events it refuses are then examined again, field by field, to list their problems (the
    first MAX_PROBLEMS); that slow path is the authority on what is wrong.
    """

    def __init__(self, config, keyring):
        self.keyring = keyring
        self.default_origins = config.cors_origins
        self.app_origins = {name: app["cors_origins"] for name, app in config.apps.items() if "cors_origins" in app}
        self.max_batch_events = config.max_batch_events
        self.max_string_length = config.max_string_length
        self.max_value_bytes = config.max_value_bytes
        self.max_value_depth = config.max_value_depth
        self._fields = operator.itemgetter(*EVENT_FIELDS)

    def rows(self, document, batch, body, received, origin=None):
        """Row tuples (the six strings, value JSON, time, received_at, event_id), or an HTTPError for the lot."""
        if batch:
            if not isinstance(document, list):
                raise UnprocessableEntity([_problem(["body"], "expected a JSON array of events", "array_type")])
            if len(document) > self.max_batch_events:
                message = (f"a batch holds at most {self.max_batch_events} events and this one has {len(document)}: "
                           "send it in smaller batches")
                raise UnprocessableEntity([_problem(["body"], message, "too_long")])
            events = document
        else:
            events = (document,)
        # Cheap facts about the whole body that let most events skip checks: a body with few
        # brackets cannot nest deeply, and one without \uD800-style escapes holds no surrogates.
        # (A batch of more events than that has too many brackets: not worth counting them all.)
        shallow = len(events) <= self.max_value_depth and body.count(b"{") + body.count(b"[") <= self.max_value_depth
        # (memchr finds no backslash in a batch of 100 in 1 us; the pattern took 20 looking for escapes.)
        check_unicode = b"\\" in body and _SURROGATE_ESCAPE.search(body) is not None
        times = (received, _time_text(received))
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
            raise Unauthorized(f"invalid or missing api_key{which}")
        if forbidden:
            more = f"; and {len(forbidden) - MAX_PROBLEMS} more events" if len(forbidden) > MAX_PROBLEMS else ""
            raise Forbidden("; ".join(forbidden[:MAX_PROBLEMS]) + more)
        if invalid:
            raise UnprocessableEntity(
                self._listed_problems(events, invalid, batch, shallow, check_unicode, received, value_problems)
            )
        return rows

    def _listed_problems(self, events, invalid, batch, shallow, check_unicode, received, value_problems):
        """The problems of the `invalid` events (indexes), at most MAX_PROBLEMS of them and then a note.

        Events the fast path found valid have none, and are not examined again."""
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
            # Finding it may have cost an encoding of a megabyte of value: the list reuses it.
            value_problems[id(event)] = problem
            return None
        if check_unicode and not _is_unicode(joined):
            return None
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
            elif check_unicode and not _is_unicode(value):
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
        # A text of n characters nests at most n/2 deep, and at most as deep as it has brackets.
        if text is None or (
            not shallow and len(text) > 2 * self.max_value_depth
            and text.count("{") + text.count("[") > self.max_value_depth
            and _nests_deeper(value, self.max_value_depth)
        ):
            return None, (f"nests objects and arrays more than {self.max_value_depth} deep", "too_deep")
        if len(text) * 4 > self.max_value_bytes or check_unicode:
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError:
                return None, ("holds an unpaired UTF-16 surrogate", "unicode")
            if size > self.max_value_bytes:
                return None, (f"is {size} bytes as JSON; at most {self.max_value_bytes} are stored", "too_large")
        # PostgreSQL's jsonb cannot hold a NUL character, and readers of SQLite text stop at one:
        # refused on both backends alike (the escape can also be a literal backslash and "u0000")
        if "\\u0000" in text and _holds_nul(value):
            return None, ("holds a NUL character (\\u0000) in a string", "nul")
        return text, None


# Times as stored: UTC, as text that SQLite's date functions and pandas read.
TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


class _TimeText:
    """moment.strftime(TIME_FORMAT), formatting each second only once: for every event stored,
    strftime took about 3 us here, this takes under 1 us."""

    def __init__(self):
        self._last = (None, "")  # (the second, its text): one object, so threads never mix two

    def __call__(self, moment):
        second = (moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second)
        last = self._last
        if last[0] != second:
            last = self._last = (second, moment.strftime("%Y-%m-%d %H:%M:%S."))
        return f"{last[1]}{moment.microsecond:06d}"


_time_text = _TimeText()

# The range of client times taken as given: the Unix epoch to the end of year 9999.
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_LAST_SECOND = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)


# Characters in a client's time written as text, at most: ISO 8601 with nanoseconds and a zone
# takes 35. Longer text is refused unread, so a time costs the pattern below a bounded effort.
MAX_TIME_TEXT = 64

# ISO 8601 / RFC 3339 as clients write it: a date, maybe a time (T or space) with seconds and
# a fraction, maybe a zone (none means UTC). Parsed here because datetime.fromisoformat reads
# less of it before Python 3.11.
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
            year, month, day, hour, minute, second, fraction, _, sign, zone_hours, zone_minutes = (
                _ISO_8601.fullmatch(value.strip()).groups()
            )
            micro = int((fraction or "0")[:6].ljust(6, "0"))
            moment = datetime.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                                       int(second or 0), micro, tzinfo=datetime.timezone.utc)
            if sign:
                moment -= int(sign + "1") * datetime.timedelta(hours=int(zone_hours), minutes=int(zone_minutes))
        else:
            return None
    except (ValueError, OverflowError, OSError):  # not a date, or out of any calendar's range
        return None
    return moment if _EPOCH <= moment <= _LAST_SECOND else None


def _client_fields(event, received, check_unicode):
    """(time, event_id, problems) from an event's optional timestamp, sent_at and event_id.

    The stored time is the best estimate of when the event happened: the client's timestamp,
    shifted by how far the client's clock was off when it sent the request (received - sent_at),
    and never later than the receive time.
    """
    problems = []
    when = received
    timestamp, sent_at = event.get("timestamp"), event.get("sent_at")
    happened = _client_time(timestamp) if timestamp is not None else None
    sent = _client_time(sent_at) if sent_at is not None else None
    for name, given, parsed in (("timestamp", timestamp, happened), ("sent_at", sent_at, sent)):
        if given is not None and parsed is None:
            message = "must be ISO 8601 text (2024-05-01T12:00:00Z) or Unix seconds, from 1970 to 9999"
            problems.append((name, message, "datetime"))
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
    return _time_text(when), event_id, problems


def _event_id_problem(event_id, check_unicode):
    """(message, kind) if a client's `event_id` cannot be stored, else None."""
    if type(event_id) is not str or not 0 < len(event_id) <= MAX_EVENT_ID:
        return f"must be a string of 1 to {MAX_EVENT_ID} characters", "event_id"
    if "\0" in event_id:  # PostgreSQL's text cannot hold one: the whole group commit would fail
        return "holds a NUL character (\\u0000)", "nul"
    if check_unicode and not _is_unicode(event_id):
        return "holds an unpaired UTF-16 surrogate", "unicode"
    return None


def _problem(location, message, kind):
    """One entry of a 422 answer, shaped like FastAPI's so the original's clients read it."""
    if len(location) > 1 and isinstance(location[1], int):
        message = f"event {location[1]}: " + (f"{location[2]!r} " if len(location) > 2 else "") + message
    elif len(location) > 1:
        message = f"{location[1]!r} {message}"
    return {"loc": location, "msg": message, "type": kind}


###############################################################################
# Storage: SQLite and the group-commit writer
###############################################################################

# The original Pycolytics' table, column for column as SQLModel created it, so databases made
# by either program open in the other. Only a new table gets Pycolytics' own index, on `time`
# (README.md, "Indexes", has the measurements behind that choice). An existing database keeps
# its indexes; at start-up it gains the ADDED_COLUMNS and the EVENT_ID_INDEX (replacing the
# older index on event_id alone), with no migration step to run.
SCHEMA = """
CREATE TABLE IF NOT EXISTS event (
    event_type VARCHAR NOT NULL,
    application VARCHAR NOT NULL,
    version VARCHAR NOT NULL,
    platform VARCHAR NOT NULL,
    user_id VARCHAR NOT NULL,
    session_id VARCHAR NOT NULL,
    value JSON NOT NULL,
    id INTEGER NOT NULL,
    time DATETIME NOT NULL,
    PRIMARY KEY (id)
);
CREATE INDEX IF NOT EXISTS ix_event_time ON event (time);
"""

# Columns Pycolytics adds to the original's table. A database without them (the original's,
# or an older Pycolytics') gets them at start-up: adding a column rewrites nothing, so this
# is instant on any size of table, and the original can still write into it.
ADDED_COLUMNS = (
    ("received_at", "DATETIME"),  # the server's receive time, when `time` is the client's
    ("event_id", "VARCHAR"),  # a client-made id: a retried event is stored once
)
# An event_id is unique per application, among the rows that have one (rows without cost this
# index nothing): two games that both number their events 1, 2, 3 keep all of them.
EVENT_ID_INDEX = ("CREATE UNIQUE INDEX IF NOT EXISTS ix_event_application_event_id ON event (application, event_id)"
                  " WHERE event_id IS NOT NULL")
# Older Pycolytics made event_id unique across applications: replaced at start-up.
OLD_EVENT_ID_INDEX = "ix_event_event_id"

# Only a conflict on EVENT_ID_INDEX is ignored: the retry of an acknowledged event is
# acknowledged again and stored once. Any other constraint a row breaks (one an operator
# added) fails the commit, and its clients get 503, never a 204 for a row not stored.
INSERT = (
    "INSERT INTO event"
    " (event_type, application, version, platform, user_id, session_id, value, time, received_at, event_id)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (application, event_id) WHERE event_id IS NOT NULL DO NOTHING"
)

# SQLite takes a group as INSERTs of many rows each (VALUES (...), (...), ...): the driver binds
# a statement's parameters in one C call and gives the GIL up once per statement, where
# executemany gives it up and takes it back at every row, each time waiting for the event loop
# to let go. 64 rows are 640 parameters, within the 999 of SQLite before 3.32. bench/README.md
# has the measurements ("Issue 14, second round"). A group of up to 64 rows is one statement
# of its own size, and SQLite commits it by itself: no BEGIN and COMMIT, two steps of the
# driver fewer, each a wait for the GIL ("Issue 14, fourth round").
INSERT_CHUNK_ROWS = 64


@functools.lru_cache(maxsize=None)  # one statement per size: INSERT_CHUNK_ROWS of them at most
def _insert_rows(count):
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * count)
    return INSERT.replace("(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)


def _chunks(count):
    """(start, size) pieces of `count` rows: whole INSERT_CHUNK_ROWS, then powers of two, so
    that a group of any size is a few statements of at most 7 shapes."""
    start = 0
    size = INSERT_CHUNK_ROWS
    while start < count:
        while size > count - start:
            size //= 2
        yield start, size
        start += size


# The files of one SQLite database in WAL mode: deleting or replacing any of them under a
# running server loses what is committed to it (https://www.sqlite.org/howtocorrupt.html).
DATABASE_FILES = ("", "-wal", "-shm")
# How far apart two changes of a folder may be and still leave it the same mtime: a file
# system that keeps fractions of a second takes them from a clock that ticks every few
# milliseconds (1/HZ on Linux); one that keeps whole seconds (2 s on FAT) gives an mtime
# without a fraction, as a fine one does about once in a hundred.
FOLDER_TICK_NS = 50_000_000
COARSE_FOLDER_TICK_NS = 3_000_000_000


@contextlib.contextmanager
def transaction(connection):
    """BEGIN IMMEDIATE ... COMMIT around the block, ROLLBACK if anything in it fails.

    IMMEDIATE takes the write lock at BEGIN, waiting busy_timeout for it, so a transaction never
    fails half-way for want of it: https://www.sqlite.org/lang_transaction.html. After some
    errors (SQLITE_FULL, SQLITE_IOERR, a read-only database) SQLite has rolled back already and
    a ROLLBACK would fail with "no transaction is active": the error raised is always the first.
    """
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
    """A connection that remembers which files it opened: (suffix, st_dev, st_ino) of each;
    and the stamp of their folder when they were last found in place (SQLiteStore.detached)."""

    files = ()
    folder_stamp = None
    linked = False  # the path is a symbolic link


def _file_ids(path):
    """(suffix, st_dev, st_ino) of each of the database's files that exists now."""
    found = []
    for suffix in DATABASE_FILES:
        try:
            status = os.stat(path + suffix)
        except FileNotFoundError:
            continue
        found.append((suffix, status.st_dev, status.st_ino))
    return tuple(found)


def connect(path, synchronous="full", busy_timeout=30.0, create=True):
    """A connection with Pycolytics' pragmas; creates the database (unless not `create`) and its table if missing.

    WAL lets readers (pandas, the dashboard) work while events are written, and makes a
    commit one append to the log: https://www.sqlite.org/wal.html
    synchronous=FULL fsyncs the log at every commit, so a commit survives power loss; NORMAL
    may lose the last commits on power loss (never on a crash of the process) and is much
    faster on slow SD cards: https://www.sqlite.org/pragma.html#pragma_synchronous
    The busy timeout makes writers in other processes (gunicorn workers) wait their turn
    instead of failing with "database is locked": https://www.sqlite.org/c3ref/busy_timeout.html
    """
    target = path if create else "file:" + urllib_quote(os.path.abspath(path)) + "?mode=rw"
    connection = sqlite3.connect(target, timeout=busy_timeout, isolation_level=None, check_same_thread=False,
                                 uri=not create, factory=SQLiteConnection)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(f"PRAGMA synchronous={_synchronous(synchronous)}")
        exists = connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'event'").fetchone()
        if not exists:
            connection.executescript(SCHEMA)
        columns = _columns(connection)
        missing = [name for name in EVENT_FIELDS + ("value", "id", "time") if name not in columns]
        if missing:
            raise sqlite3.DatabaseError(f"its table 'event' lacks the columns {', '.join(missing)}")
        if any(name not in columns for name, _ in ADDED_COLUMNS):
            _add_columns(connection, announce=bool(exists))
        _index_event_ids(connection)
        present = connection.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN"
                                     f" ({', '.join('?' * len(SUMMARY_TABLES))}, 'pycolytics_summarised')",
                                     SUMMARY_TABLES).fetchone()[0]
        if present < len(SUMMARY_TABLES) + 1:
            connection.executescript(SUMMARY_SCHEMA)  # an original's or an older Pycolytics' database
        connection.files = _file_ids(path)
        connection.linked = os.path.islink(path)
    except BaseException:
        connection.close()
        raise
    return connection


def _columns(connection):
    return {row[1] for row in connection.execute("PRAGMA table_info(event)")}


def _add_columns(connection, announce=True):
    """Give the table the columns Pycolytics added; another process may be doing the same."""
    with transaction(connection):
        columns = _columns(connection)
        for name, kind in ADDED_COLUMNS:
            if name not in columns:
                connection.execute(f"ALTER TABLE event ADD COLUMN {name} {kind}")
                if announce:
                    log.info("upgraded the database: added the column event.%s", name)


def _indexes(connection):
    return {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}


def _index_event_ids(connection):
    """Make event_id unique per application; an older database's index on event_id alone goes.

    The old index guarantees that no two rows share an event_id, so the new one is always
    created; both happen in one transaction, so no moment lets a duplicate in.
    """
    present = _indexes(connection)
    if "ix_event_application_event_id" in present and OLD_EVENT_ID_INDEX not in present:
        return  # the usual case: no write lock taken at each start
    with transaction(connection):
        connection.execute(EVENT_ID_INDEX)
        if OLD_EVENT_ID_INDEX in _indexes(connection):
            connection.execute(f"DROP INDEX {OLD_EVENT_ID_INDEX}")
            log.info("upgraded the database: event_id is unique per application (index %s replaces %s)",
                     "ix_event_application_event_id", OLD_EVENT_ID_INDEX)


class Metrics:
    """Counters and a histogram for /metrics, in Prometheus' text format. Thread-safe.

    The counts are one row of integers: a list of this process's own, or with `workers = N` this
    worker's row of the Scoreboard, in memory every worker shares. text() adds up `rows`, every
    worker's, so any worker's answer counts the whole server.
    """

    # Commit latency buckets, in seconds: an fsync on an SSD is ~1 ms, on an SD card ~10-100 ms.
    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
    # Where each count lives in a row. Commits are counted in the one bucket each falls in (the
    # last is past every bound) and added up when shown: one increment per commit, so that another
    # worker reading meanwhile never sees a histogram whose buckets disagree with its count.
    STORED, PRUNED, COMMIT_MICROSECONDS, COMMITS = 0, 1, 2, 3
    REQUESTS = COMMITS + len(BUCKETS) + 1  # requests by status, from 100 to 599
    REQUESTS_AT = dict(zip(map(str, range(100, 600)), range(REQUESTS, REQUESTS + 500)))  # status -> where
    FAILING = REQUESTS + 500  # not a metric: 1 while this process's last write failed (Scoreboard)
    WIDTH = FAILING + 1

    def __init__(self, rows=None, row=None):
        self._lock = threading.Lock()
        self._row = [0] * self.WIDTH if row is None else row
        self._rows = [self._row] if rows is None else rows
        self._row[self.FAILING] = 0  # a worker that replaces one that died has not failed yet

    def request(self, status, count=1):
        with self._lock:
            self._row[self.REQUESTS_AT[status[:3]]] += count

    def commit(self, seconds, stored):
        bucket = bisect.bisect_left(self.BUCKETS, seconds)  # how many bounds it is over
        with self._lock:
            self._row[self.STORED] += stored
            self._row[self.COMMIT_MICROSECONDS] += round(seconds * 1e6)
            self._row[self.COMMITS + bucket] += 1

    def pruned(self, deleted):
        with self._lock:
            self._row[self.PRUNED] += deleted

    def failing(self, failing):
        """Whether the last write failed: every worker's /healthz reads it (Scoreboard)."""
        self._row[self.FAILING] = int(failing)

    def text(self):
        with self._lock:
            rows = [list(row) for row in self._rows]
        total = [sum(column) for column in zip(*rows)]
        commits = list(itertools.accumulate(total[self.COMMITS:self.REQUESTS]))
        lines = [
            "# HELP pycolytics_events_stored_total Events committed to the database.",
            "# TYPE pycolytics_events_stored_total counter",
            f"pycolytics_events_stored_total {total[self.STORED]}",
            "# HELP pycolytics_requests_total Requests answered, by HTTP status.",
            "# TYPE pycolytics_requests_total counter",
        ]
        lines += [f'pycolytics_requests_total{{status="{status}"}} {total[self.REQUESTS - 100 + status]}'
                  for status in range(100, 600) if total[self.REQUESTS - 100 + status]]
        lines += [
            "# HELP pycolytics_commit_seconds Time to commit one group of events, fsync included.",
            "# TYPE pycolytics_commit_seconds histogram",
        ]
        lines += [f'pycolytics_commit_seconds_bucket{{le="{bound}"}} {n}' for bound, n in zip(self.BUCKETS, commits)]
        lines += [f'pycolytics_commit_seconds_bucket{{le="+Inf"}} {commits[-1]}',
                  f"pycolytics_commit_seconds_sum {total[self.COMMIT_MICROSECONDS] / 1e6:.6f}",
                  f"pycolytics_commit_seconds_count {commits[-1]}",
                  "# HELP pycolytics_events_pruned_total Events deleted for being older than retention_days.",
                  "# TYPE pycolytics_events_pruned_total counter",
                  f"pycolytics_events_pruned_total {total[self.PRUNED]}"]
        return "\n".join(lines) + "\n"


# Rows one pruning step deletes: a transaction this small holds the write lock for
# milliseconds, so ingestion waits no longer than for a commit.
PRUNE_STEP_ROWS = 500


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
        return f"{path} is a directory, not a database file (name a file in it, such as {os.path.join(path, 'pycolytics.db')})"
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


###############################################################################
# Summaries: what a report reads instead of every event (SQLite)
###############################################################################

# A report of a year reads every event of it, minutes on a Raspberry Pi with millions of them.
# So the writer keeps, in small steps between commits, a summary of the events stored so far
# in tables of its own beside `event` (pycolytics_*: a notebook may ignore them):
#   pycolytics_summarised   the id (and time) of the last event summarised: events come in id
#                           order, so a late event (an old timestamp) is summarised like any other;
#                           and how often events or summaries were deleted: the report cache's key
#   pycolytics_days         per day and application: events, users and sessions
#   pycolytics_sessions     per day and session: its user, events, first and last time (in
#                           microseconds since 1970, so that SQLite finds lengths as numbers)
#   pycolytics_presence     per user ("user", ""), and per user and event type, version or
#                           platform: the first and last day, and the days in between as bits
#   pycolytics_spans        per presence row's field, name and application and per day: how
#                           many rows begin and how many end that day, so that the users of a
#                           range are counted without reading the rows (_SummaryReader._present)
#   pycolytics_name_events  per day, application and event type, version or platform: events
# A report reads the summaries and, live, the events after the last one summarised. Pruning
# deletes whole days, which the summaries then forget; anything else that takes summarised
# events away (a prune --before a moment that is not midnight; the newest events deleted, so
# that their ids are given again, which the last summarised event's time tells) starts the
# summaries over. Other events deleted by hand stay in them (README.md says how to start them
# over). PostgreSQL keeps none: with several collectors its ids commit out of order, so "every
# id up to n is summarised" could skip one.
SUMMARY_SCHEMA = """
CREATE TABLE IF NOT EXISTS pycolytics_summarised (last_id INTEGER NOT NULL, last_time, deletions INTEGER NOT NULL);
INSERT INTO pycolytics_summarised SELECT 0, NULL, 0 WHERE NOT EXISTS (SELECT 1 FROM pycolytics_summarised);
CREATE TABLE IF NOT EXISTS pycolytics_days (
    day TEXT NOT NULL, application TEXT NOT NULL, events INTEGER NOT NULL, users INTEGER NOT NULL,
    sessions INTEGER NOT NULL, PRIMARY KEY (day, application)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pycolytics_sessions (
    day TEXT NOT NULL, application TEXT NOT NULL, user_id TEXT NOT NULL, session_id TEXT NOT NULL,
    events INTEGER NOT NULL, first_us INTEGER NOT NULL, last_us INTEGER NOT NULL,
    PRIMARY KEY (day, application, user_id, session_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ix_sessions_session ON pycolytics_sessions (application, session_id, day, first_us, last_us);
CREATE TABLE IF NOT EXISTS pycolytics_presence (
    field TEXT NOT NULL, name TEXT NOT NULL, application TEXT NOT NULL, user_id TEXT NOT NULL,
    first_day TEXT NOT NULL, last_day TEXT NOT NULL, days BLOB NOT NULL,
    PRIMARY KEY (field, name, application, user_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ix_presence_first_day ON pycolytics_presence (field, first_day);
CREATE TABLE IF NOT EXISTS pycolytics_spans (
    field TEXT NOT NULL, name TEXT NOT NULL, application TEXT NOT NULL, day TEXT NOT NULL,
    firsts INTEGER NOT NULL, lasts INTEGER NOT NULL, PRIMARY KEY (field, name, application, day)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pycolytics_name_events (
    day TEXT NOT NULL, application TEXT NOT NULL, field TEXT NOT NULL, name TEXT NOT NULL, events INTEGER NOT NULL,
    PRIMARY KEY (day, application, field, name)
) WITHOUT ROWID;
"""
SUMMARY_TABLES = ("pycolytics_days", "pycolytics_sessions", "pycolytics_presence", "pycolytics_spans",
                  "pycolytics_name_events")
# Events per summarising step at most: a few milliseconds of the writer's time, as a pruning step.
SUMMARY_STEP_ROWS = 500
# A commit that comes during a step waits for it, and a step of 500 events from as many new
# users takes 30 ms here (bench/README.md, "Issue 14, fourth round"), more on a Raspberry Pi:
# the writer's steps read as many events as the last one took this long for, 20 at least.
SUMMARY_STEP_SECONDS = 0.002
SUMMARY_MIN_ROWS = 20
# Summarising waits for a pause in the events: this long without a commit. A commit that
# comes during a step waits for it, so steps are kept to the pauses...
SUMMARY_IDLE_SECONDS = 0.05
# ...unless events keep coming until reports would read too many of them live: then steps
# take this share of the writer's time at most, the rest is for commits.
SUMMARY_SHARE = 0.05
# Days a presence row keeps as bits, back from its last day: 512 bytes at most, so that a
# client sending times centuries apart cannot make rows grow. A report asking about days
# before that (over 11 years before a user's last day) reads the events instead.
PRESENCE_DAYS = 4096
# Events after the last summarised one that a report still reads live; beyond that (the
# summaries are being built, of an original database say) the whole report is read live.
MAX_LIVE_TAIL = 20_000
# A user in the presence table, beside the fields a report ranks.
PRESENCE_FIELDS = ("user", "event_type", "version", "platform")


@functools.lru_cache(maxsize=4096)
def _day_number(text):
    """The proleptic ordinal of a stored time's day (its first 10 characters), or None if not a day."""
    try:
        return datetime.date.fromisoformat(text).toordinal() if len(text) == 10 else None
    except (TypeError, ValueError):
        return None


@functools.lru_cache(maxsize=4096)
def _day_text(number):
    return datetime.date.fromordinal(number).isoformat()


_EPOCH_NAIVE = datetime.datetime(1970, 1, 1)
_MICROSECOND = datetime.timedelta(microseconds=1)


def _microseconds(text):
    """A stored time as microseconds since 1970: exact, so that lengths match to the microsecond."""
    return (datetime.datetime.fromisoformat(text.replace("T", " ")[:26]) - _EPOCH_NAIVE) // _MICROSECOND


def _summarised(connection):
    """(id, time) of the last event summarised; (0, None) before the first."""
    return connection.execute("SELECT last_id, last_time FROM pycolytics_summarised").fetchone() or (0, None)


def _summaries_hold(connection, last_id, last_time):
    """Whether the last summarised event is still there: else events were deleted or their ids given again."""
    return not last_id or connection.execute("SELECT time FROM event WHERE id = ?", (last_id,)).fetchone() == (last_time,)


def _set_summarised(connection, last_id, last_time):
    connection.execute("UPDATE pycolytics_summarised SET last_id = ?, last_time = ?", (last_id, last_time))


class SummaryPostponed(Exception):
    """Another connection holds the write lock: the summarising step waits for the next pause."""


def restart_summaries(connection):
    """Forget every summary, in the caller's transaction: they are built again from the first event."""
    for table in SUMMARY_TABLES:
        connection.execute(f"DELETE FROM {table}")
    _set_summarised(connection, 0, None)


def summarise(connection, limit=SUMMARY_STEP_ROWS):
    """Add up to `limit` events after the last summarised one to the summaries, in the caller's
    transaction; return how many were read."""
    last_id, last_time = _summarised(connection)
    if not _summaries_hold(connection, last_id, last_time):
        log.info("the last summarised event was deleted: summarising every event again")
        restart_summaries(connection)
        last_id = 0
    rows = connection.execute(
        "SELECT id, application, user_id, session_id, event_type, version, platform, time FROM event"
        " WHERE id > ? ORDER BY id LIMIT ?", (last_id, limit)).fetchall()
    if not rows:
        return 0
    sessions, presence, events = {}, collections.defaultdict(set), collections.Counter()
    days = collections.defaultdict(lambda: [0, 0, 0])  # (day, application) -> new [events, users, sessions]
    for _, application, user_id, session_id, event_type, version, platform, moment in rows:
        try:
            number, microseconds = _day_number(moment[:10]), _microseconds(moment)
        except (TypeError, ValueError):
            number = None
        if number is None:
            continue  # not a time a report can place on a day (a hand-made row)
        day = moment[:10]
        session = sessions.get((day, application, user_id, session_id))
        if session is None:
            sessions[day, application, user_id, session_id] = [1, microseconds, microseconds]
        else:
            session[0] += 1
            session[1], session[2] = min(session[1], microseconds), max(session[2], microseconds)
        days[day, application][0] += 1
        presence["user", "", application, user_id].add(number)
        for field, name in zip(PRESENCE_FIELDS[1:], (event_type, version, platform)):
            presence[field, name, application, user_id].add(number)
            events[day, application, field, name] += 1
    for day, application, session_id in {(day, application, session_id) for day, application, _, session_id in sessions}:
        if not _had_session(connection, application, session_id, day):
            days[day, application][2] += 1
    stored = _stored_presence(connection, list(presence))
    changed, spans = [], collections.defaultdict(lambda: [0, 0])
    for key, numbers in presence.items():
        row = _presence(stored.get(key), numbers)
        if row != stored.get(key):  # a user already seen that day, as most are: nothing to write
            changed.append(key + row)
            _span_moved(spans, key, stored.get(key), row)
        if key[0] == "user":
            for number in numbers:
                if not _had_user(connection, stored.get(key), key[2], key[3], number):
                    days[_day_text(number), key[2]][1] += 1
    connection.executemany(
        "INSERT INTO pycolytics_sessions VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (day, application, user_id, session_id) DO UPDATE SET"
        " events = events + excluded.events, first_us = min(first_us, excluded.first_us),"
        " last_us = max(last_us, excluded.last_us)",
        [key + tuple(figures) for key, figures in sessions.items()])
    connection.executemany(
        "INSERT INTO pycolytics_days VALUES (?, ?, ?, ?, ?) ON CONFLICT (day, application) DO UPDATE SET"
        " events = events + excluded.events, users = users + excluded.users, sessions = sessions + excluded.sessions",
        [key + tuple(figures) for key, figures in days.items()])
    connection.executemany(
        "INSERT INTO pycolytics_name_events VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (day, application, field, name) DO UPDATE SET"
        " events = events + excluded.events", [key + (count,) for key, count in events.items()])
    connection.executemany("INSERT OR REPLACE INTO pycolytics_presence VALUES (?, ?, ?, ?, ?, ?, ?)", changed)
    _count_spans(connection, spans)
    _set_summarised(connection, rows[-1][0], rows[-1][-1])
    return len(rows)


def _span_moved(spans, key, before, after):
    """Count in `spans` a presence row whose (first day, last day, ...) went from `before` to `after`."""
    for row, step in ((before, -1), (after, 1)):
        if row is not None and (before is None or after is None or before[:2] != after[:2]):
            spans[key[:3] + (row[0],)][0] += step
            spans[key[:3] + (row[1],)][1] += step


def _count_spans(connection, spans):
    connection.executemany(
        "INSERT INTO pycolytics_spans VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (field, name, application, day)"
        " DO UPDATE SET firsts = firsts + excluded.firsts, lasts = lasts + excluded.lasts",
        [key + tuple(counts) for key, counts in spans.items() if any(counts)])


def _had_session(connection, application, session_id, day):
    """Whether the summaries have the session on that day already."""
    return connection.execute("SELECT 1 FROM pycolytics_sessions WHERE application = ? AND session_id = ?"
                              " AND day = ? LIMIT 1", (application, session_id, day)).fetchone() is not None


def _had_user(connection, stored, application, user_id, number):
    """Whether the summaries have the user on day `number` already, from their presence row `stored`."""
    if stored is None:
        return False
    last = _day_number(stored[1])
    if number > last or number < _day_number(stored[0]):
        return False
    if last - number < PRESENCE_DAYS:
        return bool(int.from_bytes(stored[2], "little") >> (last - number) & 1)
    return connection.execute(  # a day older than the bits keep: the sessions tell
        "SELECT 1 FROM pycolytics_sessions WHERE day = ? AND application = ? AND user_id = ? LIMIT 1",
        (_day_text(number), application, user_id)).fetchone() is not None


def _stored_presence(connection, keys):
    """{key: (first day, last day, days)} of the presence rows of `keys` that exist."""
    found = {}
    for key in keys:  # one lookup each: SQLite's IN over row values would scan the table
        row = connection.execute("SELECT first_day, last_day, days FROM pycolytics_presence WHERE field = ?"
                                 " AND name = ? AND application = ? AND user_id = ?", key).fetchone()
        if row is not None:
            found[key] = row
    return found


def _presence(stored, numbers):
    """(first day, last day, bits) of a presence row (None: a new one) with the days `numbers` added."""
    first, last, bits = min(numbers), max(numbers), 0
    if stored is not None:
        stored_last = _day_number(stored[1])
        first, last = min(first, _day_number(stored[0])), max(last, stored_last)
        bits = int.from_bytes(stored[2], "little") << (last - stored_last)
    for number in numbers:
        if last - number < PRESENCE_DAYS:
            bits |= 1 << (last - number)  # bit n: the day n days before the last
    bits &= (1 << PRESENCE_DAYS) - 1
    return _day_text(first), _day_text(last), bits.to_bytes((bits.bit_length() + 7) // 8, "little")


def forget_days_before(connection, day, limit=SUMMARY_STEP_ROWS):
    """Take the days before `day` (a date) out of the summaries, up to `limit` presence rows at a
    time, in the caller's transaction; return how many presence rows were changed."""
    text, number = day.isoformat(), day.toordinal()
    changed, spans = 0, collections.defaultdict(lambda: [0, 0])
    for field in PRESENCE_FIELDS:
        rows = connection.execute(
            "SELECT name, application, user_id, first_day, last_day, days FROM pycolytics_presence WHERE field = ?"
            " AND first_day < ? LIMIT ?", (field, text, limit - changed)).fetchall()
        for name, application, user_id, first_day, last_day, days in rows:
            last = _day_number(last_day)
            kept = int.from_bytes(days, "little") & ((1 << max(0, last - number + 1)) - 1)
            key = (field, name, application, user_id)
            if kept:
                row = (_day_text(last - kept.bit_length() + 1), last_day, kept.to_bytes((kept.bit_length() + 7) // 8,
                                                                                        "little"))
                connection.execute("UPDATE pycolytics_presence SET first_day = ?, days = ? WHERE field = ?"
                                   " AND name = ? AND application = ? AND user_id = ?", (row[0], row[2]) + key)
            else:
                row = None
                connection.execute("DELETE FROM pycolytics_presence WHERE field = ? AND name = ?"
                                   " AND application = ? AND user_id = ?", key)
            _span_moved(spans, key, (first_day, last_day), row)
        changed += len(rows)
        if changed >= limit:
            break
    _count_spans(connection, spans)
    for table in ("pycolytics_days", "pycolytics_sessions", "pycolytics_name_events", "pycolytics_spans"):
        connection.execute(f"DELETE FROM {table} WHERE day < ?", (text,))
    connection.execute("UPDATE pycolytics_summarised SET deletions = deletions + ?", (changed,))
    return changed


class Store:
    """What a storage backend provides: SQLiteStore and PostgresStore. The writer, /healthz, the
    dashboard, export and prune use only this, never asking which backend it is (backup and copy
    do ask: they are SQLite's backup and a move from SQLite into PostgreSQL).

    SQL fragments, for queries written once for both:
      kind          the backend's name, for messages
      errors        the driver's exception classes
      parameter     a query parameter (? or %s)
      since         a time parameter compared with `time`
      scan_time     `time` in a condition that must not pick the time index (export reads in id order)
      day           a row's day as YYYY-MM-DD text
      time_text, received_text, value_text    those columns as the text SQLite stores
    Methods:
      connect()                    the write connection; makes or upgrades the schema
      read()                       a connection for reading only; never creates a database
      insert(connection, rows)     store rows in one transaction; how many were new (not a known event_id)
      prune(connection, before, limit)   delete at most `limit` events older than `before`, in one transaction; how many
      probe(connection)            make one small write, raising whatever stops it (health recovering)
      detached(connection)         why `connection` no longer reaches the configured database, or None
      lost(error)                  whether `error` means the connection is gone and a new one is needed
      columns(connection)          the event table's column names
      rows(connection, query, parameters)   the rows of a SELECT, streamed in constant memory
      problem()                    why the database would not take events now, or None; waits HEALTH_TIMEOUT at most
      describe(error)              `error` in words that /healthz may show (no hosts, users or passwords)
      exists()                     whether the database is there already (commands never create one)
      generation(connection)       what changes whenever events are stored or pruned (the report cache's key)
      summarise(connection)        one step of keeping the summaries reports read; how many events it read
      forget(connection, before)   one step of taking events pruned before `before` out of them; rows changed
    """

    scan_time = "time"
    summaries = False  # whether the store keeps summaries ("Summaries")

    def summarise(self, connection, limit=SUMMARY_STEP_ROWS):
        return 0

    def forget(self, connection, before):
        return 0

    def generation(self, connection):
        # one aggregate a statement: SQLite answers min(id) or max(id) from the index, both together by a scan
        return tuple(connection.execute(f"SELECT {end}(id) FROM event").fetchone()[0] for end in ("min", "max"))

    def exists(self):
        return True

    def detached(self, connection):
        return None

    def rows(self, connection, query, parameters):
        return connection.execute(query, parameters)


class SQLiteStore(Store):
    """Events in an SQLite file: the default, standard library only.

    Only the first connection may create the file: if it is deleted or replaced while the server
    runs, the writer reopens the path only when a database is there again (put back, or
    restored from a backup), and events get 503 meanwhile. A restart creates a new, empty one.
    """

    kind = "SQLite"
    summaries = True
    parameter = "?"  # how a query's parameters are written
    since = "?"  # a time parameter compared with `time`
    scan_time = "+time"  # the unary + keeps SQLite from reading through the time index
    day = "substr(time, 1, 10)"
    time_text = "time"
    received_text = "received_at"
    value_text = "value"

    def __init__(self, config):
        self.config = config
        self.errors = (sqlite3.Error,)
        self._files = None  # the files the last connect() opened
        # As SQLite resolves it, once: os.path.abspath of a relative path asks for the working
        # directory, a system call before and after every commit.
        self._path = os.path.abspath(config.database)
        self._folder = os.path.dirname(self._path)

    def connect(self):
        path = self.config.database
        if self._files is None:
            problem = unwritable(path)
            if problem:
                raise ConfigError(f"{self.config.sources['database']}: cannot write the database {path}: {problem}")
        elif not os.path.exists(path):
            raise DatabaseGone(f"the database file {os.path.abspath(path)} is gone (deleted or moved while the "
                               "server ran): put it back, or restart the server to start a new, empty one")
        else:
            self._refuse_a_stale_log(path)
        connection = connect(path, self.config.synchronous, self.config.busy_timeout, create=self._files is None)
        self._files = connection.files
        return connection

    def _refuse_a_stale_log(self, path):
        """A database put back beside the -wal of the one deleted would take that log's pages as its own."""
        before = {suffix: (device, inode) for suffix, device, inode in self._files}
        now = {suffix: (device, inode) for suffix, device, inode in _file_ids(path)}
        if before.get("") != now.get("") and before.get("-wal") is not None and before.get("-wal") == now.get("-wal"):
            raise DatabaseGone(f"the database file {os.path.abspath(path)} was replaced, but its -wal file is the "
                               "deleted database's: move the -wal and -shm files away, then it is opened again")

    def exists(self):
        return os.path.exists(self.config.database)

    def detached(self, connection):
        """Why `connection` no longer writes into the file at the configured path, or None.

        Asked before and after every commit, so mostly answered by one stat, of the folder:
        deleting, replacing or renaming a file in it changes its mtime. The file system takes
        that time from a coarse clock, though, so a change within the same tick as the one
        before leaves it as it was: only an mtime a tick older than the check that found the
        files in place vouches for them later. A symbolic link's folder vouches for nothing.
        """
        path = self._path
        checked_at = time.time_ns()
        try:
            folder = os.stat(self._folder)
        except FileNotFoundError:
            return f"the folder of the database file {path} was deleted or moved while the server ran"
        stamp = (folder.st_dev, folder.st_ino, folder.st_mtime_ns)
        if stamp == connection.folder_stamp:
            return None
        for suffix, device, inode in connection.files:
            try:
                status = os.stat(path + suffix)
            except FileNotFoundError:
                return f"the database file {path + suffix} was deleted while the server ran"
            if (status.st_dev, status.st_ino) != (device, inode):
                return f"the database file {path + suffix} was replaced while the server ran"
        tick = COARSE_FOLDER_TICK_NS if folder.st_mtime_ns % 1_000_000_000 == 0 else FOLDER_TICK_NS
        if not connection.linked and checked_at - folder.st_mtime_ns > tick:
            connection.folder_stamp = stamp
        return None

    def insert(self, connection, rows):
        """Insert `rows` in one transaction; return how many were new (not an event_id already stored).

        Raises DatabaseGone if the file was deleted or replaced meanwhile: the rows went to a
        file nobody will open again.
        """
        changes = connection.total_changes
        if 0 < len(rows) <= INSERT_CHUNK_ROWS:  # one statement: a transaction by itself, atomic
            connection.execute(_insert_rows(len(rows)), list(itertools.chain.from_iterable(rows)))
        else:
            with transaction(connection):
                for start, size in _chunks(len(rows)):
                    connection.execute(_insert_rows(size),
                                       list(itertools.chain.from_iterable(rows[start:start + size])))
        self._still_there(connection)
        return connection.total_changes - changes

    def _still_there(self, connection):
        problem = self.detached(connection)
        if problem:
            raise DatabaseGone(problem)

    def prune(self, connection, before, limit=PRUNE_STEP_ROWS):
        """Delete at most `limit` events older than `before` (stored time text); return how many."""
        with transaction(connection):
            deleted = connection.execute(
                "DELETE FROM event WHERE id IN (SELECT id FROM event WHERE time < ? ORDER BY id LIMIT ?)",
                (before, limit),
            ).rowcount
            connection.execute("UPDATE pycolytics_summarised SET deletions = deletions + ?", (deleted,))
            if deleted < limit:  # the pass's last step: no report sees the events gone but still summarised
                self._forget(connection, before)
            return deleted

    def generation(self, connection):
        """What changes whenever events are stored or deleted: the report cache's key."""
        lowest, highest = super().generation(connection)
        try:
            pruned = connection.execute("SELECT deletions FROM pycolytics_summarised").fetchone()
        except sqlite3.OperationalError:  # a database no collector of this version has opened
            pruned = None
        return lowest, highest, pruned and pruned[0]

    def summarise(self, connection, limit=SUMMARY_STEP_ROWS):
        """One step of summarising up to `limit` new events (see "Summaries"); how many were read.

        Without an fsync of its own: a summary lost to a power cut is made again from the events,
        and the next commit's fsync makes it durable with that commit. It never waits for the write
        lock, which another process may hold for long (a backup, a notebook): SummaryPostponed,
        the writer's commits come first. With nothing new to read it takes no lock at all.
        """
        if (connection.execute("SELECT max(id) FROM event").fetchone()[0] or 0) == _summarised(connection)[0]:
            return 0
        if _synchronous(self.config.synchronous) != "off":
            connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA busy_timeout=0")
        try:
            with transaction(connection):
                read = summarise(connection, limit)
        except sqlite3.OperationalError as error:
            if "locked" in str(error) or "busy" in str(error):
                raise SummaryPostponed(str(error)) from None
            raise
        finally:
            connection.execute(f"PRAGMA synchronous={_synchronous(self.config.synchronous)}")
            connection.execute(f"PRAGMA busy_timeout={int(self.config.busy_timeout * 1000)}")
        self._still_there(connection)
        return read

    def forget(self, connection, before):
        """One step of taking pruned events out of the summaries; how many summary rows changed.

        The last step of a prune takes the first one itself, in its own transaction.
        """
        with transaction(connection):
            return self._forget(connection, before)

    def _forget(self, connection, before):
        if before.endswith(" 00:00:00.000000"):
            return forget_days_before(connection, datetime.date.fromisoformat(before[:10]))
        if _summarised(connection)[0]:
            restart_summaries(connection)  # part of a day was deleted: its figures are gone
        return 0

    def probe(self, connection):
        """Commit a write that changes nothing (user_version rewritten as it is): lock, log and fsync all work."""
        with transaction(connection):
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            connection.execute(f"PRAGMA user_version = {int(version)}")
        self._still_there(connection)

    def lost(self, error):
        """Whether `error` means the connection must be replaced: only when its file was."""
        return isinstance(error, DatabaseGone)

    def describe(self, error):
        """`error` as /healthz may show it: SQLite's messages name no host, user or database."""
        return str(error)

    def read(self):
        """A connection for reading only; it never creates a missing database."""
        return read_only(self.config.database)

    def columns(self, connection):
        return _columns(connection)

    def problem(self):
        """Why the database would not take events now, or None if it would."""
        try:
            space = os.statvfs(os.path.dirname(os.path.abspath(self.config.database)))
            if space.f_bavail * space.f_frsize < MIN_FREE_DISK:
                return "the disk is almost full"
            uri = "file:" + urllib_quote(os.path.abspath(self.config.database)) + "?mode=rw"
            connection = sqlite3.connect(uri, uri=True, timeout=HEALTH_TIMEOUT, isolation_level=None)
            try:
                with transaction(connection):  # can we take the write lock?
                    pass
            finally:
                connection.close()
        except (OSError, sqlite3.Error) as error:
            return str(error)
        return None


# PostgreSQL's table: the same columns, with its own types for JSON and times.
POSTGRES_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS event (
        event_type VARCHAR NOT NULL,
        application VARCHAR NOT NULL,
        version VARCHAR NOT NULL,
        platform VARCHAR NOT NULL,
        user_id VARCHAR NOT NULL,
        session_id VARCHAR NOT NULL,
        value JSONB NOT NULL,
        id BIGSERIAL PRIMARY KEY,
        time TIMESTAMPTZ NOT NULL,
        received_at TIMESTAMPTZ,
        event_id VARCHAR
    )""",
    "CREATE INDEX IF NOT EXISTS ix_event_time ON event (time)",
    "CREATE UNIQUE INDEX IF NOT EXISTS ix_event_application_event_id ON event (application, event_id)"
    " WHERE event_id IS NOT NULL",
    # an event_id is unique per application: two games may make the same ids
    "DROP INDEX IF EXISTS ix_event_event_id",
)
# The indexes a ready schema has: when they are there, connecting takes no lock on the table
# (CREATE INDEX IF NOT EXISTS would take one, and wait behind every other collector's insert).
POSTGRES_SCHEMA_READY = (
    "SELECT to_regclass('event') IS NOT NULL AND to_regclass('ix_event_time') IS NOT NULL"
    " AND to_regclass('ix_event_application_event_id') IS NOT NULL AND to_regclass('ix_event_event_id') IS NULL"
)
# Times travel as the same UTC text as in SQLite; the session's time zone is UTC. The conflict
# target is the event_id index only: any other conflict (a primary key behind rows imported
# with their ids) is an error, never an event silently dropped behind a 204.
POSTGRES_INSERT = (
    "INSERT INTO event"
    " (event_type, application, version, platform, user_id, session_id, value, time, received_at, event_id)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s::timestamptz, %s::timestamptz, %s)"
    " ON CONFLICT (application, event_id) WHERE event_id IS NOT NULL DO NOTHING"
)
# The same for a whole group in one statement, its rows as one JSON array of arrays: the driver
# adapts one parameter instead of ten per row, and the collector spends less than half the CPU
# on a batch (bench/README.md, "PostgreSQL: one JSON argument per group"). ->> gives back each
# string as encoded and null as NULL; rows go in in the array's order, so of two rows with one
# event_id the first is stored and the second skipped, as one statement after another would do.
POSTGRES_INSERT_GROUP = (
    "INSERT INTO event"
    " (event_type, application, version, platform, user_id, session_id, value, time, received_at, event_id)"
    " SELECT fields->>0, fields->>1, fields->>2, fields->>3, fields->>4, fields->>5, (fields->>6)::jsonb,"
    " (fields->>7)::timestamptz, (fields->>8)::timestamptz, fields->>9"
    " FROM json_array_elements(%s::json) WITH ORDINALITY AS given (fields, place) ORDER BY place"
    " ON CONFLICT (application, event_id) WHERE event_id IS NOT NULL DO NOTHING"
)
# Characters of a group's JSON text at most: PostgreSQL holds no value over 1 GB, and a
# character is at most 4 bytes of UTF-8. Only a max_buffered_bytes raised far beyond its
# default makes a group this large; such a group goes row by row (POSTGRES_INSERT).
MAX_JSON_GROUP_CHARS = 200_000_000
# Every session's settings, in one round trip. Waits for a lock and statements are bounded as
# SQLite's busy_timeout bounds them; synchronous_commit = on whatever the server's default is,
# so a 204 means the commit is on disk (and on a synchronous standby, if there is one).
POSTGRES_SESSION = (
    "SELECT set_config('TimeZone', 'UTC', false), set_config('lock_timeout', %s, false),"
    " set_config('statement_timeout', %s, false), set_config('synchronous_commit', %s, false)"
)
# synchronous = normal (or off) relaxes commits as on SQLite: a crash of the database server
# may lose the last commits, a crash of the collector loses nothing.
POSTGRES_SYNCHRONOUS_COMMIT = {"full": "on", "normal": "off", "off": "off"}

# The statement that ends a group's transaction: after it is sent, a lost connection leaves the
# outcome unknown (a 503; a retry with event_ids is safe), never a silent second try.
POSTGRES_COMMIT = "COMMIT"
# Seconds beyond busy_timeout before the watchdog cuts a connection: time for the server's
# own timeout error to arrive first.
POSTGRES_GRACE = 5


class LostBeforeCommit(ConnectionError):
    """The connection was gone before a transaction's COMMIT was sent: nothing of it is stored,
    so the same rows on a new connection are stored once."""


def _cut(connection):
    """Shut the connection's socket down beneath libpq: a call blocked on it fails at once."""
    try:
        with socket.fromfd(connection.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM) as duplicate:
            duplicate.shutdown(socket.SHUT_RDWR)
    except Exception:  # already closed: nothing is blocked on it
        pass


class Watchdog:
    """Cuts a connection whose call outlives its deadline. libpq waits forever for a peer that
    acknowledges TCP but never answers (a frozen proxy, a hung server): keepalives and
    tcp_user_timeout only notice a peer that stops acknowledging."""

    IDLE_SECONDS = 60  # the thread ends after this long with nothing to watch

    def __init__(self):
        self._changed = threading.Condition()
        self._watched = {}  # token: [deadline, connection, fired]
        self._thread = None

    @contextlib.contextmanager
    def watching(self, connection, seconds):
        """Within the block, `connection` is cut `seconds` from now; yields a list that holds
        True once it was."""
        entry = [time.monotonic() + seconds, connection, False]
        token = object()
        with self._changed:
            self._watched[token] = entry
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pycolytics-watchdog", daemon=True)
                self._thread.start()
            self._changed.notify()
        try:
            yield entry
        finally:
            with self._changed:
                del self._watched[token]

    def _run(self):
        with self._changed:
            while True:
                now = time.monotonic()
                for entry in self._watched.values():
                    if entry[0] <= now and not entry[2]:
                        entry[2] = True
                        log.error("the database did not answer in time: cutting the connection")
                        _cut(entry[1])
                waiting = [entry[0] - now for entry in self._watched.values() if not entry[2]]
                if not waiting and not self._changed.wait(self.IDLE_SECONDS) and not self._watched:
                    self._thread = None
                    return
                if waiting:
                    self._changed.wait(max(0.01, min(waiting)))


class PostgresStore(Store):
    """Events in PostgreSQL (or a database that speaks its protocol), for several collectors.

    The driver, psycopg 3, is imported only here: SQLite users never need it. Every wait is
    bounded by busy_timeout: connecting, a lock, a statement, a silent network (keepalives,
    tcp_user_timeout) and a peer that answers TCP but nothing else (the Watchdog).
    """

    kind = "PostgreSQL"
    parameter = "%s"
    since = "%s::timestamptz"
    day = "to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
    time_text = "to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')"
    received_text = "to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')"
    value_text = "value::text"

    def __init__(self, config):
        try:
            import psycopg
        except ImportError:
            raise ConfigError(
                f"{config.sources['database']}: a postgresql:// database needs the psycopg 3 driver: "
                'python3 -m pip install "psycopg[binary]"'
            ) from None
        self.psycopg = psycopg
        self.config = config
        self.errors = (psycopg.Error,)
        self.watchdog = Watchdog()
        self._told = None  # the last health problem logged, so a polling balancer logs it once

    def _open(self, seconds, statements=True):
        """A connection whose waits end after `seconds`; `statements`: a statement's too (not
        for export, whose one query may rightly take long)."""
        whole = max(2, math.ceil(seconds))  # libpq counts whole seconds, and at least 2
        # autocommit: every transaction is an explicit BEGIN, so none is ever left open by a
        # stray statement (and rolled back, unseen, when it closes). The URL's own
        # application_name, if any, wins over the fallback.
        connection = self.psycopg.connect(
            self.config.database, autocommit=True, connect_timeout=whole, keepalives=1,
            keepalives_idle=max(1, whole // 2), keepalives_interval=1, keepalives_count=3,
            tcp_user_timeout=whole * 1000, fallback_application_name="pycolytics",
        )
        try:
            locks = int(seconds * 1000)
            # a second more for a statement, so that a lock wait fails as one (and says so)
            statement = str(locks + 1000) if statements else "0"
            synchronous = POSTGRES_SYNCHRONOUS_COMMIT.get(self.config.synchronous, "on")
            with self.watchdog.watching(connection, seconds + POSTGRES_GRACE):
                connection.execute(POSTGRES_SESSION, (str(locks), statement, synchronous))
        except BaseException:
            connection.close()
            raise
        return connection

    def connect(self):
        connection = self._open(self.config.busy_timeout)
        try:
            with self.watchdog.watching(connection, self.config.busy_timeout + POSTGRES_GRACE):
                if not connection.execute(POSTGRES_SCHEMA_READY).fetchone()[0]:
                    self._create_schema(connection)
        except BaseException:
            connection.close()
            raise
        return connection

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
        with self.watchdog.watching(connection, self.config.busy_timeout + POSTGRES_GRACE) as watch:
            try:
                with connection.cursor() as cursor:
                    cursor.execute("BEGIN")
                    if len(group) <= MAX_JSON_GROUP_CHARS:
                        cursor.execute(POSTGRES_INSERT_GROUP, (group,))
                    else:
                        cursor.executemany(POSTGRES_INSERT, rows)
                    inserted = max(0, cursor.rowcount)
                    committing = True
                    # statement_timeout never covers a commit (the server disables it first):
                    # a wait for a synchronous standby is bounded by the watchdog
                    cursor.execute(POSTGRES_COMMIT)
            except self.psycopg.Error as error:
                if committing or watch[2]:
                    raise  # the commit's outcome is unknown, or the database hung: 503
                if connection.broken:
                    raise LostBeforeCommit(f"the database connection was lost before the commit: {error}") from error
                self._roll_back(connection)
                raise
        return inserted

    def _roll_back(self, connection):
        try:
            connection.execute("ROLLBACK")
        except self.psycopg.Error:  # the original error is what matters; the next BEGIN says if it is broken
            pass

    def prune(self, connection, before, limit=PRUNE_STEP_ROWS):
        with self.watchdog.watching(connection, self.config.busy_timeout + POSTGRES_GRACE):
            with connection.transaction():
                return connection.execute(
                    "DELETE FROM event WHERE id IN"
                    " (SELECT id FROM event WHERE time < %s::timestamptz ORDER BY id LIMIT %s)", (before, limit)
                ).rowcount

    def lost(self, error):
        return isinstance(error, (self.psycopg.OperationalError, self.psycopg.InterfaceError))

    def read(self):
        return self._open(self.config.busy_timeout, statements=False)

    def columns(self, connection):
        return {row[0] for row in connection.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'event'"
            " AND table_schema = current_schema()")}

    def problem(self):
        """Why the database would not take events now, or None: in general words (the driver's
        details, which name hosts and databases, go to the log). Waits HEALTH_TIMEOUT at most,
        and takes the lock an insert takes, so a table locked by a migration shows."""
        try:
            connection = self._open(HEALTH_TIMEOUT)
            try:
                with self.watchdog.watching(connection, HEALTH_TIMEOUT + POSTGRES_GRACE):
                    with connection.transaction():
                        connection.execute("LOCK TABLE event IN ROW EXCLUSIVE MODE")
            finally:
                connection.close()
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
        """`error` in general words, for clients and /healthz: the driver's own text names hosts,
        ports, users and databases, and belongs in the log."""
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


# A row's value, as compact JSON text: rows are EVENT_FIELDS, then value, time, received_at, event_id.
_VALUE_TEXT = operator.itemgetter(len(EVENT_FIELDS))


class Writer:
    """The one thread that writes: commits the rows of many requests in one transaction.

    Requests hand their rows over with a function to call once they are committed. The
    writer takes everything queued, commits it with one fsync, calls every function, and
    meanwhile the next group gathers: under load, one fsync serves many requests. The queue
    is bounded: when it is full, requests are refused with 503 and Retry-After rather than
    held in memory.
    """

    def __init__(self, config, store, metrics):
        self.config = config
        self.store = store
        self.metrics = metrics
        self.last_error = None  # what the last write (a commit or a probe) failed with
        self._probe_due = 0.0
        self._wrote_at = -HEALTH_CACHE_SECONDS  # when a write last succeeded
        self._health_lock = threading.Lock()
        self._checked, self._checked_at, self._checking = None, -HEALTH_CACHE_SECONDS, False
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue = []
        self._queued_rows = 0
        self._queued_bytes = 0  # of values: what a queue of few but huge events holds
        self._closed = False
        self._thread = None
        self._connection = None
        self._reconnect_at = 0.0
        self._unreachable = None  # why the last reconnection failed
        self._pass_pruned = 0  # by the steps of this pass, so far
        self._prune_due = time.monotonic() + 60  # retention_days: a minute after start, then hourly
        self._summary_behind = store.summaries  # whether events may wait to be summarised
        self._unsummarised = MAX_LIVE_TAIL  # events committed since the summaries caught up (a guess at start)
        self._summary_next = 0.0  # under load, summarising takes SUMMARY_SHARE of the time at most
        self._summary_rows = SUMMARY_STEP_ROWS  # events a step reads: fewer where they take long
        self._summary_retry_at = 0.0  # after a step failed
        self._committed_at = -SUMMARY_IDLE_SECONDS  # when the last group was committed
        # How long a blocking write waits for its commit before answering 503: beyond any busy wait.
        self._patience = config.busy_timeout + 30

    def start(self):
        """Open the database (raising if it cannot be) and start the writer thread."""
        with self._lock:
            if self._thread is None and not self._closed:
                self._connection = self.store.connect()
                self._thread = threading.Thread(target=self._run, name="pycolytics-writer")
                self._thread.daemon = True
                self._thread.start()

    def submit(self, rows, committed):
        """Queue `rows`; the writer thread calls committed(error) once they are stored (error None) or not."""
        with self._lock:
            if self._closed:
                raise ServiceUnavailable("the server is shutting down; send the events again shortly", 5)
            size = sum(map(len, map(_VALUE_TEXT, rows)))
            if self._queued_rows and (self._queued_rows + len(rows) > self.config.max_pending_events
                                      or self._queued_bytes + size > self.config.max_buffered_bytes):
                raise ServiceUnavailable("the server is busy writing other events; send these again shortly")
            self._queue.append((rows, committed))
            self._queued_rows += len(rows)
            self._queued_bytes += size
            self._wakeup.notify()

    def write(self, rows):
        """Return once `rows` are committed; raise ServiceUnavailable if they cannot be."""
        done = threading.Lock()
        done.acquire()
        outcome = []

        def committed(error):
            outcome.append(error)
            done.release()

        self.submit(rows, committed)
        if not done.acquire(timeout=self._patience):
            raise ServiceUnavailable("the database did not answer in time; send the events again shortly", 5)
        if outcome[0] is not None:
            raise outcome[0]

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
                    error = self._commit(group)
                    self._summary_behind = self.store.summaries
                    for _, committed in group:
                        committed(error)
                    if error is None and self._unsummarised > MAX_LIVE_TAIL // 2 and time.monotonic() >= max(
                            self._summary_next, self._summary_retry_at):
                        self._summarise()  # under load, and reports would soon read the events: a paced step
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
        if self._connection is not None:
            problem = self.store.detached(self._connection)
            if problem:
                log.error("%s: opening the database again", problem)
                self._drop()
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
        """Why the database would not take events now, or None; waits HEALTH_TIMEOUT at most.

        Mostly instant, so that a flood of /healthz costs the database nothing: a failed write
        is known (and probed again every HEALTH_PROBE_SECONDS), a write that succeeded in the
        last HEALTH_CACHE_SECONDS says enough, and otherwise a check of its own runs once in
        HEALTH_CACHE_SECONDS at most, one at a time, while other callers get the last result.
        """
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
        self.metrics.failing(True)
        self._probe_due = time.monotonic() + HEALTH_PROBE_SECONDS
        self._forget_lost(error)

    def _succeeded(self):
        self.last_error = None
        self.metrics.failing(False)
        self._wrote_at = time.monotonic()

    def _summary_due(self):
        """When the next summarising step between commits may come, or None: none is needed, or the
        database fails. Once no commit came for SUMMARY_IDLE_SECONDS, steps follow each other."""
        if not self._summary_behind or self.last_error is not None:
            return None
        return max(self._summary_retry_at, self._committed_at + SUMMARY_IDLE_SECONDS)

    def _summarise(self):
        """One step of summarising new events for reports; under load, SUMMARY_SHARE of the time at most."""
        started, limit = time.monotonic(), self._summary_rows
        try:
            read = self.store.summarise(self._connected(), limit)
        except SummaryPostponed:
            self._summary_retry_at = time.monotonic() + 1
            return
        except Exception as error:  # the database's errors, or a lost connection: reports read live meanwhile
            self._forget_lost(error)
            log.warning("could not summarise events for reports (trying again in a minute): %s", error)
            self._summary_retry_at = time.monotonic() + 60
            self._summary_behind = False  # the next commit says so again
            return
        self._summary_behind = read == limit
        self._unsummarised = max(0, self._unsummarised - read) if self._summary_behind else 0
        took = time.monotonic() - started
        if self._summary_behind:  # a whole step: its time per event says how many fit in the next
            fit = int(SUMMARY_STEP_SECONDS * read / max(took, 1e-9))
            self._summary_rows = max(SUMMARY_MIN_ROWS, min(SUMMARY_STEP_ROWS, fit))
        self._summary_next = time.monotonic() + took * (1 - SUMMARY_SHARE) / SUMMARY_SHARE

    def _prune(self):
        """One small step of deleting events past retention_days, between commits; when to step next.

        Whole days go, those before the midnight retention_days before today's, so that the
        summaries reports read forget whole days too ("Summaries").
        """
        today = datetime.datetime.now(datetime.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        before = (today - datetime.timedelta(days=self.config.retention_days)).strftime(TIME_FORMAT)
        try:
            deleted = self.store.prune(self._connected(), before)
            forgotten = self.store.forget(self._connected(), before) if deleted < PRUNE_STEP_ROWS else 0
        except Exception as error:  # the database's errors, or a lost connection
            self._forget_lost(error)
            log.warning("could not prune old events (%d deleted before that): %s", self._pass_pruned, error)
            self._pass_pruned = 0
            return time.monotonic() + 3600
        self.metrics.pruned(deleted)
        self._pass_pruned += deleted
        if deleted == PRUNE_STEP_ROWS or forgotten == SUMMARY_STEP_ROWS:
            return time.monotonic()  # more to delete: the next step comes between commits
        log.info("retention_days = %d: deleted %d events from before %s", self.config.retention_days,
                 self._pass_pruned, before[:19])
        self._pass_pruned = 0
        return time.monotonic() + 3600

    def _commit(self, group):
        started = time.monotonic()
        rows = list(itertools.chain.from_iterable(rows for rows, _ in group))
        try:
            try:
                inserted = self.store.insert(self._connected(), rows)
            except LostBeforeCommit as lost:  # found dead before anything was committed: once more, afresh
                self._forget_lost(lost)
                self._reconnect_at = 0
                inserted = self.store.insert(self._connected(), rows)
        except Exception as failure:  # the database is full, gone, unreachable or locked for too long
            log.error("could not store %d events: %s", len(rows), failure)
            self._failed(failure)
            return ServiceUnavailable("the database could not store the events; send them again shortly", 5)
        self._succeeded()
        self._committed_at = time.monotonic()
        self._unsummarised += inserted
        self.metrics.commit(time.monotonic() - started, inserted)  # new rows, not retried event_ids
        return None

    def _forget_lost(self, error):
        """Drop a connection that `error` says is gone, so the next commit opens a new one."""
        if self._connection is not None and (isinstance(error, ConnectionError) or self.store.lost(error)):
            self._drop()

    def _drop(self):
        try:
            self._connection.close()
        except Exception:  # closing what is already broken: nothing more to learn
            pass
        self._connection = None


###############################################################################
# The dashboard: /dashboard
###############################################################################

# The range the dashboard and the report show when none is asked for, in days up to today.
DASHBOARD_DAYS = 30
# The longest range one report reads: a year, leap day included. Each report reads every event
# of its range, so a longer one would hold a database connection for minutes.
MAX_REPORT_DAYS = 366
# The days a report may name: stored times start at the Unix epoch, and the last day leaves room
# for the day after `until`, the range's end.
FIRST_REPORT_DAY = datetime.date(1970, 1, 1)
LAST_REPORT_DAY = datetime.date(9999, 12, 30)
# Rows of a ranking before the rest is lumped as "(other)": a million distinct versions must
# not become a million rows of HTML.
REPORT_TOP = 20
# The days after a cohort's first that the API reports, and the columns of the dashboard's triangle.
RETENTION_API_DAYS = (1, 7, 30)
RETENTION_COLUMNS = (1, 2, 3, 4, 5, 6, 7, 14, 30)
# Steps of one funnel at most; each step's times are held per user while it is counted.
MAX_FUNNEL_STEPS = 10
# Characters of one filter at most: more than any stored string may have, so nothing is lost.
MAX_FILTER_CHARACTERS = 1000
# Query fields parsed at most: a report has a dozen; more is not a dashboard talking.
MAX_QUERY_FIELDS = 40
# Bytes of JSON the report cache keeps; the least recently used report goes first.
REPORT_CACHE_BYTES = 4 * 1024 * 1024
# Wrong read keys one client address may present per window before it waits for the next: a
# person mistyping stays below it, a guesser is held to a few guesses a minute.
READ_KEY_FAILURES = 5
READ_KEY_WINDOW = 60
# Session lengths drawn as bars on the dashboard: (upper bound in seconds, label).
SESSION_BUCKETS = ((60, "< 1 min"), (300, "1-5 min"), (900, "5-15 min"), (1800, "15-30 min"),
                   (3600, "30-60 min"), (7200, "1-2 h"), (math.inf, "2 h +"))
# What the SQL of the two backends says differently: byte order for names (PostgreSQL's default
# collation sorts by locale, which would rank ties differently from SQLite), and the type and
# text of one field of `value`.
REPORT_SQL = {
    "SQLite": {"collate": "", "kind": "json_type(value, ?)", "item": "json_extract(value, ?)"},
    "PostgreSQL": {"collate": ' COLLATE "C"', "kind": "jsonb_typeof(value -> %s)", "item": "value ->> %s"},
}
# Kinds of JSON values as either backend names them, and what a breakdown of values makes of them.
VALUE_KINDS = {"integer": "number", "real": "number", "number": "number", "text": "string", "string": "string",
               "true": "boolean", "false": "boolean", "boolean": "boolean"}
# The columns of a report's days, in the order of its JSON and CSV.
DAY_COLUMNS = ("events", "users", "new_users", "sessions")
# The fields a report ranks: its lists are named after them, with an s.
RANKED = ("event_type", "version", "platform")
# The filters of a report: a report with filters is the report of a database that held only the
# events that match them.
REPORT_FILTERS = ("application", "event_type", "version", "platform")

ReportQuery = collections.namedtuple("ReportQuery", ("since", "until") + REPORT_FILTERS)


def presented_read_key(environ):
    """The key a request presents: an HTTP Basic password (any user name) or a Bearer token."""
    scheme, _, credentials = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    if scheme.lower() == "basic":
        import base64  # here: only the dashboard reads credentials
        import binascii

        try:
            return base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


class ReadKeyGuard:
    """Counts wrong read keys per client address, in fixed windows, and holds back a guesser.

    An address that presented READ_KEY_FAILURES wrong keys in a window gets 429 until the window
    ends, whatever key it presents then. The first failure of each address in a window is logged;
    the rest are only counted, so a guesser cannot fill the log.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._failures = {}  # address -> [window number, wrong keys in it]

    def check(self, address, now=None):
        """Raise TooManyRequests if `address` used up its wrong keys in this window."""
        now = time.monotonic() if now is None else now
        window = int(now // READ_KEY_WINDOW)
        with self._lock:
            counted = self._failures.get(address)
            blocked = counted is not None and counted[0] == window and counted[1] >= READ_KEY_FAILURES
        if blocked:
            wait = max(1, math.ceil((window + 1) * READ_KEY_WINDOW - now))
            raise TooManyRequests(f"{READ_KEY_FAILURES} wrong read keys in a minute from this address: "
                                  f"try again in {wait} s", wait)

    def failed(self, address, now=None):
        now = time.monotonic() if now is None else now
        window = int(now // READ_KEY_WINDOW)
        with self._lock:
            counted = self._failures.get(address)
            first = counted is None or counted[0] != window
            if first:
                if counted is None and len(self._failures) >= MAX_TRACKED_CLIENTS:
                    self._forget(window)
                self._failures[address] = [window, 1]
            else:
                counted[1] += 1
        if first:
            log.warning("a wrong read key from %r (more from it this minute are counted, not logged)", address)

    def _forget(self, window):
        for address in [address for address, counted in self._failures.items() if counted[0] != window]:
            del self._failures[address]
        if len(self._failures) >= MAX_TRACKED_CLIENTS:
            self._failures.clear()  # this many guessers at once: start over rather than grow


class ReportCache:
    """Reports as JSON bytes by their query, within a budget of bytes; the least recently used goes first.

    The key holds the store's generation: the lowest and highest event id, and on SQLite how many
    events were ever pruned, so a new event (late ones too) or a pruning step (of events that are
    not the oldest ids too) makes the next request read the database again. On PostgreSQL a prune
    by another process that deletes neither the lowest nor the highest id goes unseen until the
    next event arrives.
    """

    def __init__(self, budget=REPORT_CACHE_BYTES):
        self.budget = budget
        self.used = 0
        self._lock = threading.Lock()
        self._entries = collections.OrderedDict()  # key -> JSON bytes

    def get(self, key):
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
        return found

    def put(self, key, data):
        size = len(data) + len(repr(key))
        if size > self.budget:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.used -= len(old) + len(repr(key))
            self._entries[key] = data
            self.used += size
            while self.used > self.budget:
                oldest, dropped = self._entries.popitem(last=False)
                self.used -= len(dropped) + len(repr(oldest))

    def __len__(self):
        return len(self._entries)


def _query_fields(query):
    """{name: last value} and {name: every value} of a query string; 400 for one no dashboard sends."""
    from urllib.parse import parse_qs  # here: only the dashboard reads a query string

    try:
        every = parse_qs(query, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise BadRequest(f"a report takes at most {MAX_QUERY_FIELDS} query fields") from None
    for name, values in every.items():
        for value in values:
            if len(value) > MAX_FILTER_CHARACTERS or "\x00" in value:
                raise BadRequest(f"{name[:40]!r} must be at most {MAX_FILTER_CHARACTERS} characters, without NUL")
    return {name: values[-1] for name, values in every.items()}, every


def _report_day(fields, name, default):
    text = fields.get(name)
    if not text:
        return default
    try:
        day = datetime.date.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"{name} must be a date like 2024-05-01, not {text[:40]!r}") from None
    if not FIRST_REPORT_DAY <= day <= LAST_REPORT_DAY:
        raise BadRequest(f"{name} must be a day from {FIRST_REPORT_DAY} to {LAST_REPORT_DAY}")
    return day


def report_query(fields, today):
    """The ReportQuery of the fields of a query string; BadRequest names what is wrong."""
    until = _report_day(fields, "until", min(today, LAST_REPORT_DAY))
    default_since = max(FIRST_REPORT_DAY, until - datetime.timedelta(days=DASHBOARD_DAYS - 1))
    since = _report_day(fields, "since", default_since)
    if since > until:
        raise BadRequest(f"since ({since}) must not be after until ({until})")
    if (until - since).days + 1 > MAX_REPORT_DAYS:
        raise BadRequest(f"a report covers at most {MAX_REPORT_DAYS} days; since {since} to until {until} "
                         f"is {(until - since).days + 1}")
    return ReportQuery(since, until, *(fields.get(name) or None for name in REPORT_FILTERS))


def _answer_format(fields, offered):
    chosen = fields.get("format") or "json"
    if chosen not in offered:
        raise BadRequest(f"format must be {' or '.join(offered)}, not {chosen[:40]!r}")
    return chosen


def _funnel_steps(fields, every):
    """The steps of a funnel: `steps=a,b,c`, or the dashboard's `step` fields when that is empty."""
    steps = [step.strip() for step in (fields.get("steps") or "").split(",") if step.strip()]
    steps = steps or [step for step in every.get("step", ()) if step]
    if not steps:
        raise BadRequest("a funnel needs steps: event types separated by commas, like steps=tutorial_start,tutorial_end")
    if len(steps) > MAX_FUNNEL_STEPS:
        raise BadRequest(f"a funnel has at most {MAX_FUNNEL_STEPS} steps, not {len(steps)}")
    return tuple(steps)


def _value_field(fields):
    field = fields.get("field")
    if not field or any(character in field for character in '"\\') or not field.isprintable():
        raise BadRequest("field must name a key of the events' value, like field=level (no quotes or backslashes)")
    return field


def _percentile(ordered, share):
    """The nearest-rank percentile of a sorted list of (value, how many times) pairs."""
    rank, seen = math.ceil(share * sum(times for _, times in ordered)), 0
    for value, times in ordered:
        seen += times
        if seen >= max(1, rank):
            return value
    return None


def _top(counts, total_events, other_users=None):
    """The REPORT_TOP largest of (name, events, users) rows sorted by events, then "(other)" for the rest."""
    rows = [{"name": name, "events": events, "users": users} for name, events, users in counts[:REPORT_TOP]]
    if len(counts) > REPORT_TOP:
        rest = {"name": "(other)", "events": total_events - sum(row["events"] for row in rows)}
        if other_users is not None:
            rest["users"] = other_users
        rows.append(rest)
    return rows


class _ReportReader:
    """The SQL of one report: its range and filters as a WHERE clause, on one connection.

    With `after_id`, only the events after that id: the ones not summarised yet (_SummaryReader).
    """

    def __init__(self, store, connection, query, after_id=None):
        self.store, self.connection, self.query = store, connection, query
        self.sql = REPORT_SQL[store.kind]
        self.end = (query.until + datetime.timedelta(days=1)).isoformat()
        self.filters, self.filter_values = "", []
        if after_id is not None:
            self.filters, self.filter_values = f" AND id > {store.parameter}", [after_id]
        for name in REPORT_FILTERS:
            if getattr(query, name) is not None:
                self.filters += f" AND {name} = {store.parameter}"
                self.filter_values.append(getattr(query, name))
        # the events after an id are found by id, not through the time index, which holds the range's every event
        moment = "time" if after_id is None else store.scan_time
        self.where = f"WHERE {moment} >= {store.since} AND {moment} < {store.since}{self.filters}"
        self.arguments = [query.since.isoformat(), self.end] + self.filter_values

    def rows(self, sql, before=(), after=()):
        return self.connection.execute(sql, list(before) + self.arguments + list(after))

    def activity(self):
        """(day, application, user_id, session_id, events, first time, last time) of the range."""
        day, moment = self.store.day, self.store.time_text
        return self.rows(f"SELECT {day}, application, user_id, session_id, count(*), min({moment}), max({moment})"
                         f" FROM event {self.where} GROUP BY 1, 2, 3, 4")

    def seen_before(self):
        """The (application, user_id) pairs with an event before the range: its users who are not new.

        A user's first event ever is in the range exactly when none is before it, so this scan of
        the days before the range (no aggregate, only the pairs) is all that new users cost.
        """
        return self.connection.execute(
            f"SELECT DISTINCT application, user_id FROM event WHERE time < {self.store.since}{self.filters}",
            [self.query.since.isoformat()] + self.filter_values)

    def daily(self, dates):
        """Per-day columns (events, users, sessions), the range's users, and its sessions' lengths in
        microseconds, sorted."""
        columns, self.active, sessions = _daily_activity(self, {day: n for n, day in enumerate(dates)})
        return columns, len(self.active), sorted(_microseconds(last) - _microseconds(first)
                                                 for _, first, last in sessions.values())

    def newcomers(self):
        """{user: the day of the range they first came} for the users with no event before it, and
        {user: the days of the range they came} for them (after daily)."""
        returning = {tuple(user) for user in self.seen_before()}
        return {user: min(days) for user, days in self.active.items() if user not in returning}, self.active

    def rankings(self):
        """{field: its ranking} for event_type, version and platform, from one pass over the range."""
        events = {field: collections.Counter() for field in RANKED}
        users = {field: collections.defaultdict(set) for field in RANKED}
        for event_type, version, platform, application, user_id, count in self.rows(
            f"SELECT event_type, version, platform, application, user_id, count(*) FROM event {self.where}"
            " GROUP BY 1, 2, 3, 4, 5"
        ):
            for field, name in zip(RANKED, (event_type, version, platform)):
                events[field][name] += count
                users[field][name].add((application, user_id))
        rankings = {}
        for field in RANKED:
            ordered = sorted(events[field], key=lambda name: (-events[field][name], name.encode()))
            rest = set().union(*(users[field][name] for name in ordered[REPORT_TOP:]))
            rankings[field] = _top([(name, events[field][name], len(users[field][name])) for name in ordered],
                                   sum(events[field].values()), len(rest))
        return rankings

    def applications(self):
        """The names of the busiest applications of the range, for the dashboard's choice."""
        return [name for name, _ in self.connection.execute(
            f"SELECT application, count(*) FROM event WHERE time >= {self.store.since} AND time < {self.store.since}"
            f" GROUP BY 1 ORDER BY 2 DESC, application{self.sql['collate']} LIMIT {REPORT_TOP}", self.arguments[:2])]

    def funnel(self, steps):
        """How many users did steps[0], then steps[1] at or after that, and so on."""
        kinds = sorted(set(steps))
        marks = ", ".join([self.store.parameter] * len(kinds))
        times = collections.defaultdict(lambda: collections.defaultdict(list))
        for application, user_id, event_type, moment in self.rows(
            f"SELECT application, user_id, event_type, {self.store.time_text} FROM event {self.where}"
            f" AND event_type IN ({marks})", after=kinds
        ):
            times[application, user_id][event_type].append(moment)
        reached = [0] * len(steps)
        for per_type in times.values():
            moment = ""  # every stored time is at or after ""
            for n, step in enumerate(steps):
                moment = min((found for found in per_type.get(step, ()) if found >= moment), default=None)
                if moment is None:
                    break
                reached[n] += 1
        return [{"name": step, "users": users} for step, users in zip(steps, reached)]

    def values(self, field):
        """{kind: Counter of value -> events} of `field` in the events' value."""
        path = field if self.store.kind == "PostgreSQL" else f'$."{field}"'
        found = collections.defaultdict(collections.Counter)
        for kind, item, events in self.rows(f"SELECT {self.sql['kind']}, {self.sql['item']}, count(*) FROM event"
                                            f" {self.where} GROUP BY 1, 2", before=[path, path]):
            kind = VALUE_KINDS.get(kind, "missing")
            if kind == "number" and isinstance(item, str):
                item = float(item) if any(mark in item for mark in ".eE") else int(item)
            elif kind == "boolean":
                kind, item = "string", "true" if item in (1, "true", True) else "false"
            elif kind == "missing":
                item = None
            found[kind][item] += events
        return found


class _ReadLive(Exception):
    """The summaries cannot answer a report (it asks about days their bits no longer keep)."""


def _summary_reader(store, connection, query):
    """A _SummaryReader for `query`, or None when the report must read the events themselves."""
    if not store.summaries or any(getattr(query, name) is not None for name in RANKED):
        return None  # summaries are kept per application, not per event type, version or platform
    try:
        connection.execute("BEGIN")  # one snapshot of the summaries and of the events after them
        last_id, last_time = _summarised(connection)
        tail = connection.execute("SELECT count(*) FROM (SELECT 1 FROM event WHERE id > ? LIMIT ?)",
                                  (last_id, MAX_LIVE_TAIL + 1)).fetchone()[0]
        if tail > MAX_LIVE_TAIL or not _summaries_hold(connection, last_id, last_time):
            return None  # the summaries are being built, or will be built again
    except sqlite3.OperationalError:  # no summaries: a database no collector of this version has opened
        return None
    return _SummaryReader(store, connection, query, last_id)


def _present(first_day, last_day, days, since, until):
    """Whether a presence row has a day from `since` to `until` (day numbers)."""
    first, last = _day_number(first_day), _day_number(last_day)
    if last < since or first > until:
        return False
    if first >= since or last <= until:
        return True  # its first or its last day is in the range
    if last - since >= PRESENCE_DAYS:
        raise _ReadLive
    return int.from_bytes(days, "little") >> (last - until) & ((1 << (until - since + 1)) - 1) != 0


class _SummaryReader:
    """The figures of a report from the summaries ("Summaries"), and from the events after them.

    It answers what _ReportReader answers, for a report without filters but `application`.
    """

    def __init__(self, store, connection, query, last_id):
        self.connection, self.query, self.last_id = connection, query, last_id
        self.live = _ReportReader(store, connection, query, after_id=last_id)
        self._counts = None
        self.since, self.until = query.since.toordinal(), query.until.toordinal()
        self.days = [query.since.isoformat(), query.until.isoformat()]
        self.application, self.application_value = "", []
        if query.application is not None:
            self.application, self.application_value = " AND application = ?", [query.application]

    def rows(self, sql, arguments, group=""):
        """The rows of `sql` WHERE ..., with the application's condition and then `group` added."""
        return self.connection.execute(sql + self.application + group, list(arguments) + self.application_value)

    def daily(self, dates):
        """As _ReportReader.daily: the days' figures as summarised, the events after them added."""
        position = {day: n for n, day in enumerate(dates)}
        columns = {name: [0] * len(dates) for name in ("events", "users", "sessions")}
        for day, *figures in self.rows("SELECT day, sum(events), sum(users), sum(sessions) FROM pycolytics_days"
                                       " WHERE day >= ? AND day <= ?", self.days, " GROUP BY day"):
            if day in position:
                for name, figure in zip(columns, figures):
                    columns[name][position[day]] = figure
        live = [row for row in self.live.activity() if row[0] in position]
        seen = set()
        for day, application, user_id, session_id, events, _, _ in live:
            n = position[day]
            columns["events"][n] += events
            if (day, application, user_id) not in seen and not _had_user(
                    self.connection, self._stored("user", "", (application, user_id)), application, user_id,
                    _day_number(day)):
                columns["users"][n] += 1
            if (day, application, None, session_id) not in seen and not _had_session(
                    self.connection, application, session_id, day):
                columns["sessions"][n] += 1
            seen |= {(day, application, user_id), (day, application, None, session_id)}
        return columns, self._users(live), self._lengths(live)

    def _present(self):
        """{field: {name: presence rows with a day in the range}} ("user" and the ranked fields), once.

        The rows that end in the range or after it, less those that begin after it, are the rows
        that overlap it (pycolytics_spans has both as counts per day); of these, a row that began
        before the range and ends after it may have no day in it: its bits tell. Such rows exist
        only when the summaries have days after the range.
        """
        if self._counts is None:
            self._counts = {field: collections.Counter() for field in PRESENCE_FIELDS}
            for field, name, rows in self.rows(
                    "SELECT field, name, sum(CASE WHEN day >= ? THEN lasts ELSE 0 END)"
                    " - sum(CASE WHEN day > ? THEN firsts ELSE 0 END) FROM pycolytics_spans WHERE 1 = 1", self.days,
                    " GROUP BY field, name"):
                self._counts[field][name] += rows
            if self.connection.execute("SELECT 1 FROM pycolytics_days WHERE day > ? LIMIT 1", self.days[1:]).fetchone():
                for field, name, first_day, last_day, days in self.rows(
                        "SELECT field, name, first_day, last_day, days FROM pycolytics_presence"
                        " WHERE first_day < ? AND last_day > ?", self.days):
                    self._counts[field][name] -= not _present(first_day, last_day, days, self.since, self.until)
        return self._counts

    def _users(self, live):
        """The range's users: those the presence rows put in it, and those of the events after them."""
        users = self._present()["user"][""]
        for user in {(application, user_id) for _, application, user_id, *_ in live}:
            stored = self._stored("user", "", user)
            users += not (stored and _present(*stored, self.since, self.until))
        return users

    def _lengths(self, live):
        """The range's sessions' lengths in microseconds, sorted: from the summaries, with the events after them."""
        lengths = [length for length, in self.rows(
            "SELECT max(last_us) - min(first_us) FROM pycolytics_sessions WHERE day >= ? AND day <= ?", self.days,
            " GROUP BY application, session_id")]
        spans = {}  # (application, session_id) -> [first, last] microseconds of the events after the summarised
        for _, application, _, session_id, _, first, last in live:
            span = spans.setdefault((application, session_id), [_microseconds(first), _microseconds(last)])
            span[0], span[1] = min(span[0], _microseconds(first)), max(span[1], _microseconds(last))
        replaced = collections.Counter()
        for (application, session_id), span in spans.items():
            first, last = self.connection.execute(
                "SELECT min(first_us), max(last_us) FROM pycolytics_sessions WHERE application = ? AND session_id = ?"
                " AND day >= ? AND day <= ?", [application, session_id] + self.days).fetchone()
            if first is not None:
                replaced[last - first] += 1
                span[0], span[1] = min(span[0], first), max(span[1], last)
            lengths.append(span[1] - span[0])
        if replaced:
            kept = []
            for length in lengths[:len(lengths) - len(spans)]:
                if replaced[length]:
                    replaced[length] -= 1
                else:
                    kept.append(length)
            lengths = kept + lengths[len(lengths) - len(spans):]
        lengths.sort()
        return lengths

    def _stored(self, field, name, user):
        """(first day, last day, days) of a presence row, or None."""
        return self.connection.execute(
            "SELECT first_day, last_day, days FROM pycolytics_presence WHERE field = ? AND name = ?"
            " AND application = ? AND user_id = ?", (field, name) + tuple(user)).fetchone()

    def newcomers(self):
        """As _ReportReader.newcomers, with each newcomer's days those that retention asks about."""
        stored = {(application, user_id): row for application, user_id, *row in self.rows(
            "SELECT application, user_id, first_day, last_day, days FROM pycolytics_presence WHERE field = 'user'"
            " AND first_day >= ? AND first_day <= ?", self.days)}
        first = {user: row[0] for user, row in stored.items()}
        for application, user_id, day in self.rows(
                "SELECT application, user_id, min(substr(time, 1, 10)) FROM event WHERE id > ?", [self.last_id],
                " GROUP BY 1, 2").fetchall():
            user = (application, user_id)
            if user not in stored:
                stored[user] = self._stored("user", "", user)
            first[user] = min(day, stored[user][0]) if stored[user] else day
        newcomers = {user: _day_number(day) - self.since for user, day in first.items()
                     if _day_number(day) is not None and self.since <= _day_number(day) <= self.until}
        active = {user: {n} for user, n in newcomers.items()}
        for user, n in newcomers.items():  # the days retention asks about, from the summaries' bits
            if stored[user]:
                first_day, last_day, days = stored[user]
                last, bits = _day_number(last_day), int.from_bytes(days, "little")
                for later in (n + after for after in RETENTION_COLUMNS if self.since + n + after <= last):
                    if last - self.since - later >= PRESENCE_DAYS:
                        raise _ReadLive
                    if bits >> (last - self.since - later) & 1:
                        active[user].add(later)
        for day, application, user_id, *_ in self.live.activity():  # ...and from the events after them
            if (application, user_id) in active and _day_number(day) is not None:
                active[application, user_id].add(_day_number(day) - self.since)
        return newcomers, active

    def rankings(self):
        """{field: its ranking}, as _ReportReader.rankings."""
        events = {field: collections.Counter() for field in RANKED}
        users = {field: collections.Counter() for field in RANKED}
        for field, name, count in self.rows("SELECT field, name, sum(events) FROM pycolytics_name_events"
                                            " WHERE day >= ? AND day <= ?", self.days, " GROUP BY 1, 2"):
            events[field][name] += count
        for field in RANKED:
            users[field].update(self._present()[field])
        live = self._live_pairs(events)
        for field, name, user in live:
            stored = self._stored(field, name, user)
            users[field][name] += not (stored and _present(*stored, self.since, self.until))
        rankings = {}
        for field in RANKED:
            ordered = sorted(events[field], key=lambda name: (-events[field][name], name.encode()))
            rest = self._users_of(field, set(ordered[REPORT_TOP:]), live) if ordered[REPORT_TOP:] else ()
            rankings[field] = _top([(name, events[field][name], users[field][name]) for name in ordered],
                                   sum(events[field].values()), len(rest))
        return rankings

    def _live_pairs(self, events):
        """(field, name, user) of the events after the summarised ones, in the range; counts them in `events`."""
        pairs = set()
        for event_type, version, platform, application, user_id, count in self.live.rows(
                f"SELECT event_type, version, platform, application, user_id, count(*) FROM event"
                f" {self.live.where} GROUP BY 1, 2, 3, 4, 5"):
            for field, name in zip(RANKED, (event_type, version, platform)):
                events[field][name] += count
                pairs.add((field, name, (application, user_id)))
        return pairs

    def _users_of(self, field, names, live):
        """The users with events of any of `names` (of `field`) in the range: for "(other)"; `live` is
        _live_pairs' answer."""
        found = {(application, user_id) for name, application, user_id, first_day, last_day, days in self.rows(
            "SELECT name, application, user_id, first_day, last_day, days FROM pycolytics_presence"
            " WHERE field = ? AND last_day >= ? AND first_day <= ?", [field] + self.days)
            if name in names and _present(first_day, last_day, days, self.since, self.until)}
        return found | {user for kind, name, user in live if kind == field and name in names}

    def applications(self):
        """The names of the busiest applications of the range, as _ReportReader.applications."""
        events = collections.Counter()
        for application, count in self.connection.execute(  # every event has one platform
                "SELECT application, sum(events) FROM pycolytics_name_events WHERE day >= ? AND day <= ?"
                " AND field = 'platform' GROUP BY 1", self.days):
            events[application] += count
        for application, count in self.connection.execute(
                "SELECT application, count(*) FROM event WHERE +time >= ? AND +time < ? AND id > ? GROUP BY 1",
                self.live.arguments[:2] + [self.last_id]):
            events[application] += count
        return sorted(events, key=lambda name: (-events[name], name.encode()))[:REPORT_TOP]


def _seconds(microseconds):
    """A session's length as the report gives it: seconds, to the millisecond."""
    return round(microseconds / 1_000_000, 3)


def _shorter_than(lengths, seconds):
    """How many of the sorted `lengths` (microseconds) are under `seconds` once given as _seconds."""
    count = bisect.bisect_left(lengths, seconds * 1_000_000 - 600)  # rounding moves a length by 500 at most
    while count < len(lengths) and _seconds(lengths[count]) < seconds:
        count += 1
    return count


def _daily_activity(reader, position):
    """Per-day columns, each user's days with events and each session's [days, first, last] time."""
    columns = {name: [0] * len(position) for name in ("events", "users", "sessions")}
    active = collections.defaultdict(set)  # (application, user_id) -> positions of the days with events
    sessions = {}  # (application, session_id) -> [positions of its days, first time, last time]
    for day, application, user_id, session_id, events, first, last in reader.activity():
        n = position.get(day)
        if n is None:
            continue  # a time that is not a day's (a hand-made row): in the range as text only
        columns["events"][n] += events
        days = active[application, user_id]
        if n not in days:
            days.add(n)
            columns["users"][n] += 1
        session = sessions.setdefault((application, session_id), [set(), first, last])
        if n not in session[0]:
            session[0].add(n)
            columns["sessions"][n] += 1
        session[1], session[2] = min(session[1], first), max(session[2], last)
    return columns, active, sessions


def _retention(cohorts, active, observed):
    """[position, users, [share back on each of RETENTION_COLUMNS' days after, or None]] per cohort."""
    triangle = []
    for n in sorted(cohorts):
        cohort = cohorts[n]
        triangle.append([n, len(cohort), [
            None if n + after > observed else round(sum(n + after in active[user] for user in cohort) / len(cohort), 4)
            for after in RETENTION_COLUMNS]])
    return triangle


def _session_figures(lengths, users):
    """Count, nearest-rank median and 90th percentile of the sorted `lengths`, and sessions per user."""
    def rank(share):
        return (_seconds(lengths[max(1, math.ceil(share * len(lengths))) - 1]) if lengths else 0) or 0  # 0, not 0.0

    return {"count": len(lengths), "median_seconds": rank(0.5), "p90_seconds": rank(0.9),
            "per_user": round(len(lengths) / users, 2) if users else 0}


def build_report(store, connection, query, today):
    """The report of `query` (see README.md, "The report API"), and the extra figures the dashboard draws."""
    reader = _summary_reader(store, connection, query) or _ReportReader(store, connection, query)
    try:
        return _report(reader, query, today)
    except _ReadLive:
        return _report(_ReportReader(store, connection, query), query, today)


def _report(reader, query, today):
    dates = [(query.since + datetime.timedelta(days=n)).isoformat() for n in range((query.until - query.since).days + 1)]
    columns, users, lengths = reader.daily(dates)
    columns["new_users"] = [0] * len(dates)
    cohorts = collections.defaultdict(list)
    newcomers, active = reader.newcomers()
    for user, first in newcomers.items():
        columns["new_users"][first] += 1
        cohorts[first].append(user)
    triangle = _retention(cohorts, active, (min(query.until, today) - query.since).days)
    report = {
        "since": query.since.isoformat(), "until": query.until.isoformat(), "application": query.application,
        "totals": {"events": sum(columns["events"]), "users": users, "new_users": sum(columns["new_users"]),
                   "sessions": len(lengths)},
        "days": [dict(date=day, **{name: columns[name][n] for name in DAY_COLUMNS}) for n, day in enumerate(dates)],
        "retention": [dict({"cohort": dates[n], "users": users}, **{
            f"day_{after}": shares[RETENTION_COLUMNS.index(after)] for after in RETENTION_API_DAYS})
            for n, users, shares in triangle],
        "sessions": _session_figures(lengths, users),
        **{f"{field}s": ranking for field, ranking in reader.rankings().items()},
    }
    shorter = [0] + [_shorter_than(lengths, bound) for bound, _ in SESSION_BUCKETS]
    histogram = [shorter[n + 1] - shorter[n] for n in range(len(SESSION_BUCKETS))]
    return report, {"triangle": triangle, "session_lengths": histogram, "applications": reader.applications()}


def build_funnel(store, connection, query, steps):
    return {"since": query.since.isoformat(), "until": query.until.isoformat(), "application": query.application,
            "steps": _ReportReader(store, connection, query).funnel(steps)}


def build_values(store, connection, query, field):
    found = _ReportReader(store, connection, query).values(field)
    numbers = None
    if found["number"]:
        ordered = sorted(found["number"].items())
        numbers = {"count": sum(found["number"].values()), "min": ordered[0][0], "p50": _percentile(ordered, 0.5),
                   "p90": _percentile(ordered, 0.9), "max": ordered[-1][0],
                   "sum": sum(value * times for value, times in ordered)}
    strings = sorted(found["string"].items(), key=lambda item: (-item[1], item[0]))
    total = sum(sum(counter.values()) for counter in found.values())
    return {"since": query.since.isoformat(), "until": query.until.isoformat(), "application": query.application,
            "event_type": query.event_type, "field": field, "events": total,
            "missing": sum(found["missing"].values()), "numbers": numbers,
            "strings": [{"value": row["name"], "events": row["events"]} for row in _top(
                [(value, events, None) for value, events in strings], sum(found["string"].values()))]}


def _csv(header, rows):
    lines = [",".join(header)]
    for row in rows:
        lines.append(",".join(_csv_cell(row[name]) for name in header))
    return ("\r\n".join(lines) + "\r\n").encode()


def _csv_cell(value):
    """One CSV cell; text that a spreadsheet would run as a formula starts with a quote (OWASP's advice)."""
    text = "" if value is None else str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        text = "'" + text
    if any(mark in text for mark in ',"\r\n'):
        text = '"' + text.replace('"', '""') + '"'
    return text


class Dashboard:
    """The report API (/v1.0/report...) and the dashboard page drawn from it: SVG, no scripts, fonts or CDNs.

    Reading needs one of `read_keys`; the write keys that ship inside games never open it.
    """

    def __init__(self, config, store):
        self.store = store
        self._read_keys = [key.encode("utf-8") for key in config.read_keys]
        self._trusted_proxies = config.trusted_proxies
        self._guard = ReadKeyGuard()
        self.cache = ReportCache()

    def authorize(self, environ):
        if not self._read_keys:
            raise Forbidden("the dashboard is off: set read_keys in the configuration to open it")
        address = client_address(environ.get("REMOTE_ADDR"), environ.get("HTTP_X_FORWARDED_FOR"), self._trusted_proxies)
        key = presented_read_key(environ)
        if key:  # a request without a key is asked for one (401), throttled or not: it guesses nothing
            self._guard.check(address)
        matched = False
        try:
            candidate = (key or "").encode("utf-8")
        except UnicodeEncodeError:
            candidate = b""
        for known in self._read_keys:
            matched |= compare_digest(known, candidate)
        if not key or not matched:
            if key:  # a browser's first request carries no key: that is not a guess
                self._guard.failed(address)
            raise Unauthorized("the dashboard needs a read key: as the password of HTTP Basic, or a Bearer token",
                               [("WWW-Authenticate", 'Basic realm="pycolytics dashboard", charset="UTF-8"')])

    def answer(self, environ):
        """(status, headers, body) for /v1.0/report, /v1.0/report/funnel and /v1.0/report/values."""
        self.authorize(environ)
        fields, every = _query_fields(environ.get("QUERY_STRING", ""))
        query = report_query(fields, _today())
        kind = (environ.get("PATH_INFO") or "").rpartition("/")[2]
        if kind == "funnel":
            chosen = _answer_format(fields, ("json", "csv"))
            document = self.figures("funnel", query, _funnel_steps(fields, every))
            rows = (document["steps"], ("name", "users"))
        elif kind == "values":
            chosen = _answer_format(fields, ("json",))
            if not query.event_type:
                raise BadRequest("values needs event_type: the type of the events whose value to break down")
            document = self.figures("values", query, _value_field(fields))
        else:
            chosen = _answer_format(fields, ("json", "csv"))
            document = self.figures("report", query)[0]
            rows = (document["days"], ("date", "events", "users", "new_users", "sessions"))
        if chosen == "csv":
            name = f"pycolytics-{kind}-{query.since}-{query.until}.csv"
            return _ok(_csv(rows[1], rows[0]), ("Content-Type", "text/csv; charset=utf-8"),
                       ("Content-Disposition", f'attachment; filename="{name}"'), ("Cache-Control", "no-store"))
        return _ok(json.dumps(document).encode(), ("Content-Type", "application/json"), ("Cache-Control", "no-store"))

    def page(self, environ):
        started = time.monotonic()
        fields, every = _query_fields(environ.get("QUERY_STRING", ""))
        query = report_query(fields, _today())
        report, extras = self.figures("report", query)
        funnel = values = None
        if fields.get("steps") or any(every.get("step", ())):
            funnel = self.figures("funnel", query, _funnel_steps(fields, every))
        if fields.get("of") and fields.get("field"):
            values = self.figures("values", query._replace(event_type=fields["of"]), _value_field(fields))
        parts = {"report": report, "extras": extras, "funnel": funnel, "values": values, "fields": fields,
                 "query": query}
        return _dashboard_html(parts, time.monotonic() - started).encode()

    def figures(self, kind, query, *arguments):
        """build_report, build_funnel or build_values, from the cache while the database has not changed."""
        try:
            connection = self.store.read()
            try:
                key = (kind, query, arguments or (_today(),), self.store.generation(connection))
                kept = self.cache.get(key)
                if kept is None:
                    build = {"report": build_report, "funnel": build_funnel, "values": build_values}[kind]
                    kept = json.dumps(build(self.store, connection, query, *key[2])).encode()
                    self.cache.put(key, kept)
            finally:
                connection.close()
        except self.store.errors as error:
            raise ServiceUnavailable(f"the database could not be read: {error}", 5) from None
        return json.loads(kept)  # the same lists and dicts whether kept or just built


def _today():
    return datetime.datetime.now(datetime.timezone.utc).date()


def _escape(text):
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _link(path, fields):
    """A URL relative to the page, so the dashboard works under any path prefix."""
    from urllib.parse import urlencode  # here: only the dashboard writes links

    chosen = {name: value for name, value in fields.items() if value}
    return _escape(path + ("?" + urlencode(chosen) if chosen else ""))


def _day_ticks(days, left, step, y):
    """Date labels under a chart, about eight of them whatever the range."""
    every = max(1, math.ceil(len(days) / 8))
    return "".join(f'<text x="{left + n * step + step / 2:.1f}" y="{y}" text-anchor="middle">{day[5:]}</text>'
                   for n, day in enumerate(days) if n % every == 0)


def _frame(top, width, height, left, bottom, label, inside):
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{_escape(label)}">'
            f'<line x1="{left}" y1="{height - bottom}" x2="{width}" y2="{height - bottom}" class="axis"/>'
            f'<text x="{left - 6}" y="16" text-anchor="end">{top:,}</text>'
            f'<text x="{left - 6}" y="{height - bottom}" text-anchor="end">0</text>{inside}</svg>')


def _columns_svg(days, series, label):
    """Stacked bars per day: series is [(name, values)], drawn bottom up in the classes bar0, bar1."""
    width, height, left, bottom = 760, 200, 56, 24
    top = max((sum(values[n] for _, values in series) for n in range(len(days))), default=0) or 1
    step = (width - left) / max(1, len(days))
    bars = []
    for n, day in enumerate(days):
        base = height - bottom
        for index, (name, values) in enumerate(series):
            tall = (height - bottom - 10) * values[n] / top
            if values[n]:
                bars.append(f'<rect class="bar bar{index}" x="{left + n * step + step * 0.1:.1f}" y="{base - tall:.1f}" '
                            f'width="{step * 0.8:.1f}" height="{tall:.1f}"><title>{day}: {values[n]:,} '
                            f'{_escape(name)}</title></rect>')
            base -= tall
    return _frame(top, width, height, left, bottom, label, "".join(bars) + _day_ticks(days, left, step, height - 6))


def _lines_svg(days, series, label):
    """A line per series over the days: series is [(name, values)], in the classes line0, line1."""
    width, height, left, bottom = 760, 200, 56, 24
    top = max((value for _, values in series for value in values), default=0) or 1
    step = (width - left) / max(1, len(days))
    lines = []
    for index, (name, values) in enumerate(series):
        points = " ".join(f"{left + n * step + step / 2:.1f},{height - bottom - (height - bottom - 10) * value / top:.1f}"
                          for n, value in enumerate(values))
        lines.append(f'<polyline class="line line{index}" points="{points}"><title>{_escape(name)}</title></polyline>')
    return _frame(top, width, height, left, bottom, label, "".join(lines) + _day_ticks(days, left, step, height - 6))


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
        bars.append(
            f'<rect class="bar" x="{names}" y="{y + 4}" width="{long:.1f}" height="{row - 8}">'
            f'<title>{_escape(name)}: {value:,}{note}</title></rect>'
            f'<text x="{names - 6}" y="{y + 18}" text-anchor="end">{_escape(shown or "(empty)")}</text>'
            f'<text x="{names + long + 6:.1f}" y="{y + 18}">{value:,}{note}</text>'
        )
    return (f'<svg class="chart ranking" viewBox="0 0 {width} {row * len(items)}" role="img" '
            f'aria-label="{_escape(label)}">{"".join(bars)}</svg>')


def _retention_table(triangle, since):
    """Cohorts by first day, the share of each back on the days after: a triangle, shaded by share."""
    if not triangle:
        return '<p class="empty">No new users in this range.</p>'
    head = "".join(f"<th>day {after}</th>" for after in RETENTION_COLUMNS)
    rows = []
    for n, users, shares in triangle:
        cells = "".join('<td class="future"></td>' if share is None else
                        f'<td style="background:rgba(61,123,224,{0.08 + 0.92 * share:.2f})'
                        f'{";color:#fff" if share > 0.5 else ""}">{100 * share:.0f}%</td>' for share in shares)
        day = (since + datetime.timedelta(days=n)).isoformat()
        rows.append(f"<tr><th>{day}</th><td>{users:,}</td>{cells}</tr>")
    return (f'<div class="scroll"><table class="retention"><tr><th>first day</th><th>new users</th>{head}</tr>'
            f'{"".join(rows)}</table></div>')


def _options(names, chosen):
    return "".join(f'<option value="{_escape(name)}"{" selected" if name == chosen else ""}>{_escape(name)}</option>'
                   for name in names)


def _seconds_text(seconds):
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _funnel_section(parts, hidden, types):
    fields, funnel = parts["fields"], parts["funnel"]
    typed = fields.get("steps", "")
    picks = "".join(f'<select name="step"><option value="">step {n + 1}</option>{_options(types, None)}</select>'
                    for n in range(4))
    form = (f'<form method="get" action="dashboard">{hidden}<label>Steps <input name="steps" size="40" '
            f'value="{_escape(typed)}" placeholder="tutorial_start,tutorial_step,tutorial_end"></label> or {picks}'
            f'<button type="submit">Count</button></form>')
    if funnel is None:
        return form + '<p class="empty">Type event types separated by commas, or pick them.</p>'
    items = [(step["name"], step["users"]) for step in funnel["steps"]]
    return form + _ranking_svg(items, "funnel", shares=True)


def _values_section(parts, hidden, types):
    fields, values = parts["fields"], parts["values"]
    form = (f'<form method="get" action="dashboard">{hidden}<label>Event type <select name="of">'
            f'{_options(types, fields.get("of"))}</select></label> <label>value field <input name="field" '
            f'value="{_escape(fields.get("field", ""))}" placeholder="level"></label><button type="submit">Break down</button>'
            f'</form>')
    if values is None:
        return form + '<p class="empty">What level do players die on? Pick the event type and its value\'s field.</p>'
    shown = []
    if values["numbers"]:
        numbers = values["numbers"]
        shown.append('<table class="numbers"><tr>' + "".join(f"<th>{name}</th>" for name in numbers) + "</tr><tr>"
                     + "".join(f"<td>{value:,}</td>" for value in numbers.values()) + "</tr></table>")
    if values["strings"]:
        shown.append(_ranking_svg([(row["value"], row["events"]) for row in values["strings"]], "values"))
    shown.append(f'<p class="empty">{values["events"]:,} events of {_escape(values["event_type"])}; '
                 f'{values["missing"]:,} without a number or text in {_escape(values["field"])}.</p>')
    return form + "".join(shown)


# The dashboard's style sheet: one page, no files to serve, no scripts.
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
.bar,.bar0{fill:#3d7be0} .bar1{fill:#e0793d} .axis{stroke:#c5cad3} .line{fill:none;stroke-width:2.5}
.line0{stroke:#3d7be0} .line1{stroke:#e0793d} .legend{margin:0 0 4px;font-size:14px}
.key0{color:#3d7be0} .key1{color:#e0793d;margin-left:12px} .empty{color:#5b6477}
.scroll{overflow-x:auto} table{border-collapse:collapse} td,th{padding:3px 8px;text-align:right;font-size:14px}
.retention td.future{background:#fafafa} .numbers td,.numbers th{border-bottom:1px solid #e3e6eb}
header a{color:#cfe0ff} footer{color:#5b6477;font-size:13px;padding:0 24px 24px;text-align:center}
"""


def _dashboard_html(parts, seconds):
    report, extras, fields, query = parts["report"], parts["extras"], parts["fields"], parts["query"]
    totals, days = report["totals"], report["days"]
    dates = [day["date"] for day in days]
    column = {name: [day[name] for day in days] for name in ("events", "users", "new_users", "sessions")}
    filters = {name: fields.get(name, "") for name in REPORT_FILTERS}
    chosen = dict(filters, since=query.since.isoformat(), until=query.until.isoformat())
    hidden = "".join(f'<input type="hidden" name="{name}" value="{_escape(value)}">'
                     for name, value in chosen.items() if value)
    choices = {key: [row["name"] for row in report[key] if row["name"] != "(other)"]
               for key in ("event_types", "versions", "platforms")}
    types = choices["event_types"]
    empty = '<p class="empty">No events in this range.</p>'
    median = report["sessions"]["median_seconds"]
    returning = [users - new for users, new in zip(column["users"], column["new_users"])]
    ranked = {title: _ranking_svg([(row["name"], row["events"]) for row in report[key]], title)
              for title, key in (("Event types", "event_types"), ("Versions", "versions"), ("Platforms", "platforms"))}
    lengths = [(label, n) for (_, label), n in zip(SESSION_BUCKETS, extras["session_lengths"])]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Pycolytics dashboard</title>
<style>
{DASHBOARD_CSS}</style></head><body>
<header><h1>Pycolytics</h1>
<form method="get" action="dashboard">
<label>Application <select name="application"><option value="">all</option>{_options(
        sorted(set(extras["applications"]) | ({query.application} if query.application else set())),
        query.application)}</select></label>
<label>From <input type="date" name="since" value="{query.since}"></label>
<label>to <input type="date" name="until" value="{query.until}"></label>
<label>Event type <input name="event_type" list="event_types" size="12" value="{_escape(filters["event_type"])}">
</label><label>Version <input name="version" list="versions" size="8" value="{_escape(filters["version"])}"></label>
<label>Platform <input name="platform" list="platforms" size="8" value="{_escape(filters["platform"])}"></label>
<button type="submit">Show</button>{"".join(f'<datalist id="{key}">{_options(names, None)}</datalist>'
                                            for key, names in choices.items())}</form>
<a href="{_link("v1.0/report", dict(chosen, format="csv"))}">Download the days as CSV</a> &middot;
<a href="{_link("v1.0/report", chosen)}">the report as JSON</a></header>
<main>
<div class="totals"><div><b>{totals["events"]:,}</b>events</div><div><b>{totals["users"]:,}</b>users</div>
<div><b>{totals["new_users"]:,}</b>new users</div><div><b>{totals["sessions"]:,}</b>sessions</div>
<div><b>{_seconds_text(median)}</b>median session</div></div>
<section><h2>Events per day</h2>{_columns_svg(dates, [("events", column["events"])], "events per day")
                                   if totals["events"] else empty}</section>
<section><h2>Users and sessions per day</h2>{_legend(["users", "sessions"]) + _lines_svg(
    dates, [("users", column["users"]), ("sessions", column["sessions"])], "users and sessions per day")
    if totals["events"] else empty}</section>
<section><h2>New and returning users per day</h2>{_legend(["new users", "returning users"]) + _columns_svg(
    dates, [("new users", column["new_users"]), ("returning users", returning)], "new and returning users per day")
    if totals["events"] else empty}</section>
<section><h2>Retention: the share of each day's new users back on the days after</h2>
{_retention_table(extras["triangle"], query.since)}</section>
<div class="grid">
<section><h2>Session length</h2>{_ranking_svg(lengths, "session lengths") if totals["sessions"] else empty}
<p class="empty">median {_seconds_text(median)}, 90% under {_seconds_text(report["sessions"]["p90_seconds"])},
{report["sessions"]["per_user"]} sessions per user</p></section>
{"".join(f"<section><h2>{title}</h2>{svg}</section>" for title, svg in ranked.items())}
</div>
<section><h2>Funnel</h2>{_funnel_section(parts, hidden, types)}</section>
<section><h2>Values</h2>{_values_section(parts, hidden, types)}</section>
</main>
<footer>Pycolytics {__version__} &middot; days in UTC &middot; drawn in {seconds * 1000:.0f} ms</footer>
</body></html>
"""


###############################################################################
# The WSGI application
###############################################################################

JSON_TYPE = ("Content-Type", "application/json")
HTML_TYPE = ("Content-Type", "text/html; charset=utf-8")

def _error_parts(error):
    """(status, headers, body) of the JSON answer to an HTTPError."""
    body = json.dumps({"detail": error.detail}).encode()
    return error.status, [JSON_TYPE, ("Content-Length", str(len(body)))] + error.headers, body


_INTERNAL_ERROR = _error_parts(HTTPError("internal server error"))  # never says more: no tracebacks out
_NO_CONTENT = ("204 No Content", [], b"")


_VARY_ORIGIN = [("Vary", "Origin")]


def _ok(body, content_type, *headers):
    """(status, headers, body) of a 200 answer."""
    return "200 OK", [content_type, ("Content-Length", str(len(body))), *headers], body


def read_body(environ, limit):
    """The request body, at most `limit` bytes; never reads more than limit + 1."""
    length = environ.get("CONTENT_LENGTH") or ""
    stream = environ["wsgi.input"]
    if length:
        if not length.isdigit():
            raise BadRequest("Content-Length must be a whole number of bytes")
        if int(length) > limit:
            raise PayloadTooLarge(f"the request body is {length} bytes; at most {limit} are accepted")
        body = stream.read(int(length))
        if len(body) < int(length):
            raise BadRequest("the request body is shorter than its Content-Length")
        return body
    if not environ.get("wsgi.input_terminated"):
        return b""
    body = stream.read(limit + 1)
    if len(body) > limit:
        raise PayloadTooLarge(f"the request body is over {limit} bytes; at most {limit} are accepted")
    return body


def decompress(body, encoding, limit):
    """A gzip or deflate body, decompressed to at most `limit` bytes: a bomb is refused early."""
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding} is not supported: send gzip, deflate or identity")
    import zlib  # here: most servers never see a compressed body

    # 47 reads a gzip or a zlib header; -15 is raw deflate, which some clients send as "deflate".
    for window in (47, -15) if encoding == "deflate" else (47,):
        decompressor = zlib.decompressobj(window)
        try:
            data = decompressor.decompress(body, limit + 1)
        except zlib.error:
            continue
        if len(data) > limit or decompressor.unconsumed_tail:
            raise PayloadTooLarge(f"the request body decompresses to over {limit} bytes; at most {limit} are accepted")
        if not decompressor.eof:
            raise BadRequest(f"the {encoding} body is cut short")
        return data
    raise BadRequest(f"the request body is not valid {encoding} data")


# What a Host (or X-Forwarded-Host) may be to be written into a page: a name or an address and
# a port. Anything else is not a host, and the server's own name is used instead.
_HOST = re.compile(r"(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
# An X-Forwarded-Prefix: a path of RFC 3986's unreserved characters and percent-escapes, written
# as is; nothing that needs quoting in HTML or in the shell command the /docs page shows.
_PREFIX = re.compile(r"(?:/[A-Za-z0-9._~%-]*)*")
# Where the cached documentation names the application's own address; each answer puts the
# address it was asked at (public_url) in its place. RFC 2606 reserves .invalid: no page says it.
_OWN_ADDRESS = "http://pycolytics.invalid"


def _last(header):
    """The last value of a comma-separated header: the one the nearest proxy, the trusted one, set."""
    return header.rpartition(",")[2].strip()


def public_url(environ, trusted_proxies):
    """The application's address as the player used it, without a trailing slash.

    Built as wsgiref.util.application_uri builds it (scheme, Host, SCRIPT_NAME), except that a
    trusted proxy's X-Forwarded-Proto and X-Forwarded-Host win: behind nginx the request that
    reaches us says nothing of the player's scheme and host.
    """
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
    """The path the application is at, as the player used it: "" at the root, else "/analytics".

    SCRIPT_NAME (where the WSGI server mounted it) after the X-Forwarded-Prefix of a trusted
    proxy (the path nginx took off before passing the request on).
    """
    prefix = ""
    if environ.get("REMOTE_ADDR") in trusted_proxies:
        prefix = _last(environ.get("HTTP_X_FORWARDED_PREFIX", ""))
        prefix = prefix.rstrip("/") if _PREFIX.fullmatch(prefix) else ""
    from urllib.parse import quote  # here: only the answers that name their own address need it

    return prefix + quote(environ.get("SCRIPT_NAME", "").rstrip("/"), encoding="latin-1")


class Pycolytics:
    """The WSGI application: `Pycolytics(config)(environ, start_response)`."""

    def __init__(self, config, scoreboard=None):
        """`scoreboard`: a worker process's seat on the Scoreboard that the workers of `workers = N`
        share, so that its metrics, health and rate limit are the whole server's."""
        self.scoreboard = scoreboard
        self.store = store_for(config)
        self.metrics = Metrics() if scoreboard is None else Metrics(scoreboard.rows, scoreboard.row)
        if scoreboard is not None and scoreboard.writer_address is not None:
            self.writer = RemoteWriter(config, self.store, self.metrics, scoreboard)
        else:
            self.writer = Writer(config, self.store, self.metrics)
        self.rate_limiter = None
        self.reconfigure(config)
        self._routes = {
            "/v1.0/event": {"POST": self.post_event, "OPTIONS": self.preflight},
            "/v1.0/events": {"POST": self.post_events, "OPTIONS": self.preflight},
            "/v1.0/client.js": {"GET": client_script},
            "/docs": {"GET": self.get_docs},
            "/openapi.json": {"GET": self.get_openapi},
            "/healthz": {"GET": self.get_health},
            "/metrics": {"GET": self.get_metrics},
            "/dashboard": {"GET": self.get_dashboard},
            "/v1.0/report": {"GET": self.get_report},
            "/v1.0/report/funnel": {"GET": self.get_report},
            "/v1.0/report/values": {"GET": self.get_report},
            "/": {"GET": self.get_index},
        }
        for methods in self._routes.values():
            if "GET" in methods:
                methods["HEAD"] = methods["GET"]
        # What the server's loop must not answer itself: these may wait for the database.
        self._reads_the_database = {self.get_health, self.get_dashboard}
        self._turn_rows, self._turn_requests = [], []  # posted in this turn of the server's loop

    def reconfigure(self, config):
        """Put new settings in force (keys, limits, documentation); the database stays as it is."""
        self.validator = Validator(config, Keyring(config))
        self.dashboard = Dashboard(config, self.store)
        origins = [config.cors_origins] + [app["cors_origins"] for app in config.apps.values() if "cors_origins" in app]
        self._every_origin = [("Access-Control-Allow-Origin", "*")] if ANY_ORIGIN in origins else None
        self._origins = frozenset().union(*(found for found in origins if found is not ANY_ORIGIN))
        if config.rate_limit != (self.config.rate_limit if self.rate_limiter else None):
            shared = None if self.scoreboard is None else self.scoreboard.requests
            self.rate_limiter = RateLimiter(config.rate_limit, shared) if config.rate_limit else None
        self._openapi = json.dumps(openapi_document(config, _OWN_ADDRESS), indent=2).encode()
        self._docs = docs_page(config, _OWN_ADDRESS).encode()
        self.config = self.writer.config = config

    def open(self):
        """Open the database now instead of at the first event, so a bad path stops start-up."""
        self.writer.start()

    def close(self):
        self.writer.close()

    def __call__(self, environ, start_response):
        """Plain WSGI: a posted request waits here until its events are committed."""
        try:
            answer = self._route(environ)(environ)
            if isinstance(answer, list):  # rows to store
                if answer:
                    self.writer.start()
                    self.writer.write(answer)
                answer = _NO_CONTENT
        except HTTPError as error:
            answer = _error_parts(error)
        except Exception:
            answer = self._failed(environ)
        status, headers, body = self._finish(environ, answer)
        start_response(status, headers)
        return [body]

    def answer_in_loop(self, environ, respond):
        """The built-in server's loop hook (see Server): answer without blocking, or return False.

        Everything that does not read the database is answered right here; posted events are
        validated here and answered once the writer has committed them, with every other
        request that arrived meanwhile (one fsync for all).
        """
        try:
            handler = self._route(environ)
            if handler in self._reads_the_database:
                return False
            answer = handler(environ)
            if isinstance(answer, list):  # rows to store
                if answer:
                    self._turn_rows += answer
                    self._turn_requests.append((environ, respond))
                    return True
                answer = _NO_CONTENT
        except HTTPError as error:
            answer = _error_parts(error)
        except Exception:
            answer = self._failed(environ)
        respond(*self._finish(environ, answer))
        return True

    def loop_turn_ended(self):
        """The server's hook after each turn of its loop: the rows of every request read in it
        go to the writer together, to be committed with one fsync."""
        if not self._turn_requests:
            return
        rows, requests = self._turn_rows, self._turn_requests
        self._turn_rows, self._turn_requests = [], []
        try:
            self.writer.start()
            self.writer.submit(rows, functools.partial(self._committed, requests))
        except HTTPError as error:
            self._committed(requests, error)

    def server_answered(self, status):
        """The server's hook for the answers it gives by itself (bad framing, overload): counted."""
        self.metrics.request(status)

    def _committed(self, requests, error=None):
        """Called by the writer thread once a turn's rows are stored, or could not be: answer them all."""
        status, headers, body = _NO_CONTENT if error is None else _error_parts(error)
        self.metrics.request(status, len(requests))
        for environ, respond in requests:
            respond(status, headers + self.cors_headers(environ.get("HTTP_ORIGIN")), body)

    def _finish(self, environ, answer):
        """Every answer, whichever way it leaves: counted, and readable by the pages allowed to."""
        status, headers, body = answer
        self.metrics.request(status)
        return status, headers + self.cors_headers(environ.get("HTTP_ORIGIN")), body

    @staticmethod
    def _failed(environ):
        log.exception("error while answering %s %s", environ.get("REQUEST_METHOD"),
                      environ.get("PATH_INFO", "").encode("unicode_escape").decode("ascii"))
        return _INTERNAL_ERROR

    def cors_headers(self, origin):
        """What lets a page from `origin` read the answer (browser games, web apps), if it may."""
        if self._every_origin:
            return self._every_origin  # the same list for every answer: callers only add it to theirs
        if origin in self._origins:
            return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        return _VARY_ORIGIN

    def preflight(self, environ):
        """A browser asking whether it may POST here: yes, for a day, with these headers."""
        return "204 No Content", [
            ("Access-Control-Allow-Methods", "POST, OPTIONS"),
            ("Access-Control-Allow-Headers", "Content-Type, Content-Encoding"),
            ("Access-Control-Max-Age", "86400"),
        ], b""

    def _route(self, environ):
        """The handler for a request; raises NotFound or MethodNotAllowed. The one routing of both ways in."""
        methods = self._routes.get(environ.get("PATH_INFO") or "/")
        if methods is None:
            root = public_path(environ, self.config.trusted_proxies)
            raise NotFound(f"no such endpoint: {root}{environ.get('PATH_INFO')}; "
                           f"events go to {root}/v1.0/event or {root}/v1.0/events")
        handler = methods.get(environ["REQUEST_METHOD"])
        if handler is None:
            allowed = ", ".join(methods)
            raise MethodNotAllowed(f"{environ['REQUEST_METHOD']} is not allowed here; use {allowed}", [("Allow", allowed)])
        return handler

    def post_event(self, environ):
        return self._rows(environ, batch=False)

    def post_events(self, environ):
        return self._rows(environ, batch=True)

    def _rows(self, environ, batch):
        """The rows a posted request asks to store; raises HTTPError for anything wrong with it."""
        body = read_body(environ, self.config.max_body_bytes)
        client = client_address(
            environ.get("REMOTE_ADDR"), environ.get("HTTP_X_FORWARDED_FOR"), self.config.trusted_proxies
        )
        if self.rate_limiter is not None:
            self.rate_limiter.check(client)
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
        problem = self.database_problem()
        server_problem = environ.get("pycolytics.server_problem")  # the built-in server's own trouble
        document = {"status": "unavailable" if problem or server_problem else "ok",
                    "database": problem or "accepts writes", "version": __version__}
        if server_problem:
            document["server"] = server_problem
            problem = problem or server_problem
        if self.scoreboard is not None:
            document["workers"] = self.scoreboard.workers()
            if self.scoreboard.writer_address is not None:
                document["writer"] = self.scoreboard.writer_state()
        body = json.dumps(document).encode()
        _, headers, body = _ok(body, JSON_TYPE, ("Cache-Control", "no-store"))
        return ("503 Service Unavailable" if problem else "200 OK"), headers, body

    def database_problem(self):
        """Why the database would not take events now, or None if it would; with workers = N, from
        any worker: one whose last write failed answers 503 to some of the events sent now."""
        problem = self.writer.health()
        if problem is None and self.scoreboard is not None:
            failing = self.scoreboard.failing()
            if failing:
                problem = f"the last write of worker {failing[0]} failed (its log says why)"
        return problem

    def get_dashboard(self, environ):
        self.dashboard.authorize(environ)
        body = self.dashboard.page(environ)
        return _ok(body, HTML_TYPE, ("Cache-Control", "no-store"), ("Referrer-Policy", "no-referrer"),
                   ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                                               "form-action 'self'; frame-ancestors 'none'"))

    def get_report(self, environ):
        return self.dashboard.answer(environ)

    def get_metrics(self, environ):
        return _ok(self.metrics.text().encode(), ("Content-Type", "text/plain; version=0.0.4"))

    def get_index(self, environ):
        # Paths, not addresses: a client that reached this page can reach them the same way.
        root = public_path(environ, self.config.trusted_proxies)
        body = json.dumps({"name": "pycolytics", "version": __version__, "api": API_VERSION, "docs": root + "/docs",
                           "openapi": root + "/openapi.json", "dashboard": root + "/dashboard"}).encode()
        return _ok(body, JSON_TYPE)


def create_app(config=None):
    """A ready application; for `gunicorn 'pycolytics:create_app()'`, which then fails fast on bad settings."""
    app = Pycolytics(config or load_config())
    app.open()
    return app


class _LazyApplication:
    """The module's `application`: builds the real one from the environment at its first request.

    Servers that fork workers import the module first, so nothing may be opened at import.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._app = None
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self):
        # A forked child must not share its parent's writer thread (which did not survive the fork).
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
# Documentation: /openapi.json and /docs
###############################################################################


def _event_schema(config):
    strings = {name: {"type": "string", "maxLength": config.max_string_length} for name in EVENT_FIELDS}
    return {
        "type": "object",
        "required": list(EVENT_FIELDS),
        "properties": dict(
            strings,
            value={"type": "object", "default": {}, "description": "Anything, as a JSON object."},
            api_key={"type": "string", "description": "One of the server's API keys."},
            timestamp=_client_time_schema("When the event happened, by the client's clock."),
            sent_at=_client_time_schema("When the client sent the request, by its clock: corrects a wrong clock."),
            event_id={"type": "string", "minLength": 1, "maxLength": MAX_EVENT_ID,
                      "description": "A unique id made by the client: an event whose id is stored for the same application is not stored again."},
        ),
        "additionalProperties": True,
    }


def _client_time_schema(description):
    return {"description": description + " ISO 8601 text (UTC unless it says) or Unix seconds.", "oneOf": [
        {"type": "string", "pattern": _ISO_8601.pattern},
        {"type": "number", "minimum": 0, "maximum": _LAST_SECOND.timestamp()},
    ]}


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

    def post(summary, schema):
        return {"post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": answers,
        }}

    batch = {"type": "array", "items": {"$ref": "#/components/schemas/Event"}, "maxItems": config.max_batch_events}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Pycolytics Event API", "version": API_VERSION, "description": f"Pycolytics {__version__}"},
        "servers": [{"url": url}],
        "paths": dict({
            "/v1.0/event": post("Store one event", {"$ref": "#/components/schemas/Event"}),
            "/v1.0/events": post("Store a batch of events, all or nothing", batch),
        }, **_report_paths(error)),
        "components": {"schemas": {
            "Event": _event_schema(config),
            "Error": {"type": "object", "required": ["detail"], "properties": {"detail": {}}},
        }, "securitySchemes": {"readKey": {"type": "http", "scheme": "bearer"},
                               "readKeyAsPassword": {"type": "http", "scheme": "basic"}}},
    }


def _report_paths(error):
    """The report API's paths: a read key, a range of days and filters; README.md defines every figure."""
    def parameter(name, description, required=False):
        return {"name": name, "in": "query", "required": required, "description": description,
                "schema": {"type": "string", "maxLength": MAX_FILTER_CHARACTERS}}

    common = [parameter("since", "First day (UTC, YYYY-MM-DD, inclusive); default 29 days before until."),
              parameter("until", "Last day (inclusive); default today. At most 366 days from since."),
              parameter("application", "Only this application's events; a user is then a user_id."),
              parameter("event_type", "Only events of this type."), parameter("version", "Only this version."),
              parameter("platform", "Only this platform.")]
    failures = {code: {"description": text, "content": {"application/json": {"schema": error}}} for code, text in (
        ("400", "A bad query: a date, a range over 366 days, a format, missing steps or field."),
        ("401", "No read key, or a wrong one."), ("403", "The report is off: no read_keys are configured."),
        ("429", "Too many wrong read keys from this address: retry after Retry-After seconds."),
        ("503", "The database could not be read."))}
    json_answer = {"application/json": {"schema": {"type": "object"}}}

    def get(summary, parameters, content):
        return {"get": {"summary": summary, "parameters": common + parameters,
                        "security": [{"readKey": []}, {"readKeyAsPassword": []}],
                        "responses": dict({"200": {"description": summary, "content": content}}, **failures)}}

    formats = parameter("format", "json (the default) or csv")
    return {
        "/v1.0/report": get("Events, users, new users, sessions per day; retention; session lengths; rankings",
                            [formats], dict(json_answer, **{"text/csv": {"schema": {"type": "string"}}})),
        "/v1.0/report/funnel": get("Users who did each step at or after the one before", [
            parameter("steps", "Event types separated by commas, at most 10.", True), formats],
            dict(json_answer, **{"text/csv": {"schema": {"type": "string"}}})),
        "/v1.0/report/values": get("The distribution of one field of the value of one event type", [
            parameter("field", "A key of the events' value.", True)], json_answer),
    }


DOCS_CSS = ("body{font:16px/1.5 system-ui,sans-serif;max-width:50em;margin:2em auto;padding:0 1em}"
            "code,pre{background:#f4f4f4}pre{padding:1em;overflow:auto}td{padding:.2em .8em;vertical-align:top}")


def docs_page(config, url):
    """The /docs page of the API served at `url` (as public_url() gives it, HTML-escaped)."""
    example = json.dumps({
        "event_type": "level_started", "application": "my-game", "version": "1.0.2", "platform": "Linux",
        "user_id": "3f2a9c1e", "session_id": "a81c0f", "value": {"level": 3}, "api_key": DEV_KEY,
    }, indent=2)
    rows = "".join(
        f"<tr><td><code>{name}</code></td><td>string, required, at most {config.max_string_length} characters</td></tr>"
        for name in EVENT_FIELDS
    )
    answers = "".join(f"<tr><td>{status}</td><td>{_escape(text)}</td></tr>\n" for status, text in EVENT_ANSWERS)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Pycolytics Event API</title>
<style>{DOCS_CSS}</style>
</head><body>
<h1>Pycolytics Event API {API_VERSION}</h1>
<p>Pycolytics {__version__}. The machine-readable description is <a href="openapi.json">openapi.json</a>.</p>
<h2>POST /v1.0/event</h2><p>One event, as a JSON object:</p>
<pre>{example}</pre>
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
<tr><td><code>event_id</code></td><td>optional: a unique string of at most {MAX_EVENT_ID} characters made by the client;
an event whose id is already stored for the same application is acknowledged and not stored again, so retries
are safe</td></tr></table>
<p>Other fields are ignored. The body may be at most {config.max_body_bytes} bytes, also after decompression
(<code>Content-Encoding: gzip</code> or <code>deflate</code>); any Content-Type is accepted, so browsers can post
<code>text/plain</code> without a preflight. Every answer carries CORS headers for allowed origins, and
<code>OPTIONS</code> answers preflights.</p>
<h2>Answers</h2><table>
{answers}</table>
<p>Every error has a JSON body <code>{{"detail": ...}}</code> saying what to fix.</p>
<h2>GET /v1.0/client.js: the browser client</h2>
<p>A small script without dependencies, for games and apps in a browser (Godot and Unity web exports, for
example). No key is needed to load it; browsers cache it and revalidate it by its ETag.</p>
<pre>&lt;script src="https://analytics.example.com/v1.0/client.js"&gt;&lt;/script&gt;
&lt;script&gt;
  Pycolytics.init({{url: "https://analytics.example.com", apiKey: "...", application: "my-game",
                   version: "1.0.2", platform: "Web"}});
  Pycolytics.track("level_started", {{level: 3}});
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
key (HTTP Basic password or <code>Authorization: Bearer</code>).</p>
<h2>Reports: GET /v1.0/report, /v1.0/report/funnel, /v1.0/report/values</h2>
<p>The figures behind the dashboard, as JSON (or CSV with <code>format=csv</code>), with the same read key. Query:
<code>since</code> and <code>until</code> (UTC days, inclusive; default the last {DASHBOARD_DAYS} days up to today;
at most {MAX_REPORT_DAYS} days), <code>application</code>, and the filters <code>event_type</code>,
<code>version</code>, <code>platform</code> (a filtered report is that of a database holding only the matching
events). Any bad query is a 400 with <code>detail</code>.</p>
<ul><li><code>days</code>: one row per day of the range, zeros included. A user is a <code>user_id</code> within
the application when one is given, an (application, user_id) pair otherwise; a session likewise.</li>
<li><code>new_users</code> of a day: users whose first event ever (in the whole database) falls on that day;
<code>totals.new_users</code> counts those whose first day is in the range.</li>
<li><code>retention</code>: a row per day of the range on which new users arrived; <code>day_N</code> is the share
of them with an event on exactly the N-th day after (<code>null</code> while that day is after until or today).</li>
<li><code>sessions</code>: distinct session_ids (per day: those with an event that day); a session lasts from its
first to its last event in the range; <code>median_seconds</code> and <code>p90_seconds</code> are nearest-rank
percentiles; <code>per_user</code> is sessions / users.</li>
<li><code>event_types</code>, <code>versions</code>, <code>platforms</code>: the top {REPORT_TOP} by events, then one
<code>"(other)"</code> row for the rest. CSV gives the days: <code>date,events,users,new_users,sessions</code>.</li>
<li><code>/funnel?steps=a,b,c</code>: the users who did <code>a</code>, then <code>b</code> at or after their first
<code>a</code>, then <code>c</code> at or after that <code>b</code>, within the range.</li>
<li><code>/values?event_type=E&amp;field=F</code>: <code>value[F]</code> of the events of type E: numbers as
count, min, p50, p90, max and sum; strings (and true/false) as the top {REPORT_TOP} with "(other)";
<code>missing</code> counts events without a number or string there.</li></ul>
<h2>Example</h2>
<pre>curl -i {url}/v1.0/event -H 'Content-Type: application/json' -d '{json.dumps(json.loads(example))}'</pre>
</body></html>
"""


###############################################################################
# The browser client: /v1.0/client.js
###############################################################################

# Kept here, like the dashboard's markup, so that the collector stays one file.
CLIENT_JS = r"""/* Pycolytics browser client, served by the collector at /v1.0/client.js (documented at /docs).
   Pycolytics.init({url, apiKey, application, version, platform}); Pycolytics.track(type, value);
   Events wait in localStorage until the collector acknowledges them; each carries an event_id,
   so a request sent again after a lost answer is stored once. */
(function (global) {
  "use strict";
  if (global.Pycolytics) return;

  const MAX_BATCH_BYTES = 262144;  // a quarter of the collector's default body limit
  const BEACON_BYTES = 60000;  // browsers refuse beacons beyond 64 KiB in flight
  const COMPRESS_FROM = 1024;  // smaller bodies go as they are: gzip would save little
  const REQUEST_TIMEOUT = 30000;  // ms before a request without an answer counts as failed
  const MAX_BACKOFF = 60000;  // ms between retries at most, before jitter
  const MAX_RETRY_AFTER = 600;  // seconds of a Retry-After taken at most

  let settings = null, keys = null, local = null, userId = null, sessionId = null;
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
      return local ? local.getItem(key) : (memory.has(key) ? memory.get(key) : null);
    } catch (error) {
      return null;
    }
  }

  function write(key, text) {
    if (!local) {
      memory.set(key, text);
      return true;
    }
    try {
      local.setItem(key, text);
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
      write(keys.dropped, String((Number(read(keys.dropped)) || 0) + dropped));
      if (!warned) console.warn("Pycolytics: the queue is full; the oldest events are dropped (see Pycolytics.stats())");
      warned = true;
    }
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

  function init(options) {
    options = options || {};
    for (const name of ["url", "apiKey", "application"]) {
      if (typeof options[name] !== "string" || !options[name]) throw new TypeError("Pycolytics.init: " + name + " is required");
    }
    settings = {
      url: options.url.replace(/\/+$/, "") + "/v1.0/events",
      apiKey: options.apiKey,
      application: options.application,
      version: String(options.version == null ? "" : options.version),
      platform: String(options.platform == null ? "Web" : options.platform),
      batchSize: Math.min(positive(options.batchSize, 20), 1000),
      interval: positive(options.interval, 5) * 1000,
      maxQueue: positive(options.maxQueue, 1000),
    };
    const prefix = "pycolytics:" + options.application + ":";
    keys = {queue: prefix + "queue", user: prefix + "user", dropped: prefix + "dropped"};
    local = localStorageOrNull();
    userId = options.persistentUser === false ? newId() : read(keys.user) || newId();
    if (options.persistentUser !== false) write(keys.user, userId);
    sessionId = newId();
    size = stored().length;
    schedule(0);  // what earlier pages left unacknowledged
  }

  function track(type, value) {
    if (!settings) throw new Error("Pycolytics.track: call Pycolytics.init first");
    if (value === undefined) value = {};
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

  function stamped(event, sentAt) {
    return Object.assign({}, event, {sent_at: sentAt});
  }

  function post(batch) {
    const sentAt = new Date().toISOString();
    const text = JSON.stringify(batch.map((event) => stamped(event, sentAt)));
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
    if (complained) return;
    complained = true;
    console.error("Pycolytics: the collector refused " + events.length + " event(s) with HTTP " + status +
                  "; they are dropped, not sent again. Later refusals are not logged.", answer && answer.detail);
  }

  // The page is going away, or may be killed in the background: a beacon is the last chance.
  // Its answer is never seen, so the events stay queued and the next page sends them again.
  function beacon() {
    if (!settings || !navigator.sendBeacon) return;
    const sentAt = new Date().toISOString(), parts = [];
    let bytes = 2;
    for (const event of queued()) {
      const text = JSON.stringify(stamped(event, sentAt));
      bytes += new Blob([text]).size + 1;
      if (bytes > BEACON_BYTES) break;
      parts.push(text);
    }
    if (parts.length) navigator.sendBeacon(settings.url, new Blob(["[" + parts.join(",") + "]"], {type: "text/plain"}));
  }

  global.addEventListener("pagehide", beacon);
  global.document.addEventListener("visibilitychange", () => {
    if (global.document.visibilityState === "hidden") beacon();
  });

  global.Pycolytics = {
    init,
    track,
    flush: () => settings && schedule(0),
    stats: () => ({queued: settings ? queued().length : 0, dropped: settings ? Number(read(keys.dropped)) || 0 : 0,
                   refused, failures}),
  };
})(window);
"""

_CLIENT_BODY = CLIENT_JS.encode()
# A page keeps the script for an hour; then the browser asks again with the ETag and gets a
# 304 until the script changes (with a new Pycolytics).
_CLIENT_HEADERS = [
    ("ETag", f'"{binascii.crc32(_CLIENT_BODY):08x}"'),
    ("Cache-Control", "public, max-age=3600"),
    # A cross-origin isolated page (COEP require-corp, as Godot 4's threaded web export needs)
    # loads a script from another origin only if the script says it may.
    ("Cross-Origin-Resource-Policy", "cross-origin"),
]


def client_script(environ):
    """GET /v1.0/client.js: the script, or a 304 when the browser's copy is this one."""
    etag = _CLIENT_HEADERS[0][1]
    tags = (environ.get("HTTP_IF_NONE_MATCH") or "").split(",")
    if any(tag.strip() in ("*", etag, "W/" + etag) for tag in tags):
        return "304 Not Modified", list(_CLIENT_HEADERS), b""
    return _ok(_CLIENT_BODY, ("Content-Type", "text/javascript; charset=utf-8"), *_CLIENT_HEADERS)


###############################################################################
# The built-in HTTP/1.1 server
###############################################################################

# Blank lines a client may send before a request line: RFC 9112 (section 2.2) asks servers
# to skip at least one; more than a few is a client that wants to hold a slot for nothing.
MAX_BLANK_LINES = 8

# How many times per turn of the loop each connection with pipelined requests starts its
# next one: connections take turns, so one that pipelines a thousand waits its turn.
PIPELINE_ROUNDS = 16

# How long the server stops accepting when it is out of file descriptors, for the ones in
# use to be closed; meanwhile the kernel's backlog holds newcomers.
ACCEPT_PAUSE_SECONDS = 1.0
# With workers = N, how long a worker that holds more connections than another leaves a
# newcomer to that one before it takes it itself (the other may be busy, or stuck).
ACCEPT_YIELD_SECONDS = 0.002

# How long a connection that has sent nothing, or only part of a request, is safe from being
# closed to make room for a newcomer when every slot is taken. A client sends a whole request
# within a round trip or two; closing one whose request is unread would reset it (newcomers
# would evict each other before anyone is served), and a slowloris that started its request
# earlier than this gives its slot up long before request_timeout.
GRACE_SECONDS = 2.0

# What the log may hold while stderr cannot take it (a full pipe, a slow terminal); lines
# beyond it are dropped and counted, so that logging never blocks or stops the server.
LOG_BUFFER_BYTES = 1 << 20

# Bytes that may not appear in a request head once its CRLFs are blanked out: control
# characters (tab aside), so also a bare CR or LF. RFC 9112 (section 2.2) allows taking a
# bare LF as a line end, but proxies that read it otherwise are how requests get smuggled.
_FORBIDDEN_IN_HEAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# A method or a header name: RFC 9110's token (section 5.6.2).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")

# What a log line may show of client text: control characters become \xNN, so that a
# request line cannot forge log lines or reach a terminal as escape sequences.
_PRINTABLE = {code: f"\\x{code:02x}" for code in (*range(32), *range(127, 160))}


def tls_context(config):
    """An SSLContext for HTTPS with config's certificate, or None for plain HTTP.

    ssl is imported only here: it loads OpenSSL, 3.5 MB that plain-HTTP servers (and those
    behind nginx, which does the TLS) never need. TLS 1.2 is the oldest version offered.
    """
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
    """Called by OpenSSL for an encrypted key, instead of its prompt on the terminal (which would
    stop the event loop, or wait forever under systemd)."""
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
    """A stream for log lines that never blocks and never raises: what a server writes its log to.

    stderr can stall (a pipe nobody reads) or break (`| tee` died); either would stop an event
    loop that wrote to it directly. Lines wait in a bounded buffer for a thread of their own;
    when the buffer is full they are dropped, and the next line that fits says how many.
    """

    def __init__(self, stream, limit=LOG_BUFFER_BYTES):
        self._stream = stream
        self._limit = limit
        self._lines = collections.deque()
        self._size = 0
        self._dropped = 0
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


def _printable(text):
    """Client text fit for one log line."""
    return text.translate(_PRINTABLE)


class _Request:
    __slots__ = ("method", "path", "query", "version", "headers", "length", "body", "keep_alive", "line")


class _Connection:
    """One client connection, owned by the server's event loop."""

    __slots__ = ("sock", "peer", "buffer", "scanned", "blank_lines", "deadline", "request", "body_start",
                 "reserved", "continued", "busy", "keep_alive", "outbox", "writing", "lingering", "handshaking",
                 "closed", "limited", "since", "watched")

    def __init__(self, sock, peer, deadline, limited):
        self.sock = sock
        self.peer = peer
        self.buffer = bytearray()
        self.scanned = 0  # how much of the buffer is known to hold no end of head: heads are searched once
        self.blank_lines = 0
        self.deadline = deadline  # when the loop gives up on it; None while its request is answered
        self.request = None  # a request whose head has arrived and whose body has not, yet
        self.body_start = 0
        self.reserved = 0  # body bytes counted against max_buffered_bytes
        self.continued = False
        self.busy = False  # a whole request is being answered
        self.keep_alive = True
        self.outbox = b""
        self.writing = False
        self.lingering = False
        self.handshaking = False
        self.closed = False
        self.limited = limited  # counted against max_connections_per_address
        self.since = time.monotonic()  # when it connected, or began its request
        self.watched = False  # registered with the loop's selector


def _origin(connection):
    """The Origin header of the request the connection is reading, if its head has arrived."""
    return connection.request.headers.get("origin") if connection.request is not None else None


def _cgi_name(name):
    """The environ key of a header (PEP 3333), or "" for one left out: a name with an underscore
    would be confused with the same name with a dash (a spoofing trick)."""
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
            raise BadRequest("the request target must be a path, an http(s) URL, or * for OPTIONS")
        ends = [found for found in (rest.find("/"), rest.find("?")) if found >= 0]
        target = rest[min(ends):] if ends else "/"
        if target[0] != "/":
            target = "/" + target
    path, _, query = target.partition("?")
    return path, query


# Header lines as clients repeat them, request after request ("Host: ...", "User-Agent: ..."),
# each checked once: (name in lower case, value). Short lines only, and a few hundred of them.
_HEADER_LINES = {}
HEADER_LINES_KEPT = 512
HEADER_LINE_KEPT_CHARS = 256


def _header_field(line, config):
    """(name in lower case, value) of one header line; raises HTTPError if it is malformed or too long."""
    name, sep, value = line.partition(":")
    if not (sep and (name.isascii() and name.replace("-", "").isalnum() or _TOKEN.match(name))):
        raise BadRequest(f"malformed header line {_printable(line[:40])!r}")
    if len(line) > config.max_header_field:
        raise HeaderFieldsTooLarge(f"the header {name} is over {config.max_header_field} bytes")
    field = name.lower(), value.strip(" \t")
    if len(line) <= HEADER_LINE_KEPT_CHARS:
        if len(_HEADER_LINES) >= HEADER_LINES_KEPT:
            _HEADER_LINES.clear()  # new clients' lines take the place of those gone
        _HEADER_LINES[line] = field
    return field


def _parse_head(head, config):
    """A _Request from the bytes before the blank line; raises HTTPError on bad framing."""
    bad = _FORBIDDEN_IN_HEAD.search(head.replace(b"\r\n", b"  "))
    if bad:
        raise BadRequest(f"the request head holds the byte {bad.group()[:1]!r} at offset {bad.start()}: "
                         "lines end with CRLF and hold no control characters")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
        raise BadRequest("malformed request line")
    request = _Request()
    request.method, target, request.version = parts
    request.line = lines[0]
    if request.version not in ("HTTP/1.1", "HTTP/1.0"):
        if request.version.startswith("HTTP/"):
            raise VersionNotSupported("only HTTP/1.0 and HTTP/1.1 are served")
        raise BadRequest("malformed request line")
    request.path, request.query = _split_target(target, request.method)
    if len(lines) - 1 > config.max_header_fields:
        raise HeaderFieldsTooLarge(f"at most {config.max_header_fields} header fields are accepted")
    request.headers = headers = {}
    for line in lines[1:]:
        known = _HEADER_LINES.get(line)
        name, value = _header_field(line, config) if known is None or len(line) > config.max_header_field else known
        if name in headers:
            if name == "host":
                raise BadRequest("more than one Host header")
            if name == "content-length" and value != headers[name]:
                raise BadRequest("conflicting Content-Length headers")
            value = value if name == "content-length" else headers[name] + ", " + value
        headers[name] = value
    if request.version == "HTTP/1.1" and "host" not in headers:
        raise BadRequest("an HTTP/1.1 request needs a Host header")
    if "transfer-encoding" in headers:
        if "content-length" in headers:
            raise BadRequest("both Transfer-Encoding and Content-Length: send one")
        raise LengthRequired("send the body with a Content-Length; Transfer-Encoding is not accepted")
    length = headers.get("content-length", "0")
    if not (length.isdigit() and length.isascii()) or len(length) > 18:
        raise BadRequest("Content-Length must be a whole number of bytes")
    request.length = int(length)
    tokens = headers.get("connection", "").lower()
    if request.version == "HTTP/1.1":
        request.keep_alive = "close" not in tokens
    else:
        request.keep_alive = "keep-alive" in tokens
    return request


class _HTTPDate:
    """The Date header, formatted by wsgiref once a second rather than once a request."""

    def __init__(self):
        self._second = None
        self._text = ""

    def __call__(self):
        second = int(time.time())
        if second != self._second:
            self._text = format_date_time(second)
            self._second = second
        return self._text


class OpenConnections:
    """Open connections by client address, for max_connections_per_address: one server's own.
    (With workers = N, the Scoreboard counts them for the whole server, with the same two methods.)"""

    def __init__(self):
        self._open = collections.Counter()

    def connected(self, address, limit):
        """Count a new connection from `address`, unless it holds `limit` already; whether it was counted."""
        if self._open[address] >= limit:
            return False
        self._open[address] += 1
        return True

    def disconnected(self, address):
        self._open[address] -= 1
        if not self._open[address]:
            del self._open[address]


def listening_socket(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=1024)


class Server:
    """An HTTP/1.1 server for a WSGI application, from the standard library only.

    One thread, the event loop (the caller of serve_forever), owns every socket: it reads
    without blocking until a request is whole, so slow, idle and silent clients cost a
    buffer each and never a thread, and it writes every answer. Every other thread hands its
    answers to the loop. A request runs the WSGI application in a bounded pool of worker
    threads, unless the application takes it in the loop through its hook:

    The loop hook. An application may offer `answer_in_loop(environ, respond)`. The loop calls
    it with each whole request's WSGI environ; the application either returns False (the
    request then runs as plain WSGI in a worker thread) or takes the request and calls
    `respond(status, headers, body)` exactly once, now or later and from any thread, never
    blocking the loop meanwhile. If it also offers `loop_turn_ended()`, the loop calls that
    after each turn, once every request read in the turn was handed over: Pycolytics gathers
    the events posted in a turn and commits them together (so a wrapper that passes one of
    the two hooks on must pass both). With a middleware in between (no
    hook), every request takes a worker thread, which is correct and slower. An application
    may also offer `server_answered(status)`, to hear of the answers the server gives by itself
    (bad framing, timeouts, overload), so that its metrics count every answer.

    Everything a client can make it hold is bounded: connections (in all, and per address),
    buffered bodies, head sizes, the time a request may take to arrive, and the work one
    turn of the loop does for one connection. Nothing a client sends is handled by recursion,
    and no error while serving one connection leaves the loop: that connection is closed.
    """

    def __init__(self, app, config, host=None, port=None, reload=None, listener=None, open_connections=None):
        """`listener`: a socket already bound and listening (one that worker processes share),
        instead of binding host and port here; `open_connections`: what counts them by address
        for max_connections_per_address (the Scoreboard of worker processes), if not this server."""
        self.app = app
        self.config = config
        self.reload = reload  # called in the loop after a request_reload(), e.g. on SIGHUP
        self._answer_in_loop = getattr(app, "answer_in_loop", None)
        self._turn_ended = getattr(app, "loop_turn_ended", None)
        self._server_answered = getattr(app, "server_answered", None)
        self._cors_headers = getattr(app, "cors_headers", None)
        self._reload_requested = False
        self._tls = tls_context(config)
        self._tls_pending = self._tls_errors()
        if listener is None:
            listener = listening_socket(config.host if host is None else host, config.port if port is None else port)
        self.listener = listener
        self.listener.setblocking(False)
        self.server_address = self.listener.getsockname()[:2]
        self.problem = None  # what keeps the server from serving as it should now; /healthz tells
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
        self._connections = {}
        self._per_address = OpenConnections() if open_connections is None else open_connections
        # Worker processes share the listening socket, and the kernel wakes every one of them for
        # a newcomer: the first awake would take a whole burst of connections (a client pool's,
        # a proxy's), and keep them. So each says how many it holds, and yields to one with fewer.
        self._holding = getattr(open_connections, "holding", None)
        self._crowded = getattr(open_connections, "crowded", None)
        self._yield_until = 0.0  # while it leaves newcomers to another worker
        self._yielded = False  # then it takes the next newcomer itself, whatever the others hold
        self._reserved = 0  # body bytes announced by requests being read or answered
        self._busy = 0
        self._listening = False
        self._accept_again = 0.0  # when to accept again after running out of file descriptors
        self._stopping = False
        self._date = _HTTPDate()
        self._workers = []
        self._failures_logged = set()
        self._cgi_names = {}  # header name -> its environ key, for the names seen most
        self._log_requests = not config.quiet

    @property
    def url(self):
        host, port = self.server_address
        return f"{'https' if self._tls else 'http'}://{'[' + host + ']' if ':' in host else host}:{port}"

    def _tls_errors(self):
        """The TLS errors that mean "not yet" on a non-blocking socket (none without TLS)."""
        if self._tls is None:
            return ()
        import ssl

        return (ssl.SSLWantReadError, ssl.SSLWantWriteError)

    def reconfigure(self, config, tls):
        """New settings for what comes next: limits, timeouts, logging, the certificate."""
        self.config = config
        self._log_requests = not config.quiet
        if (tls is None) == (self._tls is None):  # switching HTTPS on or off needs a restart
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

    # -- the event loop ----------------------------------------------------------------------

    def serve_forever(self):
        self._loop_thread = threading.get_ident()
        self._workers = [threading.Thread(target=self._work, name=f"pycolytics-{n}", daemon=True)
                         for n in range(self.config.threads)]
        for worker in self._workers:
            worker.start()
        self._selector.register(self._wake_reader, selectors.EVENT_READ, (self._take_wake_ups, None))
        self._listen(True)
        next_sweep = time.monotonic() + 1
        drain_by = None
        try:
            while True:
                timeout = 0 if self._ready or self._finished else 1.0
                if self._yield_until:
                    timeout = min(timeout, max(0.0, self._yield_until - time.monotonic()))
                for key, _ in self._selector.select(timeout):
                    callback, connection = key.data
                    try:  # _guarded, written out on the hottest path
                        callback() if connection is None else callback(connection)
                    except Exception as error:
                        self._connection_failed(connection, error)
                self._serve_ready()
                if self._turn_ended is not None:
                    self._guarded(self._turn_ended)
                if self._reload_requested and self.reload is not None:
                    self._reload_requested = False
                    self._guarded(self.reload)
                now = time.monotonic()
                if self._yield_until and now >= self._yield_until:
                    self._yield_until, self._yielded = 0.0, True
                    self._listen(True)
                if self._stopping:
                    if drain_by is None:
                        drain_by = now + self.config.request_timeout + self.config.busy_timeout
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
            if connection is None:
                function(*arguments)
            else:
                function(connection, *arguments)
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
        # After the wake-ups are read and before the answers are taken (in _serve_ready): an
        # answer queued from now on wakes the loop again, and one queued before is taken.
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
            if self._crowded is not None and not self._yielded and self._crowded():
                self._yield_until = time.monotonic() + ACCEPT_YIELD_SECONDS
                self._listen(False)
                return
            self._yielded = False
            if len(self._connections) >= self.config.max_connections and not self._make_room():
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
        limited = address not in self.config.trusted_proxies  # a proxy speaks for many clients
        if limited and not self._per_address.connected(address, self.config.max_connections_per_address):
            self._turn_away(sock)
            return
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError:  # reset already (some Pythons read from the socket in wrap_socket)
            sock.close()
            if limited:
                self._per_address.disconnected(address)
            return
        connection = _Connection(sock, address, time.monotonic() + self.config.request_timeout, limited)
        connection.handshaking = self._tls is not None
        self._connections[sock] = connection
        self._fresh[sock] = connection
        self._watch(connection, selectors.EVENT_READ, self._read)
        if self._holding is not None:
            self._holding(len(self._connections))

    def _turn_away(self, sock):
        """Close a connection at once, with a 503 if it speaks plain HTTP: nothing of it is kept,
        not even its head (so only a page allowed from any origin may read why)."""
        refusal = self._refusal(ServiceUnavailable(
            f"too many connections from your address at once (max_connections_per_address = "
            f"{self.config.max_connections_per_address}); close one, or connect again shortly", 5))
        try:
            if self._tls is None:
                sock.send(refusal)
        except OSError:
            pass  # it left already
        sock.close()

    def _answered(self, status):
        if self._server_answered is not None:
            self._server_answered(status)

    def _make_room(self):
        """Close the connection that has waited longest for its next request (or lingered), else
        the oldest that has sent nothing, or only part of a request, for GRACE_SECONDS (a 408
        for that one); False if none may go."""
        if self._idle:
            self._close(self._idle.popitem(last=False)[1])
            return True
        expired = time.monotonic() - GRACE_SECONDS
        for waiting in (self._fresh, self._reading):
            if waiting and next(iter(waiting.values())).since < expired:
                connection = waiting.popitem(last=False)[1]
                if connection.buffer or connection.request is not None:
                    self._send_now(connection, self._refusal(RequestTimeout(
                        "the server is full and this request was too slow to arrive"), _origin(connection)))
                self._close(connection)
                return True
        return False

    def _pause_accepting(self, error):
        if self.problem is None:
            log.warning("cannot accept connections: %s; trying again in %s s", error.strerror, ACCEPT_PAUSE_SECONDS)
        self.problem = f"out of file descriptors ({error.strerror}): new connections wait"
        self._accept_again = time.monotonic() + ACCEPT_PAUSE_SECONDS
        self._listen(False)
        self._make_room()  # one idle connection's descriptor lets the next request in

    def _watch(self, connection, events, callback):
        """Have the loop call callback(connection) when its socket is ready for `events`."""
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
        except self._tls_pending:  # half a TLS record, or a handshake that needs more
            return
        except (BlockingIOError, InterruptedError):
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
            self._answered("200")
            self._respond(connection, request, "200 OK", [("Allow", "GET, HEAD, POST, OPTIONS")], b"")
            return
        environ = self._environ(connection, request)
        respond = functools.partial(self._respond, connection, request)
        if self._answer_in_loop is None or not self._answer_in_loop(environ, respond):
            self._jobs.put((connection, request, environ))

    def _whole_request(self, connection):
        """The connection's next request if all of it has arrived, else None; raises HTTPError."""
        buffer, config = connection.buffer, self.config
        if connection.request is None:
            while buffer[:2] == b"\r\n":
                del buffer[:2]
                connection.blank_lines += 1
                if connection.blank_lines > MAX_BLANK_LINES:
                    raise BadRequest("too many blank lines before the request line")
            end = buffer.find(b"\r\n\r\n", max(connection.scanned - 3, 0))
            line_end = buffer.find(b"\r\n", 0, config.max_request_line + 2)
            if line_end < 0 and len(buffer) > config.max_request_line:
                raise URITooLong(f"the request line is over {config.max_request_line} bytes")
            if end < 0:
                connection.scanned = len(buffer)
                if len(buffer) > config.max_head_bytes:
                    raise HeaderFieldsTooLarge(f"the request head is over {config.max_head_bytes} bytes")
                return None
            if end > config.max_head_bytes:
                raise HeaderFieldsTooLarge(f"the request head is over {config.max_head_bytes} bytes")
            connection.request = request = _parse_head(bytes(buffer[:end]), config)
            self._reserve(connection, request.length)  # a refusal may read the request's Origin
            connection.body_start = end + 4
        request = connection.request
        end = connection.body_start + request.length
        if len(buffer) < end:
            if not connection.continued and request.version == "HTTP/1.1" and \
                    request.headers.get("expect", "").lower() == "100-continue":
                connection.continued = True
                self._send_now(connection, b"HTTP/1.1 100 Continue\r\n\r\n")
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
        connection.deadline = connection.since + self.config.request_timeout
        self._reading[connection.sock] = connection

    def _reserve(self, connection, length):
        """Count a body against the limits before it is read: one body, and all bodies together.

        A body that one recv() takes whole is not refused for the total: it costs no more than a
        head, which max_connections already bounds, and so clients with small batches are still
        served while large bodies fill the budget.
        """
        if length > self.config.max_body_bytes:
            raise PayloadTooLarge(f"the request body is {length} bytes; at most {self.config.max_body_bytes} "
                                  "are accepted")
        if length > RECV_BYTES and self._reserved + length > self.config.max_buffered_bytes:
            raise ServiceUnavailable("the server is receiving too many request bodies at once; "
                                     "send this again shortly")
        self._reserved += length
        connection.reserved = length

    def _release(self, connection):
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
        head = [f"HTTP/1.1 {status}", f"Date: {self._date()}", f"Server: pycolytics/{__version__}"]
        head += [f"{name}: {value}" for name, value in headers]
        if status[0] != "1" and status[:3] not in ("204", "304") and not any(
            name.lower() == "content-length" for name, _ in headers
        ):
            head.append(f"Content-Length: {len(body)}")
        head.append("Connection: keep-alive" if keep_alive else "Connection: close")
        if self._log_requests:
            self._log(connection, request, status, len(body))
        if request.method == "HEAD":
            body = b""
        connection.outbox = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        self._flush(connection)

    def _flush(self, connection):
        """Send what the connection's answer still has to send; then wait for its next request."""
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
                connection.deadline = time.monotonic() + self.config.request_timeout
                self._watch(connection, selectors.EVENT_WRITE, self._flush)
            return
        connection.writing = False
        connection.busy = False
        self._busy -= 1
        self._release(connection)
        if not connection.keep_alive:
            self._close(connection)
            return
        self._watch(connection, selectors.EVENT_READ, self._read)
        if connection.buffer:  # a pipelined request arrived with this one: its turn comes in the loop
            self._begin_request(connection)
            self._ready.append(connection)
        else:
            connection.deadline = time.monotonic() + self.config.idle_timeout
            self._idle[connection.sock] = connection

    def _send_now(self, connection, data):
        try:
            connection.sock.send(data)
        except OSError:
            pass  # the client is gone or not reading; the loop notices soon enough

    def _refuse(self, connection, error):
        """Answer a request that will not be read, then close without resetting the answer away.

        Closing a socket with unread input makes the kernel send a reset, which can destroy the
        answer before the client reads it; so shut down our side and discard what still comes
        for a moment (a "lingering close", as Apache and nginx do).
        """
        try:
            connection.sock.send(self._refusal(error, _origin(connection)))
            connection.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(connection)
            return
        self._release(connection)
        self._reading.pop(connection.sock, None)
        connection.lingering = True
        connection.buffer = bytearray()
        connection.request = None
        connection.deadline = time.monotonic() + LINGER_SECONDS
        self._idle[connection.sock] = connection  # the first to go when slots run out

    def _refusal(self, error, origin=None):
        """The bytes of the answer to a request the server refuses by itself (counted as answered),
        readable by the page that sent it if it may post here (`origin`, when the head was read)."""
        status, headers, body = _error_parts(error)
        if self._cors_headers is not None:
            headers = headers + self._cors_headers(origin)
        self._answered(status)
        head = [f"HTTP/1.1 {status}", f"Date: {self._date()}"] + [f"{name}: {value}" for name, value in headers]
        return ("\r\n".join(head + ["Connection: close"]) + "\r\n\r\n").encode("latin-1") + body

    def _sweep(self, now):
        """Close connections that idled, dawdled or lingered past their deadline; accept again."""
        for connection in list(self._connections.values()):
            if connection.deadline is not None and connection.deadline < now:
                if connection.lingering or connection.writing:
                    self._close(connection)
                elif connection.buffer or connection.request is not None:
                    self._refuse(connection, RequestTimeout("the request took too long to arrive"))
                else:
                    self._close(connection)
        if not self._listening:
            self._listen(True)  # when full, the next accept sees whether a newcomer's grace is over
        if self.problem is not None and now > self._accept_again + 5 * ACCEPT_PAUSE_SECONDS:
            log.info("accepting connections again")
            self.problem = None

    def _close(self, connection):
        if self._connections.pop(connection.sock, None) is None:
            return
        connection.closed = True
        self._idle.pop(connection.sock, None)
        self._fresh.pop(connection.sock, None)
        self._reading.pop(connection.sock, None)
        if connection.busy:
            connection.busy = False
            self._busy -= 1
        self._release(connection)
        if connection.limited:
            self._per_address.disconnected(connection.peer)
        if self._holding is not None:
            self._holding(len(self._connections))
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
        self.listener.close()
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()

    # -- the worker threads, for requests the application does not take in the loop -------

    def _work(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            connection, request, environ = job
            try:
                answer = self._call_application(environ, request.method)
            except Exception:
                log.exception("error while answering %s", _printable(request.line))
                answer = _INTERNAL_ERROR
            self._respond(connection, request, *answer)

    def _call_application(self, environ, method):
        """Run the WSGI application (PEP 3333) for one request: (status, headers, body)."""
        answer = []
        written = []

        def start_response(status, headers, exc_info=None):
            if exc_info is not None:
                exc_info = None  # nothing is sent before the application returns: the new answer wins
            elif answer:
                raise AssertionError("start_response called a second time without exc_info")
            answer[:] = [status, headers]
            return written.append

        chunks = self.app(environ, start_response)
        try:
            for chunk in chunks:
                written.append(chunk)
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
            "REQUEST_METHOD": request.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": path,
            "QUERY_STRING": request.query,
            "SERVER_NAME": host,
            "SERVER_PORT": str(port),
            "SERVER_PROTOCOL": request.version,
            "REMOTE_ADDR": connection.peer,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https" if self._tls else "http",
            "wsgi.input": io.BytesIO(request.body),
            "wsgi.errors": self.log,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "pycolytics.server_problem": self.problem,
        }
        names = self._cgi_names
        for name, value in request.headers.items():
            key = names.get(name)
            if key is None:
                key = _cgi_name(name)
                if len(names) < 256:  # the headers clients send are few: remember their names
                    names[name] = key
            if key:
                environ[key] = value
        return environ

    def _log(self, connection, request, status, length):
        client = client_address(connection.peer, request.headers.get("x-forwarded-for"), self.config.trusted_proxies)
        when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime())
        try:
            self.log.write(f'{_printable(client)} - - [{when}] "{_printable(request.line)}" {status[:3]} {length}\n')
        except (OSError, ValueError):
            pass  # stderr is broken; serve() logs through a LogSink, which never raises


###############################################################################
# The command line
###############################################################################


def serve(config, load=None, listener=None, scoreboard=None):
    """Run the built-in server until SIGTERM or SIGINT; return the exit status.

    `load` makes a fresh Config; SIGHUP calls it and puts the result in force, or keeps the
    configuration in force if the new one is bad. With `workers` above 1, the processes of a
    Supervisor serve instead; each of them calls this with the `listener` its parent bound and
    its seat on the `scoreboard` they share (which says its worker number), and leaves telling
    systemd and the log about the whole server to it.
    """
    if config.workers > 1 and listener is None:
        return Supervisor(config, load).run()
    try:
        app = Pycolytics(config, scoreboard)
        app.open()
    except ConfigError:
        raise
    except Exception as error:  # the database's own errors, whichever it is
        log.error("cannot open the database %s: %s", _redacted(config.database), error)
        return 1
    try:
        server = Server(app, config, reload=lambda: _reload(app, server, load), listener=listener,
                        open_connections=scoreboard)
    except ConfigError:
        app.close()
        raise
    except OSError as error:
        log.error("cannot serve on %s:%s: %s", config.host, config.port, error)
        app.close()
        return 1
    server.log = sink = _log_to_sink()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, server.shutdown)
    if load is not None and hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, server.request_reload)
    if scoreboard is None:
        _warn_about_keys(config)
        log.info("Pycolytics %s listening on %s (database: %s)", __version__, server.url, _redacted(config.database))
        notify_systemd("READY=1")
    else:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED_SIGNALS)  # blocked since the fork, now handled
        scoreboard.serving()
        log.info("worker %d (pid %d) serving", scoreboard.worker, os.getpid())
    try:
        server.serve_forever()
    finally:
        if scoreboard is None:
            notify_systemd("STOPPING=1")
        app.close()
    log.info("%sstopped; every acknowledged event is committed",
             "" if scoreboard is None else f"worker {scoreboard.worker}: ")
    sink.drain()
    return 0


###############################################################################
# Worker processes: workers = N
###############################################################################

# What the parent passes on to its workers; blocked across a fork, so that a worker hears
# them only once it has its own handlers.
_FORWARDED_SIGNALS = frozenset(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


def _worker_config(config, workers):
    """A worker's share of `config`: max_connections is divided between the workers, so that
    together they hold no more than configured. The other limits are each worker's own, but for
    max_connections_per_address and rate_limit, which the Scoreboard counts for all of them."""
    share = copy_module.copy(config)
    share.max_connections = max(1, config.max_connections // workers)
    return share


class ProcessLock:
    """A lock that the worker processes of one Supervisor take in turn (and each one's threads).

    A POSIX record lock (fcntl.lockf) on a nameless file the parent opened: record locks belong to
    a process, not to the file descriptor a fork shares, and the kernel releases them when the
    process dies, so a worker killed while it holds the lock never leaves the others locked out.
    Since the lock is the process's, its threads take turns on a threading.Lock first.
    """

    def __init__(self):
        import fcntl  # here: only a server with worker processes needs it (and only POSIX has it)
        import tempfile

        self._file = tempfile.TemporaryFile()
        self._lockf, self._exclusive, self._unlock = fcntl.lockf, fcntl.LOCK_EX, fcntl.LOCK_UN
        self._threads = threading.Lock()

    def __enter__(self):
        self._threads.acquire()
        try:
            self._lockf(self._file, self._exclusive)
        except BaseException:
            self._threads.release()
            raise
        return self

    def __exit__(self, *_exception):
        try:
            self._lockf(self._file, self._unlock)
        finally:
            self._threads.release()


def _shared_bytes(size):
    """`size` bytes, all 0, in memory that the processes forked afterwards share."""
    import mmap  # here: only a server with worker processes needs it

    return mmap.mmap(-1, size)


def _shared_integers(count):
    """`count` 8-byte integers, all 0, in memory that the processes forked afterwards share."""
    return memoryview(_shared_bytes(8 * count)).cast("q")


class AddressCounts:
    """Counts by client address that every worker process reads and changes, under a ProcessLock:
    requests per rate-limit window, or open connections per worker.

    A fixed table of [hash, tag, count] entries in shared memory, where the tag is the window or
    the worker. An address's hash picks a set of `ways` entries and a lookup reads that set only.
    Python's hash of a str is the same in every worker (they are forks of one interpreter), and
    two addresses with one 64-bit hash in one set are too unlikely to matter.
    """

    def __init__(self, sets, ways):
        self._sets, self._ways = sets, ways
        self._entries = _shared_integers(3 * ways * sets)
        self._lock = ProcessLock()

    def _set(self, address):
        """The hash of `address`, and where the entries of its set begin."""
        key = hash(address)
        start = key % self._sets * 3 * self._ways
        return key, range(start, start + 3 * self._ways, 3)

    def count(self, address, window):
        """Count one request from `address` in rate-limit `window`: how many it has sent in it.

        An address that finds its set full of others' requests in this window is not counted (0),
        as one process's RateLimiter forgets every address once it tracks MAX_TRACKED_CLIENTS:
        the limit holds a few heavy senders back, not a crowd of addresses.
        """
        key, entries = self._set(address)
        table = self._entries
        with self._lock:
            room = None
            for at in entries:
                if table[at] == key and table[at + 1] == window:
                    table[at + 2] += 1
                    return table[at + 2]
                if room is None and (table[at + 1] != window or not table[at + 2]):
                    room = at  # another window's count, over now, or never used
            if room is None:
                return 0
            table[room], table[room + 1], table[room + 2] = key, window, 1
            return 1

    def connected(self, address, worker, limit):
        """Count a connection from `address` to `worker`, unless it holds `limit` to them all; whether counted."""
        key, entries = self._set(address)
        table = self._entries
        with self._lock:
            held, mine, room = 0, None, None
            for at in entries:
                if table[at] == key:
                    held += table[at + 2]
                    if table[at + 1] == worker:
                        mine = at
                elif room is None and not table[at + 2]:
                    room = at
            at = room if mine is None else mine
            if held >= limit or at is None:  # None: its set is full of others' (see Scoreboard for how rare)
                return False
            table[at], table[at + 1] = key, worker
            table[at + 2] += 1
            return True

    def disconnected(self, address, worker):
        key, entries = self._set(address)
        table = self._entries
        with self._lock:
            for at in entries:
                if table[at] == key and table[at + 1] == worker and table[at + 2]:
                    table[at + 2] -= 1
                    return

    def forget(self, worker):
        """Drop every count of `worker`, which died: its connections died with it."""
        table = self._entries
        with self._lock:
            for at in range(0, len(table), 3):
                if table[at + 1] == worker:
                    table[at + 2] = 0


class Scoreboard:
    """What the processes of `workers = N` share, so that the server answers as one (Apache
    httpd's scoreboard is the same idea). Made by the Supervisor before it forks them:

    - each worker's row of Metrics, and the shared writer's, which every worker's /metrics adds
      up. A process writes only its own row, and an aligned 8-byte integer is written whole, so
      readers need no lock. The process that replaces one that died counts on in its row:
      counters never go down.
    - what each worker does, for /healthz: its pid while it serves, 0 before it first does,
      -1 once it died (until its replacement serves); and whether its last write failed. The
      same for the shared writer, with why its last write failed.
    - the counts behind rate_limit and max_connections_per_address (AddressCounts), so each
      limit is the whole server's, whichever worker a client's connections reach; and how many
      connections each worker holds, so that newcomers go to the one with fewest.
    - on SQLite, `writer_address`: where the shared writer takes the workers' rows (set by the
      Supervisor; None on PostgreSQL, where each worker writes, as separate collectors do).

    In a worker, seat(number) is the same scoreboard with `worker` set to its number; the shared
    writer's seat is number 0.
    """

    def __init__(self, config):
        workers = config.workers
        self.worker = self.row = None  # a seat's
        memory = _shared_integers((workers + 1) * (Metrics.WIDTH + 1) + workers)
        self.rows = [memory[n * Metrics.WIDTH:(n + 1) * Metrics.WIDTH] for n in range(workers + 1)]
        self.states = memory[(workers + 1) * Metrics.WIDTH:(workers + 1) * (Metrics.WIDTH + 1)]  # the writer's last
        self.held = memory[(workers + 1) * (Metrics.WIDTH + 1):]  # each worker's open connections
        self.requests = AddressCounts(MAX_TRACKED_CLIENTS // ADDRESS_SET_ENTRIES, ADDRESS_SET_ENTRIES)
        # A set per connection the server may hold, each with room for one address in every worker
        # and ADDRESS_SET_ENTRIES more: for a set to be full, more than that many of the
        # connections open at once would have to hash into the same one of max_connections sets.
        self.connections = AddressCounts(config.max_connections, ADDRESS_SET_ENTRIES + workers)
        self.writer_address = None
        self._problem = _shared_bytes(WRITER_PROBLEM_BYTES)

    def seat(self, number):
        seat = copy_module.copy(self)
        seat.worker = number
        seat.row = self.rows[number - 1] if number else self.rows[-1]
        return seat

    def serving(self):
        self.states[self.worker - 1 if self.worker else -1] = os.getpid()

    def gone(self, number):
        """Worker `number`, or the shared writer (0), died (the Supervisor, once it reaped it)."""
        if number == 0:
            self.states[-1] = -1
            return
        self.states[number - 1] = -1
        self.held[number - 1] = 0
        self.connections.forget(number)

    def workers(self):
        """What each worker does, by number: /healthz shows it."""
        said = {}
        for number, (state, row) in enumerate(zip(self.states[:-1], self.rows), 1):
            if state > 0:
                said[str(number)] = "serving; its last write failed" if row[Metrics.FAILING] else "serving"
            else:
                said[str(number)] = "starting" if state == 0 else "died; being replaced"
        return said

    def failing(self):
        """The numbers of the serving workers whose last write failed."""
        return [number for number, (state, row) in enumerate(zip(self.states[:-1], self.rows), 1)
                if state > 0 and row[Metrics.FAILING]]

    def writer_state(self):
        """What the shared writer does: /healthz shows it."""
        state = self.states[-1]
        if state > 0:
            return "its last write failed" if self.rows[-1][Metrics.FAILING] else "writing"
        return "starting" if state == 0 else "died; being replaced"

    def writer_problem(self):
        """Why the shared writer's last write failed, or None if it did not (or it is not running)."""
        if self.states[-1] <= 0 or not self.rows[-1][Metrics.FAILING]:
            return None
        size = int.from_bytes(self._problem[:2], "big")
        return bytes(self._problem[2:2 + size]).decode("utf-8", "replace") or "(its log says why)"

    def writer_failed(self, problem):
        """The shared writer's own: say why its last write failed (before its row says that it did)."""
        text = problem.encode("utf-8")[:WRITER_PROBLEM_BYTES - 2]
        self._problem[2:2 + len(text)] = text
        self._problem[:2] = len(text).to_bytes(2, "big")

    def holding(self, count):
        """This worker holds `count` open connections now."""
        self.held[self.worker - 1] = count

    def crowded(self):
        """Whether another serving worker holds fewer connections than this one (so it takes the next)."""
        mine = self.held[self.worker - 1]
        return any(state > 0 and held < mine for state, held in zip(self.states[:-1], self.held))

    def connected(self, address, limit):
        """As OpenConnections.connected, for the whole server."""
        return self.connections.connected(address, self.worker, limit)

    def disconnected(self, address):
        self.connections.disconnected(address, self.worker)


# -- The shared writer: workers = N on SQLite --------------------------------------------------------
#
# SQLite commits one transaction at a time, and with synchronous = full each one waits for an
# fsync: writers in every worker would take turns, each fsync serving one worker's requests.
# So one process writes for all of them, as the Writer thread does for one process: every
# worker's rows that arrive while a commit runs go into the next one, under one fsync. The
# workers reach it over a Unix socket in a folder only the server's user may enter, with
# messages of a 4-byte length and marshal's encoding of (number, rows) one way and
# (number, None or (detail, retry_after)) back. (marshal is for trusted data only: whoever may
# connect to that socket runs as the server's user, and could write the database file itself.)


def _message(content):
    data = marshal.dumps(content)
    return len(data).to_bytes(4, "big") + data


def _messages(buffer, largest):
    """The whole messages at the start of `buffer` (a bytearray), taken out of it; ValueError if
    one is not a pair or announces over `largest` bytes (then the connection is no good)."""
    found = []
    while len(buffer) >= 4:
        end = 4 + int.from_bytes(buffer[:4], "big")
        if end > largest:
            raise ValueError(f"a message of {end} bytes")
        if len(buffer) < end:
            break
        try:
            message = marshal.loads(memoryview(buffer)[4:end])
        except (EOFError, TypeError) as error:
            raise ValueError(str(error)) from None
        if type(message) is not tuple or len(message) != 2:
            raise ValueError("not a pair")
        found.append(message)
        del buffer[:end]
    return found


class RemoteWriter(Writer):
    """A worker's Writer when another process writes: submit() queues the rows for a thread that
    sends them to the database writer, and committed(error) is called when it answers. The event
    loop never waits for that process: what it has not taken yet is bounded by max_buffered_bytes
    (beyond, 503 at once). Whatever was sent to a writer that went away unanswered gets 503, never
    a 204: it may or may not be stored, and a retry with its event_id is safe either way."""

    def __init__(self, config, store, metrics, scoreboard):
        super().__init__(config, store, metrics)
        self._scoreboard = scoreboard
        self._sock = None
        self._unanswered = {}  # message number: (committed, when it was queued)
        self._numbers = itertools.count()
        self._send_lock = threading.Lock()
        self._outbox, self._outbox_bytes = [], 0  # messages not handed to the socket yet
        self._outbox_filled = threading.Condition(self._send_lock)
        self._sending = False  # while the sender thread waits for the socket to take some
        self._at_once = None  # the socket again, never waiting: for what it takes at once

    def start(self):
        """Nothing to open: the shared writer holds the database."""

    def submit(self, rows, committed):
        with self._send_lock:
            if self._closed:
                raise ServiceUnavailable("the server is shutting down; send the events again shortly", 5)
            if self._sock is None:
                self._connect()
            number = next(self._numbers)
            message = _message((number, rows))
            if self._outbox and self._outbox_bytes + len(message) > self.config.max_buffered_bytes:
                raise ServiceUnavailable("the database writer is not keeping up; send the events again shortly")
            self._unanswered[number] = committed, time.monotonic()
            if not self._outbox and not self._sending:  # mostly the socket takes it all, with no thread woken
                try:
                    message = message[self._at_once.send(message):]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:  # the writer went away: the sender thread finds out and says so
                    pass
                if not message:
                    return
            self._outbox.append(message)
            self._outbox_bytes += len(message)
            self._outbox_filled.notify()

    def _connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(WRITER_TIMEOUT)
        try:
            sock.connect(self._scoreboard.writer_address)
        except OSError:
            sock.close()
            raise ServiceUnavailable("the database writer is starting; send the events again shortly") from None
        self._sock = sock
        self._at_once = sock.dup()
        self._at_once.setblocking(False)
        threading.Thread(target=self._send, args=(sock,), name="pycolytics-sender", daemon=True).start()
        threading.Thread(target=self._read_answers, args=(sock,), name="pycolytics-answers", daemon=True).start()

    def _send(self, sock):
        """The sender thread of one connection: hands queued messages to the socket, which may wait."""
        while True:
            with self._send_lock:
                while not self._outbox and self._sock is sock:
                    self._outbox_filled.wait()
                if self._sock is not sock:
                    return
                data = b"".join(self._outbox)
                self._outbox, self._outbox_bytes, self._sending = [], 0, True
            try:
                sock.sendall(data)
            except OSError as error:
                log.error("the database writer does not take events (%s); connecting again", error)
                with self._send_lock:
                    self._lost(sock)
                return
            finally:
                self._sending = False

    def _read_answers(self, sock):
        buffer = bytearray()
        while True:
            try:
                data = sock.recv(RECV_BYTES)
            except socket.timeout:  # nothing answered for a while: nothing due, or a writer stuck
                if not self._overdue():
                    continue
                log.error("the database writer has not answered for %d s; connecting again", self._patience)
                data = b""
            except OSError:
                data = b""
            if not data:
                break
            buffer += data
            try:
                answers = _messages(buffer, RECV_BYTES)
            except ValueError as error:
                log.error("the database writer's answer is garbled (%s); connecting again", error)
                break
            for number, error in answers:
                committed, _ = self._unanswered.pop(number, (None, None))
                if committed is not None:
                    if error is None:
                        self._wrote_at = time.monotonic()
                    committed(None if error is None else ServiceUnavailable(*error))
        with self._send_lock:
            self._lost(sock)

    def _lost(self, sock):
        """The shared writer went away (or stopped reading): what it did not answer gets 503."""
        sock.close()
        if self._sock is not sock:
            return
        self._sock = None
        self._at_once.close()
        self._outbox, self._outbox_bytes = [], 0
        self._outbox_filled.notify_all()  # its sender thread ends
        unanswered, self._unanswered = self._unanswered, {}
        error = ServiceUnavailable("the database writer did not answer (it went away, or hangs); "
                                 "send the events again shortly")
        for committed, _ in unanswered.values():
            committed(error)

    def _overdue(self):
        """Whether an answer is due for longer than a commit may take (a writer that died, or
        whose replacement cannot open the database, leaves the workers' messages in its socket)."""
        return self._silent_for() > self._patience

    def _silent_for(self):
        """Seconds since the oldest message still unanswered was queued (0 if none is)."""
        queued = [when for _, when in list(self._unanswered.values())]
        return time.monotonic() - min(queued) if queued else 0.0

    def close(self):
        """Wait for the answers still due (the server has drained), then disconnect."""
        with self._send_lock:
            self._closed = True
        deadline = time.monotonic() + self._patience
        while self._unanswered and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._send_lock:
            if self._sock is not None:
                self._lost(self._sock)

    def prune_soon(self):
        """The shared writer prunes: it reloads on SIGHUP too."""

    def health(self):
        problem = self._scoreboard.writer_problem()
        if problem is not None:
            return f"the last write failed: {problem}"
        if self._scoreboard.states[-1] <= 0:
            return "the database writer is not running yet (starting, or being replaced)"
        silent = self._silent_for()
        if silent > WRITER_SILENT_SECONDS:
            return f"the database writer has not answered for {silent:.0f} s"
        return super().health()


class SharedWriter(Writer):
    """The Writer of the writer process, which tells every worker why its last write failed."""

    def __init__(self, config, store, metrics, scoreboard):
        super().__init__(config, store, metrics)
        self._scoreboard = scoreboard

    def _failed(self, error):
        self._scoreboard.writer_failed(self.store.describe(error))
        super()._failed(error)


class _WorkerLink:
    """The shared writer's end of one worker's connection."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = bytearray()
        self.lock = threading.Lock()  # answers come from the writer thread
        self._at_once = sock.dup()  # for answers, which never wait: a few bytes each
        self._at_once.setblocking(False)

    def answer(self, number, error):
        """Tell the worker how its message `number` went. A worker whose socket cannot take a few
        bytes more has stopped reading (hung): it is hung up on rather than waited for, since
        every worker's commits would wait with it (its events get 503 when it reads again)."""
        content = None if error is None else (error.detail, int(dict(error.headers).get("Retry-After", 1)))
        message = _message((number, content))
        with self.lock:
            try:
                if self._at_once.send(message) == len(message):
                    return
            except OSError:  # the worker died, or stopped reading: its clients got no 204
                pass
            self.hang_up()

    def hang_up(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # the loop reads the end of it, and closes it
        except OSError:
            pass

    def close(self):
        with self.lock:
            self.sock.close()
            self._at_once.close()


def write_for_workers(config, load, scoreboard, listener):
    """The shared writer's process: commit what the workers send until SIGTERM; the exit status."""
    stopping, reloading = [], []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    signal.signal(signal.SIGHUP, lambda *_: reloading.append(True))
    wake_reader, wake_writer = socket.socketpair()
    wake_writer.setblocking(False)
    signal.set_wakeup_fd(wake_writer.fileno())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED_SIGNALS)
    sink = _log_to_sink()
    writer = SharedWriter(config, store_for(config), Metrics(scoreboard.rows, scoreboard.row), scoreboard)
    try:
        writer.start()
    except Exception as error:  # the database's own errors, whichever it is
        log.error("the database writer cannot open the database %s: %s", _redacted(config.database), error)
        return 1
    scoreboard.serving()
    log.info("the database writer (pid %d) writes for the workers", os.getpid())
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_reader, selectors.EVENT_READ)
    links = {}
    while not stopping:
        for key, _ in selector.select(1.0):
            if key.fileobj is wake_reader:
                wake_reader.recv(4096)
            elif key.fileobj is listener:
                _welcome_worker(listener, selector, links)
            else:
                _take_rows(links[key.fileobj], writer, selector, links)
        if reloading:
            reloading.clear()
            _reload_writer(writer, load)
    writer.close()  # the workers have stopped: what they sent last is committed now
    for link in links.values():
        link.close()
    log.info("the database writer stopped; every acknowledged event is committed")
    sink.drain()
    return 0


def _welcome_worker(listener, selector, links):
    try:
        sock, _ = listener.accept()
    except OSError:
        return
    sock.settimeout(WRITER_TIMEOUT)
    links[sock] = _WorkerLink(sock)
    selector.register(sock, selectors.EVENT_READ)


def _take_rows(link, writer, selector, links):
    """Read what a worker sent; hand each whole message's rows to the writer."""
    try:
        data = link.sock.recv(RECV_BYTES)
    except (socket.timeout, OSError):
        data = b""
    if not data:  # the worker is gone: half a message of its stays unstored, and unanswered
        selector.unregister(link.sock)
        del links[link.sock]
        link.close()
        return
    link.buffer += data
    try:
        messages = _messages(link.buffer, 2 * writer.config.max_buffered_bytes + RECV_BYTES)
    except ValueError as error:  # only a worker connects, but not every bug may stop the writer
        log.error("a worker's message is garbled (%s): its connection is closed", error)
        messages = []
        link.hang_up()
    for number, rows in messages:
        try:
            writer.submit(rows, functools.partial(link.answer, number))
        except ServiceUnavailable as error:
            link.answer(number, error)


def _reload_writer(writer, load):
    """SIGHUP: the settings a writer uses (retention_days, max_pending_events, ...) from the new
    configuration; a bad one changes nothing (the Supervisor has said so)."""
    if load is None:
        return
    try:
        config = load()
    except ConfigError:
        return
    _restart_only_changes(config, writer.config)
    writer.config = config
    if config.retention_days:
        writer.prune_soon()


def _load_worker_config(load, workers):
    return _worker_config(load(), workers)


class Supervisor:
    """The parent of the worker processes of `workers = N`, which does not serve.

    It binds the listening socket, then forks N workers that each serve it with their own
    loop and threads; the kernel gives each new connection to one of them. On SQLite it first
    forks the database writer (number 0), which commits what every worker sends it; on
    PostgreSQL each worker writes, as separate collectors do. They share a Scoreboard: metrics,
    health and limits of the whole server. The parent passes SIGTERM and SIGINT on (each worker
    drains, then the writer commits what they sent last) and SIGHUP (each reloads), replaces a
    process that dies (WORKER_RESTARTS_PER_MINUTE at most), and exits 0 only when every one has
    drained and exited 0. It never starts a thread, so forking stays safe, and it writes its
    few log lines to stderr itself.
    """

    def __init__(self, config, load):
        self.config = config
        self.load = load
        self.listener = None
        self._writes = None  # on SQLite: the Unix socket where the shared writer (number 0) takes rows
        self._children = {}  # pid: worker number
        self._vacant = collections.deque()  # numbers of the workers to replace
        self._replaced = collections.deque()  # when replacements started, for the last minute
        self._held_back = False
        self._stopping = False
        self._reload_requested = False
        self._failed = False
        self._wake_reader = self._wake_writer = None
        self.scoreboard = Scoreboard(config)

    def run(self):
        tls_context(self.config)  # a certificate that cannot work stops start-up here, with exit status 2
        try:
            app = Pycolytics(self.config)
            app.open()  # once here, so a database that cannot be opened stops start-up, not N workers
            app.close()
        except Exception as error:  # the database's own errors, whichever it is
            log.error("cannot open the database %s: %s", _redacted(self.config.database), error)
            return 1
        try:
            self.listener = listening_socket(self.config.host, self.config.port)
        except OSError as error:
            log.error("cannot serve on %s:%s: %s", self.config.host, self.config.port, error)
            return 1
        if "://" not in self.config.database:
            try:
                self._writes = _writer_socket()
            except OSError as error:
                log.error("cannot make the socket of the database writer: %s", error)
                self.listener.close()
                return 1
            self.scoreboard.writer_address = self._writes.getsockname()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_writer.setblocking(False)  # as set_wakeup_fd needs
        handlers = {signal.SIGTERM: self._stop, signal.SIGINT: self._stop, signal.SIGCHLD: self._child_exited,
                    signal.SIGHUP: self._request_reload if self.load is not None else signal.SIG_IGN}
        before = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
        signal.set_wakeup_fd(self._wake_writer.fileno())
        try:
            for number in range(0 if self._writes else 1, self.config.workers + 1):
                self._start(number)
            _warn_about_keys(self.config)
            host, port = self.listener.getsockname()[:2]
            log.info("Pycolytics %s listening on %s://%s:%s (database: %s) in %d worker processes", __version__,
                     "https" if self.config.certfile else "http", f"[{host}]" if ":" in host else host, port,
                     _redacted(self.config.database), self.config.workers)
            notify_systemd("READY=1")
            return self._supervise()
        finally:
            signal.set_wakeup_fd(-1)
            for signum, handler in before.items():
                signal.signal(signum, handler)
            for sock in (self.listener, self._wake_reader, self._wake_writer):
                sock.close()
            if self._writes is not None:
                _remove_writer_socket(self._writes)

    def _stop(self, *_signal_args):
        self._stopping = True

    def _request_reload(self, *_signal_args):
        self._reload_requested = True

    def _child_exited(self, *_signal_args):
        pass  # the wake-up fd has woken the loop, which reaps

    def _start(self, number):
        """Fork worker `number`; with the forwarded signals blocked until it has its own handlers."""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED_SIGNALS)
        try:
            pid = os.fork()
        except OSError as error:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            log.error("cannot start worker %d: %s", number, error)
            self._vacant.append(number)
            return
        if pid == 0:
            self._work(number)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self._children[pid] = number

    def _work(self, number):
        """The forked worker: serve on the shared socket (or, number 0, write for the workers),
        then leave without running the parent's exit code."""
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until serve() takes it, if it reloads at all
            self._wake_reader.close()
            self._wake_writer.close()
            os.environ.pop("NOTIFY_SOCKET", None)  # systemd hears from the parent, the main process only
            if number == 0:
                self.listener.close()  # the writer takes no connections but the workers'
                status = write_for_workers(self.config, self.load, self.scoreboard.seat(0), self._writes)
                return
            if self._writes is not None:
                self._writes.close()
            workers = self.config.workers
            load = None if self.load is None else functools.partial(_load_worker_config, self.load, workers)
            status = serve(_worker_config(self.config, workers), load, self.listener, self.scoreboard.seat(number))
        except BaseException:  # whatever it is, the parent must see an exit status, not a second parent
            log.exception("worker %d failed", number)
        finally:
            os._exit(status)

    def _supervise(self):
        deadline = None
        while True:
            self._wait(1.0)
            self._reap()
            if self._stopping:
                if deadline is None:
                    deadline = time.monotonic() + self.config.request_timeout + self.config.busy_timeout + 30
                    self._signal_all(signal.SIGTERM, writer=False)  # it commits what the workers still send
                if set(self._children.values()) == {0}:
                    self._signal_all(signal.SIGTERM)
                if not self._children:
                    log.info("stopped; every acknowledged event is committed" if not self._failed else
                             "stopped, but a worker failed; see above")
                    notify_systemd("STOPPING=1")
                    return 1 if self._failed else 0
                if time.monotonic() > deadline:
                    log.error("workers still running after %d s; killing them", self.config.request_timeout
                              + self.config.busy_timeout + 30)
                    self._signal_all(signal.SIGKILL)
                    self._failed = True
                    deadline = math.inf
                continue
            if self._reload_requested:
                self._reload()
            self._replace()

    def _wait(self, timeout):
        """Sleep until a signal arrives (the wake-up fd hears of each) or `timeout` passes."""
        self._wake_reader.settimeout(timeout)
        try:
            self._wake_reader.recv(4096)
        except OSError:  # the timeout
            pass

    def _reap(self):
        while self._children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            number = self._children.pop(pid, None)
            if number is None:
                continue
            self.scoreboard.gone(number)
            code = os.waitstatus_to_exitcode(status)
            how = f"exited with status {code}" if code >= 0 else f"was killed by signal {-code}"
            if self._stopping:
                if code != 0:
                    self._failed = True
                    who = f"worker {number}" if number else "the database writer"
                    log.error("%s (pid %d) %s while stopping", who, pid, how)
            else:
                who = f"worker {number}" if number else "the database writer"
                log.error("%s (pid %d) %s; starting another", who, pid, how)
                self._vacant.append(number)

    def _replace(self):
        now = time.monotonic()
        while self._replaced and self._replaced[0] < now - 60:
            self._replaced.popleft()
        while self._vacant:
            if len(self._replaced) >= WORKER_RESTARTS_PER_MINUTE:
                if not self._held_back:
                    log.error("%d workers replaced in the last minute; the next waits until that is fewer",
                              len(self._replaced))
                    self._held_back = True
                return
            self._held_back = False
            self._replaced.append(now)
            self._start(self._vacant.popleft())

    def _reload(self):
        """Check the new configuration, keep it for the workers started later, and pass SIGHUP on:
        each worker reloads and logs what changed (a bad configuration is only said once, here)."""
        self._reload_requested = False
        notify_systemd(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            config = self.load()
            _restart_only_changes(config, self.config)
            tls_context(config)
        except ConfigError as error:
            log.error("reload failed; the configuration in force stays: %s", error)
        else:
            self.config = config
            self._signal_all(signal.SIGHUP)
        notify_systemd("READY=1")

    def _signal_all(self, signum, writer=True):
        for pid, number in list(self._children.items()):
            if number == 0 and not writer:
                continue
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass  # it has exited; the next reap sees it


def _writer_socket():
    """A listening Unix socket for the shared writer, in a new folder only this user may enter."""
    import tempfile  # here: only a server with worker processes needs it

    folder = tempfile.mkdtemp(prefix="pycolytics-")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.path.join(folder, "writer"))
        sock.listen(MAX_WORKERS)
    except OSError:
        sock.close()
        os.rmdir(folder)
        raise
    sock.setblocking(False)
    return sock


def _remove_writer_socket(sock):
    path = sock.getsockname()
    sock.close()
    try:
        os.unlink(path)
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass


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


def _warn_about_keys(config):
    if config.dev_key_active:
        log.warning("no api_keys are configured: accepting the public development key %r. "
                    "Set api_keys before you ship a game.", DEV_KEY)


def _restart_only_changes(config, in_force):
    """Warnings for what `config` changes that only a restart puts in force; `config` keeps the
    values in force instead, so it says what the server does and the next reload compares with that."""
    warnings = []
    for name in RESTART_SETTINGS:
        if getattr(config, name) != getattr(in_force, name):
            warnings.append(f"{name} changed to {getattr(config, name)!r}; that takes a restart, "
                            f"the server keeps {getattr(in_force, name)!r}")
            setattr(config, name, getattr(in_force, name))
            config.sources[name] = in_force.sources[name]
    if bool(config.certfile) != bool(in_force.certfile):
        now, then = ("HTTPS", "plain HTTP") if in_force.certfile else ("plain HTTP", "HTTPS")
        warnings.append(f"certfile and keyfile switch to {then}; that takes a restart, the server keeps serving {now}")
        for name in ("certfile", "keyfile"):
            setattr(config, name, getattr(in_force, name))
            config.sources[name] = in_force.sources[name]
    return warnings


def _reload(app, server, load):
    """Read the configuration again and put it in force; a bad one changes nothing."""
    notify_systemd(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        config = load()
        warnings = _restart_only_changes(config, app.config)
        tls = tls_context(config)
    except ConfigError as error:
        log.error("reload failed; the configuration in force stays: %s", error)
    else:
        for warning in warnings:
            log.warning("%s", warning)
        app.reconfigure(config)
        server.reconfigure(config, tls)
        if config.retention_days:
            app.writer.prune_soon()
        _warn_about_keys(config)
        log.info("configuration reloaded" + (" except what takes a restart" if warnings else ""))
    notify_systemd("READY=1")


class UsageError(Exception):
    """A command line that cannot work as given (exit status 2); the message says what to change."""


def keygen(arguments, config):
    """Print a new random API key: 32 bytes from the operating system's random source."""
    import secrets  # here: it loads hashlib and OpenSSL, which serving never needs

    print(secrets.token_urlsafe(32))
    return 0


EXPORT_COLUMNS = ("id", "time", "received_at", "event_type", "application", "version", "platform",
                  "user_id", "session_id", "value", "event_id")


def _moment(text, option):
    """A stored-time text from a command line time (ISO 8601 or Unix seconds)."""
    moment = _client_time(float(text) if re.fullmatch(r"-?\d+(\.\d*)?", text) else text)
    if moment is None:
        raise UsageError(f"{option} {text!r} is not a time: give ISO 8601 (2024-05-01, 2024-05-01T12:00Z) or Unix seconds")
    return moment.strftime(TIME_FORMAT)


def _existing_store(config):
    """The store of config.database, which must exist: only the server creates a database, so a
    typo in --database is an error, not a new empty file."""
    store = store_for(config)
    if not store.exists():
        raise UsageError(f"there is no database {os.path.abspath(config.database)}: check --database "
                         "or the configuration's database (only the server creates a database)")
    return store


# What a spreadsheet takes for the start of a formula; OWASP's advice for CSV injection is a
# quote in front: https://owasp.org/www-community/attacks/CSV_Injection
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _inert(cell):
    """A CSV cell that a spreadsheet shows as text instead of running it as a formula."""
    return "'" + cell if isinstance(cell, str) and cell.startswith(_FORMULA_STARTS) else cell


def export(arguments, config):
    """Write events as CSV or JSON lines, row by row: constant memory on any size of database."""
    import csv

    moments = {option: _moment(getattr(arguments, option), f"--{option}")
               for option in ("since", "until") if getattr(arguments, option)}
    if arguments.output and os.path.exists(arguments.output) and not arguments.force:
        raise UsageError(f"{arguments.output} exists; pass --force to overwrite it")
    store = _existing_store(config)
    conditions, parameters = [], []
    if arguments.application is not None:
        conditions.append(f"application = {store.parameter}")
        parameters.append(arguments.application)
    # scan_time: read in id order without the time index, so nothing is sorted in memory
    for option, operator_ in (("since", ">="), ("until", "<")):
        if option in moments:
            conditions.append(f"{store.scan_time} {operator_} {store.since}")
            parameters.append(moments[option])
    connection = store.read()
    present = store.columns(connection)
    texts = {"time": store.time_text, "received_at": store.received_text, "value": store.value_text}
    selected = ", ".join(texts.get(name, name) if name in present else f"NULL AS {name}" for name in EXPORT_COLUMNS)
    where = " WHERE " + " AND ".join(conditions) if conditions else ""
    rows = store.rows(connection, f"SELECT {selected} FROM event{where} ORDER BY id", parameters)
    output = open(arguments.output, "w", encoding="utf-8", newline="") if arguments.output else sys.stdout
    count = 0
    try:
        if arguments.format == "csv":
            writer = csv.writer(output)
            writer.writerow(EXPORT_COLUMNS)
            for row in rows:
                writer.writerow([_inert(cell) for cell in row])
                count += 1
        else:
            value = EXPORT_COLUMNS.index("value")
            for row in rows:
                record = dict(zip(EXPORT_COLUMNS, row))
                record["value"] = json.loads(row[value])
                output.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
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


def _confirmed(question):
    """True if the person at the terminal answers yes; without a terminal, nobody can."""
    if not sys.stdin.isatty():
        return None
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def prune(arguments, config):
    """Delete events older than --before, in small steps that never hold up a running server."""
    before = _moment(arguments.before, "--before")
    store = _existing_store(config)
    connection = store.read()
    try:
        found = connection.execute(f"SELECT count(*) FROM event WHERE time < {store.since}", (before,)).fetchone()[0]
    finally:
        connection.close()
    log.info("%d events are from before %s", found, before)
    if arguments.dry_run or not found:
        return 0
    if not arguments.yes:
        answer = _confirmed(f"Delete {found} events from before {before}?")
        if answer is None:
            raise UsageError(f"this would delete {found} events; pass --yes to delete them without a question "
                             "(standard input is not a terminal to ask on)")
        if not answer:
            log.info("deleted nothing")
            return 1
    connection = store.connect()
    deleted = 0
    try:
        while True:
            step = store.prune(connection, before)
            deleted += step
            if step < PRUNE_STEP_ROWS and store.forget(connection, before) < SUMMARY_STEP_ROWS:
                break
            time.sleep(0.01)  # let the server's writer in between steps
    finally:
        connection.close()
    log.info("deleted %d events from before %s", deleted, before)
    return 0


def backup(arguments, config):
    """A consistent copy of the database, taken with SQLite's online backup while the server runs."""
    if isinstance(_existing_store(config), PostgresStore):
        raise UsageError("backup copies an SQLite database; for PostgreSQL use its own tools (pg_dump)")
    target = arguments.file
    if os.path.exists(target) and not arguments.force:
        raise UsageError(f"{target} exists; pass --force to overwrite it")
    partial = target + ".partial"
    source = read_only(config.database)
    try:
        copy = sqlite3.connect(partial)
        try:
            # a few MB a step, so a running server's writer is never locked out for long
            source.backup(copy, pages=1024, sleep=0.005)
        finally:
            copy.close()
    finally:
        source.close()
    os.replace(partial, target)
    log.info("backed up %s to %s", config.database, target)
    return 0


# Events one step of `copy` moves, in one PostgreSQL transaction with its progress mark.
COPY_STEP_ROWS = 5000
# `copy` knows a source database by an id kept inside it (made by its first copy, in a table
# of its own), not by its path: a moved database resumes, another one at the same path is new.
COPY_IDENTITY = "CREATE TABLE IF NOT EXISTS pycolytics_identity (id VARCHAR NOT NULL)"
# In the target, how far each source has been copied (its highest copied row id).
COPY_PROGRESS = "CREATE TABLE IF NOT EXISTS pycolytics_copied (source VARCHAR PRIMARY KEY, last_id BIGINT NOT NULL)"


def _identity(path, busy_timeout):
    """The id of the SQLite database at `path`, made and stored in it if it has none yet."""
    reader = read_only(path)
    try:
        if reader.execute("SELECT 1 FROM sqlite_master WHERE name = 'pycolytics_identity'").fetchone():
            found = reader.execute("SELECT id FROM pycolytics_identity").fetchone()
            if found:
                return found[0]
    finally:
        reader.close()
    uri = "file:" + urllib_quote(os.path.abspath(path)) + "?mode=rw"
    writer = sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None)
    try:
        with transaction(writer):  # IMMEDIATE: two copies starting together make one id
            writer.execute(COPY_IDENTITY)
            found = writer.execute("SELECT id FROM pycolytics_identity").fetchone()
            if not found:
                found = (os.urandom(16).hex(),)
                writer.execute("INSERT INTO pycolytics_identity (id) VALUES (?)", found)
    finally:
        writer.close()
    return found[0]


def copy_events(arguments, config):
    """Move an SQLite database's events into PostgreSQL. Run again, it resumes where it stopped
    and copies each event once, wherever the database lies now: progress is committed with
    every step, in the target, under the id the source keeps."""
    if not isinstance(_existing_store(config), SQLiteStore):
        raise UsageError("copy reads an SQLite database: name it with --database FILE")
    target_config = copy_module.copy(config)
    target_config.database = arguments.to
    target = store_for(target_config)
    if not isinstance(target, PostgresStore):
        raise UsageError(f"--to {arguments.to!r} is not a postgresql:// URL")
    origin = _identity(config.database, config.busy_timeout)
    source = read_only(config.database)
    destination = target.connect()
    copied = seen = 0
    try:
        with destination.transaction():
            destination.execute(COPY_PROGRESS)
        mark = destination.execute("SELECT last_id FROM pycolytics_copied WHERE source = %s", (origin,)).fetchone()
        last = mark[0] if mark else 0
        present = _columns(source)
        optional = ", ".join(name if name in present else f"NULL AS {name}" for name, _ in ADDED_COLUMNS)
        while True:
            rows = source.execute(
                "SELECT id, event_type, application, version, platform, user_id, session_id, value, time,"
                f" {optional} FROM event WHERE id > ? ORDER BY id LIMIT ?", (last, COPY_STEP_ROWS)
            ).fetchall()
            if not rows:
                break
            last = rows[-1][0]
            with destination.transaction():
                with destination.cursor() as cursor:
                    cursor.executemany(POSTGRES_INSERT, [row[1:] for row in rows])
                    copied += max(0, cursor.rowcount)
                destination.execute(
                    "INSERT INTO pycolytics_copied (source, last_id) VALUES (%s, %s)"
                    " ON CONFLICT (source) DO UPDATE SET last_id = excluded.last_id", (origin, last))
            seen += len(rows)
    finally:
        source.close()
        destination.close()
    log.info("copied %d events of database %s into %s (%d more were there already)",
             copied, origin, _redacted(arguments.to), seen - copied)
    return 0


def _global_options(default):
    """The options of every command, accepted before or after the command's name; `default`
    SUPPRESS for a command's copy, so that an option given before the name still counts."""
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


# Each command: (function, one line for the list of commands, a description for its --help).
COMMANDS = {
    "keygen": (keygen, "print a new random API key",
               "Print a new random key, 32 bytes from the operating system's random source, for api_keys or read_keys."),
    "export": (export, "write events as CSV or JSON lines (pandas reads both)",
               "Write events in the order they were stored, as CSV (a header line, then one line an event) or JSON "
               "lines, row by row in constant memory. In CSV, a text cell that starts with = + - @, a tab or a "
               "carriage return gets a ' in front, so that a spreadsheet shows it rather than running it as a "
               "formula; JSON lines hold every value exactly."),
    "prune": (prune, "delete events older than a time, in small steps",
              "Delete the events whose time is before T, 500 at a time so that a running server is never held up. "
              "It says first how many events that is, and asks before deleting them (on a terminal) unless --yes "
              "is given; --dry-run only counts."),
    "backup": (backup, "copy the database consistently, while the server runs",
               "Copy the SQLite database into FILE with SQLite's online backup: consistent even while the server "
               "writes. An existing FILE is replaced only with --force."),
    "copy": (copy_events, "move an SQLite database's events into PostgreSQL (resumable)",
             "Copy the events of the SQLite database (--database FILE) into a PostgreSQL database (--to URL) in "
             "steps of 5000, each committed with its progress in the target: run it again after an interruption "
             "(or for newer events) and it resumes, copying each event once."),
}


def _parser():
    parser = argparse.ArgumentParser(
        prog="pycolytics.py",
        parents=[_global_options(None)],
        description="Collect analytics events over HTTP into an SQLite or PostgreSQL database. With no command, serve.",
        epilog=(
            "The options above work before or after a command (pycolytics.py prune --database events.db ...). "
            "Settings come from, strongest first: these options, PYCOLYTICS_<KEY> environment variables "
            "(and the original Pycolytics' SQLITE_FILE_PATH, API_KEYS and RATE_LIMIT), the ini file, the defaults. "
            "The ini file is --config, else $PYCOLYTICS_CONFIG, else ./pycolytics.ini if present; "
            "pycolytics.ini in the repository documents every key."
        ),
    )
    parser.add_argument("--version", action="version", version=f"pycolytics {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    made = {name: commands.add_parser(name, help=summary, description=description,
                                      parents=[_global_options(argparse.SUPPRESS)])
            for name, (_, summary, description) in COMMANDS.items()}
    exporting = made["export"]
    exporting.add_argument("--format", choices=("csv", "jsonl"), default="csv", help="csv (default) or jsonl")
    exporting.add_argument("--application", metavar="NAME", help="only this application's events")
    exporting.add_argument("--since", metavar="T", help="only events at or after T (ISO 8601 or Unix seconds, UTC)")
    exporting.add_argument("--until", metavar="T", help="only events before T")
    exporting.add_argument("--output", metavar="FILE", help="write to FILE instead of standard output")
    exporting.add_argument("--force", action="store_true", help="overwrite --output FILE if it exists")
    pruning = made["prune"]
    pruning.add_argument("--before", metavar="T", required=True, help="delete events before T (ISO 8601 or Unix seconds)")
    pruning.add_argument("--dry-run", action="store_true", help="only say how many events would be deleted")
    pruning.add_argument("--yes", action="store_true", help="delete without asking (needed when not on a terminal)")
    made["backup"].add_argument("file", metavar="FILE", help="where to write the copy")
    made["backup"].add_argument("--force", action="store_true", help="replace FILE if it exists")
    made["copy"].add_argument("--to", metavar="URL", required=True, help="postgresql://USER@HOST:PORT/DBNAME")
    return parser


def main(argv=None):
    arguments = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    overrides = {name: getattr(arguments, name) for name in ("host", "port", "database", "quiet")}
    load = functools.partial(load_config, arguments.config, overrides=overrides)
    try:
        config = load()
        if arguments.command is None:
            return serve(config, load)
        return COMMANDS[arguments.command][0](arguments, config)
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
