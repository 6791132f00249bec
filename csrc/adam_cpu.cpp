// CPU implementation of fastdcgan::adam_step: one pass over the flat buffers, split across threads
// with at::parallel_for, each thread's chunk vectorised.
//
// Vectorisation: extension sources are compiled for the baseline x86-64 ISA, where
// at::vec::Vectorized<float> falls back to its generic (scalar-array) implementation; ATen itself
// gets AVX2/AVX-512 by compiling each kernel once per CPU capability, which setuptools cannot do
// per file. So the chunk loop is a plain restrict-qualified loop (no calls but sqrtf, with
// -fno-math-errno) that GCC vectorises, cloned per ISA with target_clones and picked at load time
// (ifunc). The clones contain only this leaf loop, so no header code is compiled for AVX in this
// library (no ODR mixing of ISA variants).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fastdcgan.h"

namespace fastdcgan {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FASTDCGAN_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTDCGAN_ISA_CLONES
#endif

// kCopy: also write the updated parameters as bf16 bit patterns to c.
template <bool kWeightDecay, bool kCopy>
FASTDCGAN_ISA_CLONES __attribute__((noinline)) void adam_chunk(
    float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
    uint16_t* __restrict c, int64_t n, const AdamScalars s) {
  for (int64_t i = 0; i < n; ++i) {
    float pi = p[i], mi = m[i], vi = v[i];
    adam_element<kWeightDecay>(pi, g[i], mi, vi, s);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (kCopy) c[i] = bf16_bits(pi);
  }
}

template <bool kWeightDecay>
void adam_chunk_of(float* p, const float* g, float* m, float* v, uint16_t* c, int64_t n,
                   const AdamScalars& s) {
  if (c != nullptr)
    adam_chunk<kWeightDecay, true>(p, g, m, v, c, n, s);
  else
    adam_chunk<kWeightDecay, false>(p, g, m, v, c, n, s);
}

void adam_step_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                   at::Tensor& exp_avg_sq, at::Tensor& step, double lr, double beta1, double beta2,
                   double eps, double weight_decay, const std::optional<at::Tensor>& sync,
                   const std::optional<at::Tensor>& param_copy) {
  check_adam_args(param, grad, exp_avg, exp_avg_sq, step, sync, param_copy);
  TORCH_INTERNAL_ASSERT(param.device().is_cpu());
  float* step_ptr = step.data_ptr<float>();
  const float t = *step_ptr + 1.0f;  // torch.optim.Adam: step_t += 1 first
  const AdamScalars s = adam_scalars({lr, beta1, beta2, eps, weight_decay}, static_cast<double>(t));
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  uint16_t* c = param_copy.has_value()
                    ? reinterpret_cast<uint16_t*>(param_copy->mutable_data_ptr<at::BFloat16>())
                    : nullptr;
  const bool wd = weight_decay != 0.0;
  // 64K elements (~1.8 MB of traffic) per task: big enough to amortise a thread hand-off.
  constexpr int64_t kGrain = 1 << 16;
  at::parallel_for(0, param.numel(), kGrain, [&](int64_t begin, int64_t end) {
    uint16_t* cb = c != nullptr ? c + begin : nullptr;
    if (wd)
      adam_chunk_of<true>(p + begin, g + begin, m + begin, v + begin, cb, end - begin, s);
    else
      adam_chunk_of<false>(p + begin, g + begin, m + begin, v + begin, cb, end - begin, s);
  });
  *step_ptr = t;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdcgan, CPU, m) { m.impl("adam_step", &adam_step_cpu); }

}  // namespace fastdcgan
