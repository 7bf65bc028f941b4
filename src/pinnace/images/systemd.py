"""What an image with systemd as its init (``init="systemd"``) has besides the packages.

systemd is PID 1 and runs the pinnace agent as an early service, so the host reaches the
guest as soon as on an image whose init is the agent, while systemd goes on booting.
The agent then leaves init's duties to systemd (agent/guest.py: IS_INIT) but still sets
what is the host's to set: the hostname, the clock, the NICs and /run/resolv.conf.

What would fight the agent or the host, or only slows a microVM's boot down, is masked
(MASKED and MASKED_GENERATORS, with the reasons). The image's digest covers this file's text, so
a change here rebuilds systemd images and no other.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

# The kernel's init= for either kernel (images/init.sh honours it too). net.ifnames=0:
# udev keeps the kernel's NIC names (the agent finds a NIC by its MAC, but a rename
# under a request fails it); show_status=error: the console is a serial port, slow
# under TCG, so only failures are printed on it.
KERNEL_ARGS = "init=/lib/systemd/systemd net.ifnames=0 systemd.show_status=error"

AGENT_UNIT = "pinnace-agent.service"
# DefaultDependencies=no: started with the first units, not after sysinit.target (what
# it needs, /dev's virtio ports, / read-write and /run, is there before any unit). The
# commands it runs are its children, in its cgroup: no task limit (a build's make -j),
# and an agent that restarts leaves them running (KillMode=process). Nice=-10: on one
# busy vCPU it starts in a second rather than in several, among the other units; it
# goes back to 0 before it runs anything (agent/guest.py: leave_boot_priority). Its
# log goes to the console as well, where the host's serial log has it as before.
AGENT_SERVICE = """\
[Unit]
Description=pinnace guest agent
DefaultDependencies=no
After=systemd-journald.socket
IgnoreOnIsolate=yes
StartLimitIntervalSec=0

[Service]
ExecStart=/usr/lib/pinnace/agent
Restart=always
RestartSec=500ms
KillMode=process
TasksMax=infinity
Nice=-10
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=sysinit.target
"""

# Units masked (linked to /dev/null), and why. A machine's boot is slow under TCG, one
# vCPU shared by every unit that starts at once: what does nothing here is left out.
MASKED = {
    # the agent configures the NICs and name servers itself, on every clone
    "systemd-networkd.service": "network", "systemd-networkd.socket": "network",
    "systemd-networkd-wait-online.service": "network", "systemd-resolved.service": "network",
    "networking.service": "network", "NetworkManager.service": "network",
    # the host sets the clock (on a restore too) and seeds the RNG (virtio-rng, and a
    # reseed on every restore; the seed file would be every machine's of the image)
    "systemd-timesyncd.service": "host", "systemd-random-seed.service": "host",
    # the console is an output-only file on the host: nobody logs in on it, nor at all
    # (the agent runs commands without a login session; sudo needs none)
    "getty.target": "no logins", "console-getty.service": "no logins",
    "systemd-logind.service": "no logins", "systemd-update-utmp.service": "no logins",
    "systemd-update-utmp-runlevel.service": "no logins",
    # downloads and upgrades behind a job's back
    "apt-daily.timer": "maintenance", "apt-daily-upgrade.timer": "maintenance",
    # upkeep of a long-lived machine, not of one that lives for a job
    "dpkg-db-backup.timer": "maintenance", "e2scrub_all.timer": "maintenance",
    "e2scrub_reap.service": "maintenance", "fstrim.timer": "maintenance",
    "man-db.timer": "maintenance", "logrotate.timer": "maintenance",
    # built into pinnace's kernel or not in it (Debian's loads them when first used)
    "modprobe@configfs.service": "kernel", "modprobe@dm_mod.service": "kernel",
    "modprobe@drm.service": "kernel", "modprobe@efi_pstore.service": "kernel",
    "modprobe@fuse.service": "kernel", "modprobe@loop.service": "kernel",
    # the journal is in RAM (FILES): nothing to flush to /var
    "systemd-journal-flush.service": "journal",
    # nothing in the image registers binary formats at boot (a package that adds one
    # registers it as it is installed; /proc/sys/fs/binfmt_misc still mounts on use)
    "systemd-binfmt.service": "binfmt",
    # the image has a machine id; it would ask on the console otherwise
    "systemd-firstboot.service": "first boot",
}

# Generators masked: each is a program run before any unit starts (~0.2 s each under
# TCG), for what a pinnace machine has not: encrypted, verity or integrity disks, a GPT
# root to find, a hibernation image, an offline update, /etc/rc.local, systemd.run= on
# the kernel's command line, a console to log in on. (fstab, sysv and debug stay.)
MASKED_GENERATORS = (
    "systemd-cryptsetup-generator", "systemd-integritysetup-generator",
    "systemd-veritysetup-generator", "systemd-gpt-auto-generator",
    "systemd-hibernate-resume-generator", "systemd-system-update-generator",
    "systemd-rc-local-generator", "systemd-run-generator", "systemd-getty-generator",
)

FILES = {
    f"etc/systemd/system/{AGENT_UNIT}": AGENT_SERVICE,
    # journal in RAM: a machine lives for a job, and its disk stays as the image left it
    "etc/systemd/journald.conf.d/pinnace.conf": "[Journal]\nStorage=volatile\n",
    # a unit that will not stop gets 5 s, not 90: the host's stop waits 10 s for the
    # guest to power off before it has QEMU quit
    "etc/systemd/system.conf.d/pinnace.conf": "[Manager]\nDefaultTimeoutStopSec=5s\n",
}

LINKS = {
    f"etc/systemd/system/sysinit.target.wants/{AGENT_UNIT}": f"/etc/systemd/system/{AGENT_UNIT}",
    "etc/systemd/system/default.target": "/lib/systemd/system/multi-user.target",
    **{f"etc/systemd/system/{unit}": "/dev/null" for unit in MASKED},
    **{f"etc/systemd/system-generators/{name}": "/dev/null" for name in MASKED_GENERATORS},
}


def source() -> Path:
    return Path(__file__).resolve()


def machine_id(image_digest: str) -> str:
    """The image's machine id: fixed, so that no boot is a first boot (which would run
    'preset-all' and the first-boot units); every machine of the image shares it, as
    clones of one snapshot would anyway."""
    return hashlib.sha256(b"pinnace machine-id " + image_digest.encode()).hexdigest()[:32]


def install(root: Path, image_digest: str) -> None:
    """Lay the agent's unit, the masks and the settings into the unpacked root."""
    for rel, text in FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for rel, target in LINKS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        path.symlink_to(target)
    (root / "etc/machine-id").write_text(machine_id(image_digest) + "\n")
    mark_updated(root)


def mark_updated(root: Path) -> None:
    """Say /etc and /var are up to date with /usr, as systemd-update-done would at the
    first boot: units with ConditionNeedsUpdate (ldconfig, hwdb, sysusers, the journal's
    catalog) would otherwise run on every cold boot, since that first boot's marks are
    in each machine's own disk, never in the image's (and dpkg's triggers did that work
    as the packages were installed)."""
    usr = (root / "usr").stat().st_mtime_ns
    mark = usr + 1_000_000_000  # a second later: not compared to the nanosecond
    for rel in ("etc/.updated", "var/.updated"):
        path = root / rel
        path.write_text(f"# pinnace image build\nTIMESTAMP_NSEC={usr}\n")
        os.utime(path, ns=(mark, mark))
