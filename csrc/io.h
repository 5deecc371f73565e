// Positioned file I/O straight between a file descriptor and caller memory,
// so payloads never pass through Python bytes objects.
#pragma once

#include <cstdint>

namespace mmcore {

// Writes all `len` bytes at `offset`. Returns 0, or -errno.
int64_t pwrite_all(int fd, const uint8_t* data, uint64_t len, uint64_t offset);

// Reads up to `len` bytes at `offset`, stopping early only at end of file.
// Returns the number of bytes read, or -errno.
int64_t pread_all(int fd, uint8_t* data, uint64_t len, uint64_t offset);

}  // namespace mmcore
