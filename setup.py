"""Builds grass_kernels._C from csrc/: C++/OpenMP kernels always, CUDA kernels when torch has
CUDA and nvcc is found (set GRASS_KERNELS_CPU_ONLY=1 to skip them).

Install into an environment that already has torch, without build isolation (torch is not a
build requirement, so the build uses the torch you run):
    pip install --no-build-isolation -e .
"""

import glob
import os
import shutil

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

import torch


def _with_cuda() -> bool:
    if os.environ.get("GRASS_KERNELS_CPU_ONLY") == "1":
        return False
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    return torch.version.cuda is not None and bool(nvcc) and os.path.exists(nvcc)


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]
    if os.environ.get("GRASS_KERNELS_PORTABLE") != "1":
        cxx.append("-march=native")  # built from source on the machine that runs it
    macros = [("GRASS_PYTHON_MODULE", None)]
    kwargs = dict(
        name="grass_kernels._C",
        include_dirs=[os.path.abspath("csrc")],
        extra_link_args=["-fopenmp"],
        define_macros=macros,
    )
    if not _with_cuda():
        return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    macros.append(("GRASS_WITH_CUDA", None))
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        sources=sources + sorted(glob.glob("csrc/cuda/*.cu")),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        **kwargs,
    )


setup(
    packages=find_packages(include=["grass_kernels", "grass_kernels.*"])
    + find_packages("python"),
    package_dir={"grass": "python/grass"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
