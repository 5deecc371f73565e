// BLAKE3 of a table of segments on the GPU, as a few wide launches ("stages"),
// written once for the device and for a CPU emulation that runs every thread of
// every CTA in turn (blake3_tree.cpp), so the CPU tests check the kernels'
// plan, loads, tails and tree merging bit for bit against the CPU hash.
//
// A stage reduces "tasks": runs of up to kThreads leaves of one segment (chunks
// in stage 0, chaining values of the stage before in the later ones) to one node
// each. Tasks are packed into CTAs of kThreads slots, one leaf per thread, so a
// table of small tensors fills the threads as well as one large tensor does.
// Stage 0 reads each 64-byte block of every slot's chunk with coalesced 16-byte
// loads into shared memory; each thread then compresses its own chunk's block
// from there. The tree above the leaves is merged inside the CTA, one level per
// step, the nodes of each task kept packed at the task's first slots. Pairing
// nodes (2i, 2i+1) level by level, an odd last node carried up, is BLAKE3's
// tree: the left subtree of n leaves always holds the largest power of two below n.
// A segment whose nodes fit one task is finished by that task (root flag on its
// last merge; on the chunk itself when it has one); larger ones go on to the
// next stage. A 1 GiB tensor takes 3 stages, a table of tensors under 128 KiB 1.
// Stage 0 can also write the xor-planes of the segments against their parents
// from the bytes it has just read (one read of memory for both).
#pragma once

#include <cstdint>

#include "blake3_math.h"
#include "delta_units.h"

