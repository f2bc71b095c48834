"""Build only the pybind11 extension ``sglp_fast._fisher`` (C++17, -O3) through ninja.

Everything else (metadata, packages, scripts) lives in pyproject.toml. setuptools compiles
extensions one file at a time with its own driver; we write a tiny build.ninja instead so that
incremental rebuilds and parallel compiles come from ninja, as the design asks.
"""
from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CPP_SOURCES = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))


def _ninja_executable() -> str:
    exe = shutil.which("ninja")
    if exe is None:
        try:
            import ninja  # the PyPI wheel ships the binary

            exe = os.path.join(ninja.BIN_DIR, "ninja")
        except ImportError as exc:  # pragma: no cover - build requirement
            raise RuntimeError(
                "building sglp_fast._fisher needs ninja: `pip install ninja` (it is a build requirement "
                "in pyproject.toml, so a normal `pip install .` brings it)"
            ) from exc
    return exe


def _quote(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


class NinjaBuildExt(build_ext):
    """Compile each extension's sources with ninja, using the compiler setuptools configured."""

    def build_extension(self, ext):  # noqa: D401 - setuptools hook
        cc = list(getattr(self.compiler, "compiler_so_cxx", None) or self.compiler.compiler_so)
        # link with the C++ driver so libstdc++ comes along (linker_so is the C driver on Linux)
        linker = list(getattr(self.compiler, "linker_so_cxx", None) or [])
        if not linker:
            linker = [self.compiler.compiler_cxx[0], *self.compiler.linker_so[1:]]
        build_dir = os.path.abspath(os.path.join(self.build_temp, ext.name.replace(".", "_")))
        os.makedirs(build_dir, exist_ok=True)
        out_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        os.makedirs(os.path.dirname(out_path), exist_ok=True)

        includes = [f"-I{d}" for d in ext.include_dirs + [sysconfig.get_paths()["include"]]]
        macros = [f"-D{k}={v}" if v is not None else f"-D{k}" for k, v in ext.define_macros]
        cflags = includes + macros + list(ext.extra_compile_args)
        lines = [
            "ninja_required_version = 1.3",
            f"cflags = {_quote(cflags)}",
            f"rule cxx\n  command = {_quote(cc)} -MMD -MF $out.d $cflags -c $in -o $out\n  depfile = $out.d\n  deps = gcc",
            f"rule link\n  command = {_quote(linker)} $in -o $out {_quote(list(ext.extra_link_args))}",
        ]
        objects = []
        for src in ext.sources:
            obj = os.path.join(build_dir, os.path.basename(src) + ".o")
            objects.append(obj)
            lines.append(f"build {obj}: cxx {os.path.join(HERE, src)}")
        lines.append(f"build {out_path}: link {' '.join(objects)}")
        lines.append(f"default {out_path}")
        with open(os.path.join(build_dir, "build.ninja"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
        cmd = [_ninja_executable(), "-C", build_dir]
        if self.verbose:
            cmd.append("-v")
        subprocess.run(cmd, check=True)


ext_modules = [
    Pybind11Extension(
        "sglp_fast._fisher",
        CPP_SOURCES,
        cxx_std=17,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=["-O3", "-fvisibility=hidden"],
        extra_link_args=["-pthread"] if sys.platform.startswith("linux") else [],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": NinjaBuildExt})
