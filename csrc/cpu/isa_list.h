// The CPU kernel variants, written once. Each line: X(name, compile flags, runs-here test).
//   name   the namespace kernels.cpp is compiled into and the name JWTH_CPU_ISA / set_isa() take
//   flags  the -m flags of that variant; CMakeLists.txt reads names and flags from this file with a
//          regex, so each entry starts its own line with `X(name, "flags",`
//   test   an expression true when this CPU can run the variant; JWTH_CPU_HAS(feature) is defined
//          by its user (dispatch.cpp) as __builtin_cpu_supports where that exists
// Narrowest first: dispatch.cpp takes the last one this CPU supports, and the first (no flags) is
// always built and always runs.
#pragma once

// clang-format off
#define JWTH_CPU_ISAS(X)                                                                                         \
  X(base, "", true)                                                                                              \
  X(avx2, "-mavx2 -mfma -mf16c", JWTH_CPU_HAS("avx2") && JWTH_CPU_HAS("fma"))                                    \
  X(avx512, "-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c", JWTH_CPU_HAS("avx512f") &&          \
    JWTH_CPU_HAS("avx512bw") && JWTH_CPU_HAS("avx512vl") && JWTH_CPU_HAS("avx512dq") && JWTH_CPU_HAS("avx2") &&  \
    JWTH_CPU_HAS("fma"))
// clang-format on

// JWTH_CPU_IF_BUILT(name)(tokens...) keeps its tokens only for a variant CMakeLists.txt compiled
// (it defines JWTH_HAVE_ISA_<name> to 1 or 0 for every entry above).
#define JWTH_CPU_CAT_(a, b) a##b
#define JWTH_CPU_CAT(a, b) JWTH_CPU_CAT_(a, b)
#define JWTH_CPU_IF_BUILT(NAME) JWTH_CPU_CAT(JWTH_CPU_KEEP_, JWTH_HAVE_ISA_##NAME)
#define JWTH_CPU_KEEP_1(...) __VA_ARGS__
#define JWTH_CPU_KEEP_0(...)
