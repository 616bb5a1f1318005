"""A host that cannot give fastmfd what it needs (no writable /dev/shm, an
address-space or file-size limit, no temporary directory) is one error that
names what is missing and what to do, before any work where it can be known.

The /dev/shm tests run fastmfd in a private mount namespace (root, or an
unprivileged user namespace) and are skipped without; the limits are set by
``resource.setrlimit`` in the child process only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fastmfd
from fastmfd import shm
from fastmfd._engine.session import as_migration_error
from listen_support import Listener, listens_at, run_cli
from test_shm_limits import needs_namespace

TESTS = str(Path(__file__).parent)
TREE = str(Path(__file__).parent.parent)

# Shell commands that leave /dev/shm read-only, or absent (a /dev of its own, with
# only the devices Python needs in it), in the namespace they run in.
SHM_MOUNTS = {
    "read-only": "mount -t tmpfs -o ro tmpfs /dev/shm",
    "absent": "mount -t tmpfs tmpfs /mnt && mkdir /mnt/dev && for n in null zero urandom; "
              "do touch /mnt/dev/$n && mount --bind /dev/$n /mnt/dev/$n; done "
              "&& mount --rbind /mnt/dev /dev",
}
SAID = {"read-only": "/dev/shm: a read-only file system:",
        "absent": "/dev/shm: no such directory:"}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([TREE, TESTS])}


def run_with_shm(mode: str, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``command`` where /dev/shm is ``mode`` (SHM_MOUNTS), in a mount namespace."""
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           SHM_MOUNTS[mode] + ' && exec "$@"', "sh", *command],
                          capture_output=True, text=True, timeout=timeout, env=_env(),
                          cwd="/")


@needs_namespace
@pytest.mark.parametrize("mode", sorted(SHM_MOUNTS))
def test_listen_refuses_a_dev_shm_it_cannot_use_before_listening(tmp_path, mode):
    # It listened, and failed only at the source's SETUP: "No such file or directory".
    done = run_with_shm(mode, sys.executable, "-m", "fastmfd", "listen", "tcp:127.0.0.1:0",
                        "--dir", str(tmp_path / "out"), "--timeout", "5")
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "listening on" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"fastmfd listen: {SAID[mode]}"), done.stderr
    assert "--shm-size" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


@needs_namespace
@pytest.mark.parametrize("mode", sorted(SHM_MOUNTS))
def test_the_demo_refuses_a_dev_shm_it_cannot_use(mode):
    # Without /dev/shm it said "[Errno 2] No such file or directory: '/dev/shm'", exit 1.
    done = run_with_shm(mode, sys.executable, "-m", "fastmfd", "demo")
    said = done.stderr.splitlines()[-1:]
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert said and said[0].startswith("fastmfd demo: /dev/shm: "), done.stderr[-2000:]
    assert "--shm-size" in said[0], said


@needs_namespace
@pytest.mark.parametrize("mode", sorted(SHM_MOUNTS))
def test_a_destination_and_a_source_refuse_a_dev_shm_they_cannot_use(mode):
    done = run_with_shm(mode, sys.executable, "-c", """if True:
        import fastmfd
        for make in (lambda: fastmfd.Destination("tcp:127.0.0.1:0"),
                     lambda: fastmfd.Source("tcp:127.0.0.1:9")):
            try:
                make().close()
            except fastmfd.ConfigError as exc:
                print(exc)
    """)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 2, (done.stdout, done.stderr[-2000:])
    assert all(line.startswith(SAID[mode]) for line in lines), lines


@needs_namespace
def test_a_segment_created_in_a_read_only_dev_shm_names_it():
    # Once past the check (the file system remounted read-only meanwhile, say).
    done = run_with_shm("read-only", sys.executable, "-c", """if True:
        from fastmfd.errors import ConfigError
        from fastmfd.shm import SharedMemory
        try:
            SharedMemory.create(4096)
        except ConfigError as exc:
            print(exc)
    """)
    assert done.stdout.startswith("/dev/shm: Read-only file system: fastmfd keeps"), \
        (done.stdout, done.stderr[-2000:])


def test_an_os_error_said_to_the_peer_names_its_file():
    error = as_migration_error(OSError(errno.EROFS, os.strerror(errno.EROFS),
                                       "/dev/shm/fastmfd-region-ram-1-abc"), "main channel")
    assert "/dev/shm/fastmfd-region-ram-1-abc: Read-only file system" in str(error)


