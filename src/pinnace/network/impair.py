"""Impairments of a virtual network's links, in Linux netem's vocabulary, applied by the
switch to every frame it delivers to a machine.

An :class:`Impairment` is what one link does to the frames it carries: delay with
jitter (and correlation), loss (random, with correlation, or a Gilbert-Elliott burst
model), duplication, reordering, corruption, a rate limit with a queue limit, or the
link being down. A network has one for all its links, and each machine's link may
override it field by field. Since it acts where a frame is *delivered*, a round trip
between two machines crosses two impaired links: 50 ms of delay makes a 100 ms round
trip, and 20 % loss loses 1 - 0.8² = 36 % of round trips.

A :class:`Link` is the state one delivery port keeps: its random stream (seeded, so a
run can be repeated), the correlation memories, the Gilbert-Elliott state and the time
its rate limit frees up. :meth:`Link.deliveries` turns one frame into the list of
(time to send, frame) the switch then sends; the switch owns the clock and the timer
queue. The standard library only: the switch imports this.
"""

from __future__ import annotations

import heapq
import random
import re
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConfigError

NETEM_LIMIT = 1000  # frames a link queues by default, as netem's
MAX_DELAY = 60.0
MAX_RATE = 100e9  # bits per second


@dataclass(frozen=True)
class Impairment:
    """What a link does to frames. Probabilities are fractions (0.01 is 1 %), times are
    seconds, ``rate`` is bits per second (0: no limit), ``limit`` is frames queued."""

    delay: float = 0.0
    jitter: float = 0.0
    delay_corr: float = 0.0
    loss: float = 0.0
    loss_corr: float = 0.0
    # Gilbert-Elliott (netem's "loss gemodel p r 1-h 1-k"): p good->bad, r bad->good,
    # loss in the bad state (1-h) and in the good one (1-k). Overrides ``loss``.
    ge: tuple[float, float, float, float] | None = None
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_corr: float = 0.0
    corrupt: float = 0.0
    rate: float = 0.0
    limit: int = NETEM_LIMIT
    down: bool = False

    @property
    def none(self) -> bool:
        """True if it changes nothing: frames go straight through."""
        return self == NONE

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that differ from no impairment (what network.json keeps)."""
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in fields(self) if (v := getattr(self, f.name)) != getattr(NONE, f.name)}

    @classmethod
    def from_dict(cls, data: object) -> Impairment:
        """The impairment a dict describes (from network.json); ConfigError if it is not one."""
        if not isinstance(data, dict):
            raise ConfigError("impairment", str(data)[:80], "give a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError("impairment field", unknown[0], f"known: {', '.join(sorted(known))}")
        values = dict(data)
        if values.get("ge") is not None:
            if not isinstance(values["ge"], (list, tuple)):
                raise ConfigError("loss model", str(values["ge"])[:80], "give gemodel P R 1-H 1-K")
            values["ge"] = tuple(values["ge"])
        return check(cls(**values))


NONE = Impairment()


def _probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(name, str(value), "give a percentage between 0% and 100%")
    return float(value)


def check(imp: Impairment) -> Impairment:
    """``imp`` if every field is in range; ConfigError naming the first that is not."""
    for name in ("delay", "jitter"):
        v = getattr(imp, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_DELAY:
            raise ConfigError(name, str(v), f"give a time between 0 and {MAX_DELAY:g} s")
    for name in ("delay_corr", "loss", "loss_corr", "duplicate", "reorder", "reorder_corr",
                 "corrupt"):
        _probability(name, getattr(imp, name))
    if imp.ge is not None:
        if len(imp.ge) != 4:
            raise ConfigError("loss model", str(imp.ge), "give gemodel P R 1-H 1-K")
        for v in imp.ge:
            _probability("loss model", v)
    if isinstance(imp.rate, bool) or not isinstance(imp.rate, (int, float)) \
            or not 0 <= imp.rate <= MAX_RATE:
        raise ConfigError("rate", str(imp.rate), "give a rate such as 10mbit (0: no limit)")
    if isinstance(imp.limit, bool) or not isinstance(imp.limit, int) \
            or not 1 <= imp.limit <= 1_000_000:
        raise ConfigError("limit", str(imp.limit), "give a number of frames, 1 to 1000000")
    if not isinstance(imp.down, bool):
        raise ConfigError("down", str(imp.down), "give true or false")
    if imp.reorder and not imp.delay:
        raise ConfigError("reorder", f"{imp.reorder:.0%}", "reordering sends some frames "
                          "ahead of delayed ones: give a delay too")
    if (imp.jitter or imp.delay_corr) and not imp.delay:
        raise ConfigError("jitter", f"{imp.jitter * 1e3:g}ms", "jitter varies a delay: give "
                          "a delay too")
    return imp


# --- the words people type: 50ms, 1%, 10mbit ----------------------------------------

_TIME = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(us|ms|s)?\s*$")
_PCT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*%?\s*$")
_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)?\s*$",
                   re.IGNORECASE)
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1e-3}
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 8, "kbps": 8e3,
               "mbps": 8e6, "gbps": 8e9, None: 1}


def parse_time(name: str, text: str) -> float:
    """'50ms', '0.2s', '150us'; a bare number is milliseconds, as in netem."""
    m = _TIME.match(text)
    if not m:
        raise ConfigError(name, text, "give a time such as 50ms, 1.5s or 200us")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def parse_percent(name: str, text: str) -> float:
    """'1%', '0.5%', '20' (percent) as a fraction."""
    m = _PCT.match(text)
    if not m or float(m.group(1)) > 100:
        raise ConfigError(name, text, "give a percentage such as 1% or 0.5%")
    return float(m.group(1)) / 100


def parse_rate(text: str) -> float:
    """'10mbit', '512kbit', '1gbit', '2mbps' (bytes) as bits per second."""
    m = _RATE.match(text)
    if not m:
        raise ConfigError("rate", text, "give a rate such as 10mbit, 512kbit or 1gbit")
    unit = m.group(2).lower() if m.group(2) else None
    return float(m.group(1)) * _RATE_UNITS[unit]


def parse_loss(text: str) -> dict[str, Any]:
    """'1%', '1% 25%' (with correlation) or 'gemodel P R [1-H [1-K]]' (percentages)."""
    words = text.split()
    if words and words[0] == "gemodel":
        if not 3 <= len(words) <= 5:
            raise ConfigError("loss", text, "give gemodel P R [1-H [1-K]], e.g. gemodel 1% 10%")
        p, r, *rest = (parse_percent("loss", w) for w in words[1:])
        bad = rest[0] if rest else 1.0
        good = rest[1] if len(rest) > 1 else 0.0
        return {"ge": (p, r, bad, good)}
    if not 1 <= len(words) <= 2:
        raise ConfigError("loss", text, "give a percentage, with a correlation if you like: "
                          "'1%' or '1% 25%'")
    out = {"loss": parse_percent("loss", words[0])}
    if len(words) == 2:
        out["loss_corr"] = parse_percent("loss correlation", words[1])
    return out


def from_options(**given: str | None) -> dict[str, Any]:
    """Impairment fields from CLI-style strings (delay, jitter, delay_corr, loss,
    duplicate, reorder, corrupt, rate, limit); options left None are not set."""
    out: dict[str, Any] = {}
    for key, text in given.items():
        if text is None:
            continue
        if key in ("delay", "jitter"):
            out[key] = parse_time(key, text)
        elif key in ("delay_corr", "duplicate", "reorder", "corrupt"):
            out[key] = parse_percent(key.replace("_", " "), text)
        elif key == "loss":
            out.update(parse_loss(text))
        elif key == "rate":
            out["rate"] = parse_rate(text)
        elif key == "limit":
            if not text.strip().isdigit():
                raise ConfigError("limit", text, "give a number of frames")
            out["limit"] = int(text)
        else:
            raise ConfigError("impairment", key, "not an impairment")
    return out


def describe(imp: Impairment) -> str:
    """One line in netem's words: 'delay 50ms 5ms loss 1% rate 10mbit'."""
    if imp.none:
        return "none"
    words = []
    if imp.down:
        words.append("down")
    if imp.delay:
        words.append(f"delay {imp.delay * 1e3:g}ms")
        if imp.jitter:
            words.append(f"{imp.jitter * 1e3:g}ms")
            if imp.delay_corr:
                words.append(f"{imp.delay_corr:.0%}")
    if imp.ge is not None:
        words.append("loss gemodel " + " ".join(f"{v * 100:g}%" for v in imp.ge))
    elif imp.loss:
        words.append(f"loss {imp.loss * 100:g}%" + (f" {imp.loss_corr * 100:g}%"
                                                     if imp.loss_corr else ""))
    for name in ("duplicate", "reorder", "corrupt"):
        if getattr(imp, name):
            words.append(f"{name} {getattr(imp, name) * 100:g}%")
    if imp.rate:
        words.append(f"rate {imp.rate / 1e6:g}mbit")
    if imp.limit != NETEM_LIMIT:
        words.append(f"limit {imp.limit}")
    return " ".join(words)


