// CUDA kernel of fastdcgan::adam_step: the whole update of one network is ONE kernel launch over
// its flat buffers (grid-stride, float4 loads when the buffers are 16-byte aligned, scalar tail),
// writing the bf16 copy of the parameters too when asked.
// The step count is read in the kernel and incremented by the last block to finish
// (block-completion counter in `sync`), so nothing is read on the host and a CUDA graph that
// captured the call replays correctly. Host side (checks, stream, grid size): ops_cuda.cpp.
#include <algorithm>

#include "launch.h"

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

// kCopy: also write the updated parameters to c as bf16 bit patterns (the step's bf16 weights).
template <bool kWeightDecay, bool kVec4, bool kCopy>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                float* __restrict__ v, uint16_t* __restrict__ c, int64_t n,
                float* __restrict__ step, unsigned int* __restrict__ sync, AdamHyper h) {
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
      if (kCopy)
        reinterpret_cast<uint2*>(c)[i] =
            make_uint2(bf16_bits(pi.x) | (static_cast<uint32_t>(bf16_bits(pi.y)) << 16),
                       bf16_bits(pi.z) | (static_cast<uint32_t>(bf16_bits(pi.w)) << 16));
    }
    tail_start = n4 * 4;
  }
  for (int64_t i = tail_start + tid; i < n; i += stride) {
    float pi = p[i], mi = m[i], vi = v[i];
    adam_element<kWeightDecay>(pi, g[i], mi, vi, s);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (kCopy) c[i] = bf16_bits(pi);
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

bool aligned(const void* ptr, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

template <bool kWeightDecay, bool kVec4>
void launch_copying(float* p, const float* g, float* m, float* v, uint16_t* c, int64_t n,
                    float* step, unsigned int* sync, const AdamHyper& h, int blocks,
                    cudaStream_t stream) {
  if (c != nullptr)
    adam_kernel<kWeightDecay, kVec4, true>
        <<<blocks, kThreads, 0, stream>>>(p, g, m, v, c, n, step, sync, h);
  else
    adam_kernel<kWeightDecay, kVec4, false>
        <<<blocks, kThreads, 0, stream>>>(p, g, m, v, c, n, step, sync, h);
}

// Enough blocks to cover the buffer, at most a full wave (2048 threads per SM).
template <bool kWeightDecay>
void launch_typed(float* p, const float* g, float* m, float* v, uint16_t* c, int64_t n,
                  float* step, unsigned int* sync, const AdamHyper& h, int sms,
                  cudaStream_t stream) {
  const bool vec4 = aligned(p, 16) && aligned(g, 16) && aligned(m, 16) && aligned(v, 16) &&
                    (c == nullptr || aligned(c, 8));
  const int64_t work = vec4 ? (n + 3) / 4 : n;
  const int64_t max_blocks = static_cast<int64_t>(sms) * (2048 / kThreads);
  const int blocks = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks)));
  if (vec4)
    launch_copying<kWeightDecay, true>(p, g, m, v, c, n, step, sync, h, blocks, stream);
  else
    launch_copying<kWeightDecay, false>(p, g, m, v, c, n, step, sync, h, blocks, stream);
}

}  // namespace

cudaError_t launch_adam(float* p, const float* g, float* m, float* v, uint16_t* copy, int64_t n,
                        float* step, unsigned int* sync, const AdamHyper& h, int sms,
                        cudaStream_t stream) {
  if (h.weight_decay != 0.0)
    launch_typed<true>(p, g, m, v, copy, n, step, sync, h, sms, stream);
  else
    launch_typed<false>(p, g, m, v, copy, n, step, sync, h, sms, stream);
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess && sync == nullptr) {
    increment_step_kernel<<<1, 1, 0, stream>>>(step);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace fastdcgan
