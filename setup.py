"""Build the Cython core, ``fastmfd._core``.

The core links two system compression libraries directly so send and receive
workers can compress from, and decompress into, region pages without Python
objects in between: libz, whose header ``zlib.h`` must be installed
(``zlib1g-dev`` on Debian and Ubuntu: the build checks first and says so), and
libzstd. Debian ships ``libzstd.so.1`` as part of the base system but its
header only in ``libzstd-dev``; ``includes/zstd_stable.h`` declares the stable
streaming API when ``zstd.h`` is absent, so linking the runtime library by
file name is enough.

OpenSSL 3 (libssl, libcrypto) is linked the same way for the TLS transport:
``includes/openssl_stable.h`` uses the ``libssl-dev`` headers when they are
installed and otherwise declares the OpenSSL 3.0 ABI subset the core calls
(build with ``CFLAGS=-DFASTMFD_NO_OPENSSL_HEADERS`` to use that fallback even
where the headers exist).
"""

import glob
import os
import shlex
import subprocess
import sysconfig

from Cython.Build import cythonize
from setuptools import Extension, setup


def _find_library(names, package):
    """The path of the first of ``names`` (file names, in order of preference)
    found in the usual library directories."""
    libdirs = [sysconfig.get_config_var("LIBDIR") or "", "/usr/lib", "/usr/local/lib",
               "/lib", "/usr/lib64", "/lib64"]
    libdirs += glob.glob("/usr/lib/*-linux-gnu") + glob.glob("/lib/*-linux-gnu")
    for name in names:
        for d in libdirs:
            path = os.path.join(d, name)
            if os.path.exists(path):
                return path
    raise SystemExit(f"fastmfd needs {names[0].split('.so')[0]} ({package}); "
                     "it was not found in the usual library directories")


def _require_header(header, packages):
    """Stop the build, saying what to install, unless the C compiler finds ``header``
    (a preprocessor run: the compiler's own search path, CFLAGS and CPATH count)."""
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    cflags = shlex.split(os.environ.get("CFLAGS", ""))
    try:
        done = subprocess.run(cc + cflags + ["-E", "-x", "c", "-", "-o", os.devnull],
                              input=f"#include <{header}>\n", capture_output=True, text=True)
    except OSError as exc:
        raise SystemExit(f"fastmfd needs a C compiler to build ({cc[0]}: {exc.strerror})")
    if done.returncode != 0:
        raise SystemExit(f"fastmfd needs {header} to build; install {packages} "
                         f"(or install a binary wheel, which needs none)")


_require_header("zlib.h", "zlib's header (Debian/Ubuntu: zlib1g-dev, Fedora: zlib-devel)")


# OpenSSL: the 3.x runtime first, the ABI includes/openssl_stable.h declares.
OPENSSL_PACKAGES = "OpenSSL 3; Debian/Ubuntu: libssl3, Fedora: openssl-libs"
LIBRARIES = [
    _find_library(("libzstd.so", "libzstd.so.1"), "Debian/Ubuntu: libzstd1, Fedora: libzstd"),
    _find_library(("libssl.so.3", "libssl.so"), OPENSSL_PACKAGES),
    _find_library(("libcrypto.so.3", "libcrypto.so"), OPENSSL_PACKAGES),
]


extension = Extension(
    "fastmfd._core",
    sources=["fastmfd/_core.pyx"],
    include_dirs=["fastmfd/includes"],
    libraries=["z"],
    extra_link_args=LIBRARIES,
    extra_compile_args=["-O2", "-fno-strict-aliasing", "-Wno-unused-function"],
)

setup(
    ext_modules=cythonize(
        [extension],
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    ),
)
