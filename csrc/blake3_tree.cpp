// The GPU BLAKE3's launch plan (built on the host, copied to the device in one
// transfer) and the CPU emulation of its kernels (blake3_tree.h).
#include "blake3_tree.h"

#include <cstdint>
#include <memory>
#include <stdexcept>

#include "blake3_plan.h"

namespace mmcore::blake3 {

namespace {

size_t align8(size_t n) { return (n + 7) & ~size_t(7); }

template <typename T>
void append(std::vector<uint8_t>& bytes, const std::vector<T>& items) {
  const size_t at = bytes.size();
  bytes.resize(align8(at + items.size() * sizeof(T)));
  if (!items.empty()) memcpy(bytes.data() + at, items.data(), items.size() * sizeof(T));
}

}  // namespace

TreePlan tree_plan(const uint64_t* lens, size_t n) {
  using tree::kThreads;
  using tree::Task;
  TreePlan plan;
  if (n > UINT32_MAX) throw std::length_error("blake3 tree plan: more than 2^32 segments");
  // Leaves of each unfinished segment in the current stage, and where they start.
  std::vector<uint32_t> live(n);
  std::vector<uint64_t> leaves(n), first(n, 0);
  for (size_t s = 0; s < n; ++s) {
    live[s] = uint32_t(s);
    leaves[s] = lens[s] == 0 ? 1 : (lens[s] + kChunkLen - 1) / kChunkLen;
  }
  uint64_t node_base = 0;
  while (!live.empty()) {
    std::vector<Task> tasks;
    std::vector<uint32_t> cta_first{0};
    std::vector<uint32_t> next_live;
    uint32_t fill = 0;
    for (uint32_t s : live) {
      const uint64_t count = leaves[s];
      const uint64_t ntasks = (count + kThreads - 1) / kThreads;
      if (tasks.size() + ntasks > UINT32_MAX)
        throw std::length_error("blake3 tree plan: more than 2^32 tasks in one stage");
      const uint64_t next_first = tasks.size();
      for (uint64_t j = 0; j < ntasks; ++j) {
        const uint32_t c =
            uint32_t(count - j * kThreads < kThreads ? count - j * kThreads : kThreads);
        if (fill + c > kThreads) {
          cta_first.push_back(uint32_t(tasks.size()));
          fill = 0;
        }
        tasks.push_back(Task{first[s] + j * kThreads, s, c, fill, ntasks == 1 ? 1u : 0u});
        fill += c;
      }
      first[s] = next_first;  // the next stage's leaves are this stage's nodes
      leaves[s] = ntasks;
      if (ntasks > 1) next_live.push_back(s);
    }
    cta_first.push_back(uint32_t(tasks.size()));
    if (cta_first.size() - 1 > uint64_t(INT32_MAX))  // a launch's grid.x
      throw std::length_error("blake3 tree plan: more than 2^31 - 1 CTAs in one stage");
    TreeStage stage;
    stage.tasks_offset = plan.bytes.size();
    append(plan.bytes, tasks);
    stage.ctas_offset = plan.bytes.size();
    append(plan.bytes, cta_first);
    stage.tasks = tasks.size();
    stage.ctas = cta_first.size() - 1;
    stage.node_base = node_base;
    node_base += tasks.size();
    plan.stages.push_back(stage);
    live.swap(next_live);
  }
  plan.nodes = node_base;
  return plan;
}

namespace {

struct CpuExec {
  template <class F>
  static void each(F&& f) {
    for (uint32_t t = 0; t < tree::kThreads; ++t) f(t);
  }
  static uint32_t slot(uint32_t t) { return t; }
  static void max_into(uint32_t* p, uint32_t v) {
    if (v > *p) *p = v;
  }
  static void add_into(uint32_t* p, uint32_t v) { *p += v; }
  static void add_global(unsigned long long* p, uint32_t v) { *p += v; }
};

}  // namespace

void tree_emulate_stage(bool leaf, const tree::StageArgs& a, uint64_t ctas) {
  auto shared = std::make_unique<tree::Shared>();
  auto xs = std::make_unique<tree::XorSlots>();
  std::vector<tree::Thread> threads(tree::kThreads);
  const bool fused = leaf && a.xor_args.parents;
  for (uint64_t c = 0; c < ctas; ++c) {
    const uint32_t cta = uint32_t(c);
    if (fused)
      tree::run_cta<true, true, CpuExec>(a, *shared, xs.get(), cta, threads.data());
    else if (leaf)
      tree::run_cta<true, false, CpuExec>(a, *shared, nullptr, cta, threads.data());
    else
      tree::run_cta<false, false, CpuExec>(a, *shared, nullptr, cta, threads.data());
  }
}

}  // namespace mmcore::blake3
