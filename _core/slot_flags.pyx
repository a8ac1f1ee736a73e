"""The slot flags tensorbus itself uses, from the ring layout
(_core/tb_layout.h); the low byte of a slot's flags is the application's."""

from tensorbus._core.layout cimport (
    TB_SLOT_BRIDGED,
    TB_SLOT_FROM_HUB,
    TB_SLOT_GAP,
    TB_SLOT_HOPS,
    TB_SLOT_HOPS_SHIFT,
)

__all__ = ["FLAG_BRIDGED", "FLAG_FROM_HUB", "FLAG_GAP", "FLAG_HOPS", "HOPS_SHIFT"]

# Slot flags tensorbus itself uses (the low byte is the application's).
# FLAG_BRIDGED: published by a bridge from another host; bridges never
# forward it again, so a full mesh of daemons carries each message once.
# FLAG_GAP: a gap marker a bridge publishes where messages were lost with a
# link; subscribers raise GapError with its msgpack body.
FLAG_BRIDGED = TB_SLOT_BRIDGED
FLAG_GAP = TB_SLOT_GAP
# Hubs and leaves (broker/hubs.py): FLAG_FROM_HUB marks a message bridged
# from a hub (never relayed to another hub); FLAG_HOPS holds how many links
# it crossed (bits HOPS_SHIFT.., carried on the wire, capped per cluster).
FLAG_FROM_HUB = TB_SLOT_FROM_HUB
FLAG_HOPS = TB_SLOT_HOPS
HOPS_SHIFT = TB_SLOT_HOPS_SHIFT
