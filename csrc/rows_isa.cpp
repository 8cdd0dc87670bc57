// Compiles the row kernels (rows_kernels.inc) once per instruction set and picks one at run time,
// so that one binary uses AVX-512 where the CPU has it and still runs on any x86-64 CPU.
//
// The build itself targets the baseline ISA (no -march flag). With GCC on x86-64, the AVX-512 and
// AVX2 variants are the same source compiled under `#pragma GCC target`, each in its own namespace;
// they are only called after the CPU (and OS) reported the features. Other compilers and
// architectures get the baseline variant, vectorised for whatever the compiler's default ISA is.
//
// This file includes no torch header on purpose: an inline function from a shared header, compiled
// here under an AVX-512 target, could be picked by the linker for the whole library and then run
// on a CPU without AVX-512.

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "rows.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTPREF_X86_VARIANTS 1
#else
#define FASTPREF_X86_VARIANTS 0
#endif

#if FASTPREF_X86_VARIANTS

#pragma GCC push_options
// 512-bit vectors explicitly: GCC's generic tuning would otherwise stay at 256 bits.
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,prefer-vector-width=512")
namespace fastpref {
namespace cpu {
namespace avx512 {
#include "rows_kernels.inc"
}  // namespace avx512
}  // namespace cpu
}  // namespace fastpref
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace fastpref {
namespace cpu {
namespace avx2 {
#include "rows_kernels.inc"
}  // namespace avx2
}  // namespace cpu
}  // namespace fastpref
#pragma GCC pop_options

#endif  // FASTPREF_X86_VARIANTS

namespace fastpref {
namespace cpu {
namespace baseline {
#include "rows_kernels.inc"
}  // namespace baseline

namespace {

const Kernels kVariants[] = {  // best first
#if FASTPREF_X86_VARIANTS
    {"avx512", avx512::forward_rows_range, avx512::backward_rows_range},
    {"avx2", avx2::forward_rows_range, avx2::backward_rows_range},
#endif
    {"baseline", baseline::forward_rows_range, baseline::backward_rows_range},
};

bool cpu_runs(const Kernels& kernels) {
#if FASTPREF_X86_VARIANTS
  __builtin_cpu_init();  // this may run from a static initialiser, before libgcc's own
  // libgcc reports AVX/AVX-512 only when the OS also saves those registers (XCR0).
  if (std::strcmp(kernels.isa, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::strcmp(kernels.isa, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return std::strcmp(kernels.isa, "baseline") == 0;
}

const Kernels* best_variant() {
  for (const Kernels& kernels : kVariants)
    if (cpu_runs(kernels)) return &kernels;
  return &kVariants[sizeof(kVariants) / sizeof(kVariants[0]) - 1];
}

std::atomic<const Kernels*> g_active{best_variant()};

}  // namespace

const Kernels& active_kernels() { return *g_active.load(std::memory_order_relaxed); }

bool isa_supported(const char* isa) {
  for (const Kernels& kernels : kVariants)
    if (std::strcmp(kernels.isa, isa) == 0) return cpu_runs(kernels);
  return false;
}

bool select_kernels(const char* isa) {
  for (const Kernels& kernels : kVariants) {
    if (std::strcmp(kernels.isa, isa) == 0 && cpu_runs(kernels)) {
      g_active.store(&kernels, std::memory_order_relaxed);
      return true;
    }
  }
  return false;
}

}  // namespace cpu
}  // namespace fastpref