# ---------------------------------------------------------------- limits of the process

def _limit(which: int, value: int):
    def preexec() -> None:
        resource.setrlimit(which, (value, value))
    return preexec


def test_an_image_past_the_address_space_limit_names_the_region_and_the_limit(tmp_path):
    # It said "[Errno 12] Cannot allocate memory", exit 1.
    image = tmp_path / "big.img"
    with open(image, "wb") as sparse:
        sparse.truncate(16 << 30)           # nothing on disk
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TREE, TESTS])}
    done = subprocess.run([sys.executable, "-m", "fastmfd", "send", "tcp:127.0.0.1:9",
                           f"ram={image}", "-q"], capture_output=True, text=True, timeout=120,
                          env=env, preexec_fn=_limit(resource.RLIMIT_AS, 4 << 30))
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert re.fullmatch(re.escape(f"fastmfd send: region 'ram': cannot map {image} (16.0 GiB): "
                                  f"Cannot allocate memory (this process's address-space "
                                  f"limit is 4.00 GiB, ") + r"[^,]+ of it in use: RLIMIT_AS, "
                        r"ulimit -v\)\n", done.stderr), done.stderr


LIMIT_NOT_THE_CAUSE = """
import errno, resource
from fastmfd.shm import limit_hint
resource.setrlimit(resource.RLIMIT_AS, (64 << 30, 64 << 30))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 40, 1 << 40))
print(repr(limit_hint(errno.ENOMEM, 1 << 20)), repr(limit_hint(errno.EFBIG, 1 << 20)),
      repr(limit_hint(errno.ENOMEM, 80 << 30)), repr(limit_hint(errno.EFBIG, 2 << 40)),
      sep="|")
"""


def test_a_limit_that_cannot_be_the_cause_is_not_named():
    """An ENOMEM of 1 MiB beside a 64 GiB address-space limit (a memory cgroup's,
    from posix_fallocate: nothing was mapped) and an EFBIG of a 1 MiB file beside a
    1 TiB file-size limit were each blamed on the limit (a reread); sizes past
    the limits still name them."""
    done = subprocess.run([sys.executable, "-c", LIMIT_NOT_THE_CAUSE], capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([TREE, TESTS])})
    assert done.returncode == 0, done.stderr
    small_as, small_fsize, big_as, big_fsize = done.stdout.split("|")
    assert (small_as, small_fsize) == ("''", "''"), done.stdout
    assert "address-space limit is 64.0 GiB" in big_as, done.stdout
    assert "file-size limit is 1.00 TiB" in big_fsize, done.stdout


def test_a_region_file_past_the_file_size_limit_names_the_file_and_the_limit(tmp_path):
    # The listener said "fastmfd listen: File too large"; its source "the peer failed:
    # File too large".
    image = tmp_path / "ram.img"
    image.write_bytes(os.urandom(1 << 20) * 4)
    out = tmp_path / "out"
    with Listener(out, preexec_fn=_limit(resource.RLIMIT_FSIZE, 1 << 20)) as listener:
        sent = run_cli("send", listener.address, f"ram={image}", "-q")
        status, said = listener.finish()
    assert status == 1 and sent.returncode == 1, (status, said, sent.stderr)
    part = f"{out}/ram.img.part"
    why = (f"region 'ram': cannot extend {part} to 4.00 MiB: File too large (this process's "
           f"file-size limit is 1.00 MiB: RLIMIT_FSIZE, ulimit -f)")
    assert said.splitlines()[1:] == [f"fastmfd listen: {why}"], said
    assert why in sent.stderr, sent.stderr
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------- the OOM killer

def _memory_cgroup_for_tests(limit: int) -> str | None:
    """A new memory cgroup (v1 or v2) of ``limit`` bytes under this process's, or None
    where none can be made."""
    from fastmfd.shm import memory_cgroup
    cgroup = memory_cgroup()
    if cgroup is None or os.geteuid() != 0:
        return None
    path = f"{cgroup[0]}/fastmfd-test-{os.getpid()}"
    try:
        os.mkdir(path)
        with open(f"{path}/{cgroup[2]}", "w") as limit_file:
            limit_file.write(str(limit))
    except OSError:
        if os.path.isdir(path):
            os.rmdir(path)
        return None
    return path


