// `rdma` backend: one-sided RDMA WRITE/READ over ibverbs RC queue pairs into another engine's
// registered host regions, posted in chains with selective signaling (wr_plan.h).
//
// libibverbs is loaded at run time (dlopen "libibverbs.so.1"), so the module still imports on
// hosts without it (the project's GPU and CI hosts have no RDMA devices: this backend is
// compiled and its planning is unit-tested there, but it has not moved bytes on a device yet).
// Name: "rdma" (first device) or "rdma:<device>[:<gid index>]"; port 1.
//
// Bootstrap (TCP, the engine's `listen` port): CONNECT exchanges QP numbers, PSNs, LIDs and GIDs
// for `connections` RC QPs (one CQ each; engine worker i uses QP i % connections); REGION <id>
// returns the address, length and rkey of a registered region. Every local region is registered
// as a memory region (local write, remote read and write) when the engine registers it.
#include <arpa/inet.h>
#include <dlfcn.h>
#include <infiniband/verbs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "../../engine.h"
#include "wr_plan.h"

namespace dualpath::transfer {

namespace {

constexpr uint32_t kMagic = 0x31524450;  // "DPR1"
constexpr uint32_t kConnect = 1, kRegion = 2;
constexpr uint32_t kMaxChain = 32, kQueueDepth = 256;
constexpr int kTimeoutS = 30;

struct Verbs {
  void* lib = nullptr;
  decltype(&ibv_get_device_list) get_device_list;
  decltype(&ibv_free_device_list) free_device_list;
  decltype(&ibv_get_device_name) get_device_name;
  decltype(&ibv_open_device) open_device;
  decltype(&ibv_close_device) close_device;
  decltype(&ibv_alloc_pd) alloc_pd;
  decltype(&ibv_dealloc_pd) dealloc_pd;
  struct ibv_mr* (*reg_mr)(struct ibv_pd*, void*, size_t, int);
  decltype(&ibv_dereg_mr) dereg_mr;
  decltype(&ibv_create_cq) create_cq;
  decltype(&ibv_destroy_cq) destroy_cq;
  decltype(&ibv_create_qp) create_qp;
  decltype(&ibv_destroy_qp) destroy_qp;
  decltype(&ibv_modify_qp) modify_qp;
  int (*query_port)(struct ibv_context*, uint8_t, struct _compat_ibv_port_attr*);
  decltype(&ibv_query_gid) query_gid;
  decltype(&ibv_wc_status_str) wc_status_str;

