// The transfer backends built into this module, chosen at runtime by name.
#include <stdexcept>

#include "../engine.h"

namespace dualpath::transfer {

std::unique_ptr<Backend> make_host_backend();
std::unique_ptr<Backend> make_tcp_backend();
#ifdef DUALPATH_WITH_CUDA
std::unique_ptr<Backend> make_cuda_backend(bool use_kernel);
#define DUALPATH_BACKENDS "host, tcp, cuda, cuda:memcpy"
#else
#define DUALPATH_BACKENDS "host, tcp"
#endif

std::unique_ptr<Backend> make_backend(const std::string& name) {
  if (name == "host") return make_host_backend();
  if (name == "tcp") return make_tcp_backend();
#ifdef DUALPATH_WITH_CUDA
  if (name == "cuda") return make_cuda_backend(true);
  if (name == "cuda:memcpy") return make_cuda_backend(false);
#else
  if (name == "cuda" || name == "cuda:memcpy")
    throw std::invalid_argument("the cuda transfer backend is not built into this module "
                                "(build with CUDA: DUALPATH_BUILD_CUDA=on); built: " DUALPATH_BACKENDS);
#endif
  throw std::invalid_argument("unknown transfer backend '" + name + "'; built: " DUALPATH_BACKENDS);
}

}  // namespace dualpath::transfer
