// The schemas of every ddpm_fast op, in one place.  Backends register implementations
// with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta) kernels live in
// ddpm_fast/_ops_meta.py so the ops trace under torch.compile.
#include <torch/library.h>

TORCH_LIBRARY(ddpm_fast, m) {
  // Normals [B, *sample_shape] under the noise contract; t: int64 [B] per-sample timesteps.
  // seed is the uint64 seed's bits reinterpreted as int64.
  m.def("philox_randn(Tensor t, int[] sample_shape, int seed, int stream, int sample_offset, "
        "ScalarType dtype) -> Tensor");
  // Raw Philox4x32-10 words: counter int64 [N, 4], key int64 [N, 2], each holding uint32.
  m.def("philox4x32(Tensor counter, Tensor key) -> Tensor");
}