  Verbs() {
    lib = dlopen("libibverbs.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!lib)
      throw std::runtime_error(std::string("rdma: libibverbs.so.1 not found (install "
                                           "rdma-core): ") + dlerror());
    load(get_device_list, "ibv_get_device_list");
    load(free_device_list, "ibv_free_device_list");
    load(get_device_name, "ibv_get_device_name");
    load(open_device, "ibv_open_device");
    load(close_device, "ibv_close_device");
    load(alloc_pd, "ibv_alloc_pd");
    load(dealloc_pd, "ibv_dealloc_pd");
    load(reg_mr, "ibv_reg_mr");
    load(dereg_mr, "ibv_dereg_mr");
    load(create_cq, "ibv_create_cq");
    load(destroy_cq, "ibv_destroy_cq");
    load(create_qp, "ibv_create_qp");
    load(destroy_qp, "ibv_destroy_qp");
    load(modify_qp, "ibv_modify_qp");
    load(query_port, "ibv_query_port");
    load(query_gid, "ibv_query_gid");
    load(wc_status_str, "ibv_wc_status_str");
  }
  template <typename F>
  void load(F& f, const char* sym) {
    f = reinterpret_cast<F>(dlsym(lib, sym));
    if (!f) throw std::runtime_error(std::string("rdma: libibverbs lacks ") + sym);
  }
};

#pragma pack(push, 1)
struct QpInfo {
  uint32_t qp_num, psn;
  uint16_t lid;
  uint8_t gid[16];
};
struct Request {
  uint32_t magic, op;
  uint64_t arg;  // CONNECT: QP count; REGION: region id
};
struct RegionReply {
  int32_t code;  // 0 ok
  uint64_t addr, length;
  uint32_t rkey;
  char msg[200];
};
#pragma pack(pop)

bool io_all(int fd, void* p, size_t n, bool out) {
  auto* c = static_cast<char*>(p);
  while (n) {
    const ssize_t k = out ? send(fd, c, n, MSG_NOSIGNAL) : recv(fd, c, n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    c += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

std::string errno_str(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

}  // namespace

struct RdmaQp {
  ibv_qp* qp = nullptr;
  ibv_cq* cq = nullptr;
  std::mutex mu;  // workers sharing a QP take turns
};

class RdmaPeer final : public Peer {
 public:
  std::string address;
  std::vector<std::unique_ptr<RdmaQp>> qps;
  std::mutex mu;
  std::map<uint64_t, RegionReply> regions;  // remote region id -> addr, length, rkey
};

class RdmaBackend final : public Backend {
 public:
  explicit RdmaBackend(const std::string& spec) {
    std::string dev_name, rest = spec.size() > 4 ? spec.substr(5) : "";
    const auto colon = rest.find(':');
    dev_name = rest.substr(0, colon);
    if (colon != std::string::npos) gid_index_ = std::stoi(rest.substr(colon + 1));
    int n = 0;
    ibv_device** list = v_.get_device_list(&n);
    if (!list || n == 0) {
      if (list) v_.free_device_list(list);
      throw std::runtime_error("rdma: no RDMA device on this host (ibv_get_device_list: 0)");
    }
    ibv_device* dev = nullptr;
    for (int i = 0; i < n && !dev; ++i)
      if (dev_name.empty() || dev_name == v_.get_device_name(list[i])) dev = list[i];
    if (dev) ctx_ = v_.open_device(dev);
    v_.free_device_list(list);
    if (!dev) throw std::runtime_error("rdma: no device named '" + dev_name + "'");
    if (!ctx_) throw std::runtime_error(errno_str("rdma: ibv_open_device"));
    pd_ = v_.alloc_pd(ctx_);
    if (!pd_) throw std::runtime_error(errno_str("rdma: ibv_alloc_pd"));
    ibv_port_attr pa{};
    if (v_.query_port(ctx_, 1, reinterpret_cast<_compat_ibv_port_attr*>(&pa)))
      throw std::runtime_error(errno_str("rdma: ibv_query_port"));
    lid_ = pa.lid;
    mtu_ = pa.active_mtu;
    max_msg_ = pa.max_msg_sz ? pa.max_msg_sz : (1u << 30);
    if (v_.query_gid(ctx_, 1, gid_index_, &gid_)) std::memset(&gid_, 0, sizeof gid_);
  }
  ~RdmaBackend() override {
    shutdown();
    for (auto& kv : mrs_) v_.dereg_mr(kv.second);
    for (auto& q : server_qps_) destroy(*q);
    if (pd_) v_.dealloc_pd(pd_);
    if (ctx_) v_.close_device(ctx_);
  }

  std::string name() const override { return "rdma"; }
  bool batched() const override { return true; }

  std::string check_region(Region& r) override {
    if (r.kind != "host")
      return "region kind '" + r.kind + "' is not supported by the rdma backend (host)";
    if (r.length == 0) return "";
    ibv_mr* mr = v_.reg_mr(pd_, reinterpret_cast<void*>(r.addr), r.length,
                           IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE |
                               IBV_ACCESS_REMOTE_READ);
    if (!mr) return errno_str("ibv_reg_mr");
    std::lock_guard<std::mutex> lk(mu_);
    mrs_[r.addr] = mr;
    return "";
  }

  void on_deregister(Region& r) override {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = mrs_.find(r.addr);
    if (it != mrs_.end()) {
      v_.dereg_mr(it->second);
      mrs_.erase(it);
    }
  }

  std::string copy(void* dst, const void* src, uint64_t length) override {
    std::memmove(dst, src, length);
    return "";
  }

  std::string copy_range(const std::vector<Resolved>& ptrs, const std::vector<Desc>& pieces,
                         uint64_t begin, uint64_t end, Priority, int worker) override {
    // remote pieces grouped per (peer, op); local ones copied here
    std::map<std::pair<RdmaPeer*, int>, std::vector<uint64_t>> groups;
    for (uint64_t i = begin; i < end; ++i) {
      const Resolved& r = ptrs[i];
      if (pieces[i].length == 0) continue;
      if (r.remote_dst) groups[{peer_of(*r.remote_dst), IBV_WR_RDMA_WRITE}].push_back(i);
      else if (r.remote_src) groups[{peer_of(*r.remote_src), IBV_WR_RDMA_READ}].push_back(i);
      else std::memmove(r.dst, r.src, pieces[i].length);
    }
    for (auto& g : groups) {
      std::string err = post_group(g.first.first, g.first.second, g.second, ptrs, pieces, worker);
      if (!err.empty()) return err;
    }
    return "";
  }

  int listen(Engine& engine, const std::string& host, int port) override;
  std::shared_ptr<Peer> connect(const std::string& address, int connections) override;
  void shutdown() override {
    stopping_ = true;
    if (listen_fd_ >= 0) {
      ::shutdown(listen_fd_, SHUT_RDWR);
      close(listen_fd_);
      listen_fd_ = -1;
    }
    if (server_.joinable()) server_.join();
  }

 private:
  static RdmaPeer* peer_of(const Region& r) { return static_cast<RdmaPeer*>(r.peer.get()); }
  std::string post_group(RdmaPeer* peer, int op, const std::vector<uint64_t>& idx,
                         const std::vector<Resolved>& ptrs, const std::vector<Desc>& pieces,
                         int worker);
  std::string region_of(RdmaPeer* peer, Region* remote, RegionReply* out);
  std::unique_ptr<RdmaQp> make_qp(std::string* err);
  std::string connect_qp(RdmaQp& q, const QpInfo& remote, uint32_t my_psn);
  QpInfo info_of(const RdmaQp& q, uint32_t psn) const {
    QpInfo i{};
    i.qp_num = q.qp->qp_num;
    i.psn = psn;
    i.lid = lid_;
    std::memcpy(i.gid, gid_.raw, 16);
    return i;
  }
  void destroy(RdmaQp& q) {
    if (q.qp) v_.destroy_qp(q.qp);
    if (q.cq) v_.destroy_cq(q.cq);
    q.qp = nullptr;
    q.cq = nullptr;
  }
  uint32_t lkey_of(uintptr_t addr, uint64_t len) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = mrs_.upper_bound(addr);
    if (it == mrs_.begin()) return 0;
    --it;
    ibv_mr* mr = it->second;
    const auto base = reinterpret_cast<uintptr_t>(mr->addr);
    return addr + len <= base + mr->length ? mr->lkey : 0;
  }
  void serve(Engine* engine);

  Verbs v_;
  ibv_context* ctx_ = nullptr;
  ibv_pd* pd_ = nullptr;
  uint16_t lid_ = 0;
  ibv_mtu mtu_ = IBV_MTU_1024;
  uint64_t max_msg_ = 1u << 30;
  int gid_index_ = 0;
  ibv_gid gid_{};
  std::mutex mu_;
  std::map<uintptr_t, ibv_mr*> mrs_;
  std::vector<std::unique_ptr<RdmaQp>> server_qps_;
  int listen_fd_ = -1;
  std::atomic<bool> stopping_{false};
  std::thread server_;
  std::mt19937 rng_{std::random_device{}()};
};

std::unique_ptr<RdmaQp> RdmaBackend::make_qp(std::string* err) {
  auto q = std::make_unique<RdmaQp>();
  q->cq = v_.create_cq(ctx_, kQueueDepth, nullptr, nullptr, 0);
  if (!q->cq) {
    *err = errno_str("ibv_create_cq");
    return nullptr;
  }
  ibv_qp_init_attr ia{};
  ia.send_cq = q->cq;
  ia.recv_cq = q->cq;
  ia.qp_type = IBV_QPT_RC;
  ia.sq_sig_all = 0;  // selective signaling
  ia.cap.max_send_wr = kQueueDepth;
  ia.cap.max_recv_wr = 1;
  ia.cap.max_send_sge = 1;
  ia.cap.max_recv_sge = 1;
  q->qp = v_.create_qp(pd_, &ia);
  if (!q->qp) {
    *err = errno_str("ibv_create_qp");
    destroy(*q);
    return nullptr;
  }
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_INIT;
  a.pkey_index = 0;
  a.port_num = 1;
  a.qp_access_flags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
  if (v_.modify_qp(q->qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT |
                                  IBV_QP_ACCESS_FLAGS)) {
    *err = errno_str("ibv_modify_qp(INIT)");
    destroy(*q);
    return nullptr;
  }
  return q;
}

std::string RdmaBackend::connect_qp(RdmaQp& q, const QpInfo& remote, uint32_t my_psn) {
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_RTR;
  a.path_mtu = mtu_;
  a.dest_qp_num = remote.qp_num;
  a.rq_psn = remote.psn;
  a.max_dest_rd_atomic = 16;
  a.min_rnr_timer = 12;
  a.ah_attr.port_num = 1;
  a.ah_attr.dlid = remote.lid;
  bool has_gid = false;
  for (uint8_t b : remote.gid) has_gid |= b != 0;
  if (has_gid) {  // RoCE / routed IB: global routing header
    a.ah_attr.is_global = 1;
    std::memcpy(a.ah_attr.grh.dgid.raw, remote.gid, 16);
    a.ah_attr.grh.sgid_index = static_cast<uint8_t>(gid_index_);
    a.ah_attr.grh.hop_limit = 1;
  }
  if (v_.modify_qp(q.qp, &a, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                                 IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC |
                                 IBV_QP_MIN_RNR_TIMER))
    return errno_str("ibv_modify_qp(RTR)");
  ibv_qp_attr s{};
  s.qp_state = IBV_QPS_RTS;
  s.timeout = 14;
  s.retry_cnt = 7;
  s.rnr_retry = 7;
  s.sq_psn = my_psn;
  s.max_rd_atomic = 16;
  if (v_.modify_qp(q.qp, &s, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
                                 IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC))
    return errno_str("ibv_modify_qp(RTS)");
  return "";
}

int RdmaBackend::listen(Engine& engine, const std::string& host, int port) {
  listen_fd_ = socket(AF_INET, SOCK_STREAM, 0);
  if (listen_fd_ < 0) throw std::runtime_error(errno_str("rdma: socket"));
  int one = 1;
  setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(port));
  if (inet_pton(AF_INET, host.c_str(), &sa.sin_addr) != 1)
    throw std::invalid_argument("rdma: listen address must be IPv4, got '" + host + "'");
  if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&sa), sizeof sa) || ::listen(listen_fd_, 64))
    throw std::runtime_error(errno_str("rdma: bind/listen"));
  socklen_t len = sizeof sa;
  getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&sa), &len);
  server_ = std::thread([this, &engine] { serve(&engine); });
  return ntohs(sa.sin_port);
}