@contextlib.contextmanager
def _in_a_memory_cgroup(limit: int = 150 * 10**6):
    """A new memory cgroup of ``limit`` bytes (``_memory_cgroup_for_tests``): yields
    (its directory, a preexec_fn that puts a child process in it); removed after."""
    cgroup = _memory_cgroup_for_tests(limit)
    if cgroup is None:
        pytest.skip("needs a memory cgroup of its own (root, cgroup v1 or v2 with memory)")

    def enter() -> None:
        with open(f"{cgroup}/cgroup.procs", "w") as procs:
            procs.write("0")
    try:
        yield cgroup, enter
    finally:
        for _ in range(100):            # once its last process left
            try:
                os.rmdir(cgroup)
                break
            except OSError:
                time.sleep(0.1)


# Times the OOM scenario is run when the kernel killed the listener's main process instead.
OOM_ATTEMPTS = 3


def _listen_in_a_full_cgroup(tmp_path: Path, image: Path
                             ) -> tuple[str, subprocess.Popen, str, subprocess.CompletedProcess]:
    """``send`` ``image`` to a ``listen --dir`` on a tmpfs, in a 150 MB memory cgroup
    the image does not fit in: (the cgroup, the listener, what it said, the send)."""
    with _in_a_memory_cgroup() as (cgroup, _):
        sock = tmp_path / "sock"
        listener = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             'echo $$ > "$1/cgroup.procs" && mount -t tmpfs -o size=1g tmpfs /mnt && exec "$2" '
             '-m fastmfd listen "unix:$3" --dir /mnt/out --timeout 60',
             "sh", cgroup, sys.executable, str(sock)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        try:
            for _ in range(600):
                if listens_at(sock) or listener.poll() is not None:
                    break
                time.sleep(0.05)
            sent = run_cli("send", f"unix:{sock}", f"ram={image}", "-q")
            _, said = listener.communicate(timeout=60)
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.communicate()
            sock.unlink(missing_ok=True)
    return cgroup, listener, said, sent


@needs_namespace
def test_a_worker_the_oom_killer_killed_is_said_so(tmp_path):
    """It said only "receive channel 0: the worker process was killed by SIGKILL".

    The region's tmpfs pages stay charged to the cgroup after the workers that wrote
    them are killed: the cgroup stays full, and the next allocation of any process of
    the listener's makes the kernel kill the largest one left, at times the listener's
    main process itself (1 run in 20-40 under load: it exited by SIGKILL, saying
    nothing, and its source heard only that the main channel closed). Which process
    the kernel picks is not fastmfd's to choose: that run is run again."""
    image = tmp_path / "ram.img"
    image.write_bytes(os.urandom(1 << 20) * 256)    # more than the cgroup's 150 MB
    for _ in range(OOM_ATTEMPTS):
        cgroup, listener, said, sent = _listen_in_a_full_cgroup(tmp_path, image)
        if listener.returncode != -signal.SIGKILL:
            break
    assert listener.returncode == 1 and sent.returncode == 1, (said, sent.stderr)
    killed = re.search(r"the worker process was killed by SIGKILL \(the kernel's out-of-memory "
                       rf"killer, it seems: {cgroup}/memory\.(events|oom_control) counted \d+ "
                       r"more OOM kill\(s\); the cgroup's memory limit is 143 MiB\)", said)
    assert killed, said
    assert killed.group(0) in sent.stderr, sent.stderr


def test_a_region_past_the_memory_cgroups_room_is_made_and_charged_as_written():
    """Region.create refused a 256 MiB region in a 150 MB cgroup, of which its user
    writes 4 MiB: a region is sparse, only written pages are charged (a review)."""
    code = ("import fastmfd\nwith fastmfd.Region.create('ram', 256 << 20) as ram:\n"
            "    ram.array[:4 << 20] = 7\n    print(int(ram.array[:4 << 20].sum()))\n")
    with _in_a_memory_cgroup() as (cgroup, enter):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=_env(), preexec_fn=enter, timeout=60)
    assert (done.returncode, done.stdout) == (0, f"{7 * (4 << 20)}\n"), done


