"""The runner-shaped image that CI jobs with runs-on: ubuntu-* get (images/presets.py):
systemd as init with the agent as its service, build tools, apt ready to install.

The image is built once per store and session (minutes the first time: many packages);
each test restores machines from its ready snapshot. Nothing here leaves the host: the
guests have no way out, and apt is only asked what it already knows.
"""

import textwrap
import time

import pytest


@pytest.fixture(scope="session")
def runner_image(pn):
    return pn.images.ensure_preset("ubuntu")


@pytest.fixture
def runner(make_machine, runner_image):
    return make_machine.restored(image="ubuntu")


def sh(machine, script, timeout=120, user=None):
    """Run a shell script in the guest; fail the test with its output if it fails."""
    r = machine.exec(["sh", "-euc", textwrap.dedent(script)], timeout=timeout, user=user)
    assert r.exit_code == 0, (f"exit {r.exit_code}\nstdout:\n{r.stdout.decode(errors='replace')}"
                              f"\nstderr:\n{r.stderr.decode(errors='replace')}")
    return r.stdout.decode()


def test_the_preset_is_systemd_with_apt_ready(runner_image, runner):
    inputs = runner_image.manifest["inputs"]
    assert inputs["init_system"]["name"] == "systemd" and inputs["apt_lists"] is True
    assert "init=/lib/systemd/systemd" in runner_image.manifest["boot_args"]
    assert "init=/lib/systemd/systemd" in sh(runner, "cat /proc/cmdline")
    sh(runner, "dpkg-query -W systemd systemd-sysv dbus build-essential cmake clang git")


def test_systemd_is_pid_1_and_its_boot_ended_with_nothing_failed(runner):
    assert runner.info()["pid1"] is False  # the agent is systemd's service
    assert sh(runner, "cat /proc/1/comm").strip() == "systemd"
    r = runner.exec(["systemctl", "is-system-running"])
    failed = sh(runner, "systemctl --failed --no-pager --plain")
    assert r.stdout.decode().strip() == "running", failed
    assert sh(runner, "systemctl is-active pinnace-agent").strip() == "active"
    # what would fight the agent is masked, and the journal is running
    out = sh(runner, """
        for u in systemd-networkd systemd-timesyncd systemd-resolved getty.target; do
            systemctl is-enabled $u || true
        done
        systemctl is-active systemd-journald
    """)
    assert out.split() == ["masked"] * 4 + ["active"]


def test_a_unit_the_user_writes_starts_and_serves(runner):
    sh(runner, """
        mkdir -p /srv/www && echo 'served by a unit' > /srv/www/index.txt
        cat > /etc/systemd/system/hello-web.service <<'EOF'
        [Unit]
        Description=a web server a job starts
        [Service]
        ExecStart=/usr/bin/python3 -m http.server 8123 --bind 127.0.0.1 --directory /srv/www
        EOF
        systemctl daemon-reload
        systemctl start hello-web
    """)
    assert sh(runner, "systemctl is-active hello-web").strip() == "active"
    got = sh(runner, """
        python3 - <<'EOF'
        import time, urllib.request
        for _ in range(300):  # it binds its port a moment after it starts
            try:
                print(urllib.request.urlopen("http://127.0.0.1:8123/index.txt").read().decode())
                break
            except OSError:
                time.sleep(0.1)
        EOF
    """)
    assert got.strip() == "served by a unit"
    status = sh(runner, "systemctl status hello-web --no-pager || true")
    assert "active (running)" in status
    assert "GET /index.txt" in sh(runner, "journalctl -u hello-web --no-pager")
    sh(runner, "systemctl stop hello-web")
    assert runner.exec(["systemctl", "is-active", "hello-web"]).exit_code != 0


def test_modules_load_and_the_agent_still_sets_up_the_guest(runner):
    out = sh(runner, """
        modprobe dummy
        ip link add d0 type dummy
        ip link set d0 up
        ip -br link show d0
    """)
    assert out.startswith("d0")
    # the host's settings: the NAT NIC's address, the name servers' file, the clock
    addr = sh(runner, "ip -4 -o addr show dev eth0")
    assert " inet " in addr, addr
    assert sh(runner, "readlink /etc/resolv.conf; test -f /run/resolv.conf && echo here"
              ).split() == ["/run/resolv.conf", "here"]
    guest = float(sh(runner, "date +%s.%N"))
    assert abs(guest - time.time()) < 30


def test_files_and_hostname_as_on_the_default_image(runner, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("to the guest and back\n")
    runner.files.put(src, "/srv/in.txt")
    runner.files.get("/srv/in.txt", tmp_path / "back.txt")
    assert (tmp_path / "back.txt").read_text() == "to the guest and back\n"
    runner.set_hostname("renamed-runner")
    assert sh(runner, "hostname; hostnamectl hostname").split() == ["renamed-runner"] * 2


def test_apt_is_ready_without_fetching_anything(runner):
    assert '"true"' in sh(runner, "apt-config dump | grep -i assume-yes")
    policy = sh(runner, "apt-cache policy hello")
    assert "Candidate:" in policy and "Candidate: (none)" not in policy, policy
    assert sh(runner, "ls /var/lib/apt/lists | grep -c _Packages").strip() != "0"


def test_build_tools_are_there(runner):
    out = sh(runner, """
        cc --version | head -n1
        cmake --version | head -n1
        clang --version | head -n1
        git --version
        printf 'int main(void) { return 7; }\\n' > /tmp/t.c
        cc -o /tmp/t /tmp/t.c
        /tmp/t || echo "exit $?"
    """, timeout=300)
    lines = out.splitlines()
    assert lines[0].startswith("cc (Debian") and lines[1].startswith("cmake version")
    assert "clang version" in lines[2] and lines[3].startswith("git version")
    assert lines[-1] == "exit 7"


def test_a_user_with_sudo(runner):
    sh(runner, """
        useradd -m -s /bin/bash runner
        echo 'runner ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/runner
        chmod 0440 /etc/sudoers.d/runner
    """)
    out = sh(runner, "id -un; sudo -n id -u; systemctl is-system-running", user="runner")
    assert out.split() == ["runner", "0", "running"]  # (systemctl as a user: over D-Bus)


def test_stop_and_clones_of_the_same_snapshot(make_machine, runner_image):
    first = make_machine.restored(image="ubuntu")
    second = make_machine.restored(image="ubuntu")
    names = [sh(m, "hostname").strip() for m in (first, second)]
    assert names == [first.name, second.name] and names[0] != names[1]
    t0 = time.monotonic()
    status = first.stop()
    took = time.monotonic() - t0
    assert str(status.state) == "stopped", status
    assert status.reason == "powered off by the agent", (status, took)
    assert sh(second, "systemctl is-system-running").strip() == "running"
