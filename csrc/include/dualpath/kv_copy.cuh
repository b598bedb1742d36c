// Paged-KV row copy between layouts described by base tables and strides (raw pointers only:
// no torch or pybind headers). See python/dualpath/ops/layout.py for the layout model:
//   row(l, c, page, t) = base[l * parts + c] + page * page_stride + t * token_stride,
// row_bytes contiguous bytes. One block copies one page of one (layer, part): page_size rows.
#pragma once

#include <cstdint>

namespace dualpath {

template <typename Vec>
__global__ void copy_kv_kernel(const int64_t* __restrict__ src_base,
                               const int64_t* __restrict__ dst_base,
                               const int64_t* __restrict__ src_pages,
                               const int64_t* __restrict__ dst_pages, int64_t src_page_stride,
                               int64_t src_token_stride, int64_t dst_page_stride,
                               int64_t dst_token_stride, int32_t page_size, int32_t row_vecs) {
  const int64_t pair = blockIdx.x;  // which (src page, dst page)
  const int64_t row = blockIdx.y;   // which (layer pair, part)
  // first byte of this page's token 0 on each side
  const char* src = reinterpret_cast<const char*>(src_base[row]) + src_pages[pair] * src_page_stride;
  char* dst = reinterpret_cast<char*>(dst_base[row]) + dst_pages[pair] * dst_page_stride;
  const int64_t total = static_cast<int64_t>(page_size) * row_vecs;  // vectors in the page
  for (int64_t k = threadIdx.x; k < total; k += blockDim.x) {
    const int64_t t = k / row_vecs;  // token within the page
    const int64_t v = k - t * row_vecs;  // vector within the token's row
    reinterpret_cast<Vec*>(dst + t * dst_token_stride)[v] =
        reinterpret_cast<const Vec*>(src + t * src_token_stride)[v];
  }
}

}  // namespace dualpath
