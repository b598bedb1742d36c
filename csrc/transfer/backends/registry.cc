// The transfer backends built into this module, chosen at runtime by name.
#include <stdexcept>

#include "../engine.h"

namespace dualpath::transfer {

std::unique_ptr<Backend> make_host_backend();
std::unique_ptr<Backend> make_tcp_backend();

std::unique_ptr<Backend> make_backend(const std::string& name) {
  if (name == "host") return make_host_backend();
  if (name == "tcp") return make_tcp_backend();
  throw std::invalid_argument("unknown transfer backend '" + name + "'; built: host, tcp");
}

}  // namespace dualpath::transfer
