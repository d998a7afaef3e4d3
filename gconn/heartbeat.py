"""The heartbeat page: a page of shared memory the supervisor maps before forking, in which each
worker stamps its liveness and says whether it serves every route or is draining.

The supervisor owns the page and hands out slots (a reload's new workers take new ones); a
worker only writes its own slot.  No locks: each slot has one writer, and a torn read of a
stamp at worst delays a verdict by one check.
"""

import mmap
import struct
import time

HEARTBEAT_SLOTS = 4096  # worker slots in the shared heartbeat page (reloads take new ones)
STARTING, READY, DRAINING = 0, 1, 2  # a worker's state byte in the heartbeat page


class Heartbeats:
    """A page of shared memory, one monotonic timestamp per worker slot."""

    def __init__(self, slots=HEARTBEAT_SLOTS):
        self.slots = slots
        self.page = mmap.mmap(-1, 9 * slots)  # 8-byte stamps, then one ready byte per slot
        self.free = list(range(slots - 1, -1, -1))

    def take(self):
        """A free slot, stamped now, not ready; None when every slot is taken."""
        if not self.free:
            return None
        slot = self.free.pop()
        self.beat(slot)
        self.page[8 * self.slots + slot] = STARTING
        return slot

    def set_ready(self, slot):
        """Mark ``slot``'s worker as serving every route (called by the worker)."""
        self.page[8 * self.slots + slot] = READY

    def set_draining(self, slot):
        """Mark ``slot``'s worker as draining: it accepts no more (called by the worker)."""
        self.page[8 * self.slots + slot] = DRAINING

    def ready(self, slot):
        """Whether ``slot``'s worker has said it serves every route."""
        return self.page[8 * self.slots + slot] == READY

    def draining(self, slot):
        """Whether ``slot``'s worker has said it is draining."""
        return self.page[8 * self.slots + slot] == DRAINING

    def give_back(self, slot):
        """Return the slot of a worker that has exited."""
        self.free.append(slot)

    def beat(self, slot):
        """Stamp ``slot`` with the current monotonic time (called by the worker)."""
        struct.pack_into("d", self.page, 8 * slot, time.monotonic())

    def age(self, slot):
        """Seconds since ``slot`` was last stamped."""
        return time.monotonic() - struct.unpack_from("d", self.page, 8 * slot)[0]
