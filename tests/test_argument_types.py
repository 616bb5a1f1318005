"""A wrong type at a public entry point is a TypeError naming the parameter, raised
before any work (issue #11); a value of the right type that cannot work stays a
ConfigError. A bool is no size or count, and a float no size."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import socket
import tempfile
import threading
from fractions import Fraction

import numpy as np
import pytest

import fastmfd
from fastmfd import qemu
from fastmfd.arguments import INT, NUMBER, check_types
from fastmfd.protocol.sockets import listen, parse_address
from fastmfd.shm import list_segments
from migration_support import Migration, make_region
from proc_scan import made_by_this_run

LOADER = fastmfd.CollectLoader()


@contextlib.contextmanager
def _refused_before_any_work():
    """Fail if the block leaves a segment that this run made (other fastmfd runs on the
    machine, a second pytest or a user's demo, make and unlink theirs meanwhile)."""
    before = set(list_segments())
    yield
    made = made_by_this_run(set(list_segments()) - before)
    assert not made, f"refused before any work, yet made {sorted(made)}"


def _on_destination(method, *args, **kwargs):
    """``Destination.method(*args, **kwargs)`` on a destination (not entered: no process starts)
    closed after."""
    dst = fastmfd.Destination("tcp:127.0.0.1:0", workers=0)
    try:
        getattr(dst, method)(*args, **kwargs)
    finally:
        dst.close()

def _on_qemu_receiver(method, *args):
    """``QemuReceiver.method(*args)`` on a receiver, closed after (its directory too)."""
    parent = tempfile.mkdtemp()
    try:
        with qemu.QemuReceiver("tcp:127.0.0.1:0", os.path.join(parent, "out"),
                               workers=1) as receiver:
            getattr(receiver, method)(*args)
    finally:
        os.rmdir(parent)            # empty: the receiver removed the directory it made


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
    # take() of another type matched no region: None, as if the pool held none
    (lambda: fastmfd.RegionPool(0).take("ram", "x", 4096), "RegionPool.take(size)", "str"),
    (lambda: fastmfd.RegionPool(0).take(b"ram", 4096, 4096), "RegionPool.take(name)",
     "bytes"),
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
    # A class has a loader's methods: it failed only at its first chunk, mid-migration.
    (lambda: _on_destination("add_loader", "n", 0, fastmfd.CollectLoader),
     "add_loader(loader) for 'n'", "the class fastmfd.devices.CollectLoader"),
    (lambda: _on_destination("receive", on_setup="setup"), "receive(on_setup)", "str"),
    (lambda: _on_destination("cancel", b"why"), "cancel(reason)", "bytes"),
    (lambda: fastmfd.Source(42), "Source(address)", "int"),
    (lambda: fastmfd.TLSConfig(cert=42, key=42), "TLSConfig(cert)", "int"),
    (lambda: fastmfd.TLSConfig(authz="client"), "TLSConfig(authz)", "str"),
    # (it said "'int' object is not iterable", naming nothing)
    (lambda: fastmfd.TLSConfig(authz=42), "TLSConfig(authz)", "int"),
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
    (lambda: qemu.QemuReceiver("tcp:127.0.0.1:0", ".", warm="/dev/shm"), "QemuReceiver(warm)",
     "str"),
    (lambda: _on_qemu_receiver("cancel", b"why"), "cancel(reason)", "bytes"),
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
    with (_refused_before_any_work(),
          pytest.raises(TypeError, match=rf"^{re.escape(parameter)} must be .*, not {given}$")):
        call()


# (call, the parameter its message names): a value of the right type that cannot work,
# refused when the object is made, not deep inside a migration.
BAD_VALUES = [
    # Destination(timeout=0) dropped a source that connected at once after 30 s; -1 and nan
    # alike; a timeout is a finite number of seconds > 0.
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", timeout=0), "Destination(timeout)"),
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", timeout=-1), "Destination(timeout)"),
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", timeout=math.nan), "Destination(timeout)"),
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", timeout=math.inf), "Destination(timeout)"),
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", handshake_timeout=math.nan),
     "Destination(handshake_timeout)"),
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", stall_timeout=-1),
     "Destination(stall_timeout)"),
    # Refused only at the source's SETUP: no chunk (>= 4096 bytes) fits.
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", max_queued_bytes=-5),
     "Destination(max_queued_bytes)"),
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", max_queued_bytes=4095),
     "Destination(max_queued_bytes)"),
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", max_memory=-1), "Destination(max_memory)"),
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", workers=-1), "Destination(workers)"),
    # Any number of workers started (300: 6.6 GiB), though a session uses 255 + 8 at most.
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", workers=264), "Destination(workers)"),
    # An infinite timeout overflowed a deadline in migrate().
    (lambda: fastmfd.MigrationConfig(timeout=math.inf), "MigrationConfig(timeout)"),
    (lambda: fastmfd.MigrationConfig(timeout=10 ** 400), "MigrationConfig(timeout)"),
    (lambda: fastmfd.MigrationConfig(downtime_limit=math.nan), "MigrationConfig(downtime_limit)"),
    (lambda: fastmfd.MigrationConfig(max_bandwidth=math.inf), "MigrationConfig(max_bandwidth)"),
    (lambda: fastmfd.MigrationConfig(max_bandwidth=0), "MigrationConfig(max_bandwidth)"),
    (lambda: fastmfd.MigrationConfig(stall_timeout=math.nan), "MigrationConfig(stall_timeout)"),
    # A seed is a uint64 to the pattern: -1 failed in the save thread.
    (lambda: fastmfd.SyntheticDevice("d", 0, 4096, seed=-1), "SyntheticDevice(seed)"),
    (lambda: fastmfd.SyntheticDevice("d", 0, 4096, seed=1 << 64), "SyntheticDevice(seed)"),
    (lambda: fastmfd.SyntheticDevice("d", 0, -1), "SyntheticDevice(size)"),
    (lambda: fastmfd.SyntheticDevice("d", 0, 4096, read_rate=0), "SyntheticDevice(read_rate)"),
    (lambda: fastmfd.SyntheticDevice("d", 0, 4096, read_rate=math.inf),
     "SyntheticDevice(read_rate)"),
    # write_rate=0 failed in the reassembly process at the first chunk; VerifyLoader(-1)
    # blamed precopy_size.
    (lambda: fastmfd.VerifyLoader(4096, write_rate=0), "VerifyLoader(write_rate)"),
    (lambda: fastmfd.VerifyLoader(-1), "VerifyLoader(size)"),
    (lambda: fastmfd.VerifyLoader(4096, seed=-1), "VerifyLoader(seed)"),
    (lambda: fastmfd.RegionPool(-1), "RegionPool(max_bytes)"),
    (lambda: qemu.receive("tcp:127.0.0.1:0", ".", timeout=0), "qemu.receive(timeout)"),
    (lambda: qemu.receive("tcp:127.0.0.1:0", ".", workers=-1), "qemu.receive(workers)"),
    (lambda: qemu.receive("tcp:127.0.0.1:0", ".", workers=289), "qemu.receive(workers)"),
    (lambda: qemu.QemuReceiver("tcp:127.0.0.1:0", ".", workers=289), "QemuReceiver(workers)"),
    (lambda: qemu.receive("tcp:127.0.0.1:0", ".", max_memory=-1), "qemu.receive(max_memory)"),
    (lambda: qemu.send("tcp:127.0.0.1:1", ".", timeout=math.inf), "qemu.send(timeout)"),
    (lambda: qemu.send("tcp:127.0.0.1:1", ".", max_bandwidth=-1), "qemu.send(max_bandwidth)"),
    # A timeout past a week, a stall timeout outside 0.1..86400: the qemu ones took any
    # positive number and a large one ended the migration with OverflowError from poll();
    # a timeout of 1e20 overflowed a deadline's time_t ("MigrationError: OverflowError").
    (lambda: fastmfd.MigrationConfig(timeout=1e20), "MigrationConfig(timeout)"),
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", timeout=1e20), "Destination(timeout)"),
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", handshake_timeout=7 * 86400 + 1),
     "Destination(handshake_timeout)"),
    (lambda: qemu.receive("tcp:127.0.0.1:0", ".", timeout=1e20), "qemu.receive(timeout)"),
    (lambda: qemu.receive("tcp:127.0.0.1:0", ".", stall_timeout=1e9),
     "qemu.receive(stall_timeout)"),
    (lambda: qemu.QemuReceiver("tcp:127.0.0.1:0", ".", stall_timeout=0.001),
     "QemuReceiver(stall_timeout)"),
    (lambda: qemu.send("tcp:127.0.0.1:1", ".", stall_timeout=86401), "qemu.send(stall_timeout)"),
    (lambda: qemu.QemuSender(".", stall_timeout=0.05), "QemuSender(stall_timeout)"),
    (lambda: qemu.QemuSender(".", timeout=1e20), "QemuSender(timeout)"),
]


