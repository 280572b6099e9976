// The Python module ddpm_fast._C: importing it registers the ops (csrc/ops.cpp) and it
// reports how it was built.
#include <torch/extension.h>

#include <string>

#include "ddpm_fast_sources.h"  // DDPM_FAST_SOURCES, written by setup.py (ddpm_fast/_sources.py)

#ifdef DDPM_FAST_WITH_CUDA
namespace ddpm_fast {
std::string cuda_arch_list();
int cuda_compiler_version();
}  // namespace ddpm_fast
#endif

static pybind11::dict build_info() {
  pybind11::dict info;
#ifdef DDPM_FAST_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = ddpm_fast::cuda_arch_list();
  const int v = ddpm_fast::cuda_compiler_version();
  info["cuda_version"] = std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
  info["cuda_version"] = pybind11::none();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["torch"] = TORCH_VERSION;
  info["sources"] = DDPM_FAST_SOURCES;
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &build_info, "How this extension was built: CUDA, OpenMP, torch, the sources' digest.");
}
