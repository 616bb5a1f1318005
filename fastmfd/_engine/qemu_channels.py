"""Which connections to a QEMU destination are QEMU's multifd channels.

The listener of ``listen --qemu`` takes any connection; QEMU's are told apart
by their first bytes (``QEVM``: the main channel; the multifd magic: a multifd
channel, then its 64-byte init packet: UUID and id). Anything else is not
QEMU's and is dropped as it shows (:mod:`.qemu_receiving`). A connection that
sends the multifd magic and a good init packet could still be another
program's, or another VM's migration. Whether it is QEMU's is decided once
the setup section ended (barrier 1: by then every channel of QEMU's has
connected and sent its init packet), by one fact of QEMU's own: it connects
its main channel first, then its multifd channels (both 7.2 and 10.x; a 7.2
destination relies on it, spec §1.4).

- One that came after the main channel is QEMU's: all of them must carry
  one UUID (the main channel's, where its configuration names one) and each
  id once, or the migration fails, as QEMU's own destination fails it.
- One that came before it is a stranger's, dropped, unless it has that UUID
  and fills a gap in their ids (or, if none came after the main channel, is
  the first of its id): the accept order of two connections can only be
  turned around by a lost handshake packet, and such a channel is QEMU's.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from ..errors import ProtocolError
from .processes import Child

__all__ = ["QemuChannel", "migration_uuid", "choose_channels"]


@dataclass
class QemuChannel:
    """A connection that sent a good init packet, and its receive worker."""
    id: int
    sock: socket.socket
    worker: Child | None                    # None only while its worker starts
    uuid: bytes = bytes(16)
    arrival: int = 0                        # its place in the order of accepted connections
    ready: bool = False                     # its worker reported Ready
    starting: bool = False                  # its parameters wait for that Ready
    synced: int = 0
    ended: bool = False
    compression: str | None = None


def migration_uuid(candidates: list[QemuChannel], main_arrival: int,
                   configured: bytes | None) -> bytes | None:
    """The UUID of the migration: the main channel's configuration's, else the
    first channel's that came after the main channel (else the first's)."""
    if configured is not None or not candidates:
        return configured
    after = [c for c in candidates if c.arrival > main_arrival]
    return (after or candidates)[0].uuid


def choose_channels(candidates: list[QemuChannel], main_arrival: int, uuid: bytes | None
                    ) -> tuple[dict[int, QemuChannel], list[tuple[QemuChannel, str]]]:
    """QEMU's channels by id, and the strangers with why (module docstring);
    ``candidates`` in the order they came."""
    expected = uuid.hex() if uuid is not None else None
    chosen: dict[int, QemuChannel] = {}
    for channel in [c for c in candidates if c.arrival > main_arrival]:
        where = f"multifd channel {channel.id}"
        if channel.uuid != uuid:
            raise ProtocolError(f"init packet field 'uuid': received {channel.uuid.hex()}, "
                                f"expected {expected} (the migration's)", field="uuid",
                                received=channel.uuid.hex(), expected=expected, where=where)
        if channel.id in chosen:
            raise ProtocolError(f"init packet field 'id': received {channel.id}, already "
                                "connected", field="id", received=channel.id,
                                expected="a new channel id", where=where)
        chosen[channel.id] = channel
    top = max(chosen, default=None)
    strangers = []
    for channel in [c for c in candidates if c.arrival < main_arrival]:
        if channel.uuid != uuid:
            strangers.append((channel, f"the migration's uuid is {expected}"))
        elif channel.id in chosen or (top is not None and channel.id > top):
            strangers.append((channel, "the channels that came after the main channel are "
                                       f"{sorted(chosen)}"))
        else:
            chosen[channel.id] = channel
    return chosen, strangers
