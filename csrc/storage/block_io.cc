#include "block_io.h"

#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <random>

#include "dualpath/iov.h"

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
    iov_advance(iov, n, static_cast<size_t>(r));
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
    iov_advance(iov, n, static_cast<size_t>(w));
  }
  return true;
}

// mkdir -p of path's directory, as os.makedirs(dirname, exist_ok=True): a directory that is
// there (whatever mkdir said) is success; false with errno set (EEXIST: a file is there).
bool make_parent_dirs(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos || slash == 0) return true;
  std::string dir = path.substr(0, slash);
  auto made = [&dir]() {
    if (::mkdir(dir.c_str(), 0777) == 0) return true;
    int err = errno;
    struct stat st;
    if (::stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) return true;
    errno = err;
    return false;
  };
  if (made()) return true;
  if (errno != ENOENT || !make_parent_dirs(dir)) return false;
  return made();
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

uint64_t seed() {
  uint64_t v = 0;
  if (::getrandom(&v, sizeof(v), 0) != static_cast<ssize_t>(sizeof(v))) {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    v = static_cast<uint64_t>(ts.tv_nsec) ^ (static_cast<uint64_t>(ts.tv_sec) << 30);
  }
  return v ^ (static_cast<uint64_t>(::getpid()) << 32) ^ static_cast<uint64_t>(::gettid());
}

std::string temp_name(const std::string& path) {
  thread_local std::mt19937_64 rng{seed()};
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%012llx",
                static_cast<unsigned long long>(rng() & 0xffffffffffffULL));
  return path + "." + std::to_string(::getpid()) + "." + buf + ".tmp";
}

// The part of write_page_block after the claim: gather, checksum, temp file, rename. Returns
// false with errno set; removes the temp file it created. May throw std::bad_alloc.
bool write_claimed(const std::string& path, const uint8_t* header_template,
                   const PageFirstGeometry& g, const uint8_t* k_region, const uint8_t* v_region,
                   uint8_t* header, uint8_t* staging, double* started_s) {
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
  *started_s = monotonic_s();  // the storage NIC's transfer starts here, as write_block's
  int fd = ::open(tmp.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0666);
  if (fd < 0) return false;  // not ours to remove
  iovec iov[2] = {{header, g.header_bytes}, {staging, payload}};
  bool ok = writev_full(fd, iov, 2);
  int err = ok ? 0 : errno;
  if (::close(fd) != 0 && ok) {
    ok = false;
    err = errno;  // deferred write-back errors (NFS, quota) surface here
  }
  if (ok && ::rename(tmp.c_str(), path.c_str()) != 0) {
    ok = false;
    err = errno;
  }
  if (!ok) {
    ::unlink(tmp.c_str());
    errno = err;
  }
  return ok;
}

}  // namespace

WriteStatus write_page_block(const std::string& path, const uint8_t* header_template,
                             const PageFirstGeometry& g, const uint8_t* k_region,
                             const uint8_t* v_region, uint8_t* header, uint8_t* staging,
                             double claim_stale_s, int* errno_out, double* started_s) noexcept {
  *errno_out = 0;
  *started_s = 0;
  try {
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
    bool ok = false;
    int err = 0;
    WriteStatus status = WriteStatus::kIoError;
    try {
      if (exists(path)) {  // finished by another writer between the checks
        status = WriteStatus::kExists;
      } else {
        ok = write_claimed(path, header_template, g, k_region, v_region, header, staging,
                           started_s);
        err = ok ? 0 : errno;
        status = ok ? WriteStatus::kWritten : WriteStatus::kIoError;
      }
    } catch (...) {
      err = ENOMEM;
    }
    ::unlink(claim.c_str());
    *errno_out = err;
    return status;
  } catch (...) {  // an allocation before the claim
    *errno_out = ENOMEM;
    return WriteStatus::kIoError;
  }
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
