// CPU kernels. kernels.cpp is compiled once per instruction set into its own namespace
// (JWTH_CPU_ISA_LIST below, mirrored in CMakeLists.txt); dispatch.cpp picks one at run time, so a
// wheel built on one machine runs everywhere and still uses AVX2/AVX-512 where present.
#pragma once

#include <string>
#include <vector>

#include "common.h"

namespace jwth {
namespace cpu {

#define JWTH_DECLARE_CPU_ISA(NS)                          \
  namespace NS {                                          \
  void jwth_pool(const JwthPoolParams& p);                \
  void linear_probe(const LinearProbeParams& p);          \
  void preprocess(const PreprocessParams& p);             \
  int vector_width();                                     \
  }

JWTH_DECLARE_CPU_ISA(base)
#if defined(JWTH_HAVE_ISA_AVX2)
JWTH_DECLARE_CPU_ISA(avx2)
#endif
#if defined(JWTH_HAVE_ISA_AVX512)
JWTH_DECLARE_CPU_ISA(avx512)
#endif

// Runtime selection (dispatch.cpp). The choice is made once from the CPU's features and may be
// overridden with JWTH_CPU_ISA=base|avx2|avx512 or set_isa() (tests run every variant).
std::vector<std::string> compiled_isas();
std::vector<std::string> supported_isas();  // compiled and runnable on this CPU
std::string current_isa();
void set_isa(const std::string& name);      // throws std::invalid_argument if unsupported

void jwth_pool(const JwthPoolParams& p);
void linear_probe(const LinearProbeParams& p);
void preprocess(const PreprocessParams& p);

}  // namespace cpu
}  // namespace jwth
