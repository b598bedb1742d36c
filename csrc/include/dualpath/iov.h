// iovec helpers shared by the block I/O (csrc/storage) and the tcp transfer backend.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>

namespace dualpath {

// Drops `done` bytes from the front of iov[0, n): after a partial readv/writev/sendmsg, what
// is left to move.
inline void iov_advance(iovec*& iov, int& n, size_t done) {
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

}  // namespace dualpath
