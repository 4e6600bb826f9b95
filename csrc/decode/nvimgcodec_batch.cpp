// See nvimgcodec_batch.h. Everything nvImageCodec-specific is in this file.
#include "decode/nvimgcodec_batch.h"

#include <stdexcept>

#ifdef JWTH_WITH_NVIMGCODEC
#include <dlfcn.h>
#include <nvimgcodec.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>
#endif

namespace jwth::decode {

#ifndef JWTH_WITH_NVIMGCODEC

bool nvimgcodec_compiled() { return false; }

struct NvImageCodecBatch::Impl {};

NvImageCodecBatch::NvImageCodecBatch(const std::string&, const std::string&, bool, int, int) {
  throw std::runtime_error("jwth_engine._C was built without the nvImageCodec header");
}
NvImageCodecBatch::~NvImageCodecBatch() = default;
std::vector<TileStatus> NvImageCodecBatch::decode(const std::vector<TileJob>&, int, int, ColourSpec, uintptr_t) {
  return {};
}
std::string NvImageCodecBatch::library_version() const { return ""; }
bool NvImageCodecBatch::gpu() const { return false; }
int NvImageCodecBatch::device_id() const { return 0; }

#else

bool nvimgcodec_compiled() { return true; }

namespace {

// The C API entry points used here, resolved from the library opened at run time.
struct Api {
#define JWTH_NVIMGCODEC_FN(name) decltype(&::name) name = nullptr;
#define JWTH_NVIMGCODEC_FNS(X)                                                                       \
  X(nvimgcodecGetProperties) X(nvimgcodecInstanceCreate) X(nvimgcodecInstanceDestroy)                \
  X(nvimgcodecDecoderCreate) X(nvimgcodecDecoderDestroy) X(nvimgcodecDecoderDecode)                  \
  X(nvimgcodecCodeStreamCreateFromHostMem) X(nvimgcodecCodeStreamDestroy)                            \
  X(nvimgcodecCodeStreamGetImageInfo) X(nvimgcodecCodeStreamGetSubCodeStream)                      \
  X(nvimgcodecImageCreate) X(nvimgcodecImageDestroy)                                                 \
  X(nvimgcodecFutureWaitForAll) X(nvimgcodecFutureGetProcessingStatus) X(nvimgcodecFutureDestroy)
  JWTH_NVIMGCODEC_FNS(JWTH_NVIMGCODEC_FN)
#undef JWTH_NVIMGCODEC_FN
  void* handle = nullptr;

  explicit Api(const std::string& library) {
    // RTLD_LOCAL: its symbols stay out of the global namespace (the Python module may hold the
    // same library; dlopen then returns that handle).
    handle = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* why = dlerror();
      throw std::runtime_error("cannot open " + library + ": " + (why ? why : "unknown error"));
    }
#define JWTH_NVIMGCODEC_SYM(name)                                                                    \
  name = reinterpret_cast<decltype(name)>(dlsym(handle, #name));                                     \
  if (name == nullptr) throw std::runtime_error(library + " has no symbol " #name);
    JWTH_NVIMGCODEC_FNS(JWTH_NVIMGCODEC_SYM)
#undef JWTH_NVIMGCODEC_SYM
  }
  ~Api() {
    if (handle != nullptr) dlclose(handle);
  }
#undef JWTH_NVIMGCODEC_FNS
};

template <typename T>
T structure(nvimgcodecStructureType_t type) {
  T value{};
  value.struct_type = type;
  value.struct_size = sizeof(T);
  return value;
}

// What each ColourSpec asks of the decoder. Matched to nvImageCodec's Python `decode` on the test
// slides (equal pixels): SYCC returns the stored components without a colour transform.
struct OutputFormat {
  nvimgcodecColorSpec_t colour;
  nvimgcodecSampleFormat_t samples;
};
OutputFormat output_format(ColourSpec spec) {
  switch (spec) {
    case ColourSpec::kSYCC: return {NVIMGCODEC_COLORSPEC_SYCC, NVIMGCODEC_SAMPLEFORMAT_I_YUV};
    case ColourSpec::kUnchanged: return {NVIMGCODEC_COLORSPEC_UNCHANGED, NVIMGCODEC_SAMPLEFORMAT_I_UNCHANGED};
    case ColourSpec::kSRGB: break;
  }
  return {NVIMGCODEC_COLORSPEC_SRGB, NVIMGCODEC_SAMPLEFORMAT_I_RGB};
}

}  // namespace

struct NvImageCodecBatch::Impl {
  Api api;
  bool gpu;
  int device_id;
  nvimgcodecInstance_t instance = nullptr;
  std::vector<nvimgcodecDecoder_t> decoders;   // CPU: one single-threaded decoder per thread
  std::mutex busy;                             // one decode call at a time

