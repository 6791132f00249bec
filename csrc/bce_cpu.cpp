// CPU implementation of fastdcgan::bce_with_logits: per-part mean losses, dloss/dlogits and mean
// sigmoids in one pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "fastdcgan.h"

namespace fastdcgan {
namespace {

struct BceSums {
  double loss = 0.0, prob = 0.0;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> bce_with_logits_cpu(
    const at::Tensor& logits, c10::ArrayRef<double> targets) {
  const BceTargets parts = check_bce_args(logits, targets);
  TORCH_INTERNAL_ASSERT(logits.device().is_cpu());
  const at::Tensor x = logits.contiguous();
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad = at::empty_like(x);
  at::Tensor loss = at::empty({}, x.options().dtype(acc_type));
  at::Tensor mean_prob = at::empty({parts.parts}, x.options().dtype(acc_type));
  const int64_t part_size = x.numel() / parts.parts;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bce_with_logits_cpu", [&] {
    // fp32 math for fp32/half/bf16, fp64 for double; the sums are accumulated in double.
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* gp = grad.data_ptr<scalar_t>();
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(part_size);
    double total = 0.0;
    for (int k = 0; k < parts.parts; ++k) {
      const acc_t t = static_cast<acc_t>(parts.value[k]);
      const BceSums sums = at::parallel_reduce(
          k * part_size, (k + 1) * part_size, 1 << 15, BceSums{},
          [&](int64_t begin, int64_t end, BceSums partial) {
            for (int64_t i = begin; i < end; ++i) {
              acc_t l, dl, sig;
              bce_element<acc_t>(static_cast<acc_t>(xp[i]), t, l, dl, sig);
              gp[i] = static_cast<scalar_t>(dl * inv_n);
              partial.loss += static_cast<double>(l);
              partial.prob += static_cast<double>(sig);
            }
            return partial;
          },
          [](BceSums a, BceSums b) { return BceSums{a.loss + b.loss, a.prob + b.prob}; });
      total += sums.loss / static_cast<double>(part_size);
      mean_prob.data_ptr<acc_t>()[k] =
          static_cast<acc_t>(sums.prob / static_cast<double>(part_size));
    }
    *loss.data_ptr<acc_t>() = static_cast<acc_t>(total);
  });
  return {loss, grad, mean_prob};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdcgan, CPU, m) { m.impl("bce_with_logits", &bce_with_logits_cpu); }

}  // namespace fastdcgan
