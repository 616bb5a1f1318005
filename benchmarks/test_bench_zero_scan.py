"""How fast does the core find zero pages? (target: >= 10 GB/s; memcpy here is ~13 GB/s)

The worst case for a zero-page scan is a buffer of all-zero pages: every
byte must be read. The buffer is written first, so its pages are real
memory, not the kernel's shared zero page. References on the same buffer:
numpy's ``any()`` (a vectorised OR-reduction) and a ``memcpy`` of it (the
bandwidth ceiling).
"""

import numpy as np
import pytest

from fastmfd._core import find_zero_pages, is_zero

PAGE = 4096


@pytest.fixture(scope="module")
def zero_pages(sizes):
    buf = np.empty(sizes.scan_bytes, dtype=np.uint8)
    buf.fill(0)         # fault every page in: untouched pages all read the shared zero page
    return buf


@pytest.fixture(scope="module")
def copy_target(sizes):
    buf = np.empty(sizes.scan_bytes, dtype=np.uint8)
    buf.fill(1)
    return buf


def zero_page_count(buf, _):
    return len(find_zero_pages(buf, PAGE))


def whole_buffer_is_zero(buf, _):
    return is_zero(buf)


def numpy_all_zero(buf, _):
    return not buf.any()


def copy(buf, target):
    np.copyto(target, buf)
    return target[::PAGE].any() or target[-1]


# scan -> (function, its result on the all-zero buffer, its result with one byte set)
SCANS = {
    "find_zero_pages": (zero_page_count, lambda n: n // PAGE, lambda n: n // PAGE - 1),
    "is_zero": (whole_buffer_is_zero, lambda n: True, lambda n: False),
    "numpy-any": (numpy_all_zero, lambda n: True, lambda n: False),
    "memcpy": (copy, lambda n: 0, lambda n: 1),
}


@pytest.mark.benchmark(group="zero-page scan (all zero)")
@pytest.mark.parametrize("scan", list(SCANS))
def test_zero_page_scan(benchmark, report_throughput, zero_pages, copy_target, scan):
    run, all_zero, one_set = SCANS[scan]
    size = zero_pages.size
    # Correct first: the all-zero result, and a single set byte is seen.
    zero_pages[size - 1] = 1
    assert run(zero_pages, copy_target) == one_set(size)
    zero_pages[size - 1] = 0
    assert run(zero_pages, copy_target) == all_zero(size)
    benchmark.extra_info["pages"] = size // PAGE
    benchmark.pedantic(run, args=(zero_pages, copy_target), rounds=10, warmup_rounds=1)
    report_throughput(size)
