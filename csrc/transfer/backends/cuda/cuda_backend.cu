// `cuda` backend: copies between host memory and CUDA device memory (this process's GPUs, and
// another process's device memory opened here through CUDA IPC: python/dualpath/transfer/
// cuda_ipc.py; such a "device@N" region is reached only from GPU N, which runs every copy
// that touches it), batched.
//
// A worker's slice of a batch is one submission on that worker's stream of the batch's class
// (latency: the device's highest stream priority, bulk: its lowest), grouped by the device that
// executes it (the source's GPU, else the destination's):
// - pieces of at least kEngineCopyBytes, or touching memory no kernel may dereference (pageable
//   host memory), go to the copy engines with cudaMemcpyAsync;
// - the smaller ones are moved by one launch of batched_copy_kernel (a table of (src, dst, len)
//   copied to the device, 16-byte accesses where aligned): one launch for any number of small
//   chunks instead of a cudaMemcpyAsync (5-7 us to post) each.
// The worker then waits for its stream. Pinned host memory is kernel-accessible at its host
// address (unified addressing); device memory of another GPU is reached through peer access,
// enabled on first use.
#include <cuda_runtime.h>

#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../../engine.h"

namespace dualpath::transfer {

namespace {

constexpr uint64_t kEngineCopyBytes = 1 << 20;  // at or above: copy engine, below: the kernel
constexpr uint64_t kBlockBytes = 64 << 10;       // one kernel block copies at most this much
constexpr int kUnroll = 4;

struct Piece {
  const char* src;
  char* dst;
  uint64_t len;
};

__global__ void batched_copy_kernel(const Piece* __restrict__ pieces, int n) {
  for (int p = blockIdx.x; p < n; p += gridDim.x) {
    const Piece pc = pieces[p];
    const uintptr_t s = reinterpret_cast<uintptr_t>(pc.src), d = reinterpret_cast<uintptr_t>(pc.dst);
    if (((s | d | pc.len) & 15) == 0) {
      const int4* src = reinterpret_cast<const int4*>(pc.src);
      int4* dst = reinterpret_cast<int4*>(pc.dst);
      const uint64_t n16 = pc.len >> 4;
      // kUnroll loads in flight per thread before its stores: reads of pinned host memory
      // over PCIe wait ~1-2 us each
      for (uint64_t i0 = threadIdx.x; i0 < n16; i0 += uint64_t{blockDim.x} * kUnroll) {
        int4 r[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const uint64_t i = i0 + uint64_t{blockDim.x} * u;
          if (i < n16) r[u] = src[i];
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const uint64_t i = i0 + uint64_t{blockDim.x} * u;
          if (i < n16) dst[i] = r[u];
        }
      }
    } else {
      for (uint64_t i = threadIdx.x; i < pc.len; i += blockDim.x) pc.dst[i] = pc.src[i];
    }
  }
}

std::string cuda_err(const char* what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

// Per (worker, device, class): a stream and the piece tables (pinned staging + device copy).
struct Lane {
  cudaStream_t stream = nullptr;
  Piece* host_table = nullptr;
  Piece* dev_table = nullptr;
  size_t capacity = 0;
};

}  // namespace

class CudaBackend final : public Backend {
 public:
  // kAuto ("cuda"): pieces under kEngineCopyBytes to the batched kernel, larger ones to the
  // copy engines; kMemcpy ("cuda:memcpy"): every piece to the copy engines, one cudaMemcpyAsync
  // each (the baseline the batched kernel is measured against); kKernel ("cuda:kernel"): every
  // piece the kernel can reach to the kernel, whatever its size (SMs over NVLink instead of a
  // copy engine another transfer may hold: an experiment for the PD sender's slow copies)
  explicit CudaBackend(CudaCopyMode mode) : mode_(mode) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0)
      throw std::runtime_error("cuda transfer backend: no usable GPU (" +
                               (e != cudaSuccess ? cuda_err("cudaGetDeviceCount", e)
                                                 : std::string("0 devices")) + ")");
  }
  ~CudaBackend() override {
    // runs on the caller's thread: leave its current device as it was (a destructor that
    // switched it once made the next torch allocation land on another GPU)
    int current = -1;
    const bool restore = cudaGetDevice(&current) == cudaSuccess;
    for (auto& kv : lanes_) {
      Lane& l = kv.second;
      cudaSetDevice(std::get<1>(kv.first));
      if (l.stream) cudaStreamDestroy(l.stream);
      if (l.host_table) cudaFreeHost(l.host_table);
      if (l.dev_table) cudaFree(l.dev_table);
    }
    if (restore) cudaSetDevice(current);
    cudaGetLastError();
  }

  std::string name() const override {
    return mode_ == CudaCopyMode::kAuto ? "cuda"
           : mode_ == CudaCopyMode::kMemcpy ? "cuda:memcpy" : "cuda:kernel";
  }
  bool batched() const override { return true; }

