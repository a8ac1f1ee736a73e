"""The daemon's state where a successor can take it over.

The data plane (rings, the arena, the doorbells) already outlives the
daemon's process; this module makes its *registry* outlive it too. After
every change, and before any client hears of it, the daemon writes a
snapshot of its records (:func:`snapshot`) to ``<socket>.state`` in its
private run directory: topics and their ring segments, the bell table and
the arena, sessions with their pids, arena holder slots and publishers,
subscriptions with their cursors and bells, queue groups, and the holder
slots parked until a process exits. The file is per user (the run
directory is) and per socket (its name is).

A daemon that starts on that socket, a restart or a ``--standby`` that got
the lock, reads the snapshot (:func:`load`), checks its magic, its version
and that its owner is dead, maps the same segments (:func:`open_segments`)
and rebuilds the registry from it (:func:`restore`) instead of sweeping.
Clients then resume their sessions by id (``hello`` with ``resume``).

What cannot be taken over (a snapshot of another release, a corrupt one,
segments that are gone) is condemned before it is swept
(:func:`condemn`): each ring is closed as "restarted", so its publishers
and subscribers get BrokerRestarted instead of writing where nobody reads.

Why a file and not a shared-memory segment: the snapshot is written whole
and renamed into place, so a reader never sees half of one, whatever
moment the writer died at; the run directory is normally a tmpfs
(``$XDG_RUNTIME_DIR``), so this costs what a segment would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import msgpack

from tensorbus._core import Arena, BellTable, Ring, SegmentError, TensorbusError
from tensorbus._core.arena import MAX_HOLDERS
from tensorbus._core.offsets import layout
from tensorbus.broker.bridge_view import BRIDGE_OWNED
from tensorbus.broker.registry import Group, Registry, Session, Subscription, Topic
from tensorbus.broker.startup import pid_alive

__all__ = [
    "STATE_MAGIC",
    "STATE_VERSION",
    "StateError",
    "condemn",
    "load",
    "open_segments",
    "restore",
    "save",
    "snapshot",
    "state_path",
]

log = logging.getLogger("tensorbus.broker")

STATE_MAGIC = "tensorbus-state"
# Bumped whenever the records below change shape.
STATE_VERSION = 1


def _layout_versions() -> dict:
    """The segment layouts this build reads: a snapshot of another set is
    another release's, and is condemned rather than taken over."""
    constants = layout()["constants"]
    return {k: constants[k] for k in ("TB_RING_VERSION", "TB_BELLS_VERSION", "TB_ARENA_VERSION")}


class StateError(Exception):
    """A snapshot that cannot be taken over; the sentence says why."""


def state_path(ipc_path: str) -> str:
    return ipc_path + ".state"


# -- writing ------------------------------------------------------------------


def snapshot(registry: Registry, fifo_dir: str, parked: list, meta: dict) -> dict:
    """Every record a successor needs, as plain values. Only ipc sessions
    are kept: tcp clients and peer daemons redial and announce themselves
    again, and the bridge's cursors die with its process."""
    sessions = [s for s in registry.sessions.values() if s.transport == "ipc"]
    subs = [sub for s in sessions for sub in s.subscriptions.values()]
    return {
        "magic": STATE_MAGIC,
        "version": STATE_VERSION,
        "layouts": _layout_versions(),
        "owner_pid": os.getpid(),
        "saved_ns": time.time_ns(),
        **meta,
        "bells": {"name": registry.bells.name, "fifo_dir": fifo_dir},
        "arena": {"meta": registry.arena.meta.name, "data": registry.arena.data.name},
        "next_id": registry.next_id,
        "topics": [
            [t.name, t.qos, t.capacity, t.slot_size, t.ring.name, t.owner]
            for t in registry.topics.values()
        ],
        "sessions": [[s.id, s.name, s.pid, s.holder, s.publishing, s.pending] for s in sessions],
        "subs": [
            [
                sub.id,
                sub.session.id,
                sub.pattern,
                sub.mode,
                sub.bell,
                sub.bell_generation,
                sub.fifo,
                [[name, c, g] for name, (c, g) in sub.members.items()],
                None if sub.group is None else [sub.group.topic, sub.group.name],
            ]
            for sub in subs
        ],
        "groups": [
            [g.topic, g.name, g.cursor, g.generation, g.bell, g.bell_generation]
            for g in registry.groups.values()
        ],
        "parked": parked,  # [pid, holder slot]
    }


def save(path: str, snap: dict) -> None:
    """Write ``snap`` whole, then rename it into place (atomic)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, msgpack.packb(snap, use_bin_type=True))
    finally:
        os.close(fd)
    os.replace(tmp, path)


# -- reading ------------------------------------------------------------------


def load(path: str) -> dict | None:
    """The snapshot at ``path`` (None if there is none); StateError if it
    is not one this build can take over."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        snap = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:
        raise StateError(f"state {path} is corrupt ({exc})") from None
    if not isinstance(snap, dict) or snap.get("magic") != STATE_MAGIC:
        raise StateError(f"state {path} is not a tensorbus state")
    if snap.get("version") != STATE_VERSION or snap.get("layouts") != _layout_versions():
        raise StateError(
            f"state {path} was written by another release (state version "
            f"{snap.get('version')}, layouts {snap.get('layouts')}; this build: "
            f"{STATE_VERSION}, {_layout_versions()})"
        )
    owner = snap.get("owner_pid")
    if not isinstance(owner, int) or (owner != os.getpid() and pid_alive(owner)):
        # We hold the socket's lock, so a live owner is another process that
        # took its pid since; its state is still ours to take.
        log.info("the state's owner pid %s is alive but holds no lock: pid reused", owner)
    return snap


