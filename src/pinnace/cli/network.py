"""Network verbs: create, set, partition, heal, capture, netcheck, punch, ls, inspect,
rm, connect, disconnect."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from .common import Group, call, each, echo_table

if TYPE_CHECKING:
    from ..client import AsyncPinnace


@click.group(cls=Group)
def network() -> None:
    """Virtual L2 networks between machines (one switch each, no way off the host)."""


IMPAIRMENTS = ("delay", "jitter", "delay_corr", "loss", "duplicate", "reorder", "corrupt",
               "rate", "limit")


def impairment_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The impairment options (netem's words), shared by create and set."""
    for flag, meta, text in reversed((
            ("--delay", "TIME", "delay every frame delivered to a machine (50ms)"),
            ("--jitter", "TIME", "vary the delay by up to this much, either way (5ms)"),
            ("--delay-corr", "PCT", "how much each delay follows the last (25%)"),
            ("--loss", "PCT", "lose frames: '1%', '1% 25%' (correlated) or "
             "'gemodel P R [1-H [1-K]]' (bursts)"),
            ("--duplicate", "PCT", "deliver frames twice"),
            ("--reorder", "PCT", "send frames ahead of delayed ones (needs --delay)"),
            ("--corrupt", "PCT", "flip one bit of frames"),
            ("--rate", "RATE", "limit each machine's link (10mbit, 512kbit)"),
            ("--limit", "FRAMES", "frames a rate-limited link queues (1000)"))):
        f = click.option(flag, metavar=meta, help=text)(f)
    return f


def given(options: dict[str, Any]) -> dict[str, Any]:
    from ..network.impair import from_options

    return from_options(**{k: options.get(k) for k in IMPAIRMENTS})


@network.command()
@click.argument("name")
@click.option("--subnet", metavar="CIDR", help="IPv4 subnet, e.g. 10.77.0.0/24 (default: "
              "the first free /24 of 10.100.0.0/16).")
@impairment_options
@click.option("--seed", type=int, help="Repeat a run's random losses and delays exactly.")
@click.option("--nat", metavar="PRESET", help="Put it behind a NAT router to the simulated "
              "internet: none (routed), one2one, fullcone, easy, restricted or hard.")
@click.option("--wan-ip", metavar="ADDRESS", help="The router's outside address (default: "
              "the next free one on the internet, 203.0.113.0/24).")
@click.option("--upstream", metavar="NETWORK", default="internet", show_default=True,
              help="Where the router's outside is: another NAT'd network makes a "
              "carrier-grade NAT.")
@click.option("--nat-mapping", metavar="KIND", help="endpoint-independent, address-dependent "
              "or address-and-port-dependent (eim, adm, apdm).")
@click.option("--nat-filtering", metavar="KIND", help="endpoint-independent, address-dependent "
              "or address-and-port-dependent (eif, adf, apdf).")
@click.option("--nat-hairpin/--no-nat-hairpin", default=None,
              help="Let inside machines reach each other at their outside addresses.")
@click.option("--nat-timeout", metavar="TIME", help="Forget a UDP or ping mapping idle this "
              "long (30s, 5m; default 5m).")
@click.option("--nat-tcp-timeout", metavar="TIME", help="Forget a TCP mapping idle this long "
              "(default 2h4m, RFC 5382's least).")
@click.option("--nat-port-preserve/--no-nat-port-preserve", default=None,
              help="Keep a flow's inside port outside when it is free.")
@click.option("--nat-pmp", is_flag=True, default=None,
              help="Answer NAT-PMP (RFC 6886) port mapping requests on the router's .1.")
@click.pass_context
def create(ctx: click.Context, /, name: str, subnet: str | None, seed: int | None,
           nat: str | None, wan_ip: str | None, upstream: str, nat_mapping: str | None,
           nat_filtering: str | None, nat_hairpin: bool | None, nat_timeout: str | None,
           nat_tcp_timeout: str | None,
           nat_port_preserve: bool | None, nat_pmp: bool | None, **options: Any) -> None:
    """Create network NAME; machines join it with --network NAME[:IP].

    Impairments act on every frame the network delivers to a machine, so a round
    trip crosses two: --delay 50ms makes about 100 ms, --loss 20% loses about 36%.

    \b
    Example:
      pinnace network create lan --subnet 10.77.0.0/24
      pinnace create a --network lan && pinnace create b --network lan:10.77.0.9
      pinnace network create wan --delay 50ms --jitter 5ms --loss 1%
      pinnace network create home --subnet 192.168.1.0/24 --nat easy --wan-ip 203.0.113.10

    With --nat, the network's .1 is its router (the machines' default route) and the
    internet's DNS (203.0.113.1) resolves the names of machines with public addresses
    (--network internet[:IP]); STUN listens there on 3478 and 3479.
    """
    from ..network.nat import options as nat_options

    async def go(pn: AsyncPinnace) -> None:
        fields = nat_options(mapping=nat_mapping, filtering=nat_filtering, hairpin=nat_hairpin,
                             timeout=nat_timeout, tcp_timeout=nat_tcp_timeout,
                             port_preserve=nat_port_preserve,
                             pmp=nat_pmp)
        net = await pn.networks.create(name, subnet, impair=given(options), seed=seed,
                                       nat=nat, nat_options=fields, wan_ip=wan_ip,
                                       upstream=upstream)
        router = f" behind {net.router.preset} NAT at {net.router.wan_ip}" if net.router else ""
        click.echo(f"{net.name} {net.subnet}{router}")

    call(ctx, go)