  std::string check_region(Region& r) override {
    // "device@N": device memory that GPU N's kernels must reach it from (another process's
    // memory opened through CUDA IPC in GPU N's context; the pointer reports the owner's GPU)
    int opener = -1;
    if (r.kind.rfind("device@", 0) == 0) {
      try {
        opener = std::stoi(r.kind.substr(7));
      } catch (const std::exception&) {
        return "region kind '" + r.kind + "': expected device@<gpu index>";
      }
      r.kind = "device";
    }
    if (r.kind != "host" && r.kind != "device")
      return "region kind '" + r.kind + "' is not supported by the cuda backend (host, device, "
             "device@<gpu>)";
    if (r.length == 0) return "";
    cudaPointerAttributes a{};
    const cudaError_t e = cudaPointerGetAttributes(&a, reinterpret_cast<void*>(r.addr));
    if (e != cudaSuccess) {
      cudaGetLastError();  // not sticky; clear it
      return cuda_err("cudaPointerGetAttributes", e);
    }
    if (r.kind == "device") {
      if (a.type != cudaMemoryTypeDevice)
        return "region registered as 'device' is not CUDA device memory";
      r.device = opener >= 0 ? opener : a.device;
      r.context_bound = opener >= 0;
      r.gpu_accessible = true;
      return "";
    }
    if (a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged)
      return "region registered as 'host' is CUDA device memory: register it as 'device'";
    // pinned (cudaHostAlloc / cudaHostRegister): kernels reach it at its host address when it is
    // mapped there (unified addressing); pageable memory: copy engines only
    r.device = -1;
    r.gpu_accessible = a.type == cudaMemoryTypeHost &&
                       a.devicePointer == reinterpret_cast<void*>(r.addr);
    return "";
  }

  std::string copy(void* dst, const void* src, uint64_t length) override {
    const cudaError_t e = cudaMemcpy(dst, src, length, cudaMemcpyDefault);
    return e == cudaSuccess ? "" : cuda_err("cudaMemcpy", e);
  }

  std::string copy_range(const std::vector<Resolved>& ptrs, const std::vector<Desc>& pieces,
                         uint64_t begin, uint64_t end, Priority priority, int worker) override {
    // group by executing device; host-to-host pieces are plain memcpy
    std::map<int, std::vector<uint64_t>> by_device;
    for (uint64_t i = begin; i < end; ++i) {
      if (pieces[i].length == 0) continue;
      const Resolved& r = ptrs[i];
      // memory opened through CUDA IPC is reachable only from the context it was opened in:
      // that GPU runs the copy (reading a peer GPU's memory over NVLink if need be);
      // otherwise the source's GPU pushes (peer writes over NVLink), else the destination's
      // GPU pulls from host memory
      const Region* s = r.src_region;
      const Region* d = r.dst_region;
      const int dev = d->context_bound ? d->device
                      : s->context_bound ? s->device
                      : s->device >= 0 ? s->device : d->device;
      if (s->context_bound && d->context_bound && s->device != d->device)
        return "piece " + std::to_string(i) + ": its source and destination were opened in "
               "different GPUs' contexts (" + std::to_string(s->device) + ", " +
               std::to_string(d->device) + "); open both on one GPU";
      if (dev < 0) {
        std::memmove(r.dst, r.src, pieces[i].length);
        continue;
      }
      by_device[dev].push_back(i);
    }
    for (auto& kv : by_device) {
      std::string err = run_on_device(kv.first, kv.second, ptrs, pieces, priority, worker);
      if (!err.empty()) return "device " + std::to_string(kv.first) + ": " + err;
    }
    return "";
  }

