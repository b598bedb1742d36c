// Launcher for dualpath::copy_kv_kernel: picks the widest aligned vector, splits each page into
// chunks of kCopyKvChunkVecs vectors and checks the launch.
#include <cuda_runtime.h>

#include <string>

#include "dualpath/kv_copy.cuh"
#include "dualpath/kv_copy_launch.h"

namespace dualpath {

std::string copy_kv_launch(const CopyKvArgs& a) {
  if (a.num_pairs == 0 || a.num_rows == 0) return "";
  if (a.row_bytes % a.width != 0) return "copy_kv: row_bytes is not a multiple of width";
  const int64_t vecs = static_cast<int64_t>(a.page_size) * (a.row_bytes / a.width);
  // int32 indices inside the kernel reach a chunk past the page's end
  if (vecs + kCopyKvChunkVecs >= (int64_t{1} << 31)) return "copy_kv: a page of 2^31 vectors";
  const int64_t chunks = (vecs + kCopyKvChunkVecs - 1) / kCopyKvChunkVecs;
  if (chunks * a.num_rows > 0x7fffffff) return "copy_kv: too many (row, chunk) blocks";
  const int32_t row_vecs = static_cast<int32_t>(a.row_bytes / a.width);
  const dim3 grid(static_cast<unsigned>(chunks * a.num_rows),
                  static_cast<unsigned>(a.num_pairs < 65535 ? a.num_pairs : 65535));
  const int threads = kCopyKvThreads;
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const auto* sb = reinterpret_cast<const int64_t*>(a.src_base);
  const auto* db = reinterpret_cast<const int64_t*>(a.dst_base);
  const auto* sp = reinterpret_cast<const int64_t*>(a.src_pages);
  const auto* dp = reinterpret_cast<const int64_t*>(a.dst_pages);
#define DUALPATH_LAUNCH(VEC)                                                                 \
  copy_kv_kernel<VEC><<<grid, threads, 0, stream>>>(                                       \
      sb, db, sp, dp, a.num_pairs, static_cast<int32_t>(chunks), a.src_page_stride,          \
      a.src_token_stride, a.dst_page_stride, a.dst_token_stride, a.page_size, row_vecs)
  switch (a.width) {
    case 16: DUALPATH_LAUNCH(int4); break;
    case 8: DUALPATH_LAUNCH(int2); break;
    case 4: DUALPATH_LAUNCH(int); break;
    case 2: DUALPATH_LAUNCH(short); break;
    case 1: DUALPATH_LAUNCH(char); break;
    default: return "copy_kv: width must be 1, 2, 4, 8 or 16";
  }
#undef DUALPATH_LAUNCH
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return std::string("copy_kv launch failed: ") + cudaGetErrorString(err);
  return "";
}

}  // namespace dualpath
