"""A wrong type at a public entry point is a TypeError naming the parameter, raised
before any work (issue #11); a value of the right type that cannot work stays a
ConfigError. A bool is no size or count, and a float no size."""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import pytest

import fastmfd
from fastmfd import qemu
from fastmfd.arguments import INT, NUMBER, check_types
from fastmfd.shm import list_segments

LOADER = fastmfd.CollectLoader()


def _on_destination(method, *args, **kwargs):
    """``Destination.method(*args, **kwargs)`` on a destination (not entered: no process starts)
    closed after."""
    dst = fastmfd.Destination("tcp:127.0.0.1:0", workers=0)
    try:
        getattr(dst, method)(*args, **kwargs)
    finally:
        dst.close()

# (call, the parameter its message names, the wrong type it was given)
WRONG = [
    (lambda: fastmfd.Region.create("r", "4096"), "Region.create(size)", "str"),
    (lambda: fastmfd.Region.create("r", 4096.0), "Region.create(size)", "float"),
    (lambda: fastmfd.Region.create("r", True), "Region.create(size)", "bool"),
    (lambda: fastmfd.Region.create(b"pc.ram", 4096), "Region.create(name)", "bytes"),
    (lambda: fastmfd.Region.create("r", 4096, page_size="4096"), "Region.create(page_size)",
     "str"),
    (lambda: fastmfd.Region.from_file("r", 42), "Region.from_file(path)", "int"),
    (lambda: fastmfd.Region.from_file("r", "/nonexistent", size=1.5),
     "Region.from_file(size)", "float"),
    (lambda: fastmfd.Region.from_fd("r", "3"), "Region.from_fd(fd)", "str"),
    (lambda: fastmfd.Region.attach("fastmfd-x"), "Region.attach(handle)", "str"),
    (lambda: fastmfd.RegionPool(1.0e9), "RegionPool(max_bytes)", "float"),
    (lambda: fastmfd.SyntheticDevice("n", 0, size="x"), "SyntheticDevice(size)", "str"),
    (lambda: fastmfd.SyntheticDevice("n", "0", size=1), "SyntheticDevice(instance_id)", "str"),
    (lambda: fastmfd.SyntheticDevice("n", 0, 1, read_rate="fast"),
     "SyntheticDevice(read_rate)", "str"),
    (lambda: fastmfd.SyntheticDevice("n", 0, 1, seed=None), "SyntheticDevice(seed)",
     "NoneType"),
    (lambda: fastmfd.SyntheticDevice("n", 0, 8, precopy_size=4.0),
     "SyntheticDevice(precopy_size)", "float"),
    (lambda: fastmfd.BytesDevice(b"n", 0, b""), "BytesDevice(idstr)", "bytes"),
    (lambda: fastmfd.BytesDevice("n", 0, "state"), "BytesDevice(data)", "str"),
    (lambda: fastmfd.BytesDevice("n", 0, b"", config=5), "BytesDevice(config)", "int"),
    (lambda: fastmfd.FileDevice("n", 0, 3), "FileDevice(path)", "int"),
    (lambda: fastmfd.FileLoader(None), "FileLoader(path)", "NoneType"),
    (lambda: fastmfd.VerifyLoader("8"), "VerifyLoader(size)", "str"),
    (lambda: fastmfd.VerifyLoader(8, write_rate=True), "VerifyLoader(write_rate)", "bool"),
    (lambda: fastmfd.MigrationConfig(channels="2"), "MigrationConfig(channels)", "str"),
    (lambda: fastmfd.MigrationConfig(channels=True), "MigrationConfig(channels)", "bool"),
    (lambda: fastmfd.MigrationConfig(compression=None), "MigrationConfig(compression)",
     "NoneType"),
    (lambda: fastmfd.MigrationConfig(page_size=4096.0), "MigrationConfig(page_size)", "float"),
    (lambda: fastmfd.MigrationConfig(checksum=1), "MigrationConfig(checksum)", "int"),
    (lambda: fastmfd.MigrationConfig(downtime_limit="1"), "MigrationConfig(downtime_limit)",
     "str"),
    (lambda: fastmfd.MigrationConfig(max_bandwidth="1G"), "MigrationConfig(max_bandwidth)",
     "str"),
    (lambda: fastmfd.MigrationConfig(checksum=np.True_), "MigrationConfig(checksum)",
     "numpy.bool"),
    (lambda: fastmfd.MigrationConfig(tls="tls.pem"), "MigrationConfig(tls)", "str"),
    (lambda: fastmfd.MigrationConfig(device_channels_within=True, channels="3"),
     "MigrationConfig(channels)", "str"),
    (lambda: fastmfd.Destination(42), "Destination(address)", "int"),
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", workers=2.0), "Destination(workers)",
     "float"),
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", stall_timeout="5"),
     "Destination(stall_timeout)", "str"),
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", region_factory="ram"),
     "Destination(region_factory)", "str"),
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", tls=object()), "Destination(tls)",
     "object"),
    (lambda: _on_destination("add_loader", 42, 0, LOADER), "add_loader(idstr)", "int"),
    (lambda: _on_destination("add_loader", "n", "0", LOADER), "add_loader(instance_id)", "str"),
    (lambda: _on_destination("receive", on_setup="setup"), "receive(on_setup)", "str"),
    (lambda: _on_destination("cancel", b"why"), "cancel(reason)", "bytes"),
    (lambda: fastmfd.Source(42), "Source(address)", "int"),
    (lambda: fastmfd.TLSConfig(cert=42, key=42), "TLSConfig(cert)", "int"),
    (lambda: fastmfd.TLSConfig(authz="client"), "TLSConfig(authz)", "str"),
    (lambda: fastmfd.Region.create("r", 4096, huge_pages="no"), "Region.create(huge_pages)",
     "str"),
    (lambda: fastmfd.Region.from_file("r", "/dev/null", read_only="yes"),
     "Region.from_file(read_only)", "str"),
    (lambda: fastmfd.Region.from_file("r", "/nonexistent", size=4096, exclusive=1),
     "Region.from_file(exclusive)", "int"),
    (lambda: fastmfd.FileLoader("/nonexistent", exclusive="yes"), "FileLoader(exclusive)",
     "str"),
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", prealloc="yes"), "Destination(prealloc)",
     "str"),
    (lambda: fastmfd.TLSConfig(hostname=b"host"), "TLSConfig(hostname)", "bytes"),
    # The one-call functions name themselves, not the class they make inside.
    (lambda: qemu.send("tcp:127.0.0.1:1", 42), "qemu.send(directory)", "int"),
    (lambda: qemu.send("tcp:127.0.0.1:1", ".", channels="2"), "qemu.send(channels)", "str"),
    (lambda: qemu.send(("127.0.0.1", 1), "."), "qemu.send(address)", "tuple"),
    (lambda: qemu.receive(42, "."), "qemu.receive(address)", "int"),
    (lambda: qemu.receive("tcp:127.0.0.1:0", ".", workers=2.0), "qemu.receive(workers)",
     "float"),
    (lambda: qemu.QemuSender(".", compression=None), "QemuSender(compression)", "NoneType"),
    (lambda: qemu.QemuReceiver("tcp:127.0.0.1:0", ".", timeout="1"), "QemuReceiver(timeout)",
     "str"),
    (lambda: fastmfd.Source("tcp:127.0.0.1:1", {"channels": 2}), "Source(config)", "dict"),
    (lambda: fastmfd.Source("tcp:127.0.0.1:1").migrate(on_stop="stop"), "migrate(on_stop)",
     "str"),
    (lambda: fastmfd.Source("tcp:127.0.0.1:1").cancel(0), "cancel(reason)", "int"),
    # A flag is True or False: migrate(live="no") ran a live migration.
    (lambda: fastmfd.Source("tcp:127.0.0.1:1").migrate(live="no"), "migrate(live)", "str"),
    (lambda: fastmfd.Source("tcp:127.0.0.1:1").migrate(progress=1), "migrate(progress)",
     "int"),
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", huge_pages=0), "Destination(huge_pages)",
     "int"),
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", huge_pages="no"),
     "Destination(huge_pages)", "str"),
    (lambda: qemu.receive("tcp:127.0.0.1:0", ".", force="no"), "qemu.receive(force)", "str"),
    (lambda: qemu.receive("tcp:127.0.0.1:0", ".", keep_partial=1),
     "qemu.receive(keep_partial)", "int"),
]


