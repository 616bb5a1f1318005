"""Build the Cython core, ``fastmfd._core``.

The core links two system compression libraries directly so send and receive
workers can compress from, and decompress into, region pages without Python
objects in between: libz (headers are always present where Python builds) and
libzstd. Debian ships ``libzstd.so.1`` as part of the base system but its
header only in ``libzstd-dev``; ``includes/zstd_stable.h`` declares the stable
streaming API when ``zstd.h`` is absent, so linking the runtime library by
file name is enough.
"""

import glob
import os
import sysconfig

from Cython.Build import cythonize
from setuptools import Extension, setup


def _find_libzstd():
    libdirs = [sysconfig.get_config_var("LIBDIR") or "", "/usr/lib", "/usr/local/lib",
               "/lib", "/usr/lib64", "/lib64"]
    libdirs += glob.glob("/usr/lib/*-linux-gnu") + glob.glob("/lib/*-linux-gnu")
    for name in ("libzstd.so", "libzstd.so.1"):
        for d in libdirs:
            path = os.path.join(d, name)
            if os.path.exists(path):
                return path
    raise SystemExit("fastmfd needs libzstd (Debian/Ubuntu: libzstd1, Fedora: libzstd); "
                     "it was not found in the usual library directories")


extension = Extension(
    "fastmfd._core",
    sources=["fastmfd/_core.pyx"],
    include_dirs=["fastmfd/includes"],
    libraries=["z"],
    extra_link_args=[_find_libzstd()],
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
