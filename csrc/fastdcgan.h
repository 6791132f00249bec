// fastdcgan C++ extension: shared declarations and the per-element math used by both the CPU and
// the CUDA implementations (one formula, two backends).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

#if defined(__CUDACC__)
#define FASTDCGAN_HD __host__ __device__ __forceinline__
#else
#define FASTDCGAN_HD inline __attribute__((always_inline))
#endif

namespace fastdcgan {

// Scalars of one Adam step. lr/beta/eps/weight_decay arrive as doubles from Python (like
// torch.optim.Adam's Python scalars); the bias-corrected ones depend on the step count, which
// lives in a tensor, so they are computed where the step is read (host for CPU, in-kernel for CUDA).
struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
};

struct AdamScalars {
  float one_minus_beta1;   // lerp weight of exp_avg towards grad
  float beta2;
  float one_minus_beta2;
  float neg_step_size;     // -lr / (1 - beta1^t)
  float bc2_sqrt;          // sqrt(1 - beta2^t)
  float eps;
  float weight_decay;
};

// Mirrors torch.optim.Adam's single-tensor path (Python doubles computed in double, then used as
// fp32 scalars by the fp32 tensor ops). `t` is the step number AFTER the increment (1 on the first step).
FASTDCGAN_HD AdamScalars adam_scalars(const AdamHyper& h, double t) {
  AdamScalars s;
  const double bc1 = 1.0 - ::pow(h.beta1, t);
  const double bc2 = 1.0 - ::pow(h.beta2, t);
  s.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
  s.beta2 = static_cast<float>(h.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  s.neg_step_size = static_cast<float>(-(h.lr / bc1));
  s.bc2_sqrt = static_cast<float>(::sqrt(bc2));
  s.eps = static_cast<float>(h.eps);
  s.weight_decay = static_cast<float>(h.weight_decay);
  return s;
}

// One element of the Adam update, in the order (and with the fused multiply-adds) of the CPU
// kernels behind torch.optim.Adam's tensor ops, so the two agree to fp32 rounding:
//   g  = grad + wd * p                         (grad.add(param, alpha=wd): L2, not decoupled)
//   m  = lerp(m, g, 1 - beta1)                 (exp_avg.lerp_: ATen's two-sided lerp, one fma)
//   v  = v * beta2 + (1 - beta2) * g * g       (exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2))
//   p += (-step_size * m) / (sqrt(v) / sqrt(bc2) + eps)        (param.addcdiv_)
// (ATen's CPU sqrt is not always correctly rounded, ours is: bit-for-bit equality is not a goal.)
template <bool kWeightDecay>
FASTDCGAN_HD void adam_element(float& p, float g, float& m, float& v, const AdamScalars& s) {
  if (kWeightDecay) g = fmaf(s.weight_decay, p, g);
  const float w = s.one_minus_beta1;
  const bool small = w < 0.5f;
  m = fmaf(small ? w : w - 1.0f, g - m, small ? m : g);
  v = fmaf(s.one_minus_beta2 * g, g, v * s.beta2);
  const float denom = ::sqrtf(v) / s.bc2_sqrt + s.eps;
  p = p + s.neg_step_size * m / denom;
}

// fp32 -> bf16 bit pattern, rounded to nearest even (any NaN -> 0x7fc0), as c10::BFloat16's
// conversion does; plain integer ops, so adam_step's ISA-cloned CPU loop vectorises it.
FASTDCGAN_HD uint16_t bf16_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Numerically stable BCE with logits for one element and constant target t:
//   loss = max(l, 0) - l * t + log1p(exp(-|l|)),  dloss/dl = sigmoid(l) - t.
// One exp per element; never overflows (exp of a non-positive number).
template <typename acc_t>
FASTDCGAN_HD void bce_element(acc_t l, acc_t t, acc_t& loss, acc_t& dl, acc_t& sig) {
  const acc_t e = std::exp(-std::fabs(l));
  const acc_t r = acc_t(1) / (acc_t(1) + e);
  sig = l >= acc_t(0) ? r : e * r;
  loss = (l > acc_t(0) ? l : acc_t(0)) - l * t + std::log1p(e);
  dl = sig - t;
}

// bce_with_logits splits the logits into `parts` equal parts, part k labelled value[k]
// (a GAN's D step: real then fake, 1 and 0). By value into the CUDA kernel.
constexpr int kMaxBceParts = 8;
struct BceTargets {
  double value[kMaxBceParts];
  int parts;
};

#ifndef __CUDACC__
// Error messages, as one std::string for TORCH_CHECK (which hands a single string to c10::Error
// as is): built with std::string and std::to_string, never an ostream (c10::str of several
// arguments). The H100 machine's default compiler (CXX=/opt/gcc/bin/g++, a wrapper of GCC 13.3)
// builds its own copy of libstdc++'s stream code into an extension, and formatting a number with
// it crashed (SIGSEGV in std::ostream::_M_insert<long>) when an argument check failed.
namespace detail {
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, int64_t v) { s += std::to_string(v); }
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
}  // namespace detail

template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}
#endif

// Argument checks shared by the CPU and CUDA implementations.
void check_adam_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, const at::Tensor& step,
                     const std::optional<at::Tensor>& sync,
                     const std::optional<at::Tensor>& param_copy);
// Checks the arguments of bce_with_logits and returns its targets.
BceTargets check_bce_args(const at::Tensor& logits, c10::ArrayRef<double> targets);

}  // namespace fastdcgan
