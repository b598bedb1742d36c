// `tcp` backend: local copies as `host` does, plus one-sided WRITE/READ into another engine's
// registered regions over TCP sockets (processes on one host or across hosts).
//
// Wire format (little-endian, one request at a time per connection):
//   request  = Header{magic, op, region, offset, length, seq} [+ length payload bytes if WRITE]
//   response = Reply{magic, code, seq, msg_len} [+ msg_len bytes of error text]
//              [+ length payload bytes if READ and code == 0]
// The payload goes straight from / into registered memory (sendmsg with an iovec, recv into the
// destination): no staging copy. A peer has `connections` sockets; engine worker i uses socket
// i % connections, so a batch spreads over all of them. Sockets have 30 s send/receive
// timeouts: a dead or silent peer fails the descriptor with the reason, never hangs it; the
// failed socket is closed and the next use reconnects.
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <list>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "dualpath/iov.h"
#include "../../engine.h"

namespace dualpath::transfer {

namespace {

constexpr uint32_t kMagic = 0x31545044;  // "DPT1"
constexpr uint32_t kWrite = 1, kRead = 2;
constexpr int kTimeoutS = 30;
constexpr uint32_t kMaxMsg = 4096;

#pragma pack(push, 1)
struct Header {
  uint32_t magic, op;
  uint64_t region, offset, length, seq;
};
struct Reply {
  uint32_t magic;
  int32_t code;  // 0 ok, 1 refused (msg says why)
  uint64_t seq;
  uint32_t msg_len;
};
#pragma pack(pop)

std::string sys_error(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

void tune(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  int buf = 4 << 20;
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
  timeval tv{kTimeoutS, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

// Send all of `iov` (modified). "" or the reason.
std::string send_all(int fd, iovec* iov, int n) {
  while (n > 0) {
    msghdr m{};
    m.msg_iov = iov;
    m.msg_iovlen = static_cast<size_t>(n);
    const ssize_t k = sendmsg(fd, &m, MSG_NOSIGNAL);
    if (k < 0) {
      if (errno == EINTR) continue;
      return errno == EAGAIN ? "peer did not take data for 30 s" : sys_error("send");
    }
    dualpath::iov_advance(iov, n, static_cast<size_t>(k));
  }
  return "";
}

std::string recv_all(int fd, void* buf, size_t len) {
  char* p = static_cast<char*>(buf);
  while (len > 0) {
    const ssize_t k = recv(fd, p, len, 0);
    if (k == 0) return "peer closed the connection";
    if (k < 0) {
      if (errno == EINTR) continue;
      return errno == EAGAIN ? "peer sent nothing for 30 s" : sys_error("recv");
    }
    p += k;
    len -= static_cast<size_t>(k);
  }
  return "";
}

std::string drain(int fd, uint64_t len) {
  char scratch[1 << 16];
  while (len > 0) {
    const size_t n = len < sizeof scratch ? static_cast<size_t>(len) : sizeof scratch;
    std::string err = recv_all(fd, scratch, n);
    if (!err.empty()) return err;
    len -= n;
  }
  return "";
}

void split_address(const std::string& address, std::string* host, std::string* port) {
  const auto colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size())
    throw std::invalid_argument("peer address must be host:port, got '" + address + "'");
  *host = address.substr(0, colon);
  *port = address.substr(colon + 1);
  if (host->size() > 2 && host->front() == '[' && host->back() == ']')
    *host = host->substr(1, host->size() - 2);
}

int dial(const std::string& address, std::string* err) {
  std::string host, port;
  split_address(address, &host, &port);
  addrinfo hints{}, *res = nullptr;
  hints.ai_socktype = SOCK_STREAM;
  if (int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0) {
    *err = "resolve " + address + ": " + gai_strerror(rc);
    return -1;
  }
  int fd = -1;
  for (addrinfo* a = res; a; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    tune(fd);
    if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
    *err = sys_error(("connect " + address).c_str());
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  return fd;
}

}  // namespace

class TcpPeer final : public Peer {
 public:
  TcpPeer(std::string address, int n) : address_(std::move(address)), conns_(n) {}
  ~TcpPeer() override {
    for (auto& c : conns_)
      if (c.fd >= 0) close(c.fd);
  }

  // One request on connection `worker % n`; `payload_out` is sent after the header (WRITE),
  // `payload_in` receives the answer's payload (READ).
  std::string request(int worker, uint32_t op, uint64_t region, uint64_t offset, uint64_t length,
                      const void* payload_out, void* payload_in) {
    Conn& c = conns_[static_cast<size_t>(worker) % conns_.size()];
    std::lock_guard<std::mutex> lk(c.mu);
    if (c.fd < 0) {
      std::string err;
      c.fd = dial(address_, &err);
      if (c.fd < 0) return err;
    }
    std::string err = exchange(c.fd, op, region, offset, length, payload_out, payload_in,
                               ++c.seq);
    if (!err.empty() && err.rfind("refused: ", 0) != 0) {  // the stream is broken: drop it
      close(c.fd);
      c.fd = -1;
    }
    return err.empty() ? err : "peer " + address_ + ": " + err;
  }

 private:
  struct Conn {
    std::mutex mu;
    int fd = -1;
    uint64_t seq = 0;
  };

  static std::string exchange(int fd, uint32_t op, uint64_t region, uint64_t offset,
                              uint64_t length, const void* out, void* in, uint64_t seq) {
    Header h{kMagic, op, region, offset, length, seq};
    iovec iov[2] = {{&h, sizeof h}, {const_cast<void*>(out), op == kWrite ? length : 0}};
    std::string err = send_all(fd, iov, op == kWrite && length ? 2 : 1);
    if (!err.empty()) return err;
    Reply r{};
    if (!(err = recv_all(fd, &r, sizeof r)).empty()) return err;
    if (r.magic != kMagic || r.seq != seq || r.msg_len > kMaxMsg)
      return "protocol error (bad reply)";
    if (r.code != 0) {
      std::string msg(r.msg_len, '\0');
      if (!(err = recv_all(fd, msg.data(), msg.size())).empty()) return err;
      return "refused: " + msg;
    }
    if (op == kRead && length) return recv_all(fd, in, length);
    return "";
  }

  std::string address_;
  std::vector<Conn> conns_;
};

class TcpBackend final : public Backend {
 public:
  ~TcpBackend() override { shutdown(); }
  std::string name() const override { return "tcp"; }

  std::string copy(void* dst, const void* src, uint64_t length) override {
    std::memmove(dst, src, length);
    return "";
  }

  std::string write_remote(Region& dst, uint64_t offset, const void* src, uint64_t length,
                           int worker) override {
    return static_cast<TcpPeer*>(dst.peer.get())
        ->request(worker, kWrite, dst.remote_id, offset, length, src, nullptr);
  }

  std::string read_remote(void* dst, Region& src, uint64_t offset, uint64_t length,
                          int worker) override {
    return static_cast<TcpPeer*>(src.peer.get())
        ->request(worker, kRead, src.remote_id, offset, length, nullptr, dst);
  }

  std::shared_ptr<Peer> connect(const std::string& address, int connections) override {
    std::string host, port;
    split_address(address, &host, &port);  // validate now; sockets open on first use
    return std::make_shared<TcpPeer>(address, connections);
  }

  int listen(Engine& engine, const std::string& host, int port) override {
    std::lock_guard<std::mutex> lk(mu_);
    if (listen_fd_ >= 0) throw std::runtime_error("this engine already listens");
    addrinfo hints{}, *res = nullptr;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    const std::string p = std::to_string(port);
    if (int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), p.c_str(), &hints, &res))
      throw std::invalid_argument("listen address " + host + ":" + p + ": " + gai_strerror(rc));
    int fd = socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC, res->ai_protocol);
    int one = 1;
    if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) != 0 || ::listen(fd, 64) != 0) {
      const std::string err = sys_error(("listen on " + host + ":" + p).c_str());
      if (fd >= 0) close(fd);
      freeaddrinfo(res);
      throw std::runtime_error(err);
    }
    freeaddrinfo(res);
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
    const int bound = ntohs(ss.ss_family == AF_INET6
                                ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
    listen_fd_ = fd;
    acceptor_ = std::thread([this, &engine] { accept_loop(engine); });
    return bound;
  }

