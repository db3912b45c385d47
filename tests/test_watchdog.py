"""The watchdog tells a daemon stuck in its own exit from one at work or gone,
and wakes one whose request loop waits for a request that was withdrawn."""

from __future__ import annotations

import ctypes
import os
import random
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import StartNode
from node_process import NodeProcess
from waiting import wait_for

from litefs import watchdog


def test_a_running_process_is_not_exiting() -> None:
    assert watchdog.exiting(os.getpid()) is False


def test_a_zombie_and_a_reaped_process_leave_nothing_to_free() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while watchdog.exiting(child.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)  # exits, and stays a zombie until waited for
    assert watchdog.exiting(child.pid) is None
    child.wait()
    assert watchdog.exiting(child.pid) is None


def test_the_watchdog_ends_with_the_process_it_watches() -> None:
    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    guard = subprocess.Popen([sys.executable, "-m", "litefs.watchdog", str(watched.pid), "0"])
    watched.wait()
    assert guard.wait(10) == 0


def fake_thread(proc: Path, pid: int, tid: int, state: str, flags: int, pending: int = 0) -> None:
    stat = f"{tid} (py thread) {state} 1 {pid} {pid} 0 -1 {flags} 0 0\n"
    status = f"Name:\tpython\nSigPnd:\t{pending:016x}\nShdPnd:\t0000000000000000\n"
    task = proc / str(pid) / "task" / str(tid)
    task.mkdir(parents=True)
    places = [task, proc / str(pid)] if tid == pid else [task]  # /proc/PID is the main thread
    for place in places:
        (place / "stat").write_text(stat)
        (place / "status").write_text(status)


SIGKILL = 1 << 8
PF_EXITING = 0x4


def test_a_thread_that_cannot_take_its_sigkill_marks_the_process_stuck(tmp_path: Path) -> None:
    # The main thread waits uninterruptibly on its own mount: it never
    # begins its exit, and only the pending SIGKILL tells.
    fake_thread(tmp_path, 100, 100, "D", 0, pending=SIGKILL)
    fake_thread(tmp_path, 100, 101, "S", 0)
    assert watchdog.exiting(100, tmp_path) is True


def test_an_exited_main_thread_with_another_stuck_marks_the_process_stuck(tmp_path: Path) -> None:
    fake_thread(tmp_path, 100, 100, "Z", PF_EXITING)
    fake_thread(tmp_path, 100, 102, "D", 0, pending=SIGKILL)
    assert watchdog.exiting(100, tmp_path) is True


def test_threads_at_work_without_a_kill_are_not_exiting(tmp_path: Path) -> None:
    fake_thread(tmp_path, 100, 100, "S", 0)
    fake_thread(tmp_path, 100, 101, "D", 0)
    assert watchdog.exiting(100, tmp_path) is False


def fake_main_thread_in(proc: Path, pid: int, syscall: str, fds: dict[int, str]) -> None:
    fake_thread(proc, pid, pid, "S", 0)
    (proc / str(pid) / "task" / str(pid) / "syscall").write_text(syscall + "\n")
    (proc / str(pid) / "fd").mkdir()
    for fd, target in fds.items():
        (proc / str(pid) / "fd" / str(fd)).symlink_to(target)


READ = watchdog._READ


def test_a_main_thread_blocked_reading_the_fuse_device_is_seen(tmp_path: Path) -> None:
    fake_main_thread_in(
        tmp_path, 100, f"{READ} 0x7 0x7f00 0x21000 0x0 0x0 0x0 0x7ffe 0x7f01", {7: "/dev/fuse"}
    )
    assert watchdog.reading_fuse(100, tmp_path) is True


def test_a_read_of_another_file_or_another_call_is_not_the_stuck_read(tmp_path: Path) -> None:
    other = "232" if READ == "0" else "22"  # epoll_wait, the loop's idle call
    fake_main_thread_in(
        tmp_path, 100, f"{READ} 0x3 0x7f00 0x1000 0x0 0x0 0x0 0x7ffe 0x7f01", {3: "/tmp/x"}
    )
    fake_main_thread_in(
        tmp_path, 200, f"{other} 0x7 0x7f00 0x1 0x0 0x0 0x0 0x7ffe 0x7f01", {7: "/dev/fuse"}
    )
    fake_main_thread_in(tmp_path, 300, "running", {7: "/dev/fuse"})
    assert watchdog.reading_fuse(100, tmp_path) is False
    assert watchdog.reading_fuse(200, tmp_path) is False
    assert watchdog.reading_fuse(300, tmp_path) is False
    assert watchdog.reading_fuse(400, tmp_path) is False  # gone


def test_a_real_idle_daemon_is_not_seen_reading() -> None:
    # This process is running, so its own syscall file says "running".
    assert watchdog.reading_fuse(os.getpid()) is False


