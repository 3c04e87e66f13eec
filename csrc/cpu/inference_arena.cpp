// A cache of large CPU blocks for inference, installed as torch's CPU allocator the first time it is used.
//
// torch's CPU allocator returns every block to the system and takes fresh pages for the next, so each
// inference call faults in (and the kernel zeroes) every activation again. Inside a scope (enter/exit,
// counted per thread) blocks of at least kMinBytes come from this cache and return to it when their tensors
// die, whenever that is; ICNet's shapes repeat exactly from call to call, so blocks are kept by exact size.
// Everything else, and every allocation outside a scope, goes to the allocator that was installed before.
#include "cpu/inference_arena.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <map>
#include <unordered_map>
#include <mutex>
#include <vector>

namespace icnet::arena {
namespace {

constexpr size_t kMinBytes = size_t{1} << 20;
constexpr size_t kMaxCachedBytes = size_t{4} << 30;  // beyond this, freed blocks go back to the system

thread_local int depth = 0;

// The cache of freed blocks by size, and the sizes of the live blocks it handed out (a block's deleter gets
// only its address: torch's oneDNN glue allocates raw blocks through this allocator too).
class Cache {
 public:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    void* data = nullptr;
    auto it = free_.find(bytes);
    if (it != free_.end() && !it->second.empty()) {
      data = it->second.back();
      it->second.pop_back();
      cached_ -= bytes;
    } else {
      data = c10::alloc_cpu(bytes);
    }
    live_[data] = bytes;
    return data;
  }
  // Takes back a block it handed out; false for any other.
  bool give(void* data) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = live_.find(data);
      if (it == live_.end()) return false;
      const size_t bytes = it->second;
      live_.erase(it);
      if (cached_ + bytes <= kMaxCachedBytes) {
        free_[bytes].push_back(data);
        cached_ += bytes;
        return true;
      }
    }
    c10::free_cpu(data);
    return true;
  }
  size_t release() {
    std::map<size_t, std::vector<void*>> blocks;
    size_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      bytes = cached_;
      cached_ = 0;
    }
    for (auto& [size, list] : blocks) {
      for (void* data : list) c10::free_cpu(data);
    }
    return bytes;
  }
  size_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

 private:
  std::mutex mutex_;
  std::map<size_t, std::vector<void*>> free_;
  std::unordered_map<void*, size_t> live_;
  size_t cached_ = 0;
};

Cache& cache() {
  static Cache* instance = new Cache();  // never destroyed: tensors may die after static destructors run
  return *instance;
}

c10::DeleterFnPtr fallback_raw_deleter = nullptr;

void delete_block(void* data) {
  if (data != nullptr && !cache().give(data)) fallback_raw_deleter(data);
}

class ArenaAllocator final : public c10::Allocator {
 public:
  explicit ArenaAllocator(c10::Allocator* fallback) : fallback_(fallback) {}

  c10::DataPtr allocate(size_t bytes) override {
    if (depth == 0 || bytes < kMinBytes) return fallback_->allocate(bytes);
    void* data = cache().take(bytes);
    return {data, data, &delete_block, c10::Device(c10::DeviceType::CPU)};
  }

  // Raw blocks (data pointer == context) are freed by address, whichever allocator made them.
  c10::DeleterFnPtr raw_deleter() const override { return &delete_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

 private:
  c10::Allocator* fallback_;
};

// Installs the arena once; false where another allocator of higher priority keeps its place.
bool installed() {
  static ArenaAllocator* arena = [] {
    c10::Allocator* fallback = c10::GetCPUAllocator();
    // a fallback without a raw deleter makes no raw blocks, so none reaches ours
    fallback_raw_deleter = fallback->raw_deleter() != nullptr ? fallback->raw_deleter() : &c10::free_cpu;
    auto* allocator = new ArenaAllocator(fallback);
    c10::SetCPUAllocator(allocator, /*priority=*/0);
    return allocator;
  }();
  return c10::GetCPUAllocator() == arena;
}

}  // namespace

bool enter() {
  if (!installed()) return false;
  ++depth;
  return true;
}

void exit() {
  if (depth > 0) --depth;
}

size_t release() { return cache().release(); }

size_t cached_bytes() { return cache().cached(); }

}  // namespace icnet::arena
