// Host side of the GPU BLAKE3 (blake3_tree.h): the launch plan, and the CPU
// emulation of the kernels that the CPU tests run.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace mmcore::blake3 {

// One launch: its tasks and CTA table lie in TreePlan::bytes at these offsets;
// its nodes are nodes [node_base, node_base + tasks) of one node array.
struct TreeStage {
  uint64_t tasks_offset, ctas_offset;
  uint64_t tasks, ctas;
  uint64_t node_base;
};

struct TreePlan {
  std::vector<uint8_t> bytes;  // every stage's tables, 8-byte aligned
  std::vector<TreeStage> stages;
  uint64_t nodes = 0;  // 8 words each
};

// The stages that hash n segments of these byte lengths.
TreePlan tree_plan(const uint64_t* lens, size_t n);

namespace tree {
struct StageArgs;
}

// Runs one stage's kernel on the CPU: every thread of every CTA, step by step
// in order (the arguments are those of cuda::blake3_stage, in host memory).
void tree_emulate_stage(bool leaf, const tree::StageArgs& a, uint64_t ctas);

}  // namespace mmcore::blake3
