"""The pinnace guest agent: runs inside the guest, standard library only.

Started right after the root is mounted, usually as PID 1 (the init= of pinnace's
kernel, or exec'd by the initramfs that boots Debian's), in
which case it also does init's duties: mounts, loopback, hostname, reaping
orphans and a clean poweroff. On an image whose init is systemd it is an early
service instead, and leaves those duties to systemd (poweroff is asked of it). It serves the host on every virtio-serial port
named ``org.pinnace.agent.N``: one session per port, many requests per session,
all on one single-threaded selector loop.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import sys
import time

# The C modules under signal and socket: those build enums at import, which with
# selectors' collections cost ~0.25 s of a cold boot under TCG (docs/boot.md). The agent
# uses plain numbers, and Poller below for selectors.
try:
    import _signal as signal  # type: ignore[import-not-found]
    import _socket as socket
except ImportError:  # not CPython
    import signal
    import socket  # type: ignore[no-redef]

TYPE_CHECKING = False  # typing costs ~40 ms of start-up under TCG; mypy still sees it
if TYPE_CHECKING:
    from typing import Any

if __package__:
    from . import protocol as P
else:  # in the guest, protocol.py sits next to this file
    import protocol as P  # type: ignore[import-not-found,no-redef]

IS_INIT = os.getpid() == 1
LOG_PREFIX = "pinnace-agent:"
OUTBUF_HIGH = 8 << 20  # stop reading child output while this much waits for the port
READ_CHUNK = 256 << 10
HUP_GRACE = 0.5  # a port without a host this long has lost it (see Port.hung_up)
PORT_PAGE = 4096  # virtio_console's receive buffers: one page each
PORT_WRITE = 32 << 10  # and the most it takes in one write()


def log(*args: object) -> None:
    print(LOG_PREFIX, *args, file=sys.stderr, flush=True)


# What subprocess (restore_signals) resets for a child: Python ignores these itself.
DEFAULT_SIGNALS = tuple(getattr(signal, n) for n in ("SIGPIPE", "SIGXFZ", "SIGXFSZ")
                        if hasattr(signal, n))


def find_program(name: str, env: dict[str, str]) -> str:
    """The file ``name`` runs, searched in ``env``'s PATH as execvpe (and subprocess) do:
    the first executable regular file; FileNotFoundError or PermissionError if none."""
    if "/" in name:
        return name
    denied = None
    for folder in (env.get("PATH") or os.defpath).split(os.pathsep):
        path = os.path.join(folder or ".", name)
        if os.path.isfile(path):
            if os.access(path, os.X_OK):
                return path
            denied = path
    if denied is not None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), denied)
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


def _subprocess() -> Any:
    """The subprocess module, imported on first use: it is the largest import of the
    agent's (~90 ms under TCG), and nothing before the first exec needs it."""
    import subprocess

    return subprocess


# --- init duties ----------------------------------------------------------------------

_libc = None


def libc() -> Any:
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    if libc().mount(source.encode(), target.encode(), fstype.encode(), flags,
                    data.encode() if data else None) != 0:
        import ctypes

        err = ctypes.get_errno()
        if err != errno.EBUSY:
            log(f"mount {target} failed: {os.strerror(err)}")


MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_RDONLY = 2, 4, 8, 32, 1


def cmdline_args() -> dict[str, str]:
    try:
        words = open("/proc/cmdline").read().split()
    except OSError:
        return {}
    out = {}
    for w in words:
        if w.startswith("pinnace.") and "=" in w:
            k, v = w.split("=", 1)
            out[k[len("pinnace."):]] = v
    return out


def init_system() -> None:
    """What init would do before services start (pinnace's initramfs did the mounts)."""
    if not os.path.exists("/proc/self"):
        mount_all()
    set_environment()
    _netconf().set_up("lo")
    take_identity()


def join_system() -> None:
    """Under another init (systemd, whose service the agent is): init's duties are its,
    but what the host sets (the hostname, the name servers' file) is still the agent's."""
    set_environment()
    take_identity()


# What systemd puts in a service's environment: about the agent's service, not about the
# commands it runs (a program that sees JOURNAL_STREAM may take its stderr for the journal).
SERVICE_ENV = ("INVOCATION_ID", "JOURNAL_STREAM", "SYSTEMD_EXEC_PID", "NOTIFY_SOCKET",
               "WATCHDOG_PID", "WATCHDOG_USEC", "MANAGERPID", "LISTEN_FDS", "LISTEN_PID",
               "LISTEN_FDNAMES")


def set_environment() -> None:
    """The environment commands start with, whoever started the agent."""
    os.environ["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    os.environ.setdefault("HOME", "/root")
    os.environ.setdefault("LANG", "C.UTF-8")
    for name in SERVICE_ENV:
        os.environ.pop(name, None)


def leave_boot_priority() -> None:
    """Back to the usual priority: systemd starts the agent at a higher one (its unit's
    Nice=), to be up early in the boot, which the commands it runs must not inherit."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) < 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        pass


def take_identity() -> None:
    """An empty name servers' file (its link's target is on tmpfs: none yet after a cold
    boot), and the hostname the host put on the kernel's command line."""
    if os.path.islink(RESOLV_CONF) and not os.path.exists(RESOLV_CONF):
        try:
            open(RESOLV_CONF, "w").close()
        except OSError:
            pass
    args = cmdline_args()
    if "hostname" in args:
        set_hostname(args["hostname"])


def mount_all() -> None:
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755")
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666")
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")


def set_hostname(name: str) -> None:
    socket.sethostname(name)
    _name_in_hosts(name)
    if os.path.islink("/etc/hostname"):
        return  # pinnace images link it to /proc/sys/kernel/hostname: nothing to write
    try:
        with open("/etc/hostname", "w") as f:
            f.write(name + "\n")
    except OSError:
        pass


def _name_in_hosts(name: str) -> None:
    """Make /etc/hosts's 127.0.1.1 line (Debian's for the host's own name) say ``name``,
    so that the machine resolves its own name (sudo warns on every call otherwise).
    Bytes in, bytes out (whatever else the file holds is kept as it is); a linked
    /etc/hosts is someone else's to manage; a name that is not a hostname is left out."""
    if not is_hostname(name) or os.path.islink("/etc/hosts"):
        return
    try:
        with open("/etc/hosts", "rb") as f:
            lines = f.read().splitlines()
        wanted = b"127.0.1.1\t" + name.encode()
        kept = [ln for ln in lines if ln.split()[:1] != [b"127.0.1.1"]]
        if wanted in lines and len(kept) == len(lines) - 1:
            return
        with open("/etc/hosts.pinnace", "wb") as f:
            f.write(b"\n".join([*kept[:1], wanted, *kept[1:]]) + b"\n")
        os.rename("/etc/hosts.pinnace", "/etc/hosts")
    except OSError:
        pass


def is_hostname(name: str) -> bool:
    """1-64 letters, digits, '-' and '.' (RFC 1123, loosely): nothing a file or a shell
    could take for something else."""
    return 0 < len(name) <= 64 and name.isascii() and all(
        c.isalnum() or c in "-." for c in name)


