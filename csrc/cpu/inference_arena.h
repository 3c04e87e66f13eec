#pragma once
// The inference arena: large CPU blocks kept for reuse inside scopes (see inference_arena.cpp).
#include <cstddef>

namespace icnet::arena {

// Opens a scope on this thread (scopes nest); false, and no scope, where the arena could not be installed
// as torch's CPU allocator because one of higher priority holds its place.
bool enter();
// Closes this thread's innermost scope.
void exit();
// Frees every cached block; returns the bytes freed.
size_t release();
// Bytes of freed blocks the cache holds.
size_t cached_bytes();

}  // namespace icnet::arena