def test_the_watchdog_sends_one_lookup_into_the_mount_once_the_read_lasts(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_main_thread_in(
        proc, 100, f"{READ} 0x7 0x7f00 0x21000 0x0 0x0 0x0 0x7ffe 0x7f01", {7: "/dev/fuse"}
    )
    waker = watchdog.Waker(tmp_path)
    since = watchdog._wake_if_stuck(100, proc, waker, None)
    assert since is not None and waker.sent == 0  # seen once: perhaps a read about to return
    since = watchdog._wake_if_stuck(100, proc, waker, since - watchdog.STUCK_READ)
    assert since is None and waker.sent == 1
    assert waker._pending is not None
    waker._pending.join(5)
    (proc / "100" / "task" / "100" / "syscall").write_text("running\n")
    assert watchdog._wake_if_stuck(100, proc, waker, time.monotonic() - 10) is None
    assert waker.sent == 1


def test_a_lookup_still_waiting_is_not_sent_again(tmp_path: Path) -> None:
    waker = watchdog.Waker(tmp_path)
    answered = threading.Event()
    waker._pending = threading.Thread(target=answered.wait)
    waker._pending.start()
    try:
        assert waker.wake() is False
    finally:
        answered.set()
        waker._pending.join()
    assert waker.wake() is True


SYS_PIDFD_GETFD = 438  # the same on every architecture
NO_REPLY = {2, 36, 42}  # FORGET, INTERRUPT, BATCH_FORGET
ENOENT = 2


def borrow_fuse_device(pid: int) -> int:
    """The daemon's own open FUSE device: a request read here never reaches it."""
    fds = Path(f"/proc/{pid}/fd")
    fd = next(int(f.name) for f in fds.iterdir() if os.readlink(f) == "/dev/fuse")
    pidfd = os.pidfd_open(pid)
    try:
        borrowed = ctypes.CDLL(None, use_errno=True).syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    finally:
        os.close(pidfd)
    if borrowed < 0:
        pytest.skip(f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
    return int(borrowed)


def take_one_request(device: int) -> None:
    """Read a request off the device and answer it as if the name did not exist."""
    request = os.read(device, 16 << 20)
    _length, opcode, unique = struct.unpack_from("<IIQ", request)
    if opcode not in NO_REPLY:
        os.write(device, struct.pack("<IiQ", 16, -ENOENT, unique))


def take_the_request_that_woke_it(node: NodeProcess, device: int, attempt: int) -> bool:
    """Make a request while the daemon is stopped, let it run, and read the
    request off its device just after its loop saw it readable: then its
    read waits for another. Whether that happened this time."""
    pid = node.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(0.02)
        asker = threading.Thread(
            target=os.path.exists, args=(node.mount_dir / f"asked-{attempt}",), daemon=True
        )
        asker.start()
        time.sleep(0.02)
    finally:
        os.kill(pid, signal.SIGCONT)
    until = time.perf_counter() + random.uniform(200e-6, 600e-6)
    while time.perf_counter() < until:
        pass
    if select.select([device], [], [], 0)[0]:
        taker = threading.Thread(target=take_one_request, args=(device,), daemon=True)
        taker.start()
        taker.join(0.05)
        fed = 0
        deadline = time.monotonic() + 10.0
        while taker.is_alive():  # the daemon read it first: feed the taker
            assert time.monotonic() < deadline, "no request reached the borrowed device"
            fed += 1  # a new name each time: a negative entry may be cached
            os.path.exists(node.mount_dir / f"fed-{attempt}-{fed}")
            taker.join(0.05)
    asker.join(5)
    time.sleep(0.12)  # the watchdog wakes it only after STUCK_READ
    if not watchdog.reading_fuse(pid):
        return False
    time.sleep(0.1)
    return watchdog.reading_fuse(pid)


def answers_info(node: NodeProcess, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(node.url + "/info", timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.mark.timeout(240)
def test_a_daemon_whose_loop_waits_for_a_withdrawn_request_is_woken(
    start_node: StartNode,
) -> None:
    # pyfuse3 reads its device, holding the GIL, once the device is readable;
    # a request withdrawn in between (its process killed while the daemon
    # was stopped) leaves that read waiting for the next request, and the
    # HTTP, lease and replication threads with it. Taking the request off
    # the device ourselves puts the daemon in the same state.
    node = start_node("node1")
    wait_for(lambda: "litefs.watchdog" in _children_commands(node), 10.0, "the watchdog")
    device = borrow_fuse_device(node.pid or 0)
    try:
        for attempt in range(400):
            if take_the_request_that_woke_it(node, device, attempt):
                break
        else:
            pytest.fail("the daemon was never caught in its read")
        assert answers_info(node, timeout=3.0)
        assert "sent it a request" in node.log()
        assert not watchdog.reading_fuse(node.pid or 0)
    finally:
        os.close(device)


def _children_commands(node: NodeProcess) -> str:
    result = subprocess.run(
        ["ps", "-o", "args=", "--ppid", str(node.pid)], capture_output=True, text=True
    )
    return result.stdout
