"""Build fastdcgan: the Python package, its Triton kernels (installed as fastdcgan.kernels)
and the C++ extension fastdcgan._C (CPU always; CUDA sources when the build sees CUDA).

torch must already be installed: build with `pip install --no-build-isolation -e .`
(an isolated build environment would download a multi-GB CUDA torch).
"""
import glob
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


def extension_modules():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return []
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    with_cuda = bool(cu) and torch.cuda.is_available() or os.environ.get("FASTDCGAN_FORCE_CUDA") == "1"
    with_cuda = with_cuda and CUDA_HOME is not None and torch.version.cuda is not None
    cxx = ["-O3", "-fdiagnostics-color=always"]
    if with_cuda:
        return [
            CUDAExtension(
                "fastdcgan._C",
                cpp + cu,
                define_macros=[("FASTDCGAN_WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
                py_limited_api=False,
            )
        ]
    return [CppExtension("fastdcgan._C", cpp, extra_compile_args={"cxx": cxx + ["-fopenmp"]},
                         extra_link_args=["-fopenmp"])]


setup(
    name="fastdcgan",
    version="0.1.0",
    description="DCGAN face generator trained through fused Triton kernels and a C++ extension",
    python_requires=">=3.10",
    packages=["fastdcgan", "fastdcgan.data", "fastdcgan.kernels"],
    package_dir={"fastdcgan.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton>=3.2", "numpy", "pillow", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "pytest-benchmark", "scipy"]},
    ext_modules=extension_modules(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
