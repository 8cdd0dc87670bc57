// Row kernels of the token-statistics op on CPU: the interface between the torch glue
// (extension.cpp) and the per-ISA kernels (rows_isa.cpp, rows_kernels.inc).
//
// This header is deliberately free of torch and standard-library templates: rows_isa.cpp compiles the
// kernels several times for different instruction sets, and nothing it shares with other translation
// units may be an inline function that one ISA variant could end up providing for everybody.
#pragma once

#include <cstdint>

namespace fastpref {
namespace cpu {

// Storage type of a logits row; all arithmetic is fp32.
enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

// One chunk of logits rows [rows, vocab]; the last dimension is contiguous, rows are `stride` elements apart.
struct Rows {
  const void* data = nullptr;  // null: absent (no reference head)
  int64_t stride = 0;
  DType dtype = DType::f32;
};

// Arguments of forward_rows. Output pointers are fp32 (is_top1: bool) with one entry per row; a null
// pointer means "not asked". When ref.data is set, ref_lse and ref_logp must be set too.
struct ForwardArgs {
  Rows logits;
  Rows ref;
  const int64_t* target = nullptr;
  int64_t vocab = 0;
  float softcap = 0.0f;     // > 0: the softmax sees post_scale * softcap * tanh(logits / softcap)
  float post_scale = 1.0f;  // only used with softcap
  float* lse = nullptr;
  float* logp = nullptr;
  float* entropy = nullptr;
  float* log_sum_sq_probs = nullptr;
  float* mean_logits = nullptr;
  bool* is_top1 = nullptr;
  float* ref_lse = nullptr;
  float* ref_logp = nullptr;
  float* ref_entropy = nullptr;
  float* kl = nullptr;
};

// Arguments of backward_rows_: per-row fp32 inputs; a null g_* means a zero upstream gradient (then
// the matching entropy / ref inputs may be null too). The logits may be a vocabulary slice
// [v0, v1) of the rows: lse, entropy and ref_lse are the full rows' values, target is label - v0,
// and a target outside [0, vocab) adds no one-hot term.
struct BackwardArgs {
  void* logits = nullptr;  // overwritten in place with dL/dlogits, same layout and dtype
  int64_t stride = 0;
  DType dtype = DType::f32;
  Rows ref;                // read only when g_kl is set
  const int64_t* target = nullptr;
  int64_t vocab = 0;
  float softcap = 0.0f;
  float post_scale = 1.0f;
  const float* lse = nullptr;
  const float* g_logp = nullptr;
  const float* g_entropy = nullptr;
  const float* entropy = nullptr;
  const float* g_kl = nullptr;
  const float* ref_lse = nullptr;
};

// The kernels of one instruction set, over rows [begin, end).
struct Kernels {
  const char* isa;
  void (*forward)(const ForwardArgs& args, int64_t begin, int64_t end);
  void (*backward)(const BackwardArgs& args, int64_t begin, int64_t end);
};

// The best variant this CPU runs (or the one chosen by select_kernels).
const Kernels& active_kernels();
// Switches to the variant named `isa` ("avx512", "avx2" or "baseline"); false if it is not supported.
bool select_kernels(const char* isa);
// Whether this build contains the variant `isa` and this CPU can run it.
bool isa_supported(const char* isa);

}  // namespace cpu
}  // namespace fastpref
