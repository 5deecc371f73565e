"""Image models for the benchmark: a base network trained on small digit images,
then many fine-tuned copies of it (one per task), saved and recovered as a set.

Everything runs on the CPU in seconds to minutes and downloads nothing:

* models: ResNet-18, ResNet-50 and MobileNetV2, from torchvision when it imports
  and builds, else this module's own definitions, whose ``state_dict()`` has
  torchvision's tensor names, shapes and order (:func:`check_param_counts`
  checks the parameter counts against torchvision's);
* data: scikit-learn's bundled 8x8 digits (1,797 images), upsampled to
  ``size`` x ``size``, 3 channels (:func:`digits`);
* tasks: task ``k`` is the digits rotated by a k-dependent angle with the ten
  labels permuted by a k-seeded permutation (:func:`task`);
* training: :func:`train_base` (all layers, from scratch), :func:`fine_tune`
  (``"head"``: only the classifier, the rest bit-identical to the base;
  ``"all"``: every layer), :func:`top1` (test accuracy).

Importing this module registers :func:`finetune_set` as the trainer
``"benchmarks.harness.vision.finetune"`` for mmcore's provenance path.

Randomness: the order of mini-batches comes from a ``torch.Generator`` seeded by
each function's ``seed``. Weight initialisation (torch's ``nn.init`` draws from
the global generator) and MobileNetV2's dropout also need seeding; they run
inside ``torch.random.fork_rng`` with ``torch.manual_seed(seed)``, so a call is
deterministic given its seed and the caller's global RNG state is restored after.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcore.provenance import trainer

ARCHS = ("resnet18", "resnet50", "mobilenet_v2")
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "mobilenet_v2": 3_504_872}
TRAINER = "benchmarks.harness.vision.finetune"
MODES = ("head", "all")
HEAD = {"resnet18": "fc", "resnet50": "fc", "mobilenet_v2": "classifier.1"}
SOURCE_TORCHVISION = "torchvision"
SOURCE_OWN = "own definition, parameter count checked"
NUM_CLASSES = 10
TRAIN_SIZE = 1_400  # of the 1,797 digits; the rest (397) is the test split
# default learning rates (SGD, momentum 0.9, batch 64, digits at 16-32 px): ResNet-50
# from scratch diverges at 0.05 (20% top-1 after 100 steps) but reaches 91% at 0.02
BASE_LR = {"resnet18": 0.05, "resnet50": 0.02, "mobilenet_v2": 0.05}
FINETUNE_LR = {"head": 0.05, "all": 0.02}
# all-layer fine-tunes of ResNet-50 at 0.02 collapsed to 38% top-1 (the full harness run)
_FINETUNE_ALL_LR = {"resnet50": 0.005}


def finetune_lr(arch: str, mode: str) -> float:
    """The default learning rate of a fine-tune: by mode, lower for ResNet-50's all layers."""
    return _FINETUNE_ALL_LR.get(arch, FINETUNE_LR[mode]) if mode == "all" else FINETUNE_LR[mode]


_TASK_SEED = 7_919
_EVAL_BATCH = 256


# ---------------------------------------------------------------------------
# Models: torchvision's architectures, written out here
# ---------------------------------------------------------------------------


class _BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convolutions, identity (or projection) shortcut."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: Tensor = self.relu(out + shortcut)
        return result


class _Bottleneck(nn.Module):
    """ResNet-50 block (v1.5: the stride on the 3x3 convolution): 1x1 reduce,
    3x3, 1x1 expand by 4, identity (or projection) shortcut."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        result: Tensor = self.relu(out + shortcut)
        return result


class _ResNet(nn.Module):
    def __init__(
        self,
        block: type[_BasicBlock] | type[_Bottleneck],
        depths: tuple[int, int, int, int],
        num_classes: int,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(block, 64, depths[0], 1)
        self.layer2 = self._stage(block, 128, depths[1], 2)
        self.layer3 = self._stage(block, 256, depths[2], 2)
        self.layer4 = self._stage(block, 512, depths[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stage(
        self, block: type[_BasicBlock] | type[_Bottleneck], planes: int, depth: int, stride: int
    ) -> nn.Sequential:
        width = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != width:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, width, 1, stride, bias=False), nn.BatchNorm2d(width)
            )
        blocks: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = width
        blocks += [block(width, planes, 1, None) for _ in range(1, depth)]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        out: Tensor = self.fc(torch.flatten(self.avgpool(x), 1))
        return out


def _conv_bn_relu6(inp: int, out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:  # fmt: skip
    """torchvision's ``Conv2dNormActivation``: conv (no bias), batch norm, ReLU6."""
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class _InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (unless t == 1), 3x3 depthwise, 1x1 linear
    projection; a residual connection where shape allows."""

    def __init__(self, inp: int, oup: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = round(inp * expand)
        self.use_residual = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu6(inp, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.conv(x)
        return x + out if self.use_residual else out


# (expansion t, output channels c, repeats n, first stride s), width multiplier 1
_MOBILENET_V2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class _MobileNetV2(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        channels = 32
        features: list[nn.Module] = [_conv_bn_relu6(3, channels, 3, 2)]
        for t, c, n, s in _MOBILENET_V2_STAGES:
            for i in range(n):
                features.append(_InvertedResidual(channels, c, s if i == 0 else 1, t))
                channels = c
        features.append(_conv_bn_relu6(channels, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        out: Tensor = self.classifier(torch.flatten(x, 1))
        return out


def resnet18(num_classes: int) -> nn.Module:
    """ResNet-18 with torchvision's state dict layout (``conv1.weight`` ... ``fc.bias``)."""
    return _ResNet(_BasicBlock, (2, 2, 2, 2), num_classes)


