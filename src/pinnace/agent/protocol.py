"""The agent wire protocol: framing shared by the host client and the guest agent.

Standard library only: this file is copied into every guest image next to guest.py.
See docs/agent-protocol.md for the full description.

Every frame is a 12-byte header and a payload::

    magic u16 = 0x504E ('PN') | kind u8 | flags u8 | chan u32 | length u32 | payload

``chan`` is the request id (0 for the connection itself), ``flags`` is the stream
number for DATA, EOF and WINDOW frames. Payloads of the JSON kinds are UTF-8 JSON
objects. No payload may exceed ``MAX_FRAME`` bytes, in either direction.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False  # importing typing costs ~40 ms of guest start-up under TCG
if TYPE_CHECKING:
    from typing import Any

PROTOCOL_VERSION = 1
AGENT_VERSION = "0.4.0"  # 0.2.0: mount.rescan; 0.3.0: unmount; 0.3.1: exec as a user;
# 0.4.0: exec collect (files read back with the exit status)
# takes its groups and HOME; set_hostname names it in /etc/hosts
MAGIC = 0x504E
HEADER = struct.Struct("!HBBII")
MAX_FRAME = 1 << 20
# Bytes a sender may have in flight on one stream before the receiver grants more.
STREAM_WINDOW = 4 << 20
# The host side of the channel: one virtio-serial port per concurrent host connection.
AGENT_PORTS = 8
PORT_NAME = "org.pinnace.agent.{}"

# Features of an operation the WELCOME lists among its capabilities, as "op.feature"
# (the operations themselves are listed by name). mount.rescan: ``mount`` takes
# ``rescan: true`` and probes a volume's disk again first (a clone of a ready template).
MOUNT_RESCAN = "mount.rescan"
FEATURES = (MOUNT_RESCAN,)

# Guest paths a volume or share may not be mounted on: the guest's own system. Both
# sides check: the host when it is asked, the agent because the host is not trusted.
PROTECTED_PATHS = ("/", "/proc", "/sys", "/dev", "/run", "/usr", "/bin", "/sbin", "/lib",
                   "/etc", "/boot", "/usr/lib/pinnace")


def protected_path(path: str) -> bool:
    return path in PROTECTED_PATHS or any(path.startswith(p + "/")
                                          for p in ("/proc", "/sys", "/dev"))

# Frame kinds.
HELLO = 1     # host -> guest, JSON {version, nonce}: starts a session, resets the old one
WELCOME = 2   # guest -> host, JSON {version, agent, nonce, capabilities, max_frame}
REQUEST = 3   # host -> guest, JSON {op, ...}; chan is a fresh request id
EVENT = 4     # guest -> host, JSON: progress of a request (e.g. {"started": pid})
REPLY = 5     # guest -> host, JSON: the request's result; ends the request
ERROR = 6     # guest -> host, JSON {code, message}: the request failed; chan 0: bad frame
DATA = 7      # either way, raw bytes of stream ``flags``
EOF = 8       # either way, stream ``flags`` is finished
WINDOW = 9    # either way, payload u32: the receiver grants that many more bytes on a stream
CONTROL = 10  # host -> guest, JSON for a running request: {"signal": n} or {"resize": [r, c]}

KINDS = frozenset(range(HELLO, CONTROL + 1))
JSON_KINDS = frozenset({HELLO, WELCOME, REQUEST, EVENT, REPLY, ERROR, CONTROL})

STDIN, STDOUT, STDERR = 0, 1, 2
STREAMS = (STDIN, STDOUT, STDERR)
_WINDOW = struct.Struct("!I")


class FrameError(Exception):
    """Bytes that are not a valid frame; ``fatal`` when framing itself is lost."""

    def __init__(self, message: str, *, chan: int = 0, fatal: bool = True) -> None:
        super().__init__(message)
        self.chan = chan
        self.fatal = fatal


class Frame:
    """One decoded frame."""

    __slots__ = ("chan", "flags", "kind", "payload")

    def __init__(self, kind: int, chan: int, flags: int, payload: bytes) -> None:
        self.kind = kind
        self.chan = chan
        self.flags = flags
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frame) and (
            (self.kind, self.chan, self.flags, self.payload)
            == (other.kind, other.chan, other.flags, other.payload))

    def __hash__(self) -> int:
        return hash((self.kind, self.chan, self.flags, self.payload))

    def __repr__(self) -> str:
        return f"Frame(kind={self.kind}, chan={self.chan}, flags={self.flags}, payload={self.payload[:40]!r})"

    def json(self) -> dict[str, Any]:
        """Decode a JSON payload; raise FrameError (not fatal) if it is not a JSON object."""
        try:
            obj = json_loads(self.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise FrameError(f"payload is not JSON: {exc}", chan=self.chan, fatal=False) from None
        if not isinstance(obj, dict):
            raise FrameError("payload is not a JSON object", chan=self.chan, fatal=False)
        return obj

    def window(self) -> int:
        if len(self.payload) != _WINDOW.size:
            raise FrameError("WINDOW payload must be 4 bytes", chan=self.chan, fatal=False)
        return int(_WINDOW.unpack(self.payload)[0])


def encode(kind: int, chan: int = 0, payload: bytes = b"", flags: int = 0) -> bytes:
    if len(payload) > MAX_FRAME:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(MAGIC, kind, flags, chan, len(payload)) + payload


def encode_json(kind: int, chan: int, obj: dict[str, Any]) -> bytes:
    return encode(kind, chan, json_dumps(obj).encode())


# JSON through the C accelerators the json package itself uses, without importing it:
# json imports re (and re enum), ~0.15 s of the agent's start in a cold boot under TCG
# (docs/boot.md). The same results as json.loads and json.dumps(separators=(",", ":")).
_JSON_SPACE = " \t\n\r"
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _DecoderSettings:
    """The attributes _json's scanner reads from a json.JSONDecoder (its defaults)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


