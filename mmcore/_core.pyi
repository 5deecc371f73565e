"""Type stubs for the native module ``mmcore._core`` (csrc/bindings.cpp).

Every address is an integer from ``Tensor.data_ptr()``; every table is an
int64 tensor's address. The caller keeps the memory alive for the call.
"""

built_with_cuda: bool
cuda_version: str | None  # the CUDA toolkit the kernels were built with
cuda_architectures: tuple[str, ...]  # e.g. ("sm_80", ..., "compute_120"); () without CUDA

def blake3_segments(ptrs: int, lens: int, n: int, out: int, threads: int = 0) -> None: ...
def blake3_isa() -> str: ...
def blake3_tree_plan(
    lens: int, n: int
) -> tuple[bytes, list[tuple[int, int, int, int, int]], int]: ...

# The elementwise GPU kernels run on the CPU on host memory (the tests'
# emulation): the cuda_* launchers' arguments, without the stream.
tile_threads: int
unit_words: int
quant_unit_bytes: int
copy_tile_bytes: int

def emulate_xor_planes_encode(
    news: int,
    parents: int,
    words: int,
    widths: int,
    outs: int,
    changed: int,
    tile_base: int,
    tile_segment: int,
    tiles: int,
) -> None: ...
def emulate_xor_planes_decode(
    encs: int,
    parents: int,
    words: int,
    widths: int,
    outs: int,
    tile_base: int,
    tile_segment: int,
    tiles: int,
) -> None: ...
def emulate_quantize_plan(
    news: int,
    parents: int,
    numels: int,
    kinds: int,
    tols: int,
    stats: int,
    max_delta_bits: int,
    tile_base: int,
    tile_segment: int,
    tiles: int,
) -> None: ...
def emulate_quantize_write(
    news: int,
    parents: int,
    numels: int,
    kinds: int,
    tols: int,
    qwidths: int,
    q_outs: int,
    flags: int,
    flag_base: int,
    tile_base: int,
    tile_segment: int,
    tiles: int,
) -> None: ...
def emulate_quantize_decode(
    parents: int,
    numels: int,
    kinds: int,
    tols: int,
    qwidths: int,
    qs: int,
    outs: int,
    tile_base: int,
    tile_segment: int,
    tiles: int,
) -> None: ...
def emulate_gather(
    dst: int,
    srcs: int,
    lens: int,
    offsets: int,
    tile_base: int,
    tile_segment: int,
    tiles: int,
    stream: int,
) -> None: ...
def emulate_scatter(
    src: int,
    dsts: int,
    lens: int,
    offsets: int,
    tile_base: int,
    tile_segment: int,
    tiles: int,
    stream: int,
) -> None: ...
def blake3_tree_emulate_stage(
    leaf: bool,
    ptrs: int,
    lens: int,
    leaves: int,
    tasks: int,
    cta_first: int,
    ctas: int,
    nodes: int,
    out: int,
    parents: int,
    outs: int,
    words: int,
    widths: int,
    changed: int,
) -> None: ...
def gather(dst: int, srcs: int, lens: int, offsets: int, n: int, threads: int = 0) -> None: ...
def scatter(src: int, dsts: int, lens: int, offsets: int, n: int, threads: int = 0) -> None: ...
def pwrite(fd: int, data: int, len: int, offset: int) -> None: ...
def pread(fd: int, data: int, len: int, offset: int) -> int: ...
def buffer_address(data: bytes | bytearray | memoryview) -> int: ...
def pwrite_segments(
    fd: int, offset: int, srcs: int, lens: int, dst_offsets: int, n: int, total: int
) -> None: ...
def start_writeback(fd: int, offset: int, len: int) -> bool: ...
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

# Present only when built_with_cuda. Tables are device addresses; every kernel
# enqueues on ``stream`` (a cudaStream_t as int) and raises RuntimeError if the
# launch fails; cuda_stream_check waits for the stream and raises RuntimeError
# with the CUDA error of any kernel that failed on it.

def cuda_device_count() -> int: ...
def cuda_stream_check(stream: int) -> None: ...
def cuda_blake3_stage(
    leaf: bool,
    ptrs: int,
    lens: int,
    leaves: int,
    tasks: int,
    cta_first: int,
    ctas: int,
    nodes: int,
    out: int,
    parents: int,
    outs: int,
    words: int,
    widths: int,
    changed: int,
    stream: int,
) -> None: ...
def cuda_xor_planes_encode(
    news: int,
    parents: int,
    words: int,
    widths: int,
    outs: int,
    changed: int,
    tile_base: int,
    tile_segment: int,
    tiles: int,
    stream: int,
) -> None: ...
def cuda_xor_planes_decode(
    encs: int,
    parents: int,
    words: int,
    widths: int,
    outs: int,
    tile_base: int,
    tile_segment: int,
    tiles: int,
    stream: int,
) -> None: ...
def cuda_quantize_plan(
    news: int,
    parents: int,
    numels: int,
    kinds: int,
    tols: int,
    stats: int,
    max_delta_bits: int,
    tile_base: int,
    tile_segment: int,
    tiles: int,
    stream: int,
) -> None: ...
def cuda_quantize_write(
    news: int,
    parents: int,
    numels: int,
    kinds: int,
    tols: int,
    qwidths: int,
    q_outs: int,
    flags: int,
    flag_base: int,
    tile_base: int,
    tile_segment: int,
    tiles: int,
    stream: int,
) -> None: ...
def cuda_quantize_decode(
    parents: int,
    numels: int,
    kinds: int,
    tols: int,
    qwidths: int,
    qs: int,
    outs: int,
    tile_base: int,
    tile_segment: int,
    tiles: int,
    stream: int,
) -> None: ...
def cuda_gather(
    dst: int,
    srcs: int,
    lens: int,
    offsets: int,
    tile_base: int,
    tile_segment: int,
    tiles: int,
    stream: int,
) -> None: ...
def cuda_scatter(
    src: int,
    dsts: int,
    lens: int,
    offsets: int,
    tile_base: int,
    tile_segment: int,
    tiles: int,
    stream: int,
) -> None: ...
def cuda_planes_decode(blocks: int, n: int, planes: int, error: int, stream: int) -> None: ...
def planes_bound(nbytes: int, width: int, block_log2: int = 16) -> int: ...
def planes_blocks(
    src: int,
    len: int,
    nbytes: int,
    width: int,
    dev_src: int,
    dst: int,
    scratch: int,
    out: int,
    cap: int,
) -> int: ...
def planes_emulate(blocks: int, n: int, planes: int, error: int) -> None: ...

planes_block_bytes: int

def planes_encode(
    src: int, nbytes: int, width: int, dst: int, cap: int, threads: int, block_log2: int = 16
) -> int: ...
def planes_decode(src: int, len: int, dst: int, nbytes: int, threads: int) -> None: ...

class DecodeJob:
    def wait(self) -> None: ...

def planes_decode_chunks_start(
    chunks: int,
    n: int,
    streams: int,
    runs: int,
    ptrs: int,
    lens: int,
    hashes: int,
    threads: int,
    keep: object,
) -> DecodeJob: ...

class DecodeBuffer:  # the buffer protocol: torch.frombuffer takes it
    ...

def decode_buffer(nbytes: int) -> DecodeBuffer: ...
def decode_buffer_cache(limit: int = -1) -> tuple[int, int, int]: ...