# A destination in the test's cgroup: it says what its receive() said, and the log.
RECEIVE_IN_A_CGROUP = """if True:
    import logging, sys
    import fastmfd
    logging.basicConfig(format="LOG %(message)s")
    with fastmfd.Destination('tcp:127.0.0.1:0', timeout=30,
                             prealloc=sys.argv[1] == 'prealloc') as dst:
        print(dst.address, flush=True)
        try:
            dst.receive()
            print('received', flush=True)
        except fastmfd.MigrationError as exc:
            print(exc)
"""


def _send_in_a_cgroup(written: str, config: fastmfd.MigrationConfig):
    """A 256 MiB region of which 4 MiB are data, sent to a destination in a 150 MB
    cgroup (prealloc there where ``written`` says "prealloc"): (the cgroup, what the
    destination said, its log, the source's error or None)."""
    with _in_a_memory_cgroup() as (cgroup, enter), \
            fastmfd.Region.create("ram", 256 << 20) as ram:
        ram.array[:4 << 20] = 7
        dst = subprocess.Popen([sys.executable, "-c", RECEIVE_IN_A_CGROUP, written],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_env(), preexec_fn=enter)
        try:
            error = None
            try:
                with fastmfd.Source(dst.stdout.readline().strip(), config) as src:
                    src.add_region(ram)
                    src.migrate(live=False)
            except fastmfd.MigrationError as exc:
                error = str(exc)
            said, log = dst.communicate(timeout=60)
        finally:
            if dst.poll() is None:
                dst.kill()
                dst.communicate()
    return cgroup, said, log, error


def test_a_destination_takes_sparse_regions_past_its_memory_cgroups_room_with_a_warning():
    """A mostly zero image into a destination whose cgroup holds what is written
    (4 MiB of 256 MiB, a 150 MB cgroup) was refused up front (a review): only
    the pages that hold data are written, so it is taken, and a warning says the
    cgroup's room, past which the OOM killer would end the session."""
    cgroup, said, log, error = _send_in_a_cgroup("", fastmfd.MigrationConfig(channels=2))
    assert (said, error) == ("received\n", None), (said, log, error)
    warned = [line for line in log.splitlines() if line.startswith("LOG ")]
    assert len(warned) == 1 and re.fullmatch(
        rf"LOG the source sends {256 << 20} bytes of regions for this destination to hold, "
        rf"and this process's memory cgroup has \d+ bytes left \({cgroup}/"
        r"memory\.(limit_in_bytes|max) is 143 MiB, about [\d.]+ [KM]iB of it not "
        r"reclaimable\): enough while no more than that of them holds data \(zero pages "
        r"are not written\); past it the kernel's out-of-memory killer ends the session",
        warned[0]), log


@pytest.mark.parametrize("written", ["prealloc", "the source detects no zero page"])
def test_a_destination_refuses_regions_it_writes_whole_past_its_memory_cgroups_room(written):
    """Where every page of the regions will be written (prealloc faults them in, or
    the source sends zero pages as data), the OOM killer ended a receive worker
    mid-session ("killed by SIGKILL (the kernel's out-of-memory killer, it seems
    ..."): refused before anything is allocated, the source told why."""
    config = fastmfd.MigrationConfig(channels=2, zero_page_detection=written == "prealloc")
    cgroup, said, log, error = _send_in_a_cgroup(written, config)
    expected = (rf"the source sends {256 << 20} bytes of regions for this destination to hold, "
                rf"every page of them written \({written}\); it holds at most \d+ \(what this "
                rf"process's memory cgroup has left: {cgroup}/memory\.(limit_in_bytes|max) is "
                r"143 MiB, about [\d.]+ [KM]iB of it not reclaimable; past it the kernel's "
                r"out-of-memory killer would end the session\)")
    assert re.fullmatch(expected + "\n", said), (said, log)
    assert error is not None and re.search("the peer failed: " + expected, error), error


# Fills the cgroup (its first argument) with negative dentries, reclaimable kernel
# memory, up to 150 MB of usage, then says what cgroup_room finds left, and whether
# 64 MiB of shared memory, allocated, fits.
RECLAIMABLE = """if True:
    import os, sys, tempfile
    from fastmfd.shm import SharedMemory, cgroup_room
    usage = [f"{sys.argv[1]}/{name}" for name in ("memory.usage_in_bytes", "memory.current")
             if os.path.exists(f"{sys.argv[1]}/{name}")][0]
    directory, i = tempfile.mkdtemp(), 0
    while int(open(usage).read()) < 150 * 10**6 and i < 3_000_000:
        for i in range(i, i + 20000):
            try:
                os.stat(f"{directory}/missing-{i}")
            except FileNotFoundError:
                pass
        i += 1
    print(cgroup_room()[0] >> 20, flush=True)
    SharedMemory.create(64 << 20).close()
    os.rmdir(directory)     # (which frees its dentries)
    print("allocated")
"""