def _not_serializable(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


try:
    from _json import encode_basestring_ascii as _c_string
    from _json import make_encoder as _c_encoder
    from _json import make_scanner as _c_scanner
except ImportError:  # not CPython: the json package
    import json as _json_module

    def json_loads(text: str) -> Any:
        try:
            return _json_module.loads(text)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None

    def json_dumps(obj: Any) -> str:
        return _json_module.dumps(obj, separators=(",", ":"))
else:
    _scan = _c_scanner(_DecoderSettings())  # type: ignore[arg-type]

    def json_loads(text: str) -> Any:
        """json.loads of a str (ValueError if it is not one JSON document)."""
        start = len(text) - len(text.lstrip(_JSON_SPACE))
        try:
            obj, end = _scan(text, start)
        except StopIteration as err:
            raise ValueError(f"expecting a JSON value at {err.value}") from None
        except RecursionError:  # nested too deep: from an untrusted peer, a bad frame
            raise ValueError("JSON nested too deeply") from None
        if text[end:].strip(_JSON_SPACE):
            raise ValueError(f"extra data after the JSON value at {end}")
        return obj

    def json_dumps(obj: Any) -> str:
        """json.dumps(obj, separators=(",", ":"))."""
        encoder = _c_encoder({}, _not_serializable, _c_string, None, ":", ",", False, False,
                             True)
        return "".join(encoder(obj, 0))


def encode_window(chan: int, stream: int, credit: int) -> bytes:
    return encode(WINDOW, chan, _WINDOW.pack(credit), stream)


class FrameReader:
    """Incremental decoder: ``feed`` bytes, get whole frames back.

    With ``resync`` (the guest side), bytes that do not start a valid header are
    skipped up to the next magic, so one bad frame does not end the session; the
    first bad header of a run is reported as a non-fatal FrameError through
    ``errors``. Without it (the host side) a bad header raises FrameError.
    """

    def __init__(self, max_frame: int = MAX_FRAME, *, resync: bool = False) -> None:
        self.max_frame = max_frame
        self.resync = resync
        self._buf = bytearray()
        self.errors: list[FrameError] = []
        self._skipping = False

    def reset(self) -> None:
        self._buf.clear()
        self._skipping = False

    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= HEADER.size:
            magic, kind, flags, chan, length = HEADER.unpack_from(buf, pos)
            problem = None
            if magic != MAGIC:
                problem = "bad magic"
            elif kind not in KINDS:
                problem = f"unknown frame kind {kind}"
            elif length > self.max_frame:
                problem = f"frame of {length} bytes exceeds the limit of {self.max_frame}"
            if problem is not None:
                if not self.resync:
                    del buf[:pos]
                    raise FrameError(problem, chan=chan)
                if not self._skipping:
                    self.errors.append(FrameError(problem, chan=0))
                    self._skipping = True
                nxt = buf.find(HEADER.pack(MAGIC, 0, 0, 0, 0)[:2], pos + 1)
                pos = nxt if nxt >= 0 else max(pos + 1, len(buf) - 1)
                continue
            if len(buf) - pos - HEADER.size < length:
                break
            start = pos + HEADER.size
            frames.append(Frame(kind, chan, flags, bytes(buf[start:start + length])))
            pos = start + length
            self._skipping = False
        del buf[:pos]
        return frames
