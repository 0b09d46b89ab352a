"""The launch's failure: its exception, and which of several failed ranks it names.

When one rank fails, its peers usually fail next in a collective whose connection that rank
closed: gloo's "Connection closed by peer ... This is typically caused by a remote worker
crashing", NCCL's ncclRemoteError. Those are consequences; the launch names the rank whose own
error caused them (`root_cause`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from sge_repro.errors import UserError


class LaunchError(UserError):
    """A launched stage's worker failed (one line: which rank / job, its own error)."""


# What a rank raises when a peer went away: gloo's TCP transport and c10d's advice on it (also
# "... a remote worker hanging" on a timeout), NCCL's remote error.
_PEER_FAILURE = re.compile(
    r"connection (closed|reset) by peer|typically caused by a remote worker|ncclRemoteError|remote process exit",
    re.IGNORECASE)


def is_peer_failure(message: str) -> bool:
    """Whether an error (its message or traceback) says only that another rank went away."""
    return _PEER_FAILURE.search(message) is not None


@dataclass(frozen=True)
class RankFailure:
    rank: int
    message: str  # the rank's error (a message or a traceback); "" when it died without one (a signal)
    time: float | None = None  # when it failed (seconds since the epoch), when known

    @property
    def lost_a_peer(self) -> bool:
        return is_peer_failure(self.message)


def root_cause(failures: Iterable[RankFailure]) -> RankFailure:
    """The failure the others most likely follow from: a rank's own error before a rank that lost a
    peer, then the earliest (unknown times last), then the lowest rank."""
    return min(failures, key=lambda failure: (failure.lost_a_peer, math.inf if failure.time is None else failure.time,
                                              failure.rank))
