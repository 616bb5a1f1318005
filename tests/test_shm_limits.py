"""Memory: the destination commits shared memory only as data arrives, bounds what
it will hold, and a file system that fills mid-transfer is a clean error on
both sides, never a SIGBUS (issue #9).

Some tests run a script in a private mount namespace whose /dev/shm is a
small tmpfs, as in a container (Docker's default is 64 MiB); they need root
(or an unprivileged user namespace) and are skipped without.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import fastmfd
from fastmfd._engine.reassembly import plan_pool, pool_slots_for
from migration_support import Migration, make_region

MIB = 1 << 20
TESTS = str(Path(__file__).parent)


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                           capture_output=True)
    return probe.returncode == 0


needs_namespace = pytest.mark.skipif(not _namespaces_work(),
                                     reason="needs a private mount namespace (unshare -m)")


# Seconds a script may run, then it prints every thread's stack and exits 1. A
# script takes about 3 s; on a 2-core machine at a load average of 120 about 60 s,
# nearly all of it in starting up (imports, the forkserver, the workers), while
# its migration keeps to its own deadline. Within pytest's 120 s (pyproject).
SCRIPT_DEADLINE = 100


def run_with_small_shm(script: str, shm: str = "64m", disk: str | None = None,
                       disk_size: str = "8m") -> subprocess.CompletedProcess:
    """Run ``script`` with a /dev/shm of ``shm`` bytes (and a ``disk`` tmpfs of
    ``disk_size`` mounted at that path), in a mount namespace of its own. Past
    SCRIPT_DEADLINE, the script's stacks on stderr say where it waited."""
    mounts = f"mount -t tmpfs -o size={shm} tmpfs /dev/shm"
    if disk is not None:
        mounts += f" && mount -t tmpfs -o size={disk_size} tmpfs {disk}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [TESTS, os.environ.get("PYTHONPATH", "")])}
    script = ("import faulthandler\n"
              f"faulthandler.dump_traceback_later({SCRIPT_DEADLINE}, exit=True)\n"
              + textwrap.dedent(script))
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", mounts + ' && exec "$1" -c "$2"',
                               "sh", sys.executable, script],
                              capture_output=True, text=True, timeout=SCRIPT_DEADLINE + 10,
                              env=env)
    except subprocess.TimeoutExpired as exc:    # the script's own deadline did not end it
        said = [out.decode(errors="replace") if isinstance(out, bytes) else out or ""
                for out in (exc.stdout, exc.stderr)]
        raise AssertionError(f"the script still ran {SCRIPT_DEADLINE + 10} s after its start; "
                             f"stdout:\n{said[0]}\nstderr:\n{said[1][-3000:]}") from None


# ---------------------------------------------------------------- a container's /dev/shm