  void shutdown() override {
    std::list<std::thread> threads;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (stopping_) return;
      stopping_ = true;
      if (listen_fd_ >= 0) ::shutdown(listen_fd_, SHUT_RDWR);
      for (int fd : conn_fds_) ::shutdown(fd, SHUT_RDWR);
      threads.swap(conn_threads_);
    }
    if (acceptor_.joinable()) acceptor_.join();
    for (auto& t : threads) t.join();
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& t : conn_threads_) t.join();  // started while we were stopping
    if (listen_fd_ >= 0) close(listen_fd_);
    listen_fd_ = -1;
  }

 private:
  void accept_loop(Engine& engine) {
    for (;;) {
      pollfd p{listen_fd_, POLLIN, 0};
      if (poll(&p, 1, 200) < 0 && errno != EINTR) return;
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (stopping_) return;
      }
      if (!(p.revents & POLLIN)) continue;
      const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      tune(fd);
      std::lock_guard<std::mutex> lk(mu_);
      if (stopping_) {
        close(fd);
        return;
      }
      conn_fds_.push_back(fd);
      conn_threads_.emplace_back([this, &engine, fd] { serve(engine, fd); });
    }
  }

  void serve(Engine& engine, int fd) {
    for (;;) {
      Header h{};
      if (!recv_idle(fd, &h, sizeof h).empty() || h.magic != kMagic ||
          (h.op != kWrite && h.op != kRead))
        break;
      Region* r = nullptr;
      const std::string why = engine.pin_local(h.region, h.offset, h.length, &r);
      std::string err;
      if (!why.empty()) {
        if (h.op == kWrite && !(err = drain(fd, h.length)).empty()) break;
        Reply rep{kMagic, 1, h.seq, static_cast<uint32_t>(why.size())};
        iovec iov[2] = {{&rep, sizeof rep}, {const_cast<char*>(why.data()), why.size()}};
        if (!send_all(fd, iov, 2).empty()) break;
        continue;
      }
      char* mem = reinterpret_cast<char*>(r->addr) + h.offset;
      if (h.op == kWrite) {
        err = recv_all(fd, mem, h.length);
        engine.unpin(r);  // landed: unpinned before the writer hears so (it may deregister)
        r = nullptr;
      }
      Reply rep{kMagic, 0, h.seq, 0};
      if (err.empty()) {
        iovec iov[2] = {{&rep, sizeof rep}, {mem, h.op == kRead ? h.length : 0}};
        err = send_all(fd, iov, h.op == kRead && h.length ? 2 : 1);
      }
      if (r) engine.unpin(r);
      if (!err.empty()) break;
    }
    std::lock_guard<std::mutex> lk(mu_);
    for (auto it = conn_fds_.begin(); it != conn_fds_.end(); ++it)
      if (*it == fd) {
        conn_fds_.erase(it);
        break;
      }
    close(fd);
  }

  // Like recv_all, but an idle connection (no request for a while) is not an error.
  std::string recv_idle(int fd, void* buf, size_t len) {
    for (;;) {
      pollfd p{fd, POLLIN, 0};
      const int rc = poll(&p, 1, 1000);
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (stopping_) return "stopping";
      }
      if (rc > 0) return recv_all(fd, buf, len);
      if (rc < 0 && errno != EINTR) return sys_error("poll");
    }
  }

  std::mutex mu_;
  bool stopping_ = false;
  int listen_fd_ = -1;
  std::thread acceptor_;
  std::vector<int> conn_fds_;
  std::list<std::thread> conn_threads_;
};

std::unique_ptr<Backend> make_tcp_backend() { return std::make_unique<TcpBackend>(); }

}  // namespace dualpath::transfer
