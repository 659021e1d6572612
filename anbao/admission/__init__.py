"""Admission: rejecting surplus grabs before they reach a packet's owner.

Only an optimisation. The owner's queue and PostgreSQL stay the truth, so a
lost, flushed or restarted memcached costs speed, never a share: every
error and every missing key admits (fails open).

The counter holds permits: a packet's unreserved shares plus a small slack.
Each attempt takes one (memcached `decr`, atomic across workers); one that
does not end in a share gives it back (`incr`). Because an attempt holds its
permit until its answer is known, "no permit left" means every share is
taken or held by an attempt still in flight: nobody is told SOLD_OUT while a
share is unclaimed and unreserved (docs/ARCHITECTURE.md I10). A permit can
leak only if a worker dies holding it; the owner re-seeds the counter from
its own state every second while the packet is open, which can over-admit
(harmless: the owner answers truthfully) and so repairs any leak.

A spent counter is not an answer, though: it cannot tell who holds a share.
A worker answers a GRAB itself only from what is final (cache.py); a grab
that finds the counter spent waits, briefly, for the packet's final claim
list (claims.py) and is then answered from it exactly, or goes to the owner.
"""

from .cache import FinalSet, FinalStates
from .permits import InProcessPermits, MemcachedPermits, Permits

__all__ = ["FinalSet", "FinalStates", "InProcessPermits", "MemcachedPermits", "Permits"]