def resnet50(num_classes: int) -> nn.Module:
    """ResNet-50 (v1.5) with torchvision's state dict layout."""
    return _ResNet(_Bottleneck, (3, 4, 6, 3), num_classes)


def mobilenet_v2(num_classes: int) -> nn.Module:
    """MobileNetV2 (width 1.0) with torchvision's state dict layout
    (``features.0.0.weight`` ... ``classifier.1.bias``)."""
    return _MobileNetV2(num_classes)


_OWN: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
}


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHS)}")


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_param_counts() -> dict[str, int]:
    """Builds each own definition with 1000 classes; its parameter count must be
    torchvision's (``TORCHVISION_PARAMS``). Returns the counts."""
    counts: dict[str, int] = {}
    for arch in ARCHS:
        counts[arch] = param_count(_OWN[arch](1000))
        if counts[arch] != TORCHVISION_PARAMS[arch]:
            raise AssertionError(
                f"{arch}: {counts[arch]:,} parameters, torchvision's has "
                f"{TORCHVISION_PARAMS[arch]:,}"
            )
    return counts


def build(arch: str, num_classes: int = NUM_CLASSES) -> tuple[nn.Module, str]:
    """``(model, source)``: ``torchvision.models.<arch>(weights=None, num_classes=...)``
    where torchvision imports and builds it, else this module's own definition."""
    _check_arch(arch)
    try:
        models = importlib.import_module("torchvision.models")
        model = getattr(models, arch)(weights=None, num_classes=num_classes)
        if isinstance(model, nn.Module):
            return model, SOURCE_TORCHVISION
    except Exception:  # not installed, or built for another torch
        pass
    return _OWN[arch](num_classes), SOURCE_OWN


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Digits:
    """Images ``(n, 3, size, size)`` float32, labels ``(n,)`` int64."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


def digits(size: int = 32, seed: int = 0) -> Digits:
    """scikit-learn's 1,797 8x8 digits (bundled, no download): scaled to [0, 1],
    resized bilinearly to ``size`` x ``size``, repeated to 3 channels, normalised
    by the train split's mean and std. The split is stratified: each class gives
    its share of ``TRAIN_SIZE`` (1,400) to train, chosen by a ``seed``-ed
    permutation; the rest (~397) is the test split."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    datasets = importlib.import_module("sklearn.datasets")
    bunch = datasets.load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0).expand(-1, 3, -1, -1)
    g = torch.Generator().manual_seed(seed)
    train: list[Tensor] = []
    test: list[Tensor] = []
    for c in range(NUM_CLASSES):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = round(len(idx) * TRAIN_SIZE / len(y))
        train.append(idx[:cut])
        test.append(idx[cut:])
    tr = torch.cat(train)
    tr = tr[torch.randperm(len(tr), generator=g)]
    te = torch.cat(test).sort().values
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return Digits(x[tr].contiguous(), y[tr].contiguous(), x[te].contiguous(), y[te].contiguous())


