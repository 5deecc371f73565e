"""Type stubs for the native module ``mmcore._core`` (csrc/bindings.cpp).

Every address is an integer from ``Tensor.data_ptr()``; every table is an
int64 tensor's address. The caller keeps the memory alive for the call.
"""

built_with_cuda: bool

def blake3_segments(ptrs: int, lens: int, n: int, out: int, threads: int = 0) -> None: ...
def blake3_isa() -> str: ...
def gather(dst: int, srcs: int, lens: int, offsets: int, n: int, threads: int = 0) -> None: ...
def scatter(src: int, dsts: int, lens: int, offsets: int, n: int, threads: int = 0) -> None: ...
def pwrite(fd: int, data: int, len: int, offset: int) -> None: ...
def pread(fd: int, data: int, len: int, offset: int) -> int: ...
def pwrite_segments(
    fd: int, offset: int, srcs: int, lens: int, dst_offsets: int, n: int, total: int
) -> None: ...
def start_writeback(fd: int, offset: int, len: int) -> bool: ...
def cuda_device_count() -> int: ...
def xor_planes_encode(
    news: int,
    parents: int,
    nbytes: int,
    widths: int,
    outs: int,
    changed: int,
    n: int,
    threads: int = 0,
) -> None: ...
def xor_planes_encode_hashed(
    news: int,
    parents: int,
    nbytes: int,
    widths: int,
    outs: int,
    changed: int,
    hashes: int,
    n: int,
    threads: int = 0,
) -> None: ...
def xor_planes_decode(
    encs: int, parents: int, nbytes: int, widths: int, outs: int, n: int, threads: int = 0
) -> None: ...
def quantize_plan(
    news: int,
    parents: int,
    numels: int,
    kinds: int,
    tols: int,
    n: int,
    stats: int,
    max_delta: int,
    threads: int = 0,
) -> None: ...
def quantize_write(
    news: int,
    parents: int,
    numels: int,
    kinds: int,
    tols: int,
    qwidths: int,
    q_outs: int,
    esc_index: int,
    esc_bits: int,
    n: int,
    threads: int = 0,
) -> None: ...
def quantize_decode(
    parents: int,
    numels: int,
    kinds: int,
    tols: int,
    qwidths: int,
    qs: int,
    n_escapes: int,
    esc_index: int,
    esc_bits: int,
    outs: int,
    n: int,
    threads: int = 0,
) -> None: ...
