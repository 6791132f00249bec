// fastdcgan._C: operator schemas (TORCH_LIBRARY), argument checks, and the Python module stub.
//
// Ops (namespace `fastdcgan`, so torch.ops.fastdcgan.<name>):
//   adam_step(param!, grad, exp_avg!, exp_avg_sq!, step!, lr, beta1, beta2, eps, weight_decay,
//             sync!?, param_copy!?)
//       One torch.optim.Adam step (L2 weight decay, no amsgrad/maximize) over flat fp32 buffers,
//       in place. `step` (fp32, one element) is read and incremented inside the op, so a CUDA
//       graph that captured the call replays correctly. `sync` (int32, one element, zero) lets the
//       CUDA kernel increment `step` from its last finished block (one launch); without it CUDA
//       uses a second tiny launch. CPU ignores it. It is left zero. `param_copy` (bf16, param's
//       size) receives the updated parameters rounded to bf16 in the same pass: a bf16 step's
//       weights without a cast launch of their own.
//   bce_with_logits(logits, targets) -> (loss, grad, mean_prob)
//       the logits split into len(targets) equal parts, part k labelled targets[k]: the sum over
//       the parts of their mean binary cross-entropy, dloss/dlogits, and each part's mean
//       sigmoid, in one pass (a GAN's whole D loss, [1, 0], or G loss, [1]). loss and mean_prob
//       are fp32 (fp64 for fp64 logits), grad has the logits' dtype.
// Implementations: CPU in adam_cpu.cpp / bce_cpu.cpp (always built); CUDA (built when setup.py
// sees CUDA): host side in cuda/ops_cuda.cpp, kernels in cuda/*.cu. Fake (meta) implementations and autograd live in fastdcgan/_ext.py.
#include <Python.h>

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "fastdcgan.h"

#ifndef FASTDCGAN_SOURCE_HASH
#error "FASTDCGAN_SOURCE_HASH must be defined by setup.py (a hash of the csrc/ sources)"
#endif
#define FASTDCGAN_STR_(x) #x
#define FASTDCGAN_STR(x) FASTDCGAN_STR_(x)

namespace fastdcgan {

void check_adam_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, const at::Tensor& step,
                     const std::optional<at::Tensor>& sync,
                     const std::optional<at::Tensor>& param_copy) {
  const auto n = param.numel();
  const at::Tensor* bufs[] = {&param, &grad, &exp_avg, &exp_avg_sq};
  const char* names[] = {"param", "grad", "exp_avg", "exp_avg_sq"};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& t = *bufs[i];
    TORCH_CHECK(t.scalar_type() == at::kFloat, message("fastdcgan::adam_step: ", names[i],
                " must be float32, got ", t.scalar_type()));
    TORCH_CHECK(t.is_contiguous(), message("fastdcgan::adam_step: ", names[i], " must be contiguous"));
    TORCH_CHECK(t.numel() == n, message("fastdcgan::adam_step: ", names[i], " has ", t.numel(),
                " elements, param has ", n));
    TORCH_CHECK(t.device() == param.device(), message("fastdcgan::adam_step: ", names[i],
                " is on ", t.device(), ", param on ", param.device()));
  }
  TORCH_CHECK(step.scalar_type() == at::kFloat && step.numel() == 1,
              message("fastdcgan::adam_step: step must be a float32 tensor with one element, got ",
                      step.scalar_type(), " with ", step.numel(), " elements"));
  TORCH_CHECK(step.device() == param.device(), message("fastdcgan::adam_step: step is on ",
              step.device(), ", param on ", param.device()));
  if (sync.has_value()) {
    TORCH_CHECK(sync->scalar_type() == at::kInt && sync->numel() >= 1,
                "fastdcgan::adam_step: sync must be an int32 tensor with one element");
    TORCH_CHECK(sync->device() == param.device(), message("fastdcgan::adam_step: sync is on ",
                sync->device(), ", param on ", param.device()));
  }
  if (param_copy.has_value()) {
    const at::Tensor& c = *param_copy;
    TORCH_CHECK(c.scalar_type() == at::kBFloat16,
                message("fastdcgan::adam_step: param_copy must be bfloat16, got ", c.scalar_type()));
    TORCH_CHECK(c.is_contiguous(), "fastdcgan::adam_step: param_copy must be contiguous");
    TORCH_CHECK(c.numel() == n, message("fastdcgan::adam_step: param_copy has ", c.numel(),
                " elements, param has ", n));
    TORCH_CHECK(c.device() == param.device(), message("fastdcgan::adam_step: param_copy is on ",
                c.device(), ", param on ", param.device()));
  }
}