def task_transform(k: int) -> tuple[float, Tensor]:
    """Task ``k``'s ``(angle in degrees, label permutation)``; k = 0: (0, identity)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"task index k must be an int >= 0, got {k!r}")
    if k == 0:
        return 0.0, torch.arange(NUM_CLASSES)
    angle = float((-1) ** k * 5 * (1 + (k - 1) % 4))  # -5, +10, -15, +20, -5, ...
    perm = torch.randperm(NUM_CLASSES, generator=torch.Generator().manual_seed(_TASK_SEED + k))
    return angle, perm


def task(data: Digits, k: int) -> Digits:
    """The k-th fine-tuning task. k = 0: ``data`` itself (the base task). k > 0:
    every image (train and test) rotated about its centre by ``angle_k`` degrees
    (-5, +10, -15, +20, then repeating, with sign (-1)**k), background kept, and
    every label ``y`` replaced by ``perm_k[y]``, ``perm_k`` a fixed permutation
    of the ten labels drawn from a generator seeded by k (see
    :func:`task_transform`). A classifier must relearn which output is which digit
    (the head alone can) and adapt to the rotation (easier with all layers)."""
    angle, perm = task_transform(k)
    if k == 0:
        return data
    background = torch.minimum(data.train_x.amin(), data.test_x.amin())
    return Digits(
        _rotate(data.train_x, angle, background),
        perm[data.train_y],
        _rotate(data.test_x, angle, background),
        perm[data.test_y],
    )


def _rotate(x: Tensor, degrees: float, background: Tensor) -> Tensor:
    a = math.radians(degrees)
    theta = torch.tensor(
        [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]],
        dtype=x.dtype,
        device=x.device,
    ).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x - background, grid, mode="bilinear", align_corners=False)
    return (out + background).contiguous()


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global generator seeded for weight init and dropout, restored after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """``steps`` index batches: epochs of seeded permutations cut into full batches
    (a last partial batch of an epoch is dropped)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2, got {batch_size!r}")
    if n < 2:
        raise ValueError(f"need at least 2 training examples, got {n}")
    size = min(batch_size, n)
    g = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        for start in range(0, n - size + 1, size):
            out.append(perm[start : start + size])
            if len(out) == steps:
                break
    return out


def _sgd_steps(
    model: nn.Module, params: list[nn.Parameter], x: Tensor, y: Tensor, batches: list[Tensor], lr: float
) -> None:  # fmt: skip
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    for idx in batches:
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(F.cross_entropy(model(x[idx]), y[idx]))
        opt.step()


