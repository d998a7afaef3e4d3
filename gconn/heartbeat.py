"""The heartbeat page: a page of shared memory the supervisor maps before forking, in which each
worker stamps its liveness, its live connections as of that stamp (so that the supervisor can
say how many a killed worker took with it) and whether it serves every route or is draining.

The supervisor owns the page and hands out slots (a reload's new workers take new ones); a
worker only writes its own slot.  No locks: each slot has one writer, and a stamp is one
aligned 8-byte store and load (through a memoryview of doubles), which the CPU never tears.
Not ``struct.pack_into``: it zeroes its destination before writing, so a supervisor reading in
between saw a stamp of 0 and killed a healthy worker as silent for the machine's uptime (a
100,000-client soak lost one worker's 7,677 connections that way).
"""

import mmap
import time

HEARTBEAT_SLOTS = 4096  # worker slots in the shared heartbeat page (reloads take new ones)
STARTING, READY, DRAINING = 0, 1, 2  # a worker's state byte in the heartbeat page


class Heartbeats:
    """A page of shared memory, per worker slot one monotonic timestamp, one connection count
    and one state byte."""

    def __init__(self, slots=HEARTBEAT_SLOTS):
        self.slots = slots
        # 8-byte stamps, 8-byte connection counts, then one state byte per slot
        self.page = mmap.mmap(-1, 17 * slots)
        self.stamps = memoryview(self.page)[:8 * slots].cast("d")
        self.counts = memoryview(self.page)[8 * slots:16 * slots].cast("q")
        self.free = list(range(slots - 1, -1, -1))

    def take(self):
        """A free slot, stamped now, not ready; None when every slot is taken."""
        if not self.free:
            return None
        slot = self.free.pop()
        self.beat(slot, 0)
        self.page[16 * self.slots + slot] = STARTING
        return slot

    def set_ready(self, slot):
        """Mark ``slot``'s worker as serving every route (called by the worker)."""
        self.page[16 * self.slots + slot] = READY

    def set_draining(self, slot):
        """Mark ``slot``'s worker as draining: it accepts no more (called by the worker)."""
        self.page[16 * self.slots + slot] = DRAINING

    def ready(self, slot):
        """Whether ``slot``'s worker has said it serves every route."""
        return self.page[16 * self.slots + slot] == READY

    def draining(self, slot):
        """Whether ``slot``'s worker has said it is draining."""
        return self.page[16 * self.slots + slot] == DRAINING

    def give_back(self, slot):
        """Return the slot of a worker that has exited."""
        self.free.append(slot)

    def beat(self, slot, connections):
        """Stamp ``slot`` with the current monotonic time and the worker's live
        ``connections`` (called by the worker)."""
        self.counts[slot] = connections
        self.stamps[slot] = time.monotonic()

    def connections(self, slot):
        """``slot``'s worker's live connections as of its last stamp."""
        return self.counts[slot]

    def age(self, slot):
        """Seconds since ``slot`` was last stamped."""
        stamp = self.stamps[slot]  # first: a stamp written after the clock read is not an age
        return time.monotonic() - stamp
