"""The agent framing, and the host client against a hostile guest."""

import asyncio
import json
import os
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pinnace.agent import protocol as P
from pinnace.agent.client import REQUIRED_OPS, AgentClient
from pinnace.errors import AgentDisconnected, AgentError, ProtocolError, RemoteError
from pinnace.store import MachineFiles

frames = st.builds(
    lambda kind, chan, flags, payload: P.Frame(kind, chan, flags, payload),
    st.sampled_from(sorted(P.KINDS)), st.integers(0, 2**32 - 1), st.integers(0, 255),
    st.binary(max_size=2048),
)


@given(st.lists(frames, max_size=20), st.integers(1, 64))
def test_frames_survive_any_chunking(items, chunk):
    data = b"".join(P.encode(f.kind, f.chan, f.payload, f.flags) for f in items)
    reader = P.FrameReader()
    got = []
    for i in range(0, len(data), chunk):
        got += reader.feed(data[i:i + chunk])
    assert got == items
    assert reader.pending() == 0


def test_oversized_frame_is_refused_before_buffering():
    reader = P.FrameReader(max_frame=1024)
    header = P.HEADER.pack(P.MAGIC, P.DATA, 1, 1, 1 << 30)
    with pytest.raises(P.FrameError, match="exceeds"):
        reader.feed(header)
    with pytest.raises(ValueError):
        P.encode(P.DATA, 1, b"x" * (P.MAX_FRAME + 1))


def test_guest_side_resyncs_after_garbage():
    reader = P.FrameReader(resync=True)
    good = P.encode_json(P.REQUEST, 7, {"op": "ping"})
    got = reader.feed(b"garbage!" * 5 + good)
    assert [f.chan for f in got] == [7]
    assert len(reader.errors) == 1


def test_json_payload_errors_are_not_fatal():
    frame = P.Frame(P.REQUEST, 3, 0, b"{not json")
    with pytest.raises(P.FrameError) as exc:
        frame.json()
    assert exc.value.fatal is False and exc.value.chan == 3
    with pytest.raises(P.FrameError):
        P.Frame(P.REQUEST, 3, 0, b"[1, 2]").json()


# --- the host client against a fake, hostile guest ---------------------------------------

CAPS = sorted(REQUIRED_OPS)


async def fake_guest(tmp_path, behave):
    """A unix-socket server on port 0 that answers HELLO, then runs ``behave``."""
    files = MachineFiles(tmp_path)

    async def handler(reader, writer):
        try:
            buf = P.FrameReader()
            hello = None
            while hello is None:
                for f in buf.feed(await reader.read(4096)):
                    if f.kind == P.HELLO:
                        hello = f.json()
            writer.write(P.encode_json(P.WELCOME, 0, {"version": P.PROTOCOL_VERSION,
                                                      "nonce": hello["nonce"],
                                                      "capabilities": CAPS}))
            await behave(buf, reader, writer)
            await writer.drain()
        except ConnectionError:
            pass  # the client hung up on us, as it should on a bad guest
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handler, path=str(files.agent_sock(0)))
    return files, server


async def next_request(buf, reader):
    while True:
        for f in buf.feed(await reader.read(4096)):
            if f.kind == P.REQUEST:
                return f


def run_against(tmp_path, behave, call):
    async def main():
        files, server = await fake_guest(tmp_path, behave)
        async with server:
            client = await AgentClient.connect(files, timeout=5)
            try:
                return await asyncio.wait_for(call(client), 10)
            finally:
                await client.close()

    return asyncio.run(main())


def test_reply_and_remote_error(tmp_path):
    async def behave(buf, reader, writer):
        req = await next_request(buf, reader)
        writer.write(P.encode_json(P.REPLY, req.chan, {"pong": True}))
        req = await next_request(buf, reader)
        writer.write(P.encode_json(P.ERROR, req.chan, {"code": "nope", "message": "refused"}))

    async def call(client):
        assert await client.request("ping") == {"pong": True}
        with pytest.raises(RemoteError, match="refused"):
            await client.request("ping")

    run_against(tmp_path, behave, call)


