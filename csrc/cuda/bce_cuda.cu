// CUDA kernel of fastdcgan::bce_with_logits: loss and dloss/dlogits in one launch.
// The logits of a GAN step are per-sample scores (B of them, a few hundred), so one block walks
// the whole tensor (grid-stride over a single block) and reduces the loss in double: one launch,
// no atomics, no workspace, deterministic. Fine up to ~1e5 elements; larger inputs stay correct.
// Host side (checks, allocation, stream): ops_cuda.cpp.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "launch.h"

namespace fastdcgan {
namespace {

constexpr int kThreads = 512;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    bce_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ grad,
               scalar_t* __restrict__ loss, int64_t n, double target) {
  // fp32 math for fp32/half/bf16 (ATen's opmath type), fp64 for double
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const acc_t t = static_cast<acc_t>(target);
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  double partial = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    acc_t l, dl;
    bce_element<acc_t>(static_cast<acc_t>(x[i]), t, l, dl);
    grad[i] = static_cast<scalar_t>(dl * inv_n);
    partial += static_cast<double>(l);
  }
  for (int offset = 16; offset > 0; offset /= 2)
    partial += __shfl_down_sync(0xffffffffu, partial, offset);
  __shared__ double warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = partial;
  __syncthreads();
  if (warp == 0) {
    partial = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : 0.0;
    for (int offset = 16; offset > 0; offset /= 2)
      partial += __shfl_down_sync(0xffffffffu, partial, offset);
    if (lane == 0) *loss = static_cast<scalar_t>(partial / static_cast<double>(n));
  }
}

template <typename scalar_t>
cudaError_t launch_typed(const void* x, void* grad, void* loss, int64_t n, double target,
                         cudaStream_t stream) {
  bce_kernel<scalar_t><<<1, kThreads, 0, stream>>>(static_cast<const scalar_t*>(x),
                                                   static_cast<scalar_t*>(grad),
                                                   static_cast<scalar_t*>(loss), n, target);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_bce(const void* logits, void* grad, void* loss, int64_t n, double target,
                       BceDtype dtype, cudaStream_t stream) {
  switch (dtype) {
    case BceDtype::kFloat: return launch_typed<float>(logits, grad, loss, n, target, stream);
    case BceDtype::kDouble: return launch_typed<double>(logits, grad, loss, n, target, stream);
    case BceDtype::kHalf: return launch_typed<c10::Half>(logits, grad, loss, n, target, stream);
    case BceDtype::kBFloat16: return launch_typed<c10::BFloat16>(logits, grad, loss, n, target, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastdcgan
