// dualpath._C: the native module. Only this file registers Python bindings.
#include <pybind11/pybind11.h>

#include "dualpath/cuda_info.h"

namespace py = pybind11;

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
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "DualPath native module (build info; transfer engine and kernels arrive later)";
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
#endif
}
