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
//   slices and the latency queue is checked between slices). A descriptor longer than a slice
//   is moved as slice-sized pieces by several workers at once (it still succeeds or fails as
//   one descriptor).
// - A handle ends in exactly one of kDone, kFailed (the first failing descriptor's index and the
//   reason are kept), or kCanceled (`cancel` stops descriptors not yet started; those running
//   finish). `poll` never blocks; `wait` blocks up to a timeout and releases no locks the workers
//   need. A batch may be resubmitted after it ended (repost): submit it again, new handle.
// - Zero-length descriptors are valid and complete immediately.
// - Regions must stay valid until every batch touching them has ended; deregistering a region
//   in use is refused.
// - Remote regions (tcp backend): an engine serves its regions with `listen`; a peer engine
//   registers one of them with `register_remote` and uses the returned id as a source (one-sided
//   READ) or destination (one-sided WRITE) like a local region; remote-to-remote descriptors are
//   refused. The serving side checks every request against its own regions (unknown region or
//   out of range: that descriptor fails with the reason). A peer that dies or stops answering
//   for the socket timeout (30 s) fails the descriptors in flight to it
//   with the reason; nothing hangs. The next batch to that peer reconnects (repost).
// - Region kinds: "host" (any backend: pageable, pinned or shared memory mapped here),
//   "device" (cuda backend: CUDA device memory of this process) and "device@N" (cuda backend:
//   another process's device memory opened here through CUDA IPC in GPU N's context, so GPU N
//   moves its pieces). The backend checks a region when it is registered (kind, memory
//   type, device) and refuses what it cannot move.
// - Batched backends (cuda) receive each worker's slice of a batch as one range and move it
//   with one submission on the worker's stream for the batch's class (latency: the highest
//   stream priority, bulk: the lowest), then wait for it; a failure fails the range's first
//   descriptor with the reason. A kernel fault leaves the CUDA context unusable (CUDA's rule):
//   every later batch on that engine fails with the same reason.
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

// Which pieces the cuda backend moves with its batched kernel and which with the copy engines
// ("cuda", "cuda:memcpy", "cuda:kernel": backends/cuda/cuda_backend.cu).
enum class CudaCopyMode : int { kAuto = 0, kMemcpy = 1, kKernel = 2 };
enum class Status : int { kPending = 0, kDone = 1, kFailed = 2, kCanceled = 3 };

// A remote engine reached by a network backend; each backend derives its own (and only ever
// sees its own peers: an engine has one backend).
class Peer {
 public:
  virtual ~Peer() = default;
};

struct Region {
  uint64_t id;
  uintptr_t addr;  // 0 for a remote region
  uint64_t length;
  std::string kind;  // "host" (incl. pinned and shared memory mapped here) | "remote"
  std::atomic<int64_t> in_use{0};
  std::shared_ptr<Peer> peer;  // remote regions: the engine that owns the memory
  uint64_t remote_id = 0;      // remote regions: its region id there
  int device = -1;             // set by the backend: CUDA device of the memory (-1: host)
  bool gpu_accessible = false;  // set by the backend: a kernel may dereference the address
  bool context_bound = false;   // set by the backend: mapped in `device`'s context only (memory
                                // of another process opened through CUDA IPC): copies that
                                // touch it must run on that device
};

struct Desc {
  uint64_t src_region, src_offset, dst_region, dst_offset, length;
};

// A descriptor after validation: local ends as pointers, a remote end as its region + offset.
struct Resolved {
  void* dst = nullptr;
  const void* src = nullptr;
  Region* remote_dst = nullptr;
  Region* remote_src = nullptr;
  const Region* dst_region = nullptr;  // local ends: their regions (device, accessibility)
  const Region* src_region = nullptr;
};

class Engine;

// Backend: moves the bytes of resolved descriptors. One instance per engine; called from worker
// threads concurrently (must be thread-safe). Returns "" or the reason of a failure.
// Remote regions (another engine's memory, registered here with `register_remote`) are served by
// backends that reach other processes (tcp): `write_remote` puts local bytes into a remote
// region, `read_remote` fetches them; `worker` picks one of the peer's connections.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual std::string copy(void* dst, const void* src, uint64_t length) = 0;
  virtual std::string write_remote(Region& dst, uint64_t offset, const void* src, uint64_t length,
                                   int worker);
  virtual std::string read_remote(void* dst, Region& src, uint64_t offset, uint64_t length,
                                  int worker);
  // Serve this engine's regions to peers on `port` (0 = any free port); returns the port.
  virtual int listen(Engine& engine, const std::string& host, int port);
  virtual std::shared_ptr<Peer> connect(const std::string& address, int connections);
  // Stop serving peers (called first thing by ~Engine, before its regions go away).
  virtual void shutdown() {}
  // Accept (and annotate: device, gpu_accessible) a region being registered, or say why not.
  virtual std::string check_region(Region& r);
  // A region is going away (after no batch uses it): release what check_region set up.
  virtual void on_deregister(Region&) {}
  // Batched backends move a worker's whole slice [begin, end) of a batch's pieces at once.
  virtual bool batched() const { return false; }
  virtual std::string copy_range(const std::vector<Resolved>& ptrs,
                                 const std::vector<Desc>& pieces, uint64_t begin, uint64_t end,
                                 Priority priority, int worker);
};

std::unique_ptr<Backend> make_backend(const std::string& name);

struct Batch {
  std::vector<Desc> descs;
  std::vector<Resolved> ptrs;                       // resolved at submit
  std::vector<uint64_t> origin;  // descriptor each piece belongs to (large ones are split)
  uint64_t size = 0;             // descriptors submitted
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
  // A region of another engine (address "host:port" of its `listen`), addressed here by the
  // returned id like a local one; the backend moves the bytes (tcp).
  uint64_t register_remote(const std::string& address, uint64_t remote_region, uint64_t length,
                           int connections);
  void deregister_region(uint64_t id);
  int listen(const std::string& host, int port);
  // For the backend's server side: pin a local region range for a peer's request, or explain
  // why not. Unpin with `unpin`.
  std::string pin_local(uint64_t id, uint64_t offset, uint64_t length, Region** out);
  void unpin(Region* r) { r->in_use.fetch_sub(1); }
  Handle submit(std::vector<Desc> descs, Priority priority);
  Status poll(const Handle& h) const;
  Status wait(const Handle& h, double timeout_s) const;  // kPending on timeout
  void cancel(const Handle& h);
  std::string backend_name() const { return backend_->name(); }

 private:
  void worker_loop(int index);
  void finish(const Handle& h, uint64_t n_done);
  void record_failure(const Handle& h, uint64_t piece, const std::string& err);
  Handle next_slice(uint64_t* begin, uint64_t* end);

  std::unique_ptr<Backend> backend_;
  uint64_t slice_bytes_;
  mutable std::mutex regions_mu_;
  std::unordered_map<uint64_t, std::unique_ptr<Region>> regions_;
  uint64_t next_region_ = 1;
  std::mutex q_mu_;
  std::condition_variable q_cv_;
  std::deque<Handle> queues_[2];  // [kLatency, kBulk]
  std::mutex peers_mu_;
  std::unordered_map<std::string, std::shared_ptr<Peer>> peers_;  // by address
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace dualpath::transfer
