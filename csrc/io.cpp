#include "io.h"

#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <vector>

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

namespace {

constexpr size_t kMaxIov = 1024;  // IOV_MAX on Linux
alignas(64) const uint8_t kZeros[4096] = {};

// Writes all of iov[0..count) at `offset`, resuming after short writes.
int64_t pwritev_all(int fd, struct iovec* iov, size_t count, uint64_t offset) {
  while (count > 0) {
    size_t batch = count < kMaxIov ? count : kMaxIov;
    ssize_t r = ::pwritev(fd, iov, int(batch), off_t(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      return -int64_t(errno);
    }
    offset += uint64_t(r);
    size_t done = size_t(r);
    while (count > 0 && done >= iov->iov_len) {
      done -= iov->iov_len;
      ++iov;
      --count;
    }
    if (done > 0) {
      iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + done;
      iov->iov_len -= done;
    }
  }
  return 0;
}

void add_zeros(std::vector<struct iovec>& iov, uint64_t len) {
  while (len > 0) {
    uint64_t piece = len < sizeof(kZeros) ? len : sizeof(kZeros);
    iov.push_back({const_cast<uint8_t*>(kZeros), size_t(piece)});
    len -= piece;
  }
}

}  // namespace

int64_t pwrite_segments(int fd, uint64_t offset, const uint8_t* const* srcs, const uint64_t* lens,
                        const uint64_t* dst_offsets, size_t n, uint64_t total) {
  std::vector<struct iovec> iov;
  iov.reserve(n + 16);
  uint64_t pos = 0;
  for (size_t i = 0; i < n; ++i) {
    if (dst_offsets[i] < pos || dst_offsets[i] + lens[i] > total) return -int64_t(EINVAL);
    add_zeros(iov, dst_offsets[i] - pos);
    if (lens[i]) iov.push_back({const_cast<uint8_t*>(srcs[i]), size_t(lens[i])});
    pos = dst_offsets[i] + lens[i];
  }
  add_zeros(iov, total - pos);
  return pwritev_all(fd, iov.data(), iov.size(), offset);
}

int64_t start_writeback(int fd, uint64_t offset, uint64_t len) {
#if defined(__linux__)
  if (::sync_file_range(fd, off_t(offset), off_t(len), SYNC_FILE_RANGE_WRITE) != 0)
    return -int64_t(errno);
  return 0;
#else
  (void)fd;
  (void)offset;
  (void)len;
  return -int64_t(ENOSYS);
#endif
}

}  // namespace mmcore