BceTargets check_bce_args(const at::Tensor& logits, c10::ArrayRef<double> targets) {
  const auto t = logits.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              message("fastdcgan::bce_with_logits: logits must be float32, float64, float16 or "
                      "bfloat16, got ", t));
  TORCH_CHECK(logits.numel() > 0, "fastdcgan::bce_with_logits: logits is empty");
  const auto parts = static_cast<int64_t>(targets.size());
  TORCH_CHECK(parts >= 1 && parts <= kMaxBceParts,
              message("fastdcgan::bce_with_logits: between 1 and ", int64_t{kMaxBceParts},
                      " targets (one per part), got ", parts));
  TORCH_CHECK(logits.numel() % parts == 0,
              message("fastdcgan::bce_with_logits: ", logits.numel(), " logits do not split into ",
                      parts, " equal parts"));
  BceTargets out{};
  out.parts = static_cast<int>(parts);
  for (int64_t k = 0; k < parts; ++k) {
    TORCH_CHECK(std::isfinite(targets[k]), "fastdcgan::bce_with_logits: target must be finite");
    out.value[k] = targets[k];
  }
  return out;
}

TORCH_LIBRARY(fastdcgan, m) {
  // Tells torch where the fake (meta) implementations are registered, so torch.compile /
  // opcheck users that reach the ops without importing fastdcgan get a pointer to the module.
  m.set_python_module("fastdcgan._ext");
  m.def(
      "adam_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!) step, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "Tensor(e!)? sync=None, Tensor(f!)? param_copy=None) -> ()");
  m.def(
      "bce_with_logits(Tensor logits, float[] targets) -> (Tensor loss, Tensor grad, "
      "Tensor mean_prob)");
}

// adam_step is an optimizer update, never differentiated: its Autograd kernel goes straight below
// autograd (and ADInplaceOrView: FusedAdam bumps the parameters' versions itself) instead of
// leaving the op to the generic fallback for ops without a derivative, which on the H100
// machine (torch 2.11+cu130) crashed when the op's argument check threw.
void adam_step_below_autograd(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                              at::Tensor& exp_avg_sq, at::Tensor& step, double lr, double beta1,
                              double beta2, double eps, double weight_decay,
                              const std::optional<at::Tensor>& sync,
                              const std::optional<at::Tensor>& param_copy) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastdcgan::adam_step", "")
                             .typed<decltype(adam_step_below_autograd)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  op.call(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, sync,
          param_copy);
}

TORCH_LIBRARY_IMPL(fastdcgan, Autograd, m) { m.impl("adam_step", &adam_step_below_autograd); }

}  // namespace fastdcgan

// The Python module: importing fastdcgan._C loads this shared library, which runs the static
// TORCH_LIBRARY registrations above. It carries the build's identity for fastdcgan._ext's checks.
static struct PyModuleDef fastdcgan_module = {PyModuleDef_HEAD_INIT, "_C",
                                              "fastdcgan C++ ops (torch.ops.fastdcgan)", -1,
                                              nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&fastdcgan_module);
  if (mod == nullptr) return nullptr;
#ifdef FASTDCGAN_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
  if (PyModule_AddStringConstant(mod, "source_hash", FASTDCGAN_STR(FASTDCGAN_SOURCE_HASH)) < 0 ||
      PyModule_AddObject(mod, "with_cuda", PyBool_FromLong(with_cuda)) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
