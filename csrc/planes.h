// Lossless coding of tensor bytes as byte planes (docs/FORMAT.md, "Byte planes").
//
// Elements of `width` bytes (1, 2, 4 or 8) are cut into blocks (2^16 elements); in each
// block the elements' sign bit is rotated to the lowest bit (widths 2 and 4: the top
// byte is then the whole float32/bfloat16 exponent) and each byte position becomes a
// plane. A plane is stored raw, or, where that is smaller, coded with a Huffman code
// (four streams, fast to decode) or an order-0 rANS coder (within a few percent of
// the plane's entropy), its table stored in front of it. Blocks are independent, so
// both directions run on up to `threads` threads.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>

namespace mmcore {

// Blocks of 2^kPlanesBlockLog2 elements, as the writer cuts them (a stream's header
// says its own: 2^16 to 2^20).
constexpr int kPlanesBlockLog2 = 16;

// Bytes `planes_encode` may write for `nbytes` of input.
uint64_t planes_bound(uint64_t nbytes, int width, int block_log2 = kPlanesBlockLog2);

// Codes `nbytes` (a multiple of `width`) from `src` into `dst` (`dst_cap` bytes, at
// least planes_bound); returns the bytes written.
uint64_t planes_encode(const uint8_t* src, uint64_t nbytes, int width, uint8_t* dst,
                       uint64_t dst_cap, int threads, int block_log2 = kPlanesBlockLog2);

// Decodes `src` (`src_len` bytes, as planes_encode wrote them) into `dst`, which must
// be exactly the `nbytes` the stream holds. Throws std::invalid_argument on a stream
// that is damaged or does not fit: it never reads past `src` nor writes past `dst`.
void planes_decode(const uint8_t* src, uint64_t src_len, uint8_t* dst, uint64_t nbytes,
                   int threads);

// Decodes `n` chunks of records and hashes their tensors. Per chunk, `chunks` holds
// four u64: its first row in `streams`, its stream count, its first segment and its
// segment count. Per stream, `streams` holds five u64: its address, its length, the
// bytes it holds, its first row in `runs` and its run count; a stream of address 0
// and length 0 is zeros. Per run, `runs` holds two u64: an address and a length; a
// stream's runs, in order, take its bytes in order (block by block: a block inside
// one run is decoded straight into it, else into scratch and copied out). Once every
// stream of a chunk is decoded, the BLAKE3 of each of its segments (`ptrs[i]`,
// `lens[i]` bytes) goes to `hashes + 32 * i`, on the same thread while the bytes are
// in its cache (a chunk of no segments is only decoded: `ptrs`, `lens` and `hashes`
// may then be null). Chunks go to `threads` workers as they free up; the first
// damaged stream's error is thrown (std::invalid_argument) after every worker has
// stopped; a stream whose runs do not add up to its bytes throws std::logic_error.
void planes_decode_chunks(const uint64_t* chunks, uint64_t n, const uint64_t* streams,
                          const uint64_t* runs, const uint8_t* const* ptrs, const uint64_t* lens,
                          uint8_t* hashes, int threads);

// planes_decode_chunks' chunks as work that any number of threads share: each call
// of work() (from any thread, at any time) decodes and hashes chunks, one at a time,
// until none is left or one has failed. rethrow() throws the first failure's error; call
// it once every work() has returned. The tables must outlive the queue's work.
class ChunkDecodeQueue {
 public:
  ChunkDecodeQueue(const uint64_t* chunks, uint64_t n, const uint64_t* streams,
                   const uint64_t* runs, const uint8_t* const* ptrs, const uint64_t* lens,
                   uint8_t* hashes);
  void work() noexcept;
  void rethrow();

 private:
  const uint64_t* chunks_;
  uint64_t n_;
  const uint64_t* streams_;
  const uint64_t* runs_;
  const uint8_t* const* ptrs_;
  const uint64_t* lens_;
  uint8_t* hashes_;
  std::atomic<uint64_t> next_{0};
  std::atomic<bool> failed_{false};
  std::mutex mu_;
  std::exception_ptr error_;
};

// The GPU decoder's table (planes_units.h): checks the header and block table of the
// stream at `src` (host memory, `src_len` bytes, holding `nbytes` of elements of
// `width` bytes) and writes one planes_units::Block per block into `out` (room for
// `cap`): its coded bytes at `dev_src` plus their offset in the stream, its elements
// from `dst` on, its scratch planes from `scratch` on. Returns the blocks written.
uint64_t planes_blocks(const uint8_t* src, uint64_t src_len, uint64_t nbytes, int width,
                       uint64_t dev_src, uint64_t dst, uint64_t scratch, void* out, uint64_t cap);

// The GPU decoder run on the CPU (for the CPU tests), block by block and lane by lane:
// as cuda::planes_decode, over host memory.
void planes_emulate(const void* blocks, uint64_t n, uint64_t* planes, uint32_t* error);

}  // namespace mmcore