hostile = st.one_of(
    st.binary(min_size=1, max_size=200).map(lambda b: ("raw", b)),
    st.tuples(st.sampled_from(sorted(P.KINDS)), st.binary(max_size=100)).map(
        lambda t: ("frame", t)),
    st.integers(P.MAX_FRAME + 1, 2**32 - 1).map(lambda n: ("huge", n)),
    st.integers(1, 5000).map(lambda n: ("overflow", n)),
    st.just(("truncate", None)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hostile)
def test_hostile_guest_gets_clean_errors(tmp_path, attack):
    """Whatever the guest sends, the client raises an AgentError or works; it never hangs."""
    kind, arg = attack

    async def behave(buf, reader, writer):
        req = await next_request(buf, reader)
        if kind == "raw":
            writer.write(arg)
        elif kind == "frame":
            fkind, payload = arg
            writer.write(P.encode(fkind, req.chan, payload, 1))
        elif kind == "huge":
            writer.write(P.HEADER.pack(P.MAGIC, P.DATA, 1, req.chan, arg))
        elif kind == "overflow":
            # More stdout than the window allows, in legal-sized frames.
            chunk = b"x" * (P.MAX_FRAME)
            for _ in range(P.STREAM_WINDOW // P.MAX_FRAME + 1):
                writer.write(P.encode(P.DATA, req.chan, chunk, P.STDOUT))
        elif kind == "truncate":
            writer.write(P.encode(P.DATA, req.chan, b"abcdef", P.STDOUT)[:9])
        await writer.drain()
        writer.close()

    async def call(client):
        try:  # the only failure allowed is an AgentError (a ProtocolError, say)
            await client.exec(["true"], timeout=5)
        except AgentError:
            pass
        for _ in range(200):  # the guest hung up: the client notices, whatever it sent
            if client.closed:
                return True
            await asyncio.sleep(0.01)
        return client.closed

    assert run_against(tmp_path, behave, call) is True


def test_output_beyond_window_is_a_protocol_error(tmp_path):
    async def behave(buf, reader, writer):
        req = await next_request(buf, reader)
        chunk = b"x" * P.MAX_FRAME
        for _ in range(P.STREAM_WINDOW // P.MAX_FRAME + 1):
            writer.write(P.encode(P.DATA, req.chan, chunk, P.STDOUT))
        await writer.drain()
        await asyncio.sleep(5)

    async def call(client):
        proc = client.start_exec(["cat"], timeout=5)
        # Read nothing (so grant nothing) until the guest has overrun its window.
        for _ in range(500):
            if client.closed:
                break
            await asyncio.sleep(0.01)
        assert client.closed
        with pytest.raises(ProtocolError, match="window"):
            async for _ in proc:
                pass

    run_against(tmp_path, behave, call)


def test_guest_hanging_up_fails_requests(tmp_path):
    async def behave(buf, reader, writer):
        await next_request(buf, reader)
        writer.close()

    async def call(client):
        with pytest.raises(AgentDisconnected):
            await client.request("ping", timeout=5)

    run_against(tmp_path, behave, call)


def test_wrong_protocol_version_is_refused(tmp_path):
    files = MachineFiles(tmp_path)

    async def main():
        async def handler(reader, writer):
            buf = P.FrameReader()
            for f in buf.feed(await reader.read(4096)):
                nonce = f.json()["nonce"]
            writer.write(P.encode_json(P.WELCOME, 0, {"version": 99, "nonce": nonce}))
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(handler, path=str(files.agent_sock(0)))
        async with server:
            with pytest.raises(ProtocolError, match="rebuild the image"):
                await AgentClient.connect(files, timeout=5)

    asyncio.run(main())


def test_requests_sent_before_the_welcome(tmp_path):
    """open() says HELLO and returns: requests go out at once. What the guest sends before
    its WELCOME to this HELLO (an earlier session's leftovers, a WELCOME with another
    nonce) is not taken for their replies."""
    files = MachineFiles(tmp_path)

    async def main():
        async def handler(reader, writer):
            buf = P.FrameReader()
            frames = []
            while len([f for f in frames if f.kind == P.REQUEST]) < 2:
                frames += buf.feed(await reader.read(4096))
            assert frames[0].kind == P.HELLO  # the requests came after it, unanswered
            nonce = frames[0].json()["nonce"]
            chans = [f.chan for f in frames if f.kind == P.REQUEST]
            writer.write(P.encode_json(P.REPLY, chans[0], {"stale": True}))
            writer.write(P.encode_json(P.WELCOME, 0, {"version": P.PROTOCOL_VERSION,
                                                      "nonce": "someone-else"}))
            writer.write(P.encode_json(P.WELCOME, 0, {"version": P.PROTOCOL_VERSION,
                                                      "nonce": nonce, "capabilities": CAPS}))
            for c in chans:
                writer.write(P.encode_json(P.REPLY, c, {"chan": c}))
            await writer.drain()
            await reader.read()
            writer.close()

        server = await asyncio.start_unix_server(handler, path=str(files.agent_sock(0)))
        async with server:
            client = await AgentClient.open(files, timeout=5)
            try:
                replies = asyncio.gather(client.request("a"), client.request("b"))
                await client.welcomed(5)
                assert [r["chan"] for r in await asyncio.wait_for(replies, 5)] == [1, 2]
            finally:
                await client.close()
            await asyncio.sleep(0.05)  # let the fake guest see the hang-up and close

    asyncio.run(main())


def test_a_clock_anchor_that_did_not_hold_is_followed_by_a_plain_set_time(tmp_path):
    seen = []

    async def behave(buf, reader, writer):
        while len(seen) < 3:
            for req in buf.feed(await reader.read(4096)):
                msg = req.json()
                seen.append(msg)
                # the set_time with an anchor leaves the guest an hour behind
                late = msg["op"] == "set_time" and "at" in msg
                writer.write(P.encode_json(P.REPLY, req.chan, {
                    "time": msg["epoch"] - 3600 if late else time.time()}))

    async def call(client):
        await client.refresh_identity(epoch=time.time(), at=12.5)

    run_against(tmp_path, behave, call)
    assert [m["op"] for m in seen] == ["set_time", "reseed", "set_time"]
    assert seen[0]["at"] == 12.5 and "at" not in seen[2]


def test_clock_anchor():
    from pinnace.agent.client import anchor_from, clock_anchor

    # the guest read 100.0 when the host read 50.0; the host stopped it at 50.25
    assert clock_anchor((100.0, 50.0), 50.25) == 100.25
    assert clock_anchor((100.0, 50.0), 49.0) == 100.0  # never before the reading
    assert clock_anchor(None, 50.0) is None
    assert anchor_from(12) == 12.0 and anchor_from(1.5) == 1.5
    assert anchor_from(None) is None and anchor_from(True) is None and anchor_from("1") is None


def test_ports_are_taken_one_client_each(tmp_path):
    files = MachineFiles(tmp_path)

    async def main():
        servers = []
        for port in range(2):
            async def handler(reader, writer, port=port):
                buf = P.FrameReader()
                while True:
                    data = await reader.read(4096)
                    if not data:
                        writer.close()
                        return
                    for f in buf.feed(data):
                        if f.kind == P.HELLO:
                            writer.write(P.encode_json(P.WELCOME, 0, {
                                "version": P.PROTOCOL_VERSION, "nonce": f.json()["nonce"],
                                "capabilities": CAPS}))
            servers.append(await asyncio.start_unix_server(
                handler, path=str(files.agent_sock(port))))
        a = await AgentClient.connect(files, timeout=5)
        b = await AgentClient.connect(files, timeout=5)
        assert (a.port, b.port) == (0, 1)
        await a.close()
        c = await AgentClient.connect(files, timeout=5)
        assert c.port == 0
        for x in (b, c):
            await x.close()
        await asyncio.sleep(0.1)  # let the fake guests see the hang-ups and close
        for s in servers:
            s.close()
            await s.wait_closed()

    asyncio.run(main())


def test_window_frame_layout():
    frame = P.FrameReader().feed(P.encode_window(5, P.STDIN, 1234))[0]
    assert (frame.kind, frame.chan, frame.flags, frame.window()) == (P.WINDOW, 5, 0, 1234)
    assert struct.unpack("!I", frame.payload) == (1234,)
    assert json.loads(P.encode_json(P.REQUEST, 1, {"a": 1})[P.HEADER.size:]) == {"a": 1}
    assert os.path.basename(P.__file__) == "protocol.py"


def test_an_agent_without_an_operation_the_host_needs_is_refused(tmp_path):
    """The WELCOME's capabilities are read: an agent from an older pinnace that cannot
    set_network is refused at once, naming the missing operation and the fix."""
    files = MachineFiles(tmp_path)

    async def main():
        async def handler(reader, writer):
            buf = P.FrameReader()
            for f in buf.feed(await reader.read(4096)):
                if f.kind == P.HELLO:
                    caps = [c for c in CAPS if c != "set_network"]
                    writer.write(P.encode_json(P.WELCOME, 0, {
                        "version": P.PROTOCOL_VERSION, "nonce": f.json()["nonce"],
                        "capabilities": caps}))
            await writer.drain()
            while await reader.read(4096):  # until the client hangs up, as it must
                pass
            writer.close()
            await writer.wait_closed()
            done.set()

        done = asyncio.Event()
        server = await asyncio.start_unix_server(handler, path=str(files.agent_sock(0)))
        async with server:
            with pytest.raises(ProtocolError, match=r"cannot set_network.*image build"):
                await AgentClient.connect(files, timeout=5)
            await asyncio.wait_for(done.wait(), 5)

    asyncio.run(main())


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@given(st.dictionaries(st.text(), _json_values, max_size=6))
def test_json_codec_is_the_json_packages(obj):
    """The agent's JSON (through _json, without importing json) is json's, both ways."""
    text = json.dumps(obj, separators=(",", ":"))
    assert P.json_dumps(obj) == text
    assert P.json_loads(text) == obj
    assert P.json_loads(f" \n{json.dumps(obj, indent=1)}\t") == obj


def test_json_codec_refuses_what_json_refuses():
    for bad in ("", "{", '{"a":1} x', "[1,]", '{"a":01}', "nul", '{"a":"\x01"}', "  "):
        with pytest.raises(ValueError):
            P.json_loads(bad)
    with pytest.raises(TypeError, match="not JSON serializable"):
        P.json_dumps({"s": {1, 2}})