@pytest.mark.parametrize("call,parameter,given", WRONG,
                         ids=[f"{parameter}={given}" for _, parameter, given in WRONG])
def test_a_wrong_type_is_a_type_error_naming_the_parameter(call, parameter, given):
    before = set(list_segments())
    with pytest.raises(TypeError, match=rf"^{re.escape(parameter)} must be .*, not {given}$"):
        call()
    assert set(list_segments()) == before, "refused before any work"


def test_a_wrong_value_of_the_right_type_stays_a_config_error():
    for call in (lambda: fastmfd.Region.create("r", 4095),
                 lambda: fastmfd.SyntheticDevice("n", 0, size=-1),
                 lambda: fastmfd.MigrationConfig(channels=0),
                 lambda: fastmfd.Destination("tcp:nowhere"),
                 lambda: _on_destination("add_loader", "", 0, LOADER)):
        with pytest.raises(fastmfd.ConfigError):
            call()


def test_the_kinds_tell_ints_from_bools_and_floats():
    check_types("f", count=(3, INT), seconds=(0.5, NUMBER), rate=(3, NUMBER),
                float64=(np.float64(0.5), NUMBER))     # a float subclass
    for value, kind in ((True, INT), (3.0, INT), (False, NUMBER), ("1", NUMBER)):
        with pytest.raises(TypeError, match=r"^f\(x\) must be"):
            check_types("f", x=(value, kind))