# --- one link's state ---------------------------------------------------------------


class Link:
    """The state of one impaired delivery port (see the module's docstring)."""

    def __init__(self, imp: Impairment, rng: random.Random) -> None:
        self.imp = imp
        self._rng = rng
        self._last = {"delay": 0.0, "loss": 0.0, "reorder": 0.0}  # correlation memory
        self._bad = False  # Gilbert-Elliott state
        self._free_at = 0.0  # when the rate limiter has sent what it holds
        self._held: list[float] = []  # (a heap) when the frames held back go out
        self.dropped = 0

    def _correlated(self, key: str, corr: float) -> float:
        """A uniform [0, 1) draw, correlated with the last one as netem's are."""
        u = self._rng.random()
        if corr:
            u = corr * self._last[key] + (1 - corr) * u
        self._last[key] = u
        return u

    def _lost(self) -> bool:
        imp = self.imp
        if imp.ge is not None:  # lost (or not) in the state it is in; then it moves
            p, r, bad_loss, good_loss = imp.ge
            lost = self._rng.random() < (bad_loss if self._bad else good_loss)
            self._bad = (self._rng.random() >= r) if self._bad else (self._rng.random() < p)
            return lost
        return bool(imp.loss) and self._correlated("loss", imp.loss_corr) < imp.loss

    def deliveries(self, frame: bytes, now: float) -> list[tuple[float, bytes]]:
        """What becomes of ``frame`` arriving at ``now``: (when to send, frame) pairs,
        none if it is lost, two if it is duplicated."""
        imp = self.imp
        if imp.down or self._lost():
            self.dropped += 1
            return []
        copies = 2 if imp.duplicate and self._rng.random() < imp.duplicate else 1
        held = self._held
        while held and held[0] <= now:
            heapq.heappop(held)
        out = []
        for _ in range(copies):
            if len(held) >= imp.limit:  # netem's limit: frames held back, delayed or paced
                self.dropped += 1
                continue
            data = frame
            if imp.corrupt and self._rng.random() < imp.corrupt and len(data) > 14:
                # One bit, past the Ethernet header (netem may hit any byte of the packet;
                # a spoiled MAC would only make it a frame for nobody).
                spoiled = bytearray(data)
                at = self._rng.randrange(14, len(spoiled))
                spoiled[at] ^= 1 << self._rng.randrange(8)
                data = bytes(spoiled)
            when = now
            if imp.delay and not (imp.reorder and
                                  self._correlated("reorder", imp.reorder_corr) < imp.reorder):
                when += imp.delay
                if imp.jitter:
                    u = self._correlated("delay", imp.delay_corr)
                    when = max(now, when + (2 * u - 1) * imp.jitter)
            if imp.rate:
                start = max(when, self._free_at)
                self._free_at = start + len(data) * 8 / imp.rate
                when = self._free_at
            if when > now:
                heapq.heappush(held, when)
            out.append((when, data))
        return out


