// pybind11 bindings of the transfer engine (registered into dualpath._C by module.cc).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>

#include "../transfer/backends/rdma/wr_plan.h"
#include "../transfer/engine.h"

namespace py = pybind11;
using namespace dualpath::transfer;
namespace rdma = dualpath::transfer::rdma;

namespace {

using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

const char* status_name(Status s) {
  switch (s) {
    case Status::kPending: return "pending";
    case Status::kDone: return "done";
    case Status::kFailed: return "failed";
    case Status::kCanceled: return "canceled";
  }
  return "?";
}

}  // namespace

void bind_transfer(py::module_& m) {
  m.def(
      "_rdma_plan",
      [](const std::vector<uint64_t>& lengths, uint64_t max_msg, uint32_t max_chain) {
        std::vector<std::vector<std::tuple<uint64_t, uint64_t, uint64_t, bool>>> out;
        for (const auto& chain : rdma::plan_wrs(lengths, max_msg, max_chain)) {
          out.emplace_back();
          for (const auto& w : chain) out.back().emplace_back(w.piece, w.offset, w.length,
                                                              w.signaled);
        }
        return out;
      },
      py::arg("lengths"), py::arg("max_msg"), py::arg("max_chain"),
      "The rdma backend's work-request plan (tests): chains of (piece, offset, length, "
      "signaled).");
  py::class_<Batch, Handle>(m, "TransferHandle")
      .def_property_readonly("size", [](const Batch& b) { return b.size; })
      .def_property_readonly("failed_index", [](const Batch& b) { return b.failed_index.load(); })
      .def_property_readonly("error", [](Batch& b) {
        std::lock_guard<std::mutex> lk(b.mu);
        return b.error;
      });

  py::class_<Engine>(m, "TransferEngine")
      .def(py::init<const std::string&, int, uint64_t>(), py::arg("backend") = "host",
           py::arg("num_workers") = 4, py::arg("slice_bytes") = 1 << 20)
      .def_property_readonly("backend", &Engine::backend_name)
      .def("register_region", &Engine::register_region, py::arg("addr"), py::arg("length"),
           py::arg("kind") = "host")
      .def("register_remote", &Engine::register_remote, py::arg("address"),
           py::arg("remote_region"), py::arg("length"), py::arg("connections") = 4)
      .def("listen", &Engine::listen, py::arg("host") = "127.0.0.1", py::arg("port") = 0)
      .def("deregister_region", &Engine::deregister_region, py::arg("region"))
      .def(
          "submit",
          [](Engine& e, I64 src_region, I64 src_offset, I64 dst_region, I64 dst_offset,
             I64 length, const std::string& priority) {
            const py::ssize_t n = length.size();
            for (const I64* a : {&src_region, &src_offset, &dst_region, &dst_offset})
              if (a->ndim() != 1 || a->size() != n)
                throw std::invalid_argument("descriptor arrays must be 1-D and of equal length");
            if (priority != "latency" && priority != "bulk")
              throw std::invalid_argument("priority must be 'latency' or 'bulk'");
            std::vector<Desc> descs(static_cast<size_t>(n));
            auto sr = src_region.unchecked<1>(), so = src_offset.unchecked<1>();
            auto dr = dst_region.unchecked<1>(), dof = dst_offset.unchecked<1>();
            auto ln = length.unchecked<1>();
            for (py::ssize_t i = 0; i < n; ++i) {
              if (so(i) < 0 || dof(i) < 0 || ln(i) < 0)
                throw std::invalid_argument("descriptor " + std::to_string(i) +
                                            ": negative offset or length");
              descs[i] = {static_cast<uint64_t>(sr(i)), static_cast<uint64_t>(so(i)),
                          static_cast<uint64_t>(dr(i)), static_cast<uint64_t>(dof(i)),
                          static_cast<uint64_t>(ln(i))};
            }
            return e.submit(std::move(descs),
                            priority == "latency" ? Priority::kLatency : Priority::kBulk);
          },
          py::arg("src_region"), py::arg("src_offset"), py::arg("dst_region"),
          py::arg("dst_offset"), py::arg("length"), py::arg("priority") = "bulk")
      .def("poll", [](Engine& e, const Handle& h) { return status_name(e.poll(h)); })
      .def(
          "wait",
          [](Engine& e, const Handle& h, double timeout_s) {
            Status s;
            {
              py::gil_scoped_release release;
              s = e.wait(h, timeout_s);
            }
            return status_name(s);
          },
          py::arg("handle"), py::arg("timeout_s") = -1.0)
      .def("cancel", &Engine::cancel);
}