@needs_namespace
def test_a_small_migration_with_a_tiny_device_fits_a_64_mib_shm():
    # The destination's device-state pool used to fallocate ~265 MiB for a 4-byte
    # device state: nothing could be sent with Docker's default /dev/shm.
    done = run_with_small_shm("""
        import numpy as np, fastmfd
        from migration_support import Migration, make_region
        if __name__ == "__main__":
            image = make_region("ram", 4 << 20, seed=1)
            with Migration(fastmfd.MigrationConfig(channels=2)) as m:
                m.source.add_region(image)
                m.source.add_device(fastmfd.BytesDevice("nic", 0, b"abcd"))
                stats, result = m.run().ok()
                assert np.array_equal(result.regions["ram"].array, image.array)
                assert result.devices[("nic", 0)] == b"abcd"
            image.close()
            print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@needs_namespace
def test_a_setup_larger_than_the_free_shm_is_refused_before_allocating():
    done = run_with_small_shm("""
        import os, threading, fastmfd
        from fastmfd.shm import list_segments
        from migration_support import FakeSource, setup_message
        if __name__ == "__main__":
            with fastmfd.Destination("tcp:127.0.0.1:0", workers=1) as dst:
                source = FakeSource(dst.address, setup_message(
                    fastmfd.MigrationConfig(channels=1), os.urandom(16), {"ram": 240 << 20}))
                thread = threading.Thread(target=lambda: print("source:", source.open_main()))
                thread.start()
                try:
                    dst.receive()
                except fastmfd.FastMFDError as exc:
                    print("destination:", exc)
                thread.join()
                print("regions:", [s for s in list_segments() if "region" in s])
                source.close()
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "regions: []" in done.stdout, done.stdout
    assert "holds at most" in done.stdout and "/dev/shm has free" in done.stdout
    assert "'error': 'the source sends 251658240 bytes of regions" in done.stdout, done.stdout


@needs_namespace
def test_the_demo_fits_a_64_mib_shm():
    """`fastmfd demo` on its defaults in a container: it refused its 1 GiB image
    ("needs 1073741824 bytes of shared memory"); given a smaller one, its device-state
    experiment died of a SIGBUS filling its RAM. Now the image fits, and the experiment
    that cannot is left out, saying why."""
    done = run_with_small_shm("""
        import sys
        from fastmfd.tools.cli import main
        if __name__ == "__main__":
            sys.exit(main(["demo"]))
    """)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    said = " ".join(done.stdout.split())
    assert "Image: 16.0 MiB in shared memory (less than 1.00 GiB: /dev/shm has" in said, said
    assert "identical to the source's final content" in said, said
    assert "The device-state experiment is left out: it needs 384 MiB of /dev/shm" in said, said


@needs_namespace
def test_an_image_too_large_for_what_shm_has_left_is_a_clean_error():
    """An image is filled through its mapping: where /dev/shm ran out, that was a SIGBUS
    (the demo's device-state experiment in a container); now it is populated first."""
    done = run_with_small_shm("""
        import fastmfd
        from fastmfd.regions import Region
        from fastmfd.tools.images import fill_image
        if __name__ == "__main__":
            first, second = Region.create("first", 48 << 20), Region.create("second", 32 << 20)
            fill_image(first, "random")
            try:
                fill_image(second, "halftext")
            except fastmfd.FastMFDError as exc:
                print("refused:", exc)
            first.close()
            second.close()
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused: the image: no memory to write into" in done.stdout, done.stdout


@needs_namespace
def test_a_region_larger_than_shm_has_free_is_refused_in_words():
    done = run_with_small_shm("""
        import fastmfd
        if __name__ == "__main__":
            try:
                fastmfd.Region.create("ram", 1 << 30)
            except fastmfd.ConfigError as exc:
                print(exc)
    """)
    assert done.stdout.strip() == (
        "region 'ram' needs 1.00 GiB of shared memory and /dev/shm has 64.0 MiB free: free "
        "some, or give it more (a container's is 64 MiB unless started with a larger one, "
        "e.g. docker run --shm-size=4g)"), done.stdout + done.stderr[-3000:]


def test_checking_a_sparse_region_takes_no_memory_for_its_holes(leaks):
    """The demo and the bench check a destination's region against the source's
    image: through its mapping, each zero page (a hole) was allocated to be read,
    twice the memory, and in a /dev/shm with no room left a SIGBUS (the demo's
    device-state experiment with 256 MiB free)."""
    from fastmfd.tools.images import region_holds
    region = fastmfd.Region.create("ram", 16 * MIB)
    try:
        expected = np.zeros(16 * MIB, dtype=np.uint8)
        expected[5 * 4096:6 * 4096] = 7
        region.array[5 * 4096:6 * 4096] = 7
        with region.open_file() as file:
            allocated = os.fstat(file.fileno()).st_blocks * 512
            assert allocated == 4096
            assert region_holds(region, expected)
            assert os.fstat(file.fileno()).st_blocks * 512 == allocated
        expected[-1] = 1
        assert not region_holds(region, expected)               # the last byte differs
        assert not region_holds(region, expected[:-4096])       # the region is longer
    finally:
        region.close()


# ---------------------------------------------------------------- filling up mid-transfer

_FILL_MID_TRANSFER = """
    import os, threading, time, fastmfd
    from fastmfd.shm import free_bytes
    from migration_support import Migration, make_region
    if __name__ == "__main__":
        from fastmfd.tools.images import fill_image
        image = make_region("ram", 16 << 20)
        fill_image(image, "{image}")
        config = fastmfd.MigrationConfig(channels=2, compression="{compression}",
                                         max_bandwidth=8 << 20, job_packets=1)
        extra = {destination}
        with Migration(config) as m:
            m.source.add_region(image)
            if extra is not None:
                m.destination.add_region(extra)
            counters = m.source._parts.counters

            # From 2 MiB of pages sent (wire bytes: 3/4 of a zstd halftext transfer,
            # whose end a loaded machine's filler missed), the fill has the rest, at
            # 8 MiB/s 0.25 s or more, to take /dev/shm.
            def fill():
                while counters.total("normal_pages") < (2 << 20) // 4096:
                    time.sleep(0.002)
                {fill}

            threading.Thread(target=fill, daemon=True).start()
            outcome = m.run(timeout=30)
        print("source:", outcome.source_error)
        print("destination:", outcome.dest_error)
        image.close()
        if extra is not None:
            extra.close()
"""

_FILL_SHM = """fd, size = os.open("/dev/shm/filler", os.O_RDWR | os.O_CREAT, 0o600), 0
                while True:         # a MiB at a time: the destination takes pages meanwhile
                    try:
                        os.posix_fallocate(fd, size, 1 << 20)
                    except OSError:
                        break
                    size += 1 << 20"""


@needs_namespace
@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("image", ["random", "halftext"])
def test_a_shm_filling_mid_transfer_is_a_clean_error(compression, image):
    # Regions are sparse now: the memory is found page run by page run as data
    # arrives, and a /dev/shm that another program fills meanwhile must end the
    # session cleanly on both sides. Every other page zero ("halftext"): each
    # page is a run of its own, which a raw payload's readv faults in itself.
    done = run_with_small_shm(_FILL_MID_TRANSFER.format(
        compression=compression, destination="None", fill=_FILL_SHM, image=image),
        shm="48m")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert "region ram: no memory to write into" in lines["destination"], done.stdout
    assert "region ram: no memory to write into" in lines["source"], done.stdout
    assert "SIGBUS" not in done.stdout and "Bad address" not in done.stdout


@needs_namespace
@pytest.mark.parametrize("image", ["random", "halftext"])
def test_a_shm_filling_under_a_users_sparse_region_is_a_clean_error(image):
    # A region the destination is given is not fresh: each run of pages is
    # populated before it is written, for reading on tmpfs (fault-around maps
    # the neighbours held already), and a hole is allocated by that populate,
    # which is where a full /dev/shm must be found, never a SIGBUS.
    done = run_with_small_shm(_FILL_MID_TRANSFER.format(
        compression="none", fill=_FILL_SHM, image=image,
        destination="fastmfd.Region.create('ram', 16 << 20)"), shm="48m")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert "region ram: no memory to write into" in lines["destination"], done.stdout
    assert "region ram: no memory to write into" in lines["source"], done.stdout
    assert "SIGBUS" not in done.stdout and "Bad address" not in done.stdout


@needs_namespace
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_full_disk_under_a_region_file_is_a_clean_error(tmp_path, compression):
    # `fastmfd listen` maps files: a full disk was "RAM payload: Bad address"
    # (readv) or a receive worker "killed by SIGBUS" (inflating into the page).
    disk = str(tmp_path)
    done = run_with_small_shm(_FILL_MID_TRANSFER.format(
        compression=compression, fill="pass", image="random",
        destination=f"fastmfd.Region.from_file('ram', '{disk}/ram.img', size=16 << 20)"),
        disk=disk)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert "region ram: no memory to write into" in lines["destination"], done.stdout
    assert "SIGBUS" not in done.stdout and "Bad address" not in done.stdout


_RESEND_INTO_FULL_SHM = """
    import os, socket
    import numpy as np
    from fastmfd._core import placing_available
    from engine_pair import PAGE, EnginePair, image

    SIZE = 8 << 20
    pair = socket.socketpair()
    engines = EnginePair(pair[0], pair[1], SIZE, devices=False, place=True,
                         image_data=image(SIZE, zero_every=SIZE // PAGE))
    try:
        engines.send_pages(np.arange(SIZE // PAGE))
        engines.sync()
        engines.wait_events(1)
        fd = os.open("/dev/shm/filler", os.O_RDWR | os.O_CREAT, 0o600)
        size = 0
        for step in (1 << 20, 4096):        # every last page of it
            while True:
                try:
                    os.posix_fallocate(fd, size, step)
                except OSError:
                    break
                size += step
        again = np.arange(1, SIZE // PAGE, 3)
        engines.src.array.reshape(-1, PAGE)[again] = 7
        engines.send_pages(again)
        engines.sync()
        engines.finish()
        os.unlink("/dev/shm/filler")     # reading a hole (page 0) allocates a page
        os.close(fd)
        print("placing:", placing_available())
        print("same:", np.array_equal(engines.dst.array, engines.src.array))
    finally:
        engines.close()
"""


@needs_namespace
def test_pages_sent_again_need_no_memory_when_shm_is_full():
    # A page placed in round 1 is there: its new bytes in round 2 go through the
    # mapping. UFFDIO_COPY would charge a new page before finding it there, and
    # fail with ENOSPC although nothing new is needed.
    done = run_with_small_shm(_RESEND_INTO_FULL_SHM, shm="24m")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same: True" in done.stdout, done.stdout


# ---------------------------------------------------------------- max_memory

def test_max_memory_refuses_a_setup_before_allocating(leaks):
    image = make_region("ram", 4 * MIB, seed=4)
    try:
        with Migration(fastmfd.MigrationConfig(channels=1), max_memory=MIB) as m:
            m.source.add_region(image)
            outcome = m.run(timeout=30)
            assert m.destination._session.regions == []     # nothing was made
        for error in (outcome.source_error, outcome.dest_error):
            assert isinstance(error, fastmfd.FastMFDError), repr(error)
            assert "4194304 bytes of regions" in str(error)
            assert "it holds at most 1048576 (max_memory" in str(error)
    finally:
        image.close()


def test_the_device_pool_shrinks_its_out_of_order_cap_to_fit():
    chunk, stride = MIB, MIB + 64
    # The session's cap fits: unchanged.
    cap, slots = plan_pool(1, 256 * MIB, chunk, 2, budget=1 << 40)
    assert cap == 256 * MIB and slots == pool_slots_for(1, 256 * MIB, chunk, 2)
    # 60 MiB left: the largest cap whose pool fits.
    cap, slots = plan_pool(1, 256 * MIB, chunk, 2, budget=60 * MIB)
    assert slots * stride <= 60 * MIB < (slots + 1) * stride + stride
    assert cap >= chunk and slots == pool_slots_for(1, cap, chunk, 2)
    # Not even one out-of-order chunk per device: refused, with what it needs.
    with pytest.raises(fastmfd.ConfigError, match="device-state buffers of 4 device"):
        plan_pool(4, 256 * MIB, chunk, 2, budget=8 * MIB)
