"""Network impairments (pinnace.network.impair): the words, each effect on a link with a
seeded random stream, and the switch applying them (and partitions) with a fake clock;
no QEMU."""

from __future__ import annotations

import itertools
import json
import math
import random
import struct
import time

import pytest

from pinnace.errors import ConfigError
from pinnace.network.impair import (
    NONE,
    Impairment,
    Lab,
    Link,
    describe,
    effective,
    from_options,
)
from pinnace.network.switch import Switch, pcap_header, read_pcap
from pinnace.store import this_process
from tests.unit.conftest import BROADCAST

FRAME = bytes(6) + bytes(range(1, 7)) + b"\x08\x00" + bytes(200)


def link(seed: int = 1, **fields) -> Link:
    return Link(Impairment(**fields), random.Random(seed))


def within_binomial(hits: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


# --- words ---------------------------------------------------------------------------


def test_options_in_netems_words():
    got = from_options(delay="50ms", jitter="5ms", delay_corr="25%", loss="1% 30%",
                       duplicate="2%", reorder="10%", corrupt="0.1%", rate="10mbit",
                       limit="100")
    assert got == {"delay": 0.05, "jitter": 0.005, "delay_corr": 0.25, "loss": 0.01,
                   "loss_corr": 0.3, "duplicate": 0.02, "reorder": 0.1, "corrupt": 0.001,
                   "rate": 10e6, "limit": 100}
    imp = Impairment(**got)
    assert describe(imp) == ("delay 50ms 5ms 25% loss 1% 30% duplicate 2% reorder 10% "
                             "corrupt 0.1% rate 10mbit limit 100")
    assert from_options(delay="200", rate="2mbps") == {"delay": 0.2, "rate": 16e6}
    assert from_options(loss="gemodel 1% 10%") == {"ge": (0.01, 0.1, 1.0, 0.0)}
    assert describe(NONE) == "none" and NONE.none


@pytest.mark.parametrize(("option", "text", "says"), [
    ("delay", "fast", "give a time such as 50ms"),
    ("loss", "101%", "give a percentage"),
    ("loss", "1% 2% 3%", "give a percentage, with a correlation"),
    ("rate", "lots", "give a rate such as 10mbit"),
    ("limit", "-1", "give a number of frames"),
    ("reorder", "5%", "give a delay too"),
    ("jitter", "5ms", "jitter varies a delay"),
    ("loss", "gemodel 1%", "give gemodel P R"),
    ("delay", "120s", "give a time between 0 and 60 s"),
])
def test_bad_words_are_one_line_errors(option, text, says):
    with pytest.raises(ConfigError, match=says):
        Impairment.from_dict(from_options(**{option: text}))


def test_a_link_overrides_the_network_field_by_field():
    net = Impairment(delay=0.05, loss=0.01)
    assert effective(net, {"loss": 0.0, "rate": 1e6}) == Impairment(delay=0.05, rate=1e6)
    assert effective(net, None) is net
    assert Impairment.from_dict(net.to_dict()) == net
    with pytest.raises(ConfigError, match="impairment field"):
        Impairment.from_dict({"latency": 1})


# --- one link, seeded ----------------------------------------------------------------


def test_no_impairment_is_straight_through():
    assert link().deliveries(FRAME, 5.0) == [(5.0, FRAME)]


def test_delay_and_jitter():
    assert link(delay=0.05).deliveries(FRAME, 1.0) == [(1.05, FRAME)]
    lk = link(delay=0.05, jitter=0.01, limit=100_000)
    times = [lk.deliveries(FRAME, 0.0)[0][0] for _ in range(2000)]
    assert min(times) >= 0.04 and max(times) <= 0.06
    assert abs(sum(times) / len(times) - 0.05) < 0.001
    assert max(times) - min(times) > 0.018  # spread over the whole band


def test_correlated_delay_changes_slowly():
    def steps(corr):
        lk = link(delay=0.05, jitter=0.01, delay_corr=corr, limit=100_000)
        times = [lk.deliveries(FRAME, 0.0)[0][0] for _ in range(2000)]
        return sum(abs(a - b) for a, b in itertools.pairwise(times)) / len(times)

    assert steps(0.9) < steps(0.0) / 3


def test_loss_rate_and_repeatability():
    n = 20000
    lost = sum(not link(7, loss=0.1).deliveries(FRAME, 0.0) for _ in range(1))  # warm-up
    lk = link(7, loss=0.1)
    lost = sum(not lk.deliveries(FRAME, 0.0) for _ in range(n))
    assert within_binomial(lost, n, 0.1) and lk.dropped == lost
    again = link(7, loss=0.1)
    assert sum(not again.deliveries(FRAME, 0.0) for _ in range(n)) == lost  # same seed


def test_gilbert_elliott_loses_in_bursts():
    lk = link(3, ge=(0.01, 0.2, 1.0, 0.0))  # bad 1 % of the time in, 20 % out: ~4.8 % lost
    outcomes = [bool(lk.deliveries(FRAME, 0.0)) for _ in range(50000)]
    lost = outcomes.count(False)
    assert within_binomial(lost, 50000, 0.01 / 0.21, sigmas=10)
    runs = [len(r) for r in "".join("x" if not o else " " for o in outcomes).split()]
    assert sum(runs) / len(runs) > 3  # mean burst 1/r = 5, where random loss gives ~1.05


def test_duplicate_corrupt_and_down():
    lk = link(duplicate=1.0)
    assert lk.deliveries(FRAME, 0.0) == [(0.0, FRAME), (0.0, FRAME)]
    [(_, spoiled)] = link(corrupt=1.0).deliveries(FRAME, 0.0)
    diff = [i for i, (a, b) in enumerate(zip(FRAME, spoiled, strict=True)) if a != b]
    assert len(spoiled) == len(FRAME) and len(diff) == 1 and diff[0] >= 14
    assert bin(FRAME[diff[0]] ^ spoiled[diff[0]]).count("1") == 1
    lk = link(down=True)
    assert lk.deliveries(FRAME, 0.0) == [] and lk.dropped == 1


def test_reorder_sends_some_frames_ahead():
    lk = link(5, delay=0.1, reorder=0.25, limit=100_000)
    times = [lk.deliveries(FRAME, float(i) * 0.001)[0][0] - i * 0.001 for i in range(4000)]
    ahead = sum(t == 0 for t in times)
    assert within_binomial(ahead, 4000, 0.25)


def test_the_limit_holds_for_delayed_frames_too():
    """netem's limit counts every frame held back: a flood into a long delay is dropped
    past it, not kept without bound; frames that have gone make room."""
    lk = link(delay=10.0, limit=100)
    held = [lk.deliveries(FRAME, 0.0) for _ in range(150)]
    assert sum(bool(d) for d in held) == 100 and lk.dropped == 50
    assert lk.deliveries(FRAME, 10.5) == [(20.5, FRAME)]  # the first 100 went at 10 s


def test_rate_spaces_frames_and_the_queue_is_limited():
    lk = link(rate=1e6, limit=10)  # 1 Mbit/s: 220 bytes take 1.76 ms
    sent = [lk.deliveries(FRAME, 0.0) for _ in range(15)]
    times = [d[0][0] for d in sent if d]
    assert len(times) == 10 and lk.dropped == 5
    assert times == pytest.approx([len(FRAME) * 8 / 1e6 * (i + 1) for i in range(10)])
    later = lk.deliveries(FRAME, 1.0)  # the queue has drained
    assert later == [(pytest.approx(1.0 + len(FRAME) * 8 / 1e6), FRAME)]


# --- the switch applies them ---------------------------------------------------------


def set_lab(net, **meta):
    (net / "network.json").write_text(json.dumps({"name": "net", "subnet": "10.1.0.0/24",
                                                  "created": 0, **meta}))


def test_the_switch_delays_by_its_clock(lan):
    net, a, b, c = lan
    set_lab(net, impair={"delay": 0.5})
    now = [100.0]
    sw = Switch(net, clock=lambda: now[0])
    try:
        frame = a.send(BROADCAST, b"late")
        sw.poll(0.5)
        assert b.recv(0.05) is None  # held back
        now[0] += 0.6
        sw.poll(0.0)
        assert b.recv() == frame and c.recv() == frame
    finally:
        sw.close()


def test_partitions_and_per_machine_links(lan):
    net, a, b, c = lan
    set_lab(net, partition={"groups": [["vm-a"], ["vm-b"]]}, links={"vm-c": {"down": True}})
    sw = Switch(net)
    try:
        a.send(BROADCAST, b"cut")
        sw.poll(0.5)
        assert b.recv(0.1) is None and c.recv(0.1) is None  # b across the cut, c down
        set_lab(net, partition={"groups": [["vm-a"], ["vm-b"]], "oneway": True})
        sw.rescan()
        frame = b.send(BROADCAST, b"back")
        sw.poll(0.5)
        assert a.recv() == frame and c.recv() == frame  # one way: b still reaches a; c is up
        still = a.send(BROADCAST, b"still cut")
        sw.poll(0.5)
        assert b.recv(0.1) is None and c.recv() == still
        set_lab(net)  # healed
        sw.rescan()
        frame = a.send(BROADCAST, b"healed")
        sw.poll(0.5)
        assert b.recv() == frame and c.recv() == frame
        stats = sw.stats()["ports"]
        assert stats["b"]["partitioned"] == 2
    finally:
        sw.close()


def test_a_damaged_lab_changes_nothing(lan, caplog):
    net, a, b, _c = lan
    set_lab(net, impair={"down": True})
    sw = Switch(net)
    try:
        (net / "network.json").write_text("{not json")
        sw.rescan()
        a.send(BROADCAST, b"x")
        sw.poll(0.5)
        assert b.recv(0.1) is None  # still down
        assert "impairments unchanged" in caplog.text
    finally:
        sw.close()


def test_lab_from_meta_checks_what_it_reads():
    assert Lab.from_meta({}).plain
    with pytest.raises(ConfigError):
        Lab.from_meta({"impair": {"loss": 2}})
    with pytest.raises(ValueError):
        Lab.from_meta({"partition": {"groups": "a,b"}})
    with pytest.raises(ValueError):
        Lab.from_meta({"seed": "x"})
    lab = Lab.from_meta({"impair": {"delay": 0.1}, "links": {"m": {"reorder": 0.5}}, "seed": 3})
    assert lab.link("m") == Impairment(delay=0.1, reorder=0.5)
    assert lab.rng("p").random() == Lab(seed=3).rng("p").random()


# --- captures ------------------------------------------------------------------------


def test_a_capture_writes_every_frame_as_pcap_and_ends(lan, tmp_path):
    net, a, b, _c = lan
    pcap = tmp_path / "lan.pcap"
    (net / "captures").mkdir()
    request = net / "captures" / "c1.json"
    request.write_text(json.dumps({"path": str(pcap), "owner": this_process()}))
    sw = Switch(net)
    try:
        assert json.loads((net / "switch.ports.json").read_text())["captures"] == ["c1"]
        sent = [a.send(BROADCAST, b"one"), b.send(a.mac, b"two")]
        sw.poll(0.5)
        sw.poll(0.1)
        got = read_pcap(pcap.read_bytes())
        assert [f for _, f in got] == sent
        assert all(abs(t - time.time()) < 5 for t, _ in got)
        request.unlink()
        sw.rescan()
        a.send(BROADCAST, b"after")
        sw.poll(0.5)
        assert len(read_pcap(pcap.read_bytes())) == 2  # ended
        # a request whose command died: dropped, its file removed
        request.write_text(json.dumps({"path": str(pcap), "owner": "999999999 1"}))
        sw.rescan()
        assert not request.exists()
        assert json.loads((net / "switch.ports.json").read_text())["captures"] == []
    finally:
        sw.close()


def test_read_pcap_refuses_what_is_not_one():
    with pytest.raises(ValueError):
        read_pcap(b"\x00" * 24)
    with pytest.raises(ValueError):
        read_pcap(b"short")
    head = pcap_header()
    record = struct.pack("<IIII", 1, 2, 3, 3) + b"abc"
    assert read_pcap(head + record + record[:5]) == [(1.000002, b"abc")]  # cut short: left out
