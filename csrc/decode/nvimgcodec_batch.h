// Batch decode of stored slide tiles through nvImageCodec's C API, with the GIL released once per
// batch (the binding does that) instead of around each tile as nvImageCodec's Python `decode` does.
//
// Why not the Python API: its decode loop releases and re-takes the GIL around every tile's
// image-info query and buffer allocation. Beside any thread that runs Python (the pipeline's main
// thread, the reader cutting model tiles) each re-take can wait up to the interpreter's switch
// interval (5 ms): beside a busy Python thread one decoder kept 0.08-0.09 of its speed through the
// Python API on JPEG, 0.55-0.56 through this path (one re-take per 40-tile call; bench_decode.py).
//
// libnvimgcodec is opened at run time (dlopen) from the path the Python side finds in the installed
// wheel (cu12 or cu13), so `_C` imports and its kernels work without nvImageCodec; the header this
// is compiled against fixes the ABI, and the library's major.minor must match it.
//
// Output: tile i is written to outputs[i], an interleaved [tile_h, tile_w, 3] uint8 buffer (row
// stride tile_w * 3) in host memory (CPU backend) or device memory (GPU backends). On the GPU the
// decode is ordered after, and its result visible to, work on `cuda_stream` (nvImageCodec syncs its
// own streams with it before and after decoding).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace jwth::decode {

// What a tile's decode ended in; the Python side turns each failure into a line naming the tile.
enum class TileStatus : int {
  kOk = 0,
  kUnparsable = 1,     // not a code stream nvImageCodec recognises (no image info)
  kWrongSize = 2,      // its image is not tile_w x tile_h
  kDecodeFailed = 3,   // the decoder gave up on it (corrupt data, or no backend could take it)
};

// The output colour, as nvImageCodec's Python `ColorSpec` names it.
enum class ColourSpec : int { kSRGB = 0, kSYCC = 1, kUnchanged = 2 };

struct TileStream {
  const uint8_t* data;
  size_t size;
};

class NvImageCodecBatch {
 public:
  // library: libnvimgcodec.so.0's path; extensions: its codec extension folder. gpu: decode into
  // device memory on `device_id` (hardware JPEG engine, then CUDA decoders); else the CPU backend
  // with `threads` single-threaded decoders that take tiles as they free up. Throws
  // std::runtime_error saying what failed.
  NvImageCodecBatch(const std::string& library, const std::string& extensions, bool gpu, int device_id,
                    int threads);
  ~NvImageCodecBatch();
  NvImageCodecBatch(const NvImageCodecBatch&) = delete;
  NvImageCodecBatch& operator=(const NvImageCodecBatch&) = delete;

  // One status per tile. Not re-entrant: one caller at a time (the Python side holds it alone).
  std::vector<TileStatus> decode(const std::vector<TileStream>& streams, const std::vector<uintptr_t>& outputs,
                                 int tile_h, int tile_w, ColourSpec colour, uintptr_t cuda_stream);

  // "major.minor.patch" of the library that was opened.
  std::string library_version() const;
  // Where outputs must live: device memory of GPU device_id(), else host memory.
  bool gpu() const;
  int device_id() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// True when this build has the nvImageCodec header (the class above works); false otherwise, and
// then the constructor throws.
bool nvimgcodec_compiled();

}  // namespace jwth::decode
