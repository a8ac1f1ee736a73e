"""The UCX data path of a link (ucxx), beside its ZeroMQ link channel.

Design notes (docs/bridge.md has the full story):

* Endpoints come from worker addresses exchanged in the ``link`` op, not
  from ucxx's listener API: the listener always turns endpoint error
  handling on, and UCX then restricts itself to TCP. From worker addresses
  UCX picks every transport the fabric has: RDMA between hosts, and shared
  memory / CMA (one copy, about 11-19 GB/s here) between two daemons of one
  machine. Error handling is off only between daemons with the same boot
  id (the same kernel); across hosts it stays on. Either way liveness is
  the link channel's heartbeats: a silent peer's endpoint is aborted.
* Progress: our own, on the daemon's event loop. The worker's epoll fd is
  watched with ``add_reader``; on an event, and after we post work, the
  worker is progressed until ``arm()`` succeeds. ucxx 0.52's own "blocking"
  mode never re-arms after the first event and then spins a core; its
  "polling" mode spins one always; its thread mode had multi-millisecond
  p99 on two cores. We register ours where ucxx looks for a loop's progress
  task, so ucxx starts none of its own.
* Framing: a batch (the same bytes as on tcp) is an active message, which
  arrives sized to fit; each large body is a tag transfer posted by the
  receiver into a loan in its arena as soon as its batch arrives. The
  sender sends one operation at a time, in order; the receiver delivers in
  order as bodies complete. Tags are worker-wide, so the receiver
  chooses the tag its peer sends with (``ucx_tag`` in the link exchange).
  Above the rendezvous threshold UCX keeps the body at the sender until
  the receive is posted: no staging copy on either side.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from tensorbus.broker import peer_wire as W
from tensorbus.broker.soon import Soon

__all__ = ["Progress", "UcxData", "start", "stop", "worker_address"]

log = logging.getLogger("tensorbus.bridge")

BODY_CHANNEL = 2
BUSY_SLICE_S = 0.001  # progress a busy worker this long before the loop runs again
SAFETY_PROGRESS_S = 0.1  # progress at least this often, whatever epoll says


@dataclass(slots=True)
class Arriving:
    """A received entry, in order; a body's is ``done`` once UCX has put it
    in ``dest`` (a loan in our arena where ``loaned``)."""

    entry: W.Entry
    dest: object
    loaned: bool
    done: bool


def _import():
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    import ucxx

    return ucxx


def _types():
    from ucxx._lib.arr import Array
    from ucxx.types import Tag, TagMaskFull

    return Array, Tag, TagMaskFull


async def start(required: bool):
    """Initialise UCX for this daemon's loop: a Progress, or None where
    ucxx cannot be imported and ``required`` is false (auto)."""
    try:
        ucxx = _import()
        from ucxx._lib_async import application_context
    except ImportError as exc:
        if required:
            raise RuntimeError(
                f"--transport ucx needs ucxx (pip install ucxx-cu12): {exc}"
            ) from None
        log.info("ucxx is not importable (%s): bridges use tcp", exc)
        return None
    loop = asyncio.get_running_loop()
    # ucxx starts a loop's progress on init unless one is registered for it:
    # hold the place until the worker exists, then put ours there.
    application_context.ProgressTasks[loop] = None
    try:
        ucxx.init(progress_mode="blocking")
    except BaseException:
        application_context.ProgressTasks.pop(loop, None)
        raise
    progress = Progress(ucxx.core._get_ctx().worker, loop)
    application_context.ProgressTasks[loop] = progress
    return progress


async def stop(progress: Progress) -> None:
    progress.close()


def worker_address() -> bytes:
    """This daemon's UCX worker address, for the ``link`` exchange."""
    return _import().get_worker_address().tobytes()


