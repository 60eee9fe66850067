"""The box the import test runs in: what refused code can no longer touch.

The import test runs code nobody has vetted yet. The static checks only catch
mistakes; this box is what keeps the test from touching the device. Each test
runs in three processes forked from the import helper:

    helper (the agent's user, clean environment, child subreaper)
      +-- outer: new session; unshares user (when not root), mount, network
          |      and PID namespaces; waits for init
          +-- init: PID 1 of the new PID namespace. Makes the whole
              |      filesystem read-only, puts fresh tmpfs on /tmp, /var/tmp
              |      and /dev/shm (HOME and the working folder live there),
              |      mounts a /proc that shows only the box, hides the token
              |      file; waits for the module's process and reports how it ended
              +-- module: clears the environment, drops to the sandbox user (as
                     root) or all capabilities (not root), sets no_new_privs,
                     then imports the module and runs its runtime test.

When the init process ends, the kernel kills everything left in its PID
namespace, however it was started (setsid, double fork). Where PID namespaces
are refused, the helper is a child subreaper and kills every descendant left.
A network namespace has only a downed loopback. Each step is tried on its own
and reported: ``Box.report`` says which protections hold on this kernel, and
the agent lists them in ``get_status`` (``isolation``).

Linux only. Python 3.9 and 3.11 lack ``os.unshare``, so the system calls go
through ``ctypes``. Standard library only; the helper loads this file by path.
"""

import ctypes
import ctypes.util
import errno
import os
import pwd
import shutil
import signal
import sys
import tempfile

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x1, 0x20, 0x1000, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (Linux 5.12+)
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
CAP_VERSION_3 = 0x20080522
SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")
SCRATCH_BYTES = "64m"  # per tmpfs; what a module may write at import lands here and is dropped
BOX_PATH = "/usr/local/bin:/usr/bin:/bin"

# The protections, in the order they are reported.
PROTECTIONS = ("clean_environment", "throwaway_home", "unprivileged_user", "no_new_privileges",
               "no_network", "readonly_filesystem", "private_proc", "process_tree_killed")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _sys(name):
    """The C library's ``name``, or a stand-in that fails with ENOSYS where there is none (not Linux)."""
    func = getattr(_libc, name, None)
    if func is not None:
        return func

    def missing(*_args):
        ctypes.set_errno(errno.ENOSYS)
        return -1
    return missing


def _call(result, what):
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def _mount(source, target, fstype, flags, data=None):
    _call(_sys("mount")(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)),
          f"mount {target}")


def _b(text):
    return None if text is None else text.encode()