def test_a_rate_may_be_a_float_and_a_numpy_number_says_how_to_convert_it():
    """Sizes and counts go on the wire in JSON as they are, seconds to the socket
    calls: Python's int and float only (a numpy float32 of seconds passed the
    check, then failed inside settimeout). A rate may be a float (1e9 bytes/s
    was refused)."""
    assert fastmfd.MigrationConfig(max_bandwidth=1e9).channel_rate == 5e8
    with pytest.raises(TypeError, match=r"^Region.create\(size\) must be an int, not "
                                        r"numpy.int64 \(int\(value\) converts it\)$"):
        fastmfd.Region.create("r", np.int64(4096))
    with pytest.raises(TypeError, match=r"^MigrationConfig\(stall_timeout\) must be a "
                                        r"number, not numpy.float32 \(float\(value\) "
                                        r"converts it\)$"):
        fastmfd.MigrationConfig(stall_timeout=np.float32(5.0))


def test_a_subclass_of_the_config_is_made_as_before():
    @dataclasses.dataclass(frozen=True)
    class SiteConfig(fastmfd.MigrationConfig):
        channels: int = 8       # a default of its own
        site: str = "lab"       # a field of its own, the subclass's to check (a KeyError)

    assert (SiteConfig().channels, SiteConfig().site) == (8, "lab")
    with pytest.raises(TypeError, match=r"MigrationConfig\(channels\)"):
        SiteConfig(channels="8")


def test_no_file_is_made_for_a_wrong_type(tmp_path):
    path = tmp_path / "ram.img"
    with pytest.raises(TypeError, match=r"Region.from_file\(size\)"):
        fastmfd.Region.from_file("r", path, size="4096")
    assert not os.path.exists(path)
