"""The sync client's control connection: one request to the broker at a
time and its reply, over a ZeroMQ DEALER (the protocol without I/O is
clients/channel.py), and the broker's death noticed and the session
resumed with its successor (the policy is clients/reconnect.py; over tcp,
clients/redial.py). A mixin of clients/client.py's Client: the state is
the Client's.

Design notes:

* Requests are serialized by the client's lock; notices the broker sends
  meanwhile go to their subscribers as they arrive.
* A local client watches the broker's pidfd from a thread
  (``tensorbus-watch``), so it resumes the moment the broker dies, before
  its next call; a request in flight polls the pidfd beside its socket.
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import Any

import zmq

from tensorbus.broker import protocol as P
from tensorbus.clients._shared import ipc_unreachable
from tensorbus.clients.errors import BrokerRestarted, BrokerUnavailable, ProtocolError
from tensorbus.clients.reconnect import (
    IDEMPOTENT_OPS,
    Backoff,
    BrokerWatch,
    attempt_s,
    gave_up,
    in_flight_error,
    no_retry,
)
from tensorbus.clients.redial import Redialer

__all__ = ["ControlConnection"]


class ControlConnection:
    """The control half of :class:`~tensorbus.clients.client.Client` (a
    mixin: the state is the Client's)."""

    def _new_socket(self) -> zmq.Socket:
        # pyzmq's per-process context (recreated after a fork): one I/O
        # thread for all clients of the process, not one each.
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            self._curve(sock)
        sock.connect(self.url)
        return sock

    def _hello_fields(self) -> dict:
        return {
            "name": self.name,
            "pid": os.getpid(),
            "protocol": P.PROTOCOL_VERSION,
            "token": self._token,
        }

    def _request(self, op: str, **fields: Any) -> dict:
        """Send one request and wait for its reply; notices that arrive
        meanwhile are dispatched to their subscribers (clients/channel.py).
        If the broker dies meanwhile, resume with its successor, then send
        the request again if that is safe (clients/reconnect.py; over tcp,
        a new session: clients/redial.py)."""
        if self._redial is not None:
            return self._redial.request(op, fields)
        self._lock_for(op, f"resume its session with a successor of the broker at {self.url}")
        try:
            while True:
                if self._lost is not None:
                    raise self._lost
                reply = self._exchange(op, fields, self.timeout, self._watch)
                if reply is not None:
                    return reply
                self._recover()
                if self._lost is not None:
                    raise self._lost
                if op not in IDEMPOTENT_OPS:
                    raise in_flight_error(op, self.url)
        finally:
            self._lock.release()

    def _lock_for(self, op: str, doing: str) -> None:
        """Take the connection for ``op``, waiting at most the client's
        timeout while another thread has it (``doing`` that)."""
        if not self._lock.acquire(timeout=self.timeout):
            raise BrokerUnavailable(
                f"{op!r} waited {self.timeout:g} s for this client to {doing}", "unavailable"
            )

    def _exchange(self, op: str, fields: dict, timeout: float, watch=None) -> dict | None:
        """One request and its reply; None if the broker ``watch`` watches
        died first."""
        request_id, frame = self._channel.request(op, **fields)
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        if watch is not None and watch.fd >= 0:
            poller.register(watch.fd, zmq.POLLIN)
        try:
            self._sock.send(frame)
            for span, probe in self._channel.wait_plan(op, timeout):
                deadline = time.monotonic() + span
                while (left := deadline - time.monotonic()) > 0:
                    events = dict(poller.poll(int(left * 1000) + 1))
                    if self._sock in events:
                        answer = self._channel.receive(self._sock.recv())
                        if answer is not None:
                            return self._channel.result(answer)
                    elif events and watch is not None:
                        return None  # the broker's pidfd: it died
                    elif watch is not None and watch.fd < 0 and watch.dead():
                        return None
                why = ipc_unreachable(self.url, probe=True) if probe else None
                if why:
                    raise BrokerUnavailable(why, "unavailable")
            raise self._channel.unanswered(op, timeout)
        finally:
            self._channel.forget(request_id)

    def _recover(self) -> None:
        """The broker died (call with the lock held): find its successor
        and resume this session there, trying with backoff for the
        ``reconnect`` budget; what is left when that fails goes to _lost."""
        watch = self._watch
        if watch is None or self._lost is not None or not watch.dead():
            return
        self._drain_socket()
        self._lost = no_retry(self.url, self._channel.shutdown_reason, self._reconnect_s)
        if self._lost is not None:
            return
        deadline = time.monotonic() + self._reconnect_s
        backoff = Backoff()
        while not self._closing:
            left = deadline - time.monotonic()
            if ipc_unreachable(self.url, probe=True) is None:
                self._sock.close(0)
                self._sock = self._new_socket()
                try:
                    fields = {**self._hello_fields(), "resume": self._session}
                    hello = self._exchange("hello", fields, attempt_s(left))
                except BrokerRestarted as exc:
                    self._lost = exc
                    return
                except BrokerUnavailable:
                    hello = None
                if hello is not None:
                    watch.close()
                    self.broker_pid = hello.get("broker_pid")
                    self._watch = BrokerWatch(self.broker_pid)
                    return
            if time.monotonic() >= deadline:
                break
            time.sleep(backoff.next())
        self._lost = gave_up(self.url, self._reconnect_s)

    def _drain_socket(self) -> None:
        """Read what the broker sent before it went (a shutdown notice)."""
        while self._sock.poll(0):
            try:
                self._channel.receive(self._sock.recv(zmq.NOBLOCK))
            except (zmq.ZMQError, ProtocolError):
                return

    def _start_watcher(self) -> None:
        """A thread that sleeps on the broker's pidfd and resumes the
        session the moment it dies, so the client is ready before its next
        call (and subscribers hear of new topics again)."""
        self._wake_r, self._wake_w = os.pipe()
        thread = threading.Thread(target=self._watch_broker, name="tensorbus-watch", daemon=True)
        thread.start()

    def _watch_broker(self) -> None:
        wake = self._wake_r
        try:
            while not self._closed and self._lost is None:
                pid = self.broker_pid
                watch = BrokerWatch(pid)
                try:
                    if watch.fd >= 0:
                        ready = select.select([watch.fd, wake], [], [])[0]
                    else:
                        ready = select.select([wake], [], [], 0.5)[0]
                finally:
                    watch.close()
                if wake in ready or self._closed:
                    return
                with self._lock:
                    if self._closed or pid != self.broker_pid:
                        continue
                    self._recover()
        finally:
            os.close(wake)

    def _drain_notices(self, wait: float = 0.0) -> None:
        """Read what the broker sent on its own, waiting up to ``wait``
        seconds for the first frame. Skipped while another thread holds
        the connection (a request, or a resume after a broker restart):
        the bell's notice flag is raised again for what it missed."""
        if not self._lock.acquire(timeout=wait):
            return
        try:
            if self._sock.poll(int(wait * 1000)):
                while True:
                    self._channel.receive(self._sock.recv())
                    if not self._sock.poll(0):
                        break
        finally:
            self._lock.release()

    def _start_heartbeats(self, period: float) -> None:
        """A tcp client's keeper: heartbeats every ``period`` seconds, and a
        new session and link if the broker is lost (clients/redial.py)."""
        self._redial = Redialer(self, period)
