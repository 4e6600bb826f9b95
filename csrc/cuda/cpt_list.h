// The columns per thread (CPT) the CUDA token-pass kernel is instantiated for, written once: the
// planner (attn_pool.cu) takes the smallest that covers D with at most kMaxColumnThreads threads per
// head slice, and the launch (attn_pool_tokens.cu) has one switch case, one instantiation, per entry.
// Ascending. Plain C++, so host-only code may include it.
#pragma once

#include <cstdint>

#define JWTH_TOKEN_PASS_CPTS(X) X(4) X(8) X(12) X(16)

namespace jwth {
namespace cuda {

#define JWTH_CPT_ENTRY_(CPT) CPT,
constexpr int kTokenPassCpts[] = {JWTH_TOKEN_PASS_CPTS(JWTH_CPT_ENTRY_)};
#undef JWTH_CPT_ENTRY_
constexpr int kNumTokenPassCpts = int(sizeof(kTokenPassCpts) / sizeof(kTokenPassCpts[0]));

constexpr int kMaxColumnThreads = 128;  // threads sharing one head slice's columns
// The largest D the token-pass kernel is instantiated for.
constexpr int64_t kMaxDim = int64_t(kMaxColumnThreads) * kTokenPassCpts[kNumTokenPassCpts - 1];

}  // namespace cuda
}  // namespace jwth
