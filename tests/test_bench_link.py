"""``fastmfd bench --link RATE[/DELAY]``: every destination behind an emulated link.

The link is real: a network namespace, a veth pair and tc qdiscs, made and
removed by the bench (root only). The tests check that the bytes cross it
(the rate limiter's own byte counter), that the transfers stay page-exact,
and that nothing is left behind. Timings are printed, never asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import pytest
from hypothesis import given, strategies as st
from leakcheck import leaks  # noqa: F401

from fastmfd.errors import ConfigError
from fastmfd.tools.bench import link as link_module
from fastmfd.tools.bench.link import EmulatedLink, parse_link, same_link, transfer_timeout
from fastmfd.tools.bench.matrix import Setting, run_once
from fastmfd.tools.cli import main
from fastmfd.tools.images import Image
from listen_support import REPO
from qemu_support import needs_qemu

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tc") is None,
    reason="an emulated link needs root and iproute2 (network namespace, veth, tc)")
# Within one run the link tests run alone all the same: a link another worker leaked
# meanwhile would be taken for the test's (made_here: its maker is gone).
ALONE = pytest.mark.alone("nothing_left_behind: every link made meanwhile is the test's")


def namespaces() -> set[str]:
    names = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    return {n for n in names if n.startswith("fastmfd-link-")}


def devices() -> set[str]:
    return {n for n in os.listdir("/sys/class/net") if n.startswith("fmfd")}


def made_here(name: str) -> bool:
    """Whether a link's namespace or device (named after the pid of the bench that made
    it) may be this test's: made by this process, by one it started, or by one gone (a
    leak). One of a live process outside this tree is another test run's, made beside
    this one: it was taken, and deleted under that run (two suites at once)."""
    pid = int("".join(c for c in name.removeprefix("fastmfd-link-") if c.isdigit()))
    if not os.path.exists(f"/proc/{pid}"):
        return True
    while pid > 1 and pid != os.getpid():
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rpartition(")")[2].split()[1])      # its parent
        except OSError:
            return False
    return pid == os.getpid()


def test_a_link_of_another_runs_live_bench_is_not_taken_for_the_tests():
    # Another suite's bench, live beside this run, is no process of this tree (its
    # namespace was deleted under it by this fixture: two helpers' runs at once).
    with subprocess.Popen(["sleep", "30"], start_new_session=True) as child:
        try:
            assert made_here(f"fmfd{child.pid}s")               # started here
            # Not started by this process: its parent is the sleeping child's sibling.
            outsider = subprocess.run(
                ["setsid", "--fork", "sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"],
                capture_output=True, text=True, check=True).stdout.strip()
            try:
                assert not made_here(f"fastmfd-link-{outsider}")
            finally:
                os.kill(int(outsider), signal.SIGKILL)
        finally:
            child.kill()
    assert made_here(f"fmfd{os.getpid()}d")
    assert made_here(f"fmfd{child.pid}s")                       # gone: a leak, maybe ours


@pytest.fixture
def nothing_left_behind():
    before = namespaces(), devices()
    yield
    left = ({n for n in namespaces() - before[0] if made_here(n)},
            {n for n in devices() - before[1] if made_here(n)})
    for device in left[1]:          # the machine stays clean when the test fails
        subprocess.run(["ip", "link", "del", device], capture_output=True)
    for namespace in left[0]:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
    assert left == (set(), set())


@pytest.mark.parametrize("text, rate_bits, delay_s", [
    ("1gbit", 10 ** 9, 0.0), ("10gbit/1ms", 10 ** 10, 1e-3), ("500mbit/200us", 5 * 10 ** 8, 2e-4),
    ("2.5Gbit/0.5ms", 25 * 10 ** 8, 5e-4)])
def test_link_forms(text, rate_bits, delay_s):
    spec = parse_link(text)
    assert (spec.rate_bits, spec.delay_s) == (rate_bits, pytest.approx(delay_s))


def test_a_transfer_over_a_slow_link_has_the_time_its_bytes_take():
    # The QEMU cells waited a fixed 600 s for a migration: 128 MiB over 1mbit (~1074 s
    # of bytes) failed every one (sendall's had the allowance already).
    slow = types.SimpleNamespace(spec=parse_link("1mbit"))
    seconds_of_bytes = (128 << 20) / (10 ** 6 / 8)
    assert transfer_timeout(600.0, 128 << 20, slow) == pytest.approx(600 + 2 * seconds_of_bytes)
    assert transfer_timeout(600.0, 128 << 20, None) == 600.0


@pytest.mark.parametrize("text, message", [
    ("1gb", "expected RATE[/DELAY]"), ("fast", "expected RATE[/DELAY]"),
    ("1gbit/1", "expected RATE[/DELAY]"), ("100kbit", "between 1mbit and 100gbit"),
    ("1gbit/2s", "at most 1s")])
def test_link_mistakes(text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_link(text)


@pytest.mark.parametrize("text", ["1gbit/1\u017f", "1gbit/1m\u017f",
                                  "\u0661\u0660\u0660\u0660mbit", "1gb\u0131t"])
def test_a_link_in_other_letters_or_digits_is_refused_as_a_mistake(text):
    # Unicode rules: a long s matched 's' and the unit's lookup raised KeyError; Arabic-Indic
    # digits and a dotless i were taken.
    with pytest.raises(ConfigError, match=r"expected RATE\[/DELAY\]"):
        parse_link(text)
    assert same_link(text) == text


@pytest.mark.parametrize("text", ["9" * 400 + "bit", "9" * 5000 + "bit",
                                  "1gbit/0." + "0" * 5000 + "1s"])
def test_a_link_of_a_number_too_long_is_refused_as_a_mistake(text):
    # float() made 400 nines infinity (OverflowError out of round()), and a number of
    # over 4300 digits is Fraction's ValueError: a traceback out of bench --link, and
    # out of --compare / --benchmark-compare reading such a link from a saved file.
    with pytest.raises(ConfigError, match="a number of more than 40 characters|between"):
        parse_link(text)
    assert same_link(text) == text


_NUMBER = st.one_of(st.integers(0, 10 ** 12).map(str),
                    st.tuples(st.integers(0, 10 ** 6), st.text("0123456789", min_size=1,
                                                                max_size=4))
                    .map(lambda t: f"{t[0]}.{t[1]}"))


@given(_NUMBER, st.sampled_from(["", "k", "M", "g"]), _NUMBER,
       st.sampled_from(["", "/us", "/ms", "/S"]))
def test_a_links_one_spelling_is_the_same_rate_and_delay(rate, unit, delay, delay_unit):
    """LinkSpec.same is parsed back to the typed link's rate and delay, exactly: 27.42ms
    was 0.027420000000000003 s typed, 0.02742 s as its spelling '27420us'."""
    text = f"{rate}{unit}bit" + (f"/{delay}{delay_unit[1:]}" if delay_unit else "")
    try:
        spec = parse_link(text)
    except ConfigError:
        return
    again = parse_link(spec.same)
    assert (again.rate_bits, again.delay_s) == (spec.rate_bits, spec.delay_s)
    assert again.same == spec.same == same_link(text)


def test_one_link_typed_two_ways_is_one_condition(tmp_path, monkeypatch):
    """A link's conditions are its rate and delay, however typed: a run over 1gbit and one
    over 1000mbit were not compared, by bench --compare (its saved file as typed) nor by
    the suites' --benchmark-compare (their conditions recorded as typed)."""
    from fastmfd.tools.bench import command
    from fastmfd.tools.bench.document import RunConditions, load_baseline
    assert {parse_link(text).same for text in ("1gbit/1ms", "1000mbit/1000us", "1Gbit/1ms",
                                               "1000000000bit/0.001s")} == {"1gbit/1ms"}
    assert [parse_link(text).same for text in ("1gbit/0ms", "2.5gbit", "10gbit/0.5ms")] == [
        "1gbit", "2500mbit", "10gbit/500us"]
    setting = Setting("fastmfd", 1, "none")
    now = RunConditions(link=command.emulated("1gbit")).of(setting, 1 << 20)
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps({"benchmarks": [
        {"name": name, "stats": {"min": 1.0}, "extra_info": {**now, "link": link}}
        for name, link in (("typed", "emulated 1000mbit (veth, tc)"),
                           ("other", "emulated 10gbit (veth, tc)"),
                           ("odd", "emulated fast (veth, tc)"))]}))
    baseline = load_baseline(str(saved))
    assert baseline["typed"].differences(now) == ""
    assert baseline["other"].differences(now) == (
        "link: emulated 10gbit (veth, tc) before, emulated 1gbit (veth, tc) now")
    assert "emulated fast (veth, tc) before" in baseline["odd"].differences(now)
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import conftest_migrate  # noqa: F401  (its CONDITIONS)
    from _conditions import CONDITIONS, differences
    conditions = CONDITIONS["test_migrate_throughput.py"]

    def run_over(link: str | None) -> dict:
        options = {"--migrate-link": link, "--migrate-prealloc": False, "--migrate-size": 1 << 20}
        return conditions(types.SimpleNamespace(getoption=lambda name, default=None:
                                                options.get(name, default)))
    assert run_over("1000mbit")["link"] == "1gbit"
    assert differences(run_over("1000mbit"), run_over("1gbit")) == ""
    assert differences({**run_over(None), "link": "1000mbit"}, run_over("1gbit")) == ""
    assert differences(run_over("10gbit"), run_over("1gbit")) == "link: 10gbit before, 1gbit now"


