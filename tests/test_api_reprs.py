"""The library as a programmer meets it in a REPL, a log or a crash report: reprs
that are useful and bounded, a shared key that no repr, ``vars()`` or traceback
shows, and ConfigErrors that say which parameter is wrong (a review of the API).
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import resource
import time
import traceback

import numpy as np
import pytest

import fastmfd
from fastmfd.devices import WriteBudget
from fastmfd.protocol import security
from migration_support import Migration, make_region

KEY = b"the-source-secret-0123456789"
OTHER_KEY = b"the-destination-secret-abcdef"
STATE = 4 << 20             # one device's state: 4 MiB


def test_a_result_its_stats_and_setup_have_bounded_reprs():
    """A DestinationResult's repr held every device's state whole (a CollectLoader's
    64 MiB were a repr of 256 MB), and the stats and SETUP listed every device;
    now 8 entries are shown, then a count, and bytes are said by their size."""
    seen = []
    with Migration(fastmfd.MigrationConfig(channels=2)) as m, \
            make_region("ram", 1 << 20, seed=3) as region:
        m.source.add_region(region)
        m.source.add_device(fastmfd.BytesDevice("big", 0, b"\x5a" * STATE))
        for i in range(40):
            m.source.add_device(fastmfd.BytesDevice(f"nic{i}", 0, b"s" * 100))
        stats, result = m.run(dst_on_setup=seen.append).ok()
        assert result.devices[("big", 0)] == b"\x5a" * STATE        # the data is all there
        text = repr(result)
        assert len(text) < 4000, len(text)
        assert "ZZZZ" not in text and "... (33 more)" in text, text
        assert "'ram': <Region 'ram' 1048576 bytes (shm)>" in text, text
        assert text.startswith("DestinationResult(regions={"), text
        for each in (stats, result.stats, seen[0]):
            shown = repr(each)
            assert len(shown) < 4000 and "more)" in shown, shown
        assert repr(seen[0]).startswith("Setup(uuid=") and "DeviceSpec(" in repr(seen[0])
        assert "'load_seconds': {" in repr(stats), repr(stats)
    # The bounds are the repr's only: nothing else lost.
    assert len(result.stats.load_time_s) == len(stats.destination["load_seconds"]) == 41
    # In the order the source added them (it was the order the loaders finished in,
    # another each run), as the regions are: the 8 a repr shows are the first 8.
    keys = [("big", 0)] + [(f"nic{i}", 0) for i in range(40)]
    assert list(result.devices) == keys
    assert list(result.stats.load_time_s) == [f"{idstr}/0" for idstr, _ in keys]
    assert list(stats.destination["load_seconds"]) == list(result.stats.load_time_s)


def _failed_session_text(source_key, destination_key):
    """Both sides' errors of a session whose keys differ, each formatted with the
    locals of every frame (as ``pytest -l``, rich's tracebacks or an error tracker
    show them)."""
    config = fastmfd.MigrationConfig(channels=2, auth_key=source_key)
    with make_region("ram", 1 << 16, seed=1) as region, \
            Migration(config, auth_key=destination_key) as m:
        m.source.add_region(region)
        error, refused = m.run_refused()
    shown = traceback.TracebackException.from_exception(error, capture_locals=True)
    return "".join(shown.format()) + "".join(r.reason for r in refused)


def test_the_auth_key_shows_in_no_repr_vars_traceback_or_log(caplog, capfd):
    """``vars(config)`` showed the key, and a failed proof's traceback showed it among
    the locals of the frame that proved it (``key = b'...'``): the key is an AuthKey,
    bytes whose repr hides them. Nothing is logged or printed with it either."""
    caplog.set_level(logging.DEBUG)
    config = fastmfd.MigrationConfig(auth_key=KEY)
    with fastmfd.Destination("tcp:127.0.0.1:0", auth_key=KEY) as destination:
        held = destination._security
    for shown in (repr(config), repr(vars(config)), str(config.auth_key),
                  f"{config.auth_key}", repr(vars(held))):
        assert KEY.decode() not in shown, shown
    assert config.auth_key == KEY and bytes(config.auth_key) == KEY
    # Whether a config has a key shows (the field was left out of its repr).
    assert "auth_key=<auth_key: hidden>" in repr(config)
    assert "auth_key=None" in repr(fastmfd.MigrationConfig())
    assert isinstance(config.auth_key, bytes) and repr(config.auth_key) == "<auth_key: hidden>"
    copy = pickle.loads(pickle.dumps(config))
    assert copy == config and type(copy.auth_key) is security.AuthKey
    text = _failed_session_text(KEY, OTHER_KEY)
    assert "auth_keys differ" in text and "<auth_key: hidden>" in text, text
    for key in (KEY, OTHER_KEY):
        assert key.decode() not in text
        assert key.decode() not in caplog.text
    assert "refused a connection" in caplog.text      # (the log was taken)
    out, err = capfd.readouterr()
    assert KEY.decode() not in out + err and OTHER_KEY.decode() not in out + err


def test_a_key_file_s_key_is_hidden_too(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(KEY + b"\n")
    path.chmod(0o600)
    key = fastmfd.read_key_file(path)
    assert key == KEY and KEY.decode() not in repr(key) + str([key])
    # A wrong type is a TypeError naming the parameter (it was os.open's own words).
    with pytest.raises(TypeError, match=r"^read_key_file\(path\) must be a str or "
                                        r"os\.PathLike, not int$"):
        fastmfd.read_key_file(5)


def test_a_source_and_a_destination_say_where_and_how_far_in_their_repr():
    region = make_region("ram", 1 << 16, seed=2)
    with Migration() as m:
        src, dst = m.source, m.destination
        src.add_region(region)
        assert repr(src) == (f"<Source to {src.address} (2 RAM + 0 device-state channels), "
                             f"1 region(s), 0 device(s): open>")
        assert repr(dst) == (f"<Destination at {dst.address}, 0 region(s) and 0 loader(s) "
                             f"added: open>")
        m.run().ok()
        assert repr(src).endswith(": done>") and repr(dst).endswith(": done>")
    assert repr(src).endswith(": closed>") and repr(dst).endswith(": closed>")
    region.close()
    assert repr(region) == "<Region 'ram' 65536 bytes (shm, closed)>"
    assert repr(fastmfd.Source("tcp:127.0.0.1:1")).endswith(": not entered>")


@pytest.mark.parametrize("make", [
    lambda: fastmfd.Destination("tcp:127.0.0.1:0", workers="x"),
    lambda: fastmfd.Source(5)], ids=["destination", "source"])
def test_the_repr_of_one_refused_before_it_was_made_does_not_raise(make):
    """A Source or Destination whose type check failed in its __init__ (before Owner's):
    its repr raised AttributeError ('_closed'), and so did the traceback of the TypeError
    with its locals (traceback's capture_locals reprs each frame's ``self``)."""
    with pytest.raises(TypeError) as raised:
        make()
    summary = traceback.TracebackException.from_exception(raised.value, capture_locals=True)
    shown = [frame.locals["self"] for frame in summary.stack
             if frame.locals and "self" in frame.locals]
    assert shown and all(text.endswith(" (not made)>") for text in shown), shown


@pytest.mark.parametrize("make", [
    lambda: fastmfd.MigrationConfig(auth_key=KEY, job_packets=0),
    lambda: fastmfd.MigrationConfig(auth_key=KEY, channels="x"),
    lambda: fastmfd.Destination("nonsense", auth_key=KEY),
    lambda: fastmfd.Destination("tcp:127.0.0.1:0", auth_key=KEY, workers="x")],
    ids=["config-value", "config-type", "destination-address", "destination-type"])
def test_a_refused_config_or_destination_shows_its_key_in_no_frame(make):
    """A MigrationConfig refused for another value showed its key in its own repr (the
    field's, once the key was an AuthKey only at the end of __post_init__) in the
    traceback's locals of three frames, and check_types' values; a Destination's
    ``auth_key`` parameter stayed the caller's bytes in its __init__'s frame. (The
    dataclass's generated __init__ has the caller's bytes as its parameter: not ours.)"""
    with pytest.raises((fastmfd.ConfigError, TypeError)) as raised:
        make()
    summary = traceback.TracebackException.from_exception(raised.value, capture_locals=True)
    shown = [(frame.name, name) for frame in summary.stack
             if frame.filename not in (__file__, "<string>")
             for name, text in (frame.locals or {}).items() if KEY.decode() in text]
    assert not shown, shown


def _marked(offset, length):
    with fastmfd.Region.create("r", 4096) as region:
        region.mark_dirty(offset, length)


@pytest.mark.parametrize("make,parameter", [
    (lambda: fastmfd.MigrationConfig(max_rounds=0), "max_rounds"),
    (lambda: fastmfd.MigrationConfig(job_packets=65), "job_packets"),
    (lambda: fastmfd.MigrationConfig(channels=2, device_state_channels=2,
                                     device_channels_within=True), "channels"),
    (lambda: fastmfd.MigrationConfig(auth_key=b"short"), "auth_key"),
    (lambda: fastmfd.Destination("tcp:127.0.0.1:0", auth_key=b"short"), "auth_key"),
    (lambda: fastmfd.Region.create("r", 100), "size"),
    (lambda: fastmfd.Region.create("", 4096), "name"),
    (lambda: fastmfd.Region.create("r", 4096, page_size=3000), "page_size"),
    (lambda: fastmfd.BytesDevice("d", -1, b""), "instance_id"),
    (lambda: fastmfd.BytesDevice("", 0, b""), "idstr"),
    (lambda: fastmfd.SyntheticDevice("d", 0, 4, precopy_size=9), "precopy_size"),
    (lambda: fastmfd.VerifyLoader(4, precopy_size=9), "precopy_size"),
    (lambda: _marked(4096, 4096), "offset"),
    (lambda: _marked(0, -1), "length"),
    (lambda: fastmfd.Source("tcp:127.0.0.1:70000"), "address"),
    (lambda: fastmfd.Destination("udp:127.0.0.1:1"), "address"),
    (lambda: fastmfd.Destination("unix:/" + "a" * 200), "address"),
])
def test_a_config_error_about_a_value_names_its_parameter(make, parameter):
    """README: a value of the right type that cannot work is a ConfigError whose
    ``parameter`` and ``problem`` say which and what is wrong; these said neither."""
    with pytest.raises(fastmfd.ConfigError) as raised:
        make()
    assert raised.value.parameter == parameter
    assert raised.value.problem.startswith(("must ", "port ", "expected ", "a Unix")), \
        raised.value.problem


def test_short_repr_bounds_each_kind():
    from fastmfd.reprs import short_repr
    assert short_repr(b"abc") == "b'abc'" and short_repr(bytes(33)) == "<33 bytes>"
    assert short_repr(bytearray(40)) == "<bytearray of 40 bytes>"
    assert short_repr(np.arange(3)) == repr(np.arange(3))
    assert short_repr(list(range(10))) == "[0, 1, 2, 3, 4, 5, 6, 7, ... (2 more)]"
    assert short_repr((1,)) == "(1,)" and short_repr({}) == "{}"
    assert short_repr("x" * 100) == repr("x" * 80) + "... (100 characters)"
    assert short_repr([[[[[1]]]]]) == "[[[[<list of 1>]]]]"


class _Returns:
    """A loader whose load_finish returns ``value``: what DestinationResult.devices holds."""

    def __init__(self, value):
        self.value = value

    def load_state_buffer(self, data):
        pass

    def load_finish(self):
        return self.value


def test_a_result_of_any_loader_values_has_a_bounded_repr_that_never_raises():
    """A loader may return anything: an int of 5000 digits made repr(result) raise
    ValueError (Python's limit on int to text), and a set of 100000 ints was a repr of
    690 KB; a memoryview released raised ValueError in short_repr."""
    from fastmfd.reprs import short_repr
    with Migration(fastmfd.MigrationConfig(channels=2)) as m, \
            make_region("ram", 1 << 20, seed=3) as region:
        m.source.add_region(region)
        values = {"big": 10 ** 5000, "set": set(range(100000)),
                  "sets": frozenset(frozenset([i]) for i in range(20))}
        for idstr, value in values.items():
            m.source.add_device(fastmfd.BytesDevice(idstr, 0, b"s"))
            m.destination.add_loader(idstr, 0, _Returns(value))
        _, result = m.run().ok()
        assert result.devices[("big", 0)] == 10 ** 5000 and \
            len(result.devices[("set", 0)]) == 100000     # the values are whole
        text = repr(result)
    assert len(text) < 3000, len(text)
    assert "('big', 0): <int of 16610 bits>" in text, text
    assert "('set', 0): {0, 1, 2, 3, 4, 5, 6, 7, ... (99992 more)}" in text, text
    assert "('sets', 0): frozenset({frozenset({" in text and "(12 more)}" in text, text
    assert short_repr(2 ** 255) == repr(2 ** 255) and short_repr(-2 ** 300) == "<int of 301 bits>"
    assert short_repr(True) == "True" and short_repr(set()) == "set()"
    released = memoryview(bytearray(64))
    released.release()
    assert short_repr(released) == "<released memoryview>"


def test_a_loaders_dict_list_or_tuple_of_its_own_kind_is_bounded_too():
    """An OrderedDict, a defaultdict, a namedtuple or a list subclass a loader returns
    was its own repr, whole: a MiB of bytes in an OrderedDict was a repr of 4 MB."""
    import collections
    from fastmfd.reprs import short_repr
    state = collections.namedtuple("State", "data version")
    values = {"ordered": collections.OrderedDict(data=b"x" * (1 << 20)),
              "counts": collections.defaultdict(list, {i: b"y" * 100 for i in range(1000)}),
              "named": state(b"z" * (1 << 20), 3)}
    with Migration(fastmfd.MigrationConfig(channels=1)) as m, \
            make_region("ram", 1 << 16, seed=3) as region:
        m.source.add_region(region)
        for idstr, value in values.items():
            m.source.add_device(fastmfd.BytesDevice(idstr, 0, b"s"))
            m.destination.add_loader(idstr, 0, _Returns(value))
        _, result = m.run().ok()
        assert result.devices[("named", 0)] == values["named"]     # the values are whole
        text = repr(result)
    assert len(text) < 3000, len(text)
    assert "('ordered', 0): OrderedDict({'data': <1048576 bytes>})" in text, text
    assert "('counts', 0): defaultdict({0: <100 bytes>, " in text and "(992 more)})" in text
    assert "('named', 0): State(data=<1048576 bytes>, version=3)" in text, text

    class Items(list):
        pass
    assert short_repr(Items(range(10))) == "Items([0, 1, 2, 3, 4, 5, 6, 7, ... (2 more)])"
    # Any other kind is its own repr, cut, or what it is when that repr raises.
    assert short_repr(collections.deque([10 ** 5000])) == "<deque whose repr raised ValueError>"
    long = short_repr(collections.deque(range(100000)))
    assert long.startswith("deque([0, 1, 2") and long.endswith("... (688897 characters)")
    assert len(long) < 1100


def _documented(call, *docs):
    """The parameters of ``call`` that none of ``docs`` (docstrings) names."""
    import inspect
    text = " ".join(doc or "" for doc in docs)
    return [name for name in inspect.signature(call).parameters
            if name not in ("self", "cls") and f"``{name}" not in text and f"{name} --" not in text
            and f"{name}(" not in text]


@pytest.mark.parametrize("call,docs", [
    (fastmfd.Source, [fastmfd.Source.__doc__]),
    (fastmfd.Destination, [fastmfd.Destination.__doc__]),
    (fastmfd.MigrationConfig, [fastmfd.MigrationConfig.__doc__]),
    (fastmfd.SyntheticDevice, [fastmfd.SyntheticDevice.__doc__, fastmfd.Device.__doc__]),
    (fastmfd.VerifyLoader, [fastmfd.VerifyLoader.__doc__]),
    (fastmfd.RegionPool, [fastmfd.RegionPool.__doc__]),
    (fastmfd.Region.create, [fastmfd.Region.create.__doc__, fastmfd.Region.__doc__]),
    (fastmfd.Region.from_file, [fastmfd.Region.from_file.__doc__, fastmfd.Region.__doc__]),
    (fastmfd.Destination.receive, [fastmfd.Destination.receive.__doc__]),
    (fastmfd.Source.migrate, [fastmfd.Source.migrate.__doc__]),
], ids=lambda value: getattr(value, "__qualname__", "docs"))
def test_help_names_every_parameter(call, docs):
    """``help(fastmfd.Source)`` did not say what ``address`` or ``config`` take, nor
    ``help(fastmfd.Destination)`` its ``max_queued_bytes`` or ``region_factory``."""
    assert _documented(call, *docs) == []


def test_a_region_s_repr_says_read_only_and_closed(tmp_path):
    """A region closed (``result.regions`` once its Destination closed: its bytes out
    of reach) or read-only looked like any other in its repr."""
    image = tmp_path / "ram.img"
    image.write_bytes(bytes(8192))
    region = fastmfd.Region.from_file("ram", image, read_only=True)
    assert repr(region) == f"<Region 'ram' 8192 bytes ({image}, read-only)>"
    region.close()
    assert repr(region) == f"<Region 'ram' 8192 bytes ({image}, read-only, closed)>"


@pytest.mark.parametrize("ciphers,said", [("NOPE", "No cipher can be selected."),
                                          (":", "an empty list")])
def test_a_cipher_list_openssl_refuses_is_said_in_words(ciphers, said):
    """It was "cannot load the ciphers 'NOPE': ('No cipher can be selected.',)": the
    SSLError's one argument said as a tuple, and no parameter named."""
    with pytest.raises(fastmfd.ConfigError) as raised:
        fastmfd.TLSConfig(ciphers=ciphers)
    assert str(raised.value) == f"TLS configuration: cannot load the ciphers {ciphers!r}: {said}"
    assert (raised.value.parameter, raised.value.problem) == (
        "ciphers", f"OpenSSL cannot use it: {said}")


def _raise(*args):
    raise ValueError("not in this session")


def _no_space(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


def _no_space_in_a_file(*args):
    raise OSError(errno.ENOSPC, "No space left on device", "ram.part")


@pytest.mark.parametrize("options,hook,named,cause", [
    ({}, _raise, "the on_setup hook raised ValueError: not in this session", ValueError),
    ({"region_factory": _raise}, None,
     "region_factory('ram', 65536, 4096) raised ValueError: not in this session", ValueError),
    # An OSError of no file is named as well (it was said bare: "No space left on device");
    # one said with its file passes as it is (a listener's own, its .part file's).
    ({}, _no_space, "the on_setup hook raised OSError: [Errno 28] No space left on device",
     OSError),
    ({}, _no_space_in_a_file, "ram.part: No space left on device", None),
], ids=["on_setup", "region_factory", "on_setup-oserror", "on_setup-oserror-of-a-file"])
def test_the_user_code_that_raised_is_named_on_both_sides(options, hook, named, cause):
    """on_stop and on_resume were named ("the on_stop hook raised ValueError: ..."),
    on_setup and region_factory not: both sides said "ValueError: not in this
    session", which told neither where it came from."""
    with Migration(**options) as m, make_region("ram", 1 << 16, seed=4) as region:
        m.source.add_region(region)
        since = time.monotonic()
        source, destination = m.run(dst_on_setup=hook).failed_both(since)
    assert str(destination) == named
    assert str(source).endswith(f": the peer failed: {named}"), str(source)
    if cause is not None:
        assert isinstance(destination.__cause__, cause)


def test_the_ready_made_devices_and_loaders_say_what_they_are(tmp_path):
    """They were ``<fastmfd.devices.BytesDevice object at 0x...>``: now what they were
    made with, a device's state said by its size."""
    state = tmp_path / "state"
    state.write_bytes(b"s")
    shown = [fastmfd.BytesDevice("nic0", 1, bytearray(64 << 20), config=b"cfg"),
             fastmfd.BytesDevice("nic0", 1, memoryview(b"ab")),
             fastmfd.FileDevice("disk", 0, state),
             fastmfd.SyntheticDevice("vfio", 2, 4096, read_rate=1e6, precopy_size=1024),
             fastmfd.CollectLoader(100), fastmfd.FileLoader(state, exclusive=True),
             fastmfd.VerifyLoader(4096, seed=3)]
    assert [repr(each) for each in shown] == [
        "BytesDevice('nic0', 1, <67108864 bytes>, config=b'cfg')",
        "BytesDevice('nic0', 1, b'ab', config=b'')",
        f"FileDevice('disk', 0, {str(state)!r})",
        "SyntheticDevice('vfio', 2, size=4096, read_rate=1000000.0, seed=0, precopy_size=1024)",
        "CollectLoader(limit=100)", f"FileLoader({str(state)!r}, exclusive=True)",
        "VerifyLoader(size=4096, seed=3, write_rate=None, precopy_size=0)"]
    shown[2].close()


def test_what_a_qemu_stream_said_has_a_bounded_repr():
    """A guest's RAMBlocks, its configuration bytes and COMMAND sections, as
    ``fastmfd.qemu.receive()``'s result holds them: bounded like the rest."""
    from fastmfd.qemu import QemuReceived, QemuStreamFacts
    facts = QemuStreamFacts(machine="pc-q35-7.2", blocks={f"/rom@{i}": 4096 for i in range(300)},
                            configuration=bytes(5000), commands=[("before-ram-end", b"x" * 64)])
    received = QemuReceived(facts, None, {"blocks": [{"idstr": str(i)} for i in range(300)]},
                            1.5, [{"channel": i, "packets": 1} for i in range(64)])
    text = repr(received)
    assert len(text) < 3000 and text.count("(292 more)") == 2 and "(56 more)" in text, text
    assert "configuration=<5000 bytes>" in text and "<64 bytes>" in text, text


@pytest.mark.parametrize("cls", [fastmfd.BytesDevice, fastmfd.FileDevice,
                                 fastmfd.SyntheticDevice, fastmfd.CollectLoader,
                                 fastmfd.FileLoader, fastmfd.VerifyLoader])
def test_help_says_what_each_ready_made_method_does(cls):
    """``help(fastmfd.CollectLoader)`` showed ``load_state_buffer`` and ``load_finish``
    (and the devices ``read_state``) with no word of what they do or return."""
    import inspect
    bare = [name for name, member in vars(cls).items()
            if inspect.isfunction(member) and not name.startswith("_")
            and not inspect.getdoc(member)]
    assert bare == []


def test_attaching_a_region_whose_file_is_gone_is_a_config_error(tmp_path):
    """A region in shared memory whose segment was gone was a ConfigError; one in a
    file whose file was gone raised os.open's FileNotFoundError, no FastMFDError."""
    image = tmp_path / "ram.img"
    image.write_bytes(bytes(8192))
    with fastmfd.Region.from_file("ram", image) as region, \
            fastmfd.Region.create("shm", 8192) as segment:
        handles = region.handle, segment.handle
    image.unlink()
    for handle, gone in zip(handles, (f"region 'ram': cannot open {image}: No such file or "
                                      f"directory", "shared memory segment .* does not exist")):
        with pytest.raises(fastmfd.ConfigError, match=gone):
            fastmfd.Region.attach(handle)


def test_attaching_a_region_out_of_descriptors_is_still_the_os_error(tmp_path):
    """Only a file gone (or a link put there) is a ConfigError: EMFILE came out as
    "ConfigError: region 'ram': cannot open ...: Too many open files" too, which a child
    says by its type, not as this host's own failure (failed_locally, whose errno gives
    the limit's hint)."""
    image = tmp_path / "ram.img"
    image.write_bytes(bytes(8192))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with fastmfd.Region.from_file("ram", image) as region:
        held = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
        try:
            with pytest.raises(OSError) as raised:
                while True:         # every descriptor taken
                    held.append(os.open(os.devnull, os.O_RDONLY))
            assert raised.value.errno == errno.EMFILE
            with pytest.raises(OSError) as raised:
                fastmfd.Region.attach(region.handle).close()
        finally:
            for fd in held:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert raised.value.errno == errno.EMFILE and not isinstance(raised.value,
                                                                 fastmfd.ConfigError)


def test_a_collect_loader_shows_the_limit_it_was_made_with():
    """Its repr showed its budget's bytes left as its limit: 40 after 60 were kept of
    100, and a budget shared with other loaders (max_memory's) as if its own."""
    own = fastmfd.CollectLoader(100)
    own.load_state_buffer(memoryview(bytes(60)))
    shared = fastmfd.CollectLoader(WriteBudget(1000, "max_memory"))
    assert repr(own) == "CollectLoader(limit=100)"
    assert repr(shared) == "CollectLoader(limit=<WriteBudget for max_memory: 1000 bytes left>)"


def test_a_region_whose_mapping_failed_has_a_repr_and_leaves_nothing(tmp_path, monkeypatch):
    """A traceback that shows its frames' locals (``pytest -l``, an error tracker) has
    the half-made Region as ``self`` in ``__init__``: its repr raised AttributeError
    there, and the report of the real error failed with it. The dirty bitmap made for
    it stayed in /dev/shm until the process ended (the leak check's teardown)."""
    from fastmfd import regions

    def failing_view(mapping, size):
        raise OSError(errno.ENOMEM, "cannot map")

    image = tmp_path / "ram.img"
    image.write_bytes(bytes(1 << 16))
    monkeypatch.setattr(regions, "mapped_view", failing_view)
    with pytest.raises(OSError) as failed:
        fastmfd.Region.from_file("ram", image)
    shown = traceback.TracebackException.from_exception(failed.value, capture_locals=True)
    assert "<Region 'ram' 65536 bytes" in "".join(shown.format())
