// CUDA kernels for the JWTH attention-pooling head and the linear probe.
//
// Same three stages as the CPU path (see cpu/kernels.cpp):
//   A  class tokens -> fp32, q = W_q c + b_q, u_h = W_k,h^T q_h / sqrt(d)      (small GEMMs)
//   B  token pass: each block streams a chunk of one tile's patch tokens through shared memory once
//      (16-byte cp.async copies, double-buffered), computes the H scores per token, keeps an online
//      softmax and z_h = sum_i a_hi p_i in fp32 registers; a combine kernel merges the chunks
//      (flash-decoding style split over tokens, so B = 1..64 tiles still fill the GPU)
//   C  o_h = W_v,h z_h + b_v,h, pooled = W_o o + b_o, logits = W_c pooled + b_c   (small GEMMs)
// Everything runs on the caller's stream; nothing here allocates or synchronises.
//
// This file plans (launch shapes, workspace layout) and runs the stages in order; the kernels live
// in attn_pool_gemm.cu (A, C), attn_pool_tokens.cu and attn_pool_combine.cu (B).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "cuda/api.h"
#include "cuda/attn_pool.cuh"
#include "cuda/check.cuh"

namespace jwth {
namespace cuda {

using namespace attn;

namespace {

// ---- planning: launch shapes and the workspace layout, one function for the query and the run ------
TokenPassConfig token_pass_config(int64_t D, int64_t H) {
  TokenPassConfig c;
  for (int cpt : kTokenPassCpts) {
    if (ceil_div(D, cpt) <= kMaxColumnThreads) {
      c.cpt = cpt;
      break;
    }
  }
  if (c.cpt == 0) throw std::invalid_argument("tokens: D = " + std::to_string(D) + " exceeds " + std::to_string(kMaxDim) +
                                              ", the largest the CUDA token-pass kernel supports");
  c.ct = int(round_up(ceil_div(D, c.cpt), 32));
  c.hs = int(std::max<int64_t>(1, std::min<int64_t>(ceil_div(H, kHPT), kMaxThreads / c.ct)));
  c.hb = kHPT * c.hs;
  c.groups = int(ceil_div(H, c.hb));
  c.threads = c.hs * c.ct;
  return c;
}

struct JwthPlan {
  TokenPassConfig tp;
  int sms = 0, nchunks = 0, chunk_tokens = 0;
  int64_t xc = 0, q = 0, u = 0, pz = 0, pm = 0, pl = 0, z = 0, o = 0, pooled = 0, partial = 0, total = 0;
};

JwthPlan make_jwth_plan(int64_t B, int64_t P, int64_t D, int64_t H, int64_t C, int device) {
  JwthPlan p;
  p.tp = token_pass_config(D, H);
  p.sms = device_props(device).sm_count;
  // About two blocks per SM over (head groups x chunks x tiles); chunks of whole sub-chunks.
  const int64_t want = ceil_div(2 * int64_t(p.sms), std::max<int64_t>(1, B * p.tp.groups));
  const int64_t max_chunks = std::min<int64_t>(kMaxChunks, ceil_div(P, kNS));
  const int64_t nchunks = std::max<int64_t>(1, std::min(want, max_chunks));
  p.chunk_tokens = int(round_up(ceil_div(P, nchunks), kNS));
  p.nchunks = int(ceil_div(P, p.chunk_tokens));
  const int64_t d = D / H;
  int64_t off = 0;
  p.xc = off; off += B * D;
  p.q = off; off += B * D;
  p.u = off; off += B * H * D;
  p.pz = off; off += B * p.nchunks * H * D;
  p.pm = off; off += B * p.nchunks * H;
  p.pl = off; off += B * p.nchunks * H;
  p.z = off; off += B * H * D;
  p.o = off; off += B * D;
  p.pooled = off; off += B * D;
  p.partial = off;
  int64_t partial = 0;
  partial = std::max(partial, gemm_partial_floats(B, D, D, 1, p.sms));  // q, pooled
  partial = std::max(partial, gemm_partial_floats(B, D, d, H, p.sms));  // u
  partial = std::max(partial, gemm_partial_floats(B, d, D, H, p.sms));  // o
  partial = std::max(partial, gemm_partial_floats(B, C, D, 1, p.sms));  // logits
  off += partial;
  p.total = off;
  return p;
}

}  // namespace

int64_t jwth_workspace_floats(int64_t B, int64_t P, int64_t D, int64_t H, int64_t C, int device) {
  DeviceGuard guard(device);
  return make_jwth_plan(B, P, D, H, C, device).total;
}

void jwth_pool(const JwthPoolParams& p, int device, void* stream_handle) {
  if (p.B == 0) return;
  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  const int64_t B = p.B, D = p.D, H = p.H, C = p.C, d = D / H;
  const JwthPlan plan = make_jwth_plan(B, p.P, D, H, C, device);
  if (p.workspace_floats < plan.total)
    throw std::invalid_argument("workspace: " + std::to_string(p.workspace_floats) + " floats given, " +
                                std::to_string(plan.total) + " needed");
  float* w = p.workspace;
  float *xc = w + plan.xc, *q = w + plan.q, *u = w + plan.u, *z = w + plan.z, *o = w + plan.o;
  float* partial = w + plan.partial;
  float* pooled = p.pooled ? p.pooled : w + plan.pooled;

  launch_gather(p.tokens_dtype, p.tokens, B, p.T, D, xc, nullptr, plan.sms, stream);

  GemmArgs g;  // q = W_q c + b_q
  g.a = xc; g.a_sm = D; g.a_sk = 1;
  g.b = p.wq; g.b_sk = 1; g.b_sn = D;
  g.bias = p.bq; g.c = q; g.c_sm = D;
  g.M = int(B); g.N = int(D); g.K = int(D);
  launch_gemm(g, partial, plan.sms, stream);

  g = GemmArgs();  // u_h = W_k,h^T q_h / sqrt(d), one batch entry per head
  g.a = q; g.a_sm = D; g.a_sk = 1; g.a_sb = d;
  g.b = p.wk; g.b_sk = D; g.b_sn = 1; g.b_sb = d * D;
  g.c = u; g.c_sm = H * D; g.c_sb = D;
  g.M = int(B); g.N = int(D); g.K = int(d); g.batch = int(H);
  g.alpha = 1.f / std::sqrt(float(d));
  launch_gemm(g, partial, plan.sms, stream);

  TokenPassArgs args;
  args.tokens = p.tokens; args.B = B; args.T = p.T; args.D = D; args.P = p.P; args.num_prefix = p.num_prefix;
  args.H = int(H); args.u = u;
  args.pz = w + plan.pz; args.pm = w + plan.pm; args.pl = w + plan.pl; args.scores = p.attn;
  args.ct = plan.tp.ct; args.hs = plan.tp.hs; args.hb = plan.tp.hb;
  args.nchunks = plan.nchunks; args.chunk_tokens = plan.chunk_tokens;
  launch_token_pass(p.tokens_dtype, plan.tp, args, stream, device);
  launch_combine(args, z, p.attn, stream);

  g = GemmArgs();  // o_h = W_v,h z_h + b_v,h
  g.a = z; g.a_sm = H * D; g.a_sk = 1; g.a_sb = D;
  g.b = p.wv; g.b_sk = 1; g.b_sn = D; g.b_sb = d * D;
  g.bias = p.bv; g.bias_sb = d;
  g.c = o; g.c_sm = D; g.c_sb = d;
  g.M = int(B); g.N = int(d); g.K = int(D); g.batch = int(H);
  launch_gemm(g, partial, plan.sms, stream);

  g = GemmArgs();  // pooled = W_o o + b_o
  g.a = o; g.a_sm = D; g.a_sk = 1;
  g.b = p.wo; g.b_sk = 1; g.b_sn = D;
  g.bias = p.bo; g.c = pooled; g.c_sm = D;
  g.M = int(B); g.N = int(D); g.K = int(D);
  launch_gemm(g, partial, plan.sms, stream);

  g = GemmArgs();  // logits = W_c pooled + b_c
  g.a = pooled; g.a_sm = D; g.a_sk = 1;
  g.b = p.wc; g.b_sk = 1; g.b_sn = D;
  g.bias = p.bc; g.c = p.logits; g.c_sm = C;
  g.M = int(B); g.N = int(C); g.K = int(D);
  launch_gemm(g, partial, plan.sms, stream);
}

int64_t linear_probe_workspace_floats(int64_t B, int64_t D, int64_t C, int device) {
  DeviceGuard guard(device);
  return B * D + gemm_partial_floats(B, C, D, 1, device_props(device).sm_count);
}

void linear_probe(const LinearProbeParams& p, int device, void* stream_handle) {
  if (p.B == 0) return;
  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  const int sms = device_props(device).sm_count;
  const int64_t need = p.B * p.D + gemm_partial_floats(p.B, p.C, p.D, 1, sms);
  if (p.workspace_floats < need)
    throw std::invalid_argument("workspace: " + std::to_string(p.workspace_floats) + " floats given, " +
                                std::to_string(need) + " needed");
  float* xc = p.workspace;
  launch_gather(p.tokens_dtype, p.tokens, p.B, p.T, p.D, xc, p.pooled, sms, stream);
  GemmArgs g;
  g.a = xc; g.a_sm = p.D; g.a_sk = 1;
  g.b = p.wc; g.b_sk = 1; g.b_sn = p.D;
  g.bias = p.bc; g.c = p.logits; g.c_sm = p.C;
  g.M = int(p.B); g.N = int(p.C); g.K = int(p.D);
  launch_gemm(g, p.workspace + p.B * p.D, sms, stream);
}

}  // namespace cuda
}  // namespace jwth
