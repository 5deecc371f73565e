// The one Python module of mmcore's native code. Every entry point takes raw
// addresses and sizes (no torch types), releases the GIL while it works, and
// turns failures into Python exceptions.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "blake3.h"
#include "blake3_plan.h"
#include "blake3_tree.h"
#include "buffers.h"
#include "delta.h"
#include "delta_emulate.h"
#include "delta_units.h"
#include "gather.h"
#include "io.h"
#include "parallel.h"
#include "planes.h"
#include "planes_units.h"
#ifdef MMCORE_WITH_CUDA
#include "cuda_info.h"
#include "cuda_kernels.h"
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

[[noreturn]] void raise_os_error(int64_t negative_errno) {
  errno = int(-negative_errno);
  PyErr_SetFromErrno(PyExc_OSError);
  throw py::error_already_set();
}

void blake3_segments(uintptr_t ptrs, uintptr_t lens, size_t n, uintptr_t out, int threads) {
  py::gil_scoped_release release;
  mmcore::blake3_segments_cpu(ptr<const uint8_t* const>(ptrs), ptr<const uint64_t>(lens), n,
                              ptr<uint8_t>(out), threads);
}

void gather(uintptr_t dst, uintptr_t srcs, uintptr_t lens, uintptr_t offsets, size_t n,
            int threads) {
  py::gil_scoped_release release;
  mmcore::gather_cpu(ptr<uint8_t>(dst), ptr<const uint8_t* const>(srcs), ptr<const uint64_t>(lens),
                     ptr<const uint64_t>(offsets), n, threads);
}

void scatter(uintptr_t src, uintptr_t dsts, uintptr_t lens, uintptr_t offsets, size_t n,
             int threads) {
  py::gil_scoped_release release;
  mmcore::scatter_cpu(ptr<const uint8_t>(src), ptr<uint8_t* const>(dsts), ptr<const uint64_t>(lens),
                      ptr<const uint64_t>(offsets), n, threads);
}

uint64_t planes_encode(uintptr_t src, uint64_t nbytes, int width, uintptr_t dst, uint64_t cap,
                       int threads, int block_log2) {
  py::gil_scoped_release release;
  return mmcore::planes_encode(ptr<const uint8_t>(src), nbytes, width, ptr<uint8_t>(dst), cap,
                               threads, block_log2);
}

void planes_decode(uintptr_t src, uint64_t len, uintptr_t dst, uint64_t nbytes, int threads) {
  py::gil_scoped_release release;
  mmcore::planes_decode(ptr<const uint8_t>(src), len, ptr<uint8_t>(dst), nbytes, threads);
}

// planes_decode_chunks started by one call that returns at once: threads of the job's
// own take the chunks while the caller goes on (building views, holding the GIL);
// wait() releases the GIL and makes the caller one more worker until no chunk is
// left, so the job's threads and the caller never number more than `threads`. `keep`
// (the Python objects owning the memory behind the addresses) is held until every
// thread has ended; the job never outlives its threads: dropping it waits too.
class DecodeJob {
 public:
  DecodeJob(uintptr_t chunks, uint64_t n, uintptr_t streams, uintptr_t runs, uintptr_t ptrs,
            uintptr_t lens, uintptr_t hashes, int threads, py::object keep)
      : keep_(std::move(keep)),
        queue_(ptr<const uint64_t>(chunks), n, ptr<const uint64_t>(streams),
               ptr<const uint64_t>(runs), ptr<const uint8_t* const>(ptrs),
               ptr<const uint64_t>(lens), ptr<uint8_t>(hashes)) {
    const int own = std::max(1, std::min(mmcore::resolve_threads(threads) - 1, int(n)));
    threads_.reserve(size_t(own));
    for (int i = 0; i < own; ++i) threads_.emplace_back([this] { queue_.work(); });
  }
  DecodeJob(const DecodeJob&) = delete;
  DecodeJob& operator=(const DecodeJob&) = delete;
  ~DecodeJob() {
    py::gil_scoped_release release;  // (the threads never take the GIL: no deadlock either way)
    join();
  }
  void wait() {
    {
      py::gil_scoped_release release;
      queue_.work();
      join();
    }
    queue_.rethrow();
  }

