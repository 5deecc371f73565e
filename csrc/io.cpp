#include "io.h"

#include <cerrno>
#include <unistd.h>

namespace mmcore {

namespace {
// Linux moves at most about 2 GiB per call; ask for less.
constexpr uint64_t kMaxIo = 1u << 30;
}  // namespace

int64_t pwrite_all(int fd, const uint8_t* data, uint64_t len, uint64_t offset) {
  uint64_t done = 0;
  while (done < len) {
    uint64_t want = len - done < kMaxIo ? len - done : kMaxIo;
    ssize_t r = ::pwrite(fd, data + done, size_t(want), off_t(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return -int64_t(errno);
    }
    done += uint64_t(r);
  }
  return 0;
}

int64_t pread_all(int fd, uint8_t* data, uint64_t len, uint64_t offset) {
  uint64_t done = 0;
  while (done < len) {
    uint64_t want = len - done < kMaxIo ? len - done : kMaxIo;
    ssize_t r = ::pread(fd, data + done, size_t(want), off_t(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return -int64_t(errno);
    }
    if (r == 0) break;
    done += uint64_t(r);
  }
  return int64_t(done);
}

}  // namespace mmcore
