// Stand-in for the CUDA runtime header on build machines without a CUDA toolkit: nvimgcodec.h
// includes it only for the opaque stream handle, which is all the batch decoder passes through.
// On the include path only when the toolkit's own header is not found (CMakeLists.txt).
#pragma once

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;
