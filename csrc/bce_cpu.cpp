// CPU implementation of fastdcgan::bce_with_logits: mean loss and dloss/dlogits in one pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "fastdcgan.h"

namespace fastdcgan {
namespace {

std::tuple<at::Tensor, at::Tensor> bce_with_logits_cpu(const at::Tensor& logits, double target) {
  check_bce_args(logits, target);
  TORCH_INTERNAL_ASSERT(logits.device().is_cpu());
  const at::Tensor x = logits.contiguous();
  at::Tensor grad = at::empty_like(x);
  at::Tensor loss = at::empty({}, x.options());
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bce_with_logits_cpu", [&] {
    // fp32 math for fp32/half/bf16, fp64 for double; the sum is accumulated in double.
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* gp = grad.data_ptr<scalar_t>();
    const acc_t t = static_cast<acc_t>(target);
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
    const double sum = at::parallel_reduce(
        0, n, 1 << 15, 0.0,
        [&](int64_t begin, int64_t end, double partial) {
          for (int64_t i = begin; i < end; ++i) {
            acc_t l, dl;
            bce_element<acc_t>(static_cast<acc_t>(xp[i]), t, l, dl);
            gp[i] = static_cast<scalar_t>(dl * inv_n);
            partial += static_cast<double>(l);
          }
          return partial;
        },
        [](double a, double b) { return a + b; });
    *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(sum / static_cast<double>(n));
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdcgan, CPU, m) { m.impl("bce_with_logits", &bce_with_logits_cpu); }

}  // namespace fastdcgan
