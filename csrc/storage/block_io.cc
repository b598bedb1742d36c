#include "block_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <random>

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

// Drops `done` bytes from the front of iov[0, n).
void advance(iovec*& iov, int& n, size_t done) {
  while (n > 0 && done >= iov->iov_len) {
    done -= iov->iov_len;
    ++iov;
    --n;
  }
  if (n > 0) {
    iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + done;
    iov->iov_len -= done;
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
    advance(iov, n, static_cast<size_t>(r));
  }
  return got;
}

uint64_t load_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// Writes iov in full; false with errno set on failure.
bool writev_full(int fd, iovec* iov, int n) {
  while (n > 0) {
    ssize_t w = ::writev(fd, iov, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    advance(iov, n, static_cast<size_t>(w));
  }
  return true;
}

// mkdir -p of path's directory (os.makedirs(dirname, exist_ok=True)); false with errno set.
bool make_parent_dirs(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos || slash == 0) return true;
  std::string dir = path.substr(0, slash);
  if (::mkdir(dir.c_str(), 0777) == 0 || errno == EEXIST) return true;
  if (errno != ENOENT || !make_parent_dirs(dir)) return false;
  return ::mkdir(dir.c_str(), 0777) == 0 || errno == EEXIST;
}

bool exists(const std::string& path) { return ::access(path.c_str(), F_OK) == 0; }

// BlockStore._claim_key: exclusive create of the claim file, taking over a stale one once.
// 1 = claimed, 0 = someone else's, -1 = error (errno set).
int claim_key(const std::string& claim, double stale_s) {
  for (int attempt = 0; attempt < 2; ++attempt) {
    int fd = ::open(claim.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644);
    if (fd >= 0) {
      ::close(fd);
      return 1;
    }
    if (errno != EEXIST) return -1;
    struct stat st;
    if (::stat(claim.c_str(), &st) != 0) {
      if (errno == ENOENT) continue;  // released meanwhile: try again
      return -1;
    }
    timespec now;
    clock_gettime(CLOCK_REALTIME, &now);  // st_mtime is wall-clock, as Python's time.time()
    double age = static_cast<double>(now.tv_sec - st.st_mtim.tv_sec) +
                 static_cast<double>(now.tv_nsec - st.st_mtim.tv_nsec) * 1e-9;
    if (age < stale_s) return 0;  // someone is writing it now
    if (::unlink(claim.c_str()) != 0 && errno != ENOENT) return -1;  // its writer died
  }
  return 0;
}

std::string temp_name(const std::string& path) {
  thread_local std::mt19937_64 rng{std::random_device{}() ^
                                   static_cast<uint64_t>(::getpid()) << 32};
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%012llx",
                static_cast<unsigned long long>(rng() & 0xffffffffffffULL));
  return path + "." + std::to_string(::getpid()) + "." + buf + ".tmp";
}

}  // namespace

WriteStatus write_page_block(const std::string& path, const uint8_t* header_template,
                             const PageFirstGeometry& g, const uint8_t* k_region,
                             const uint8_t* v_region, uint8_t* header, uint8_t* staging,
                             double claim_stale_s, int* errno_out) noexcept {
  *errno_out = 0;
  if (exists(path)) return WriteStatus::kExists;
  if (!make_parent_dirs(path)) {
    *errno_out = errno;
    return WriteStatus::kIoError;
  }
  const std::string claim = path + ".claim";
  int claimed = claim_key(claim, claim_stale_s);
  if (claimed < 0) {
    *errno_out = errno;
    return WriteStatus::kIoError;
  }
  if (claimed == 0) return WriteStatus::kClaimed;
  if (exists(path)) {  // finished by another writer between the checks
    ::unlink(claim.c_str());
    return WriteStatus::kExists;
  }
  // page_first regions (token, layer, row) -> layer-major block (layer, K|V, token, row)
  const size_t row = g.row_bytes, part = g.page_size * row, payload = g.payload_bytes();
  for (size_t l = 0; l < g.num_layers; ++l) {
    uint8_t* dst_k = staging + (2 * l) * part;
    uint8_t* dst_v = dst_k + part;
    for (size_t t = 0; t < g.page_size; ++t) {
      size_t src = (t * g.num_layers + l) * row;
      std::memcpy(dst_k + t * row, k_region + src, row);
      std::memcpy(dst_v + t * row, v_region + src, row);
    }
  }
  std::memcpy(header, header_template, g.header_bytes);
  uint64_t digest = XXH3_64bits(staging, payload);
  for (int i = 0; i < 8; ++i) header[g.digest_offset + i] = static_cast<uint8_t>(digest >> (8 * i));
  const std::string tmp = temp_name(path);
  int fd = ::open(tmp.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0666);
  bool ok = fd >= 0;
  if (ok) {
    iovec iov[2] = {{header, g.header_bytes}, {staging, payload}};
    ok = writev_full(fd, iov, 2);
    int saved = errno;
    ok = (::close(fd) == 0) && ok;
    if (!ok && saved) errno = saved;
    ok = ok && ::rename(tmp.c_str(), path.c_str()) == 0;
  }
  if (!ok) {
    *errno_out = errno;
    ::unlink(tmp.c_str());
    ::unlink(claim.c_str());
    return WriteStatus::kIoError;
  }
  ::unlink(claim.c_str());
  return WriteStatus::kWritten;
}

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
