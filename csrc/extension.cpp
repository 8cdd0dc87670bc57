// PyTorch binding of the CPU row kernels (fastpref.ops._cpu_rows): argument checks, the mapping
// from tensors to the plain structs of rows.h, and threading over rows with at::parallel_for.
// The contract of forward_rows / backward_rows_ is documented in fastpref/ops/dispatch.py; the
// Python wrapper fastpref/ops/cpu.py allocates the outputs.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <string>
#include <vector>

#include "rows.h"

namespace fastpref {
namespace cpu {
namespace {

using OptTensor = c10::optional<at::Tensor>;

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::f32;
    case at::kBFloat16:
      return DType::bf16;
    case at::kHalf:
      return DType::f16;
    default:
      TORCH_CHECK_VALUE(false, "fastpref: `", name, "` must be float32, bfloat16 or float16, got ",
                        t.scalar_type());
  }
}

// A [rows, vocab] logits chunk on the CPU with a contiguous last dimension.
Rows rows_of(const at::Tensor& t, const char* name, int64_t rows, int64_t vocab) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "fastpref: `", name, "` must be a CPU tensor");
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == vocab, "fastpref: `", name,
                    "` must have shape (", rows, ", ", vocab, "), got ", t.sizes());
  TORCH_CHECK_VALUE(t.stride(1) == 1 || vocab == 1, "fastpref: `", name, "` must have a contiguous last dimension");
  return {t.data_ptr(), t.stride(0), dtype_of(t, name)};
}

// A per-row vector: contiguous [rows] of `type` on the CPU; nullptr when absent.
template <typename T>
T* vector_of(const OptTensor& t, const char* name, int64_t rows, at::ScalarType type) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == type && t->dim() == 1 && t->size(0) == rows &&
                        t->is_contiguous(),
                    "fastpref: `", name, "` must be a contiguous CPU ", type, " tensor of shape (", rows, ")");
  return static_cast<T*>(t->data_ptr());
}

// Forward targets must index the row; backward targets may lie outside a vocabulary slice (no one-hot term).
const int64_t* targets_of(const at::Tensor& target, int64_t rows, int64_t vocab, bool in_range) {
  const int64_t* y = vector_of<const int64_t>(target, "target", rows, at::kLong);
  for (int64_t r = 0; in_range && r < rows; ++r)
    TORCH_CHECK_VALUE(y[r] >= 0 && y[r] < vocab, "fastpref: `target` must lie in [0, ", vocab, "), got ", y[r]);
  return y;
}

// Rows per parallel task: enough that a task has at least ~64k logits, so tiny chunks stay on one thread.
int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(vocab, 1)); }

void forward_rows(const at::Tensor& logits, const at::Tensor& target, const OptTensor& ref_logits, double softcap,
                  double post_scale, const at::Tensor& lse, const at::Tensor& logp, const OptTensor& entropy,
                  const OptTensor& log_sum_sq_probs, const OptTensor& mean_logits, const OptTensor& is_top1,
                  const OptTensor& ref_lse, const OptTensor& ref_logp, const OptTensor& ref_entropy,
                  const OptTensor& kl) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "fastpref: `logits` must be 2-D [rows, vocab], got ", logits.sizes());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK_VALUE(vocab > 0, "fastpref: `logits` has an empty vocabulary dimension");
  ForwardArgs args;
  args.logits = rows_of(logits, "logits", rows, vocab);
  args.target = targets_of(target, rows, vocab, /*in_range=*/true);
  args.vocab = vocab;
  args.softcap = static_cast<float>(softcap);
  args.post_scale = static_cast<float>(post_scale);
  args.lse = vector_of<float>(lse, "lse", rows, at::kFloat);
  args.logp = vector_of<float>(logp, "logp", rows, at::kFloat);
  args.entropy = vector_of<float>(entropy, "entropy", rows, at::kFloat);
  args.log_sum_sq_probs = vector_of<float>(log_sum_sq_probs, "log_sum_sq_probs", rows, at::kFloat);
  args.mean_logits = vector_of<float>(mean_logits, "mean_logits", rows, at::kFloat);
  args.is_top1 = vector_of<bool>(is_top1, "is_top1", rows, at::kBool);
  if (ref_logits.has_value() && ref_logits->defined()) {
    args.ref = rows_of(*ref_logits, "ref_logits", rows, vocab);
    args.ref_lse = vector_of<float>(ref_lse, "ref_lse", rows, at::kFloat);
    args.ref_logp = vector_of<float>(ref_logp, "ref_logp", rows, at::kFloat);
    args.ref_entropy = vector_of<float>(ref_entropy, "ref_entropy", rows, at::kFloat);
    args.kl = vector_of<float>(kl, "kl", rows, at::kFloat);
    TORCH_CHECK_VALUE(ref_lse.has_value() && ref_logp.has_value(),
                      "fastpref: `ref_lse` and `ref_logp` are required with `ref_logits`");
  }

  const Kernels& kernels = active_kernels();
  at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t begin, int64_t end) { kernels.forward(args, begin, end); });
}

