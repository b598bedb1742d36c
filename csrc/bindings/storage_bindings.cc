// pybind11 bindings of the native block reader (registered into dualpath._C by module.cc).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../storage/block_io.h"

namespace py = pybind11;
namespace st = dualpath::storage;

void bind_storage(py::module_& m) {
  m.def(
      "read_blocks_page_first",
      [](const std::vector<std::string>& paths, const py::bytes& expect_headers,
         const std::vector<uint64_t>& k_ptrs, const std::vector<uint64_t>& v_ptrs,
         const std::vector<double>& not_before_s, size_t num_layers, size_t page_size,
         size_t row_bytes, size_t header_bytes, size_t digest_offset, size_t reserved_offset,
         size_t fixed_bytes) {
        const size_t n = paths.size();
        std::string headers = expect_headers;  // a copy: read without the GIL below
        if (k_ptrs.size() != n || v_ptrs.size() != n)
          throw py::value_error("one K and one V address per path");
        if (!not_before_s.empty() && not_before_s.size() != n)
          throw py::value_error("not_before_s: empty or one time per path");
        if (headers.size() != n * header_bytes)
          throw py::value_error("expect_headers: header_bytes per path");
        if (num_layers == 0 || page_size == 0 || row_bytes == 0 || reserved_offset < 12 ||
            reserved_offset + 4 > digest_offset || digest_offset + 8 > fixed_bytes ||
            fixed_bytes > header_bytes)
          throw py::value_error("bad geometry or header layout");
        st::PageFirstGeometry g{header_bytes, digest_offset, reserved_offset, fixed_bytes,
                                num_layers, page_size, row_bytes};
        std::vector<int> status(n), errnos(n);
        {
          py::gil_scoped_release release;
          thread_local std::vector<uint8_t> staging, header;
          staging.resize(g.payload_bytes());  // may throw bad_alloc: before any read
          header.resize(header_bytes);
          for (size_t i = 0; i < n; ++i) {
            status[i] = static_cast<int>(st::read_block_to_page(
                paths[i], reinterpret_cast<const uint8_t*>(headers.data()) + i * header_bytes,
                g, header.data(), staging.data(), reinterpret_cast<uint8_t*>(k_ptrs[i]),
                reinterpret_cast<uint8_t*>(v_ptrs[i]),
                not_before_s.empty() ? 0.0 : not_before_s[i], &errnos[i]));
          }
        }
        return std::make_pair(status, errnos);
      },
      py::arg("paths"), py::arg("expect_headers"), py::arg("k_ptrs"), py::arg("v_ptrs"),
      py::arg("not_before_s"), py::arg("num_layers"), py::arg("page_size"),
      py::arg("row_bytes"), py::arg("header_bytes"), py::arg("digest_offset"),
      py::arg("reserved_offset"), py::arg("fixed_bytes"),
      "Read Full Blocks into page_first host pages with the GIL released for the whole batch. "
      "Per path: status (0 ok, 1 missing, 2 invalid: header/size/checksum, 3 I/O error) and "
      "errno. A page is written only after its block verified. not_before_s: per read, the "
      "CLOCK_MONOTONIC time (Python's time.monotonic) it may finish, or empty.");
  m.def(
      "write_page_block",
      [](const std::string& path, const py::bytes& header_template, uint64_t k_ptr,
         uint64_t v_ptr, size_t num_layers, size_t page_size, size_t row_bytes,
         size_t header_bytes, size_t digest_offset, double claim_stale_s) {
        std::string header_t = header_template;
        if (header_t.size() != header_bytes) throw py::value_error("header_template size");
        if (num_layers == 0 || page_size == 0 || row_bytes == 0 ||
            digest_offset + 8 > header_bytes)
          throw py::value_error("bad geometry or header layout");
        st::PageFirstGeometry g{header_bytes, digest_offset, 0, 0, num_layers, page_size,
                                row_bytes};
        int status, err = 0;
        double started = 0;
        {
          py::gil_scoped_release release;
          thread_local std::vector<uint8_t> wstaging, wheader;
          wstaging.resize(g.payload_bytes());  // may throw bad_alloc: before any write
          wheader.resize(header_bytes);
          status = static_cast<int>(st::write_page_block(
              path, reinterpret_cast<const uint8_t*>(header_t.data()), g,
              reinterpret_cast<const uint8_t*>(k_ptr), reinterpret_cast<const uint8_t*>(v_ptr),
              wheader.data(), wstaging.data(), claim_stale_s, &err, &started));
        }
        return std::make_tuple(status, err, started);
      },
      py::arg("path"), py::arg("header_template"), py::arg("k_ptr"), py::arg("v_ptr"),
      py::arg("num_layers"), py::arg("page_size"), py::arg("row_bytes"),
      py::arg("header_bytes"), py::arg("digest_offset"), py::arg("claim_stale_s"),
      "BlockStore.put of one page_first page with the GIL released throughout: (status, errno, "
      "started_s), status 0 written, 1 already stored, 2 claimed by another writer, 3 I/O error "
      "(no temp file or claim left); started_s: time.monotonic() when the file write began.");
  m.def(
      "xxh3_64",
      [](const py::buffer& b) {
        py::buffer_info info = b.request();
        size_t len = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
        return st::xxh3_64(info.ptr, len);
      },
      "XXH3-64 of a contiguous buffer (the Full Block checksum).");
}