 private:
  std::string run_on_device(int dev, const std::vector<uint64_t>& idx,
                            const std::vector<Resolved>& ptrs, const std::vector<Desc>& pieces,
                            Priority priority, int worker) {
    cudaGetLastError();  // a failed call of an earlier batch on this thread is not ours
    cudaError_t e = cudaSetDevice(dev);
    if (e != cudaSuccess) return cuda_err("cudaSetDevice", e);
    Lane* lane = nullptr;
    std::string err = get_lane(worker, dev, priority, &lane);
    if (!err.empty()) return err;
    std::vector<Piece> small;
    for (uint64_t i : idx) {
      const Resolved& r = ptrs[i];
      const uint64_t n = pieces[i].length;
      bool kernel_ok = mode_ != CudaCopyMode::kMemcpy &&
                       (mode_ == CudaCopyMode::kKernel || n < kEngineCopyBytes) &&
                       r.src_region->gpu_accessible && r.dst_region->gpu_accessible;
      for (const Region* other : {r.src_region, r.dst_region})
        if (kernel_ok && other->device >= 0 && other->device != dev)
          kernel_ok = peer_access(dev, other->device);  // else the copy engines stage it
      if (kernel_ok) {  // cut into block-sized parts: a slice of few larger pieces still
                        // spreads over the SMs
        const auto* s8 = static_cast<const char*>(r.src);
        auto* d8 = static_cast<char*>(r.dst);
        for (uint64_t o = 0; o < n; o += kBlockBytes)
          small.push_back({s8 + o, d8 + o, n - o < kBlockBytes ? n - o : kBlockBytes});
        continue;
      }
      e = cudaMemcpyAsync(r.dst, r.src, n, cudaMemcpyDefault, lane->stream);
      if (e != cudaSuccess) return drained(lane, cuda_err("cudaMemcpyAsync", e));
    }
    if (!small.empty()) {
      err = reserve(lane, small.size());
      if (!err.empty()) return drained(lane, err);  // copies queued above end first
      std::memcpy(lane->host_table, small.data(), small.size() * sizeof(Piece));
      e = cudaMemcpyAsync(lane->dev_table, lane->host_table, small.size() * sizeof(Piece),
                          cudaMemcpyHostToDevice, lane->stream);
      if (e != cudaSuccess) return drained(lane, cuda_err("cudaMemcpyAsync (piece table)", e));
      const int n = static_cast<int>(small.size());
      const int blocks = n < 65535 ? n : 65535;
      batched_copy_kernel<<<blocks, 256, 0, lane->stream>>>(lane->dev_table, n);
      e = cudaGetLastError();
      if (e != cudaSuccess) return drained(lane, cuda_err("batched_copy_kernel launch", e));
    }
    e = cudaStreamSynchronize(lane->stream);
    if (e != cudaSuccess) return cuda_err("cudaStreamSynchronize", e);
    return "";
  }

  // A failure after some copies were queued: let them finish (the engine reports the batch
  // failed; nothing may still be writing when it does, and the piece table is reused next).
  static std::string drained(Lane* lane, std::string err) {
    cudaStreamSynchronize(lane->stream);
    cudaGetLastError();
    return err;
  }

  std::string get_lane(int worker, int dev, Priority priority, Lane** out) {
    std::lock_guard<std::mutex> lk(mu_);
    Lane& l = lanes_[{worker, dev, static_cast<int>(priority)}];
    if (!l.stream) {
      int least = 0, greatest = 0;
      cudaError_t e = cudaDeviceGetStreamPriorityRange(&least, &greatest);
      if (e != cudaSuccess) return cuda_err("cudaDeviceGetStreamPriorityRange", e);
      e = cudaStreamCreateWithPriority(&l.stream, cudaStreamNonBlocking,
                                       priority == Priority::kLatency ? greatest : least);
      if (e != cudaSuccess) return cuda_err("cudaStreamCreateWithPriority", e);
    }
    *out = &l;
    return "";
  }

  static std::string reserve(Lane* l, size_t n) {
    if (n <= l->capacity) return "";
    size_t cap = l->capacity ? l->capacity : 1024;
    while (cap < n) cap *= 2;
    if (l->host_table) cudaFreeHost(l->host_table);
    if (l->dev_table) cudaFree(l->dev_table);
    l->host_table = nullptr;
    l->dev_table = nullptr;
    l->capacity = 0;
    cudaError_t e = cudaMallocHost(&l->host_table, cap * sizeof(Piece));
    if (e != cudaSuccess) return cuda_err("cudaMallocHost (piece table)", e);
    e = cudaMalloc(&l->dev_table, cap * sizeof(Piece));
    if (e != cudaSuccess) return cuda_err("cudaMalloc (piece table)", e);
    l->capacity = cap;
    return "";
  }

  // Can kernels on `dev` (the current device) dereference memory of `peer`? Enables peer
  // access on first use; remembered either way.
  bool peer_access(int dev, int peer) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = peers_.find({dev, peer});
    if (it != peers_.end()) return it->second;
    int can = 0;
    bool ok = cudaDeviceCanAccessPeer(&can, dev, peer) == cudaSuccess && can;
    if (ok) {
      const cudaError_t e = cudaDeviceEnablePeerAccess(peer, 0);
      ok = e == cudaSuccess || e == cudaErrorPeerAccessAlreadyEnabled;
    }
    cudaGetLastError();  // neither failure is sticky; do not leave it for the next call
    peers_[{dev, peer}] = ok;
    return ok;
  }

  const CudaCopyMode mode_;
  std::mutex mu_;
  std::map<std::tuple<int, int, int>, Lane> lanes_;  // (worker, device, class)
  std::map<std::pair<int, int>, bool> peers_;
};

std::unique_ptr<Backend> make_cuda_backend(CudaCopyMode mode) {
  return std::make_unique<CudaBackend>(mode);
}

}  // namespace dualpath::transfer
