// CUDA implementation of fastdcgan::adam_step: the whole update of one network is ONE kernel
// launch over its flat buffers (grid-stride, float4 loads when the buffers are 16-byte aligned,
// scalar tail). The step count is read in the kernel and incremented by the last block to finish
// (block-completion counter in `sync`), so nothing is read on the host and a CUDA graph that
// captured the call replays correctly.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "../fastdcgan.h"

namespace fastdcgan {
namespace {

constexpr int kThreads = 256;

template <bool kWeightDecay>
__device__ __forceinline__ void adam_float4(float4& p, const float4& g, float4& m, float4& v,
                                            const AdamScalars& s) {
  adam_element<kWeightDecay>(p.x, g.x, m.x, v.x, s);
  adam_element<kWeightDecay>(p.y, g.y, m.y, v.y, s);
  adam_element<kWeightDecay>(p.z, g.z, m.z, v.z, s);
  adam_element<kWeightDecay>(p.w, g.w, m.w, v.w, s);
}

template <bool kWeightDecay, bool kVec4>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                float* __restrict__ v, int64_t n, float* __restrict__ step,
                unsigned int* __restrict__ sync, AdamHyper h) {
  __shared__ AdamScalars s_shared;
  __shared__ float t_shared;
  if (threadIdx.x == 0) {
    const float t = *step + 1.0f;  // every block reads the same, not yet incremented, value
    t_shared = t;
    s_shared = adam_scalars(h, static_cast<double>(t));
  }
  __syncthreads();
  const AdamScalars s = s_shared;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t tail_start = 0;
  if (kVec4) {
    const int64_t n4 = n / 4;
    float4* p4 = reinterpret_cast<float4*>(p);
    const float4* g4 = reinterpret_cast<const float4*>(g);
    float4* m4 = reinterpret_cast<float4*>(m);
    float4* v4 = reinterpret_cast<float4*>(v);
    for (int64_t i = tid; i < n4; i += stride) {
      float4 pi = p4[i], mi = m4[i], vi = v4[i];
      const float4 gi = g4[i];
      adam_float4<kWeightDecay>(pi, gi, mi, vi, s);
      p4[i] = pi;
      m4[i] = mi;
      v4[i] = vi;
    }
    tail_start = n4 * 4;
  }
  for (int64_t i = tail_start + tid; i < n; i += stride) {
    float pi = p[i], mi = m[i], vi = v[i];
    adam_element<kWeightDecay>(pi, g[i], mi, vi, s);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
  }
  if (sync != nullptr) {  // uniform over the grid
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      // The last block to get here knows every block has already read *step: increment it and
      // re-arm the counter for the next launch (kernel boundaries order these writes).
      if (atomicAdd(sync, 1u) == gridDim.x - 1) {
        *step = t_shared;
        *sync = 0u;
      }
    }
  }
}

__global__ void increment_step_kernel(float* step) { *step += 1.0f; }

// SM count of a device, queried once (the device-properties helper of ATen/cuda/CUDAContext.h
// would pull in the cuBLAS/cuSPARSE headers for this one number).
int multiprocessor_count(int device) {
  static std::atomic<int> cache[64];  // zero-initialised (static storage)
  if (device < 0 || device >= 64) device = 0;
  int sms = cache[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

void adam_step_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                    at::Tensor& exp_avg_sq, at::Tensor& step, double lr, double beta1,
                    double beta2, double eps, double weight_decay,
                    const std::optional<at::Tensor>& sync) {
  check_adam_args(param, grad, exp_avg, exp_avg_sq, step, sync);
  TORCH_INTERNAL_ASSERT(param.device().is_cuda());
  const c10::cuda::CUDAGuard guard(param.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  const int64_t n = param.numel();
  const bool vec4 = aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v);
  const int64_t work = vec4 ? (n + 3) / 4 : n;
  const int sms = multiprocessor_count(param.get_device());
  const int64_t max_blocks = static_cast<int64_t>(sms) * (2048 / kThreads);
  const int blocks =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks)));
  unsigned int* sync_ptr =
      sync.has_value() ? reinterpret_cast<unsigned int*>(sync->data_ptr<int32_t>()) : nullptr;
  const AdamHyper h{lr, beta1, beta2, eps, weight_decay};
  float* step_ptr = step.data_ptr<float>();
#define FASTDCGAN_LAUNCH(WD, VEC)                                                       \
  adam_kernel<WD, VEC><<<blocks, kThreads, 0, stream>>>(p, g, m, v, n, step_ptr, sync_ptr, h)
  if (weight_decay != 0.0) {
    if (vec4) FASTDCGAN_LAUNCH(true, true); else FASTDCGAN_LAUNCH(true, false);
  } else {
    if (vec4) FASTDCGAN_LAUNCH(false, true); else FASTDCGAN_LAUNCH(false, false);
  }
#undef FASTDCGAN_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (sync_ptr == nullptr) {
    increment_step_kernel<<<1, 1, 0, stream>>>(step_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdcgan, CUDA, m) { m.impl("adam_step", &adam_step_cuda); }

}  // namespace fastdcgan