  Impl(const std::string& library, const std::string& extensions, bool gpu_, int device, int threads)
      : api(library), gpu(gpu_), device_id(device) {
    auto props = structure<nvimgcodecProperties_t>(NVIMGCODEC_STRUCTURE_TYPE_PROPERTIES);
    if (api.nvimgcodecGetProperties(&props) != NVIMGCODEC_STATUS_SUCCESS)
      throw std::runtime_error("nvimgcodecGetProperties failed");
    if (NVIMGCODEC_MAJOR_FROM_SEMVER(props.version) != NVIMGCODEC_VER_MAJOR ||
        NVIMGCODEC_MINOR_FROM_SEMVER(props.version) != NVIMGCODEC_VER_MINOR)
      throw std::runtime_error("nvImageCodec " + version(props.version) + " is installed but jwth_engine._C was built "
                               "against " + std::to_string(NVIMGCODEC_VER_MAJOR) + "." +
                               std::to_string(NVIMGCODEC_VER_MINOR));
    auto info = structure<nvimgcodecInstanceCreateInfo_t>(NVIMGCODEC_STRUCTURE_TYPE_INSTANCE_CREATE_INFO);
    info.load_builtin_modules = 1;
    info.load_extension_modules = 1;
    info.extension_modules_path = extensions.c_str();
    info.create_debug_messenger = 0;   // failures are reported per tile, by status
    if (api.nvimgcodecInstanceCreate(&instance, &info) != NVIMGCODEC_STATUS_SUCCESS)
      throw std::runtime_error("nvimgcodecInstanceCreate failed (extensions: " + extensions + ")");

    std::vector<nvimgcodecBackend_t> backends;
    auto add = [&](nvimgcodecBackendKind_t kind) {
      auto backend = structure<nvimgcodecBackend_t>(NVIMGCODEC_STRUCTURE_TYPE_BACKEND);
      backend.kind = kind;
      backend.params = structure<nvimgcodecBackendParams_t>(NVIMGCODEC_STRUCTURE_TYPE_BACKEND_PARAMS);
      backend.params.load_hint = 1.0f;
      backend.params.load_hint_policy = NVIMGCODEC_LOAD_HINT_POLICY_FIXED;
      backends.push_back(backend);
    };
    if (gpu) {
      // Preference order: the hardware JPEG engine (A100, H100, ...), then the CUDA decoders. No
      // CPU-only backend: its output would be in host memory.
      add(NVIMGCODEC_BACKEND_KIND_HW_GPU_ONLY);
      add(NVIMGCODEC_BACKEND_KIND_GPU_ONLY);
      add(NVIMGCODEC_BACKEND_KIND_HYBRID_CPU_GPU);
    } else {
      add(NVIMGCODEC_BACKEND_KIND_CPU_ONLY);
    }
    auto exec = structure<nvimgcodecExecutionParams_t>(NVIMGCODEC_STRUCTURE_TYPE_EXECUTION_PARAMS);
    exec.device_id = gpu ? device_id : NVIMGCODEC_DEVICE_CPU_ONLY;
    // CPU: nvImageCodec's executor keeps a core free, so one decoder per thread, each with one.
    exec.max_num_cpu_threads = gpu ? std::max(0, threads) : 1;
    exec.num_backends = static_cast<int>(backends.size());
    exec.backends = backends.data();
    const int count = gpu ? 1 : std::max(1, threads);
    for (int i = 0; i < count; ++i) {
      nvimgcodecDecoder_t decoder = nullptr;
      // options "": libjpeg's defaults (fancy upsampling on), as OpenSlide and cuCIM decode.
      if (api.nvimgcodecDecoderCreate(instance, &decoder, &exec, "") != NVIMGCODEC_STATUS_SUCCESS || !decoder) {
        release();
        throw std::runtime_error(std::string("nvimgcodecDecoderCreate failed for the ") + (gpu ? "GPU" : "CPU") +
                                 " backend");
      }
      decoders.push_back(decoder);
    }
  }

  ~Impl() { release(); }

  void release() {
    for (auto decoder : decoders) api.nvimgcodecDecoderDestroy(decoder);
    decoders.clear();
    if (instance != nullptr) api.nvimgcodecInstanceDestroy(instance);
    instance = nullptr;
  }

  static std::string version(uint32_t v) {
    return std::to_string(NVIMGCODEC_MAJOR_FROM_SEMVER(v)) + "." + std::to_string(NVIMGCODEC_MINOR_FROM_SEMVER(v)) +
           "." + std::to_string(NVIMGCODEC_PATCH_FROM_SEMVER(v));
  }