 private:
  void join() {
    for (auto& t : threads_)
      if (t.joinable()) t.join();
  }
  py::object keep_;
  mmcore::ChunkDecodeQueue queue_;
  std::vector<std::thread> threads_;  // (last: they start once the rest is there)
};

// A decode buffer lent to Python (buffer protocol: torch.frombuffer takes it): its
// region goes back to the cache when the last tensor over it is freed.
class DecodeBuffer {
 public:
  explicit DecodeBuffer(size_t nbytes) : region_(mmcore::take_region(nbytes)), nbytes_(nbytes) {}
  DecodeBuffer(const DecodeBuffer&) = delete;
  DecodeBuffer& operator=(const DecodeBuffer&) = delete;
  ~DecodeBuffer() { mmcore::give_back_region(std::move(region_)); }
  py::buffer_info info() {
    return py::buffer_info(region_->data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                           {py::ssize_t(nbytes_)}, {py::ssize_t(1)}, false);
  }

 private:
  std::unique_ptr<mmcore::Region> region_;
  size_t nbytes_;
};

uint64_t planes_blocks(uintptr_t src, uint64_t len, uint64_t nbytes, int width, uint64_t dev_src,
                       uint64_t dst, uint64_t scratch, uintptr_t out, uint64_t cap) {
  return mmcore::planes_blocks(ptr<const uint8_t>(src), len, nbytes, width, dev_src, dst, scratch,
                               ptr<void>(out), cap);
}

void planes_emulate(uintptr_t blocks, uint64_t n, uintptr_t planes, uintptr_t error) {
  py::gil_scoped_release release;
  mmcore::planes_emulate(ptr<const void>(blocks), n, ptr<uint64_t>(planes), ptr<uint32_t>(error));
}

void pwrite_bytes(int fd, uintptr_t data, uint64_t len, uint64_t offset) {
  int64_t r;
  {
    py::gil_scoped_release release;
    r = mmcore::pwrite_all(fd, ptr<const uint8_t>(data), len, offset);
  }
  if (r < 0) raise_os_error(r);
}

uint64_t pread_bytes(int fd, uintptr_t data, uint64_t len, uint64_t offset) {
  int64_t r;
  {
    py::gil_scoped_release release;
    r = mmcore::pread_all(fd, ptr<uint8_t>(data), len, offset);
  }
  if (r < 0) raise_os_error(r);
  return uint64_t(r);
}

void pwrite_segments(int fd, uint64_t offset, uintptr_t srcs, uintptr_t lens, uintptr_t dst_offsets,
                     size_t n, uint64_t total) {
  int64_t r;
  {
    py::gil_scoped_release release;
    r = mmcore::pwrite_segments(fd, offset, ptr<const uint8_t* const>(srcs),
                                ptr<const uint64_t>(lens), ptr<const uint64_t>(dst_offsets), n,
                                total);
  }
  if (r < 0) raise_os_error(r);
}

bool start_writeback(int fd, uint64_t offset, uint64_t len) {
  py::gil_scoped_release release;
  return mmcore::start_writeback(fd, offset, len) == 0;
}

using Addr = uintptr_t;

// The GPU BLAKE3's plan: (bytes, stages, nodes), each stage a tuple
// (tasks_offset, ctas_offset, tasks, ctas, node_base); see blake3_plan.h.
py::tuple blake3_tree_plan(Addr lens, size_t n) {
  mmcore::blake3::TreePlan plan;
  {
    py::gil_scoped_release release;
    plan = mmcore::blake3::tree_plan(ptr<const uint64_t>(lens), n);
  }
  py::list stages;
  for (const auto& st : plan.stages)
    stages.append(py::make_tuple(st.tasks_offset, st.ctas_offset, st.tasks, st.ctas, st.node_base));
  return py::make_tuple(
      py::bytes(reinterpret_cast<const char*>(plan.bytes.data()), plan.bytes.size()), stages,
      plan.nodes);
}