void backward_rows_(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                    const OptTensor& g_logp, const OptTensor& g_entropy, const OptTensor& entropy,
                    const OptTensor& g_kl, const OptTensor& ref_logits, const OptTensor& ref_lse, double softcap,
                    double post_scale) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "fastpref: `logits` must be 2-D [rows, vocab], got ", logits.sizes());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK_VALUE(vocab > 0, "fastpref: `logits` has an empty vocabulary dimension");
  const Rows layout = rows_of(logits, "logits", rows, vocab);
  BackwardArgs args;
  args.logits = logits.data_ptr();
  args.stride = layout.stride;
  args.dtype = layout.dtype;
  args.target = targets_of(target, rows, vocab, /*in_range=*/false);
  args.vocab = vocab;
  args.softcap = static_cast<float>(softcap);
  args.post_scale = static_cast<float>(post_scale);
  args.lse = vector_of<const float>(lse, "lse", rows, at::kFloat);
  args.g_logp = vector_of<const float>(g_logp, "g_logp", rows, at::kFloat);
  args.g_entropy = vector_of<const float>(g_entropy, "g_entropy", rows, at::kFloat);
  if (g_entropy.has_value()) {
    TORCH_CHECK_VALUE(entropy.has_value(), "fastpref: `entropy` is required with `g_entropy`");
    args.entropy = vector_of<const float>(entropy, "entropy", rows, at::kFloat);
  }
  args.g_kl = vector_of<const float>(g_kl, "g_kl", rows, at::kFloat);
  if (g_kl.has_value()) {
    TORCH_CHECK_VALUE(ref_logits.has_value() && ref_logits->defined(),
                      "fastpref: `ref_logits` is required with `g_kl`");
    args.ref = rows_of(*ref_logits, "ref_logits", rows, vocab);
    TORCH_CHECK_VALUE(ref_lse.has_value(), "fastpref: `ref_lse` is required with `g_kl`");
    args.ref_lse = vector_of<const float>(ref_lse, "ref_lse", rows, at::kFloat);
  }

  const Kernels& kernels = active_kernels();
  at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t begin, int64_t end) { kernels.backward(args, begin, end); });
}

std::vector<std::string> supported() {
  std::vector<std::string> names;
  for (const char* isa : {"avx512", "avx2", "baseline"})
    if (isa_supported(isa)) names.emplace_back(isa);
  return names;
}

}  // namespace
}  // namespace cpu
}  // namespace fastpref

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace fastpref::cpu;
  m.doc() = "fastpref's C++ row kernels for CPU tensors (see fastpref/ops/cpu.py)";
  m.def("forward_rows", &forward_rows, py::arg("logits"), py::arg("target"), py::arg("ref_logits"),
        py::arg("softcap"), py::arg("post_scale"), py::arg("lse"), py::arg("logp"), py::arg("entropy"),
        py::arg("log_sum_sq_probs"), py::arg("mean_logits"), py::arg("is_top1"), py::arg("ref_lse"),
        py::arg("ref_logp"), py::arg("ref_entropy"), py::arg("kl"), py::call_guard<py::gil_scoped_release>());
  m.def("backward_rows_", &backward_rows_, py::arg("logits"), py::arg("target"), py::arg("lse"), py::arg("g_logp"),
        py::arg("g_entropy"), py::arg("entropy"), py::arg("g_kl"), py::arg("ref_logits"), py::arg("ref_lse"),
        py::arg("softcap"), py::arg("post_scale"), py::call_guard<py::gil_scoped_release>());
  m.def("isa", [] { return std::string(active_kernels().isa); }, "The instruction set of the kernels in use.");
  m.def("supported_isas", &supported, "Kernel variants this build has and this CPU runs, best first.");
  m.def(
      "select_isa",
      [](const std::string& isa) {
        TORCH_CHECK_VALUE(select_kernels(isa.c_str()), "fastpref: kernel variant '", isa,
                          "' is not available here; supported: ", c10::Join(", ", supported()));
      },
      py::arg("isa"), "Use the kernel variant `isa` (for tests and benchmarks).");
}
