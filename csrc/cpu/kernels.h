// CPU kernels. kernels.cpp is compiled once per instruction set into its own namespace (the list
// is JWTH_CPU_ISAS in isa_list.h, which CMakeLists.txt reads too); dispatch.cpp picks one at run
// time, so a wheel built on one machine runs everywhere and still uses AVX2/AVX-512 where present.
#pragma once

#include <string>
#include <vector>

#include "common.h"
#include "cpu/isa_list.h"

namespace jwth {
namespace cpu {

// Declared for every listed variant; only the built ones are referenced (dispatch.cpp).
#define JWTH_DECLARE_CPU_ISA(NS, FLAGS, TEST)             \
  namespace NS {                                          \
  void jwth_pool(const JwthPoolParams& p);                \
  void linear_probe(const LinearProbeParams& p);          \
  void preprocess(const PreprocessParams& p);             \
  int vector_width();                                     \
  }
JWTH_CPU_ISAS(JWTH_DECLARE_CPU_ISA)
#undef JWTH_DECLARE_CPU_ISA

// Runtime selection (dispatch.cpp). The choice is made once from the CPU's features and may be
// overridden with JWTH_CPU_ISA=<name in isa_list.h> or set_isa() (tests run every variant).
std::vector<std::string> compiled_isas();
std::vector<std::string> supported_isas();  // compiled and runnable on this CPU
std::string current_isa();
void set_isa(const std::string& name);      // throws std::invalid_argument if unsupported

void jwth_pool(const JwthPoolParams& p);
void linear_probe(const LinearProbeParams& p);
void preprocess(const PreprocessParams& p);

}  // namespace cpu
}  // namespace jwth