@pytest.mark.parametrize("text, message", [
    ("1000001bit", "tc's tbf shapes whole bytes per second, and 1000001 bit/s is not a "
                   "multiple of 8: give 1000000bit or 1000008bit"),
    ("1gbit/0.5us", "the delay is given to netem in whole microseconds")])
def test_a_link_tc_cannot_emulate_exactly_exits_2_before_any_work(capsys, text, message):
    # tbf keeps its rate in bytes per second: 1000001bit was shaped at 1000000 (tc -j
    # qdisc show: rate 125000), the table saying 1000001bit.
    with pytest.raises(SystemExit) as exit:
        main(["bench", "--size", "1M", "--link", text])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
    assert parse_link("2.3mbit").rate_bits == 2_300_000     # int() made it 2299999


@needs_root
def test_a_delay_without_netem_is_refused_before_any_namespace(monkeypatch, capsys):
    """Where the kernel has no netem, --link RATE/DELAY says so at once: it said so once
    the link's namespace and veth were made (and, with --peer qemu, QEMU's checks ran)."""
    from fastmfd.tools.bench import command
    if link_module._qdisc_known("netem", "delay", "1ms"):
        link_module.check_can_emulate(parse_link("1gbit/1ms"))     # a kernel with netem
        return

    def made(*args, **kwargs):
        raise AssertionError("a link was made")
    monkeypatch.setattr(command, "EmulatedLink", made)
    monkeypatch.setattr(command, "check_qemu", made)
    before = namespaces()
    assert main(["bench", "--size", "1M", "--channels", "1", "--peer", "qemu",
                 "--link", "1gbit/1ms"]) == 2
    err = capsys.readouterr().err
    assert "link 1gbit/1ms: this kernel has no netem qdisc" in err, err
    assert namespaces() == before