@network.command(name="set")
@click.argument("name")
@click.option("--machine", "-m", metavar="MACHINE",
              help="Change only this machine's link (over the network's impairment).")
@impairment_options
@click.option("--down", "link", flag_value="down", help="Take the link(s) down.")
@click.option("--up", "link", flag_value="up", help="Bring the link(s) up again.")
@click.option("--clear", is_flag=True, help="Drop the impairments set so far first.")
@click.option("--seed", type=int, help="A new seed for the random losses and delays.")
@click.pass_context
def set_(ctx: click.Context, /, name: str, machine: str | None, link: str | None, clear: bool,
         seed: int | None, **options: Any) -> None:
    """Change a network's impairments while it runs (or one machine's link).

    \b
    Example:
      pinnace network set lan --loss 10%
      pinnace network set lan -m b --delay 200ms --rate 1mbit
      pinnace network set lan -m b --down
      pinnace network set lan --clear
    """

    async def go(pn: AsyncPinnace) -> None:
        imp = given(options)
        if link is not None:
            imp["down"] = link == "down"
        net = await pn.networks.set(name, imp, machine=machine, clear=clear, seed=seed)
        from ..network.impair import describe

        what = describe(net.lab.link(machine)) if machine else describe(net.impairment)
        click.echo(f"{name}{f' {machine}' if machine else ''}: {what}")

    call(ctx, go)


@network.command()
@click.argument("name")
@click.argument("groups", nargs=-1, required=True)
@click.option("--oneway", is_flag=True, help="Drop only frames from the first group to the "
              "second (the second still reaches the first).")
@click.pass_context
def partition(ctx: click.Context, name: str, groups: tuple[str, ...], oneway: bool) -> None:
    """Split network NAME: machines in different GROUPS (comma-separated names) stop
    reaching each other; machines in no group reach everyone. 'heal' ends it.

    \b
    Example:
      pinnace network partition lan a,b c,d
      pinnace network partition lan a b --oneway
    """

    async def go(pn: AsyncPinnace) -> None:
        await pn.networks.partition(name, [[m for m in g.split(",") if m] for g in groups],
                                    oneway=oneway)

    call(ctx, go)


@network.command()
@click.argument("name")
@click.option("--write", "-w", "path", required=True, metavar="FILE",
              help="The pcap file to write (replaced if it exists).")
@click.option("--duration", "-d", type=click.FloatRange(min=0, min_open=True),
              metavar="SECONDS", help="Stop after this long (default: at Ctrl-C).")
@click.option("--count", "-c", type=click.IntRange(min=1), metavar="N",
              help="Stop after N frames.")
@click.option("--side", type=click.Choice(["lan", "wan"]), default="lan", show_default=True,
              help="wan: what crosses the outside of NAME's router (translated).")
@click.pass_context
def capture(ctx: click.Context, name: str, path: str, duration: float | None,
            count: int | None, side: str) -> None:
    """Write every frame that crosses network NAME into a pcap file (tcpdump -r FILE,
    Wireshark), until Ctrl-C, --duration or --count.

    \b
    Example:
      pinnace network capture lan -w lan.pcap --duration 10
      pinnace network capture home --side wan -w outside.pcap
    """
    import asyncio
    import contextlib
    import time

    seen = [24, 0]  # (where the next record starts, records counted)

    def frames() -> int:
        """Records in the file so far: read on from the last one counted."""
        with contextlib.suppress(OSError), open(path, "rb") as f:
            while True:
                f.seek(seen[0])
                head = f.read(16)
                if len(head) < 16:
                    break
                size = int.from_bytes(head[8:12], "little")
                if len(f.read(size)) < size:
                    break
                seen[0] += 16 + size
                seen[1] += 1
        return seen[1]

    async def go(pn: AsyncPinnace) -> int:
        async with pn.networks.capture(name, path, side=side):
            start, before = time.monotonic(), frames()
            click.echo(f"capturing {name} into {path}"
                       f"{'' if duration or count else ' (Ctrl-C ends it)'}", err=True)
            try:
                while duration is None or time.monotonic() - start < duration:
                    if count is not None and frames() - before >= count:
                        break
                    await asyncio.sleep(0.1)
            except asyncio.CancelledError:
                pass  # Ctrl-C: end the capture and say what it wrote
        return frames() - before

    n = call(ctx, go)
    click.echo(f"{n} frames written to {path}", err=True)


@network.command()
@click.argument("name")
@click.pass_context
def heal(ctx: click.Context, name: str) -> None:
    """End network NAME's partition.

    \b
    Example:
      pinnace network heal lan
    """

    async def go(pn: AsyncPinnace) -> None:
        await pn.networks.heal(name)

    call(ctx, go)