void blake3_tree_emulate_stage(bool leaf, Addr ptrs, Addr lens, Addr leaves, Addr tasks,
                               Addr cta_first, uint64_t ctas, Addr nodes, Addr out, Addr parents,
                               Addr outs, Addr words, Addr widths, Addr changed) {
  py::gil_scoped_release release;
  namespace tree = mmcore::blake3::tree;
  const tree::StageArgs a{
      ptr<const uint8_t* const>(ptrs),
      ptr<const uint64_t>(lens),
      ptr<const uint32_t>(leaves),
      ptr<const tree::Task>(tasks),
      ptr<const uint32_t>(cta_first),
      ptr<uint32_t>(nodes),
      ptr<uint8_t>(out),
      {ptr<const uint8_t* const>(parents), ptr<uint8_t* const>(outs), ptr<const uint64_t>(words),
       ptr<const uint32_t>(widths), ptr<unsigned long long>(changed)}};
  mmcore::blake3::tree_emulate_stage(leaf, a, ctas);
}

void xor_planes_encode(Addr news, Addr parents, Addr nbytes, Addr widths, Addr outs, Addr changed,
                       size_t n, int threads) {
  py::gil_scoped_release release;
  mmcore::xor_planes_encode_cpu(ptr<const uint8_t* const>(news), ptr<const uint8_t* const>(parents),
                                ptr<const uint64_t>(nbytes), ptr<const uint32_t>(widths),
                                ptr<uint8_t* const>(outs), ptr<uint64_t>(changed), n, threads);
}

void xor_planes_encode_hashed(Addr news, Addr parents, Addr nbytes, Addr widths, Addr outs,
                              Addr changed, Addr hashes, size_t n, int threads) {
  py::gil_scoped_release release;
  mmcore::xor_planes_encode_hashed_cpu(
      ptr<const uint8_t* const>(news), ptr<const uint8_t* const>(parents),
      ptr<const uint64_t>(nbytes), ptr<const uint32_t>(widths), ptr<uint8_t* const>(outs),
      ptr<uint64_t>(changed), ptr<uint8_t>(hashes), n, threads);
}

void xor_planes_decode(Addr encs, Addr parents, Addr nbytes, Addr widths, Addr outs, size_t n,
                       int threads) {
  py::gil_scoped_release release;
  mmcore::xor_planes_decode_cpu(ptr<const uint8_t* const>(encs), ptr<const uint8_t* const>(parents),
                                ptr<const uint64_t>(nbytes), ptr<const uint32_t>(widths),
                                ptr<uint8_t* const>(outs), n, threads);
}

void quantize_plan(Addr news, Addr parents, Addr numels, Addr kinds, Addr tols, size_t n,
                   Addr stats, Addr max_delta, int threads) {
  py::gil_scoped_release release;
  mmcore::quantize_plan_cpu(ptr<const uint8_t* const>(news), ptr<const uint8_t* const>(parents),
                            ptr<const uint64_t>(numels), ptr<const uint32_t>(kinds),
                            ptr<const double>(tols), n, ptr<int64_t>(stats), ptr<double>(max_delta),
                            threads);
}

void quantize_write(Addr news, Addr parents, Addr numels, Addr kinds, Addr tols, Addr qwidths,
                    Addr q_outs, Addr esc_index, Addr esc_bits, size_t n, int threads) {
  py::gil_scoped_release release;
  mmcore::quantize_write_cpu(ptr<const uint8_t* const>(news), ptr<const uint8_t* const>(parents),
                             ptr<const uint64_t>(numels), ptr<const uint32_t>(kinds),
                             ptr<const double>(tols), ptr<const uint32_t>(qwidths),
                             ptr<uint8_t* const>(q_outs), ptr<uint8_t* const>(esc_index),
                             ptr<uint8_t* const>(esc_bits), n, threads);
}

