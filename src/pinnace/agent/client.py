"""The host side of the agent channel: one connection, many requests in flight.

The guest is untrusted. Every frame it sends is checked against the protocol:
sizes are bounded by the header check before anything is buffered, output on a
stream may not exceed the window this client granted, and a frame that breaks
the rules ends the connection with a ProtocolError for every request in flight.
Nothing the guest sends can make the host hold more than a few windows of data.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    AgentDisconnected,
    AgentError,
    AgentTimeout,
    CommandFailed,
    ProtocolError,
    RemoteError,
)
from ..store import MachineFiles, try_lock
from . import protocol as P

log = logging.getLogger(__name__)

CLOCK_SLACK = 1.0  # a guest clock further than this from the host's after set_time is wrong

MAX_EVENTS_PER_REQUEST = 64
CONNECT_RETRY = 0.01


_READERS: set[asyncio.Task[None]] = set()

# Operations the host relies on: an agent that lacks one is refused at the WELCOME.
REQUIRED_OPS = frozenset({"ping", "exec", "info", "poweroff", "set_time", "clock",
                          "set_hostname", "get", "put", "reseed", "set_network", "mount"})

@dataclass
class ExecResult:
    """The outcome of a command run in the guest."""

    argv: list[str]
    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    signal: int | None = None
    timed_out: bool = False
    duration: float = 0.0
    # The files asked for with ``collect``, read when the command ended: per path its
    # size (-1: missing or not a regular file) and its first bytes (at most the agent's
    # COLLECT_BYTES; fewer than the size when cut). None: the agent does not collect.
    collected: list[tuple[int, bytes]] | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    def check(self) -> ExecResult:
        """Return self if the command succeeded, else raise CommandFailed with its last stderr line."""
        if self.ok:
            return self
        lines = self.stderr_text.strip().splitlines()
        detail = " (timed out)" if self.timed_out else ""
        detail += f": {lines[-1][:200]}" if lines else ""
        raise CommandFailed(self, self.argv, self.exit_code, detail)


@dataclass
class _Pending:
    """A request in flight: its frames arrive on ``queue``; ``credit`` is what the guest may send."""

    chan: int
    queue: asyncio.Queue[P.Frame | BaseException] = field(default_factory=asyncio.Queue)
    credit: dict[int, int] = field(default_factory=lambda: {P.STDOUT: P.STREAM_WINDOW,
                                                            P.STDERR: P.STREAM_WINDOW})
    send_credit: int = P.STREAM_WINDOW
    credit_event: asyncio.Event = field(default_factory=asyncio.Event)
    events: int = 0
    done: bool = False


class AgentClient:
    """A session with the guest agent on one virtio-serial port."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 lock_fd: int, port: int, nonce: str) -> None:
        self._reader = reader
        self._writer = writer
        self._lock_fd = lock_fd
        self.port = port
        self.welcome: dict[str, Any] = {}
        self.capabilities: frozenset[str] = frozenset()
        self._nonce = nonce
        self._pending: dict[int, _Pending] = {}
        self._next_chan = 1
        self._closed: BaseException | None = None
        self._frames = P.FrameReader()
        loop = asyncio.get_running_loop()
        self._welcomed: asyncio.Future[None] = loop.create_future()
        self._task = loop.create_task(self._read_loop())
        # The loop holds tasks weakly: a client dropped without close() must still read
        # to the end of its channel, not be destroyed mid-read.
        _READERS.add(self._task)
        self._task.add_done_callback(_READERS.discard)

    # -- connecting ----------------------------------------------------------------------

    @classmethod
    async def connect(cls, files: MachineFiles, *, timeout: float,
                      alive: Callable[[], bool] | None = None) -> AgentClient:
        """Take a free agent port, say HELLO and wait for the guest's WELCOME.

        ``alive`` is polled while waiting so that a dead QEMU fails fast instead of
        running into the timeout.
        """
        deadline = time.monotonic() + timeout
        client = await cls.open(files, timeout=timeout, alive=alive)
        try:
            await client.welcomed(deadline - time.monotonic(), alive=alive)
        except AgentTimeout:
            await client.close()
            raise AgentTimeout("HELLO", timeout) from None  # the whole wait, not what was left
        except BaseException:
            await client.close()
            raise
        return client

    @classmethod
    async def open(cls, files: MachineFiles, *, timeout: float,
                   alive: Callable[[], bool] | None = None) -> AgentClient:
        """Take a free agent port and say HELLO, without waiting for the WELCOME:
        requests may follow at once (the guest reads them after the HELLO), and their
        replies are accepted once the WELCOME has been checked; see ``welcomed``."""
        deadline = time.monotonic() + timeout
        while True:
            for port in range(P.AGENT_PORTS):
                fd = try_lock(files.agent_lock(port))
                if fd is None:
                    continue
                try:
                    reader, writer = await cls._open_port(files, port, deadline, alive,
                                                          timeout)
                    nonce = secrets.token_hex(8)
                    writer.write(P.encode_json(P.HELLO, 0, {"version": P.PROTOCOL_VERSION,
                                                            "nonce": nonce}))
                    return cls(reader, writer, fd, port, nonce)
                except BaseException:
                    os.close(fd)
                    raise
            if time.monotonic() >= deadline:
                raise AgentError(f"all {P.AGENT_PORTS} agent channels of this machine are in use")
            await asyncio.sleep(0.05)

    @staticmethod
    async def _open_port(files: MachineFiles, port: int, deadline: float,
                         alive: Callable[[], bool] | None, timeout: float,
                         ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        path = files.agent_sock(port)
        while True:
            try:
                return await asyncio.open_unix_connection(str(path), limit=P.MAX_FRAME)
            except (FileNotFoundError, ConnectionRefusedError):
                if alive is not None and not alive():
                    raise AgentDisconnected("QEMU is not running") from None
                if time.monotonic() >= deadline:
                    raise AgentTimeout("the connection", timeout) from None
                await asyncio.sleep(CONNECT_RETRY)

    async def welcomed(self, timeout: float, alive: Callable[[], bool] | None = None) -> None:
        """Wait for the guest's WELCOME to this client's HELLO (checked by the read loop)."""
        deadline = time.monotonic() + timeout
        while not self._welcomed.done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentTimeout("HELLO", timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._welcomed), min(left, 0.1))
            if not self._welcomed.done() and alive is not None and not alive():
                raise AgentDisconnected("QEMU exited before the agent answered")
        self._welcomed.result()

    def _on_welcome(self, frame: P.Frame) -> None:
        """A frame before the WELCOME: leftovers of an earlier session are skipped."""
        if frame.kind != P.WELCOME:
            return
        try:
            welcome = frame.json()
        except P.FrameError as exc:
            raise ProtocolError(f"bad WELCOME: {exc}") from None
        if welcome.get("nonce") != self._nonce:
            return
        if welcome.get("version") != P.PROTOCOL_VERSION:
            raise ProtocolError(
                f"agent speaks protocol {welcome.get('version')!r}, host speaks "
                f"{P.PROTOCOL_VERSION}; rebuild the image with this pinnace")
        caps = welcome.get("capabilities")
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise ProtocolError("bad WELCOME: capabilities must be a list of operation names")
        missing = REQUIRED_OPS - set(caps)
        if missing:
            raise ProtocolError(f"the guest agent cannot {', '.join(sorted(missing))}; it is "
                                "from another pinnace: rebuild the image with this one "
                                "('pinnace image build --refresh')")
        self.capabilities = frozenset(caps)
        self.welcome = welcome
        self._welcomed.set_result(None)

    # -- plumbing ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def _read_loop(self) -> None:
        err: BaseException
        try:
            while True:
                data = await self._reader.read(256 << 10)
                if not data:
                    err = AgentDisconnected("the agent channel closed (did the guest stop?)")
                    break
                for frame in self._frames.feed(data):
                    if self._welcomed.done():
                        self._dispatch(frame)
                    else:
                        self._on_welcome(frame)
        except P.FrameError as exc:
            err = ProtocolError(f"the guest broke the agent protocol: {exc}")
        except ProtocolError as exc:
            err = exc
        except (ConnectionError, OSError) as exc:
            err = AgentDisconnected(f"the agent channel failed: {exc}")
        except asyncio.CancelledError:
            err = AgentDisconnected("the agent client was closed")
            self._fail_all(err)
            raise
        self._fail_all(err)

    def _fail_all(self, err: BaseException) -> None:
        if self._closed is None:
            self._closed = err
        if not self._welcomed.done():
            self._welcomed.set_exception(err if isinstance(err, ProtocolError) else
                                         AgentDisconnected(f"before the WELCOME: {err}"))
            self._welcomed.exception()  # retrieved here; welcomed() re-raises it
        for pending in self._pending.values():
            pending.queue.put_nowait(err)
            pending.credit_event.set()
        self._pending.clear()
        self._writer.close()

    def _dispatch(self, frame: P.Frame) -> None:
        if frame.chan == 0:
            if frame.kind == P.ERROR:
                msg = frame.json()
                log.warning("agent reported a connection error: %s", msg.get("message"))
                return
            raise ProtocolError(f"unexpected frame kind {frame.kind} on channel 0")
        pending = self._pending.get(frame.chan)
        if pending is None:
            return  # a request we gave up on; its stragglers are harmless
        kind = frame.kind
        if kind == P.DATA or kind == P.EOF:
            if frame.flags not in pending.credit:
                raise ProtocolError(f"output on unknown stream {frame.flags}")
            if kind == P.DATA:
                pending.credit[frame.flags] -= len(frame.payload)
                if pending.credit[frame.flags] < 0:
                    raise ProtocolError("the guest sent more output than the window allows")
        elif kind == P.WINDOW:
            if frame.flags != P.STDIN:
                raise ProtocolError("WINDOW for a stream the host does not send")
            pending.send_credit += frame.window()
            if pending.send_credit > 1 << 31:
                raise ProtocolError("the guest granted an absurd window")
            pending.credit_event.set()
            return
        elif kind in (P.EVENT,):
            pending.events += 1
            if pending.events > MAX_EVENTS_PER_REQUEST:
                raise ProtocolError("too many events for one request")
            frame.json()  # must be valid JSON; raises FrameError otherwise
        elif kind in (P.REPLY, P.ERROR):
            frame.json()
            pending.done = True
            self._pending.pop(frame.chan, None)
        else:
            raise ProtocolError(f"the guest sent a frame of kind {kind}, which only hosts send")
        pending.queue.put_nowait(frame)

    def _check_open(self) -> None:
        if self._closed is not None:
            raise AgentDisconnected(str(self._closed)) from self._closed

    def _send(self, data: bytes) -> None:
        self._check_open()
        self._writer.write(data)

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise AgentDisconnected(f"the agent channel failed: {exc}") from exc

    def _open(self, op: str, args: dict[str, Any]) -> _Pending:
        self._check_open()
        chan = self._next_chan
        self._next_chan = self._next_chan % 0xFFFFFFFF + 1
        pending = _Pending(chan)
        self._pending[chan] = pending
        self._send(P.encode_json(P.REQUEST, chan, {"op": op, **args}))
        return pending

    def _forget(self, pending: _Pending) -> None:
        self._pending.pop(pending.chan, None)

    @staticmethod
    def _final(frame: P.Frame) -> dict[str, Any]:
        msg = frame.json()
        if frame.kind == P.ERROR:
            raise RemoteError(str(msg.get("code", "error"))[:64], str(msg.get("message", ""))[:4096])
        return msg

    # -- requests ------------------------------------------------------------------------

    async def request(self, op: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        """Send one request and wait for its reply."""
        pending = self._open(op, args)
        try:
            async with asyncio.timeout(timeout):
                await self._drain()
                while True:
                    item = await pending.queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    if item.kind in (P.REPLY, P.ERROR):
                        return self._final(item)
        except TimeoutError:
            raise AgentTimeout(op, timeout) from None
        finally:
            self._forget(pending)

    async def refresh_identity(self, hostname: str | None = None, *,
                               epoch: float | None = None, at: float | None = None) -> None:
        """What a machine restored from saved RAM must not keep: set the guest's clock to
        the host's, give its kernel fresh randomness, and (a clone) its own hostname.
        ``epoch``/``at``: the host's time when the guest resumed and the guest's
        CLOCK_MONOTONIC then (see ``monotonic``), which keeps the clock right however
        long the requests wait. The requests go out together: one round trip."""
        import base64

        async def set_time() -> tuple[Any, float]:
            reply = await self.request("set_time", epoch=time.time() if epoch is None else epoch,
                                       **({} if at is None else {"at": at}))
            return reply.get("time"), time.time()

        (now, host), *_ = await asyncio.gather(
            set_time(),
            self.request("reseed", seed=base64.b64encode(os.urandom(64)).decode()),
            *([self.request("set_hostname", hostname=hostname)] if hostname else []))
        if at is not None and not (isinstance(now, (int, float))
                                   and abs(now - host) < CLOCK_SLACK):
            # The anchor did not hold (a hypervisor whose guest clock ran on while the
            # state was saved, say): set it the plain way, off by one trip at most.
            log.debug("the guest's clock is %s after set_time with an anchor; setting it again",
                      now)
            await self.request("set_time", epoch=time.time())

    async def mount(self, fstype: str, source: str, path: str, *, ro: bool,
                    rescan: bool = False) -> dict[str, Any]:
        """Mount a volume (``ext4``, ``source`` its disk serial) or a shared folder (``9p``,
        its tag) at ``path``. ``rescan``: the guest probes the disk again first (a clone of
        a ready template still sees the template's empty disk in that slot)."""
        args: dict[str, Any] = {"fstype": fstype, "source": source, "path": path, "ro": ro}
        if rescan:
            args["rescan"] = True
        try:
            return await self.request("mount", **args)
        except RemoteError:
            # (sent before the WELCOME, perhaps: an older agent ignores ``rescan``, and
            # fails to mount the empty disk)
            if rescan and P.MOUNT_RESCAN not in self.capabilities:
                raise ProtocolError(
                    "the guest agent cannot probe a volume's disk again after a restore; it "
                    "is from an older pinnace: rebuild the image with this one ('pinnace "
                    "image build --refresh')") from None
            raise

    async def monotonic(self) -> tuple[float, float] | None:
        """The guest's CLOCK_MONOTONIC and the host's time.monotonic() at the same moment
        (the middle of the round trip), or None if it did not answer sensibly and soon."""
        sent = time.monotonic()
        try:
            got = (await self.request("clock", timeout=5.0)).get("monotonic")
        except (AgentError, ConnectionError) as exc:
            log.debug("the guest did not tell its clock: %s", exc)
            return None
        back = time.monotonic()
        if not isinstance(got, (int, float)) or not 0 <= got < 2**40 or back - sent > 0.5:
            return None
        return float(got), (sent + back) / 2


    def start_exec(self, argv: list[str] | None = None, *, shell: str | None = None,
                   env: dict[str, str] | None = None, cwd: str | None = None,
                   user: str | None = None, stdin: bool = False,
                   pty: dict[str, Any] | None = None, timeout: float | None = None,
                   collect: list[str] | None = None) -> Process:
        """Start a command; read its output and exit status from the returned Process.
        ``collect``: files the agent reads when the command ends and sends with its exit
        status (ExecResult.collected)."""
        args: dict[str, Any] = {"stdin": stdin}
        if collect:
            args["collect"] = list(collect)
        if shell is not None:
            args["shell"] = shell
        else:
            args["argv"] = list(argv or [])
        for key, value in (("env", env), ("cwd", cwd), ("user", user), ("pty", pty),
                           ("timeout", timeout)):
            if value is not None:
                args[key] = value
        shown = ["sh", "-c", shell] if shell is not None else list(argv or [])
        return Process(self, self._open("exec", args), shown, timeout)

    def start_transfer(self, op: str, **args: Any) -> Process:
        """Start a get or put: data flows on stdout (get) or stdin (put) like an exec's."""
        return Process(self, self._open(op, args), [op, str(args.get("path"))], None)

    async def exec(self, argv: list[str] | None = None, *, shell: str | None = None,
                   input: bytes | None = None, timeout: float | None = None,
                   **kwargs: Any) -> ExecResult:
        """Run a command to completion and collect its output."""
        proc = self.start_exec(argv, shell=shell, stdin=input is not None, timeout=timeout,
                               **kwargs)
        try:
            if input is not None:
                await proc.write(input)
                await proc.close_stdin()
            out, err = bytearray(), bytearray()
            async for stream, data in proc:
                (out if stream == P.STDOUT else err).extend(data)
            result = await proc.wait()
        finally:
            proc.abandon()
        result.stdout, result.stderr = bytes(out), bytes(err)
        return result

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def clock_anchor(reading: tuple[float, float] | None, stopped: float) -> float | None:
    """The guest's CLOCK_MONOTONIC when it was stopped at host time.monotonic()
    ``stopped``, from a ``monotonic()`` reading taken shortly before."""
    if reading is None:
        return None
    guest, host = reading
    return guest + max(0.0, stopped - host)


def anchor_from(value: object) -> float | None:
    """A clock anchor read back from resume.json or snapshot.json."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _collected(value: Any) -> list[tuple[int, bytes]] | None:
    """An exec reply's ``collected`` (from the guest: checked; anything malformed is
    taken as not collected)."""
    if not isinstance(value, list):
        return None
    out = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)
                and not isinstance(item[0], bool) and isinstance(item[1], str)):
            return None
        try:
            data = binascii.a2b_base64(item[1].encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError):
            return None
        out.append((max(item[0], -1), data))
    return out


class Process:
    """A command running in the guest: iterate for (stream, bytes), then ``wait()``."""

    # How long past the command's own timeout to wait for the guest to report it.
    GRACE = 15.0

    def __init__(self, client: AgentClient, pending: _Pending, argv: list[str],
                 timeout: float | None) -> None:
        self._client = client
        self._pending = pending
        self.argv = argv
        self.pid: int | None = None
        self._timeout = timeout
        self._start = time.monotonic()
        self._open_streams = {P.STDOUT, P.STDERR}
        self._result: ExecResult | None = None
        self._consumed = {P.STDOUT: 0, P.STDERR: 0}
        self.stat: dict[str, Any] | None = None
        # Called once with the result when the command's exit status arrives.
        self.on_exit: Callable[[ExecResult], None] | None = None

    def _deadline_left(self) -> float | None:
        if self._timeout is None:
            return None
        return self._timeout + self.GRACE - (time.monotonic() - self._start)

    async def _next(self) -> P.Frame:
        left = self._deadline_left()
        try:
            if left is None:
                item = await self._pending.queue.get()
            else:
                item = await asyncio.wait_for(self._pending.queue.get(), max(left, 0.001))
        except TimeoutError:
            raise AgentTimeout(f"the end of {self.argv[:1]}", self._timeout or 0.0) from None
        if isinstance(item, BaseException):
            raise item
        return item

    def _handle_final(self, frame: P.Frame) -> None:
        msg = AgentClient._final(frame)
        code = msg.get("exit_code")
        sig = msg.get("signal")
        self._result = ExecResult(
            argv=self.argv,
            exit_code=code if isinstance(code, int) else -1,
            signal=sig if isinstance(sig, int) else None,
            timed_out=bool(msg.get("timed_out")),
            duration=time.monotonic() - self._start,
            collected=_collected(msg.get("collected")),
        )
        self._open_streams.clear()
        if self.on_exit is not None:
            self.on_exit(self._result)

    def _grant(self, stream: int, n: int) -> None:
        self._consumed[stream] += n
        if self._consumed[stream] >= P.STREAM_WINDOW // 4 and not self._pending.done:
            grant = self._consumed[stream]
            self._consumed[stream] = 0
            self._pending.credit[stream] += grant
            with contextlib.suppress(AgentError):
                self._client._send(P.encode_window(self._pending.chan, stream, grant))

    def __aiter__(self) -> AsyncIterator[tuple[int, bytes]]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[tuple[int, bytes]]:
        while self._open_streams:
            frame = await self._next()
            if frame.kind == P.DATA:
                self._grant(frame.flags, len(frame.payload))
                yield frame.flags, frame.payload
            elif frame.kind == P.EOF:
                self._open_streams.discard(frame.flags)
            elif frame.kind == P.EVENT:
                event = frame.json()
                started = event.get("started")
                if isinstance(started, int):
                    self.pid = started
                if isinstance(event.get("stat"), dict):
                    self.stat = event["stat"]
            elif frame.kind in (P.REPLY, P.ERROR):
                self._handle_final(frame)

    async def write(self, data: bytes) -> None:
        """Send bytes to the command's stdin, waiting for the guest's window as needed."""
        view = memoryview(data)
        while view:
            while self._pending.send_credit <= 0:
                self._pending.credit_event.clear()
                self._client._check_open()
                if self._pending.done:
                    return  # the command finished; the rest of stdin has nowhere to go
                await self._pending.credit_event.wait()
            n = min(len(view), self._pending.send_credit, P.MAX_FRAME)
            self._pending.send_credit -= n
            self._client._send(P.encode(P.DATA, self._pending.chan, bytes(view[:n]), P.STDIN))
            view = view[n:]
            await self._client._drain()

    async def close_stdin(self) -> None:
        if not self._pending.done:
            self._client._send(P.encode(P.EOF, self._pending.chan, b"", P.STDIN))
            await self._client._drain()

    async def signal(self, sig: int) -> None:
        if not self._pending.done:
            self._client._send(P.encode_json(P.CONTROL, self._pending.chan, {"signal": sig}))
            await self._client._drain()

    async def resize(self, rows: int, cols: int) -> None:
        if not self._pending.done:
            self._client._send(P.encode_json(P.CONTROL, self._pending.chan,
                                             {"resize": [rows, cols]}))
            await self._client._drain()

    async def wait(self) -> ExecResult:
        """Wait for the exit status (discarding output not read yet)."""
        while self._result is None:
            frame = await self._next()
            if frame.kind in (P.REPLY, P.ERROR):
                self._handle_final(frame)
            elif frame.kind == P.DATA:
                self._grant(frame.flags, len(frame.payload))
        return self._result

    def abandon(self) -> None:
        """Stop tracking this request; if it is still running, kill it in the guest."""
        if not self._pending.done and not self._client.closed:
            with contextlib.suppress(AgentError):
                self._client._send(P.encode_json(P.CONTROL, self._pending.chan, {"signal": 9}))
        self._client._forget(self._pending)
