// jwth_engine._C: the only file that knows about Python.
//
// Arrays cross the boundary as plain descriptors (data_ptr, shape, strides, dtype, device_type,
// device_index) built by jwth_engine._native.array_arg() from a torch tensor, so the module needs
// no libtorch and is independent of PyTorch's C++ ABI. Everything is checked here, with the
// argument's name in the message: wrong dtype -> TypeError; wrong shape, layout, device, or a head
// that does not fit the tokens -> ValueError. The kernels then trust their params struct.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/kernels.h"
#include "decode/nvimgcodec_batch.h"
#ifdef JWTH_WITH_CUDA
#include "cuda/api.h"
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace jwth {
namespace {

enum class Device { kCPU, kCUDA };

struct ArrayArg {
  std::string name;
  uintptr_t ptr = 0;
  std::vector<int64_t> shape, strides;
  DType dtype = DType::kOther;
  std::string dtype_str;
  Device device = Device::kCPU;
  int device_index = 0;
  bool present = false;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  int64_t dim(size_t i) const { return shape[i]; }
  std::string device_str() const {
    return device == Device::kCPU ? std::string("cpu") : "cuda:" + std::to_string(device_index);
  }
  template <typename T = void>
  T* data() const { return reinterpret_cast<T*>(ptr); }
};

std::string join(const std::vector<int64_t>& v) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < v.size(); ++i) s << (i ? ", " : "") << v[i];
  s << "]";
  return s.str();
}

[[noreturn]] void value_error(const std::string& name, const std::string& msg) { throw py::value_error(name + ": " + msg); }
[[noreturn]] void type_error(const std::string& name, const std::string& msg) { throw py::type_error(name + ": " + msg); }

#define JWTH_CHECK_VALUE(COND, NAME, MSG) \
  do {                                    \
    if (!(COND)) value_error(NAME, MSG);  \
  } while (0)

DType parse_dtype(const std::string& s) {
  if (s == "float32") return DType::kFloat32;
  if (s == "float16") return DType::kFloat16;
  if (s == "bfloat16") return DType::kBFloat16;
  if (s == "uint8") return DType::kUInt8;
  if (s == "float64") return DType::kFloat64;
  return DType::kOther;
}

