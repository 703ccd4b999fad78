"""The job's own watch for lost processes (ega_jax/peer_watch.py), without jax.

Real sockets, and for a death a real process killed with SIGKILL, so that the
kernel closes its connection the way it does for a dead training process.
"""

import queue
import signal
import socket
import subprocess
import sys
import time

import pytest

from ega_jax import peer_watch

REPO = __import__("os").path.dirname(__import__("os").path.dirname(__file__))

# A process that joins the watch as `index` and then only waits.
_MEMBER = """
import sys, time
from ega_jax import peer_watch
watch = peer_watch.PeerWatch(int(sys.argv[1]), int(sys.argv[2]), lambda *a: None,
                             silence_limit_s=5.0, ping_every_s=0.2)
watch.connect(sys.argv[3])
print("connected", flush=True)
time.sleep(600)
"""


def _watch(index, count, reports, silence_limit_s=5.0):
  return peer_watch.PeerWatch(
    index,
    count,
    lambda lost, how: reports.put((index, lost, how)),
    silence_limit_s=silence_limit_s,
    ping_every_s=0.2,
  )


def _wait_until_joined(watch, count):
  deadline = time.time() + 30
  while len(watch._peers) < count:
    assert time.time() < deadline, watch._peers
    time.sleep(0.05)


def test_a_killed_process_is_named_by_process_0_and_by_the_other_survivors():
  reports = queue.Queue()
  leader = _watch(0, 3, reports)
  address = f"127.0.0.1:{leader.listen('127.0.0.1')}"
  other = _watch(2, 3, reports)
  other.connect(address)
  victim = subprocess.Popen(
    [sys.executable, "-c", _MEMBER, "1", "3", address], cwd=REPO, stdout=subprocess.PIPE, text=True
  )
  try:
    assert victim.stdout.readline().strip() == "connected"
    _wait_until_joined(leader, 2)
    time.sleep(1.0)  # pings flow; nobody is reported
    assert reports.empty()
    killed_at = time.time()
    victim.send_signal(signal.SIGKILL)
    got = sorted(reports.get(timeout=10) for _ in range(2))
    assert time.time() - killed_at < 5  # at once, not after the silence limit
  finally:
    victim.kill()
    victim.wait()
  assert [(who, lost) for who, lost, _ in got] == [(0, 1), (2, 1)]
  assert "closed without finishing" in got[0][2]
  assert got[1][2] == "process 0 reported it"
  time.sleep(0.5)
  assert reports.empty()  # one report per process


def test_a_silent_process_is_lost_after_the_silence_limit():
  reports = queue.Queue()
  leader = _watch(0, 2, reports, silence_limit_s=1.0)
  port = leader.listen("127.0.0.1")
  hung = socket.create_connection(("127.0.0.1", port))
  hung.sendall(b"hello 1\n")  # then nothing, as from a stopped process or a vanished host
  started = time.time()
  index, lost, how = reports.get(timeout=10)
  assert (index, lost) == (0, 1) and "silent for 1 s" in how
  assert 0.9 < time.time() - started < 5
  hung.close()


def test_a_goodbye_is_not_a_loss_and_process_0_finishing_is_not_either():
  reports = queue.Queue()
  leader = _watch(0, 3, reports)
  address = f"127.0.0.1:{leader.listen('127.0.0.1')}"
  members = [_watch(i, 3, reports) for i in (1, 2)]
  for member in members:
    member.connect(address)
  _wait_until_joined(leader, 2)
  members[0].finish()
  members[0]._peers[0].close()  # the finished process exits
  time.sleep(1.0)
  leader.finish()
  members[1].finish()
  time.sleep(1.0)
  assert reports.empty()


def test_the_silence_limit_must_exceed_two_pings():
  with pytest.raises(ValueError, match="silence_limit_s"):
    peer_watch.PeerWatch(0, 2, print, silence_limit_s=3.0, ping_every_s=2.0)


def test_stopping_prints_one_line_and_exits_4():
  code = (
    "from ega_jax import peer_watch\n"
    "peer_watch.stop_for_a_lost_peer('process 1', 'why', 0, 2, '/tmp/w')\n"
  )
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
  assert done.returncode == peer_watch.EXIT_LOST_PEER == 4
  assert done.stderr.splitlines() == [
    "error: process 1 of this 2-process job was lost (why); process 0 stops. Restart every "
    "process with the same command to resume from the newest complete checkpoint in /tmp/w."
  ]
