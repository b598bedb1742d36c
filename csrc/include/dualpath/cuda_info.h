// CUDA runtime facts for dualpath._C. Declared without CUDA headers so that the binding
// translation unit compiles with a plain C++ compiler.
#pragma once

#include <string>

namespace dualpath {

struct CudaRuntimeInfo {
  int runtime_version = 0;  // cudaRuntimeGetVersion, e.g. 13000
  int driver_version = 0;   // cudaDriverGetVersion; 0 when no driver is installed
  int device_count = 0;
  std::string error;        // empty on success, else the CUDA error string of the failing call
};

// Never throws; a failure is reported in `error`.
CudaRuntimeInfo query_cuda_runtime();

}  // namespace dualpath
