// Full Block reads into SGLang's page_first host pool, without the GIL.
//
// The Python reader (python/dualpath/storage/block_file.py + page_first.py) is the reference:
// same file format, same checks, same page layout. This one does a whole batch of blocks in one
// call, so a storage thread gives up and wins back the GIL once per batch instead of ~7 times a
// block (open, readv, close, checksum, two transposes, the NIC's sleep): on 2x H100 the decode's
// scheduler thread lost half its time to those hand-overs while its node read at 2.6 GB/s
// (session 18 stack samples, TPOT 12 -> 23 ms).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace dualpath::storage {

enum class ReadStatus : int8_t {
  kOk = 0,
  kMiss = 1,     // no such file
  kInvalid = 2,  // header, size or checksum wrong: never data
  kIoError = 3,  // any other errno (errno_out says which)
};

struct PageFirstGeometry {
  size_t header_bytes;  // 4096
  size_t digest_offset;  // where the header keeps the payload's XXH3-64 (little-endian u64)
  size_t reserved_offset;  // a u32 the Python reader ignores
  size_t fixed_bytes;  // the fixed fields; the key (key_len at offset 10, u16) follows them
  size_t num_layers;
  size_t page_size;
  size_t row_bytes;  // one token of one layer's K (or V)
  size_t payload_bytes() const { return num_layers * 2 * page_size * row_bytes; }
};

// Reads the block at `path` into `staging` (payload_bytes long), checks its header against
// `expect_header` (what block_file.check_header checks: the fixed fields but the reserved u32
// and the digest, then the key; not the padding after it) and the payload against the digest,
// and only
// then scatters it into the page's K and V regions (token-major rows: [page_size][num_layers]
// [row_bytes]). If `not_before_s` > 0, returns no earlier than that CLOCK_MONOTONIC time (the
// emulated storage NIC's line rate). Never throws; on anything but kOk the regions are untouched.
// `header` is a header_bytes scratch buffer.
ReadStatus read_block_to_page(const std::string& path, const uint8_t* expect_header,
                              const PageFirstGeometry& g, uint8_t* header, uint8_t* staging,
                              uint8_t* k_region, uint8_t* v_region, double not_before_s,
                              int* errno_out) noexcept;

enum class WriteStatus : int8_t {
  kWritten = 0,
  kExists = 1,   // already stored: nothing written
  kClaimed = 2,  // another writer (any process) is writing it now: nothing written
  kIoError = 3,  // errno_out says which; no temp file or claim left behind
};

// BlockStore.put + write_block for one page_first page (python/dualpath/storage/store.py is the
// reference): skip a stored key; claim it (`<path>.claim`, exclusive create; a claim older than
// `claim_stale_s` belongs to a writer that died and is taken over); gather the page's K and V
// regions into `staging` layer-major; write header (`header_template` with the payload's
// XXH3-64 put in at digest_offset) and payload to a unique temp file and rename it over `path`;
// release the claim. `header` is a header_bytes scratch buffer. `started_s`: the
// CLOCK_MONOTONIC time the file write began (0 when nothing was written), from which the
// emulated storage NIC counts it. Never throws (an allocation failure is kIoError, ENOMEM).
WriteStatus write_page_block(const std::string& path, const uint8_t* header_template,
                             const PageFirstGeometry& g, const uint8_t* k_region,
                             const uint8_t* v_region, uint8_t* header, uint8_t* staging,
                             double claim_stale_s, int* errno_out, double* started_s) noexcept;

// XXH3-64 of a buffer: the checksum the block format uses (tests compare it with Python's).
uint64_t xxh3_64(const void* data, size_t len);

}  // namespace dualpath::storage
