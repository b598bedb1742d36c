// Host-side entry of the KV copy kernel; plain C++ so the pybind11 module needs no CUDA headers.
#pragma once

#include <cstdint>
#include <string>

namespace dualpath {

struct CopyKvArgs {
  // device addresses: int64 tables [num_rows] of row bases, int64 page indices [num_pairs]
  uintptr_t src_base, dst_base, src_pages, dst_pages;
  int64_t num_pairs, num_rows;
  int64_t src_page_stride, src_token_stride, dst_page_stride, dst_token_stride;  // bytes
  int32_t page_size;
  int64_t row_bytes;
  int32_t width;      // bytes per vector access: 1, 2, 4, 8 or 16; must divide every address
  uintptr_t stream;   // cudaStream_t; 0 = the legacy default stream
};

// Enqueue the copy on `stream`; returns "" or an error message (never throws).
std::string copy_kv_launch(const CopyKvArgs& args);

}  // namespace dualpath
