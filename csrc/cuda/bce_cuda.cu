// CUDA kernel of fastdcgan::bce_with_logits: per-part mean losses, dloss/dlogits and mean
// sigmoids in one launch. The logits of a GAN step are per-sample scores (B or 2B of them, a few
// hundred), so one block walks the whole tensor (grid-stride over a single block, part by part)
// and reduces in double: one launch, no atomics, no workspace, deterministic. Fine up to ~1e5
// elements; larger inputs stay correct.
// Host side (checks, allocation, stream): ops_cuda.cpp.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "launch.h"

namespace fastdcgan {
namespace {

constexpr int kThreads = 512;

// The block's sums of (a, b); valid in thread 0. Every thread calls it (it synchronises).
__device__ double2 block_sum(double a, double b) {
  __shared__ double2 warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    a += __shfl_down_sync(0xffffffffu, a, offset);
    b += __shfl_down_sync(0xffffffffu, b, offset);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = make_double2(a, b);
  __syncthreads();
  if (warp == 0) {
    const bool live = lane < static_cast<int>(blockDim.x / 32);
    a = live ? warp_sums[lane].x : 0.0;
    b = live ? warp_sums[lane].y : 0.0;
    for (int offset = 16; offset > 0; offset /= 2) {
      a += __shfl_down_sync(0xffffffffu, a, offset);
      b += __shfl_down_sync(0xffffffffu, b, offset);
    }
  }
  __syncthreads();   // warp_sums is reused by the next call
  return make_double2(a, b);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    bce_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ grad, void* loss_out,
               void* mean_prob_out, int64_t part_size, BceTargets targets) {
  // fp32 math for fp32/half/bf16 (ATen's opmath type, also the outputs' dtype), fp64 for double
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(part_size);
  double total = 0.0;
  for (int k = 0; k < targets.parts; ++k) {
    const acc_t t = static_cast<acc_t>(targets.value[k]);
    double loss = 0.0, prob = 0.0;
    for (int64_t i = k * part_size + threadIdx.x; i < (k + 1) * part_size; i += blockDim.x) {
      acc_t l, dl, sig;
      bce_element<acc_t>(static_cast<acc_t>(x[i]), t, l, dl, sig);
      grad[i] = static_cast<scalar_t>(dl * inv_n);
      loss += static_cast<double>(l);
      prob += static_cast<double>(sig);
    }
    const double2 sums = block_sum(loss, prob);
    if (threadIdx.x == 0) {
      total += sums.x / static_cast<double>(part_size);
      static_cast<acc_t*>(mean_prob_out)[k] =
          static_cast<acc_t>(sums.y / static_cast<double>(part_size));
    }
  }
  if (threadIdx.x == 0) *static_cast<acc_t*>(loss_out) = static_cast<acc_t>(total);
}

template <typename scalar_t>
cudaError_t launch_typed(const void* x, void* grad, void* loss, void* mean_prob, int64_t n,
                         const BceTargets& targets, cudaStream_t stream) {
  bce_kernel<scalar_t><<<1, kThreads, 0, stream>>>(static_cast<const scalar_t*>(x),
                                                   static_cast<scalar_t*>(grad), loss, mean_prob,
                                                   n / targets.parts, targets);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_bce(const void* logits, void* grad, void* loss, void* mean_prob, int64_t n,
                       const BceTargets& targets, BceDtype dtype, cudaStream_t stream) {
  switch (dtype) {
    case BceDtype::kFloat:
      return launch_typed<float>(logits, grad, loss, mean_prob, n, targets, stream);
    case BceDtype::kDouble:
      return launch_typed<double>(logits, grad, loss, mean_prob, n, targets, stream);
    case BceDtype::kHalf:
      return launch_typed<c10::Half>(logits, grad, loss, mean_prob, n, targets, stream);
    case BceDtype::kBFloat16:
      return launch_typed<c10::BFloat16>(logits, grad, loss, mean_prob, n, targets, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastdcgan
