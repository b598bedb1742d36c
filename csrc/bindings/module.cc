// dualpath._C: the native module. Only this file registers Python bindings.
#include <pybind11/pybind11.h>

#include "dualpath/cuda_info.h"
#ifdef DUALPATH_WITH_CUDA
#include "dualpath/kv_copy_launch.h"
#endif

namespace py = pybind11;

void bind_transfer(py::module_& m);  // transfer_bindings.cc
void bind_storage(py::module_& m);   // storage_bindings.cc

namespace {

py::dict build_info() {
  py::dict d;
  d["version"] = DUALPATH_VERSION;
  d["git_sha"] = DUALPATH_GIT_SHA;
  d["build_type"] = DUALPATH_BUILD_TYPE;
  d["cxx_compiler"] = DUALPATH_CXX_COMPILER;
  d["cuda_reason"] = DUALPATH_CUDA_REASON;
#ifdef DUALPATH_WITH_CUDA
  d["with_cuda"] = true;
  d["cuda_compiler"] = DUALPATH_CUDA_COMPILER;
  d["cuda_archs"] = DUALPATH_CUDA_ARCHS;
#else
  d["with_cuda"] = false;
  d["cuda_compiler"] = py::none();
  d["cuda_archs"] = py::none();
#endif
#ifdef DUALPATH_WITH_RDMA
  d["with_rdma"] = true;
#else
  d["with_rdma"] = false;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "DualPath native module: build info, the transfer engine, the KV copy kernels";
  bind_transfer(m);
  bind_storage(m);
  m.def("build_info", &build_info,
        "How this module was built: version, git sha, compilers, whether CUDA sources are in.");
#ifdef DUALPATH_WITH_CUDA
  m.def(
      "cuda_runtime_info",
      []() {
        dualpath::CudaRuntimeInfo info;
        {
          py::gil_scoped_release release;  // cudaGetDeviceCount may initialise the driver
          info = dualpath::query_cuda_runtime();
        }
        py::dict d;
        d["runtime_version"] = info.runtime_version;
        d["driver_version"] = info.driver_version;
        d["device_count"] = info.device_count;
        d["error"] = info.error.empty() ? py::object(py::none()) : py::str(info.error);
        return d;
      },
      "CUDA runtime/driver versions and device count, or the CUDA error that stopped the query.");
  m.def(
      "copy_kv",
      [](uintptr_t src_base, uintptr_t dst_base, uintptr_t src_pages, uintptr_t dst_pages,
         int64_t num_pairs, int64_t num_rows, int64_t src_page_stride, int64_t src_token_stride,
         int64_t dst_page_stride, int64_t dst_token_stride, int32_t page_size, int64_t row_bytes,
         int32_t width, uintptr_t stream) {
        dualpath::CopyKvArgs a{src_base,        dst_base,         src_pages,       dst_pages,
                               num_pairs,       num_rows,         src_page_stride, src_token_stride,
                               dst_page_stride, dst_token_stride, page_size,       row_bytes,
                               width,           stream};
        std::string err;
        {
          py::gil_scoped_release release;
          err = dualpath::copy_kv_launch(a);
        }
        if (!err.empty()) throw std::runtime_error(err);
      },
      "Enqueue the paged-KV copy (device addresses of int64 base tables and page index arrays, "
      "byte strides) on a CUDA stream. Use dualpath.ops.copy_kv(impl='cuda'), which validates.",
      py::arg("src_base"), py::arg("dst_base"), py::arg("src_pages"), py::arg("dst_pages"),
      py::arg("num_pairs"), py::arg("num_rows"), py::arg("src_page_stride"),
      py::arg("src_token_stride"), py::arg("dst_page_stride"), py::arg("dst_token_stride"),
      py::arg("page_size"), py::arg("row_bytes"), py::arg("width"), py::arg("stream"));
#endif
}
