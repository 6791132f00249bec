"""Build fastdcgan: the Python package, its Triton kernels (installed as fastdcgan.kernels)
and the C++ extension fastdcgan._C (CPU always; CUDA sources when the build sees CUDA).

torch must already be installed: build with `pip install --no-build-isolation -e .`
(an isolated build environment would download a multi-GB CUDA torch).
"""
import glob
import importlib.util
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover - exercised only on a broken setup
    raise SystemExit(
        "fastdcgan's build needs torch installed first: "
        "pip install torch==2.13.0 && pip install --no-build-isolation -e ."
    ) from e

here = os.path.dirname(os.path.abspath(__file__))


# Files of the C++/CUDA extension. fastdcgan/_ext.py hashes the same set the same way and, when the
# source tree is present, refuses a build whose compiled-in hash differs (a stale extension).
def _load_source_hash():
    """fastdcgan/_source_hash.py, loaded by path: the package itself is not importable yet."""
    spec = importlib.util.spec_from_file_location(
        "_fastdcgan_source_hash", os.path.join(here, "fastdcgan", "_source_hash.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


csrc_source_hash = _load_source_hash().csrc_source_hash


def _want_cuda(cu):
    """CUDA sources are built when there are any, torch is a CUDA build and nvcc is found, and either a
    GPU is visible or FASTDCGAN_FORCE_CUDA=1 (e.g. building in a container without a GPU).
    FASTDCGAN_FORCE_CUDA=0 builds the CPU-only extension even on a GPU machine.
    The target GPUs come from TORCH_CUDA_ARCH_LIST (e.g. "9.0" for H100/H200), read by
    torch.utils.cpp_extension; unset, it builds for the visible GPUs."""
    force = os.environ.get("FASTDCGAN_FORCE_CUDA")
    if not cu or force == "0":
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        if force == "1":
            raise SystemExit("FASTDCGAN_FORCE_CUDA=1 but torch is a CPU build "
                             f"(torch {torch.__version__}) or nvcc was not found (CUDA_HOME unset)")
        return False
    return force == "1" or torch.cuda.is_available()


def extension_modules():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return []
    # csrc/cuda/: the kernels (*.cu, nvcc) and the host side of the CUDA ops (*.cpp, C++ compiler)
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    with_cuda = _want_cuda(cu)
    macros = [("FASTDCGAN_SOURCE_HASH", "h" + csrc_source_hash(here))]
    # -fno-math-errno lets GCC vectorise sqrtf/fmaf; -ffp-contract=off: no implicit FMA contraction,
    # the Adam update has its fused multiply-adds exactly where torch.optim.Adam's CPU kernels do.
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-fdiagnostics-color=always"]
    print(f"fastdcgan: building fastdcgan._C with {'CPU + CUDA' if with_cuda else 'CPU only'} ops"
          + (f" (TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<visible GPUs>')})"
             if with_cuda else ""))
    if with_cuda:
        return [
            CUDAExtension(
                "fastdcgan._C",
                cpp + cu,
                define_macros=macros + [("FASTDCGAN_WITH_CUDA", None)],
                # no --use_fast_math: the Adam/BCE kernels are memory-bound and keep IEEE sqrt/div/exp.
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
                extra_link_args=["-fopenmp"],
                py_limited_api=False,
            )
        ]
    return [CppExtension("fastdcgan._C", cpp, define_macros=macros, extra_compile_args=cxx,
                         extra_link_args=["-fopenmp"])]


setup(
    name="fastdcgan",
    version="0.1.0",
    description="DCGAN face generator trained through fused Triton kernels and a C++ extension",
    python_requires=">=3.10",
    packages=["fastdcgan", "fastdcgan.data", "fastdcgan.kernels"],
    package_dir={"fastdcgan.kernels": "kernels"},
    package_data={"fastdcgan.kernels": ["tiles.json"]},
    install_requires=["torch>=2.4", "triton>=3.2", "numpy", "pillow", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "pytest-benchmark", "scipy"]},
    ext_modules=extension_modules(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