@pytest.mark.parametrize("call,parameter", BAD_VALUES,
                         ids=[f"{parameter}-{i}" for i, (_, parameter) in enumerate(BAD_VALUES)])
def test_a_value_that_cannot_work_is_a_config_error_naming_the_parameter(call, parameter):
    with (_refused_before_any_work(),
          pytest.raises(fastmfd.ConfigError, match=rf"^{re.escape(parameter)} must be ")):
        call()


@pytest.mark.parametrize("make, says", [
    # It said "compression_level must be 0..2147483647", a range of no method.
    (lambda: fastmfd.MigrationConfig(compression="zstd", compression_level=-5),
     "compression_level must be in 1..20 for zstd, not -5"),
    # Taken: QEMU's levels were never checked.
    (lambda: qemu.QemuSender(".", compression="zstd", level=30),
     "QemuSender(level) must be in 1..20 for zstd, not 30"),
    (lambda: qemu.send("tcp:127.0.0.1:1", ".", compression="zlib", level=10),
     "qemu.send(level) must be in 0..9 for zlib, not 10"),
])
def test_a_level_is_checked_against_its_method_s_range_first(make, says):
    with _refused_before_any_work(), pytest.raises(fastmfd.ConfigError) as error:
        make()
    assert str(error.value) == says


