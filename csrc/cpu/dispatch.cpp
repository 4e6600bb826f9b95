// Picks the CPU kernel variant at run time: the widest instruction set that was compiled in and
// that this CPU supports, unless JWTH_CPU_ISA or set_isa() names another.
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/kernels.h"

namespace jwth {
namespace cpu {
namespace {

struct Variant {
  const char* name;
  void (*jwth_pool)(const JwthPoolParams&);
  void (*linear_probe)(const LinearProbeParams&);
  void (*preprocess)(const PreprocessParams&);
};

const std::vector<Variant>& variants() {
  static const std::vector<Variant> v = {
      {"base", &base::jwth_pool, &base::linear_probe, &base::preprocess},
#if defined(JWTH_HAVE_ISA_AVX2)
      {"avx2", &avx2::jwth_pool, &avx2::linear_probe, &avx2::preprocess},
#endif
#if defined(JWTH_HAVE_ISA_AVX512)
      {"avx512", &avx512::jwth_pool, &avx512::linear_probe, &avx512::preprocess},
#endif
  };
  return v;
}

bool cpu_supports(const std::string& name) {
  if (name == "base") return true;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return false;
}

int index_of(const std::string& name) {
  const auto& v = variants();
  for (size_t i = 0; i < v.size(); ++i)
    if (name == v[i].name) return int(i);
  return -1;
}

int best_variant() {
  if (const char* env = std::getenv("JWTH_CPU_ISA")) {
    const int i = index_of(env);
    if (i >= 0 && cpu_supports(env)) return i;
    // An unusable override falls back to detection rather than failing every call; set_isa() is
    // the strict interface (it raises).
  }
  const auto& v = variants();
  for (int i = int(v.size()) - 1; i >= 0; --i)
    if (cpu_supports(v[size_t(i)].name)) return i;
  return 0;
}

std::atomic<int>& selected() {
  static std::atomic<int> s{best_variant()};
  return s;
}

const Variant& current() { return variants()[size_t(selected().load())]; }

}  // namespace

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (const auto& v : variants()) out.emplace_back(v.name);
  return out;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const auto& v : variants())
    if (cpu_supports(v.name)) out.emplace_back(v.name);
  return out;
}

std::string current_isa() { return current().name; }

void set_isa(const std::string& name) {
  const int i = index_of(name);
  if (i < 0) throw std::invalid_argument("isa: '" + name + "' was not compiled into this build");
  if (!cpu_supports(name)) throw std::invalid_argument("isa: this CPU does not support '" + name + "'");
  selected().store(i);
}

void jwth_pool(const JwthPoolParams& p) { current().jwth_pool(p); }
void linear_probe(const LinearProbeParams& p) { current().linear_probe(p); }
void preprocess(const PreprocessParams& p) { current().preprocess(p); }

}  // namespace cpu
}  // namespace jwth
