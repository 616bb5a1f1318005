"""Real fastmfd sessions for the fuzz target "inspect captures" (benchmarks/fuzz.py):
recorded as the source wrote each connection (the tests' proxy), as
tests/test_inspect_sessions.py records them. Run as a program (the fuzz workers are
daemonic and may not start a Destination's processes themselves)::

    python benchmarks/_fuzz_sessions.py OUTDIR

writes OUTDIR/<session>/<connection>.bin and OUTDIR/sessions.json, {session: kwargs
of read_capture}. The sessions: a shared key (AUTH messages, a nonce and proof after
each channel's init packet) with a device-state channel; the old way (device state on
the main channel) with checksums, whose DEVICE_STATE messages carry a CRC trailer;
checksums with a device-state channel, compressed (its channels alone are what inspect
tells to try --checksum); the old way and a shared key at once, compressed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fastmfd  # noqa: E402
from migration_support import PAGE, Migration, Proxy, Record, make_region  # noqa: E402

KEY = b"k" * 32
SESSIONS = {
    "shared key": dict(channels=2, packet_pages=16, device_state_channels=1,
                       device_chunk_size=64 << 10, auth_key=KEY),
    "old way checksum": dict(channels=1, packet_pages=16, channel_header=False,
                             checksum=True, device_chunk_size=64 << 10),
    "checksum device channel": dict(channels=1, packet_pages=16, device_state_channels=1,
                                    checksum=True, compression="zstd",
                                    device_chunk_size=16 << 10),
    "old way shared key zstd": dict(channels=2, packet_pages=16, channel_header=False,
                                    checksum=True, compression="zstd",
                                    device_chunk_size=16 << 10, auth_key=KEY),
}


def record(name: str, values: dict, out: Path) -> None:
    values = dict(values)
    key = values.pop("auth_key", None)
    config = fastmfd.MigrationConfig(**values, auth_key=key)
    channels = config.channels + config.device_state_channels
    records = {"main": Record(), **{ch: Record() for ch in range(channels)}}
    region = make_region("ram", 48 * PAGE, seed=3)
    try:
        with Migration(config, proxy=Proxy(records, channel_header=config.channel_header),
                       auth_key=key) as m:
            m.source.add_region(region)
            m.source.add_device(fastmfd.BytesDevice("dev", 0, b"\x07" * 3000 + bytes(3000),
                                                    config=b"cfg"))
            m.source.add_device(fastmfd.BytesDevice("nic", 1, b"n" * 40))
            m.run().ok()
    finally:
        region.close()
    directory = out / name.replace(" ", "-")
    directory.mkdir(parents=True)
    for conn, rec in records.items():
        (directory / f"{conn}.bin").write_bytes(bytes(rec.bytes))


def main(out: str) -> int:
    found = {}
    for name, values in SESSIONS.items():
        record(name, values, Path(out))
        found[name] = {}
        found[f"{name} channels"] = {"packet_pages": values["packet_pages"],
                                     "checksum": values.get("checksum", False)}
    (Path(out) / "sessions.json").write_text(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
