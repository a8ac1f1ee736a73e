"""The UCX data path of a link (ucxx), beside its ZeroMQ link channel.

Design notes (hard detail 11, docs/bridge.md):

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
  receiver into a loan in its arena. Both sides post the next message
  before the last one completes (UCX keeps order per tag), so the wire
  never idles between tensors. Tags are worker-wide, so the receiver
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

import numpy as np

from tensorbus.broker import peer_wire as W

__all__ = ["Progress", "UcxData", "start", "stop", "worker_address"]

log = logging.getLogger("tensorbus.bridge")

BODY_CHANNEL = 2
BUSY_SLICE_S = 0.001  # progress a busy worker this long before the loop runs again
SAFETY_PROGRESS_S = 0.1  # progress at least this often, whatever epoll says


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


def worker_address(progress: Progress) -> bytes:
    return _import().get_worker_address().tobytes()


class Progress:
    """Event-driven progress of one UCX worker on an asyncio loop."""

    def __init__(self, worker, loop: asyncio.AbstractEventLoop):
        self.worker = worker
        self.loop = loop
        worker.init_blocking_progress_mode()
        self.fd = worker.epoll_file_descriptor
        loop.add_reader(self.fd, self.kick)
        self.pending = False
        self.closed = False
        self.timer = loop.call_later(SAFETY_PROGRESS_S, self._safety)
        self.tags = 0
        # Posted UCX requests and the futures they complete. ucxx's own
        # awaitables poll with asyncio.sleep(0) outside its thread mode,
        # which would spin the daemon's loop: we check completions after
        # each progress instead.
        self.requests: list = []

    def track(self, request) -> asyncio.Future:
        """A future that completes with ``request`` (a ucxx UCXRequest)."""
        future = self.loop.create_future()
        if request.completed:
            _settle(future, request)
        else:
            self.requests.append((request, future))
        self.kick()
        return future

    def kick(self) -> None:
        """Progress soon: after the callbacks queued now (which may post work) run."""
        if not self.pending and not self.closed:
            self.pending = True
            self.loop.call_soon(self._run)

    def _run(self) -> None:
        self.pending = False
        for _ in range(64):
            self.worker.progress()
            self._complete()
            if self.worker.arm():
                return  # armed: the next event makes the epoll fd readable
        self.kick()  # still busy: let the loop run, then again

    def _complete(self) -> None:
        """Settle the futures of requests that completed."""
        if self.requests:
            waiting = []
            for request, future in self.requests:
                if request.completed:
                    _settle(future, request)
                elif not future.done():
                    waiting.append((request, future))
            self.requests = waiting

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
        for _, future in self.requests:
            future.cancel()
        self.requests = []
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.fd)

    def __hash__(self):  # ucxx keys its progress tasks by loop
        return hash(self.loop)


def _settle(future: asyncio.Future, request) -> None:
    if future.done():
        return
    try:
        request.check_error()
    except Exception as exc:  # UCX's error for this request: the link's problem
        future.set_exception(exc)
    else:
        future.set_result(request)


class UcxData:
    """One link's data over a UCX endpoint: batches (and the control
    messages that must stay in order with them) as active messages, bodies
    as tag transfers into the receiver's arena."""

    def __init__(
        self, bridge, link, peer_address: bytes, send_tag: int, recv_tag: int, same_host: bool
    ):
        self.bridge = bridge
        self.link = link
        self.progress: Progress = bridge.ucx_context
        self.send_tag = send_tag | BODY_CHANNEL
        self.recv_tag = recv_tag | BODY_CHANNEL
        self.queue: collections.deque = collections.deque()  # (message, bodies, bytes)
        # Received entries in order, [entry, dest, loaned, receive op]; a
        # body not yet complete holds back those after it.
        self.arrived: collections.deque = collections.deque()
        self.ops: set = set()  # our pending request futures, cancelled on close
        self.inflight = 0
        self.ready = asyncio.Event()
        self.endpoint = None  # ucxx's Endpoint
        self.ep = None  # its UCXEndpoint, whose requests we post
        self.closed = False
        self.tasks: list[asyncio.Task] = []
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(self._run(peer_address, same_host))

    def send(self, batch: bytes, bodies: list) -> None:
        nbytes = len(batch) + sum(b.nbytes for b in bodies)
        self.queue.append((W.DATA + batch, bodies, nbytes))
        self.inflight += nbytes
        self.ready.set()

    def send_control(self, body: bytes) -> None:
        """A control message in order with the data (topic, resume)."""
        self.queue.append((W.CONTROL + body, [], 0))
        self.ready.set()

    def _track(self, request) -> asyncio.Future:
        op = self.progress.track(request)
        self.ops.add(op)
        op.add_done_callback(self.ops.discard)
        return op

    async def _run(self, peer_address: bytes, same_host: bool) -> None:
        ucxx = _import()
        _, Tag, _ = _types()
        try:
            address = ucxx.get_ucx_address_from_buffer(peer_address)
            self.endpoint = await ucxx.create_endpoint_from_worker_address(
                address, endpoint_error_handling=not same_host
            )
            if self.closed:
                self.endpoint.abort()
                return
            self.ep = self.endpoint._ep  # requests, completed by our progress
            self.send_tag = Tag(self.send_tag)
            self.recv_tag = Tag(self.recv_tag)
            self.progress.kick()
            loop = asyncio.get_running_loop()
            self.tasks = [loop.create_task(self._sender()), loop.create_task(self._receiver())]
            done, _ = await asyncio.wait(self.tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # raises what ended it
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self.closed:
                log.warning("ucx data path of %s failed: %s", self.link.peer.name, exc)
                self.link.down(f"ucx: {exc}")
        finally:
            for task in self.tasks:
                task.cancel()

    async def _sender(self) -> None:
        """Send what is queued, in order: each message, then its bodies.
        The receiver posts its receives as messages arrive."""
        ep = self.ep
        Array, _, _ = _types()
        while True:
            while not self.queue:
                self.ready.clear()
                await self.ready.wait()
            message, bodies, nbytes = self.queue.popleft()
            await self._track(ep.am_send(Array(np.frombuffer(message, np.uint8))))
            for body in bodies:
                await self._track(ep.tag_send(Array(body), self.send_tag))
            self.inflight -= nbytes
            self.link.peer.kick()  # in-flight budget freed

    async def _receiver(self) -> None:
        """Take messages; post each body's receive into its loan at once and
        deliver entries in order as their bodies complete."""
        ep = self.ep
        Array, _, TagMaskFull = _types()
        while True:
            request = await self._track(ep.am_recv())
            message = memoryview(request.recv_buffer).cast("B")
            kind, body = bytes(message[:1]), message[1:]
            if kind == W.CONTROL:
                self.link.last_rx = time.monotonic()
                self.bridge.on_control(self.link, bytes(body))
                continue
            if kind != W.DATA:
                raise W.WireError(f"unknown ucx message kind {kind!r}")
            for entry in W.decode_batch(body):
                if entry.kind != W.BODY:
                    self.arrived.append([entry, None, False, None])
                    continue
                dest = self.link.peer.loan_for(entry)
                loaned = dest is not None
                if not loaned:  # the arena is full: land it here, copy it in later
                    dest = np.empty(entry.nbytes, np.uint8)
                # Not in self.ops: a posted receive keeps its loan until UCX
                # is done with it (completed, or cancelled by abort).
                op = self.progress.track(ep.tag_recv(Array(dest), self.recv_tag, TagMaskFull))
                op.add_done_callback(self._body_done)
                self.arrived.append([entry, dest, loaned, op])
            self._deliver_ready()

    def _body_done(self, op: asyncio.Future) -> None:
        if self.closed or op.cancelled():
            return
        if op.exception() is not None:
            self.link.down(f"ucx receive failed: {op.exception()}")
            return
        self._deliver_ready()

    def _deliver_ready(self) -> None:
        peer = self.link.peer
        arrived = self.arrived
        try:
            while not self.closed and arrived and (arrived[0][3] is None or arrived[0][3].done()):
                entry, dest, loaned, op = arrived.popleft()
                if op is not None and (op.cancelled() or op.exception() is not None):
                    return
                if dest is None:
                    peer.deliver(entry)
                else:
                    peer.deliver(entry, dest, loaned=loaned)
            peer.flush_grants()
        except Exception as exc:  # a peer's bytes never take the daemon down
            self.link.down(f"protocol error: {exc}")

    def close(self) -> None:
        self.closed = True
        self.task.cancel()
        for task in self.tasks:
            task.cancel()
        for op in list(self.ops):
            op.cancel()
        for _, dest, _, op in self.arrived:
            if op is not None and not op.done():
                op.add_done_callback(lambda _, keep=dest: None)  # the loan outlives UCX's use
        self.arrived.clear()
        if self.endpoint is not None:
            with contextlib.suppress(Exception):
                self.endpoint.abort()
            self.endpoint = self.ep = None
