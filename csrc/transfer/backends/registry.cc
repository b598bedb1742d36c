// The transfer backends built into this module, chosen at runtime by name.
#include <stdexcept>

#include "../engine.h"

namespace dualpath::transfer {

std::unique_ptr<Backend> make_host_backend();
std::unique_ptr<Backend> make_tcp_backend();
#ifdef DUALPATH_WITH_CUDA
std::unique_ptr<Backend> make_cuda_backend(CudaCopyMode mode);
#define DUALPATH_CUDA_NAMES ", cuda, cuda:memcpy, cuda:kernel"
#else
#define DUALPATH_CUDA_NAMES ""
#endif
#ifdef DUALPATH_WITH_RDMA
std::unique_ptr<Backend> make_rdma_backend(const std::string& spec);
#define DUALPATH_RDMA_NAMES ", rdma[:device[:gid]]"
#else
#define DUALPATH_RDMA_NAMES ""
#endif
#define DUALPATH_BACKENDS "host, tcp" DUALPATH_CUDA_NAMES DUALPATH_RDMA_NAMES

std::unique_ptr<Backend> make_backend(const std::string& name) {
  if (name == "host") return make_host_backend();
  if (name == "tcp") return make_tcp_backend();
#ifdef DUALPATH_WITH_CUDA
  if (name == "cuda") return make_cuda_backend(CudaCopyMode::kAuto);
  if (name == "cuda:memcpy") return make_cuda_backend(CudaCopyMode::kMemcpy);
  if (name == "cuda:kernel") return make_cuda_backend(CudaCopyMode::kKernel);
#else
  if (name == "cuda" || name == "cuda:memcpy" || name == "cuda:kernel")
    throw std::invalid_argument("the cuda transfer backend is not built into this module "
                                "(build with CUDA: DUALPATH_BUILD_CUDA=on); built: " DUALPATH_BACKENDS);
#endif
#ifdef DUALPATH_WITH_RDMA
  if (name == "rdma" || name.rfind("rdma:", 0) == 0) return make_rdma_backend(name);
#else
  if (name == "rdma" || name.rfind("rdma:", 0) == 0)
    throw std::invalid_argument("the rdma transfer backend is not built into this module (no "
                                "infiniband/verbs.h at build time); built: " DUALPATH_BACKENDS);
#endif
  throw std::invalid_argument("unknown transfer backend '" + name + "'; built: " DUALPATH_BACKENDS);
}

}  // namespace dualpath::transfer