namespace mmcore::blake3::tree {

constexpr uint32_t kThreads = 128;  // slots (leaves) per CTA
constexpr uint32_t kLevels = 7;     // log2(kThreads): a full task merges in 7 levels
constexpr uint32_t kRow = 17;       // words per message row in shared memory (16 + 1 spreads banks)

// One task of a stage (24 bytes, as the plan stores it).
struct Task {
  // stage 0: the first chunk's index in the segment; later: the first leaf's index
  // among the nodes of the stage before
  uint64_t first;
  uint32_t segment;  // index into the table
  uint32_t count;    // leaves, 1..kThreads
  uint32_t slot;     // first slot (thread) in its CTA
  uint32_t root;     // 1 when this task's node is the segment's hash
};
static_assert(sizeof(Task) == 24, "the plan stores tasks as 24 bytes");

// Stage 0 fused with xor-planes (delta_units.h's encoding): each 16 bytes read
// for the hash are XORed with the parent's and written out as plane pieces.
struct XorArgs {
  const uint8_t* const* parents;
  uint8_t* const* outs;   // the planes of segment s: plane p at outs[s] + p * words[s]
  const uint64_t* words;  // words per segment
  const uint32_t* widths;
  unsigned long long* changed;  // changed words per segment (zeroed by the caller)
};

// What a stage's launch reads and writes. cta_first has one entry per CTA plus
// one: CTA c runs tasks [cta_first[c], cta_first[c + 1]).
struct StageArgs {
  const uint8_t* const* ptrs;  // stage 0: the segments
  const uint64_t* lens;        // stage 0: their byte lengths
  const uint32_t* leaves;      // later stages: the nodes of the stage before (8 words each)
  const Task* tasks;
  const uint32_t* cta_first;
  uint32_t* nodes;   // this stage's nodes, one per task
  uint8_t* out;      // 32 bytes per segment
  XorArgs xor_args;  // stage 0 of a fused launch, else all null
};

// Shared memory of one CTA (about 21 KB).
struct Shared {
  Task task[kThreads];
  const uint8_t* data[kThreads];  // per slot: its chunk's first byte
  uint32_t len[kThreads];         // per slot: its chunk's bytes (0 for an idle slot)
  uint32_t msg[kThreads * kRow];  // the current block of every slot's chunk
  uint32_t cv[2][kThreads * 8];   // node levels, alternating
  uint32_t ntasks;
  uint32_t blocks;  // the most blocks of any slot's chunk
};

// Shared memory of a fused stage 0, per slot (about 5 KB).
struct XorSlots {
  const uint8_t* parent[kThreads];  // the parent's bytes of the slot's chunk
  uint8_t* out[kThreads];           // plane 0 of the chunk's first word
  uint64_t words[kThreads];         // the segment's words (plane stride)
  uint32_t width[kThreads];
  uint32_t changed[kThreads];
  uint32_t sum[2][kThreads];  // changed words per node, merged like the chaining values
};

// One thread's state across the steps of a stage.
struct Thread {
  uint32_t cv[8];
  uint64_t chunk;
  uint32_t task;    // index into Shared::task
  uint32_t pos;     // leaf index inside the task
  uint32_t blocks;  // blocks of this thread's chunk, 0 when idle
  uint32_t active;
  uint32_t root;  // the chunk is its segment's only one
};

MMCORE_HD MMCORE_INLINE uint32_t ceil_div(uint32_t a, uint32_t b) { return (a + b - 1) / b; }

// Nodes of a task of `count` leaves after `level` merges.
MMCORE_HD MMCORE_INLINE uint32_t nodes_at(uint32_t count, uint32_t level) {
  return (count + (1u << level) - 1) >> level;
}

// Step 1: the CTA's tasks into shared memory.
MMCORE_HD MMCORE_INLINE void load_tasks(const StageArgs& a, Shared& sh, uint32_t cta, uint32_t t) {
  const uint32_t first = a.cta_first[cta];
  const uint32_t n = a.cta_first[cta + 1] - first;
  if (t == 0) {
    sh.ntasks = n;
    sh.blocks = 0;
  }
  if (t < n) sh.task[t] = a.tasks[first + t];
}

// Step 2: each thread finds its task (the last one starting at or before its
// slot) and, in stage 0, its chunk.
template <bool Leaf, bool Fused, class Exec>
MMCORE_HD MMCORE_INLINE void begin(const StageArgs& a, Shared& sh, XorSlots* xs, uint32_t t,
                                   Thread& th) {
  uint32_t lo = 0, hi = sh.ntasks;  // sh.task[lo].slot <= t < sh.task[hi].slot
  while (hi - lo > 1) {
    const uint32_t mid = (lo + hi) / 2;
    if (sh.task[mid].slot <= t)
      lo = mid;
    else
      hi = mid;
  }
  const Task& task = sh.task[lo];
  th.task = lo;
  th.pos = t - task.slot;
  th.active = t >= task.slot && th.pos < task.count;
  th.blocks = 0;
  th.root = 0;
  if (!Leaf) {
    if (th.active)
      for (int i = 0; i < 8; ++i) th.cv[i] = a.leaves[(task.first + th.pos) * 8 + i];
    return;
  }
  load_iv(th.cv);
  th.chunk = task.first + th.pos;
  uint32_t len = 0;
  const uint8_t* data = nullptr;
  if (th.active) {
    const uint64_t total = a.lens[task.segment];
    const uint64_t offset = th.chunk * kChunkLen;
    len = uint32_t(total - offset < kChunkLen ? total - offset : uint64_t(kChunkLen));
    data = total ? a.ptrs[task.segment] + offset : nullptr;
    th.blocks = len == 0 ? 1 : ceil_div(len, kBlockLen);
    th.root = task.root && task.count == 1;
    Exec::max_into(&sh.blocks, th.blocks);
  }
  sh.data[t] = data;
  sh.len[t] = len;
  if (Fused) {
    const XorArgs& x = a.xor_args;
    const uint32_t s = task.segment;
    const uint32_t w = th.active ? x.widths[s] : 1;
    xs->width[t] = w;
    xs->words[t] = th.active ? x.words[s] : 0;
    xs->parent[t] = len ? x.parents[s] + th.chunk * kChunkLen : nullptr;
    xs->out[t] = len ? x.outs[s] + th.chunk * kChunkLen / w : nullptr;
    xs->changed[t] = 0;
  }
}

// The xor-planes of 16 bytes of one slot's chunk, from `offset`: `valid` of them
// (a multiple of the width) hold words. Returns the changed words.
template <int W>
MMCORE_HD MMCORE_INLINE uint32_t xor_piece(const XorSlots* xs, uint32_t slot, uint32_t offset,
                                           uint32_t valid, const uint32_t* x) {
  constexpr uint32_t kWords = 16 / W;
  const uint32_t words = valid / W;
  uint32_t changed = 0;
  MMCORE_UNROLL
  for (uint32_t j = 0; j < kWords; ++j) {
    uint32_t any = 0;
    MMCORE_UNROLL
    for (uint32_t b = 0; b < W; ++b) any |= (x[(j * W + b) / 4] >> (8 * ((j * W + b) % 4))) & 0xff;
    changed += j < words && any != 0;
  }
  MMCORE_UNROLL
  for (uint32_t p = 0; p < W; ++p) {
    uint32_t piece[(kWords + 3) / 4] = {};
    MMCORE_UNROLL
    for (uint32_t j = 0; j < kWords; ++j)
      piece[j / 4] |= ((x[(j * W + p) / 4] >> (8 * ((j * W + p) % 4))) & 0xff) << (8 * (j % 4));
    delta::units::write<kWords>(xs->out[slot] + p * xs->words[slot] + offset / W, words, piece);
  }
  return changed;
}

// Step 3 (per block b): the CTA's slots' block b into shared memory, 16 bytes a
// thread at a time. Four neighbouring threads read one 64-byte block, so a
// warp's load covers eight whole blocks (16 full 32-byte sectors).
// In a fused stage, the same 16 bytes of the parent are read too, and the
// XOR's plane pieces written out (one store per plane).
template <bool Fused, class Exec>
MMCORE_HD MMCORE_INLINE void load_block(Shared& sh, XorSlots* xs, uint32_t b, uint32_t t) {
  for (uint32_t k = 0; k < 4; ++k) {
    const uint32_t unit = t + k * kThreads;
    const uint32_t slot = unit >> 2, quarter = unit & 3;
    const uint32_t len = sh.len[slot];
    const uint32_t offset = b * kBlockLen + quarter * 16;
    uint32_t* row = sh.msg + slot * kRow + quarter * 4;
    uint32_t w[4] = {0, 0, 0, 0};
    const uint32_t valid = offset < len ? (len - offset < 16 ? len - offset : 16) : 0;
    if (valid) delta::units::read_partial<16>(sh.data[slot] + offset, valid, w);
    for (int i = 0; i < 4; ++i) row[i] = w[i];
    if (Fused && valid) {
      uint32_t x[4];
      delta::units::read_partial<16>(xs->parent[slot] + offset, valid, x);
      for (int i = 0; i < 4; ++i) x[i] ^= w[i];
      uint32_t changed;
      switch (xs->width[slot]) {
        case 1: changed = xor_piece<1>(xs, slot, offset, valid, x); break;
        case 2: changed = xor_piece<2>(xs, slot, offset, valid, x); break;
        case 4: changed = xor_piece<4>(xs, slot, offset, valid, x); break;
        default: changed = xor_piece<8>(xs, slot, offset, valid, x); break;
      }
      if (changed) Exec::add_into(&xs->changed[slot], changed);
    }
  }
}

// Step 4 (per block b): each thread compresses block b of its own chunk.
MMCORE_HD MMCORE_INLINE void compress_block(const Shared& sh, uint32_t b, uint32_t t, Thread& th) {
  if (b >= th.blocks) return;
  uint32_t m[16];
  for (int w = 0; w < 16; ++w) m[w] = sh.msg[t * kRow + w];
  const uint32_t len = sh.len[t];
  const uint32_t block_len = len - b * kBlockLen < kBlockLen ? len - b * kBlockLen : kBlockLen;
  const bool last = b + 1 == th.blocks;
  const uint32_t flags =
      (b == 0 ? kChunkStart : 0u) | (last ? kChunkEnd : 0u) | (last && th.root ? kRoot : 0u);
  compress_in_place<uint32_t>(th.cv, m, uint32_t(th.chunk), uint32_t(th.chunk >> 32),
                              len == 0 ? 0u : block_len, flags);
}

// Step 5: every leaf's chaining value (and changed words) into level 0.
template <bool Fused>
MMCORE_HD MMCORE_INLINE void put_leaf(Shared& sh, XorSlots* xs, uint32_t t, const Thread& th) {
  if (!th.active) return;
  for (int i = 0; i < 8; ++i) sh.cv[0][t * 8 + i] = th.cv[i];
  if (Fused) xs->sum[0][t] = xs->changed[t];
}

// Step 6 (per level 1..kLevels): node i of each task from nodes 2i and 2i + 1
// of the level below, or node 2i carried up alone.
template <bool Fused>
MMCORE_HD MMCORE_INLINE void merge(Shared& sh, XorSlots* xs, uint32_t level, const Thread& th) {
  if (!th.active) return;
  const Task& task = sh.task[th.task];
  const uint32_t below = nodes_at(task.count, level - 1);
  if (th.pos >= nodes_at(task.count, level)) return;
  const uint32_t* src = sh.cv[(level - 1) & 1] + task.slot * 8;
  uint32_t* dst = sh.cv[level & 1] + (task.slot + th.pos) * 8;
  const uint32_t left = 2 * th.pos;
  const bool pair = left + 1 < below;
  if (pair) {
    parent_cv(src + left * 8, src + (left + 1) * 8, task.root && below == 2, dst);
  } else {
    for (int i = 0; i < 8; ++i) dst[i] = src[left * 8 + i];
  }
  if (Fused) {
    const uint32_t* from = xs->sum[(level - 1) & 1] + task.slot;
    xs->sum[level & 1][task.slot + th.pos] = from[left] + (pair ? from[left + 1] : 0u);
  }
}

// Step 7: the first thread of each task writes its node, and the hash when the
// node is the segment's root.
template <bool Fused, class Exec>
MMCORE_HD MMCORE_INLINE void finish(const StageArgs& a, const Shared& sh, const XorSlots* xs,
                                    uint32_t cta, const Thread& th) {
  if (!th.active || th.pos != 0) return;
  const Task& task = sh.task[th.task];
  if (Fused) {
    const uint32_t changed = xs->sum[kLevels & 1][task.slot];
    if (changed) Exec::add_global(a.xor_args.changed + task.segment, changed);
  }
  const uint32_t* node = sh.cv[kLevels & 1] + task.slot * 8;
  const uint64_t index = uint64_t(a.cta_first[cta]) + th.task;
  for (int i = 0; i < 8; ++i) a.nodes[index * 8 + i] = node[i];
  if (task.root)
    for (int i = 0; i < 8; ++i) store_le32(a.out + uint64_t(task.segment) * 32 + 4 * i, node[i]);
}

// One CTA of a stage. Exec runs a step on every thread and then waits for all
// of them: on the device, the calling thread and __syncthreads(); in the
// emulation, a loop over the threads. Thread state lives in th[Exec::slot(t)]:
// one per thread in the emulation, the calling thread's own registers on the device.
// Fused (stage 0 only) adds the xor-planes of every chunk; xs is only used then.
template <bool Leaf, bool Fused, class Exec>
MMCORE_HD MMCORE_INLINE void run_cta(const StageArgs& a, Shared& sh, XorSlots* xs, uint32_t cta,
                                     Thread* th) {
  static_assert(Leaf || !Fused, "only stage 0 reads the segments");
  Exec::each([&](uint32_t t) { load_tasks(a, sh, cta, t); });
  Exec::each([&](uint32_t t) { begin<Leaf, Fused, Exec>(a, sh, xs, t, th[Exec::slot(t)]); });
  if (Leaf) {
    const uint32_t blocks = sh.blocks;
    for (uint32_t b = 0; b < blocks; ++b) {
      Exec::each([&](uint32_t t) { load_block<Fused, Exec>(sh, xs, b, t); });
      Exec::each([&](uint32_t t) { compress_block(sh, b, t, th[Exec::slot(t)]); });
    }
  }
  Exec::each([&](uint32_t t) { put_leaf<Fused>(sh, xs, t, th[Exec::slot(t)]); });
  for (uint32_t level = 1; level <= kLevels; ++level)
    Exec::each([&](uint32_t t) { merge<Fused>(sh, xs, level, th[Exec::slot(t)]); });
  Exec::each([&](uint32_t t) { finish<Fused, Exec>(a, sh, xs, cta, th[Exec::slot(t)]); });
}

}  // namespace mmcore::blake3::tree
