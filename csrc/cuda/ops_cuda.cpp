// Host side of the CUDA ops (compiled by the C++ compiler, like the CPU ops): argument checks,
// device guard, current stream, output allocation, launch-error checks, and the CUDA dispatch
// registrations. The kernels and their plain launchers live in the .cu files next to this one.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>

#include "launch.h"

namespace fastdcgan {
namespace {

// SM count of a device, queried once (the device-properties helper of ATen/cuda/CUDAContext.h
// would pull in the cuBLAS/cuSPARSE headers for this one number).
int multiprocessor_count(int device) {
  static std::atomic<int> cache[64];  // zero-initialised (static storage)
  TORCH_CHECK(device >= 0 && device < 64,
              message("fastdcgan: CUDA device index ", int64_t{device}, " out of range"));
  int sms = cache[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

void adam_step_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                    at::Tensor& exp_avg_sq, at::Tensor& step, double lr, double beta1,
                    double beta2, double eps, double weight_decay,
                    const std::optional<at::Tensor>& sync,
                    const std::optional<at::Tensor>& param_copy) {
  check_adam_args(param, grad, exp_avg, exp_avg_sq, step, sync, param_copy);
  TORCH_INTERNAL_ASSERT(param.device().is_cuda());
  const c10::cuda::CUDAGuard guard(param.device());
  unsigned int* sync_ptr =
      sync.has_value() ? reinterpret_cast<unsigned int*>(sync->data_ptr<int32_t>()) : nullptr;
  uint16_t* copy_ptr =
      param_copy.has_value()
          ? reinterpret_cast<uint16_t*>(param_copy->mutable_data_ptr<at::BFloat16>())
          : nullptr;
  C10_CUDA_CHECK(launch_adam(param.data_ptr<float>(), grad.data_ptr<float>(),
                             exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), copy_ptr,
                             param.numel(), step.data_ptr<float>(), sync_ptr,
                             AdamHyper{lr, beta1, beta2, eps, weight_decay},
                             multiprocessor_count(param.get_device()),
                             c10::cuda::getCurrentCUDAStream()));
}

BceDtype bce_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return BceDtype::kFloat;
    case at::kDouble: return BceDtype::kDouble;
    case at::kHalf: return BceDtype::kHalf;
    case at::kBFloat16: return BceDtype::kBFloat16;
    default: TORCH_CHECK(false, message("fastdcgan::bce_with_logits: unsupported dtype ", t));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bce_with_logits_cuda(
    const at::Tensor& logits, c10::ArrayRef<double> targets) {
  const BceTargets parts = check_bce_args(logits, targets);
  TORCH_INTERNAL_ASSERT(logits.device().is_cuda());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad = at::empty_like(x);
  at::Tensor loss = at::empty({}, x.options().dtype(acc_type));
  at::Tensor mean_prob = at::empty({parts.parts}, x.options().dtype(acc_type));
  C10_CUDA_CHECK(launch_bce(x.const_data_ptr(), grad.mutable_data_ptr(), loss.mutable_data_ptr(),
                            mean_prob.mutable_data_ptr(), x.numel(), parts,
                            bce_dtype(x.scalar_type()), c10::cuda::getCurrentCUDAStream()));
  return {loss, grad, mean_prob};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdcgan, CUDA, m) {
  m.impl("adam_step", &adam_step_cuda);
  m.impl("bce_with_logits", &bce_with_logits_cuda);
}

}  // namespace fastdcgan