def _state(model: nn.Module, order: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    sd = model.state_dict()
    keys = list(order) if order is not None else list(sd)
    return {k: sd[k].detach().clone(memory_format=torch.contiguous_format) for k in keys}


def train_base(
    arch: str,
    data: Digits,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """A ``NUM_CLASSES``-way ``arch`` trained from scratch on ``data.train_*``: all
    layers, SGD (momentum 0.9, constant ``lr``, default ``BASE_LR[arch]``),
    ``steps`` mini-batches, cross entropy. Returns the state dict (detached,
    contiguous clones)."""
    _check_arch(arch)
    lr = BASE_LR[arch] if lr is None else lr
    device = data.train_x.device
    with _seeded(seed, device):
        model, _ = build(arch, NUM_CLASSES)
        model.to(device).train()
        batches = _batches(len(data.train_y), batch_size, steps, seed)
        _sgd_steps(model, list(model.parameters()), data.train_x, data.train_y, batches, lr)
    return _state(model)


def _bits(t: Tensor) -> Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same_bits(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` have the same dtype, shape and bytes."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and bool(torch.equal(_bits(a).cpu(), _bits(b).cpu()))
    )


def _fine_tune(
    arch: str,
    base: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    mode: str,
    steps: int,
    batch_size: int,
    lr: float | None,
    seed: int,
) -> dict[str, Tensor]:
    _check_arch(arch)
    if mode not in MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; valid: {', '.join(MODES)}")
    lr = finetune_lr(arch, mode) if lr is None else lr
    head = HEAD[arch]
    num_classes = base[f"{head}.weight"].shape[0]
    device = base[f"{head}.weight"].device
    x = x.to(device=device, dtype=torch.float32)
    y = y.to(device=device, dtype=torch.int64)
    batches = _batches(len(y), batch_size, steps, seed)
    with _seeded(seed, device):
        model, _ = build(arch, num_classes)
        model.to(device)
        model.load_state_dict(base)
        if mode == "all":
            model.train()
            _sgd_steps(model, list(model.parameters()), x, y, batches, lr)
            return _state(model, base)
        # Frozen backbone in eval mode: BN statistics stay; only the head trains,
        # on the backbone's features of the examples the batches use, computed once.
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        fc = model.get_submodule(head)
        params = list(fc.parameters())
        for p in params:
            p.requires_grad_(True)
        used = torch.unique(torch.cat(batches)) if batches else torch.empty(0, dtype=torch.int64)
        feats = _features(model, fc, x[used.to(device)])
        where = torch.full((len(y),), -1, dtype=torch.int64)
        where[used] = torch.arange(len(used))
        local = [where[idx].to(device) for idx in batches]
        _sgd_steps(fc, params, feats, y[used.to(device)], local, lr)
    out = _state(model, base)
    frozen = (f"{head}.weight", f"{head}.bias")
    changed = [k for k in base if k not in frozen and not same_bits(out[k], base[k])]
    assert not changed, f"head fine-tuning changed backbone tensors, e.g. {changed[0]!r}"
    return out


def _features(model: nn.Module, head: nn.Module, x: Tensor) -> Tensor:
    """The input of ``head`` for each row of ``x`` (model in eval mode, no grad)."""
    got: list[Tensor] = []

    def grab(_: nn.Module, args: tuple[Tensor, ...]) -> None:
        got.append(args[0].detach().clone())

    hook = head.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            for start in range(0, len(x), _EVAL_BATCH):
                model(x[start : start + _EVAL_BATCH])
    finally:
        hook.remove()
    if not got:
        return x.new_zeros((0, head.in_features if isinstance(head, nn.Linear) else 0))
    return torch.cat(got)


def fine_tune(
    arch: str,
    base: Mapping[str, Tensor],
    data: Digits,
    *,
    mode: str,
    steps: int,
    batch_size: int = 64,
    lr: float | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """``base`` fine-tuned on ``data.train_*`` (SGD, momentum 0.9, constant ``lr``,
    default ``finetune_lr(arch, mode)``, ``steps`` mini-batches). ``mode="head"``: only the classifier (``fc`` /
    ``classifier.1``) trains, the model in eval mode (BatchNorm statistics and
    dropout fixed); every other tensor comes back bit-identical to ``base``'s
    (asserted). ``mode="all"``: every layer trains, in train mode (BatchNorm
    statistics update). Returns a new state dict, keys in ``base``'s order."""
    return _fine_tune(
        arch, base, data.train_x, data.train_y,
        mode=mode, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
    )  # fmt: skip


def top1(arch: str, state: Mapping[str, Tensor], data: Digits) -> float:
    """Top-1 accuracy in percent on ``data.test_x`` / ``data.test_y`` (eval mode)."""
    _check_arch(arch)
    head = HEAD[arch]
    device = state[f"{head}.weight"].device
    model, _ = build(arch, state[f"{head}.weight"].shape[0])
    model.to(device)
    model.load_state_dict(state)
    model.eval()
    x, y = data.test_x.to(device), data.test_y.to(device)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), _EVAL_BATCH):
            logits = model(x[start : start + _EVAL_BATCH])
            correct += int((logits.argmax(1) == y[start : start + _EVAL_BATCH]).sum())
    return 100.0 * correct / max(len(y), 1)


@trainer(TRAINER)
def finetune_set(models: Mapping[str, Mapping[str, Tensor]], data: Mapping[str, Mapping[str, Tensor]],
                 *, seed: int, arch: str, mode: str, steps: int, lr: float, batch_size: int = 64,
                 ) -> dict[str, dict[str, Tensor]]:  # fmt: skip
    """Fine-tunes each model on its own data ``{"x": images (n, 3, s, s), "y":
    labels (n,) int64}`` as :func:`fine_tune` does (``mode`` "head" or "all").
    Each model is trained alone with the same ``seed``, so its result does not
    depend on which other models are in the call; deterministic given inputs."""
    out: dict[str, dict[str, Tensor]] = {}
    for name, base in models.items():
        d = data[name]
        out[name] = _fine_tune(
            arch, base, d["x"], d["y"],
            mode=mode, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
        )  # fmt: skip
    return out


def family(
    arch: str, count: int, *, modes: Sequence[tuple[str, int]], base_steps: int,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[dict[str, Tensor], list[dict[str, dict[str, Tensor]]]]:  # fmt: skip
    """A base ``arch`` trained on digits, and per (mode, steps) of ``modes`` ``count``
    fine-tunes of it (``ft_00`` ...), one task each: the benchmarks' fine-tune families."""
    data = digits(size=32, seed=0)
    log(f"training the {arch} base ({base_steps} steps) ...")
    base = train_base(arch, data, steps=base_steps, seed=0)
    sets = []
    for mode, steps in modes:
        tunes = {}
        for k in range(count):
            log(f"  fine-tune ft_{k:02d}, {'head only' if mode == 'head' else 'all layers'} "
                f"({steps} steps) ...")  # fmt: skip
            tunes[f"ft_{k:02d}"] = fine_tune(arch, base, task(data, k), mode=mode, steps=steps,
                                             seed=k)  # fmt: skip
        sets.append(tunes)
    return base, sets
