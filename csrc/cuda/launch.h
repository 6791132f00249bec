// Plain launchers of the CUDA kernels (csrc/cuda/*.cu), called by the host side of the CUDA ops
// (ops_cuda.cpp). They take raw pointers and return the launch's cudaError_t: no at::Tensor, no
// exceptions in nvcc-compiled code, so argument checks and errors are all raised from g++-compiled
// code (a c10::Error thrown from inside the nvcc translation unit crashed the process on the H100
// machine instead of reaching Python).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../fastdcgan.h"

namespace fastdcgan {

// One launch over the whole flat buffer (grid-stride, at most one wave of the device's `sms`
// multiprocessors); `copy` (nullable) receives the updated parameters as bf16 bit patterns;
// `sync` (nullable) lets the last block increment *step, else a second one-thread launch does.
cudaError_t launch_adam(float* p, const float* g, float* m, float* v, uint16_t* copy, int64_t n,
                        float* step, unsigned int* sync, const AdamHyper& h, int sms,
                        cudaStream_t stream);

enum class BceDtype { kFloat, kDouble, kHalf, kBFloat16 };

// BCE-with-logits of n logits in targets.parts equal parts: loss (0-d) and mean_prob
// (targets.parts) in the opmath dtype (fp32, fp64 for double), grad (n, the logits' dtype).
cudaError_t launch_bce(const void* logits, void* grad, void* loss, void* mean_prob, int64_t n,
                       const BceTargets& targets, BceDtype dtype, cudaStream_t stream);

}  // namespace fastdcgan
