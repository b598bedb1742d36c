#include "block_io.h"

#include <fcntl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#define XXH_INLINE_ALL
#include "xxhash.h"

namespace dualpath::storage {

namespace {

double monotonic_s() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);  // Python's time.monotonic() on Linux
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

void sleep_until(double t) {
  double wait = t - monotonic_s();
  if (wait <= 0) return;
  timespec ts;
  ts.tv_sec = static_cast<time_t>(wait);
  ts.tv_nsec = static_cast<long>((wait - static_cast<double>(ts.tv_sec)) * 1e9);
  while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
  }
}

// Fills iov in order from fd; returns bytes read (short only at end of file) or -1 (errno set).
ssize_t readv_full(int fd, iovec* iov, int n) {
  ssize_t got = 0;
  while (n > 0) {
    ssize_t r = ::readv(fd, iov, n);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (r == 0) break;
    got += r;
    while (n > 0 && static_cast<size_t>(r) >= iov->iov_len) {
      r -= static_cast<ssize_t>(iov->iov_len);
      ++iov;
      --n;
    }
    if (n > 0) {
      iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + r;
      iov->iov_len -= static_cast<size_t>(r);
    }
  }
  return got;
}

uint64_t load_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

uint64_t xxh3_64(const void* data, size_t len) { return XXH3_64bits(data, len); }

ReadStatus read_block_to_page(const std::string& path, const uint8_t* expect_header,
                              const PageFirstGeometry& g, uint8_t* header, uint8_t* staging,
                              uint8_t* k_region, uint8_t* v_region, double not_before_s,
                              int* errno_out) noexcept {
  *errno_out = 0;
  const size_t payload = g.payload_bytes();
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    *errno_out = errno;
    return errno == ENOENT ? ReadStatus::kMiss : ReadStatus::kIoError;
  }
  // header, payload and one byte past them in one readv: a longer file is not a block
  uint8_t extra = 0;
  iovec iov[3] = {{header, g.header_bytes}, {staging, payload}, {&extra, 1}};
  ssize_t got = readv_full(fd, iov, 3);
  int read_errno = errno;
  ::close(fd);
  if (got < 0) {
    *errno_out = read_errno;
    return ReadStatus::kIoError;
  }
  if (static_cast<size_t>(got) != g.header_bytes + payload) return ReadStatus::kInvalid;
  // block_file.check_header: magic, version, key_len, payload_len, fingerprint, geometry and
  // the key; not the reserved u32, not the padding after the key
  const size_t d = g.digest_offset, r = g.reserved_offset;
  const size_t key_len = static_cast<size_t>(expect_header[10]) |
                         (static_cast<size_t>(expect_header[11]) << 8);
  const size_t end = g.fixed_bytes + key_len;
  if (end > g.header_bytes || std::memcmp(header, expect_header, r) != 0 ||
      std::memcmp(header + r + 4, expect_header + r + 4, d - r - 4) != 0 ||
      std::memcmp(header + d + 8, expect_header + d + 8, end - d - 8) != 0)
    return ReadStatus::kInvalid;
  if (XXH3_64bits(staging, payload) != load_le64(header + d)) return ReadStatus::kInvalid;
  // layer-major block (layer, K|V, token, row) -> page_first regions (token, layer, row)
  const size_t row = g.row_bytes, part = g.page_size * row;
  for (size_t l = 0; l < g.num_layers; ++l) {
    const uint8_t* src_k = staging + (2 * l) * part;
    const uint8_t* src_v = src_k + part;
    for (size_t t = 0; t < g.page_size; ++t) {
      size_t dst = (t * g.num_layers + l) * row;
      std::memcpy(k_region + dst, src_k + t * row, row);
      std::memcpy(v_region + dst, src_v + t * row, row);
    }
  }
  if (not_before_s > 0) sleep_until(not_before_s);
  return ReadStatus::kOk;
}

}  // namespace dualpath::storage
