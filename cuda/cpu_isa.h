// ISA selection, cache sizes and large-output allocation shared by the CPU kernels (cuda/monarch.cpp,
// cuda/butterfly_cpu.cpp).
//
// The vectorised kernels are written once with GCC vector extensions and compiled under three
// function-level target attributes (AVX-512, AVX2+FMA, baseline SSE2); isa() says which one this CPU
// runs (MONARCH_SEAM_CPU_ISA=avx512|avx2|base forces a lesser one, for tests). Cache sizes are read
// from the running CPU once, so tile sizes follow the machine at hand instead of constants tuned on one.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>

namespace monarch_seam {

enum Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };
inline const char* isa_name(int i) {
  static const char* names[] = {"base", "avx2", "avx512"};
  return names[i];
}

inline Isa detect_isa() {
  __builtin_cpu_init();
  Isa best = __builtin_cpu_supports("avx512f")                                  ? kAvx512
             : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? kAvx2
                                                                                  : kBase;
  const char* env = std::getenv("MONARCH_SEAM_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  for (int i = 0; i < 3; ++i)
    if (std::string(env) == isa_name(i)) {
      TORCH_CHECK(i <= best, "MONARCH_SEAM_CPU_ISA=", env, " but this CPU supports at most ", isa_name(best));
      return Isa(i);
    }
  TORCH_CHECK(false, "MONARCH_SEAM_CPU_ISA must be avx512, avx2 or base, got ", env);
}

inline Isa isa() {
  static const Isa v = detect_isa();
  return v;
}

// Per-core data cache of the given level in bytes: sysconf first (glibc reads cpuid), then sysfs
// (some hypervisors hide the cpuid leaf), then a conservative default.
inline int64_t read_cache_bytes(int level, int64_t fallback) {
  long v = sysconf(level == 1 ? _SC_LEVEL1_DCACHE_SIZE : _SC_LEVEL2_CACHE_SIZE);
  if (v > 0) return v;
  std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(level == 1 ? 0 : 2) + "/size");
  std::string s;
  if (f >> s && !s.empty()) {
    int64_t n = std::atoll(s.c_str());
    if (s.back() == 'K') n *= 1024;
    if (s.back() == 'M') n *= 1024 * 1024;
    if (n > 0) return n;
  }
  return fallback;
}

inline int64_t l1_bytes() {
  static const int64_t v = read_cache_bytes(1, 32 << 10);
  return v;
}

inline int64_t l2_bytes() {
  static const int64_t v = read_cache_bytes(2, 512 << 10);
  return v;
}

// A fresh output tensor. Large ones (>= 4 MiB) are allocated on 2 MiB boundaries with MADV_HUGEPAGE, i.e. what
// torch's THP_MEM_ALLOC_ENABLE=1 does for every allocation: glibc serves blocks over its mmap threshold (at most
// 32 MiB) with fresh pages, whose first touch costs one page fault per 4 KiB, and on the Intel CPU this was
// measured on those faults cost a 4096 x 3072 float32 output as much time as a third of the Monarch product
// that fills it; with huge pages they become one fault per 2 MiB. Where madvise is refused (no THP in the
// kernel) the memory is still valid and merely faults as usual.
inline at::Tensor empty_out(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  int64_t n = 1;
  for (int64_t v : sizes) n *= v;
  const size_t bytes = size_t(n) * c10::elementSize(c10::typeMetaToScalarType(opt.dtype()));
  constexpr size_t kHuge = size_t(2) << 20;
  if (bytes < (size_t(4) << 20)) return at::empty(sizes, opt);
  const size_t cap = (bytes + kHuge - 1) / kHuge * kHuge;
  void* p = nullptr;
  if (posix_memalign(&p, kHuge, cap) != 0 || p == nullptr) return at::empty(sizes, opt);
  madvise(p, cap, MADV_HUGEPAGE);
  return at::from_blob(p, sizes, [](void* q) { std::free(q); }, opt);
}

}  // namespace monarch_seam
