"""Delta encodings: exact inversion of xor-planes, the quantized error bound, and
native bytes identical to the pure-torch reference."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_bit_equal
from hypothesis import given, settings
from hypothesis import strategies as st

from mmcore import dtypes, kernels
from mmcore.errors import InvalidArgumentError
from mmcore.kernels import delta, reference

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _random_bits(dtype: torch.dtype, numel: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, (numel,), generator=g).bool()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype)


@pytest.mark.parametrize("name", sorted(dtypes.BY_NAME))
def test_xor_planes_inverts_exactly_and_matches_reference(name: str) -> None:
    dtype = dtypes.BY_NAME[name]
    news = [_random_bits(dtype, n, seed=n) for n in (0, 1, 7, 1000)]
    parents = [_random_bits(dtype, n, seed=n + 1) for n in (0, 1, 7, 1000)]
    parents[3][:500] = news[3][:500]  # half unchanged
    encoded, changed = delta.xor_planes_encode(news, parents)
    for e, a, b, c in zip(encoded, news, parents, changed.tolist()):
        planes, ref_changed = reference.xor_planes_encode(a, b)
        assert torch.equal(e[delta.XOR_HEADER.size :], planes)
        assert c == ref_changed
    for got, want in zip(delta.xor_planes_decode(encoded, parents), news):
        assert_bit_equal(got, want)


def test_xor_planes_table_api_matches_reference_with_headers_and_hashes() -> None:
    """The address-table entry point: every dtype width in one call, headers written
    vectorised, planes and fused hashes equal to the reference and the blake3 package."""
    import blake3

    from mmcore.kernels.xor_planes import xor_planes_encode_table

    pairs = [(_random_bits(dtypes.BY_NAME[name], n, seed=i), _random_bits(dtypes.BY_NAME[name], n, seed=i + 50))
             for i, (name, n) in enumerate((("float32", 300), ("int8", 0), ("float16", 1),
                                            ("complex128", 17), ("bool", 1025), ("int64", 2000)))]  # fmt: skip
    news = [a for a, _ in pairs]
    parents = [b for _, b in pairs]
    parents[5][:1000] = news[5][:1000]
    nbytes = kernels.int64_table([a.numel() * a.element_size() for a in news])
    widths = kernels.int64_table([delta.plane_width(a.dtype) for a in news])
    table = xor_planes_encode_table(kernels.int64_table([a.data_ptr() for a in news]),
                                    kernels.int64_table([b.data_ptr() for b in parents]), nbytes, widths,
                                    hashed=True)  # fmt: skip
    views = table.views()
    assert table.offsets.tolist()[-1] == table.buf.numel() == int(nbytes.sum()) + 16 * len(news)
    for i, (a, b) in enumerate(pairs):
        planes, ref_changed = reference.xor_planes_encode(a, b)
        head = delta.XOR_HEADER.pack(
            1, delta.XOR_PLANES, delta.plane_width(a.dtype), 0, 0, a.numel() * a.element_size()
        )
        assert kernels.tensor_bytes(views[i][:16]) == head
        assert torch.equal(views[i][16:], planes)
        assert int(table.changed[i]) == ref_changed
        assert (
            kernels.tensor_bytes(table.hashes[i]) == blake3.blake3(kernels.tensor_bytes(a)).digest()
        )
    for got, want in zip(delta.xor_planes_decode(list(views), parents), news):
        assert_bit_equal(got, want)


def test_xor_planes_table_api_refuses_bad_tables() -> None:
    from mmcore.kernels.xor_planes import xor_planes_encode_table

    a = torch.zeros(6, dtype=torch.int16)
    p = kernels.int64_table([a.data_ptr()])
    ok = (p, p, kernels.int64_table([12]), kernels.int64_table([2]))
    assert xor_planes_encode_table(*ok).buf.numel() == 28
    staging = torch.full((40,), 7, dtype=torch.uint8)
    into = xor_planes_encode_table(*ok, out=staging)
    assert into.buf.data_ptr() == staging.data_ptr() and into.buf.numel() == 28
    assert torch.equal(into.buf, xor_planes_encode_table(*ok).buf) and staging[28:].eq(7).all()
    with pytest.raises(
        InvalidArgumentError, match="out must be a contiguous CPU uint8 tensor of at least 28"
    ):
        xor_planes_encode_table(*ok, out=torch.empty(27, dtype=torch.uint8))
    with pytest.raises(InvalidArgumentError, match=r"widths must be 1, 2, 4 or 8"):
        xor_planes_encode_table(p, p, kernels.int64_table([12]), kernels.int64_table([3]))
    with pytest.raises(
        InvalidArgumentError, match=r"segment 0: 12 bytes is not a whole number of 8-byte"
    ):
        xor_planes_encode_table(p, p, kernels.int64_table([12]), kernels.int64_table([8]))
    with pytest.raises(InvalidArgumentError, match="a segment with bytes has a null address"):
        xor_planes_encode_table(p, kernels.int64_table([0]), *ok[2:])
    with pytest.raises(InvalidArgumentError, match="nbytes must not be negative"):
        xor_planes_encode_table(p, p, kernels.int64_table([-2]), kernels.int64_table([2]))
    with pytest.raises(
        InvalidArgumentError, match=r"parent_ptrs must be an int64 tensor of shape \(1,\)"
    ):
        xor_planes_encode_table(p, p.to(torch.int32), *ok[2:])
    with pytest.raises(
        InvalidArgumentError, match=r"nbytes must be an int64 tensor of shape \(1,\)"
    ):
        xor_planes_encode_table(p, p, kernels.int64_table([12, 12]), ok[3])


def test_xor_planes_groups_sign_and_exponent_bytes() -> None:
    parent = torch.randn(4096)
    new = parent + torch.randn(4096) * 1e-6
    (enc,), _ = delta.xor_planes_encode([new], [parent])
    planes = enc[delta.XOR_HEADER.size :].reshape(4, -1)
    assert (planes[3] == 0).float().mean() > 0.95  # sign + high exponent bits barely change
    assert (planes[0] == 0).float().mean() < 0.1  # low mantissa bytes change everywhere


@st.composite
def float_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, float]:
    dtype = draw(st.sampled_from(FLOATS))
    tol = draw(st.sampled_from([1e-7, 1e-5, 1e-3, 0.1, 3.0, 1e4]))
    n = draw(st.integers(0, 64))
    finite = {torch.float16: 6e4, torch.bfloat16: 1e38, torch.float32: 3e38, torch.float64: 1e300}[
        dtype
    ]
    values = st.floats(-finite, finite, allow_subnormal=True, width=64) | st.sampled_from(
        [math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, finite]
    )
    parent = torch.tensor(draw(st.lists(values, min_size=n, max_size=n)), dtype=torch.float64).to(
        dtype
    )
    steps = st.integers(-(10**6), 10**6).map(
        lambda k: k + draw(st.sampled_from([0.0, 0.5, -0.5, 0.25]))
    )
    kinds = draw(st.lists(st.sampled_from(["near", "far", "same"]), min_size=n, max_size=n))
    new = parent.to(torch.float64).clone()
    for i, kind in enumerate(kinds):
        if kind == "near":
            new[i] = new[i] + draw(steps) * 2 * tol
        elif kind == "far":
            new[i] = draw(values)
    return new.to(dtype), parent, tol


def _check_bound(rec: torch.Tensor, new: torch.Tensor, tol: float) -> None:
    x = new.to(torch.float64)
    r = rec.to(torch.float64)
    finite = torch.isfinite(x)
    assert bool(reference.within(r[finite], x[finite], tol).all()), (
        (r[finite] - x[finite]).abs().max()
    )
    assert_bit_equal(rec[~finite], new[~finite])


@settings(max_examples=300, deadline=None)
@given(float_pairs())
def test_quantized_bound_holds_and_native_matches_reference(
    case: tuple[torch.Tensor, torch.Tensor, float],
) -> None:
    new, parent, tol = case
    (blob,), stats = delta.quantize_encode([new], [parent], tol)
    q, escaped, ref_stats = reference.quantize(new, parent, tol)
    ref_blob, _ = delta._frame(q, escaped, new, delta.FLOAT_KINDS[new.dtype], tol, ref_stats[0])
    assert torch.equal(blob, ref_blob)
    assert (int(stats.max_abs_q[0]), int(stats.escapes[0]), int(stats.changed[0])) == ref_stats[:3]
    assert float(stats.max_delta[0]) == ref_stats[3]
    (rec,) = delta.quantize_decode([blob], [parent])
    _check_bound(rec, new, tol)
    ref_rec = reference.dequantize_blob(
        blob, parent, blob[2].item(), tol, int(stats.escapes[0]), 32, delta._layout
    )
    assert_bit_equal(rec, ref_rec)


@pytest.mark.parametrize("dtype", FLOATS)
def test_adversarial_values(dtype: torch.dtype) -> None:
    info = torch.finfo(dtype)
    tol = 1e-3
    parent = torch.tensor([0.0, 1.0, -1.0, info.tiny, info.max, -info.max, 1e-3, 0.0, 2.0, info.smallest_normal / 4],
                          dtype=torch.float64).to(dtype)  # fmt: skip
    offsets = torch.tensor(
        [0.5, 1.5, -2.5, 1e-3, -1.0, 1.0, 1e6, 3 * tol, 1e-30, tol], dtype=torch.float64
    )
    new = (parent.to(torch.float64) + offsets * 2 * tol).to(dtype)
    (blob,), _ = delta.quantize_encode([new], [parent], tol)
    (rec,) = delta.quantize_decode([blob], [parent])
    _check_bound(rec, new, tol)


def test_closed_loop_error_does_not_accumulate() -> None:
    torch.manual_seed(0)
    tol = 1e-3
    truth = torch.randn(5000)
    recovered = truth.clone()
    for _ in range(30):
        truth = truth + torch.randn(5000) * 1e-2
        (blob,), _ = delta.quantize_encode([truth], [recovered], tol)
        (recovered,) = delta.quantize_decode([blob], [recovered])
        assert float((recovered.double() - truth.double()).abs().max()) <= tol


def test_width_follows_the_range() -> None:
    parent = torch.zeros(3)
    for scale, width in ((100.0, 1), (3e4, 2), (1e6, 4)):
        (blob,), _ = delta.quantize_encode([parent + scale * 2e-3], [parent], 1e-3)
        assert blob[2].item() == width


def test_validation() -> None:
    a, b = torch.randn(4), torch.randn(4)
    with pytest.raises(InvalidArgumentError, match=r"dtype torch\.float64 differs"):
        delta.xor_planes_encode([a.double()], [b])
    with pytest.raises(InvalidArgumentError, match=r"shape \(2, 2\) differs"):
        delta.xor_planes_encode([a.reshape(2, 2)], [b])
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        delta.xor_planes_encode([torch.randn(4, 4).t()], [torch.randn(4, 4)])
    with pytest.raises(InvalidArgumentError, match="1 new tensors but 2 parents"):
        delta.quantize_encode([a], [b, b], 1e-3)
    with pytest.raises(
        InvalidArgumentError,
        match=r"needs one of float16, bfloat16, float32, float64, got torch\.int32",
    ):
        delta.quantize_encode([a.int()], [b.int()], 1e-3)
    for bad in (0.0, -1.0, math.inf, math.nan, 1e308 * 10):
        with pytest.raises(InvalidArgumentError, match="tolerance must be a finite number > 0"):
            delta.quantize_encode([a], [b], bad)
    (blob,), _ = delta.quantize_encode([a], [b], 1e-3)
    with pytest.raises(InvalidArgumentError, match="parent does not match"):
        delta.quantize_decode([blob], [torch.randn(5)])
    with pytest.raises(InvalidArgumentError, match="not quantized v1"):
        delta.quantize_decode([torch.zeros(64, dtype=torch.uint8)], [b])
    (enc,), _ = delta.xor_planes_encode([a], [b])
    with pytest.raises(InvalidArgumentError, match="expected 32"):
        delta.xor_planes_decode([enc[:-1]], [b])


def test_xor_planes_large_segment_split_over_threads() -> None:
    g = torch.Generator().manual_seed(7)
    parent = torch.randn(3 << 20, generator=g)  # 12 MB: encoded in word ranges on every thread
    new = parent.clone()
    new[::3] += 1.0
    (enc,), changed = delta.xor_planes_encode([new], [parent])
    planes, ref_changed = reference.xor_planes_encode(new, parent)
    assert torch.equal(enc[delta.XOR_HEADER.size :], planes) and int(changed[0]) == ref_changed
    assert_bit_equal(delta.xor_planes_decode([enc], [parent])[0], new)


@pytest.mark.parametrize(("encoding", "tolerance"), [("xor-planes", None), ("quantized", 1e-3)])
def test_encode_against_skips_unchanged_segments(encoding: str, tolerance: float | None) -> None:
    g = torch.Generator().manual_seed(1)
    parent = [torch.randn(100, generator=g) for _ in range(6)]
    new = [p.clone() for p in parent]
    new[1] += 0.5
    new[4][3] = -new[4][3]
    batch = delta.encode_against(new, parent, encoding=encoding, tolerance=tolerance)
    assert batch.unchanged.tolist() == [True, False, True, True, False, True]
    assert [e is None for e in batch.encoded] == batch.unchanged.tolist()
    assert batch.changed.tolist() == [0, 100, 0, 0, 1, 0]
    assert torch.equal(batch.hashes, kernels.blake3_tensors(new))
    if encoding == "quantized":
        assert batch.max_delta[1].item() == pytest.approx(0.5, abs=1e-6)
        (rec,) = delta.quantize_decode([batch.encoded[1]], [parent[1]])
        _check_bound(rec, new[1], 1e-3)
    else:
        (rec,) = delta.xor_planes_decode([batch.encoded[4]], [parent[4]])
        assert_bit_equal(rec, new[4])
    with pytest.raises(InvalidArgumentError, match="tolerance is required"):
        delta.encode_against(new, parent, encoding="quantized")
    with pytest.raises(InvalidArgumentError, match="encoding must be"):
        delta.encode_against(new, parent, encoding="zip")


def test_fused_hash_and_xor_planes_match_the_separate_kernels() -> None:
    g = torch.Generator().manual_seed(11)
    sizes = [0, 1, 5, 255, 256, 257, 4096, 300_000, (3 << 20) + 3]
    dtypes_ = [torch.float32, torch.float16, torch.uint8, torch.float64, torch.int32, torch.bfloat16,
               torch.complex64, torch.float32, torch.float32]  # fmt: skip
    parent = [torch.randn(n, generator=g).to(d) if not d.is_complex else torch.randn(n, generator=g, dtype=d)
              for n, d in zip(sizes, dtypes_)]  # fmt: skip
    new = [p.clone() for p in parent]
    for t in new[::2]:
        if t.numel():
            t.view(torch.uint8)[::3] ^= 5
    encoded, changed, hashes = delta.xor_planes_encode_hashed(new, parent)
    want_encoded, want_changed = delta.xor_planes_encode(new, parent)
    assert torch.equal(hashes, kernels.blake3_tensors(new))
    assert torch.equal(changed, want_changed)
    for got, want in zip(encoded, want_encoded):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_quantized_zeros_keep_their_sign(dtype: torch.dtype) -> None:
    """A zero within tolerance of the parent still comes back as the same zero (-0.0 over
    a +0.0 or a nonzero parent is escaped), natively and in the reference alike."""
    new = torch.tensor([-0.0, 0.0, -0.0, 0.25], dtype=dtype)
    parent = torch.tensor([0.0, -0.0, 1e-3, 0.25], dtype=dtype)
    (enc,), _ = delta.quantize_encode([new], [parent], 0.5)
    (got,) = delta.quantize_decode([enc], [parent])
    assert_bit_equal(got, new)
    _, escaped, _ = reference.quantize(new, parent, 0.5)
    # +0.0 over a -0.0 parent needs no escape: -0.0 + 0 * step is +0.0 in IEEE arithmetic
    assert escaped.tolist() == [True, False, True, False]


def test_headers_of_device_encodings_cross_back_in_one_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Encodings on a GPU: their headers are packed there by one gather and copied back
    once, not one copy per encoding (80,000 synchronisations for a table of 80,000
    tensors). Run here with the device gather standing in on the CPU: the decodes give
    the same tensors, a bad header the same message, and the gather runs once a call."""
    from mmcore.kernels import _segments, cuda

    calls = []

    def gather_on_cpu(dst: torch.Tensor, addresses: list[int], lens: list[int]) -> None:
        calls.append(len(addresses))
        offsets = [sum(lens[:i]) for i in range(len(lens))]
        kernels.gather(dst, kernels.int64_table(addresses), kernels.int64_table(lens),
                       kernels.int64_table(offsets))  # fmt: skip

    g = torch.Generator().manual_seed(2)
    parents = [torch.randn(n, generator=g) for n in (1, 7, 300, 4096)]
    news = [p + 1e-3 * torch.randn(p.shape, generator=g) for p in parents]
    xor = delta.xor_planes_encode(news, parents)[0]
    quant = delta.quantize_encode(news, parents, 1e-2)[0]
    want = delta.quantize_decode(quant, parents)  # (the CPU's one gather)
    monkeypatch.setattr(_segments, "native_cuda", lambda device: True)
    monkeypatch.setattr(cuda, "gather_addresses", gather_on_cpu)
    for got, new in zip(delta.xor_planes_decode(xor, parents), news):
        assert_bit_equal(got, new)
    for got, w in zip(delta.quantize_decode(quant, parents), want):
        assert_bit_equal(got, w)
    assert calls == [4, 4]
    bad = [e.clone() for e in xor]
    bad[2][0] = 9  # the encoding version
    with pytest.raises(InvalidArgumentError, match="segment 2: encoding version 9"):
        delta.xor_planes_decode(bad, parents)
    bad = [e.clone() for e in quant]
    bad[3][1] = 1  # the xor-planes id
    with pytest.raises(InvalidArgumentError, match="segment 3: encoding version 1, id 1"):
        delta.quantize_decode(bad, parents)