class Progress:
    """Event-driven progress of one UCX worker on an asyncio loop."""

    def __init__(self, worker, loop: asyncio.AbstractEventLoop):
        self.worker = worker
        self.loop = loop
        worker.init_blocking_progress_mode()
        self.fd = worker.epoll_file_descriptor
        loop.add_reader(self.fd, self._run)  # an event: progress now, not a loop turn later
        self.soon = Soon(self._run)
        self.closed = False
        self.timer = loop.call_later(SAFETY_PROGRESS_S, self._safety)
        self.tags = 0
        # Posted UCX requests and what to call when each completes. ucxx's
        # own awaitables poll with asyncio.sleep(0) outside its thread mode,
        # which would spin the daemon's loop: we check completions after
        # each progress instead, and call back at once (no loop turn).
        self.requests: list = []

    def track(self, request, done) -> None:
        """Call ``done(request)`` once ``request`` (a ucxx UCXRequest) has
        completed, successfully or not (``request.check_error()`` says)."""
        self.requests.append((request, done))
        self.kick()

    def kick(self) -> None:
        """Progress soon: after the callbacks queued now (which may post work) run."""
        if not self.closed:
            self.soon()

    def _run(self) -> None:
        for _ in range(64):
            self.worker.progress()
            self._complete()
            if self.worker.arm():
                return  # armed: the next event makes the epoll fd readable
        self.kick()  # still busy: let the loop run, then again

    def _complete(self) -> None:
        """Call back for the requests that completed (the callbacks may post more)."""
        if self.requests:
            done, waiting = [], []
            for entry in self.requests:
                (done if entry[0].completed else waiting).append(entry)
            self.requests = waiting
            for request, callback in done:
                try:
                    callback(request)
                except Exception:  # one link's trouble is not the worker's
                    log.exception("a UCX completion failed")

    def _safety(self) -> None:
        if not self.closed:
            self.kick()
            self.timer = self.loop.call_later(SAFETY_PROGRESS_S, self._safety)

    def next_tag_base(self) -> int:
        self.tags += 1
        return self.tags << 8

    def close(self) -> None:
        self.closed = True
        self.timer.cancel()
        self.requests = []
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.fd)

    def __hash__(self):  # ucxx keys its progress tasks by loop
        return hash(self.loop)


