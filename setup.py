"""Build flowkern._C (design.md section 4).

FLOWKERN_BUILD_EXT=auto (default): C++ CPU kernels whenever torch imports; CUDA kernels added
when torch has CUDA and nvcc is found. 0: pure Python. 1: fail unless the extension builds.
Honours TORCH_CUDA_ARCH_LIST (Hopper: 9.0a), MAX_JOBS (ninja) and NVCC_THREADS.
Install with `pip install --no-build-isolation -e .` so the extension links the torch you have.
"""

import glob
import os
import platform
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("FLOWKERN_BUILD_EXT", "auto").lower()
if MODE not in ("0", "1", "auto"):
    sys.exit(f"FLOWKERN_BUILD_EXT must be 0, 1 or auto, got {MODE!r}")


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _cuda_arch_list(torch):
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    archs = set()
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            archs.add(f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else ""))
    return ";".join(sorted(archs)) or "8.0+PTX;9.0a"


def extension_modules():
    if MODE == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        if MODE == "1":
            raise
        print(f"flowkern: torch not importable ({exc}); building pure Python", file=sys.stderr)
        return [], {}

    # the ops' argument structs, generated from their schemas (flowkern/ops/<op>/__init__.py: SCHEMA)
    generated = os.path.join(HERE, "build", "generated")
    sys.path.insert(0, os.path.join(HERE, "csrc"))
    import gen_op_args

    gen_op_args.generate(generated)
    # csrc/*.cpp: the library, shared helpers, autograd; flowkern/ops/<op>/{op,cpu}.cpp: each op's registration and CPU
    # kernel
    sources = _rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    sources += _rel(glob.glob(os.path.join(HERE, "flowkern", "ops", "*", "*.cpp")))
    include_dirs = [os.path.join(HERE, "csrc", "include"), os.path.join(HERE, "csrc"), generated]
    cxx_flags = ["-O3", "-std=c++20"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        # ATen's Vectorized<float> is scalar unless a CPU capability is defined. AVX2 covers every
        # x86-64 CPU of the last decade; flowkern/ops/backend.py refuses to load _C on CPUs without it.
        cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    nvcc_found = CUDA_HOME is not None and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is not None
    with_cuda = torch.version.cuda is not None and nvcc_found
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch_list(torch)
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        nvcc_flags += ["--threads", os.environ.get("NVCC_THREADS", "4")]
        ext = CUDAExtension(
            "flowkern._C",
            sources
            + _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
            + _rel(glob.glob(os.path.join(HERE, "flowkern", "ops", "*", "cuda.cu"))),
            include_dirs=include_dirs,
            define_macros=[("FLOWKERN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags + ["-DFLOWKERN_WITH_CUDA"], "nvcc": nvcc_flags},
        )
    else:
        ext = CppExtension("flowkern._C", sources, include_dirs=include_dirs, extra_compile_args=cxx_flags)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
