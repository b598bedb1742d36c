#include "engine.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <unordered_set>

namespace dualpath::transfer {

std::string Backend::write_remote(Region&, uint64_t, const void*, uint64_t, int) {
  return "remote regions need a network backend (tcp), not '" + name() + "'";
}
std::string Backend::read_remote(void*, Region&, uint64_t, uint64_t, int) {
  return "remote regions need a network backend (tcp), not '" + name() + "'";
}
int Backend::listen(Engine&, const std::string&, int) {
  throw std::invalid_argument("the '" + name() + "' backend does not serve peers (use tcp)");
}
std::shared_ptr<Peer> Backend::connect(const std::string&, int) {
  throw std::invalid_argument("the '" + name() + "' backend has no remote regions (use tcp)");
}
std::string Backend::check_region(Region& r) {
  if (r.kind != "host")
    return "region kind '" + r.kind + "' is not supported by the '" + name() +
           "' backend (host only; device memory needs the cuda backend)";
  return "";
}
std::string Backend::copy_range(const std::vector<Resolved>& ptrs, const std::vector<Desc>& pieces,
                                uint64_t begin, uint64_t end, Priority, int) {
  for (uint64_t i = begin; i < end; ++i) {
    std::string err = copy(ptrs[i].dst, ptrs[i].src, pieces[i].length);
    if (!err.empty()) return err;
  }
  return "";
}

Engine::Engine(const std::string& backend, int num_workers, uint64_t slice_bytes)
    : backend_(make_backend(backend)), slice_bytes_(slice_bytes ? slice_bytes : 1) {
  if (num_workers < 1) throw std::invalid_argument("num_workers must be >= 1");
  try {
    for (int i = 0; i < num_workers; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
  } catch (...) {  // a thread failed to start: stop the ones that did before rethrowing
    {
      std::lock_guard<std::mutex> lk(q_mu_);
      stopping_ = true;
    }
    q_cv_.notify_all();
    for (auto& t : workers_) t.join();
    throw;
  }
}

Engine::~Engine() {
  backend_->shutdown();  // no peer request may touch the regions while they are destroyed
  {
    std::lock_guard<std::mutex> lk(q_mu_);
    stopping_ = true;
  }
  q_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

uint64_t Engine::register_region(uintptr_t addr, uint64_t length, const std::string& kind) {
  if (addr == 0 && length > 0) throw std::invalid_argument("null address");
  auto r = std::make_unique<Region>();
  r->addr = addr;
  r->length = length;
  r->kind = kind;
  const std::string why = backend_->check_region(*r);
  if (!why.empty()) throw std::invalid_argument(why);
  std::lock_guard<std::mutex> lk(regions_mu_);
  r->id = next_region_++;
  const uint64_t id = r->id;
  regions_.emplace(id, std::move(r));
  return id;
}

uint64_t Engine::register_remote(const std::string& address, uint64_t remote_region,
                                 uint64_t length, int connections) {
  if (connections < 1) throw std::invalid_argument("connections must be >= 1");
  std::shared_ptr<Peer> peer;
  {
    std::lock_guard<std::mutex> lk(peers_mu_);
    auto it = peers_.find(address);
    if (it != peers_.end()) {
      peer = it->second;
    } else {
      peer = backend_->connect(address, connections);
      peers_.emplace(address, peer);
    }
  }
  std::lock_guard<std::mutex> lk(regions_mu_);
  auto r = std::make_unique<Region>();
  r->id = next_region_++;
  r->addr = 0;
  r->length = length;
  r->kind = "remote";
  r->peer = peer;
  r->remote_id = remote_region;
  const uint64_t id = r->id;
  regions_.emplace(id, std::move(r));
  return id;
}

int Engine::listen(const std::string& host, int port) { return backend_->listen(*this, host, port); }

std::string Engine::pin_local(uint64_t id, uint64_t offset, uint64_t length, Region** out) {
  std::lock_guard<std::mutex> lk(regions_mu_);
  auto it = regions_.find(id);
  if (it == regions_.end() || it->second->kind == "remote")
    return "region " + std::to_string(id) + " is not registered";
  Region& r = *it->second;
  if (offset > r.length || length > r.length - offset)
    return "range [" + std::to_string(offset) + ", +" + std::to_string(length) +
           ") is outside region " + std::to_string(id) + " (" + std::to_string(r.length) +
           " bytes)";
  r.in_use.fetch_add(1);
  *out = &r;
  return "";
}

void Engine::deregister_region(uint64_t id) {
  std::lock_guard<std::mutex> lk(regions_mu_);
  auto it = regions_.find(id);
  if (it == regions_.end()) throw std::invalid_argument("region " + std::to_string(id) +
                                                        " is not registered");
  if (it->second->in_use.load() > 0)
    throw std::runtime_error("region " + std::to_string(id) + " is used by a pending batch");
  if (!it->second->peer) backend_->on_deregister(*it->second);
  regions_.erase(it);
}

Handle Engine::submit(std::vector<Desc> descs, Priority priority) {
  auto h = std::make_shared<Batch>();
  h->priority = priority;
  h->ptrs.resize(descs.size());
  {
    std::lock_guard<std::mutex> lk(regions_mu_);
    std::unordered_set<Region*> used;
    auto resolve = [&](size_t i, uint64_t id, uint64_t off, uint64_t len,
                       const char* side) -> Region* {
      auto it = regions_.find(id);
      if (it == regions_.end())
        throw std::invalid_argument("descriptor " + std::to_string(i) + ": " + side +
                                    " region " + std::to_string(id) + " is not registered");
      Region& r = *it->second;
      if (off > r.length || len > r.length - off)
        throw std::invalid_argument("descriptor " + std::to_string(i) + ": " + side + " range [" +
                                    std::to_string(off) + ", +" + std::to_string(len) +
                                    ") is outside region " + std::to_string(id) + " (" +
                                    std::to_string(r.length) + " bytes)");
      used.insert(&r);
      return &r;
    };
    for (size_t i = 0; i < descs.size(); ++i) {
      const Desc& d = descs[i];
      Region* s = resolve(i, d.src_region, d.src_offset, d.length, "src");
      Region* t = resolve(i, d.dst_region, d.dst_offset, d.length, "dst");
      if (s->peer && t->peer)
        throw std::invalid_argument("descriptor " + std::to_string(i) +
                                    ": both ends are remote regions");
      Resolved& out = h->ptrs[i];
      if (s->peer) out.remote_src = s;
      else out.src = reinterpret_cast<const void*>(s->addr + d.src_offset);
      if (t->peer) out.remote_dst = t;
      else out.dst = reinterpret_cast<void*>(t->addr + d.dst_offset);
      out.src_region = s;
      out.dst_region = t;
    }
    for (Region* r : used) {
      r->in_use.fetch_add(1);
      h->regions.push_back(r);
    }
  }
  h->size = descs.size();
  // pieces of at most slice_bytes_, so one large descriptor keeps several workers busy
  std::vector<Desc> pieces;
  std::vector<Resolved> ptrs;
  pieces.reserve(descs.size());
  ptrs.reserve(descs.size());
  h->origin.reserve(descs.size());
  for (size_t i = 0; i < descs.size(); ++i) {
    const Desc& d = descs[i];
    const Resolved& r = h->ptrs[i];
    uint64_t done = 0;
    do {
      const uint64_t n = std::min<uint64_t>(d.length - done, slice_bytes_);
      pieces.push_back({d.src_region, d.src_offset + done, d.dst_region, d.dst_offset + done, n});
      Resolved p = r;
      if (p.src) p.src = static_cast<const char*>(r.src) + done;
      if (p.dst) p.dst = static_cast<char*>(r.dst) + done;
      ptrs.push_back(p);
      h->origin.push_back(i);
      done += n;
    } while (done < d.length);
  }
  h->ptrs = std::move(ptrs);
  h->descs = std::move(pieces);
  if (h->descs.empty()) {
    h->status.store(static_cast<int>(Status::kDone));
    return h;
  }
  {
    std::lock_guard<std::mutex> lk(q_mu_);
    queues_[static_cast<int>(priority)].push_back(h);
  }
  q_cv_.notify_all();
  return h;
}

Handle Engine::next_slice(uint64_t* begin, uint64_t* end) {
  // caller holds q_mu_; latency batches first, bulk ones in slices of about slice_bytes_
  for (auto& q : queues_) {
    if (q.empty()) continue;
    Handle h = q.front();
    const uint64_t n = h->descs.size();
    uint64_t b = h->next.load(), e = b, bytes = 0;
    while (e < n && (e == b || bytes < slice_bytes_)) bytes += h->descs[e++].length;
    h->next.store(e);
    if (e == n) q.pop_front();
    *begin = b;
    *end = e;
    return h;
  }
  return nullptr;
}

void Engine::worker_loop(int index) {
  for (;;) {
    Handle h;
    uint64_t b = 0, e = 0;
    {
      std::unique_lock<std::mutex> lk(q_mu_);
      q_cv_.wait(lk, [&] { return stopping_ || !queues_[0].empty() || !queues_[1].empty(); });
      h = next_slice(&b, &e);
      if (!h) return;  // stopping and nothing queued
    }
    if (backend_->batched()) {  // the backend moves the whole slice (remote ends included)
      if (!h->canceled.load() && h->failed_index.load() < 0) {
        std::string err;
        try {
          err = backend_->copy_range(h->ptrs, h->descs, b, e, h->priority, index);
        } catch (const std::exception& ex) {
          err = std::string("exception: ") + ex.what();
        }
        if (!err.empty()) record_failure(h, b, err);
      }
      finish(h, e - b);
      continue;
    }
    for (uint64_t i = b; i < e; ++i) {
      if (h->canceled.load() || h->failed_index.load() >= 0) continue;  // skip, still counted
      const Desc& d = h->descs[i];
      if (d.length == 0) continue;
      std::string err;
      const Resolved& r = h->ptrs[i];
      try {
        if (r.remote_dst) err = backend_->write_remote(*r.remote_dst, d.dst_offset, r.src,
                                                       d.length, index);
        else if (r.remote_src) err = backend_->read_remote(r.dst, *r.remote_src, d.src_offset,
                                                           d.length, index);
        else err = backend_->copy(r.dst, r.src, d.length);
      } catch (const std::exception& ex) {  // a backend bug must fail the batch, not the process
        err = std::string("exception: ") + ex.what();
      }
      if (!err.empty()) record_failure(h, i, err);
    }
    finish(h, e - b);
  }
}

void Engine::record_failure(const Handle& h, uint64_t piece, const std::string& err) {
  std::lock_guard<std::mutex> lk(h->mu);
  if (h->failed_index.load() < 0) {  // the first failure is the one reported
    h->failed_index.store(static_cast<int64_t>(h->origin[piece]));
    h->error = backend_->name() + ": " + err;
  }
}

void Engine::finish(const Handle& h, uint64_t n_done) {
  const uint64_t total = h->descs.size();
  if (h->finished.fetch_add(n_done) + n_done != total) return;
  Status s = Status::kDone;
  {
    std::lock_guard<std::mutex> lk(h->mu);
    if (h->failed_index.load() >= 0) s = Status::kFailed;
    else if (h->canceled.load()) s = Status::kCanceled;
    for (Region* r : h->regions) r->in_use.fetch_sub(1);
    h->regions.clear();
    h->status.store(static_cast<int>(s));
  }
  h->cv.notify_all();
}

Status Engine::poll(const Handle& h) const { return static_cast<Status>(h->status.load()); }

Status Engine::wait(const Handle& h, double timeout_s) const {
  std::unique_lock<std::mutex> lk(h->mu);
  auto pending = [&] { return h->status.load() == static_cast<int>(Status::kPending); };
  if (timeout_s < 0 || timeout_s > 1e9) {  // unbounded (also avoids clock overflow)
    h->cv.wait(lk, [&] { return !pending(); });
  } else {
    h->cv.wait_for(lk, std::chrono::duration<double>(timeout_s), [&] { return !pending(); });
  }
  return static_cast<Status>(h->status.load());
}

void Engine::cancel(const Handle& h) { h->canceled.store(true); }

}  // namespace dualpath::transfer
