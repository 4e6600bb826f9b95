// libjpeg-turbo called directly, three ways, for bench_jpeg_decoder.py (compiled there at run time
// against the system's libjpeg-turbo: `cc -O2 -shared -fPIC libjpeg_direct.c -ljpeg`).
//
//   mode 0 "rows1":       one jpeg_read_scanlines call per row, straight into the output
//   mode 1 "all_rows":    every remaining row asked for per call (TurboJPEG's tjDecompress2, which
//                         cuCIM's slide plugin calls), straight into the output
//   mode 2 "ext_pattern": what nvImageCodec's libjpeg-turbo extension does (its repository's
//                         extensions/libjpeg_turbo/jpeg_mem.cpp and libjpeg_turbo_decoder.cpp): a
//                         buffer of its own per tile, one row per call into it, then the tile copied
//                         row by row into the output image
//
// Decoder settings as both libraries use them: JDCT_ISLOW, fancy upsampling, RGB out; `rgb_stored`
// marks Aperio's RGB-photometric JPEG (components are R, G, B: no colour conversion).
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

struct error_jump {
  struct jpeg_error_mgr mgr;
  jmp_buf jump;
};

static void on_error(j_common_ptr cinfo) { longjmp(((struct error_jump *)cinfo->err)->jump, 1); }

const char *libjpeg_turbo_version(void) {
#ifdef LIBJPEG_TURBO_VERSION
#define JWTH_STR2(x) #x
#define JWTH_STR(x) JWTH_STR2(x)
  return JWTH_STR(LIBJPEG_TURBO_VERSION);
#else
  return "not libjpeg-turbo";
#endif
}

// Decodes n streams (blob + offsets/lengths) of tile_h x tile_w px, each into `out` (the same
// tile-sized RGB buffer every time: the figure is the decoder's, not the memory system's).
// Returns 0, or -(1 + index) of the first stream that failed or had another size.
int decode_tiles(const uint8_t *blob, const int64_t *offsets, const int64_t *lengths, int n, uint8_t *out,
                 int tile_h, int tile_w, int mode, int rgb_stored) {
  JSAMPROW *rows = malloc(sizeof(JSAMPROW) * (size_t)tile_h);
  if (rows == NULL) return -1;
  const size_t row_bytes = (size_t)tile_w * 3;
  for (int i = 0; i < n; i++) {
    struct jpeg_decompress_struct cinfo;
    struct error_jump err;
    uint8_t *volatile own = NULL;
    cinfo.err = jpeg_std_error(&err.mgr);
    err.mgr.error_exit = on_error;
    if (setjmp(err.jump)) {
      jpeg_destroy_decompress(&cinfo);
      free(own);
      free(rows);
      return -(1 + i);
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, blob + offsets[i], (unsigned long)lengths[i]);
    jpeg_read_header(&cinfo, TRUE);
    if (rgb_stored) cinfo.jpeg_color_space = JCS_RGB;
    cinfo.out_color_space = JCS_RGB;
    cinfo.dct_method = JDCT_ISLOW;
    cinfo.do_fancy_upsampling = TRUE;
    jpeg_start_decompress(&cinfo);
    if ((int)cinfo.output_width != tile_w || (int)cinfo.output_height != tile_h) {
      jpeg_destroy_decompress(&cinfo);
      free(rows);
      return -(1 + i);
    }
    if (mode == 2) {
      own = malloc(row_bytes * (size_t)tile_h);
      if (own == NULL) longjmp(err.jump, 1);
    }
    uint8_t *target = mode == 2 ? own : out;
    for (int y = 0; y < tile_h; y++) rows[y] = target + (size_t)y * row_bytes;
    if (mode == 1) {
      while (cinfo.output_scanline < cinfo.output_height)
        jpeg_read_scanlines(&cinfo, &rows[cinfo.output_scanline], cinfo.output_height - cinfo.output_scanline);
    } else {
      while (cinfo.output_scanline < cinfo.output_height) {
        JSAMPROW row = rows[cinfo.output_scanline];
        jpeg_read_scanlines(&cinfo, &row, 1);
      }
    }
    jpeg_finish_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    if (mode == 2) {
      for (int y = 0; y < tile_h; y++) memcpy(out + (size_t)y * row_bytes, own + (size_t)y * row_bytes, row_bytes);
      free(own);
    }
  }
  free(rows);
  return 0;
}