void quantize_decode(Addr parents, Addr numels, Addr kinds, Addr tols, Addr qwidths, Addr qs,
                     Addr n_escapes, Addr esc_index, Addr esc_bits, Addr outs, size_t n,
                     int threads) {
  py::gil_scoped_release release;
  mmcore::quantize_decode_cpu(
      ptr<const uint8_t* const>(parents), ptr<const uint64_t>(numels), ptr<const uint32_t>(kinds),
      ptr<const double>(tols), ptr<const uint32_t>(qwidths), ptr<const uint8_t* const>(qs),
      ptr<const uint64_t>(n_escapes), ptr<const uint8_t* const>(esc_index),
      ptr<const uint8_t* const>(esc_bits), ptr<uint8_t* const>(outs), n, threads);
}

// A launch's tiles (cuda::Tiles, or EmuTiles for the emulation).
template <typename T>
T tiles(Addr base, Addr segment, uint64_t total) {
  return T{ptr<const uint64_t>(base), ptr<const uint32_t>(segment), total};
}

// The elementwise GPU kernels run on the CPU (delta_emulate.h): same arguments
// as the cuda_* launchers, without the stream, on host memory. For the tests.
void register_emulation(py::module_& m) {
  namespace u = mmcore::delta::units;
  using Tiles = u::EmuTiles;
  m.attr("tile_threads") = u::kTileThreads;
  m.attr("unit_words") = u::kUnit;
  m.attr("quant_unit_bytes") = u::kQuantBytes;
  m.attr("copy_tile_bytes") = u::kCopyTile;
  m.def("emulate_xor_planes_encode", [](Addr news, Addr parents, Addr words, Addr widths, Addr outs,
                                        Addr changed, Addr base, Addr segment, uint64_t total) {
    py::gil_scoped_release release;
    u::emulate_xor_planes_encode(ptr<const uint8_t* const>(news),
                                 ptr<const uint8_t* const>(parents), ptr<const uint64_t>(words),
                                 ptr<const uint32_t>(widths), ptr<uint8_t* const>(outs),
                                 ptr<uint64_t>(changed), tiles<Tiles>(base, segment, total));
  });
  m.def("emulate_xor_planes_decode", [](Addr encs, Addr parents, Addr words, Addr widths, Addr outs,
                                        Addr base, Addr segment, uint64_t total) {
    py::gil_scoped_release release;
    u::emulate_xor_planes_decode(ptr<const uint8_t* const>(encs),
                                 ptr<const uint8_t* const>(parents), ptr<const uint64_t>(words),
                                 ptr<const uint32_t>(widths), ptr<uint8_t* const>(outs),
                                 tiles<Tiles>(base, segment, total));
  });
  m.def("emulate_quantize_plan", [](Addr news, Addr parents, Addr numels, Addr kinds, Addr tols,
                                    Addr stats, Addr max_delta_bits, Addr base, Addr segment,
                                    uint64_t total) {
    py::gil_scoped_release release;
    u::emulate_quantize_plan(ptr<const uint8_t* const>(news), ptr<const uint8_t* const>(parents),
                             ptr<const uint64_t>(numels), ptr<const uint32_t>(kinds),
                             ptr<const double>(tols), ptr<uint64_t>(stats),
                             ptr<uint64_t>(max_delta_bits), tiles<Tiles>(base, segment, total));
  });
  m.def("emulate_quantize_write", [](Addr news, Addr parents, Addr numels, Addr kinds, Addr tols,
                                     Addr qwidths, Addr q_outs, Addr flags, Addr flag_base,
                                     Addr base, Addr segment, uint64_t total) {
    py::gil_scoped_release release;
    u::emulate_quantize_write(ptr<const uint8_t* const>(news), ptr<const uint8_t* const>(parents),
                              ptr<const uint64_t>(numels), ptr<const uint32_t>(kinds),
                              ptr<const double>(tols), ptr<const uint32_t>(qwidths),
                              ptr<uint8_t* const>(q_outs), ptr<uint8_t>(flags),
                              ptr<const uint64_t>(flag_base), tiles<Tiles>(base, segment, total));
  });
  m.def(
      "emulate_quantize_decode", [](Addr parents, Addr numels, Addr kinds, Addr tols, Addr qwidths,
                                    Addr qs, Addr outs, Addr base, Addr segment, uint64_t total) {
        py::gil_scoped_release release;
        u::emulate_quantize_decode(ptr<const uint8_t* const>(parents), ptr<const uint64_t>(numels),
                                   ptr<const uint32_t>(kinds), ptr<const double>(tols),
                                   ptr<const uint32_t>(qwidths), ptr<const uint8_t* const>(qs),
                                   ptr<uint8_t* const>(outs), tiles<Tiles>(base, segment, total));
      });
  m.def("emulate_gather", [](Addr dst, Addr srcs, Addr lens, Addr offsets, Addr base, Addr segment,
                             uint64_t total) {
    py::gil_scoped_release release;
    u::emulate_gather(ptr<uint8_t>(dst), ptr<const uint8_t* const>(srcs), ptr<const uint64_t>(lens),
                      ptr<const uint64_t>(offsets), tiles<Tiles>(base, segment, total));
  });
  m.def("emulate_scatter",
        [](Addr src, Addr dsts, Addr lens, Addr offsets, Addr base, Addr segment, uint64_t total) {
          py::gil_scoped_release release;
          u::emulate_scatter(ptr<const uint8_t>(src), ptr<uint8_t* const>(dsts),
                             ptr<const uint64_t>(lens), ptr<const uint64_t>(offsets),
                             tiles<Tiles>(base, segment, total));
        });
}