def test_reclaimable_kernel_memory_is_not_counted_as_in_use():
    """Dentries (a find, a build) count in a cgroup's usage, and cgroup_room took
    them as memory that cannot be freed: 46 MiB left of a 200 MB cgroup where 64
    MiB of shared memory fit, the kernel reclaiming them (a review)."""
    with _in_a_memory_cgroup(200 * 10**6) as (cgroup, enter):
        done = subprocess.run([sys.executable, "-c", RECLAIMABLE, cgroup], capture_output=True,
                              text=True, env=_env(), preexec_fn=enter, timeout=120)
    assert done.returncode == 0 and done.stdout.endswith("allocated\n"), done
    assert int(done.stdout.split()[0]) >= 64, done.stdout


MiB = 1 << 20


@pytest.mark.parametrize("limit_file, stat, usage", [
    ("memory.limit_in_bytes", {"total_cache": 900, "total_rss": 100, "total_inactive_file": 60,
                               "total_active_file": 40}, "memory.usage_in_bytes"),
    ("memory.max", {"file": 900, "anon": 100, "inactive_file": 60, "active_file": 40},
     "memory.current")], ids=["v1", "v2"])
def test_tmpfs_pages_are_counted_where_memory_stat_has_no_shmem_line(
        tmp_path, monkeypatch, limit_file, stat, usage):
    """Some kernels' memory.stat has no shmem line (v1's before it had one): 800
    MiB of tmpfs pages in a 1 GiB cgroup (a previous session's regions in
    /dev/shm) were counted as free, 924 MiB left; the OOM killer then ended a
    session they had let in (a review, D4). There what is used less the file
    LRUs is held. (A cgroup tree of files: this host's kernel has the line.)"""
    top = tmp_path / ("memory" if limit_file == "memory.limit_in_bytes" else "")
    cgroup = top / "box"
    cgroup.mkdir(parents=True)
    (cgroup / "memory.stat").write_text("".join(f"{key} {value * MiB}\n"
                                                for key, value in stat.items()))
    (cgroup / limit_file).write_text(f"{1024 * MiB}\n")
    (cgroup / usage).write_text(f"{1000 * MiB}\n")
    monkeypatch.setattr(shm, "_CGROUP_ROOT", str(tmp_path))
    monkeypatch.setattr(shm, "memory_cgroup", lambda: (str(cgroup), "", limit_file))
    assert shm.cgroup_room() == (124 * MiB, f"{cgroup}/{limit_file} is 1.00 GiB, about "
                                            f"900 MiB of it not reclaimable")


# ---------------------------------------------------------------- no temporary directory

# Every directory Python's tempfile would try read-only (the current one: /tmp).
NO_TEMP_DIR = ("for d in /tmp /var/tmp /usr/tmp; do [ -d $d ] && mount -t tmpfs -o ro tmpfs $d; "
               "done; mount -t tmpfs tmpfs /mnt && mkdir /mnt/out && truncate -s 1M /mnt/img "
               '&& cd /tmp && exec "$@"')


@needs_namespace
@pytest.mark.parametrize("command", [["listen", "tcp:127.0.0.1:0", "--dir", "/mnt/out"],
                                     ["send", "tcp:127.0.0.1:9", "ram=/mnt/img"]])
def test_no_temporary_directory_is_a_mistake_that_names_tmpdir(command):
    # It said "[Errno 2] No usable temporary directory found in ['/tmp', ...]", exit 1.
    env = {k: v for k, v in _env().items() if k not in ("TMPDIR", "TEMP", "TMP")}
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", NO_TEMP_DIR,
                           "sh", sys.executable, "-m", "fastmfd", *command],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert done.stderr == (f"fastmfd {command[0]}: no usable temporary directory (TMPDIR, "
                           f"/tmp, /var/tmp, /usr/tmp, the current directory: none writable): "
                           f"fastmfd's worker processes need one for multiprocessing's "
                           f"forkserver socket; set TMPDIR to a writable directory\n"), done.stderr
