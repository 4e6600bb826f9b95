// Batch decode of stored slide tiles through nvImageCodec's C API, with the GIL released once per
// batch (the binding does that) instead of around each tile as nvImageCodec's Python `decode` does.
//
// Why not the Python API: its decode loop releases and re-takes the GIL around every tile's
// image-info query and buffer allocation. Beside any thread that runs Python (the pipeline's main
// thread, the reader cutting model tiles) each re-take can wait up to the interpreter's switch
// interval (5 ms): beside a busy Python thread one decoder kept 0.05-0.07 of its speed through the
// Python API on JPEG, 0.44-0.49 through this path (one re-take per 40-tile call;
// benchmarks/results/decode_cpu.json at 8b47186).
//
// libnvimgcodec is opened at run time (dlopen) from the path the Python side finds in the installed
// wheel (only the cu13 wheel has been tried), so `_C` imports and its kernels work without nvImageCodec; the header this
// is compiled against fixes the ABI, and the library's major.minor must match it.
//
// Output: tile i's region [y0, y1) x [x0, x1) (the whole tile, or the part the model tiles need) is
// written to its job's buffer, interleaved uint8 RGB rows `row_stride` bytes apart, in host memory
// (CPU backend) or device memory (GPU backends). A region is decoded through nvImageCodec's code
// stream views: its libjpeg-turbo extension (extensions/libjpeg_turbo/jpeg_mem.cpp in its repository) calls
// jpeg_crop_scanline for the columns (one pixel wider on each side, widened to whole MCUs) and
// jpeg_skip_scanlines for the rows above and below the region. On the GPU the decode is meant to be
// ordered after, and its result visible to, work on `cuda_stream` (the image info's "CUDA stream to
// synchronize with" in nvimgcodec.h; never run here: no GPU).
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

// One stored tile to decode: its complete code stream, the region wanted and where it goes.
struct TileJob {
  const uint8_t* data;
  size_t size;
  int x0, y0, x1, y1;     // half-open, in the tile's pixels; the whole tile is 0, 0, tile_w, tile_h
  uintptr_t output;       // (y1 - y0) rows of (x1 - x0) RGB pixels
  size_t row_stride;      // bytes from one output row to the next (>= 3 * (x1 - x0))
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

  // One status per job; every stream must hold a tile_w x tile_h image (else kWrongSize). Not
  // re-entrant: one caller at a time (the Python side holds it alone).
  std::vector<TileStatus> decode(const std::vector<TileJob>& jobs, int tile_h, int tile_w, ColourSpec colour,
                                 uintptr_t cuda_stream);

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