def test_a_bad_link_exits_2_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["bench", "--size", "1M", "--link", "fast"])
    assert exit.value.code == 2
    assert "expected RATE[/DELAY]" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run the command without a capability")
@pytest.mark.parametrize("capability", ["net_admin", "sys_admin"])
def test_without_a_capability_the_command_says_why_before_any_work(capability):
    # Root without CAP_NET_ADMIN, or without CAP_SYS_ADMIN (`ip netns add` mounts),
    # as in a container: still root, so it reads the checkout wherever it is, but
    # cannot make a namespace.
    done = subprocess.run(
        ["setpriv", f"--bounding-set=-{capability}", f"--inh-caps=-{capability}",
         sys.executable, "-m", "fastmfd", "bench", "--size", "1M", "--link", "1gbit"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"--link needs root (CAP_{capability.upper()})" in done.stderr
    assert "making" not in done.stderr          # no image was made


@ALONE
@needs_root
def test_a_device_of_the_links_name_left_by_another_is_not_removed(nothing_left_behind):
    """A veth of this pid's name left by a killed bench (pids are reused): the
    link cannot be made, says so, removes the namespace it made, and leaves
    the device that was there (found in review: close() deleted it)."""
    stale = f"fmfd{os.getpid()}s"
    subprocess.run(["ip", "link", "add", stale, "type", "veth", "peer", "name",
                    f"fmfd{os.getpid()}x"], check=True)
    try:
        with pytest.raises(ConfigError, match=f"ip link add {stale} .*failed"):
            EmulatedLink(parse_link("1gbit"))
        assert os.path.exists(f"/sys/class/net/{stale}")
    finally:
        subprocess.run(["ip", "link", "del", stale], check=True)


def interrupt_at(monkeypatch, command: str, *, after: bool) -> None:
    """Ctrl-C's KeyboardInterrupt, raised once: right after the first ``ip`` or ``tc``
    command starting with ``command`` ran (``after``), or right before it would."""
    real_run = link_module._run
    pending = [True]

    def run(*argv: str) -> str:
        hit = pending[0] and " ".join(argv).startswith(command)
        if hit and not after:
            pending[0] = False
            raise KeyboardInterrupt
        out = real_run(*argv)
        if hit:
            pending[0] = False
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(link_module, "_run", run)


@ALONE
@needs_root
@pytest.mark.parametrize("command", ["ip netns add", "ip link add", "ip addr add"])
def test_an_interrupt_while_the_link_is_made_leaves_nothing(monkeypatch, command,
                                                            nothing_left_behind):
    """Ctrl-C landing once ``ip`` made the namespace (or the veth), before the link
    marked it as made: it was left behind (found in review)."""
    interrupt_at(monkeypatch, command, after=True)
    with pytest.raises(KeyboardInterrupt):
        EmulatedLink(parse_link("1gbit"))


@ALONE
@needs_root
def test_an_interrupt_while_ip_runs_waits_for_its_end(nothing_left_behind, monkeypatch):
    """Ctrl-C landing while ``ip netns add`` runs: subprocess.run gave it up at once
    (as Popen does when interrupted right after its fork), and the namespace
    appeared after close() had looked (found in review)."""
    real_run = subprocess.run

    def slow_namespace_add(argv, **kwargs):
        if list(argv[:3]) != ["ip", "netns", "add"]:
            return real_run(argv, **kwargs)
        child = subprocess.Popen(["sh", "-c", 'sleep 1; exec "$@"', "sh", *argv],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        out, err = child.communicate()
        return subprocess.CompletedProcess(argv, child.returncode, out, err)

    monkeypatch.setattr(link_module.subprocess, "run", slow_namespace_add)
    with pytest.raises(KeyboardInterrupt):
        EmulatedLink(parse_link("1gbit"))
    time.sleep(1.5)         # a command given up has made its namespace by now


@ALONE
@needs_root
@pytest.mark.parametrize("command, after", [
    ("ip link del", False), ("ip link del", True), ("ip netns del", False)])
def test_an_interrupt_while_the_link_is_removed_leaves_nothing(monkeypatch, command, after,
                                                               nothing_left_behind):
    """One Ctrl-C in close(): the rest is removed before it goes on (close() cleared
    each mark before its removal ran, so an interrupt left the namespace)."""
    link = EmulatedLink(parse_link("1gbit"))
    interrupt_at(monkeypatch, command, after=after)
    with pytest.raises(KeyboardInterrupt):
        link.close()
    # The namespace's devices go in the background: the veth is gone at once only
    # if it was deleted first, as the next link (same names) needs.
    assert not os.path.exists(f"/sys/class/net/{link.source_device}")


@ALONE
@needs_root
@pytest.mark.parametrize("method", ["fastmfd", "sendall"])
def test_a_transfer_crosses_the_link_page_exact(method, nothing_left_behind, leaks):
    with EmulatedLink(parse_link("1gbit")) as link, Image.create("halftext", 8 << 20) as image:
        setting = Setting(method, 2, "none")
        measurement = run_once(setting, image, link=link)       # finish() compares pages
        # Every byte the sender wrote went through the source side's rate limiter.
        wire = measurement.wire_bytes
        assert wire is not None and measurement.details["link_bytes"] >= wire
        assert link.namespace in namespaces()
    assert link.namespace not in namespaces()


@ALONE
@needs_root
def test_a_sendall_slower_than_a_step_over_a_slow_link_is_waited_for(monkeypatch,
                                                                    nothing_left_behind, leaks):
    """The sendall pair's transfer had STEP_TIMEOUT (60 s) whatever the link: `bench --size
    8M --peer sendall --link 1mbit` (67 s of bytes) failed "sendall receiver: no Done
    report within 60 s". It has twice the image's time at the link's rate besides. Here
    a step is 4 s (the parent's deadlines) and 2 MiB takes about 16 s at 1mbit."""
    from fastmfd.tools.bench import peers
    monkeypatch.setattr(peers, "STEP_TIMEOUT", 4.0)
    with EmulatedLink(parse_link("1mbit")) as link, Image.create("halftext", 2 << 20) as image:
        measurement = run_once(Setting("sendall", 1, "none"), image, link=link)
        print(f"2 MiB over 1mbit: {measurement.seconds:.1f} s")
        assert measurement.details["link_bytes"] >= image.size


@ALONE
@needs_root
@needs_qemu
@pytest.mark.parametrize("method", ["qemu", "qemu-to-fastmfd", "fastmfd-to-qemu"])
def test_qemu_cells_cross_the_link(method, nothing_left_behind, leaks):
    with EmulatedLink(parse_link("10gbit")) as link, Image.create("halftext", 8 << 20) as image:
        measurement = run_once(Setting(method, 2, "none"), image, link=link)
        # Half the image is text pages, sent whole (zero pages are not): at least
        # those bytes crossed the link.
        assert measurement.details["link_bytes"] >= image.size // 2


@ALONE
@needs_root
def test_a_veth_gone_as_it_is_removed_is_removed(monkeypatch, nothing_left_behind):
    """The namespace, deleted by a removal interrupted before its veth's (so removed
    first on the way out), frees its devices in the background: the veth's other end
    too, between close()'s look and its ``ip link del`` (full runs with the machine
    busy: 'ip link del fmfd28241s failed: Cannot find device'). Here it goes just before."""
    link = EmulatedLink(parse_link("1gbit"))
    real_run = link_module._run

    def run(*argv: str) -> str:
        if argv[:3] == ("ip", "link", "del"):
            real_run(*argv)         # gone in the background, just before
        return real_run(*argv)

    monkeypatch.setattr(link_module, "_run", run)
    link.close()
    assert not os.path.exists(f"/sys/class/net/{link.source_device}")


@ALONE
@needs_root
def test_a_delay_needs_netem_or_says_so(nothing_left_behind):
    try:
        link = EmulatedLink(parse_link("1gbit/1ms"))
    except ConfigError as exc:
        assert "no netem qdisc" in str(exc)     # this kernel cannot delay packets
        return
    with link, Image.create("random", 4 << 20) as image:
        measurement = run_once(Setting("fastmfd", 1, "none"), image, link=link)
        assert measurement.details["link_bytes"] >= image.size


@ALONE
@needs_root
def test_the_command_runs_over_a_link_and_says_so(tmp_path, capsys, nothing_left_behind):
    out = tmp_path / "bench.json"
    code = main(["bench", "--size", "4M", "--channels", "2", "--compression", "none",
                 "--image", "halftext", "--link", "1gbit", "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "over an emulated 1gbit link" in printed.out
    benchmark, = json.loads(out.read_text())["benchmarks"]
    assert benchmark["extra_info"]["link"] == "emulated 1gbit (veth, tc)"
    assert benchmark["extra_info"]["runs"][0]["link_bytes"] > 0


@ALONE
@needs_root
def test_the_command_runs_over_a_link_in_tls(capsys, nothing_left_behind):
    """--tls's throwaway certificate names the link's far end too: it named only
    this host ("certificate is not valid for '10.254.0.26'", exit 1)."""
    code = main(["bench", "--size", "4M", "--channels", "2", "--compression", "none",
                 "--link", "1gbit", "--tls"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "over an emulated 1gbit link, fastmfd with TLS" in printed.out