def effective(network: Impairment, link: object) -> Impairment:
    """A machine's link: the network's impairment with the link's own fields over it."""
    if not link:
        return network
    if not isinstance(link, dict):
        raise ConfigError("link impairment", str(link)[:80], "give a JSON object")
    return Impairment.from_dict({**network.to_dict(), **link})


# --- a network's lab: what network.json says --------------------------------------


@dataclass(frozen=True)
class Lab:
    """A network's impairments (one for every link, and per machine over it), its
    partition (groups of machine names; ``oneway``: only frames from the first group to
    the second are dropped) and its seed (None: a new random stream each start)."""

    impair: Impairment = NONE
    links: tuple[tuple[str, dict[str, object]], ...] = ()
    groups: tuple[tuple[str, ...], ...] = ()
    oneway: bool = False
    seed: int | None = None

    @property
    def plain(self) -> bool:
        """True if frames go straight through (the switch's fast path)."""
        return self.impair.none and not self.links and not self.groups

    def link(self, machine: str) -> Impairment:
        return effective(self.impair, dict(self.links).get(machine))

    def rng(self, port_id: str) -> random.Random:
        """A port's random stream: from the seed and the port, so a run repeats."""
        return random.Random(f"{self.seed}:{port_id}" if self.seed is not None else None)

    @classmethod
    def from_meta(cls, meta: object) -> Lab:
        """The lab of a network.json; ValueError or ConfigError if it is damaged."""
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        links = meta.get("links") or {}
        part = meta.get("partition") or {}
        if not isinstance(links, dict) or not isinstance(part, dict):
            raise ValueError("links and partition must be objects")
        impair = Impairment.from_dict(meta.get("impair") or {})
        for imp in links.values():
            if not isinstance(imp, dict):
                raise ValueError("a machine's link must be an object")
            effective(impair, imp)  # (checked here, as each machine's link will be)
        groups = part.get("groups") or []
        if not (isinstance(groups, list) and all(
                isinstance(g, list) and all(isinstance(m, str) for m in g) for g in groups)):
            raise ValueError("partition groups must be lists of machine names")
        seed = meta.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError("seed must be an integer")
        return cls(impair=impair,
                   links=tuple(sorted((str(k), dict(v)) for k, v in links.items())),
                   groups=tuple(tuple(g) for g in groups), oneway=bool(part.get("oneway")),
                   seed=seed)


__all__ = ["NONE", "Impairment", "Lab", "Link", "check", "describe", "effective",
           "from_options", "parse_loss", "parse_percent", "parse_rate", "parse_time"]