  // The code stream to decode for `job`: the tile's own, or a view of its region (owned in `views`).
  // nullptr when the region cannot be set (a failure to decode).
  nvimgcodecCodeStream_t region_of(nvimgcodecCodeStream_t tile, const TileJob& job, int tile_h, int tile_w,
                                   std::vector<nvimgcodecCodeStream_t>& views) {
    if (job.x0 == 0 && job.y0 == 0 && job.x1 == tile_w && job.y1 == tile_h) return tile;
    auto view = structure<nvimgcodecCodeStreamView_t>(NVIMGCODEC_STRUCTURE_TYPE_CODE_STREAM_VIEW);
    view.image_idx = 0;
    view.region = structure<nvimgcodecRegion_t>(NVIMGCODEC_STRUCTURE_TYPE_REGION);
    view.region.ndim = 2;
    view.region.start[0] = job.y0;
    view.region.start[1] = job.x0;
    view.region.end[0] = job.y1;
    view.region.end[1] = job.x1;
    nvimgcodecCodeStream_t sub = nullptr;              // must be null: a non-null handle is reused
    if (api.nvimgcodecCodeStreamGetSubCodeStream(tile, &sub, &view) != NVIMGCODEC_STATUS_SUCCESS) {
      if (sub != nullptr) api.nvimgcodecCodeStreamDestroy(sub);
      return nullptr;
    }
    views.push_back(sub);
    return sub;
  }

