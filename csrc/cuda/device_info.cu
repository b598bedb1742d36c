#include <cuda_runtime.h>

#include "dualpath/cuda_info.h"

namespace dualpath {

CudaRuntimeInfo query_cuda_runtime() {
  CudaRuntimeInfo info;
  cudaError_t err = cudaRuntimeGetVersion(&info.runtime_version);
  if (err == cudaSuccess) err = cudaDriverGetVersion(&info.driver_version);
  if (err == cudaSuccess) err = cudaGetDeviceCount(&info.device_count);
  if (err != cudaSuccess) {
    info.error = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    info.device_count = 0;
    cudaGetLastError();  // reset the last-error state so later calls start clean
  }
  return info;
}

}  // namespace dualpath
