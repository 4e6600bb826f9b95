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
  bool (*runs_here)();
};

// One `<name>_runs_here()` per listed variant, from its test in isa_list.h.
#if defined(__x86_64__) || defined(__i386__)
#define JWTH_CPU_HAS(FEATURE) (__builtin_cpu_init(), __builtin_cpu_supports(FEATURE) != 0)
#else
#define JWTH_CPU_HAS(FEATURE) false
#endif
#define JWTH_CPU_RUNS_HERE(NS, FLAGS, TEST) \
  [[maybe_unused]] bool NS##_runs_here() { return TEST; }
JWTH_CPU_ISAS(JWTH_CPU_RUNS_HERE)
#undef JWTH_CPU_RUNS_HERE
#undef JWTH_CPU_HAS

const std::vector<Variant>& variants() {
  static const std::vector<Variant> v = {
#define JWTH_CPU_VARIANT(NS, FLAGS, TEST) \
  JWTH_CPU_IF_BUILT(NS)({#NS, &NS::jwth_pool, &NS::linear_probe, &NS::preprocess, &NS##_runs_here},)
      JWTH_CPU_ISAS(JWTH_CPU_VARIANT)
#undef JWTH_CPU_VARIANT
  };
  return v;
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
    if (i >= 0 && variants()[size_t(i)].runs_here()) return i;
    // An unusable override falls back to detection rather than failing every call; set_isa() is
    // the strict interface (it raises).
  }
  const auto& v = variants();
  for (int i = int(v.size()) - 1; i >= 0; --i)
    if (v[size_t(i)].runs_here()) return i;
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
    if (v.runs_here()) out.emplace_back(v.name);
  return out;
}

std::string current_isa() { return current().name; }

void set_isa(const std::string& name) {
  const int i = index_of(name);
  if (i < 0) throw std::invalid_argument("isa: '" + name + "' was not compiled into this build");
  if (!variants()[size_t(i)].runs_here()) throw std::invalid_argument("isa: this CPU does not support '" + name + "'");
  selected().store(i);
}

void jwth_pool(const JwthPoolParams& p) { current().jwth_pool(p); }
void linear_probe(const LinearProbeParams& p) { current().linear_probe(p); }
void preprocess(const PreprocessParams& p) { current().preprocess(p); }

}  // namespace cpu
}  // namespace jwth