@network.command()
@click.argument("machine")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def netcheck(ctx: click.Context, machine: str, fmt: str) -> None:
    """Classify the NAT MACHINE sits behind, from inside it: RFC 5780's tests against
    the internet's STUN server (mapping, filtering, port preservation, hairpinning).

    \b
    Example:
      pinnace network netcheck alice
    """

    async def go(pn: AsyncPinnace) -> None:
        check = await pn.networks.netcheck(await pn.machines.get(machine))
        if fmt == "json":
            click.echo(json.dumps(check.to_dict(), indent=2))
        else:
            click.echo("\n".join(check.describe()))

    call(ctx, go)


@network.command()
@click.argument("a")
@click.argument("b")
@click.option("--port", type=click.IntRange(1, 65535), default=4000, show_default=True,
              help="The UDP port each side punches from.")
@click.option("--duration", type=click.FloatRange(0, 600, min_open=True), default=6.0,
              show_default=True, metavar="SECONDS", help="How long both sides send.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def punch(ctx: click.Context, a: str, b: str, port: int, duration: float, fmt: str) -> None:
    """Try UDP hole punching between machines A and B, as peer-to-peer software does:
    each learns its public address from STUN and both send to the other's at once.
    Says whether a direct path opened (the exit code is 0 either way).

    \b
    Example:
      pinnace network punch alice bob
    """

    async def go(pn: AsyncPinnace) -> None:
        result = await pn.networks.punch(await pn.machines.get(a), await pn.machines.get(b),
                                         port=port, duration=duration)
        click.echo(json.dumps(result.to_dict(), indent=2) if fmt == "json"
                   else result.describe())

    call(ctx, go)


@network.command(name="ls")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def ls(ctx: click.Context, fmt: str) -> None:
    """List networks, with their machines and whether their switch runs.

    \b
    Example:
      pinnace network ls --format json
    """
    from ..network import switch

    async def go(pn: AsyncPinnace) -> None:
        rows = []
        for net in pn.networks.list():
            members = pn.networks.members(net.name)
            alive = switch.running(net.path)["switch_alive"]
            rows.append({**net.to_dict(), "machines": sorted(members),
                         "switch": "running" if alive else "stopped"})
        if fmt == "json":
            click.echo(json.dumps(rows, indent=2))
            return
        table = [("NAME", "SUBNET", "SWITCH", "MACHINES", "IMPAIRED", "ROUTER")]
        table += [(r["name"], r["subnet"], r["switch"], ",".join(r["machines"]) or "-",
                   r["impair"] if r["impair"] != "none" or not r["links"] else "per machine",
                   f"{r['router']['preset']} NAT, {r['router']['wan_ip']} on "
                   f"{r['router']['upstream']}" if r["router"] else
                   "internet core" if r["internet"] else "-")
                  for r in rows]
        echo_table(table)

    call(ctx, go)


@network.command()
@click.argument("name")
@click.pass_context
def inspect(ctx: click.Context, name: str) -> None:
    """Show a network as JSON: subnet, machines and addresses, switch processes.

    \b
    Example:
      pinnace network inspect lan
    """
    from ..network import switch

    async def go(pn: AsyncPinnace) -> None:
        net = pn.networks.get(name)
        members = {m: [{"nic": i, "address": ip} for i, ip in nics]
                   for m, nics in pn.networks.members(name).items()}
        click.echo(json.dumps({**net.to_dict(), "machines": members,
                               "switch": switch.running(net.path)}, indent=2))

    call(ctx, go)


@network.command(name="rm")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def rm(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Remove networks (refused while machines are on them); their switches stop.

    \b
    Example:
      pinnace network rm lan
    """

    async def act(pn: AsyncPinnace, name: str) -> str:
        await pn.networks.remove(name)
        return "removed"

    each(ctx, names, act)


@network.command()
@click.argument("name")
@click.argument("machine")
@click.option("--ip", metavar="ADDRESS", help="Address on the network (default: next free).")
@click.pass_context
def connect(ctx: click.Context, name: str, machine: str, ip: str | None) -> None:
    """Plug MACHINE into network NAME; a running machine uses a spare NIC (--spare-nics).

    \b
    Example:
      pinnace create c --spare-nics 1 --start && pinnace network connect lan c
    """

    async def go(pn: AsyncPinnace) -> None:
        await pn.networks.named(name)
        addr = await (await pn.machines.get(machine)).connect(name, ip)
        click.echo(addr)

    call(ctx, go)


@network.command()
@click.argument("name")
@click.argument("machine")
@click.pass_context
def disconnect(ctx: click.Context, name: str, machine: str) -> None:
    """Unplug MACHINE from network NAME (a running machine keeps the NIC, spare).

    \b
    Example:
      pinnace network disconnect lan c
    """

    async def go(pn: AsyncPinnace) -> None:
        await (await pn.machines.get(machine)).disconnect(name)

    call(ctx, go)