ArrayArg parse_array(py::handle obj, const char* name, bool optional = false) {
  ArrayArg a;
  a.name = name;
  if (obj.is_none()) {
    if (optional) return a;
    type_error(name, "is required, got None");
  }
  if (!py::isinstance<py::tuple>(obj) || py::len(obj) != 6)
    type_error(name, "expected an array descriptor (data_ptr, shape, strides, dtype, device_type, device_index) "
                     "as made by jwth_engine._native.array_arg(tensor), got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  const auto t = py::reinterpret_borrow<py::tuple>(obj);
  try {
    a.ptr = t[0].cast<uintptr_t>();
    a.shape = t[1].cast<std::vector<int64_t>>();
    a.strides = t[2].cast<std::vector<int64_t>>();
    a.dtype_str = t[3].cast<std::string>();
    const std::string dev = t[4].cast<std::string>();
    a.device_index = t[5].cast<int>();
    if (dev == "cpu") a.device = Device::kCPU;
    else if (dev == "cuda") a.device = Device::kCUDA;
    else value_error(name, "device type '" + dev + "' is not supported (cpu or cuda)");
  } catch (const py::cast_error&) {
    type_error(name, "malformed array descriptor; build it with jwth_engine._native.array_arg(tensor)");
  }
  if (a.shape.size() != a.strides.size()) value_error(name, "descriptor has " + std::to_string(a.shape.size()) +
                                                                " dims but " + std::to_string(a.strides.size()) + " strides");
  for (int64_t s : a.shape)
    if (s < 0) value_error(name, "negative size in shape " + join(a.shape));
  a.dtype = parse_dtype(a.dtype_str);
  if (a.numel() > 0 && a.ptr == 0) value_error(name, "null data pointer for a non-empty array");
  a.present = true;
  return a;
}

void expect_dtype(const ArrayArg& a, std::initializer_list<DType> allowed) {
  for (DType d : allowed)
    if (a.dtype == d) return;
  std::string list;
  for (DType d : allowed) list += (list.empty() ? "" : ", ") + std::string(dtype_name(d));
  type_error(a.name, "dtype " + a.dtype_str + " is not supported on " + a.device_str() + "; expected " + list);
}

void expect_shape(const ArrayArg& a, const std::vector<int64_t>& want, const std::string& why = "") {
  if (a.shape != want)
    value_error(a.name, "expected shape " + join(want) + (why.empty() ? "" : " (" + why + ")") + ", got " + join(a.shape));
}

void expect_ndim(const ArrayArg& a, size_t ndim, const std::string& what) {
  if (a.shape.size() != ndim)
    value_error(a.name, "expected " + std::to_string(ndim) + " dims " + what + ", got shape " + join(a.shape));
}

void expect_contiguous(const ArrayArg& a) {
  if (a.numel() == 0) return;  // any strides describe an empty array
  int64_t expected = 1;
  for (size_t i = a.shape.size(); i-- > 0;) {
    if (a.shape[i] != 1 && a.strides[i] != expected)
      value_error(a.name, "must be contiguous (row-major); got strides " + join(a.strides) + " for shape " +
                              join(a.shape) + "; call .contiguous() first");
    expected *= a.shape[i];
  }
}

void expect_same_device(const ArrayArg& a, const ArrayArg& ref) {
  if (a.device != ref.device || a.device_index != ref.device_index)
    value_error(a.name, "is on " + a.device_str() + " but " + ref.name + " is on " + ref.device_str());
}

// A float32, contiguous parameter/output array on the tokens' device with exactly this shape.
ArrayArg float_array(py::handle obj, const char* name, const ArrayArg& tokens, const std::vector<int64_t>& shape,
                     const std::string& why, bool optional = false) {
  ArrayArg a = parse_array(obj, name, optional);
  if (!a.present) return a;
  expect_same_device(a, tokens);
  expect_dtype(a, {DType::kFloat32});
  expect_shape(a, shape, why);
  expect_contiguous(a);
  return a;
}

// The caller-allocated float32 scratch buffer of a kernel: on the tokens' device, at least `need` floats.
ArrayArg workspace_array(py::handle obj, const ArrayArg& tokens, int64_t need, const char* size_fn) {
  ArrayArg ws = parse_array(obj, "workspace");
  expect_same_device(ws, tokens);
  expect_dtype(ws, {DType::kFloat32});
  expect_contiguous(ws);
  JWTH_CHECK_VALUE(ws.numel() >= need, "workspace",
                   "has " + std::to_string(ws.numel()) + " floats, needs " + std::to_string(need) + " (see " +
                       size_fn + ")");
  return ws;
}

const char* device_kind(const ArrayArg& a) { return a.device == Device::kCPU ? "cpu" : "cuda"; }

int resolve_threads(int n) {
  if (n < 0) value_error("num_threads", "must be >= 0 (0 = OpenMP default), got " + std::to_string(n));
  return n;
}

[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "jwth_engine._C was built without CUDA (JWTH_SKIP_CUDA=1 or no nvcc at build time); "
      "rebuild with nvcc on PATH: pip install . (or python setup.py build_ext --inplace)");
}