void RdmaBackend::serve(Engine* engine) {
  while (!stopping_) {
    const int fd = accept(listen_fd_, nullptr, nullptr);
    if (fd < 0) {
      if (stopping_) return;
      continue;
    }
    timeval tv{kTimeoutS, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    Request rq{};
    if (io_all(fd, &rq, sizeof rq, false) && rq.magic == kMagic) {
      if (rq.op == kConnect && rq.arg > 0 && rq.arg <= 64) {
        std::vector<QpInfo> theirs(rq.arg), mine(rq.arg);
        bool ok = io_all(fd, theirs.data(), theirs.size() * sizeof(QpInfo), false);
        std::vector<std::unique_ptr<RdmaQp>> made;
        for (uint64_t i = 0; ok && i < rq.arg; ++i) {
          std::string err;
          auto q = make_qp(&err);
          const uint32_t psn = rng_() & 0xffffff;
          ok = q && connect_qp(*q, theirs[i], psn).empty();
          if (ok) {
            mine[i] = info_of(*q, psn);
            made.push_back(std::move(q));
          }
        }
        if (!ok) std::memset(mine.data(), 0, mine.size() * sizeof(QpInfo));  // qp_num 0: refused
        io_all(fd, mine.data(), mine.size() * sizeof(QpInfo), true);
        std::lock_guard<std::mutex> lk(mu_);
        for (auto& q : made) server_qps_.push_back(std::move(q));
      } else if (rq.op == kRegion) {
        RegionReply rep{};
        Region* r = nullptr;
        const std::string why = engine->pin_local(rq.arg, 0, 0, &r);
        if (!why.empty()) {
          rep.code = 1;
          std::snprintf(rep.msg, sizeof rep.msg, "%s", why.c_str());
        } else {
          rep.addr = r->addr;
          rep.length = r->length;
          {
            std::lock_guard<std::mutex> lk(mu_);
            auto it = mrs_.find(r->addr);
            rep.rkey = it != mrs_.end() ? it->second->rkey : 0;
          }
          engine->unpin(r);
          if (!rep.rkey && rep.length) {
            rep.code = 1;
            std::snprintf(rep.msg, sizeof rep.msg, "region %llu has no memory registration",
                          static_cast<unsigned long long>(rq.arg));
          }
        }
        io_all(fd, &rep, sizeof rep, true);
      }
    }
    close(fd);
  }
}

namespace {
int dial(const std::string& address, std::string* err) {
  const auto colon = address.rfind(':');
  if (colon == std::string::npos) {
    *err = "address must be host:port, got '" + address + "'";
    return -1;
  }
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  if (getaddrinfo(address.substr(0, colon).c_str(), address.substr(colon + 1).c_str(), &hints,
                  &res) || !res) {
    *err = "cannot resolve " + address;
    return -1;
  }
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  timeval tv{kTimeoutS, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  const int rc = ::connect(fd, res->ai_addr, res->ai_addrlen);
  freeaddrinfo(res);
  if (rc) {
    *err = errno_str(("connect " + address).c_str());
    close(fd);
    return -1;
  }
  return fd;
}
}  // namespace

std::shared_ptr<Peer> RdmaBackend::connect(const std::string& address, int connections) {
  auto peer = std::make_shared<RdmaPeer>();
  peer->address = address;
  std::vector<QpInfo> mine(connections), theirs(connections);
  std::vector<uint32_t> psns(connections);
  for (int i = 0; i < connections; ++i) {
    std::string err;
    auto q = make_qp(&err);
    if (!q) throw std::runtime_error("rdma: " + err);
    psns[i] = rng_() & 0xffffff;
    mine[i] = info_of(*q, psns[i]);
    peer->qps.push_back(std::move(q));
  }
  std::string err;
  const int fd = dial(address, &err);
  if (fd < 0) throw std::runtime_error("rdma: " + err);
  Request rq{kMagic, kConnect, static_cast<uint64_t>(connections)};
  const bool ok = io_all(fd, &rq, sizeof rq, true) &&
                  io_all(fd, mine.data(), mine.size() * sizeof(QpInfo), true) &&
                  io_all(fd, theirs.data(), theirs.size() * sizeof(QpInfo), false);
  close(fd);
  if (!ok) throw std::runtime_error("rdma: connection setup with " + address + " failed");
  for (int i = 0; i < connections; ++i) {
    if (theirs[i].qp_num == 0) throw std::runtime_error("rdma: " + address + " refused the QPs");
    err = connect_qp(*peer->qps[i], theirs[i], psns[i]);
    if (!err.empty()) throw std::runtime_error("rdma: " + err);
  }
  return peer;
}

std::string RdmaBackend::region_of(RdmaPeer* peer, Region* remote, RegionReply* out) {
  std::lock_guard<std::mutex> lk(peer->mu);
  auto it = peer->regions.find(remote->remote_id);
  if (it != peer->regions.end()) {
    *out = it->second;
    return "";
  }
  std::string err;
  const int fd = dial(peer->address, &err);
  if (fd < 0) return err;
  Request rq{kMagic, kRegion, remote->remote_id};
  RegionReply rep{};
  const bool ok = io_all(fd, &rq, sizeof rq, true) && io_all(fd, &rep, sizeof rep, false);
  close(fd);
  if (!ok) return "no answer from " + peer->address + " about region " +
                  std::to_string(remote->remote_id);
  if (rep.code) return std::string(rep.msg, strnlen(rep.msg, sizeof rep.msg));
  peer->regions[remote->remote_id] = rep;
  *out = rep;
  return "";
}

std::string RdmaBackend::post_group(RdmaPeer* peer, int op, const std::vector<uint64_t>& idx,
                                    const std::vector<Resolved>& ptrs,
                                    const std::vector<Desc>& pieces, int worker) {
  std::vector<uint64_t> lengths(idx.size());
  for (size_t k = 0; k < idx.size(); ++k) lengths[k] = pieces[idx[k]].length;
  const auto chains = rdma::plan_wrs(lengths, max_msg_, kMaxChain);
  RdmaQp& q = *peer->qps[static_cast<size_t>(worker) % peer->qps.size()];
  std::lock_guard<std::mutex> lk(q.mu);
  const uint32_t window = rdma::chains_in_flight(kMaxChain, kQueueDepth);
  size_t posted = 0, done = 0;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(kTimeoutS);
  while (done < chains.size()) {
    while (posted < chains.size() && posted - done < window) {
      const auto& chain = chains[posted];
      std::vector<ibv_send_wr> wrs(chain.size());
      std::vector<ibv_sge> sges(chain.size());
      for (size_t j = 0; j < chain.size(); ++j) {
        const uint64_t i = idx[chain[j].piece];
        const Resolved& r = ptrs[i];
        Region* remote = op == IBV_WR_RDMA_WRITE ? r.remote_dst : r.remote_src;
        RegionReply rr{};
        std::string err = region_of(peer, remote, &rr);
        if (!err.empty()) return err;
        const uint64_t roff = (op == IBV_WR_RDMA_WRITE ? pieces[i].dst_offset
                                                       : pieces[i].src_offset) + chain[j].offset;
        auto* local = static_cast<char*>(op == IBV_WR_RDMA_WRITE ? const_cast<void*>(r.src)
                                                                  : r.dst) + chain[j].offset;
        const uint32_t lkey = lkey_of(reinterpret_cast<uintptr_t>(local), chain[j].length);
        if (!lkey) return "local memory of a descriptor is not in a registered region";
        sges[j] = {reinterpret_cast<uint64_t>(local), static_cast<uint32_t>(chain[j].length),
                   lkey};
        ibv_send_wr& w = wrs[j];
        w.wr_id = posted;
        w.sg_list = &sges[j];
        w.num_sge = 1;
        w.opcode = static_cast<ibv_wr_opcode>(op);
        w.send_flags = chain[j].signaled ? IBV_SEND_SIGNALED : 0;
        w.wr.rdma.remote_addr = rr.addr + roff;
        w.wr.rdma.rkey = rr.rkey;
        w.next = j + 1 < chain.size() ? &wrs[j + 1] : nullptr;
      }
      ibv_send_wr* bad = nullptr;
      if (ibv_post_send(q.qp, wrs.data(), &bad))
        return errno_str("ibv_post_send");
      ++posted;
    }
    ibv_wc wc[16];
    const int n = ibv_poll_cq(q.cq, 16, wc);
    if (n < 0) return "ibv_poll_cq failed";
    for (int k = 0; k < n; ++k) {
      if (wc[k].status != IBV_WC_SUCCESS)
        return std::string("work completion: ") + v_.wc_status_str(wc[k].status) +
               " (QP to " + peer->address + " is now in error: reconnect)";
      ++done;
    }
    if (n == 0 && std::chrono::steady_clock::now() > deadline)
      return "no completion from " + peer->address + " for " + std::to_string(kTimeoutS) + " s";
    if (n > 0) deadline = std::chrono::steady_clock::now() + std::chrono::seconds(kTimeoutS);
  }
  return "";
}

std::unique_ptr<Backend> make_rdma_backend(const std::string& spec) {
  return std::make_unique<RdmaBackend>(spec);
}

}  // namespace dualpath::transfer
