"""tensorbus with every message through the arena (``inline_max=0``), even
small ones: beside the ``bus`` backend (copied through a slot sized for the
message) it shows where the arena's zero-copy receive starts to pay, which
sets the client's default ``inline_max``."""

import numpy as np

from backends.bus import ping_pong

NAME = "bus-arena"
OPTIONS = {"qos": "reliable", "capacity": 1024, "inline_max": 0}


def lat(size: int, count: int, warmup: int) -> list[int]:
    msg = np.ones(size, dtype=np.uint8)
    return ping_pong(NAME, size, count, warmup, OPTIONS, lambda pub: pub.send(msg))