def _unbound():
    return socket.socket()


def _bound_not_listening():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def _udp():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def _closed():
    sock = socket.socket()
    sock.close()
    return sock


def _names_listener_closed():
    listening = listen(parse_address("tcp:localhost:0"))
    listening.close()
    return listening


def _names_listener_shut_down():
    listening = listen(parse_address("tcp:localhost:0"))
    listening.shutdown(socket.SHUT_RDWR)
    return listening


@pytest.mark.parametrize("make, says", [
    (_unbound, r"not listening: bind\(\) and listen\(\) it first"),
    (_bound_not_listening, "not listening"),
    (_udp, "AF_INET SOCK_DGRAM: a migration is accepted on a TCP or Unix stream socket"),
    (_closed, "cannot be used: Bad file descriptor"),
    (_names_listener_closed, "cannot be used: Bad file descriptor"),
    (_names_listener_shut_down, "not listening"),
], ids=["unbound", "bound", "udp", "closed", "name-closed", "name-shut-down"])
def test_a_socket_no_source_could_reach_is_refused_when_made(make, says):
    """Destination(sock) took it, and receive() failed only at its timeout. A
    name's listener (its sockets as one) is checked alike: closed, it raised a bare
    OSError; shut down, it was taken (a reread)."""
    sock = make()
    try:
        with pytest.raises(fastmfd.ConfigError, match=f"^the socket given (is )?{says}"):
            fastmfd.Destination(sock, workers=0)
        with pytest.raises(fastmfd.ConfigError, match=f"^the socket given (is )?{says}"):
            qemu.QemuReceiver(sock, ".")
    finally:
        sock.close()


def test_a_listening_unix_socket_with_an_abstract_name_is_taken():
    """Its name is bytes to getsockname(): the Destination failed to unpack it."""
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(f"\0fastmfd-test-{os.getpid()}")
    sock.listen()
    received = {}
    try:
        with make_region("ram", 16 * 4096, seed=1) as ram, \
                fastmfd.Destination(sock, workers=1) as dst:
            assert dst.address == f"unix:\0fastmfd-test-{os.getpid()}"
            thread = threading.Thread(target=lambda: received.update(result=dst.receive()))
            thread.start()
            with fastmfd.Source(dst.address, fastmfd.MigrationConfig(channels=1)) as src:
                src.add_region(ram)
                src.migrate(live=False)
            thread.join(60)
            assert (received["result"].regions["ram"].array == ram.array).all()
        assert sock.fileno() != -1, "the caller's socket stays open"
    finally:
        sock.close()


def test_a_wrong_value_of_the_right_type_stays_a_config_error():
    for call in (lambda: fastmfd.Region.create("r", 4095),
                 lambda: fastmfd.SyntheticDevice("n", 0, size=-1),
                 lambda: fastmfd.MigrationConfig(channels=0),
                 lambda: fastmfd.Destination("tcp:nowhere"),
                 lambda: _on_destination("add_loader", "", 0, LOADER)):
        with pytest.raises(fastmfd.ConfigError):
            call()


def test_tls_authz_is_taken_from_any_iterable_of_identities_once():
    """An iterator of identities was checked (which used it up), then kept as the empty
    tuple: a destination refusing every client, its own source included."""
    assert fastmfd.TLSConfig(authz=(name for name in ["src.example"])).authz == (
        "src.example",)
    assert fastmfd.TLSConfig(authz=iter(["a", "b"])).authz == ("a", "b")
    assert fastmfd.TLSConfig(authz=["a"]).authz == ("a",)


def test_the_kinds_tell_ints_from_bools_and_floats():
    values = check_types("f", count=(np.int64(3), INT), seconds=(Fraction(1, 2), NUMBER),
                         rate=(3, NUMBER), float32=(np.float32(0.25), NUMBER))
    assert values == (3, 0.5, 3.0, 0.25)
    assert [type(v) for v in values] == [int, float, float, float], "Python's, converted"
    for value, kind in ((True, INT), (3.0, INT), (np.float64(3.0), INT), (np.True_, INT),
                        (False, NUMBER), (np.True_, NUMBER), ("1", NUMBER)):
        with pytest.raises(TypeError, match=r"^f\(x\) must be"):
            check_types("f", x=(value, kind))


