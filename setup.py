"""Builds ddpm_fast._C from csrc/.

A CUDAExtension when a CUDA toolkit and a CUDA build of torch are both present (archs
from TORCH_CUDA_ARCH_LIST, default sm_80 and sm_90 plus sm_90 PTX), else a CppExtension.
DDPM_FAST_NO_EXT=1 skips the extension (the package then runs on the reference backend);
DDPM_FAST_NO_CUDA=1 forces a CPU-only build.  Always install with --no-build-isolation so
the extension is built against the torch that will import it.
"""

import glob
import importlib.util
import os
import sys

from setuptools import setup

DEFAULT_ARCHS = "8.0;9.0+PTX"


def write_sources_header(here):
    """build/generated/ddpm_fast_sources.h: the digest of the sources (ddpm_fast/_sources.py), which
    build_info() reports.  Rewritten only when it changes, so ninja recompiles module.cpp alone."""
    spec = importlib.util.spec_from_file_location("_sources", os.path.join(here, "ddpm_fast", "_sources.py"))
    sources = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sources)
    text = f'#define DDPM_FAST_SOURCES "{sources.digest(here)}"\n'
    generated = os.path.join(here, "build", "generated")
    header = os.path.join(generated, "ddpm_fast_sources.h")
    os.makedirs(generated, exist_ok=True)
    if not os.path.exists(header) or open(header).read() != text:
        with open(header, "w") as f:
            f.write(text)
    return generated


def extension_modules():
    if os.environ.get("DDPM_FAST_NO_EXT") == "1":
        return [], {}
    # torch finds CUDA_HOME from nvcc on PATH; a wrapper script there (/usr/local/bin/nvcc) would
    # make it /usr/local, so prefer the toolkit's usual home when CUDA_HOME is unset.
    if "CUDA_HOME" not in os.environ and os.path.isfile("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils import cpp_extension as ce

    here = os.path.dirname(os.path.abspath(__file__))
    include = os.path.join(here, "csrc", "include")
    generated = write_sources_header(here)
    cpu_sources = ["csrc/ops.cpp", "csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No errno from sqrtf and no FP-trap semantics: neither changes a result, and without them GCC
    # will not vectorise the CPU kernels' sqrt and branch-free selects.  No FMA contraction: the
    # AVX-512 clones of the hot loops would fuse a * b + c where the AVX2 and baseline ones cannot,
    # and every CPU must draw the same noise bits.
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    with_cuda = (torch.version.cuda is not None and ce.CUDA_HOME is not None
                 and os.environ.get("DDPM_FAST_NO_CUDA") != "1")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        ext = ce.CUDAExtension(
            "ddpm_fast._C",
            cpu_sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=[include, generated],
            define_macros=[("DDPM_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = ce.CppExtension("ddpm_fast._C", cpu_sources, include_dirs=[include, generated],
                              extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{'cuda' if with_cuda else 'cpu'}"

    class BuildExtension(ce.BuildExtension.with_options(use_ninja=True)):
        # pip builds an editable install in a throw-away directory; objects kept under build/ let
        # ninja recompile only what changed, so a second `pip install -e .` only relinks.
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(here, "build", f"temp-{tag}")

    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
