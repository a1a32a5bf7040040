"""Build the compiled hot path (``geotarget._kernels``, ``_array_kernels``, ``_refresh_kernels``, ``_store_kernels``).

OpenMP is used when the compiler supports it.  ``GEOTARGET_OPENMP=0`` turns it
off; the kernels then run single-threaded but give identical results.

The four modules are translated by Cython and compiled side by side, one job per
CPU (``GEOTARGET_BUILD_JOBS=N`` overrides it): ``pip install .`` passes no ``-j``,
and compiling them one after another left a core idle for most of the install.
"""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _jobs():
    env = os.environ.get("GEOTARGET_BUILD_JOBS", "").strip()
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class ParallelBuildExt(build_ext):
    """``build_ext`` that compiles the extensions in parallel unless ``-j`` says otherwise."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            self.parallel = _jobs()


def _openmp_flags():
    if os.environ.get("GEOTARGET_OPENMP", "1").strip().lower() in ("0", "no", "off", "false"):
        return [], []
    cc = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cc is None:
        return [], []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as fh:
            fh.write("#include <omp.h>\nint main(){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        try:
            proc = subprocess.run([cc, "-fopenmp", src, "-o", os.path.join(tmp, "probe")],
                                  capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return [], []
        if proc.returncode != 0:
            print("geotarget: compiler has no OpenMP; building single-threaded kernels", file=sys.stderr)
            return [], []
    return ["-fopenmp"], ["-fopenmp"]


omp_compile, omp_link = _openmp_flags()

def _extension(name):
    return Extension(
        f"geotarget.{name}",
        [f"geotarget/{name}.pyx"],
        language="c++",
        include_dirs=[np.get_include(), "geotarget/src"],  # the kernels' C++ headers
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3", "-std=c++17", "-fno-math-errno", "-pthread"] + omp_compile,
        extra_link_args=["-pthread"] + omp_link,  # gt_pool.hpp's helper threads
    )


# _kernels: the index build and query; _array_kernels: gathers, sorts and runs of keys;
# _refresh_kernels: re-targeting changed devices, roaring ranges; _store_kernels: id lookups
# and merges for generations.  _geom.pxd holds what they share.
extensions = [_extension(name) for name in ("_kernels", "_array_kernels", "_refresh_kernels", "_store_kernels")]

setup(
    cmdclass={"build_ext": ParallelBuildExt},
    ext_modules=cythonize(
        extensions,
        nthreads=_jobs(),
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
