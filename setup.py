"""Build and package jwth-engine.

The native module `jwth_engine._C` is built by CMake (CMakeLists.txt) through a `CMakeExtension`
with no sources and a `build_ext` that configures once and builds the target (the vLLM / cuCIM
pattern). Knobs are environment variables that become CMake options:

  JWTH_SKIP_CUDA=1        build the CPU kernels only, even if nvcc is found
  JWTH_CUDA_ARCHS="80;89;90"  compute capabilities: SASS for each, PTX for the highest
  JWTH_BUILD_TYPE=Release CMake build type (Debug, RelWithDebInfo, ...)
  JWTH_BUILD_JOBS=N       parallel compile jobs (default: CPU count; setup.py -j also works)
  CUDACXX / CUDA_HOME     which nvcc to use (default: $CUDA_HOME/bin, /usr/local/cuda/bin, PATH)
  JWTH_NVIMGCODEC_INCLUDE folder with nvimgcodec.h for the batch decoder (default: the installed
                          nvidia-nvimgcodec wheel's, a build requirement in pyproject.toml)

Development loop: `python setup.py build_ext --inplace` puts `_C*.so` into python/jwth_engine/ so
the tree runs with PYTHONPATH=python.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_namespace_packages, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "on", "true", "yes")


def _version() -> str:
    init = ROOT / "python" / "jwth_engine" / "__init__.py"
    if init.is_file():
        match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', init.read_text(), re.M)
        if match:
            return match.group(1)
    return "0.1.0"


class CMakeExtension(Extension):
    """An extension whose sources CMake knows; setuptools only learns its name."""

    def __init__(self, name: str, target: str, source_dir: Path = ROOT):
        super().__init__(name, sources=[])
        self.target = target
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    def _cmake(self) -> str:
        exe = shutil.which("cmake")
        if exe is None:
            try:  # the `cmake` wheel from the build requirements
                import cmake

                exe = str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
            except ImportError:
                raise RuntimeError("CMake >= 3.24 is needed to build jwth_engine._C: pip install cmake") from None
        return exe

    def _nvcc(self) -> str | None:
        if os.environ.get("CUDACXX"):
            return os.environ["CUDACXX"]
        for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if home and (Path(home) / "bin" / "nvcc").is_file():
                return str(Path(home) / "bin" / "nvcc")
        return shutil.which("nvcc")

    def _configure_args(self, extdir: Path) -> list[str]:
        import pybind11

        args = [
            f"-DCMAKE_BUILD_TYPE={os.environ.get('JWTH_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DJWTH_SKIP_CUDA={'ON' if _env_on('JWTH_SKIP_CUDA') else 'OFF'}",
            f"-DJWTH_CUDA_ARCHS={os.environ.get('JWTH_CUDA_ARCHS', '80;89;90')}",
        ]
        if os.environ.get("JWTH_NVIMGCODEC_INCLUDE"):
            args.append(f"-DJWTH_NVIMGCODEC_INCLUDE={os.environ['JWTH_NVIMGCODEC_INCLUDE']}")
        if not _env_on("JWTH_SKIP_CUDA"):
            nvcc = self._nvcc()
            if nvcc:
                args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        return args

    def build_extensions(self) -> None:
        cmake = self._cmake()
        # All extensions share one CMake tree (there is one today); the output folder is that of
        # the first, which is where --inplace or the wheel layout wants `jwth_engine/_C*.so`.
        extdir = Path(self.get_ext_fullpath(self.extensions[0].name)).resolve().parent
        extdir.mkdir(parents=True, exist_ok=True)
        args = self._configure_args(extdir)
        # One build folder per configuration: an in-tree `pip install .` (isolated Python, other
        # pybind11) must not reuse the dev build's CMake cache.
        key = hashlib.sha1("\0".join([cmake, *args]).encode()).hexdigest()[:10]
        build_dir = Path(self.build_temp).resolve() / f"cmake-{key}"
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("JWTH_BUILD_JOBS") or (self.parallel and str(self.parallel)) or str(os.cpu_count() or 1)
        for ext in self.extensions:
            subprocess.run([cmake, "--build", str(build_dir), "--target", ext.target, "-j", jobs], check=True)

    def build_extension(self, ext) -> None:  # everything happens in build_extensions
        raise NotImplementedError


setup(
    name="jwth-engine",
    version=_version(),
    description="Whole-slide-image scoring with ViT backbones and JWTH attention-pooling heads",
    python_requires=">=3.10",
    # engine/ (declarative JSON specs) ships as the data package jwth_engine._specs; its sub-folders
    # are listed too, or setuptools warns that they look importable but are not packaged.
    packages=find_packages("python") + ["jwth_engine._specs"]
    + [f"jwth_engine._specs.{sub}" for sub in find_namespace_packages(where=str(ROOT / "engine"))],
    package_dir={"": "python", "jwth_engine._specs": "engine"},
    package_data={"jwth_engine._specs": ["**/*.json"], "jwth_engine.outputs": ["templates/*.html"]},
    include_package_data=True,
    ext_modules=[CMakeExtension("jwth_engine._C", target="_C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
    install_requires=[
        "numpy",
        "torch>=2.4",
        "torchvision",
        "timm>=1.0.20",
        "safetensors",
        "pyarrow",
        "h5py",
        "click>=8",
        "rich",
        "scikit-image",
        "tifffile",
        "imagecodecs",
        "openslide-python",
        "openslide-bin",
        "onnx",
        "onnxruntime",
        "onnxscript",
        "psutil",
        "pillow",
        "matplotlib",
        "jinja2",
        "shapely>=2",
        "scipy",
    ],
    extras_require={
        # nvImageCodec decodes stored slide tiles (--decode gpu|cpu); its extras bring nvJPEG,
        # nvJPEG2000 and nvTIFF, which it loads at start-up (and complains about when missing).
        # <0.10: jwth_engine._C's batch decoder is built against the 0.9 C header (pyproject.toml).
        "cu12": ["cucim-cu12", "nvidia-nvimgcodec-cu12[all]>=0.9,<0.10"],
        "cu13": ["cucim-cu13", "nvidia-nvimgcodec-cu13[all]>=0.9,<0.10"],
        "test": ["pytest", "pytest-timeout", "ray[default]>=2.9"],
        "distributed": ["ray[default]>=2.9"],
        # Some TensorRT wheels live only on NVIDIA's own package index; if pip cannot resolve this
        # extra, add that index with --extra-index-url as TensorRT's install guide describes.
        "tensorrt": ["tensorrt-cu12"],
        # Everything the GPU tests need beyond `cu13`: ONNX Runtime's CUDA build and TensorRT for
        # CUDA 13. `JWTH_REQUIRE_GPU=1 pytest` then fails, instead of skipping, any test that lacks them.
        "gpu": ["cucim-cu13", "onnxruntime-gpu", "tensorrt-cu13"],
        # FP8 engines are built from an ONNX graph quantised by NVIDIA's Model Optimizer.
        "fp8": ["nvidia-modelopt[onnx]"],
    },
    entry_points={"console_scripts": ["jwth-engine = jwth_engine.cli:main"]},
)
