"""Stop every process of a multi-process job, with one line, when one of them is lost.

jax.distributed notices a dead process only after `heartbeat_timeout_s`, and then
aborts the survivors from a C++ thread (SIGABRT, a dozen log lines and a stack
trace). The callback that would let us replace that abort cannot be given from
Python in this jaxlib: `get_distributed_runtime_client(missed_heartbeat_callback=f)`
terminates with `std::bad_cast` when it fires, because its absl::Status argument has
no Python conversion. A collective that fails first (Gloo on CPU reports the reset
at once) is caught in main.py, but a process waiting in a coordination-service
barrier (orbax's save barriers) sees nothing until the heartbeat timeout.

So the job keeps its own watch, on a channel that notices at once:

- process 0 listens on a TCP port, published in jax.distributed's key-value store;
  every other process connects to it and introduces itself;
- each end sends a ping every `ping_every_s`; a connection that closes without a
  goodbye (the kernel closes a killed process's sockets at once) or stays silent
  for `silence_limit_s` (a hung or vanished host) means that peer is lost;
- process 0 tells the remaining processes which one was lost, so every survivor
  prints the same one line naming it and exits EXIT_LOST_PEER;
- a process that finishes (done or preempted) says goodbye before it exits, so a
  normal end is never mistaken for a loss.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from typing import Callable

EXIT_LOST_PEER = 4
_STORE_KEY = "ega_jax/peer_watch_address"

# What a collective reports when another process of the job died (CPU: Gloo's
# TCP pairs; the coordination service after heartbeat_timeout_s elsewhere).
_LOST_PEER_SIGNS = (
  "Connection reset by peer",
  "Connection closed",
  "heartbeat timeout",
  "unhealthy",
)

# Whoever notices first (the watch's threads or the main thread's failing
# collective) prints the one line; the others wait here until os._exit.
_stopping = threading.Lock()


def lost_a_peer(error: BaseException) -> bool:
  """True when a collective's error says another process of the job is gone."""
  return any(sign in str(error) for sign in _LOST_PEER_SIGNS)


def stop_for_a_lost_peer(who: str, how: str, index: int, count: int, workdir: str) -> None:
  """Prints one line naming the lost process, then exits EXIT_LOST_PEER at once.

  os._exit skips jax.distributed's shutdown barrier, which would otherwise wait
  for the dead process until the heartbeat timeout and then abort with a core
  dump. Checkpoints are whole or absent (orbax renames a complete one), so
  nothing is lost that a restart of every process does not recover.
  """
  _stopping.acquire()
  print(
    f"error: {who} of this {count}-process job was lost ({how}); process {index} stops. "
    f"Restart every process with the same command to resume from the newest complete "
    f"checkpoint in {workdir}.",
    file=sys.stderr,
    flush=True,
  )
  os._exit(EXIT_LOST_PEER)


def exit_for_a_lost_collective(error: BaseException, index: int, count: int, workdir: str):
  """The main thread's path: a collective failed because a peer is gone."""
  from ega_jax import config as config_lib

  who = f"process {1 - index}" if count == 2 else "another process"
  how = f"during a collective: {config_lib.one_line(error)[:160]}"
  stop_for_a_lost_peer(who, how, index, count, workdir)