void check_tokens(const ArrayArg& tokens) {
  expect_ndim(tokens, 3, "[batch, tokens, dim]");
  if (tokens.device == Device::kCPU)
    expect_dtype(tokens, {DType::kFloat32, DType::kBFloat16, DType::kFloat16});
  else
    expect_dtype(tokens, {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
  expect_contiguous(tokens);
  JWTH_CHECK_VALUE(tokens.dim(2) > 0, "tokens", "dim (last axis) must be > 0");
#ifndef JWTH_WITH_CUDA
  if (tokens.device == Device::kCUDA) no_cuda();
#endif
}

// ---- JWTH pooling -------------------------------------------------------------------------------
int64_t jwth_workspace_size(int64_t batch, int64_t num_tokens, int64_t dim, int64_t num_heads,
                            int64_t num_prefix_tokens, int64_t num_classes, const std::string& device_type,
                            int device_index) {
  JWTH_CHECK_VALUE(batch >= 0 && dim > 0 && num_classes > 0, "shape", "batch >= 0, dim > 0, num_classes > 0 required");
  JWTH_CHECK_VALUE(num_heads > 0 && dim % num_heads == 0, "num_heads",
                   "must divide dim " + std::to_string(dim) + ", got " + std::to_string(num_heads));
  const int64_t P = num_tokens - num_prefix_tokens;
  JWTH_CHECK_VALUE(num_prefix_tokens >= 1 && P >= 1, "num_prefix_tokens",
                   "must leave at least one patch token (T = " + std::to_string(num_tokens) + ", prefix = " +
                       std::to_string(num_prefix_tokens) + ")");
  if (device_type == "cpu") return jwth_cpu_workspace(batch, dim, num_heads, num_classes).total;
  if (device_type == "cuda") {
#ifdef JWTH_WITH_CUDA
    return cuda::jwth_workspace_floats(batch, P, dim, num_heads, num_classes, device_index);
#else
    no_cuda();
#endif
  }
  value_error("device_type", "expected 'cpu' or 'cuda', got '" + device_type + "'");
}

void jwth_pool(py::handle tokens_o, py::handle wq_o, py::handle bq_o, py::handle wk_o, py::handle wv_o,
               py::handle bv_o, py::handle wo_o, py::handle bo_o, py::handle wc_o, py::handle bc_o,
               py::handle logits_o, py::handle pooled_o, py::handle attn_o, py::handle workspace_o,
               int64_t num_heads, int64_t num_prefix_tokens, uintptr_t stream, int num_threads) {
  const ArrayArg tokens = parse_array(tokens_o, "tokens");
  check_tokens(tokens);
  const int64_t B = tokens.dim(0), T = tokens.dim(1), D = tokens.dim(2);
  JWTH_CHECK_VALUE(num_heads > 0 && D % num_heads == 0, "num_heads",
                   "must divide the token dim D = " + std::to_string(D) + ", got " + std::to_string(num_heads));
  JWTH_CHECK_VALUE(num_prefix_tokens >= 1 && num_prefix_tokens < T, "num_prefix_tokens",
                   "must be >= 1 (the class token) and leave at least one patch token; tokens have T = " +
                       std::to_string(T) + ", got " + std::to_string(num_prefix_tokens));
  const int64_t H = num_heads, P = T - num_prefix_tokens;
  const std::string from_d = "D = " + std::to_string(D) + " from tokens";

  ArrayArg wc = parse_array(wc_o, "wc");
  expect_same_device(wc, tokens);
  expect_dtype(wc, {DType::kFloat32});
  expect_ndim(wc, 2, "[num_classes, D]");
  JWTH_CHECK_VALUE(wc.dim(1) == D && wc.dim(0) > 0, "wc",
                   "expected shape [num_classes, " + std::to_string(D) + "] (" + from_d + "), got " + join(wc.shape));
  expect_contiguous(wc);
  const int64_t C = wc.dim(0);

  JwthPoolParams p;
  p.tokens = tokens.data<const void>();
  p.tokens_dtype = tokens.dtype;
  p.B = B; p.T = T; p.D = D; p.P = P; p.num_prefix = num_prefix_tokens; p.H = H; p.C = C;
  p.wq = float_array(wq_o, "wq", tokens, {D, D}, from_d).data<const float>();
  p.bq = float_array(bq_o, "bq", tokens, {D}, from_d).data<const float>();
  p.wk = float_array(wk_o, "wk", tokens, {D, D}, from_d).data<const float>();
  p.wv = float_array(wv_o, "wv", tokens, {D, D}, from_d).data<const float>();
  p.bv = float_array(bv_o, "bv", tokens, {D}, from_d).data<const float>();
  p.wo = float_array(wo_o, "wo", tokens, {D, D}, from_d).data<const float>();
  p.bo = float_array(bo_o, "bo", tokens, {D}, from_d).data<const float>();
  p.wc = wc.data<const float>();
  p.bc = float_array(bc_o, "bc", tokens, {C}, "num_classes from wc").data<const float>();
  p.logits = float_array(logits_o, "logits", tokens, {B, C}, "batch x num_classes").data<float>();
  const ArrayArg pooled = float_array(pooled_o, "pooled", tokens, {B, D}, "batch x D", true);
  p.pooled = pooled.present ? pooled.data<float>() : nullptr;
  const ArrayArg attn = float_array(attn_o, "attn", tokens, {B, H, P}, "batch x heads x patch tokens", true);
  p.attn = attn.present ? attn.data<float>() : nullptr;
  const ArrayArg ws = workspace_array(
      workspace_o, tokens,
      jwth_workspace_size(B, T, D, H, num_prefix_tokens, C, device_kind(tokens), tokens.device_index),
      "jwth_workspace_size");
  p.workspace = ws.data<float>();
  p.workspace_floats = ws.numel();
  p.num_threads = resolve_threads(num_threads);
  if (B == 0) return;

  if (tokens.device == Device::kCPU) {
    py::gil_scoped_release release;
    cpu::jwth_pool(p);
    return;
  }
#ifdef JWTH_WITH_CUDA
  JWTH_CHECK_VALUE(D <= cuda::kMaxDim, "tokens",
                   "D = " + std::to_string(D) + " exceeds " + std::to_string(cuda::kMaxDim) +
                       ", the largest the CUDA kernel supports (the CPU kernel has no limit)");
  py::gil_scoped_release release;
  cuda::jwth_pool(p, tokens.device_index, reinterpret_cast<void*>(stream));
#else
  (void)stream;
  no_cuda();
#endif
}

// ---- linear probe -------------------------------------------------------------------------------
int64_t linear_probe_workspace_size(int64_t batch, int64_t dim, int64_t num_classes, const std::string& device_type,
                                    int device_index) {
  JWTH_CHECK_VALUE(batch >= 0 && dim > 0 && num_classes > 0, "shape", "batch >= 0, dim > 0, num_classes > 0 required");
  if (device_type == "cpu") return linear_probe_cpu_workspace(batch, dim, num_classes).total;
  if (device_type == "cuda") {
#ifdef JWTH_WITH_CUDA
    return cuda::linear_probe_workspace_floats(batch, dim, num_classes, device_index);
#else
    no_cuda();
#endif
  }
  value_error("device_type", "expected 'cpu' or 'cuda', got '" + device_type + "'");
}

void linear_probe(py::handle tokens_o, py::handle wc_o, py::handle bc_o, py::handle logits_o, py::handle pooled_o,
                  py::handle workspace_o, uintptr_t stream, int num_threads) {
  const ArrayArg tokens = parse_array(tokens_o, "tokens");
  check_tokens(tokens);
  const int64_t B = tokens.dim(0), T = tokens.dim(1), D = tokens.dim(2);
  JWTH_CHECK_VALUE(T >= 1, "tokens", "need at least the class token (T >= 1)");
  ArrayArg wc = parse_array(wc_o, "wc");
  expect_same_device(wc, tokens);
  expect_dtype(wc, {DType::kFloat32});
  expect_ndim(wc, 2, "[num_classes, D]");
  JWTH_CHECK_VALUE(wc.dim(1) == D && wc.dim(0) > 0, "wc",
                   "expected shape [num_classes, " + std::to_string(D) + "] (D = " + std::to_string(D) +
                       " from tokens), got " + join(wc.shape));
  expect_contiguous(wc);
  const int64_t C = wc.dim(0);
  LinearProbeParams p;
  p.tokens = tokens.data<const void>();
  p.tokens_dtype = tokens.dtype;
  p.B = B; p.T = T; p.D = D; p.C = C;
  p.wc = wc.data<const float>();
  p.bc = float_array(bc_o, "bc", tokens, {C}, "num_classes from wc").data<const float>();
  p.logits = float_array(logits_o, "logits", tokens, {B, C}, "batch x num_classes").data<float>();
  const ArrayArg pooled = float_array(pooled_o, "pooled", tokens, {B, D}, "batch x D", true);
  p.pooled = pooled.present ? pooled.data<float>() : nullptr;
  const ArrayArg ws = workspace_array(
      workspace_o, tokens, linear_probe_workspace_size(B, D, C, device_kind(tokens), tokens.device_index),
      "linear_probe_workspace_size");
  p.workspace = ws.data<float>();
  p.workspace_floats = ws.numel();
  p.num_threads = resolve_threads(num_threads);
  if (B == 0) return;
  if (tokens.device == Device::kCPU) {
    py::gil_scoped_release release;
    cpu::linear_probe(p);
    return;
  }
#ifdef JWTH_WITH_CUDA
  py::gil_scoped_release release;
  cuda::linear_probe(p, tokens.device_index, reinterpret_cast<void*>(stream));
#else
  (void)stream;
  no_cuda();
#endif
}

// ---- preprocessing ------------------------------------------------------------------------------
void preprocess(py::handle src_o, py::handle dst_o, const std::vector<double>& mean, const std::vector<double>& std_,
                uintptr_t stream, int num_threads) {
  const ArrayArg src = parse_array(src_o, "src");
  expect_dtype(src, {DType::kUInt8});
  expect_ndim(src, 4, "[N, height, width, 3]");
  JWTH_CHECK_VALUE(src.dim(3) == 3, "src", "expected 3 channels last (RGB, HWC), got shape " + join(src.shape));
  expect_contiguous(src);
  const ArrayArg dst = parse_array(dst_o, "dst");
  expect_same_device(dst, src);
  expect_dtype(dst, {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
  expect_ndim(dst, 4, "[N, 3, height, width]");
  JWTH_CHECK_VALUE(dst.dim(0) == src.dim(0) && dst.dim(1) == 3, "dst",
                   "expected shape [" + std::to_string(src.dim(0)) + ", 3, H, W] for src " + join(src.shape) +
                       ", got " + join(dst.shape));
  expect_contiguous(dst);
  JWTH_CHECK_VALUE(src.dim(1) > 0 && src.dim(2) > 0, "src", "image size must be > 0, got " + join(src.shape));
  JWTH_CHECK_VALUE(dst.dim(2) > 0 && dst.dim(3) > 0, "dst", "output size must be > 0, got " + join(dst.shape));
  JWTH_CHECK_VALUE(mean.size() == 3, "mean", "expected 3 values, got " + std::to_string(mean.size()));
  JWTH_CHECK_VALUE(std_.size() == 3, "std", "expected 3 values, got " + std::to_string(std_.size()));
  PreprocessParams p;
  for (int c = 0; c < 3; ++c) {
    JWTH_CHECK_VALUE(std::isfinite(std_[size_t(c)]) && std_[size_t(c)] > 0, "std", "values must be finite and > 0");
    JWTH_CHECK_VALUE(std::isfinite(mean[size_t(c)]), "mean", "values must be finite");
    p.scale[c] = float(1.0 / (255.0 * std_[size_t(c)]));
    p.shift[c] = float(-mean[size_t(c)] / std_[size_t(c)]);
  }
  p.src = src.data<const uint8_t>();
  p.N = src.dim(0); p.in_h = src.dim(1); p.in_w = src.dim(2);
  p.dst = dst.data<void>();
  p.dst_dtype = dst.dtype;
  p.out_h = dst.dim(2); p.out_w = dst.dim(3);
  p.num_threads = resolve_threads(num_threads);
  if (p.N == 0) return;
  if (src.device == Device::kCPU) {
    py::gil_scoped_release release;
    cpu::preprocess(p);
    return;
  }
#ifdef JWTH_WITH_CUDA
  JWTH_CHECK_VALUE(p.out_h <= 65535, "dst", "output height must be <= 65535 on CUDA");
  py::gil_scoped_release release;
  cuda::preprocess(p, src.device_index, reinterpret_cast<void*>(stream));
#else
  (void)stream;
  no_cuda();
#endif
}

// ---- nvImageCodec batch decode ---------------------------------------------------------------------

decode::ColourSpec parse_colour_spec(const std::string& s) {
  if (s == "SRGB") return decode::ColourSpec::kSRGB;
  if (s == "SYCC") return decode::ColourSpec::kSYCC;
  if (s == "UNCHANGED") return decode::ColourSpec::kUnchanged;
  value_error("colour", "'" + s + "' is not one of SRGB, SYCC, UNCHANGED");
}

// Stored tiles (bytes) -> caller-allocated uint8 RGB buffers, one per stream, on the decoder's side
// (host for the CPU backend, its GPU otherwise). Each stream holds a tile_w x tile_h image; with
// `regions` (None, or one (x0, y0, x1, y1) or None per stream) only that part is decoded, and its
// output is [y1 - y0, x1 - x0, 3]: pixels and channels packed, rows any stride apart (a view into a
// whole tile's array). Returns one status per tile (decode::TileStatus values). The byte strings
// are held by the caller's list during the call; the GIL is released while decoding.
std::vector<int> nvimgcodec_decode(decode::NvImageCodecBatch& self, const py::list& streams, const py::list& outputs,
                                   const py::object& regions, int tile_h, int tile_w, const std::string& colour,
                                   uintptr_t cuda_stream) {
  const bool gpu = self.gpu();
  const int device_id = self.device_id();
  JWTH_CHECK_VALUE(tile_h > 0 && tile_w > 0, "tile size", "must be positive, got " + std::to_string(tile_w) + " x " +
                                                             std::to_string(tile_h));
  const size_t n = py::len(streams);
  JWTH_CHECK_VALUE(py::len(outputs) == n, "outputs", "has " + std::to_string(py::len(outputs)) + " buffers for " +
                                                         std::to_string(n) + " streams");
  py::list region_list;
  if (!regions.is_none()) {
    region_list = py::list(regions);
    JWTH_CHECK_VALUE(py::len(region_list) == n, "regions", "has " + std::to_string(py::len(region_list)) +
                                                               " items for " + std::to_string(n) + " streams");
  }
  const decode::ColourSpec spec = parse_colour_spec(colour);
  std::vector<decode::TileJob> jobs(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string item_name = "item " + std::to_string(i);
    py::handle item = streams[i];
    if (!PyBytes_Check(item.ptr())) type_error("streams", item_name + " is not bytes");
    decode::TileJob& job = jobs[i];
    job.data = reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(item.ptr()));
    job.size = static_cast<size_t>(PyBytes_GET_SIZE(item.ptr()));
    job.x0 = job.y0 = 0;
    job.x1 = tile_w;
    job.y1 = tile_h;
    if (!regions.is_none() && !region_list[i].is_none()) {
      const auto box = region_list[i].cast<std::vector<int>>();
      JWTH_CHECK_VALUE(box.size() == 4 && box[0] >= 0 && box[1] >= 0 && box[0] < box[2] && box[1] < box[3] &&
                           box[2] <= tile_w && box[3] <= tile_h,
                       "regions", item_name + " is not (x0, y0, x1, y1) inside a " + std::to_string(tile_w) + " x " +
                                      std::to_string(tile_h) + " tile");
      job.x0 = box[0];
      job.y0 = box[1];
      job.x1 = box[2];
      job.y1 = box[3];
    }
    ArrayArg out = parse_array(outputs[i], "outputs");
    expect_dtype(out, {DType::kUInt8});
    expect_shape(out, {job.y1 - job.y0, job.x1 - job.x0, 3}, "the stored tile's region, RGB");
    // Pixels and channels packed, rows any stride apart (uint8: strides are bytes).
    if (out.strides[2] != 1 || out.strides[1] != 3 || out.strides[0] < 3 * int64_t{job.x1 - job.x0})
      value_error("outputs", item_name + " must have packed RGB rows (strides [>= 3 * width, 3, 1]), got strides " +
                                 join(out.strides));
    if (out.device != (gpu ? Device::kCUDA : Device::kCPU) || (gpu && out.device_index != device_id))
      value_error("outputs", item_name + " is on " + out.device_str() + " but the decoder writes to " +
                                 (gpu ? "cuda:" + std::to_string(device_id) : std::string("cpu")));
    job.output = out.ptr;
    job.row_stride = static_cast<size_t>(out.strides[0]);
  }
  std::vector<decode::TileStatus> status;
  {
    py::gil_scoped_release no_gil;
    status = self.decode(jobs, tile_h, tile_w, spec, cuda_stream);
  }
  return std::vector<int>(reinterpret_cast<const int*>(status.data()),
                          reinterpret_cast<const int*>(status.data()) + status.size());
}

}  // namespace
}  // namespace jwth

PYBIND11_MODULE(_C, m) {
  using namespace jwth;
  m.doc() = "jwth_engine native kernels (CPU always; CUDA when compiled with nvcc). Arrays are passed as "
            "descriptors from jwth_engine._native.array_arg(); use jwth_engine.heads.native and "
            "jwth_engine.preprocess rather than calling these directly.";

  m.def("jwth_pool", &jwth::jwth_pool, py::arg("tokens"), py::arg("wq"), py::arg("bq"), py::arg("wk"), py::arg("wv"),
        py::arg("bv"), py::arg("wo"), py::arg("bo"), py::arg("wc"), py::arg("bc"), py::arg("logits"),
        py::arg("pooled").none(true), py::arg("attn").none(true), py::arg("workspace"), py::kw_only(),
        py::arg("num_heads"), py::arg("num_prefix_tokens"), py::arg("stream") = 0, py::arg("num_threads") = 0,
        R"doc(JWTH attention pooling + classifier over tokens [B, T, D] = [class, registers, patches].

Weights are nn.Linear layout ([out, in]) float32 on the tokens' device; the key bias is not needed
(it cancels in the softmax). Writes logits [B, C], and when given pooled [B, D] and attn [B, H, P]
(exact softmax weights), all float32. tokens: float32/bfloat16/float16. `stream` is the
cudaStream_t value for CUDA inputs (ignored on CPU); `num_threads` 0 = OpenMP default.
Releases the GIL.)doc");
  m.def("jwth_workspace_size", &jwth::jwth_workspace_size, py::arg("batch"), py::arg("num_tokens"), py::arg("dim"),
        py::arg("num_heads"), py::arg("num_prefix_tokens"), py::arg("num_classes"), py::arg("device_type"),
        py::arg("device_index") = 0, "Float32 elements of workspace jwth_pool needs for these shapes on this device.");
  m.def("linear_probe", &jwth::linear_probe, py::arg("tokens"), py::arg("wc"), py::arg("bc"), py::arg("logits"),
        py::arg("pooled").none(true), py::arg("workspace"), py::kw_only(), py::arg("stream") = 0,
        py::arg("num_threads") = 0,
        "Linear probe on the class token: logits [B, C] = W_c tokens[:, 0] + b_c; pooled [B, D] = the class "
        "token in float32 (optional). Releases the GIL.");
  m.def("linear_probe_workspace_size", &jwth::linear_probe_workspace_size, py::arg("batch"), py::arg("dim"),
        py::arg("num_classes"), py::arg("device_type"), py::arg("device_index") = 0,
        "Float32 elements of workspace linear_probe needs.");
  m.def("preprocess", &jwth::preprocess, py::arg("src"), py::arg("dst"), py::arg("mean"), py::arg("std"),
        py::kw_only(), py::arg("stream") = 0, py::arg("num_threads") = 0,
        R"doc(uint8 tiles src [N, h, w, 3] -> dst [N, 3, H, W] (float32/float16/bfloat16):
antialiased bilinear resize (torch interpolate(antialias=True, align_corners=False)), then
(x / 255 - mean) / std per channel. Resize is skipped when (h, w) == (H, W). Releases the GIL.)doc");

  m.def("nvimgcodec_compiled", &decode::nvimgcodec_compiled,
        "True if the nvImageCodec batch decoder was compiled in (it opens the library at run time).");
  py::class_<decode::NvImageCodecBatch>(m, "NvImageCodecBatch",
                                        "Batch decoder of stored slide tiles over nvImageCodec's C API.")
      .def(py::init([](const std::string& library, const std::string& extensions, bool gpu, int device_id,
                       int threads) {
             if (threads < 0) value_error("threads", "must be >= 0, got " + std::to_string(threads));
             py::gil_scoped_release no_gil;   // creating decoders loads codec extensions
             return std::make_unique<decode::NvImageCodecBatch>(library, extensions, gpu, device_id, threads);
           }),
           py::arg("library"), py::arg("extensions"), py::kw_only(), py::arg("gpu"), py::arg("device_id") = 0,
           py::arg("threads") = 1,
           R"doc(library: libnvimgcodec.so.0's path; extensions: its codec extension folder. gpu=False: the
CPU backend with `threads` single-threaded decoders; gpu=True: device `device_id`, hardware JPEG
engine first. Raises RuntimeError saying what failed (library, version, instance, decoder).)doc")
      .def("library_version", &decode::NvImageCodecBatch::library_version)
      .def("decode", &nvimgcodec_decode, py::arg("streams"), py::arg("outputs"), py::kw_only(),
           py::arg("regions") = py::none(), py::arg("tile_h"), py::arg("tile_w"), py::arg("colour"),
           py::arg("cuda_stream") = 0,
           R"doc(Decode `streams` (list of bytes, complete JPEG / JPEG 2000 streams of tile_w x tile_h images)
into `outputs` (array descriptors of uint8 RGB buffers where the decoder writes: host memory for the
CPU backend, its device otherwise). regions: None (whole tiles) or one (x0, y0, x1, y1) or None
per stream; an output is [y1 - y0, x1 - x0, 3] ([tile_h, tile_w, 3] for a whole tile), packed
pixels, rows any stride apart. colour: SRGB, SYCC (stored components, no transform) or UNCHANGED.
Returns a status per tile: 0 ok, 1 unparsable, 2 wrong size, 3 decode failed. On the GPU the
decode is ordered on `cuda_stream`. Releases the GIL.)doc");

  m.def("cuda_compiled", [] {
#ifdef JWTH_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True if the CUDA kernels were compiled into this module.");
  m.def("cuda_device_count", [] {
#ifdef JWTH_WITH_CUDA
    return cuda::device_count();
#else
    return 0;
#endif
  }, "GPUs visible to this module's CUDA runtime (0 without a driver).");
  m.def("cuda_runtime_info", [] {
#ifdef JWTH_WITH_CUDA
    return cuda::runtime_info();
#else
    return std::string("not compiled");
#endif
  });
  m.def("cuda_max_dim", [] {
#ifdef JWTH_WITH_CUDA
    return cuda::kMaxDim;
#else
    return int64_t(0);
#endif
  });
  m.def("cpu_isa", &cpu::current_isa, "CPU kernel variant in use.");
  m.def("cpu_isas", &cpu::supported_isas, "CPU kernel variants compiled in and supported by this CPU.");
  m.def("compiled_cpu_isas", &cpu::compiled_isas);
  m.def("set_cpu_isa", &cpu::set_isa, py::arg("isa"), "Select a CPU kernel variant (tests run each one).");
  m.def("openmp", [] {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
  m.def("max_threads", [] {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
}
