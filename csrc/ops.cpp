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
  // x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; eps from noise or Philox stream 1.  Returns
  // (x_t, eps), eps empty unless return_noise.  table: the schedule's float32 [rows, T] table.
  // rng: an int64 [2] tensor (seed bits, sample_offset) on x's device that, when given, the kernel
  // reads in place of seed and sample_offset, so a captured CUDA graph replays with new values.
  m.def("q_sample(Tensor x0, Tensor t, Tensor table, Tensor? noise, int seed, int sample_offset, Tensor? rng, "
        "bool return_noise, bool channels_last) -> (Tensor, Tensor)");
  // One reverse step (csrc/include/ddpm_fast/step.h); noise from `noise` or Philox stream 0.
  // prediction 0 eps / 1 sample / 2 v; variance 0 fixed_small / 1 fixed_large / 2 learned_range;
  // form 0 posterior / 1 eps (Algorithm 2).
  m.def("p_step(Tensor x_t, Tensor model_output, Tensor t, Tensor table, Tensor? noise, int seed, "
        "int sample_offset, Tensor? rng, int prediction, int variance, int form, bool clip_sample, "
        "float clip_range, bool channels_last) -> Tensor");
  // One Picard iteration of parallel sampling (ddpm_fast/reference/picard.py): x [A, P + 1, C, ...]
  // window states, model_output [A, P, C', ...], t int64 [A, P] (negative: past the last step),
  // sample int64 [A] each image's global index.  Returns (x' like x, err float32 [A, P]).
  m.def("picard_step(Tensor x, Tensor model_output, Tensor t, Tensor table, Tensor sample, int seed, "
        "int prediction, int variance, int form, bool clip_sample, float clip_range) -> (Tensor, Tensor)");
  // y = act(GN(x + add) * (1 + scale) + shift); weight, bias [C] and add, scale, shift [B, C], each
  // float32 or x's dtype.
  // Returns (y, mean, rstd): float32 [B, G] statistics of x + add for the backward, the mean taken
  // relative to the group's pivot, one of its values (csrc/include/ddpm_fast/group_norm.h).
  m.def("group_norm(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, Tensor? add, "
        "Tensor? scale, Tensor? shift, bool silu, bool channels_last) -> (Tensor, Tensor, Tensor)");
  // Its backward (csrc/include/ddpm_fast/group_norm.h): (dx, sums), sums float32 [4, B, C] holding
  // per (sample, channel) S1 = sum dz, S2 = sum dz xhat, S3 = sum xhat and the add's gradient, from
  // which ops.py forms the gradients of weight, bias, scale and shift.  dy in x's dtype and layout; the parameters in
  // float32 (the CUDA backward reads them in its hot loop).
  m.def("group_norm_backward(Tensor dy, Tensor x, Tensor mean, Tensor rstd, int num_groups, Tensor? weight, "
        "Tensor? bias, Tensor? add, Tensor? scale, Tensor? shift, bool silu, bool channels_last) -> (Tensor, Tensor)");
  // softmax(q k^T * scale) v on q [B, h, Lq, d], k and v [B, h, Lk, d] of any strides; the
  // result is contiguous.  CUDA only (fp16/bf16 on tensor cores, d <= 256).
  m.def("attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
}