  // Decodes jobs [begin, end) with one decoder call; statuses written for each.
  void decode_range(nvimgcodecDecoder_t decoder, size_t begin, size_t end, const std::vector<TileJob>& jobs,
                    int tile_h, int tile_w, OutputFormat format, uintptr_t cuda_stream, std::vector<TileStatus>& status) {
    std::vector<nvimgcodecCodeStream_t> tiles, views, code_streams;   // destroyed: views first, then tiles
    std::vector<nvimgcodecImage_t> images;
    std::vector<size_t> which;
    tiles.reserve(end - begin);
    code_streams.reserve(end - begin);
    images.reserve(end - begin);
    for (size_t i = begin; i < end; ++i) {
      const TileJob& job = jobs[i];
      nvimgcodecCodeStream_t code_stream = nullptr;   // must be null, as above
      auto info = structure<nvimgcodecImageInfo_t>(NVIMGCODEC_STRUCTURE_TYPE_IMAGE_INFO);
      if (api.nvimgcodecCodeStreamCreateFromHostMem(instance, &code_stream, job.data, job.size, nullptr) !=
              NVIMGCODEC_STATUS_SUCCESS ||
          api.nvimgcodecCodeStreamGetImageInfo(code_stream, &info) != NVIMGCODEC_STATUS_SUCCESS) {
        if (code_stream != nullptr) api.nvimgcodecCodeStreamDestroy(code_stream);
        status[i] = TileStatus::kUnparsable;
        continue;
      }
      tiles.push_back(code_stream);
      if (info.plane_info[0].width != static_cast<uint32_t>(tile_w) ||
          info.plane_info[0].height != static_cast<uint32_t>(tile_h)) {
        status[i] = TileStatus::kWrongSize;
        continue;
      }
      nvimgcodecCodeStream_t source = region_of(code_stream, job, tile_h, tile_w, views);
      if (source == nullptr) {
        status[i] = TileStatus::kDecodeFailed;
        continue;
      }
      info.color_spec = format.colour;
      info.sample_format = format.samples;
      info.chroma_subsampling = NVIMGCODEC_SAMPLING_NONE;
      info.num_planes = 1;
      auto& plane = info.plane_info[0];
      plane.width = static_cast<uint32_t>(job.x1 - job.x0);
      plane.height = static_cast<uint32_t>(job.y1 - job.y0);
      plane.num_channels = 3;
      plane.row_stride = job.row_stride;
      plane.sample_type = NVIMGCODEC_SAMPLE_DATA_TYPE_UINT8;
      plane.precision = 0;
      info.buffer = reinterpret_cast<void*>(job.output);
      info.buffer_kind = gpu ? NVIMGCODEC_IMAGE_BUFFER_KIND_STRIDED_DEVICE : NVIMGCODEC_IMAGE_BUFFER_KIND_STRIDED_HOST;
      info.cuda_stream = reinterpret_cast<cudaStream_t>(cuda_stream);
      nvimgcodecImage_t image = nullptr;              // must be null, as above
      if (api.nvimgcodecImageCreate(instance, &image, &info) != NVIMGCODEC_STATUS_SUCCESS) {
        status[i] = TileStatus::kDecodeFailed;
        continue;
      }
      code_streams.push_back(source);
      images.push_back(image);
      which.push_back(i);
    }
    if (!code_streams.empty()) {
      auto params = structure<nvimgcodecDecodeParams_t>(NVIMGCODEC_STRUCTURE_TYPE_DECODE_PARAMS);
      params.apply_exif_orientation = 0;
      nvimgcodecFuture_t future = nullptr;
      std::vector<nvimgcodecProcessingStatus_t> done(code_streams.size(), NVIMGCODEC_PROCESSING_STATUS_UNKNOWN);
      if (api.nvimgcodecDecoderDecode(decoder, code_streams.data(), images.data(), static_cast<int>(code_streams.size()),
                                      &params, &future) == NVIMGCODEC_STATUS_SUCCESS && future != nullptr) {
        api.nvimgcodecFutureWaitForAll(future);
        size_t size = done.size();
        api.nvimgcodecFutureGetProcessingStatus(future, done.data(), &size);
        api.nvimgcodecFutureDestroy(future);
      }
      for (size_t k = 0; k < which.size(); ++k)
        status[which[k]] = done[k] == NVIMGCODEC_PROCESSING_STATUS_SUCCESS ? TileStatus::kOk : TileStatus::kDecodeFailed;
      for (auto image : images) api.nvimgcodecImageDestroy(image);
    }
    for (auto view : views) api.nvimgcodecCodeStreamDestroy(view);
    for (auto tile : tiles) api.nvimgcodecCodeStreamDestroy(tile);
  }
};

NvImageCodecBatch::NvImageCodecBatch(const std::string& library, const std::string& extensions, bool gpu,
                                     int device_id, int threads)
    : impl_(std::make_unique<Impl>(library, extensions, gpu, device_id, threads)) {}

NvImageCodecBatch::~NvImageCodecBatch() = default;

std::vector<TileStatus> NvImageCodecBatch::decode(const std::vector<TileJob>& jobs, int tile_h, int tile_w,
                                                  ColourSpec colour, uintptr_t cuda_stream) {
  if (tile_h <= 0 || tile_w <= 0) throw std::invalid_argument("tile size must be positive");
  for (const TileJob& job : jobs)
    if (job.x0 < 0 || job.y0 < 0 || job.x1 > tile_w || job.y1 > tile_h || job.x0 >= job.x1 || job.y0 >= job.y1 ||
        job.row_stride < static_cast<size_t>(job.x1 - job.x0) * 3)
      throw std::invalid_argument("a tile job's region or row stride does not fit the tile");
  std::lock_guard<std::mutex> lock(impl_->busy);
  const size_t n = jobs.size();
  std::vector<TileStatus> status(n, TileStatus::kDecodeFailed);
  const OutputFormat format = output_format(colour);
  auto& decoders = impl_->decoders;
  if (n == 0) return status;
  if (impl_->gpu || decoders.size() == 1 || n < 2 * decoders.size()) {
    // GPU: one call, so nvJPEG batches the whole set.
    impl_->decode_range(decoders[0], 0, n, jobs, tile_h, tile_w, format, cuda_stream, status);
    return status;
  }
  // CPU: each thread claims a few tiles at a time as it frees up. A tile's decode time varies
  // several-fold (background vs dense tissue), so fixed shares would leave a core idle at the end;
  // claims of up to 4 tiles keep the per-call cost (a future, a wake-up of the decoder's thread)
  // small beside the 0.3-0.5 ms one thread takes per stored tile here (2-core CPU machine).
  const size_t claim = std::clamp<size_t>(n / (2 * decoders.size()), 1, 4);
  std::atomic<size_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_lock;
  auto work = [&](nvimgcodecDecoder_t decoder) {
    try {
      for (size_t begin; (begin = next.fetch_add(claim)) < n;)
        impl_->decode_range(decoder, begin, std::min(n, begin + claim), jobs, tile_h, tile_w, format, cuda_stream,
                            status);
    } catch (...) {
      std::lock_guard<std::mutex> g(failure_lock);
      if (!failure) failure = std::current_exception();
    }
  };
  std::vector<std::thread> helpers;
  helpers.reserve(decoders.size() - 1);
  for (size_t t = 1; t < decoders.size(); ++t) helpers.emplace_back(work, decoders[t]);
  work(decoders[0]);
  for (auto& helper : helpers) helper.join();
  if (failure) std::rethrow_exception(failure);
  return status;
}

std::string NvImageCodecBatch::library_version() const {
  auto props = structure<nvimgcodecProperties_t>(NVIMGCODEC_STRUCTURE_TYPE_PROPERTIES);
  impl_->api.nvimgcodecGetProperties(&props);
  return Impl::version(props.version);
}

bool NvImageCodecBatch::gpu() const { return impl_->gpu; }
int NvImageCodecBatch::device_id() const { return impl_->device_id; }

#endif  // JWTH_WITH_NVIMGCODEC

}  // namespace jwth::decode
