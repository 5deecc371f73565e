// Positioned file I/O straight between a file descriptor and caller memory,
// so payloads never pass through Python bytes objects.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mmcore {

// Writes all `len` bytes at `offset`. Returns 0, or -errno.
int64_t pwrite_all(int fd, const uint8_t* data, uint64_t len, uint64_t offset);

// Reads up to `len` bytes at `offset`, stopping early only at end of file.
// Returns the number of bytes read, or -errno.
int64_t pread_all(int fd, uint8_t* data, uint64_t len, uint64_t offset);

// Writes n segments (srcs[i], lens[i] bytes) to the file so that segment i
// lands at offset + dst_offsets[i] (ascending); gaps between segments and up
// to `total` bytes are written as zeros. One pass of pwritev calls, no copy.
// Returns 0, or -errno.
int64_t pwrite_segments(int fd, uint64_t offset, const uint8_t* const* srcs, const uint64_t* lens,
                        const uint64_t* dst_offsets, size_t n, uint64_t total);

// Starts write-back of a written range without waiting for it, so a final
// fsync has little left to do. Returns 0, or -errno (ENOSYS off Linux).
int64_t start_writeback(int fd, uint64_t offset, uint64_t len);

}  // namespace mmcore