def as_user(user: str | None, env: dict[str, str], asked: dict[str, str]) -> dict[str, Any]:
    """Popen's keywords that run a command as ``user`` (a name or a uid): its uid, its
    primary and supplementary groups (not root's), and HOME, USER and LOGNAME in ``env``
    unless the request set them (``asked``)."""
    if user is None:
        return {}
    import pwd

    numeric = user.isascii() and user.isdigit()
    try:
        pw = pwd.getpwuid(int(user)) if numeric else pwd.getpwnam(user)
        groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
    except (KeyError, ValueError, OverflowError, OSError):
        if numeric and int(user) < 2**32 - 1:  # a uid with no name: its own group only
            if "HOME" not in asked:
                env["HOME"] = "/"
            return {"user": int(user), "group": int(user), "extra_groups": []}
        raise RequestFailed("bad-request", f"there is no user {user!r} in the guest") from None
    for key, value in (("HOME", pw.pw_dir), ("USER", pw.pw_name), ("LOGNAME", pw.pw_name)):
        if key not in asked:
            env[key] = value
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": groups}


def power(action: str) -> None:
    """Stop every process, sync, and power off or reboot; does not return when PID 1.
    Under systemd, ask it to (its units stop in order); if it cannot, do it at once."""
    os.sync()
    if not IS_INIT:
        sp = _subprocess()
        try:  # --no-block: queued, not waited for (systemd stops the agent on the way)
            asked = sp.run(["systemctl", "--no-block", action], timeout=30,
                           stdin=sp.DEVNULL, capture_output=True)
            if asked.returncode == 0:
                return
            why = asked.stderr.decode(errors="replace").strip()
        except (OSError, sp.SubprocessError) as exc:  # no systemctl, or a hung systemd
            why = repr(exc)
        log(f"systemctl {action} failed ({why}); {action} at once")
    else:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(-1, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(-1, os.WNOHANG) == (0, 0):
                        time.sleep(0.02)
                except ChildProcessError:
                    break
    os.sync()
    unmount_attached()
    libc().mount(b"none", b"/", None, MS_REMOUNT | MS_RDONLY, None)
    cmd = 0x4321FEDC if action == "poweroff" else 0x01234567
    libc().reboot(cmd)


def unmount_attached() -> tuple[list[str], list[str]]:
    """Unmount the volumes and shares the host attached (the ext4 journals end clean);
    return the mount points unmounted and those that could not be."""
    done: list[str] = []
    failed: list[str] = []
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return done, failed
    for fields in reversed(mounts):
        if len(fields) > 2 and ((fields[0].startswith("/dev/vd") and fields[1] != "/")
                                or fields[2] == "9p"):
            target = fields[1].replace("\\040", " ")
            if libc().umount2(target.encode(), 0) != 0:
                log(f"could not unmount {fields[1]}")
                failed.append(target)
            else:
                done.append(target)
    return done, failed


def op_unmount(session: Session, chan: int, msg: dict[str, Any]) -> dict[str, Any]:
    """Unmount every volume and share the host attached: before the host kills the
    machine, so that what was written is on the volumes and their journals are clean."""
    os.sync()
    done, failed = unmount_attached()
    return {"unmounted": done, "failed": failed}


# --- sessions and requests ------------------------------------------------------------


F_SETPIPE_SZ = 1031
DEFAULT_PIPE = 64 << 10
PIPE_SIZE = 1 << 20  # the default pipe-max-size: 16x fewer wake-ups than a default pipe


def grow_pipe(fd: int) -> None:
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # over pipe-max-size or the user's pipe quota: the default size works too


class RequestFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


COLLECT_FILES = 8  # files an exec may ask to be read back when it ends
COLLECT_BYTES = 64 << 10  # and the most of each sent (the reply is one frame)


def collect_files(paths: list[str]) -> list[list[Any]]:
    """``[size, base64 of its first COLLECT_BYTES]`` of each path, for an exec's reply:
    read without following a last link, and only regular files (a FIFO a command left
    there must not block the agent); [-1, ""] for what is missing or not a file."""
    import binascii
    import stat

    out: list[list[Any]] = []
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            out.append([-1, ""])
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                out.append([-1, ""])
                continue
            data = b""
            while len(data) < COLLECT_BYTES:
                chunk = os.read(fd, COLLECT_BYTES - len(data))
                if not chunk:
                    break
                data += chunk
            size = max(st.st_size, len(data))
            out.append([size, binascii.b2a_base64(data, newline=False).decode("ascii")])
        except OSError:
            out.append([-1, ""])
        finally:
            os.close(fd)
    return out


class Exec:
    """One running command of a session."""

    def __init__(self, agent: Agent, session: Session, chan: int, req: dict[str, Any]) -> None:
        self.agent = agent
        self.session = session
        self.chan = chan
        self.timed_out = False
        self.status: int | None = None
        self.credit = {P.STDOUT: P.STREAM_WINDOW, P.STDERR: P.STREAM_WINDOW}
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.stdin_fd: int | None = None
        self.out_fds: dict[int, int] = {}  # fd -> stream
        self.paused: set[int] = set()
        self.master: int | None = None
        argv = req.get("argv")
        shell = req.get("shell")
        if shell is not None:
            if not isinstance(shell, str):
                raise RequestFailed("bad-request", "shell must be a string")
            argv = ["/bin/sh", "-c", shell]
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise RequestFailed("bad-request", "argv must be a non-empty list of strings")
        env = dict(os.environ)
        extra = req.get("env") or {}
        if not isinstance(extra, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise RequestFailed("bad-request", "env must map strings to strings")
        env.update(extra)
        cwd = req.get("cwd") or None
        user = req.get("user") or None
        if user is not None and not isinstance(user, str):
            raise RequestFailed("bad-request", "user must be a string")
        ident = as_user(user, env, extra)
        collect = req.get("collect") or []
        if not (isinstance(collect, list) and len(collect) <= COLLECT_FILES and all(
                isinstance(c, str) and c.startswith("/") and "\0" not in c for c in collect)):
            raise RequestFailed("bad-request", f"collect must list at most {COLLECT_FILES} "
                                "absolute paths")
        self.collect: list[str] = collect
        timeout = req.get("timeout")
        self.deadline = time.monotonic() + float(timeout) if timeout else None
        pty = req.get("pty")
        want_stdin = bool(req.get("stdin"))
        try:
            if pty:
                self._spawn_pty(argv, env, cwd, ident, pty)
            else:
                self._spawn_pipes(argv, env, cwd, ident, want_stdin)
        except FileNotFoundError as exc:
            raise RequestFailed("not-found", f"{exc.filename or argv[0]}: no such file or directory") from None
        except PermissionError as exc:
            raise RequestFailed("permission", f"{exc.filename or argv[0]}: permission denied") from None
        except (KeyError, ValueError, OSError) as exc:
            raise RequestFailed("spawn-failed", f"cannot start {argv[0]}: {exc}") from None
        agent.procs[self.pid] = self

    def _spawn_pipes(self, argv: list[str], env: dict[str, str], cwd: str | None,
                     ident: dict[str, Any], want_stdin: bool) -> None:
        if cwd is None and not ident:
            # posix_spawn (vfork): no Python fork, and no subprocess module to import (it
            # is ~0.2 s of a cold boot's first exec under TCG). Pipes are made
            # non-inheritable (PEP 446), so the child gets only the three dup2'ed here.
            stdin_r, stdin_w = os.pipe() if want_stdin else (os.open(os.devnull, os.O_RDONLY), -1)
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            try:
                self.pid = os.posix_spawn(
                    find_program(argv[0], env), argv, env,
                    file_actions=[(os.POSIX_SPAWN_DUP2, stdin_r, 0),
                                  (os.POSIX_SPAWN_DUP2, out_w, 1),
                                  (os.POSIX_SPAWN_DUP2, err_w, 2)],
                    setsid=True, setsigdef=DEFAULT_SIGNALS)
            except BaseException:
                for fd in (stdin_w, out_r, err_r):
                    if fd >= 0:
                        os.close(fd)
                raise
            finally:
                for fd in (stdin_r, out_w, err_w):
                    os.close(fd)
            if want_stdin:
                self.stdin_fd = stdin_w
                os.set_blocking(stdin_w, False)
            fds = [(P.STDOUT, out_r), (P.STDERR, err_r)]
        else:
            subprocess = _subprocess()
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE if want_stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd, **ident,
                start_new_session=True, close_fds=True,
            )
            self.pid = proc.pid
            proc.returncode = 0  # we reap it ourselves; stop Popen from trying
            if proc.stdin is not None:
                self.stdin_fd = os.dup(proc.stdin.fileno())
                proc.stdin.close()
                os.set_blocking(self.stdin_fd, False)
            fds = []
            for stream, pipe in ((P.STDOUT, proc.stdout), (P.STDERR, proc.stderr)):
                assert pipe is not None
                fds.append((stream, os.dup(pipe.fileno())))
                pipe.close()
        for stream, fd in fds:
            os.set_blocking(fd, False)
            self.out_fds[fd] = stream
            self.agent.sel.register(fd, EVENT_READ, ("out", self, fd))

    def _spawn_pty(self, argv: list[str], env: dict[str, str], cwd: str | None,
                   ident: dict[str, Any], pty: Any) -> None:
        import pty as ptymod
        import termios

        rows, cols = (pty.get("rows", 24), pty.get("cols", 80)) if isinstance(pty, dict) else (24, 80)
        if not all(isinstance(n, int) and 0 < n < 65536 for n in (rows, cols)):
            raise RequestFailed("bad-request", "pty rows and cols must be 1-65535")
        master, slave = ptymod.openpty()
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env.setdefault("TERM", (pty.get("term") if isinstance(pty, dict) else None) or "xterm")

        def child_setup() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        try:
            if ident:  # the terminal is the user's (programs that reopen ttyname() need it)
                os.fchown(slave, ident["user"], ident["group"])
            proc = _subprocess().Popen(
                argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, **ident,
                start_new_session=True, close_fds=True, preexec_fn=child_setup,
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.pid = proc.pid
        proc.returncode = 0
        os.set_blocking(master, False)
        self.master = master
        self.stdin_fd = master
        self.out_fds[master] = P.STDOUT
        self.agent.sel.register(master, EVENT_READ, ("out", self, master))

    # -- streams --
    def on_output(self, fd: int) -> None:
        stream = self.out_fds[fd]
        want = min(READ_CHUNK, self.credit[stream], P.MAX_FRAME)
        try:
            data = os.read(fd, want)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: the pty's last writer went away
                raise
            data = b""
        if not data:
            self._close_out(fd)
            self.session.send(P.encode(P.EOF, self.chan, b"", stream))
            if not self.out_fds and self.status is None:
                self.agent.reap(self.pid)  # it has usually exited: answer now, not at SIGCHLD
            else:
                self.maybe_finish()
            return
        if len(data) == DEFAULT_PIPE and fd != self.master:
            grow_pipe(fd)  # a fast writer: fewer, bigger reads from now on
        self.credit[stream] -= len(data)
        self.session.send(P.encode(P.DATA, self.chan, data, stream))
        if self.credit[stream] <= 0 or self.session.congested():
            self.pause(fd)

    def pause(self, fd: int) -> None:
        if fd not in self.paused and fd in self.out_fds:
            self.paused.add(fd)
            self.agent.sel.unregister(fd)
            if self.session.congested():
                self.session.waiting.add(self)

    def resume(self) -> None:
        for fd in list(self.paused):
            if self.credit[self.out_fds[fd]] > 0 and not self.session.congested():
                self.paused.discard(fd)
                self.agent.sel.register(fd, EVENT_READ, ("out", self, fd))

    def grant(self, stream: int, credit: int) -> None:
        if stream in self.credit:
            self.credit[stream] = min(self.credit[stream] + credit, 1 << 30)
            self.resume()

    def _close_out(self, fd: int) -> None:
        if fd in self.paused:
            self.paused.discard(fd)
        else:
            self.agent.sel.unregister(fd)
        del self.out_fds[fd]
        if fd == self.master:
            self.master = None
            if self.stdin_fd == fd:
                self._stop_stdin_writer()
                self.stdin_fd = None
        os.close(fd)

    def on_stdin(self, data: bytes) -> None:
        if self.stdin_fd is None or self.stdin_eof:
            return  # the command does not read stdin (any more): drop, but keep the credit flowing
        self.stdin_buf += data
        self.flush_stdin()

    def flush_stdin(self) -> None:
        fd = self.stdin_fd
        if fd is None:
            return
        written = 0
        while self.stdin_buf:
            try:
                n = os.write(fd, self.stdin_buf[:READ_CHUNK])
            except BlockingIOError:
                break
            except OSError:  # EPIPE: the command closed stdin; drop what is left
                written += len(self.stdin_buf)
                self.stdin_buf.clear()
                self._close_stdin()
                break
            del self.stdin_buf[:n]
            written += n
        if written:
            self.session.send(P.encode_window(self.chan, P.STDIN, written))
        if fd == self.stdin_fd:
            key = self.agent.sel.get_map().get(fd)
            if self.stdin_buf and key is None:
                self.agent.sel.register(fd, EVENT_WRITE, ("stdin", self, fd))
            elif self.stdin_buf and fd == self.master and key is not None:
                self.agent.sel.modify(fd, EVENT_READ | EVENT_WRITE,
                                      ("out", self, fd))
            elif not self.stdin_buf:
                self._stop_stdin_writer()
                if self.stdin_eof:
                    self._close_stdin()

    def _stop_stdin_writer(self) -> None:
        fd = self.stdin_fd
        if fd is None:
            return
        key = self.agent.sel.get_map().get(fd)
        if key is None:
            return
        if fd == self.master:
            if key.events & EVENT_WRITE and fd not in self.paused:
                self.agent.sel.modify(fd, EVENT_READ, ("out", self, fd))
        else:
            self.agent.sel.unregister(fd)

    def on_stdin_eof(self) -> None:
        self.stdin_eof = True
        if self.master is not None:
            if not self.stdin_buf:
                try:
                    os.write(self.master, b"\x04")  # ^D: end of input for the terminal
                except OSError:
                    pass
            return
        if not self.stdin_buf:
            self._close_stdin()

    def _close_stdin(self) -> None:
        fd = self.stdin_fd
        if fd is None or fd == self.master:
            return
        self._stop_stdin_writer()
        os.close(fd)
        self.stdin_fd = None

    # -- control --
    def on_control(self, msg: dict[str, Any]) -> None:
        if "signal" in msg:
            self.kill(int(msg["signal"]))
        if "resize" in msg and self.master is not None:
            import termios

            rows, cols = msg["resize"]
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.status is not None:
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def check_deadline(self, now: float) -> float | None:
        if self.deadline is None or self.status is not None:
            return None
        if now >= self.deadline:
            self.timed_out = True
            self.deadline = None
            self.kill(signal.SIGKILL)
            return None
        return self.deadline - now

    def on_exit(self, status: int) -> None:
        self.status = status
        if self.timed_out:
            # The whole group was killed; do not wait for output of stragglers.
            for fd in list(self.out_fds):
                self._close_out(fd)
        self.maybe_finish()

    def maybe_finish(self) -> None:
        if self.status is None or self.out_fds:
            return
        if self.master is not None:
            return
        self._close_stdin()
        self.agent.procs.pop(self.pid, None)
        code: int | None
        sig: int | None
        if os.WIFSIGNALED(self.status):
            sig = os.WTERMSIG(self.status)
            code = 128 + sig
        else:
            sig = None
            code = os.WEXITSTATUS(self.status)
        reply: dict[str, Any] = {"exit_code": code, "signal": sig, "timed_out": self.timed_out}
        if self.collect:
            reply["collected"] = collect_files(self.collect)
        self.session.finish(self.chan, P.encode_json(P.REPLY, self.chan, reply))

    def abandon(self) -> None:
        """The host went away: kill the command and forget its streams."""
        self.kill(signal.SIGKILL)
        for fd in list(self.out_fds):
            self._close_out(fd)
        self._close_stdin()
        self.session = NullSession(self.agent)


class Session:
    """The host's side of one port: a byte stream of frames and the requests in it."""

    def __init__(self, agent: Agent, port: Port) -> None:
        self.agent = agent
        self.port = port
        self.reader = P.FrameReader(resync=True)
        self.active = False
        self.requests: dict[int, Exec | Transfer | None] = {}
        self.waiting: set[Exec] = set()

    def congested(self) -> bool:
        return len(self.port.outbuf) > OUTBUF_HIGH

    def send(self, data: bytes) -> None:
        self.port.write(data)

    def finish(self, chan: int, frame: bytes) -> None:
        self.requests.pop(chan, None)
        self.send(frame)

    def error(self, chan: int, code: str, message: str) -> None:
        self.requests.pop(chan, None)
        self.send(P.encode_json(P.ERROR, chan, {"code": code, "message": message}))

    def close(self, *, keep_input: bool = False) -> None:
        """End the session: abandon its requests; drop unread input unless ``keep_input``
        (a new HELLO: what follows it in the buffer is the new session's)."""
        for ex in list(self.requests.values()):
            if ex is not None:
                ex.abandon()
        self.requests.clear()
        self.waiting.clear()
        if not keep_input:
            self.reader.reset()
        self.active = False

    def drained(self) -> None:
        for ex in list(self.waiting):
            self.waiting.discard(ex)
            ex.resume()

    def feed(self, data: bytes) -> None:
        frames = self.reader.feed(data)
        for err in self.reader.errors:
            self.send(P.encode_json(P.ERROR, 0, {"code": "bad-frame", "message": str(err)}))
        self.reader.errors.clear()
        for frame in frames:
            try:
                self.handle(frame)
            except P.FrameError as exc:
                self.error(exc.chan, "bad-frame", str(exc))
            except RequestFailed as exc:
                self.error(frame.chan, exc.code, exc.message)
            except Exception as exc:  # a bug or an odd request must not kill the agent
                log(f"request {frame.chan} failed: {exc!r}")
                self.error(frame.chan, "internal", f"{type(exc).__name__}: {exc}")

    def handle(self, frame: P.Frame) -> None:
        kind, chan = frame.kind, frame.chan
        if kind == P.HELLO:
            msg = frame.json()
            self.close(keep_input=True)
            self.active = True
            self.send(P.encode_json(P.WELCOME, 0, {
                "version": P.PROTOCOL_VERSION, "agent": P.AGENT_VERSION,
                "nonce": msg.get("nonce"), "max_frame": P.MAX_FRAME, "window": P.STREAM_WINDOW,
                "capabilities": sorted([*OPS, *P.FEATURES]), "pid": os.getpid(),
            }))
            return
        if not self.active:
            raise P.FrameError("no HELLO yet on this connection", chan=chan, fatal=False)
        if kind == P.REQUEST:
            if chan == 0 or chan in self.requests:
                raise P.FrameError(f"request id {chan} is zero or in use", chan=chan, fatal=False)
            msg = frame.json()
            op = msg.get("op")
            handler = OPS.get(op) if isinstance(op, str) else None
            if handler is None:
                raise RequestFailed("unknown-op", f"unknown operation {op!r}")
            self.requests[chan] = None
            result = handler(self, chan, msg)
            if result is not None:
                self.finish(chan, P.encode_json(P.REPLY, chan, result))
            return
        ex = self.requests.get(chan)
        if ex is None:
            if chan in self.requests or kind in (P.DATA, P.EOF, P.WINDOW, P.CONTROL):
                return  # late frames of a finished request: harmless
            raise P.FrameError(f"unexpected frame kind {kind}", chan=chan, fatal=False)
        if kind == P.DATA and frame.flags == P.STDIN:
            ex.on_stdin(frame.payload)
        elif kind == P.EOF and frame.flags == P.STDIN:
            ex.on_stdin_eof()
        elif kind == P.WINDOW:
            ex.grant(frame.flags, frame.window())
        elif kind == P.CONTROL:
            ex.on_control(frame.json())
        else:
            raise P.FrameError(f"unexpected frame kind {kind} for a request", chan=chan, fatal=False)


class NullSession(Session):
    """Where an abandoned request's last words go: nowhere."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.requests = {}
        self.waiting = set()

    def send(self, data: bytes) -> None:
        pass

    def congested(self) -> bool:
        return False

    def finish(self, chan: int, frame: bytes) -> None:
        pass


# --- operations -------------------------------------------------------------------------


def op_ping(session: Session, chan: int, msg: dict[str, Any]) -> dict[str, Any]:
    return {"pong": True, "time": time.time()}


def op_exec(session: Session, chan: int, msg: dict[str, Any]) -> None:
    ex = Exec(session.agent, session, chan, msg)
    session.requests[chan] = ex
    session.send(P.encode_json(P.EVENT, chan, {"started": ex.pid}))
    return None


def _path_arg(msg: dict[str, Any]) -> str:
    path = msg.get("path")
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise RequestFailed("bad-request", "path must be an absolute path")
    return path


def _os_failure(path: str, exc: OSError) -> RequestFailed:
    code = {errno.ENOENT: "not-found", errno.EACCES: "permission", errno.EPERM: "permission",
            errno.EISDIR: "is-a-directory", errno.ENOSPC: "no-space"}.get(exc.errno or 0, "io")
    return RequestFailed(code, f"{path}: {exc.strerror}")


class Transfer:
    """A file copy served by the agent itself: no child process, no pipe in between.

    It answers the same frames as an Exec (stdin data and EOF, windows, control), so
    the session does not care which one a request is.
    """

    def __init__(self, session: Session, chan: int, path: str) -> None:
        self.agent = session.agent
        self.session = session
        self.chan = chan
        self.path = path
        self.fd: int | None = None

    def on_stdin(self, data: bytes) -> None:
        pass

    def on_stdin_eof(self) -> None:
        pass

    def grant(self, stream: int, credit: int) -> None:
        pass

    def on_control(self, msg: dict[str, Any]) -> None:
        if "signal" in msg:  # cancel
            self.abandon()
            self.session.error(self.chan, "cancelled", f"{self.path}: copy cancelled")

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def fail(self, exc: OSError) -> None:
        err = _os_failure(self.path, exc)
        self.abandon()
        self.session.error(self.chan, err.code, err.message)

    def done(self, **extra: Any) -> None:
        self.session.finish(self.chan, P.encode_json(P.REPLY, self.chan, {
            "exit_code": 0, "signal": None, "timed_out": False, **extra}))

    def abandon(self) -> None:
        self._close()
        self.session = NullSession(self.agent)


class PutFile(Transfer):
    """Write the host's stdin beside the target, then set mode and mtime and rename it into
    place, so a reader never sees half a file and a failed copy leaves the old one."""

    def __init__(self, session: Session, chan: int, path: str, mode: int, mtime: float) -> None:
        super().__init__(session, chan, path)
        self.mode = mode
        self.mtime = mtime
        self.size = 0
        self.tmp = f"{path}.pinnace-put.{os.getpid()}.{chan}"
        try:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _os_failure(path, exc) from None

    def on_stdin(self, data: bytes) -> None:
        if self.fd is None:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            self.fail(exc)
            return
        self.size += len(data)
        self.session.send(P.encode_window(self.chan, P.STDIN, len(data)))

    def on_stdin_eof(self) -> None:
        if self.fd is None:
            return
        try:
            os.fchmod(self.fd, self.mode)
            os.utime(self.fd, (self.mtime, self.mtime))
            self._close()
            os.rename(self.tmp, self.path)
        except OSError as exc:
            self.fail(exc)
            return
        self.done(size=self.size)

    def abandon(self) -> None:
        if self.fd is not None:
            self._close()
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
        super().abandon()


class GetFile(Transfer):
    """Stream a file to the host as it grants window; pumped by the agent's loop, since a
    regular file is always readable and cannot sit in the selector."""

    def __init__(self, session: Session, chan: int, path: str, fd: int) -> None:
        super().__init__(session, chan, path)
        self.fd = fd
        self.credit = P.STREAM_WINDOW
        self.agent.pumps.add(self)

    def grant(self, stream: int, credit: int) -> None:
        if stream == P.STDOUT:
            self.credit = min(self.credit + credit, 1 << 30)

    def ready(self) -> bool:
        return self.fd is not None and self.credit > 0 and not self.session.congested()

    def pump(self) -> None:
        while self.ready():
            assert self.fd is not None
            try:
                data = os.read(self.fd, min(self.credit, P.MAX_FRAME))
            except OSError as exc:
                self.fail(exc)
                return
            if not data:
                self._close()
                self.session.send(P.encode(P.EOF, self.chan, b"", P.STDOUT))
                self.done()
                return
            self.credit -= len(data)
            self.session.send(P.encode(P.DATA, self.chan, data, P.STDOUT))

    def _close(self) -> None:
        super()._close()
        self.agent.pumps.discard(self)


def op_get(session: Session, chan: int, msg: dict[str, Any]) -> None:
    """Stream a file (or, as a tar archive, a directory) out on stdout."""
    import stat as st

    path = _path_arg(msg)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise _os_failure(path, exc) from None
    info = os.fstat(fd)
    is_dir = st.S_ISDIR(info.st_mode)
    if is_dir and not msg.get("archive"):
        os.close(fd)
        raise RequestFailed("is-a-directory", f"{path} is a directory; copy it as an archive")
    if not is_dir and not st.S_ISREG(info.st_mode):
        os.close(fd)
        raise RequestFailed("not-a-file", f"{path} is not a regular file")
    session.send(P.encode_json(P.EVENT, chan, {"stat": {
        "mode": info.st_mode & 0o7777, "mtime": info.st_mtime, "size": info.st_size,
        "dir": is_dir}}))
    if is_dir:
        os.close(fd)
        argv = ["tar", "-C", path, "-cf", "-", "."]
        session.requests[chan] = Exec(session.agent, session, chan, {"argv": argv})
    else:
        os.set_blocking(fd, True)
        session.requests[chan] = GetFile(session, chan, path, fd)


def op_put(session: Session, chan: int, msg: dict[str, Any]) -> None:
    """Take a file (or a tar archive to unpack into a directory) from stdin."""
    path = _path_arg(msg)
    if msg.get("archive"):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise _os_failure(path, exc) from None
        argv = ["tar", "-C", path, "-xpf", "-"]
        session.requests[chan] = Exec(session.agent, session, chan, {"argv": argv, "stdin": True})
        return
    parent = os.path.dirname(path) or "/"
    if not os.path.isdir(parent):
        raise RequestFailed("not-found", f"{parent}: no such directory")
    if os.path.isdir(path):
        raise RequestFailed("is-a-directory", f"{path} is a directory")
    mode = int(msg.get("mode", 0o644)) & 0o7777
    mtime = float(msg.get("mtime", time.time()))
    session.requests[chan] = PutFile(session, chan, path, mode, mtime)


def op_info(session: Session, chan: int, msg: dict[str, Any]) -> dict[str, Any]:
    u = os.uname()
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    mem: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, rest = line.partition(":")
            if k in ("MemTotal", "MemFree", "MemAvailable"):
                mem[k] = int(rest.split()[0]) * 1024
    return {
        "hostname": socket.gethostname(), "kernel": u.release, "machine": u.machine,
        "uptime": uptime, "memory": mem, "time": time.time(), "agent": P.AGENT_VERSION,
        "pid1": IS_INIT, "addresses": addresses(),
    }


def addresses() -> list[dict[str, Any]]:
    try:
        return list(_netconf().addresses())
    except OSError:
        return []


def op_power(session: Session, chan: int, msg: dict[str, Any]) -> None:
    action = msg.get("op")
    session.finish(chan, P.encode_json(P.REPLY, chan, {"ok": True}))
    session.port.flush_blocking(timeout=2.0)
    log(f"{action} requested by the host")
    power(str(action))


CLOCK_ANCHOR_MAX = 600.0  # an anchor further back than this is not trusted


def op_set_time(session: Session, chan: int, msg: dict[str, Any]) -> dict[str, Any]:
    """Set the wall clock to ``epoch``; with ``at``, ``epoch`` is what it was when
    CLOCK_MONOTONIC read ``at`` (the moment a restored guest resumed), so the time this
    request spent in queues does not make the clock late."""
    epoch, at = msg.get("epoch"), msg.get("at")
    if not isinstance(epoch, (int, float)) or not 0 < epoch < 2**34:
        raise RequestFailed("bad-request", "epoch must be seconds since 1970")
    if isinstance(at, (int, float)) and 0 <= time.monotonic() - at < CLOCK_ANCHOR_MAX:
        epoch += time.monotonic() - at
    time.clock_settime(time.CLOCK_REALTIME, epoch)
    return {"time": time.time()}


def op_clock(session: Session, chan: int, msg: dict[str, Any]) -> dict[str, Any]:
    return {"time": time.time(), "monotonic": time.monotonic()}


def op_set_hostname(session: Session, chan: int, msg: dict[str, Any]) -> dict[str, Any]:
    name = msg.get("hostname")
    if not isinstance(name, str) or not is_hostname(name):
        raise RequestFailed("bad-request", "hostname must be 1-64 letters, digits, '-' "
                            "and '.'")
    set_hostname(name)
    return {"hostname": socket.gethostname()}


RNDADDENTROPY, RNDRESEEDCRNG = 0x40085203, 0x5207
MAX_SEED = 512


def op_reseed(session: Session, chan: int, msg: dict[str, Any]) -> dict[str, Any]:
    """Mix host randomness into the kernel's pool, credit it, and reseed the CRNG now: a
    clone restored from a snapshot must not share its random stream with its siblings."""
    import base64
    import binascii

    try:
        seed = base64.b64decode(str(msg.get("seed", "")), validate=True)
    except (binascii.Error, ValueError):
        raise RequestFailed("bad-request", "seed must be base64") from None
    if not 16 <= len(seed) <= MAX_SEED:
        raise RequestFailed("bad-request", f"seed must be 16-{MAX_SEED} bytes")
    with open("/dev/random", "wb", buffering=0) as f:
        fcntl.ioctl(f.fileno(), RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
        try:
            fcntl.ioctl(f.fileno(), RNDRESEEDCRNG)
        except OSError:
            pass  # older kernels: the added entropy reseeds at the next interval
    return {"bytes": len(seed)}


def op_set_network(session: Session, chan: int, msg: dict[str, Any]) -> dict[str, Any]:
    """Give an interface its addresses (replacing the old ones), MAC, MTU, link state,
    default route and name servers, with no DHCP and no program run (ioctls and
    rtnetlink). What the request leaves out stays as it is."""
    import ipaddress

    netconf = _netconf()
    ifname = msg.get("ifname")
    mac = msg.get("mac")
    if mac is not None:  # the interface is the one with this MAC (names depend on probe order)
        ifname = iface_by_mac(check_mac(mac))
    if not (isinstance(ifname, str) and 0 < len(ifname) < 16
            and ifname.replace("-", "").replace("_", "").replace(".", "").isalnum()):
        raise RequestFailed("bad-request", "ifname must be an interface name")
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        raise RequestFailed("not-found", f"no network interface {ifname}") from None
    new_mac = check_mac(msg["set_mac"]) if msg.get("set_mac") else None
    try:
        addrs = [ipaddress.ip_interface(str(a)) for a in msg.get("addresses") or []]
        gateway = ipaddress.ip_address(str(msg["gateway"])) if msg.get("gateway") else None
        servers = [ipaddress.ip_address(str(a)) for a in msg.get("nameservers") or []]
    except ValueError as exc:
        raise RequestFailed("bad-request", str(exc)) from None
    mtu = msg.get("mtu")
    if mtu is not None and not (isinstance(mtu, int) and 68 <= mtu <= 65535):
        raise RequestFailed("bad-request", "mtu must be 68-65535")
    step = "setting the MAC"
    try:
        if new_mac is not None:
            netconf.set_mac(ifname, new_mac)
        step = "setting the addresses"
        now = netconf.set_addresses(ifname, addrs) if "addresses" in msg else None
        step = "setting the MTU"
        if mtu is not None:
            netconf.set_mtu(ifname, mtu)
        step = "setting the link up/down"
        if "up" in msg:
            netconf.set_up(ifname, bool(msg["up"]))
        step = f"adding the default route via {gateway}"
        if gateway is not None:
            netconf.set_default_route(ifname, gateway)
    except OSError as exc:
        raise RequestFailed("failed", f"{ifname}: {step}: {exc.strerror or exc}") from None
    if servers:
        set_nameservers([str(a) for a in servers])
    return {"ifname": ifname} if now is None else {"ifname": ifname, "addresses": now}


RESOLV_CONF = "/etc/resolv.conf"  # pinnace images link it to /run/resolv.conf (tmpfs)


def set_nameservers(servers: list[str]) -> None:
    text = "".join(f"nameserver {a}\n" for a in servers)
    try:
        with open(RESOLV_CONF) as f:
            if f.read() == text:
                return  # a clone of a machine that had them: nothing to write
    except OSError:
        pass
    with open(RESOLV_CONF, "w") as f:
        f.write(text)


def _netconf() -> Any:
    if __package__:
        from . import netconf
    else:
        import netconf  # type: ignore[import-not-found,no-redef]
    return netconf


def check_mac(mac: object) -> str:
    parts = mac.split(":") if isinstance(mac, str) else []
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p)
                                  for p in parts) or int(parts[0], 16) & 1:
        raise RequestFailed("bad-request", f"not a unicast MAC address: {mac!r}")
    return str(mac).lower()


def iface_by_mac(mac: str) -> str:
    name: str | None = _netconf().by_mac(mac)
    if name is None:
        raise RequestFailed("not-found", f"no network interface has MAC {mac}")
    return name


def disk_by_serial(serial: str) -> str | None:
    """The name (vdX) of the disk whose virtio serial is ``serial``."""
    for name in sorted(os.listdir("/sys/block")):
        try:
            with open(f"/sys/block/{name}/serial") as f:
                if f.read().strip() == serial:
                    return name
        except OSError:
            continue
    return None


VIRTIO_BLK_DRIVER = "/sys/bus/virtio/drivers/virtio_blk"


def rescan_disk(name: str) -> None:
    """Have virtio_blk probe disk ``name`` again: unbind its virtio device from the driver
    and bind it back. A clone restored from a template whose disk slot held an empty
    placeholder still has the placeholder's capacity (0) and read-write flag, read at
    the template's boot; a probe reads the real disk's. (A config-change interrupt would
    update only the capacity, and QEMU will not send one for a read-only drive.)"""
    device = os.path.basename(os.path.realpath(f"/sys/block/{name}/device"))
    if not (device.startswith("virtio") and device[6:].isdigit()):
        raise RequestFailed("not-found", f"{name} is not a virtio disk ({device})")
    for action in ("unbind", "bind"):
        try:
            with open(f"{VIRTIO_BLK_DRIVER}/{action}", "w") as f:
                f.write(device)
        except OSError as exc:
            raise RequestFailed("io", f"{action} {device} ({name}): {exc.strerror}") from None


def disk_mounted(name: str) -> bool:
    try:
        with open("/proc/mounts") as f:
            return any(line.split(" ", 1)[0] == f"/dev/{name}" for line in f)
    except OSError:
        return False


def have_9p() -> bool:
    """The 9p filesystem and its virtio transport are loaded (a template's warm-up loads
    them, so a clone need not fork modprobe)."""
    try:
        with open("/proc/filesystems") as f:
            listed = any(line.split()[-1:] == ["9p"] for line in f)
    except OSError:
        return False
    # The transport's driver, built in or loaded (a built-in one with no parameters has
    # no /sys/module entry).
    return listed and os.path.isdir("/sys/bus/virtio/drivers/9pnet_virtio")


def op_mount(session: Session, chan: int, msg: dict[str, Any]) -> dict[str, Any]:
    """Mount a volume (an ext4 disk, found by its virtio serial) or a shared folder (a 9p
    tag) at ``path``, read-only if asked; ``rescan``: probe the disk again first (see
    rescan_disk)."""
    fstype, source, path, ro = msg.get("fstype"), msg.get("source"), msg.get("path"), msg.get("ro")
    if not isinstance(source, str) or not source.replace("-", "").isalnum() or len(source) > 20:
        raise RequestFailed("bad-request", "source must be a device serial or a 9p tag")
    if not (isinstance(path, str) and path.startswith("/") and len(path) < 1024
            and os.path.normpath(path) == path and "\x00" not in path):
        raise RequestFailed("bad-request", "path must be a normalised absolute path")
    if P.protected_path(path):
        raise RequestFailed("bad-request", f"{path} belongs to the guest's system")
    if fstype not in ("ext4", "9p"):
        raise RequestFailed("bad-request", "fstype must be ext4 or 9p")
    if os.path.ismount(path):
        raise RequestFailed("exists", f"something is already mounted at {path}")
    flags = MS_RDONLY if ro else 0
    if fstype == "ext4":
        name = disk_by_serial(source)
        if name is not None and msg.get("rescan"):
            if disk_mounted(name):  # its filesystem would lose its disk
                raise RequestFailed("exists", f"disk {source} (/dev/{name}) is mounted; "
                                    "it cannot be probed again")
            rescan_disk(name)
            name = disk_by_serial(source)  # probed again, it may have another name
        if name is None:
            raise RequestFailed("not-found", f"no disk with serial {source}")
        device = f"/dev/{name}"
        data = "noload" if ro else ""  # a read-only disk cannot replay a journal
    elif fstype == "9p":
        if not have_9p():
            _subprocess().run(["modprobe", "-q", "-a", "9pnet_virtio", "9p"],
                              capture_output=True, timeout=30)
        device, data = source, "trans=virtio,version=9p2000.L,msize=524288,cache=none"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise _os_failure(path, exc) from None
    if libc().mount(device.encode(), path.encode(), fstype.encode(), flags,
                    data.encode() if data else None) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise RequestFailed("failed", f"mount {source} on {path}: {os.strerror(err)}")
    return {"path": path, "device": device}


OPS = {
    "ping": op_ping,
    "exec": op_exec,
    "info": op_info,
    "poweroff": op_power,
    "reboot": op_power,
    "set_time": op_set_time,
    "clock": op_clock,
    "set_hostname": op_set_hostname,
    "get": op_get,
    "put": op_put,
    "reseed": op_reseed,
    "set_network": op_set_network,
    "mount": op_mount,
    "unmount": op_unmount,
}


# --- ports and the loop ---------------------------------------------------------------


class Port:
    """One virtio-serial port; the host side connects and disconnects at will."""

    def __init__(self, agent: Agent, path: str, name: str) -> None:
        self.agent = agent
        self.path = path
        self.name = name
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.fd, fcntl.F_SETOWN, os.getpid())
            fl = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fl | os.O_ASYNC)
        except OSError as exc:
            log(f"{name}: no SIGIO ({exc}); polling for the host")
        self.outbuf = bytearray()
        self.rbuf = bytearray(READ_CHUNK)
        self.rview = memoryview(self.rbuf)
        self.rsegs = [self.rview[i:i + PORT_PAGE] for i in range(0, READ_CHUNK, PORT_PAGE)]
        self.session = Session(agent, self)
        self.connected = True  # until a read says otherwise
        self.hup_since: float | None = None  # when a read last said there is no host
        self.wrote = False  # whether this session has written anything to its host
        self.events = 0
        self._update()

    def _update(self) -> None:
        want = 0
        if self.connected:
            want |= EVENT_READ
            if self.outbuf:
                want |= EVENT_WRITE
        if want == self.events:
            return
        if self.events and want:
            self.agent.sel.modify(self.fd, want, ("port", self))
        elif want:
            self.agent.sel.register(self.fd, want, ("port", self))
        else:
            self.agent.sel.unregister(self.fd)
        self.events = want

    def on_event(self, mask: int) -> None:
        if mask & EVENT_READ:
            self.read()
        if mask & EVENT_WRITE and self.connected:
            self.flush()

    def _recv(self) -> bytes:
        """Read what the host sent. The driver hands out one page-sized buffer per read(),
        but readv() takes one per segment, so page-sized segments get many in one call."""
        n = os.readv(self.fd, self.rsegs)
        return bytes(self.rview[:n])

    def read(self) -> None:
        for _ in range(16):
            try:
                data = self._recv()
            except BlockingIOError:
                break
            except OSError as exc:
                log(f"{self.name}: read failed: {exc}")
                data = b""
            if not data:
                self.hung_up()
                return
            self.hup_since = None
            self.connected = True
            self.session.feed(data)
        self._update()

    def hung_up(self) -> None:
        """A read says there is no host. If this session has written to its host, that
        host has closed its end: the session ends now, with what it had not sent or
        read yet. A host that has just connected can look the same, though: its first
        bytes may be read before the kernel handles the control message saying it is
        there. So a session that has not written yet ends only if there is still no
        host HUP_GRACE later (poll_host); until then its output waits."""
        if self.wrote:
            self.end_session()
        elif self.hup_since is None:
            self.hup_since = time.monotonic()
        self.connected = False
        self._update()

    def end_session(self) -> None:
        self.session.close()
        self.outbuf.clear()
        self.wrote = False
        self.hup_since = None

    def poll_host(self) -> None:
        """Called when the port may have a host again (SIGIO, or the periodic check)."""
        if self.connected:
            return
        try:
            data: bytes | None = self._recv()
        except BlockingIOError:  # a host, with nothing sent yet
            data = None
        except OSError:
            data = b""
        if data == b"":  # still no host
            if self.hup_since is not None and time.monotonic() - self.hup_since >= HUP_GRACE:
                self.end_session()
            return
        self.hup_since = None
        self.connected = True
        if data:
            self.session.feed(data)
        self._update()

    def write(self, data: bytes) -> None:
        """Queue bytes for the host; the loop flushes once per turn (one kick for many
        small frames), or at once when a lot is waiting."""
        if not self.connected and self.hup_since is None:
            return
        self.outbuf += data
        if len(self.outbuf) >= READ_CHUNK:
            self.flush()

    def _send_some(self) -> int:
        """Write from outbuf. The driver takes at most PORT_WRITE bytes per write();
        writev() takes that much per segment, all in one call."""
        with memoryview(self.outbuf) as view:
            segs = [view[i:i + PORT_WRITE] for i in range(0, min(len(view), READ_CHUNK), PORT_WRITE)]
            try:
                return os.writev(self.fd, segs)
            finally:
                for seg in segs:
                    seg.release()

    def flush(self) -> None:
        while self.outbuf:
            try:
                n = self._send_some()
            except BlockingIOError:
                break
            except OSError as exc:
                log(f"{self.name}: write failed: {exc}")
                self.outbuf.clear()
                break
            del self.outbuf[:n]
            self.wrote = self.wrote or n > 0
        if len(self.outbuf) <= OUTBUF_HIGH // 2:
            self.session.drained()
        self._update()

    def flush_blocking(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.outbuf and time.monotonic() < deadline:
            self.flush()
            if self.outbuf:
                time.sleep(0.005)


def find_ports() -> list[tuple[str, str]]:
    base = "/sys/class/virtio-ports"
    found = []
    try:
        entries = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    for entry in entries:
        try:
            with open(f"{base}/{entry}/name") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name.startswith(P.PORT_NAME.format("")):
            found.append((f"/dev/{entry}", name))
    return found


EVENT_READ, EVENT_WRITE = 1, 2  # as in selectors


class Key:
    """What Poller keeps for a registered file descriptor (selectors.SelectorKey)."""

    __slots__ = ("data", "events", "fd")

    def __init__(self, fd: int, events: int, data: Any) -> None:
        self.fd, self.events, self.data = fd, events, data


class Poller:
    """selectors.EpollSelector as the agent uses it, without importing selectors (and
    with it collections and math, ~0.1 s of a cold boot under TCG)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._keys: dict[int, Key] = {}

    @staticmethod
    def _mask(events: int) -> int:
        return (select.EPOLLIN if events & EVENT_READ else 0) | (
            select.EPOLLOUT if events & EVENT_WRITE else 0)

    def get_map(self) -> dict[int, Key]:
        return self._keys

    def register(self, fd: int, events: int, data: Any = None) -> Key:
        if fd in self._keys:
            raise KeyError(f"{fd} is already registered")
        self._epoll.register(fd, self._mask(events))
        key = self._keys[fd] = Key(fd, events, data)
        return key

    def modify(self, fd: int, events: int, data: Any = None) -> Key:
        key = self._keys[fd]
        if events != key.events:
            self._epoll.modify(fd, self._mask(events))
        key.events, key.data = events, data
        return key

    def unregister(self, fd: int) -> Key:
        key = self._keys.pop(fd)
        try:
            self._epoll.unregister(fd)
        except OSError:  # closed already
            pass
        return key

    def select(self, timeout: float | None = None) -> list[tuple[Key, int]]:
        if timeout is None:
            wait = -1.0
        elif timeout <= 0:
            wait = 0.0
        else:  # whole milliseconds, rounded up (epoll's resolution), as selectors does
            ms = int(timeout * 1000)
            wait = (ms + (ms < timeout * 1000)) / 1000
        ready = []
        for fd, ev in self._epoll.poll(wait, max(len(self._keys), 1)):
            mask = (EVENT_WRITE if ev & ~select.EPOLLIN else 0) | (
                EVENT_READ if ev & ~select.EPOLLOUT else 0)
            key = self._keys.get(fd)
            if key is not None:
                ready.append((key, mask & key.events))
        return ready


class Agent:
    def __init__(self) -> None:
        self.sel = Poller()
        self.procs: dict[int, Exec] = {}
        self.pumps: set[GetFile] = set()
        self.ports: list[Port] = []
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        # Handlers (not SIG_IGN) so children start with default dispositions; PID 1 is
        # immune to default-action signals anyway.
        for sig in (signal.SIGCHLD, signal.SIGIO):
            signal.signal(sig, lambda *_: None)
        self.sel.register(self.wake_r, EVENT_READ, ("wake", None))

    def open_ports(self, wait: float = 10.0) -> None:
        deadline = time.monotonic() + wait
        while True:
            ports = find_ports()
            if ports or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        for path, name in ports:
            try:
                self.ports.append(Port(self, path, name))
            except OSError as exc:
                log(f"cannot open {path} ({name}): {exc}")
        if not self.ports:
            log("no agent ports found; is the virtio-serial device missing?")

    def reap(self, which: int = -1) -> None:
        """Collect exited children (or only ``which``) without blocking."""
        while True:
            try:
                pid, status = os.waitpid(which, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            ex = self.procs.get(pid)
            if ex is not None:
                ex.on_exit(status)
            if which != -1:
                return

    def run(self) -> None:
        log(f"ready on {len(self.ports)} ports at {uptime()} s")
        looked = 0.0
        while True:
            now = time.monotonic()
            timeout = 0.5 if any(not p.connected for p in self.ports) else 5.0
            if any(g.ready() for g in self.pumps):
                timeout = 0.0
            for ex in list(self.procs.values()):
                left = ex.check_deadline(now)
                if left is not None:
                    timeout = min(timeout, left)
            events = self.sel.select(timeout)
            # A port without a host is looked at when a signal (SIGIO: a host connected)
            # woke the loop, and every half second, not after every event.
            look = time.monotonic() - looked >= 0.5
            for key, mask in events:
                kind, obj, *rest = key.data
                if kind == "port":
                    obj.on_event(mask)
                elif kind == "out":
                    ex, fd = obj, rest[0]
                    if mask & EVENT_READ and fd in ex.out_fds:
                        ex.on_output(fd)
                    if mask & EVENT_WRITE:
                        ex.flush_stdin()
                elif kind == "stdin":
                    obj.flush_stdin()
                elif kind == "wake":
                    look = True
                    try:
                        while os.read(self.wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
            self.reap()
            for g in list(self.pumps):
                g.pump()
            if look:
                looked = time.monotonic()
            for port in self.ports:
                if look:
                    port.poll_host()
                if port.outbuf:
                    port.flush()


def uptime() -> str:
    """Seconds since the kernel started (what /proc/uptime says; /proc may not be mounted
    yet when the agent starts as init)."""
    return f"{time.clock_gettime(time.CLOCK_BOOTTIME):.2f}"


def main() -> None:
    log(f"started at {uptime()} s")
    if IS_INIT:
        init_system()
    else:
        join_system()
    log(f"init done at {uptime()} s")
    agent = Agent()
    agent.open_ports()
    if not IS_INIT:
        leave_boot_priority()
    agent.run()


def run_main() -> None:
    try:
        main()
    except BaseException as exc:  # as PID 1, dying panics the kernel: say why first
        log(f"fatal: {exc!r}")
        raise


if __name__ == "__main__":
    run_main()