def test_numpy_numbers_and_fractions_are_taken_as_python_numbers():
    """README: sizes and counts take any integer, rates and seconds any real number
    (np.float32, np.int64 and Fraction were refused). Each is made Python's int or
    float when the call is made: they go on the wire in JSON (np.int64 does not
    encode) and to the socket calls (np.float32 is not a float to settimeout)."""
    config = fastmfd.MigrationConfig(channels=np.int64(2), downtime_limit=Fraction(1, 2),
                                     timeout=np.int64(5), stall_timeout=np.float32(5),
                                     max_bandwidth=np.float32(1 << 30),
                                     packet_pages=np.uint16(64))
    assert config == fastmfd.MigrationConfig(channels=2, downtime_limit=0.5, timeout=5.0,
                                             stall_timeout=5.0, max_bandwidth=float(1 << 30),
                                             packet_pages=64)
    assert [type(getattr(config, name)) for name in ("channels", "downtime_limit", "timeout",
                                                     "stall_timeout", "max_bandwidth")] == \
        [int, float, float, float, float]
    device = fastmfd.SyntheticDevice("d", np.uint32(1), np.int64(1 << 20),
                                     read_rate=np.float32(1e9), seed=np.uint64(7))
    loader = fastmfd.VerifyLoader(np.int64(1 << 20), seed=np.uint64(7),
                                  write_rate=Fraction(10 ** 9))
    assert (type(device.instance_id), type(device.seed), type(loader.write_rate)) == \
        (int, int, float)
    with make_region("pc.ram", 1 << 20, seed=3) as ram, \
            Migration(config, workers=np.int64(2), timeout=np.float32(30),
                      handshake_timeout=Fraction(5), stall_timeout=np.float64(10),
                      max_queued_bytes=np.int64(4 << 20), max_memory=np.uint64(1 << 30)) as m:
        m.source.add_region(ram)
        m.source.add_device(device)
        m.destination.add_loader("d", np.int64(1), loader)
        _, result = m.run(live=False).ok()
        assert (result.regions["pc.ram"].array == ram.array).all()
        assert result.devices[("d", 1)] == 1 << 20
    with fastmfd.Region.create("r", np.int64(4096), page_size=np.int32(4096)) as region:
        assert (type(region.size), type(region.page_size)) == (int, int)


def test_qemu_receive_takes_numpy_numbers_as_python_numbers(tmp_path):
    """Its seconds go to the socket calls: an np.float32 must arrive as a float."""
    with pytest.raises(fastmfd.MigrationError, match="no QEMU connected within 0.3 s"):
        qemu.receive("tcp:127.0.0.1:0", str(tmp_path / "out"), timeout=np.float32(0.3),
                     stall_timeout=np.float32(5), workers=np.int64(1),
                     max_size=np.int64(1 << 30))


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


class _Custom:
    """A user's own device: the ids are its attributes, as it set them."""

    def __init__(self, idstr: object, instance_id: object) -> None:
        self.idstr, self.instance_id = idstr, instance_id

    def read_state(self, buf: memoryview) -> int:
        return 0


@pytest.mark.parametrize("idstr, instance_id, error, says", [
    ("dev", "0", TypeError, r"add_device\(device.instance_id\) must be an int, not str"),
    ("dev", True, TypeError, r"add_device\(device.instance_id\) must be an int, not bool"),
    (b"dev", 0, TypeError, r"add_device\(device.idstr\) must be a str, not bytes"),
    ("dev", 1 << 32, fastmfd.ConfigError, "instance_id 4294967296 does not fit in 32 bits"),
    ("", 0, fastmfd.ConfigError, "device idstr '' must be"),
])
def test_a_custom_device_s_ids_are_checked_when_added(idstr, instance_id, error, says):
    """They went into SETUP unchecked: a str instance_id failed only at migrate()."""
    with fastmfd.Source("tcp:127.0.0.1:1") as source, pytest.raises(error, match=says):
        source.add_device(_Custom(idstr, instance_id))


def test_a_custom_device_s_numpy_ids_go_as_python_ones():
    """Any integer is an instance_id, numpy's too, as for add_loader: SETUP
    carries it as Python's int (JSON could not)."""
    with make_region("pc.ram", 1 << 20, seed=3) as ram, \
            Migration(fastmfd.MigrationConfig(channels=1)) as m:
        m.source.add_region(ram)
        m.source.add_device(_Custom("dev", np.uint32(3)))
        _, result = m.run(live=False).ok()
        assert result.devices[("dev", 3)] == b""