class PeerWatch:
  """The TCP watch between process 0 and every other process (see the module doc).

  `on_lost(lost_index, how)` is called once, from a watch thread, when a peer is
  lost; main.py passes a function that prints one line and exits. Messages are
  text lines: `hello K`, `ping`, `bye`, and `lost K` (process 0 to the others).
  """

  def __init__(
    self,
    index: int,
    count: int,
    on_lost: Callable[[int, str], None],
    *,
    silence_limit_s: float,
    ping_every_s: float = 2.0,
  ):
    if silence_limit_s <= 2 * ping_every_s:
      raise ValueError(
        f"silence_limit_s ({silence_limit_s}) must exceed two pings ({2 * ping_every_s} s)."
      )
    self.index, self.count = index, count
    self._on_lost = on_lost
    self._silence_limit_s = silence_limit_s
    self._ping_every_s = ping_every_s
    self._peers: dict[int, socket.socket] = {}  # process index -> connection
    self._lock = threading.Lock()  # guards _peers and sends
    self._finished = threading.Event()
    self._reported = threading.Event()
    self._listener: socket.socket | None = None

  # -- setting up -------------------------------------------------------------

  def listen(self, host: str = "") -> int:
    """Process 0: accepts the other processes' connections; returns the port."""
    self._listener = socket.create_server((host, 0))
    threading.Thread(target=self._accept, daemon=True, name="peer-watch-accept").start()
    threading.Thread(target=self._ping, daemon=True, name="peer-watch-ping").start()
    return self._listener.getsockname()[1]

  def connect(self, address: str, timeout_s: float = 300.0) -> None:
    """Any other process: connects to process 0 at `host:port`."""
    host, port = address.rsplit(":", 1)
    connection = socket.create_connection((host, int(port)), timeout=timeout_s)
    self._keep(0, connection)
    self._send(connection, f"hello {self.index}")
    threading.Thread(target=self._ping, daemon=True, name="peer-watch-ping").start()

  def finish(self) -> None:
    """Says goodbye: this process ends normally, which is not a loss."""
    self._finished.set()
    with self._lock:
      connections = list(self._peers.values())
    for connection in connections:
      self._send(connection, "bye")

  # -- the watch --------------------------------------------------------------

  def _keep(self, peer: int, connection: socket.socket, lines=None) -> None:
    """Watches `connection` to process `peer`; `lines`: its reader, if one was opened."""
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    connection.settimeout(self._silence_limit_s)
    with self._lock:
      self._peers[peer] = connection
    threading.Thread(
      target=self._read,
      args=(peer, lines or connection.makefile("r")),
      daemon=True,
      name=f"peer-watch-{peer}",
    ).start()

  def _accept(self) -> None:
    while not self._finished.is_set():
      try:
        connection, _ = self._listener.accept()
        connection.settimeout(self._silence_limit_s)
        lines = connection.makefile("r")  # kept: it may have buffered the first ping
        hello = lines.readline().split()
        if len(hello) != 2 or hello[0] != "hello" or not hello[1].isdigit():
          connection.close()  # not one of ours
          continue
      except OSError:
        continue
      self._keep(int(hello[1]), connection, lines)

  def _read(self, peer: int, lines) -> None:
    try:
      while True:
        line = lines.readline()
        if not line:
          return self._lost(peer, "its connection closed without finishing: killed or crashed")
        words = line.split()
        if words == ["bye"]:
          return
        if len(words) == 2 and words[0] == "lost":
          return self._lost(int(words[1]), "process 0 reported it")
    except TimeoutError:
      self._lost(peer, f"silent for {self._silence_limit_s:g} s: hung, or its host is gone")
    except OSError as e:
      self._lost(peer, f"its connection failed: {e.strerror or e}")

  def _lost(self, peer: int, how: str) -> None:
    if self._finished.is_set() or self._reported.is_set():
      return
    self._reported.set()
    if self.index == 0:  # tell the others whom to name
      with self._lock:
        others = [c for p, c in self._peers.items() if p != peer]
      for connection in others:
        self._send(connection, f"lost {peer}")
    self._on_lost(peer, how)

  def _ping(self) -> None:
    while not self._finished.wait(self._ping_every_s):
      with self._lock:
        connections = list(self._peers.values())
      for connection in connections:
        self._send(connection, "ping")

  def _send(self, connection: socket.socket, message: str) -> None:
    try:
      with self._lock:
        connection.sendall(f"{message}\n".encode())
    except OSError:
      pass  # the reader of this connection reports the loss


def start(workdir: str, silence_limit_s: float) -> PeerWatch | None:
  """Starts the watch for this process of a jax.distributed job (None for one process).

  The address goes through jax.distributed's key-value store; process 0 listens
  on every interface and names the host the others already reach it by (the
  coordinator's).
  """
  import jax
  from jax._src import distributed

  count, index = jax.process_count(), jax.process_index()
  if count == 1:
    return None

  def on_lost(peer: int, how: str) -> None:
    stop_for_a_lost_peer(f"process {peer}", how, index, count, workdir)

  watch = PeerWatch(index, count, on_lost, silence_limit_s=silence_limit_s)
  client = distributed.global_state.client
  if index == 0:
    host = distributed.global_state.coordinator_address.rsplit(":", 1)[0]
    client.key_value_set(_STORE_KEY, f"{host}:{watch.listen()}")
  else:
    watch.connect(client.blocking_key_value_get(_STORE_KEY, 300_000))
  return watch