class Box:
    """Set up once in the helper; ``outer()`` and ``inner()`` run in each test's two processes."""

    def __init__(self, *, agent_root, user, hide, sys_path):
        self.agent_root = agent_root
        self.hide = [path for path in hide if path]
        self.is_root = os.geteuid() == 0
        self.user = self._resolve(user) if self.is_root else None
        self.user_problem = "" if self.user or not self.is_root else f"no user {user!r} on this system"
        # The child gets the interpreter's folders as folders opened beforehand: as another user it
        # may not reach them (pyenv under a private /root, a pipx install under a 0700 home), and the
        # box's fresh /tmp hides any that live there (a virtualenv under /tmp).
        self.path_fds = [_open_path(p) for p in sys_path]
        self.report = {"active": {}, "missing": {}}
        try:
            _call(_sys("prctl")(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "PR_SET_CHILD_SUBREAPER")
            self.subreaper = True
        except OSError:
            self.subreaper = False

    @staticmethod
    def _resolve(user):
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            return None
        return entry.pw_uid, entry.pw_gid, user

    def new_scratch(self):
        """A throwaway folder for a test whose box has no mount namespace (removed by ``discard``)."""
        folder = tempfile.mkdtemp(prefix="pi-agent-box-")
        if self.user is not None:
            os.chown(folder, self.user[0], self.user[1])
        return folder

    @staticmethod
    def discard(folder):
        shutil.rmtree(folder, ignore_errors=True)

    # In the outer process (forked from the helper)

    def outer(self):
        """New session and namespaces; returns the set of namespaces this process now has."""
        os.setsid()
        spaces = set()
        if not self.is_root:
            self._step("user namespace", lambda: self._user_namespace(), spaces, "user")
        for flag, name in ((CLONE_NEWNS, "mount"), (CLONE_NEWNET, "network"), (CLONE_NEWPID, "pid")):
            self._step(f"{name} namespace", lambda f=flag: _call(_sys("unshare")(f), "unshare"), spaces, name)
        return spaces

    def _step(self, what, action, spaces, name):
        try:
            action()
            spaces.add(name)
        except OSError as exc:
            self.report["missing"].setdefault(name, f"{what} refused: {exc.strerror or exc}")

    @staticmethod
    def _user_namespace():
        uid, gid = os.geteuid(), os.getegid()
        _call(_sys("unshare")(CLONE_NEWUSER), "unshare")
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                           ("/proc/self/gid_map", f"{gid} {gid} 1")):
            with open(path, "w") as handle:
                handle.write(text)

    # In the init process (PID 1 of the box where PID namespaces are allowed)

    def setup(self, spaces, scratch):
        """Mounts for the box; returns ``(home, active, missing)`` for ``enter``.

        The module itself runs in a child of this process: PID 1 of a
        namespace ignores the signals its own processes send it, and a module
        that kills itself at import must be seen to die.
        """
        os.setsid()  # its own session, so that kill(0, ...) reaches nothing outside the box
        _sys("prctl")(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        active, missing = {}, dict(self.report["missing"])
        home = scratch
        if "mount" in spaces:
            try:
                home = self._mounts(spaces, active, missing)
            except OSError as exc:
                missing["readonly_filesystem"] = f"the box's mounts failed: {exc.strerror or exc}"
        else:
            missing["readonly_filesystem"] = missing.pop("mount", "no mount namespace")
            missing["private_proc"] = "no mount namespace: /proc shows the agent"
        return home, active, missing

    # In the module's process (a child of the init process)

    def enter(self, spaces, home, active, missing):
        """Last steps before the module runs; returns ``{"active": {...}, "missing": {...}}``."""
        os.environ.clear()
        os.environ.update({"PATH": BOX_PATH, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"})
        os.chdir(home)
        opened = [f"/proc/self/fd/{fd}" for fd in self.path_fds if fd is not None]
        if opened:  # the interpreter's folders, as opened before the box hid or closed any of them
            sys.path[:] = opened
        active["clean_environment"] = "no token and none of the agent's variables"
        active["throwaway_home"] = f"HOME and the working folder are {home}, dropped after the test"
        self._drop_privileges(spaces, active, missing)
        if "network" in spaces:
            active["no_network"] = "a network namespace with only a downed loopback"
        else:
            missing["no_network"] = missing.pop("network", "no network namespace")
        if "pid" in spaces:
            active["process_tree_killed"] = "a PID namespace: everything in it dies with the test"
        elif self.subreaper:
            active["process_tree_killed"] = "the helper is a child subreaper and kills every descendant left"
            missing["pid_namespace"] = missing.pop("pid", "no PID namespace")
        else:
            missing["process_tree_killed"] = "no PID namespace and no child subreaper"
        for name in ("user", "mount", "network", "pid"):
            missing.pop(name, None)
        return {"active": active, "missing": {k: v for k, v in missing.items() if k not in active}}

    def _mounts(self, spaces, active, missing):
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        try:
            attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
            _call(_sys("syscall")(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE,
                                ctypes.byref(attr), ctypes.sizeof(attr)), "mount_setattr")
            active["readonly_filesystem"] = "every mount read-only; fresh tmpfs on " + ", ".join(SCRATCH)
        except OSError as exc:  # before Linux 5.12: at least the agent's own root
            try:
                _mount(self.agent_root, self.agent_root, None, MS_BIND | MS_REC)
                _mount(None, self.agent_root, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
                active["readonly_filesystem"] = f"only the agent's root is read-only ({exc.strerror})"
            except OSError as again:
                missing["readonly_filesystem"] = f"could not make the agent's root read-only: {again.strerror}"
        for folder in SCRATCH:
            if os.path.isdir(folder):
                _mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV,
                       f"size={SCRATCH_BYTES},mode=1777")
        for path in self.hide:
            if os.path.isfile(path):
                _mount("/dev/null", path, None, MS_BIND)
        if "pid" in spaces:
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            active["private_proc"] = "/proc shows only the box's own processes"
        else:
            missing["private_proc"] = "no PID namespace: /proc shows the agent"
        home = "/tmp/home"
        os.mkdir(home, 0o700)
        if self.user is not None:
            os.chown(home, self.user[0], self.user[1])
        return home

    def _drop_privileges(self, spaces, active, missing):
        if self.user is not None:
            uid, gid, name = self.user
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            active["unprivileged_user"] = f"runs as {name} (uid {uid})"
        elif self.is_root:
            missing["unprivileged_user"] = self.user_problem
        else:
            if "user" in spaces:
                header, data = _CapHeader(CAP_VERSION_3, 0), (_CapData * 2)()
                _call(_sys("capset")(ctypes.byref(header), data), "capset")
            active["unprivileged_user"] = "runs as the agent's own (unprivileged) user, without capabilities"
        try:
            _call(_sys("prctl")(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
            active["no_new_privileges"] = "setuid programs and file capabilities give it nothing"
        except OSError as exc:
            missing["no_new_privileges"] = exc.strerror or str(exc)
        # Set last: changing credentials clears it. If the outer process is killed, so is this one.
        _sys("prctl")(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    # In the helper, after each test

    def kill_descendants(self):
        """Kill every process left below the helper (orphans are reparented to it, a subreaper)."""
        for _ in range(100):  # each round kills what it sees; new children appear at most a few times
            children = _children(os.getpid())
            if not children:
                return
            for pid in children:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for pid in children:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass


def _children(pid):
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found.extend(int(word) for word in handle.read().split())
        except OSError:
            continue
    return found


def _open_path(path):
    if not path or not os.path.exists(path):
        return None
    if not hasattr(os, "O_PATH"):  # not Linux: the box cannot drop to another user there anyway
        return None
    flags = os.O_PATH | (os.O_DIRECTORY if os.path.isdir(path) else 0)
    try:
        return os.open(path, flags)
    except OSError:
        return None