class UcxData:
    """One link's data over a UCX endpoint: batches (and the control
    messages that must stay in order with them) as active messages, bodies
    as tag transfers into the receiver's arena. Driven by completions, with
    no task per operation: each one posts the next."""

    def __init__(
        self, bridge, link, peer_address: bytes, send_tag: int, recv_tag: int, same_host: bool
    ):
        self.bridge = bridge
        self.link = link
        self.progress: Progress = bridge.ucx_context
        self.send_tag = send_tag | BODY_CHANNEL
        self.recv_tag = recv_tag | BODY_CHANNEL
        self.queue: collections.deque = collections.deque()  # (message, bodies, bytes)
        self.sending = False  # a message (or its bodies) is being sent
        # Received entries in order; a body not yet complete holds back
        # those after it.
        self.arrived: collections.deque = collections.deque()
        self.inflight = 0
        self.endpoint = None  # ucxx's Endpoint
        self.Array = self.TagMaskFull = None  # ucxx's types, once connected
        self.ep = None  # its UCXEndpoint, whose requests we post
        self.closed = False
        self.task = asyncio.get_running_loop().create_task(self._connect(peer_address, same_host))

    # Control messages not bound to the data's order (credit, heartbeats)
    # stay on the link channel: an active message per heartbeat is no gain.
    takes_control = False
    kind = "ucx"

    def link_up(self) -> None:
        """Nothing to start: this channel is made at link up, and its
        endpoint connects by itself."""

    async def _connect(self, peer_address: bytes, same_host: bool) -> None:
        ucxx = _import()
        self.Array, Tag, self.TagMaskFull = _types()  # looked up once, used per operation
        try:
            address = ucxx.get_ucx_address_from_buffer(peer_address)
            self.endpoint = await ucxx.create_endpoint_from_worker_address(
                address, endpoint_error_handling=not same_host
            )
        except Exception as exc:
            if not self.closed:
                log.warning("ucx endpoint to %s failed: %s", self.link.peer.name, exc)
                self.link.down(f"ucx: {exc}")
            return
        if self.closed:
            self.endpoint.abort()
            return
        self.ep = self.endpoint._ep  # requests, completed by our progress
        self.send_tag = Tag(self.send_tag)
        self.recv_tag = Tag(self.recv_tag)
        self._receive_next()
        self._send_next()

    def _failed(self, request) -> bool:
        """True (and the link reported down) if ``request`` failed, or the
        link is closed already."""
        if self.closed:
            return True
        try:
            request.check_error()
        except Exception as exc:
            self.link.down(f"ucx: {exc}")
            return True
        return False

    # -- sending -----------------------------------------------------------

    def send(self, batch: bytes, bodies: list) -> None:
        nbytes = len(batch) + sum(b.nbytes for b in bodies)
        self.queue.append((W.DATA + batch, bodies, nbytes))
        self.inflight += nbytes
        self._send_next()

    def send_control(self, body: bytes) -> None:
        """A control message in order with the data (topic, resume)."""
        self.queue.append((W.CONTROL + body, [], 0))
        self._send_next()

    def _send_next(self) -> None:
        """Send the next queued message, then its bodies, in order; the
        receiver posts its receives as messages arrive."""
        if self.sending or not self.queue or self.ep is None or self.closed:
            return
        Array = self.Array
        message, bodies, nbytes = self.queue.popleft()
        self.sending = True
        parts = iter(bodies)
        # What is being sent stays referenced here until UCX is done with it:
        # a request does not keep its buffer alive.
        sending = [np.frombuffer(message, np.uint8)]

        def step(request) -> None:
            if self._failed(request):
                return
            body = next(parts, None)
            if body is not None:
                sending[0] = body
                self._post(lambda: self.ep.tag_send(Array(body), self.send_tag), step)
                return
            sending.clear()
            self.sending = False
            self.inflight -= nbytes
            self.link.peer.kick()  # in-flight budget freed
            self._send_next()

        self._post(lambda: self.ep.am_send(Array(sending[0])), step)

    # -- receiving ---------------------------------------------------------

    def _receive_next(self) -> None:
        if not self.closed:
            self._post(self.ep.am_recv, self._on_message)

    def _post(self, make, done) -> None:
        """Post the request ``make()`` returns; if posting fails (an endpoint
        in error), the link is down rather than silently stalled."""
        try:
            request = make()
        except Exception as exc:
            self.link.down(f"ucx: {exc}")
            return
        self.progress.track(request, done)

    def _on_message(self, request) -> None:
        """A message arrived: act on it, post each body's receive into its
        loan at once, and wait for the next message."""
        if self._failed(request):
            return
        Array, TagMaskFull = self.Array, self.TagMaskFull
        try:
            message = memoryview(request.recv_buffer).cast("B")
            kind, body = bytes(message[:1]), message[1:]
            if kind == W.CONTROL:
                self.link.last_rx = time.monotonic()
                self.bridge.on_control(self.link, bytes(body))
            elif kind == W.DATA:
                for entry in self.link.peer.batch_entries(body, bool(self.arrived)):
                    if entry.kind != W.BODY:
                        self.arrived.append(Arriving(entry, None, False, True))
                        continue
                    dest = self.link.peer.loan_for(entry)
                    loaned = dest is not None
                    if not loaned:  # the arena is full: land it here, copy it in later
                        dest = np.empty(entry.nbytes, np.uint8)
                    item = Arriving(entry, dest, loaned, False)
                    self.arrived.append(item)
                    # The callback holds the loan until UCX is done with it
                    # (completed, or cancelled by an abort).
                    self._post(
                        lambda dest=dest: self.ep.tag_recv(Array(dest), self.recv_tag, TagMaskFull),
                        lambda request, item=item: self._body_done(request, item),
                    )
            else:
                raise W.WireError(f"unknown ucx message kind {kind!r}")
        except Exception as exc:  # a peer's bytes never take the daemon down
            self.link.down(f"protocol error: {exc}")
            return
        self._receive_next()
        self._deliver_ready()

    def _body_done(self, request, item: Arriving) -> None:
        if self._failed(request):
            return
        item.done = True
        self._deliver_ready()

    def _deliver_ready(self) -> None:
        peer = self.link.peer
        arrived = self.arrived
        try:
            while not self.closed and arrived and arrived[0].done:
                item = arrived.popleft()
                if item.dest is None:
                    peer.deliver(item.entry)
                else:
                    peer.deliver(item.entry, item.dest, loaned=item.loaned)
            peer.flush_grants()
        except Exception as exc:  # a peer's bytes never take the daemon down
            self.link.down(f"protocol error: {exc}")

    def close(self) -> None:
        """Abort the endpoint (UCX cancels its requests; their callbacks see
        the link closed and only let go of their buffers)."""
        self.closed = True
        self.task.cancel()
        self.arrived.clear()
        if self.endpoint is not None:
            with contextlib.suppress(Exception):
                self.endpoint.abort()
            self.endpoint = self.ep = None
