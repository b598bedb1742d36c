// DualPath transfer engine: batched copies between registered memory regions.
//
// Contract
// - Memory is registered once (`register_region`), then addressed as (region id, offset).
//   Descriptors are validated when submitted: an unknown region or a range outside its region
//   makes `submit` throw std::invalid_argument naming the descriptor index; nothing is queued.
// - `submit(batch)` never blocks on data movement: it queues the batch and returns a handle.
//   Worker threads move the data. Within a batch, descriptors complete in no particular order;
//   there is no ordering between batches either, except that a batch of class kLatency queued
//   while a kBulk batch runs is served before the rest of that bulk batch (bulk work is cut into
//   slices and the latency queue is checked between slices).
// - A handle ends in exactly one of kDone, kFailed (the first failing descriptor's index and the
//   reason are kept), or kCanceled (`cancel` stops descriptors not yet started; those running
//   finish). `poll` never blocks; `wait` blocks up to a timeout and releases no locks the workers
//   need. A batch may be resubmitted after it ended (repost): submit it again, new handle.
// - Zero-length descriptors are valid and complete immediately.
// - Regions must stay valid until every batch touching them has ended; deregistering a region
//   in use is refused.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace dualpath::transfer {

enum class Priority : int { kLatency = 0, kBulk = 1 };
enum class Status : int { kPending = 0, kDone = 1, kFailed = 2, kCanceled = 3 };

struct Region {
  uint64_t id;
  uintptr_t addr;
  uint64_t length;
  std::string kind;  // "host" (incl. pinned and shared memory mapped here)
  std::atomic<int64_t> in_use{0};
};

struct Desc {
  uint64_t src_region, src_offset, dst_region, dst_offset, length;
};

// Backend: moves the bytes of resolved descriptors. One instance per engine; called from worker
// threads concurrently (must be thread-safe). Returns "" or the reason of a failure.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual std::string copy(void* dst, const void* src, uint64_t length) = 0;
};

std::unique_ptr<Backend> make_backend(const std::string& name);

struct Batch {
  std::vector<Desc> descs;
  std::vector<std::pair<void*, const void*>> ptrs;  // resolved at submit
  std::vector<Region*> regions;                     // pinned in_use while the batch lives
  Priority priority = Priority::kBulk;
  std::atomic<uint64_t> next{0};       // next descriptor to start
  std::atomic<uint64_t> finished{0};   // descriptors ended
  std::atomic<bool> canceled{false};
  std::atomic<int> status{static_cast<int>(Status::kPending)};
  std::mutex mu;
  std::condition_variable cv;
  std::atomic<int64_t> failed_index{-1};
  std::string error;  // written once, under mu, with failed_index
};

using Handle = std::shared_ptr<Batch>;

class Engine {
 public:
  Engine(const std::string& backend, int num_workers, uint64_t slice_bytes);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  uint64_t register_region(uintptr_t addr, uint64_t length, const std::string& kind);
  void deregister_region(uint64_t id);
  Handle submit(std::vector<Desc> descs, Priority priority);
  Status poll(const Handle& h) const;
  Status wait(const Handle& h, double timeout_s) const;  // kPending on timeout
  void cancel(const Handle& h);
  std::string backend_name() const { return backend_->name(); }

 private:
  void worker_loop();
  void finish(const Handle& h, uint64_t n_done);
  Handle next_slice(uint64_t* begin, uint64_t* end);

  std::unique_ptr<Backend> backend_;
  uint64_t slice_bytes_;
  mutable std::mutex regions_mu_;
  std::unordered_map<uint64_t, std::unique_ptr<Region>> regions_;
  uint64_t next_region_ = 1;
  std::mutex q_mu_;
  std::condition_variable q_cv_;
  std::deque<Handle> queues_[2];  // [kLatency, kBulk]
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace dualpath::transfer
