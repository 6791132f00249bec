// CUDA implementation of fastdcgan::bce_with_logits: loss and dloss/dlogits in one launch.
// The logits of a GAN step are per-sample scores (B of them, a few hundred), so one block walks
// the whole tensor (grid-stride over a single block) and reduces the loss in double: one launch,
// no atomics, no workspace, deterministic. Fine up to ~1e5 elements; larger inputs stay correct.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../fastdcgan.h"

namespace fastdcgan {
namespace {

constexpr int kThreads = 512;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    bce_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ grad,
               scalar_t* __restrict__ loss, int64_t n, double target) {
  using acc_t = at::opmath_type<scalar_t>;
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

std::tuple<at::Tensor, at::Tensor> bce_with_logits_cuda(const at::Tensor& logits, double target) {
  check_bce_args(logits, target);
  TORCH_INTERNAL_ASSERT(logits.device().is_cuda());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  at::Tensor grad = at::empty_like(x);
  at::Tensor loss = at::empty({}, x.options());
  const int64_t n = x.numel();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bce_with_logits_cuda", [&] {
    bce_kernel<scalar_t><<<1, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), loss.data_ptr<scalar_t>(), n, target);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdcgan, CUDA, m) { m.impl("bce_with_logits", &bce_with_logits_cuda); }

}  // namespace fastdcgan
