"""Build of cpool's C extension `cpool._core`: plain-C core in src/core, Python bindings in src/.

Switches read from the environment (as msgspec and psutil do):
  CPOOL_WERROR=1    warnings are errors (CI)
  CPOOL_SANITIZE=1  AddressSanitizer + UndefinedBehaviorSanitizer build (run with LD_PRELOAD of libasan)
  CPOOL_DEBUG=1     -O0 -g3, asserts on
"""
import glob
import os

from setuptools import Extension, setup


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


extra_compile = ["-std=gnu11", "-fvisibility=hidden", "-Wall", "-Wextra",
                 "-Wno-missing-field-initializers", "-Wno-unused-parameter"]
# Symbols bound at load time: with lazy binding every forked child would resolve (and write a
# copy-on-write page for) each libc/Python function it calls first, again in every child.
extra_link = ["-Wl,-z,now"]
undef = []
if _flag("CPOOL_WERROR"):
    extra_compile.append("-Werror")
if _flag("CPOOL_DEBUG") or _flag("CPOOL_SANITIZE"):
    extra_compile += ["-O0", "-g3", "-fno-omit-frame-pointer"]
    undef.append("NDEBUG")
else:
    extra_compile.append("-O2")
if _flag("CPOOL_SANITIZE"):
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    extra_compile += san
    extra_link += san

sources = sorted(glob.glob("src/core/*.c")) + sorted(glob.glob("src/*.c"))

setup(
    ext_modules=[
        Extension(
            "cpool._core",
            sources=sources,
            include_dirs=["src", "src/core"],
            depends=sorted(glob.glob("src/**/*.h", recursive=True)),
            extra_compile_args=extra_compile,
            extra_link_args=extra_link,
            undef_macros=undef,
        )
    ],
)
