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
#include <mutex>
#include <string>
#include <utility>
#include <vector>

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

// An output tensor (uninitialised, as at::empty). Large ones (>= 4 MiB) are allocated on 2 MiB boundaries with
// MADV_HUGEPAGE and, once freed, kept for the next output of the same rounded size (at most kOutCacheBytes in
// all, the least recently freed dropped first). Why: glibc serves such blocks with fresh pages from mmap (its
// dynamic threshold moves to the size of the last freed block, so equal requests keep being mmapped), and the
// kernel faults in and zeroes every page on first touch. Measured on the Intel CPU of BENCHMARKS.md: a
// 4096 x 1024 float32 butterfly forward took 2.0-3.5 ms with fresh huge pages (21 ms in a slow streak of the
// host) and 1.65-1.8 ms in reused memory; a 4096 x 3072 Monarch output cost 24 ms of 4 KiB faults, 3.4 ms of
// huge-page faults, 1.5 ms to refill. Where madvise is refused (no THP) the memory merely faults as usual.
constexpr size_t kOutCacheBytes = size_t(256) << 20;

struct OutCache {
  std::mutex mu;
  std::vector<std::pair<size_t, void*>> free_blocks;  // (capacity, block), least recently freed first
  size_t held = 0;
};

inline OutCache& out_cache() {
  static OutCache* c = new OutCache();  // never destroyed: a tensor may be freed during static destruction
  return *c;
}

inline void release_out(void* p, size_t cap) {
  OutCache& c = out_cache();
  std::vector<void*> drop;
  {
    std::lock_guard<std::mutex> g(c.mu);
    if (cap > kOutCacheBytes) {
      drop.push_back(p);
    } else {
      c.free_blocks.emplace_back(cap, p);
      c.held += cap;
      size_t i = 0;
      for (; c.held > kOutCacheBytes; ++i) {
        c.held -= c.free_blocks[i].first;
        drop.push_back(c.free_blocks[i].second);
      }
      c.free_blocks.erase(c.free_blocks.begin(), c.free_blocks.begin() + i);
    }
  }
  for (void* q : drop) std::free(q);
}

inline at::Tensor empty_out(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  int64_t n = 1;
  for (int64_t v : sizes) n *= v;
  const size_t bytes = size_t(n) * c10::elementSize(c10::typeMetaToScalarType(opt.dtype()));
  constexpr size_t kHuge = size_t(2) << 20;
  if (bytes < (size_t(4) << 20)) return at::empty(sizes, opt);
  const size_t cap = (bytes + kHuge - 1) / kHuge * kHuge;
  void* p = nullptr;
  {
    OutCache& c = out_cache();
    std::lock_guard<std::mutex> g(c.mu);
    for (size_t i = c.free_blocks.size(); i-- > 0;)  // the most recently freed block of this size
      if (c.free_blocks[i].first == cap) {
        p = c.free_blocks[i].second;
        c.held -= cap;
        c.free_blocks.erase(c.free_blocks.begin() + int64_t(i));
        break;
      }
  }
  if (p == nullptr) {
    if (posix_memalign(&p, kHuge, cap) != 0 || p == nullptr) return at::empty(sizes, opt);
    madvise(p, cap, MADV_HUGEPAGE);
  }
  return at::from_blob(p, sizes, [cap](void* q) { release_out(q, cap); }, opt);
}

}  // namespace monarch_seam
