"""Build script: maps the three top-level folders under the ``tensorbus``
import root and compiles the Cython core.

Cython resolves ``cimport tensorbus._core.x`` by looking for
``tensorbus/_core/x.pxd`` on its include path, but the sources live in
``_core/``. A generated include directory with a ``tensorbus/_core`` link to
the real folder lets the core's modules cimport each other by their
installed names without committing a symlink or generated C.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CORE = os.path.join(HERE, "_core")


def cython_include_dir() -> str:
    root = os.path.join(HERE, "build", "cython-include")
    pkg = os.path.join(root, "tensorbus")
    os.makedirs(pkg, exist_ok=True)
    open(os.path.join(pkg, "__init__.pxd"), "a").close()
    link = os.path.join(pkg, "_core")
    if os.path.islink(link) and os.readlink(link) != CORE:
        os.unlink(link)
    if not os.path.lexists(link):
        os.symlink(CORE, link)
    return root


def core_extension(name: str) -> Extension:
    return Extension(
        f"tensorbus._core.{name}",
        [f"_core/{name}.pyx"],
        include_dirs=["_core"],
        extra_compile_args=["-O2", "-std=gnu11", "-Wno-unused-function"],
        libraries=["rt", "pthread"],
    )


CORE_MODULES = (
    "segment",
    "wait",
    "bells",
    "arena",
    "ring",
    "ring_stats",
    "slot_flags",
    "publisher",
    "subscriber",
    "message",
    "ringset",
    "offsets",
    "link_codec",
)
extensions = [core_extension(n) for n in CORE_MODULES]

setup(
    packages=["tensorbus", "tensorbus._core", "tensorbus.broker", "tensorbus.clients"],
    package_dir={
        "tensorbus": "tensorbus",
        "tensorbus._core": "_core",
        "tensorbus.broker": "broker",
        "tensorbus.clients": "clients",
    },
    ext_modules=cythonize(
        extensions,
        include_path=[cython_include_dir()],
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    ),
    zip_safe=False,
)