#ifdef MMCORE_WITH_CUDA
namespace cu = mmcore::cuda;

// Launch errors (bad configuration, missing device) surface here; errors inside
// a kernel surface at the next synchronisation, which the Python side does once
// per stage with cuda_stream_check.
void check_launch(const char* what) {
  if (const char* err = cu::last_error())
    throw std::runtime_error(std::string("mmcore CUDA kernel ") + what +
                             " failed to launch: " + err);
}

void register_cuda(py::module_& m) {
  m.def("cuda_blake3_stage", [](bool leaf, Addr ptrs, Addr lens, Addr leaves, Addr tasks,
                                Addr cta_first, uint64_t ctas, Addr nodes, Addr out, Addr parents,
                                Addr outs, Addr words, Addr widths, Addr changed, Addr stream) {
    const cu::XorPlanesArgs x{ptr<const uint8_t* const>(parents), ptr<uint8_t* const>(outs),
                              ptr<const uint64_t>(words), ptr<const uint32_t>(widths),
                              ptr<unsigned long long>(changed)};
    cu::blake3_stage(leaf, ptr<const uint8_t* const>(ptrs), ptr<const uint64_t>(lens),
                     ptr<const uint32_t>(leaves), ptr<const void>(tasks),
                     ptr<const uint32_t>(cta_first), ctas, ptr<uint32_t>(nodes), ptr<uint8_t>(out),
                     x, ptr<void>(stream));
    check_launch("blake3_stage");
  });
  m.def("cuda_xor_planes_encode",
        [](Addr news, Addr parents, Addr words, Addr widths, Addr outs, Addr changed, Addr base,
           Addr segment, uint64_t total, Addr stream) {
          cu::xor_planes_encode(ptr<const uint8_t* const>(news), ptr<const uint8_t* const>(parents),
                                ptr<const uint64_t>(words), ptr<const uint32_t>(widths),
                                ptr<uint8_t* const>(outs), ptr<unsigned long long>(changed),
                                tiles<cu::Tiles>(base, segment, total), ptr<void>(stream));
          check_launch("xor_planes_encode");
        });
  m.def("cuda_xor_planes_decode", [](Addr encs, Addr parents, Addr words, Addr widths, Addr outs,
                                     Addr base, Addr segment, uint64_t total, Addr stream) {
    cu::xor_planes_decode(ptr<const uint8_t* const>(encs), ptr<const uint8_t* const>(parents),
                          ptr<const uint64_t>(words), ptr<const uint32_t>(widths),
                          ptr<uint8_t* const>(outs), tiles<cu::Tiles>(base, segment, total),
                          ptr<void>(stream));
    check_launch("xor_planes_decode");
  });
  m.def("cuda_quantize_plan",
        [](Addr news, Addr parents, Addr numels, Addr kinds, Addr tols, Addr stats,
           Addr max_delta_bits, Addr base, Addr segment, uint64_t total, Addr stream) {
          cu::quantize_plan(ptr<const uint8_t* const>(news), ptr<const uint8_t* const>(parents),
                            ptr<const uint64_t>(numels), ptr<const uint32_t>(kinds),
                            ptr<const double>(tols), ptr<unsigned long long>(stats),
                            ptr<unsigned long long>(max_delta_bits),
                            tiles<cu::Tiles>(base, segment, total), ptr<void>(stream));
          check_launch("quantize_plan");
        });
  m.def("cuda_quantize_write", [](Addr news, Addr parents, Addr numels, Addr kinds, Addr tols,
                                  Addr qwidths, Addr q_outs, Addr flags, Addr flag_base, Addr base,
                                  Addr segment, uint64_t total, Addr stream) {
    cu::quantize_write(
        ptr<const uint8_t* const>(news), ptr<const uint8_t* const>(parents),
        ptr<const uint64_t>(numels), ptr<const uint32_t>(kinds), ptr<const double>(tols),
        ptr<const uint32_t>(qwidths), ptr<uint8_t* const>(q_outs), ptr<uint8_t>(flags),
        ptr<const uint64_t>(flag_base), tiles<cu::Tiles>(base, segment, total), ptr<void>(stream));
    check_launch("quantize_write");
  });
  m.def("cuda_quantize_decode", [](Addr parents, Addr numels, Addr kinds, Addr tols, Addr qwidths,
                                   Addr qs, Addr outs, Addr base, Addr segment, uint64_t total,
                                   Addr stream) {
    cu::quantize_decode(
        ptr<const uint8_t* const>(parents), ptr<const uint64_t>(numels), ptr<const uint32_t>(kinds),
        ptr<const double>(tols), ptr<const uint32_t>(qwidths), ptr<const uint8_t* const>(qs),
        ptr<uint8_t* const>(outs), tiles<cu::Tiles>(base, segment, total), ptr<void>(stream));
    check_launch("quantize_decode");
  });
  m.def("cuda_gather", [](Addr dst, Addr srcs, Addr lens, Addr offsets, Addr base, Addr segment,
                          uint64_t total, Addr stream) {
    cu::gather(ptr<uint8_t>(dst), ptr<const uint8_t* const>(srcs), ptr<const uint64_t>(lens),
               ptr<const uint64_t>(offsets), tiles<cu::Tiles>(base, segment, total),
               ptr<void>(stream));
    check_launch("gather");
  });
  m.def("cuda_scatter", [](Addr src, Addr dsts, Addr lens, Addr offsets, Addr base, Addr segment,
                           uint64_t total, Addr stream) {
    cu::scatter(ptr<const uint8_t>(src), ptr<uint8_t* const>(dsts), ptr<const uint64_t>(lens),
                ptr<const uint64_t>(offsets), tiles<cu::Tiles>(base, segment, total),
                ptr<void>(stream));
    check_launch("scatter");
  });
  m.def("cuda_planes_decode", [](Addr blocks, uint64_t n, Addr planes, Addr error, Addr stream) {
    cu::planes_decode(ptr<const void>(blocks), n, ptr<uint64_t>(planes), ptr<uint32_t>(error),
                      ptr<void>(stream));
    check_launch("planes_decode");
  });
  m.def(
      "cuda_stream_check",
      [](Addr stream) {
        std::string err;
        {
          py::gil_scoped_release release;
          err = mmcore::cuda_stream_check(ptr<void>(stream));
        }
        if (!err.empty()) throw std::runtime_error(err);
      },
      py::arg("stream"),
      "Waits for a stream; raises RuntimeError with the CUDA error if a kernel on it failed.");
}
#endif

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "mmcore native kernels (torch-free: raw addresses, sizes and dtype codes)";
  m.def("blake3_segments", &blake3_segments, py::arg("ptrs"), py::arg("lens"), py::arg("n"),
        py::arg("out"), py::arg("threads") = 0,
        "BLAKE3-256 of n segments given as uint64 tables of addresses and lengths.");
  m.def("blake3_tree_plan", &blake3_tree_plan, py::arg("lens"), py::arg("n"),
        "The GPU BLAKE3's launch plan for n segments of these byte lengths.");
  m.def("blake3_tree_emulate_stage", &blake3_tree_emulate_stage,
        "cuda_blake3_stage's kernel run thread by thread on the CPU, on host memory (for tests).");
  m.def("blake3_isa", &mmcore::blake3_cpu_isa, "Instruction set of the CPU BLAKE3 path.");
  m.def("gather", &gather, py::arg("dst"), py::arg("srcs"), py::arg("lens"), py::arg("offsets"),
        py::arg("n"), py::arg("threads") = 0);
  m.def("scatter", &scatter, py::arg("src"), py::arg("dsts"), py::arg("lens"), py::arg("offsets"),
        py::arg("n"), py::arg("threads") = 0);
  m.def("xor_planes_encode", &xor_planes_encode, py::arg("news"), py::arg("parents"),
        py::arg("nbytes"), py::arg("widths"), py::arg("outs"), py::arg("changed"), py::arg("n"),
        py::arg("threads") = 0);
  m.def("xor_planes_encode_hashed", &xor_planes_encode_hashed, py::arg("news"), py::arg("parents"),
        py::arg("nbytes"), py::arg("widths"), py::arg("outs"), py::arg("changed"),
        py::arg("hashes"), py::arg("n"), py::arg("threads") = 0,
        "xor_planes_encode and BLAKE3 of the new segments in one pass over memory.");
  m.def("xor_planes_decode", &xor_planes_decode, py::arg("encs"), py::arg("parents"),
        py::arg("nbytes"), py::arg("widths"), py::arg("outs"), py::arg("n"),
        py::arg("threads") = 0);
  m.def("quantize_plan", &quantize_plan, py::arg("news"), py::arg("parents"), py::arg("numels"),
        py::arg("kinds"), py::arg("tols"), py::arg("n"), py::arg("stats"), py::arg("max_delta"),
        py::arg("threads") = 0);
  m.def("quantize_write", &quantize_write, py::arg("news"), py::arg("parents"), py::arg("numels"),
        py::arg("kinds"), py::arg("tols"), py::arg("qwidths"), py::arg("q_outs"),
        py::arg("esc_index"), py::arg("esc_bits"), py::arg("n"), py::arg("threads") = 0);
  m.def("quantize_decode", &quantize_decode, py::arg("parents"), py::arg("numels"),
        py::arg("kinds"), py::arg("tols"), py::arg("qwidths"), py::arg("qs"), py::arg("n_escapes"),
        py::arg("esc_index"), py::arg("esc_bits"), py::arg("outs"), py::arg("n"),
        py::arg("threads") = 0);
  m.def("planes_bound", &mmcore::planes_bound, py::arg("nbytes"), py::arg("width"),
        py::arg("block_log2") = mmcore::kPlanesBlockLog2);
  m.def("planes_encode", &planes_encode, py::arg("src"), py::arg("nbytes"), py::arg("width"),
        py::arg("dst"), py::arg("cap"), py::arg("threads"),
        py::arg("block_log2") = mmcore::kPlanesBlockLog2);
  m.def("planes_decode", &planes_decode, py::arg("src"), py::arg("len"), py::arg("dst"),
        py::arg("nbytes"), py::arg("threads"));
  py::class_<DecodeJob>(m, "DecodeJob").def("wait", &DecodeJob::wait);
  m.def(
      "planes_decode_chunks_start",
      [](uintptr_t chunks, uint64_t n, uintptr_t streams, uintptr_t runs, uintptr_t ptrs,
         uintptr_t lens, uintptr_t hashes, int threads, py::object keep) {
        return std::make_unique<DecodeJob>(chunks, n, streams, runs, ptrs, lens, hashes, threads,
                                           std::move(keep));
      },
      py::arg("chunks"), py::arg("n"), py::arg("streams"), py::arg("runs"), py::arg("ptrs"),
      py::arg("lens"), py::arg("hashes"), py::arg("threads"), py::arg("keep"),
      "planes_decode_chunks (planes.h) on threads of its own; wait() joins it.");
  m.def("planes_blocks", &planes_blocks, py::arg("src"), py::arg("len"), py::arg("nbytes"),
        py::arg("width"), py::arg("dev_src"), py::arg("dst"), py::arg("scratch"), py::arg("out"),
        py::arg("cap"),
        "The GPU byte-plane decoder's block table of one stream (40 bytes a block); "
        "returns the blocks written.");
  m.def("planes_emulate", &planes_emulate, py::arg("blocks"), py::arg("n"), py::arg("planes"),
        py::arg("error"), "The GPU byte-plane decoder's launches, run on the CPU.");
  m.attr("planes_block_bytes") = sizeof(mmcore::planes_units::Block);
  py::class_<DecodeBuffer>(m, "DecodeBuffer", py::buffer_protocol())
      .def_buffer(&DecodeBuffer::info);
  m.def(
      "decode_buffer",
      [](size_t nbytes) {
        if (nbytes == 0) throw std::invalid_argument("a decode buffer of 0 bytes");
        return std::make_unique<DecodeBuffer>(nbytes);
      },
      py::arg("nbytes"),
      "nbytes of uninitialised memory (buffer protocol), from the cache of "
      "released ones where it holds one that fits; handed back when the last user is gone.");
  m.def(
      "decode_buffer_cache",
      [](int64_t limit) {
        const mmcore::RegionCacheState s = mmcore::region_cache(limit);
        return py::make_tuple(s.limit, s.idle_bytes, s.idle_regions);
      },
      py::arg("limit") = -1,
      "(limit, idle bytes, idle buffers) of the decode buffers' cache; sets the limit "
      "first where one >= 0 is given (0: no buffer is kept).");
  m.def("pwrite", &pwrite_bytes, py::arg("fd"), py::arg("data"), py::arg("len"), py::arg("offset"));
  m.def("pwrite_segments", &pwrite_segments, py::arg("fd"), py::arg("offset"), py::arg("srcs"),
        py::arg("lens"), py::arg("dst_offsets"), py::arg("n"), py::arg("total"),
        "Writes n segments to a file range without copying; gaps become zeros.");
  m.def("start_writeback", &start_writeback, py::arg("fd"), py::arg("offset"), py::arg("len"),
        "Starts write-back of a file range without waiting; False where unsupported.");
  m.def("pread", &pread_bytes, py::arg("fd"), py::arg("data"), py::arg("len"), py::arg("offset"));
  m.def(
      "buffer_address",
      [](const py::buffer& data) { return reinterpret_cast<uintptr_t>(data.request().ptr); },
      py::arg("data"),
      "Address of the first byte of an object with the buffer protocol (bytes, "
      "memoryview...). The caller keeps the object alive while it uses the address.");
  register_emulation(m);
#ifdef MMCORE_WITH_CUDA
  m.attr("built_with_cuda") = true;
  // The CUDA toolkit built against (its runtime is linked statically) and the
  // architectures compiled, in nvcc's names: sm_XX device code, compute_XX PTX.
  m.attr("cuda_version") = MMCORE_CUDA_VERSION;
  py::list archs;
  std::string names = MMCORE_CUDA_ARCH_NAMES;
  for (size_t start = 0; start < names.size();) {
    size_t end = names.find(',', start);
    if (end == std::string::npos) end = names.size();
    if (end > start) archs.append(names.substr(start, end - start));
    start = end + 1;
  }
  m.attr("cuda_architectures") = py::tuple(archs);
  register_cuda(m);
  m.def("cuda_device_count", &mmcore::cuda_device_count,
        "Usable CUDA devices, or -1 when no driver or runtime answers.");
#else
  m.attr("built_with_cuda") = false;
  m.attr("cuda_version") = py::none();
  m.attr("cuda_architectures") = py::tuple();
#endif
}
