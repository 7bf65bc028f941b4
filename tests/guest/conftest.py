"""Fixtures that boot real guests. The image is built once per store and cached."""

import contextlib
import itertools
import os
import sys

import pytest

from pinnace import Pinnace, PinnaceError

_counter = itertools.count()


@pytest.fixture(scope="session")
def pn(pinnace_home):
    with Pinnace(pinnace_home) as p:
        # What an earlier run that was killed left (its machines, networks and volumes
        # are its own: see the factories below) goes first.
        p.gc(owned_only=True)
        p.images.build()
        yield p
        with contextlib.suppress(PinnaceError):  # made when a test first needed it; refused
            p.networks.remove("internet")  # while something is on it or behind it


@pytest.fixture
def make_machine(pn, request):
    """A factory for machines that are killed and deleted after the test.

    When the test fails, the serial log of each machine is printed first. The machines
    (and the networks and volumes below) belong to this test run: if it is killed, the
    next run (or 'pinnace gc') removes them.
    """
    made = []

    def make(**options):
        name = f"t{os.getpid() % 10000}-{next(_counter)}"
        m = pn.machines.create(name, **{"ephemeral": True, **options})
        made.append(m)
        return m

    def restored(**devices):
        """A machine restored from the image's ready snapshot of its shape (a fraction of
        a second, where a cold boot takes several under TCG); ``devices`` are run's."""
        [m] = pn.machines.run(name=f"t{os.getpid() % 10000}-{next(_counter)}", rm=True,
                              **devices)
        made.append(m)
        return m

    def track(m):
        """Delete ``m`` (made some other way) after the test, like the others."""
        made.append(m)
        return m

    make.restored = restored
    make.track = track

    yield make
    failed = getattr(request.node, "rep_call", None)
    for m in made:
        if failed is not None and failed.failed:
            sys.stderr.write(f"\n--- serial log of {m.name} ---\n{m.serial_tail(60)}\n")
        if m.path.exists():
            m.delete(force=True)
        assert not m.path.exists()


@pytest.fixture
def machine(make_machine):
    """A ready machine, restored from the ready snapshot (tests of booting itself make
    their own with make_machine)."""
    return make_machine.restored()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def network(pn):
    """A factory for virtual networks that are removed after the test."""
    made = []

    def make(subnet=None, **options):
        """``options``: create's (nat=, wan_ip=, impair=, ...)."""
        name = f"tn{os.getpid() % 10000}-{next(_counter)}"
        pn.networks.create(name, subnet, ephemeral=True, **options)
        made.append(name)
        return name

    yield make
    for name in reversed(made):  # (a network behind another goes first)
        pn.networks.remove(name)


@pytest.fixture
def volume(pn):
    """A factory for volumes that are removed after the test."""
    made = []

    def make(size="64M", journal=True):
        name = f"tv{os.getpid() % 10000}-{len(made)}"
        pn.volumes.create(name, size, journal=journal, ephemeral=True)
        made.append(name)
        return name

    yield make
    for name in made:
        pn.volumes.remove(name)
