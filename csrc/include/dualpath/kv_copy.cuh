// Paged-KV row copy between layouts described by base tables and strides (raw pointers only:
// no torch or pybind headers). See python/dualpath/ops/layout.py for the layout model:
//   row(l, c, page, t) = base[l * parts + c] + page * page_stride + t * token_stride,
// row_bytes contiguous bytes. Grid: x = ((layer pair, part), chunk of the page's page_size *
// row_vecs vectors), y = page pairs (strided when more than 65535). Each thread loads kUnroll vectors before it stores any,
// so a block keeps blockDim * kUnroll * sizeof(Vec) bytes in flight: what reading pinned host
// memory over PCIe (latency ~1-2 us) needs to reach the link's bandwidth.
#pragma once

#include <cstdint>

namespace dualpath {

constexpr int kCopyKvThreads = 256;
constexpr int kCopyKvUnroll = 4;
constexpr int kCopyKvChunkVecs = kCopyKvThreads * kCopyKvUnroll;  // per block (16 KiB at int4)

template <typename Vec>
__global__ void __launch_bounds__(kCopyKvThreads)
    copy_kv_kernel(const int64_t* __restrict__ src_base, const int64_t* __restrict__ dst_base,
                   const int64_t* __restrict__ src_pages, const int64_t* __restrict__ dst_pages,
                   int64_t num_pairs, int32_t chunks, int64_t src_page_stride,
                   int64_t src_token_stride, int64_t dst_page_stride, int64_t dst_token_stride,
                   int32_t page_size, int32_t row_vecs) {
  // blockIdx.x = (layer pair, part) row * chunks + chunk: blocks scheduled together cover every
  // layer of the same pages, which page_first host memory keeps side by side (its token holds
  // all layers), so the PCIe traffic of concurrent blocks stays contiguous
  const int64_t row = blockIdx.x / chunks;
  const int32_t chunk = static_cast<int32_t>(blockIdx.x % chunks);
  const int32_t total = page_size * row_vecs;  // vectors in the page (checked < 2^31 on launch)
  const int32_t begin = chunk * kCopyKvChunkVecs;
  const int32_t end = min(total, begin + kCopyKvChunkVecs);
  for (int64_t pair = blockIdx.y; pair < num_pairs; pair += gridDim.y) {
    // first byte of this page's token 0 on each side
    const char* src =
        reinterpret_cast<const char*>(src_base[row]) + src_pages[pair] * src_page_stride;
    char* dst = reinterpret_cast<char*>(dst_base[row]) + dst_pages[pair] * dst_page_stride;
    for (int32_t k0 = begin + static_cast<int32_t>(threadIdx.x); k0 < end;
         k0 += kCopyKvChunkVecs) {
      Vec r[kCopyKvUnroll];
#pragma unroll
      for (int u = 0; u < kCopyKvUnroll; ++u) {
        const int32_t k = k0 + u * kCopyKvThreads;
        if (k < end) {
          const int32_t t = k / row_vecs;  // token within the page
          r[u] = reinterpret_cast<const Vec*>(src + t * src_token_stride)[k - t * row_vecs];
        }
      }
#pragma unroll
      for (int u = 0; u < kCopyKvUnroll; ++u) {
        const int32_t k = k0 + u * kCopyKvThreads;
        if (k < end) {
          const int32_t t = k / row_vecs;
          reinterpret_cast<Vec*>(dst + t * dst_token_stride)[k - t * row_vecs] = r[u];
        }
      }
    }
  }
}

}  // namespace dualpath