def open_segments(snap: dict) -> tuple[BellTable, Arena, str]:
    """Map the bell table and the arena a snapshot names, made ours to
    unlink: (bells, arena, fifo_dir). StateError if either is gone."""
    try:
        bells = BellTable.attach(snap["bells"]["name"], snap["bells"]["fifo_dir"])
        arena = Arena.attach(snap["arena"]["meta"], snap["arena"]["data"], populate=False)
    except (SegmentError, KeyError, TypeError) as exc:
        raise StateError(f"cannot map the segments the state names: {exc}") from None
    bells.segment.own()
    arena.own()
    return bells, arena, snap["bells"]["fifo_dir"]


def restore(registry: Registry, snap: dict) -> dict:
    """Rebuild ``registry``'s records from ``snap``: every session comes
    back as an orphan (keyed ``("adopted", id)``) until its client resumes
    it. Cursors no record owns (a dead daemon's bridge, a reply never sent)
    are freed, and what dead processes left half-done is repaired. Returns
    what was taken over, for the log and ``stats``."""
    sessions: dict[int, Session] = {}
    for sid, name, pid, holder, publishing, pending in snap["sessions"]:
        session = Session(("adopted", sid), "ipc", name, pid, id=sid, holder=holder)
        session.publishing = dict(publishing)
        session.pending = list(pending)
        session.orphan = True
        sessions[sid] = session
        registry.sessions[session.key] = session
    lost = []
    for name, qos, capacity, slot_size, ring_name, owner in snap["topics"]:
        try:
            ring = Ring.attach(
                ring_name, bells=registry.bells, arena=registry.arena, spin_us=0, populate=False
            )
        except TensorbusError as exc:
            log.warning("topic %s cannot be taken over: %s", name, exc)
            lost.append(name)
            continue
        ring.own()
        registry.topics[name] = Topic(name, qos, capacity, slot_size, ring, owner=owner)
    for topic_name, name, cursor, generation, bell, bell_generation in snap["groups"]:
        if topic_name in registry.topics:
            g = Group(topic_name, name, cursor, generation, bell, bell_generation)
            registry.groups[(topic_name, name)] = g
    used_bells = {g.bell for g in registry.groups.values()}
    for sid, owner, pattern, mode, bell, bell_gen, fifo, members, group in snap["subs"]:
        session = sessions.get(owner)
        if session is None:
            continue
        g = registry.groups.get(tuple(group)) if group else None
        if group and g is None:
            continue  # its topic was lost
        sub = Subscription(sid, session, pattern, mode, bell, bell_gen, fifo, group=g)
        session.subscriptions[sid] = sub
        used_bells.add(bell)
        for name, cursor, generation in members:
            topic = registry.topics.get(name)
            if topic is None:
                continue
            sub.members[name] = (cursor, generation)
            topic.cursors[(cursor, generation)] = sub
        if g is not None:
            g.members.add(sub)
    count = registry.bells.count
    registry.free_bells = [b for b in range(count - 1, -1, -1) if b not in used_bells]
    # Other daemons serve no group for this instance until they say so again
    # (broker/groups.py): a group with no member here goes, the rest count
    # their members only; the replies inboxes made for other daemons go.
    for g in list(registry.groups.values()):
        registry.bells.set_kind(g.bell, "futex")
        registry.count_responders(g)
    for topic in [t for t in registry.topics.values() if t.owner == BRIDGE_OWNED]:
        registry.remove_topic(topic)
    registry.next_id = max(registry.next_id, snap["next_id"])
    used_holders = {s.holder for s in sessions.values()} | {slot for _, slot in snap["parked"]}
    # The dead daemon's own (its bridge's) holds go; the others are free
    # already. A state that does not name that slot: every unused one is released.
    own = snap.get("bridge_holder")
    unused = [slot for slot in range(MAX_HOLDERS, 0, -1) if slot not in used_holders]
    stale = unused if own is None else [s for s in unused if s == own]
    registry.free_holders = [slot for slot in unused if slot not in stale]
    for slot in stale:
        registry.release_holder(slot)
    freed = 0
    for topic in registry.topics.values():
        with contextlib.suppress(TensorbusError):
            topic.ring.repair()
            known = set(topic.cursors)
            for c in topic.ring.stats()["cursors"]:
                key = (c["index"], c["generation"])
                if key not in known:
                    topic.ring.free_cursor(*key)
                    freed += 1
            topic.ring.reclaim()
    return {
        "previous_pid": snap.get("owner_pid"),
        "topics": len(registry.topics),
        "sessions": len(sessions),
        "subscriptions": sum(len(s.subscriptions) for s in sessions.values()),
        "lost_topics": lost,
        "cursors_freed": freed,
        "parked": snap["parked"],
    }


def condemn(snap: dict | None, bells: BellTable | None = None) -> int:
    """Close every ring ``snap`` names as "restarted" (they are about to be
    swept): returns how many. ``snap`` may be anything a failed
    :func:`load` got hold of; nothing in it is trusted."""
    if not isinstance(snap, dict):
        return 0
    closed = 0
    for entry in snap.get("topics") or []:
        with contextlib.suppress(Exception):
            closed += Ring.condemn(entry[4], bells)
    return closed


def read_any(path: str) -> dict | None:
    """Whatever msgpack map ``path`` holds, unchecked (to condemn what a
    state that cannot be taken over names)."""
    with contextlib.suppress(Exception), open(path, "rb") as f:
        snap = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
        return snap if isinstance(snap, dict) else None
    return None
