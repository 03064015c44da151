"""float32 CPU GEMMs of the model's linear layers and 1x1 convolutions through oneDNN.

Why: on CPU, ``F.linear`` / ``torch.mm`` in float32 go to the BLAS PyTorch was built with (MKL on
x86); oneDNN's matmul (shipped inside every x86 PyTorch build, the library behind its CPU
convolutions) can be much faster on non-Intel CPUs, where MKL may not take its widest code path.
One-thread 1x1 convolutions go to the same BLAS through PyTorch's THNN path.  How much faster
depends on the CPU: measure with ``python -m m2f.bench gemm`` (figures per CPU in
reports/bench/gemm_cpu*.json and reports/bench/NOTES.md).

What: :func:`linear` is ``F.linear`` computed by ``torch.ops.mkldnn._linear_pointwise`` (the
oneDNN linear op PyTorch's own CPU compiler emits), with an autograd function whose backward also
runs through it (input gradient ``g @ W``, weight gradient ``g^T @ x``; the op copies its first
operand contiguous, so the narrower of ``g^T`` and ``x^T`` goes first).  Same function in float32 up to summation order
(oneDNN accumulates in float32, no reduced-precision mode is enabled).  :func:`conv2d` routes 1x1,
stride-1, ungrouped convolutions of channels-last input to :func:`linear` on the [B*H*W, C] view
(no copies); a larger kernel whose output has at most :data:`IM2COL_MAX_ROWS` positions over the
batch (B * H_out * W_out; ResNet's last stage at small inputs) runs as one oneDNN GEMM on its
``F.unfold`` columns (measured on both ISAs: reports/bench/NOTES.md); everything else goes to
``F.conv2d``.

Backends: ``"reference"`` (``F.linear`` / ``F.conv2d``), ``"onednn"``, ``"auto"`` (oneDNN for
float32 CPU tensors outside autocast when the op is present and agrees with ``F.linear`` on a probe,
and the CPU is not an Intel one (:func:`auto_prefers_onednn`); else reference).  The vendor rule is
measured, not assumed (reports/bench/NOTES.md): on the 2-core AMD EPYC oneDNN made the R50 step 1.37x
faster than PyTorch's BLAS (MKL, which does not run its AVX-512 kernels on AMD CPUs), while on the
2-core Intel Xeon (AVX-512 + AMX) the tiny step was 5-9% slower with oneDNN than with MKL.  Under ``torch.jit.trace`` (fvcore's FLOP count) every backend runs the reference
ops, which tracers see into.  Double backward (``create_graph``) differentiates the plain expressions.

Modules: :class:`Linear` and :class:`Conv2d` are ``nn.Linear`` / ``nn.Conv2d`` (same parameters,
initialisation and state-dict keys) that take the backend as a constructor argument; the model
builder passes the config field ``gemm_backend`` down.  :func:`adopt_linear` wraps an existing
``nn.Linear`` (e.g. inside a third-party block) as a :class:`Linear` sharing its parameters.
Nothing here imports m2f.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "onednn", "reference")


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """oneDNN's linear op is built in, enabled, and equals ``F.linear`` on a probe (float32)."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            return False
        op = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=g) for s in ((37, 19), (11, 19), (11,)))
        y = op(x, w, b, "none", [], "")
        return bool(y.shape == (37, 11) and torch.allclose(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5))
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, ...; "" when unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return "GenuineIntel" if "Intel" in platform.processor() else ""


def auto_prefers_onednn() -> bool:
    """Whether ``auto`` picks oneDNN on this CPU: everywhere but on Intel CPUs, where PyTorch's MKL
    GEMMs were measured faster (see the module docstring)."""
    return cpu_vendor() != "GenuineIntel"


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"gemm_backend: {backend!r} is not a backend; valid choices: {list(BACKENDS)}")
    if backend == "onednn" and not onednn_available():
        raise ValueError("gemm_backend: 'onednn' asked for, but this PyTorch build has no working oneDNN "
                         "linear op (torch.ops.mkldnn._linear_pointwise); use 'auto' or 'reference'")
    return backend


def resolve_backend(backend: str, *tensors: Tensor) -> str:
    """The implementation ``backend`` runs for these tensors: "onednn" or "reference"."""
    if backend == "reference" or (backend == "auto" and not auto_prefers_onednn()):
        return "reference"
    ok = (all(t.device.type == "cpu" and t.dtype == torch.float32 and t.layout == torch.strided
              for t in tensors)
          and not torch.is_autocast_enabled("cpu") and onednn_available())
    return "onednn" if ok else "reference"


def resolve_for_device(backend: str, device: "torch.device | str", amp: bool = False) -> str:
    """What ``backend`` runs for a float32 model on ``device`` (under autocast if ``amp``), for records."""
    if (backend == "reference" or amp or torch.device(device).type != "cpu" or not onednn_available()
            or (backend == "auto" and not auto_prefers_onednn())):
        return "reference"
    return "onednn"


def _mm_nt(a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """a [M, K] @ b[N, K]^T (+ bias [N]) through oneDNN (strided operands accepted)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def _weight_grad(g: Tensor, x: Tensor) -> Tensor:
    """g [M, N]^T @ x [M, K] -> [N, K] through oneDNN, which copies its first operand contiguous:
    the narrower of g^T and x^T goes first."""
    return _mm_nt(g.t(), x.t()) if g.shape[1] <= x.shape[1] else _mm_nt(x.t(), g.t()).t().contiguous()


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:  # x [M, K]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _mm_nt(x, weight, bias)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        if torch.is_grad_enabled():  # create_graph: plain differentiable ops
            gx = g @ weight if need_x else None
            gw = g.t() @ x if need_w else None
        else:
            if g.stride(-1) != 1:
                g = g.contiguous()
            if need_x:
                gx = _mm_nt(g, weight.t())  # g @ W
            if need_w:
                gw = _weight_grad(g, x)
        if need_b and ctx.has_bias:
            gb = g.sum(0)
        return gx, gw, gb


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """``F.linear(x, weight, bias)``; x [..., K], weight [N, K] -> [..., N]."""
    if (torch.jit.is_tracing() or x.numel() == 0
            or resolve_backend(backend, x, weight, *(() if bias is None else (bias,))) == "reference"):
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    out = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*lead, weight.shape[0])


def bmm_nt(a: Tensor, b: Tensor, backend: str = "auto") -> Tensor:
    """``torch.bmm(a, b.transpose(1, 2))``: a [B, M, K], b [B, N, K] -> [B, M, N] (strided operands
    accepted), one oneDNN product per batch element when ``backend`` resolves to it.  No autograd:
    for use inside autograd functions' forward and backward."""
    if torch.jit.is_tracing() or a.numel() == 0 or b.numel() == 0 or resolve_backend(backend, a, b) == "reference":
        return torch.bmm(a, b.transpose(1, 2))
    if a.shape[0] == 1:
        return _mm_nt(a[0], b[0]).unsqueeze(0)
    return torch.stack([_mm_nt(x, y) for x, y in zip(a, b)])


def _is_pointwise(weight: Tensor, stride, padding, dilation, groups: int) -> bool:
    def ones(v):
        return all(int(s) == 1 for s in (v if isinstance(v, (tuple, list)) else (v, v)))

    def zeros(v):
        return not isinstance(v, str) and all(int(s) == 0 for s in (v if isinstance(v, (tuple, list)) else (v, v)))

    return weight.shape[-2:] == (1, 1) and groups == 1 and ones(stride) and ones(dilation) and zeros(padding)


# B * H_out * W_out up to which a k x k convolution runs as unfold + one GEMM (python -m m2f.bench gemm
# --conv measures the crossover; it was 64-128 rows with AVX-512 and with AVX2 only).
IM2COL_MAX_ROWS = 64


def _pair(v) -> tuple:
    return tuple(int(s) for s in v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _im2col_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, backend: str) -> Tensor:
    """``F.conv2d`` (groups 1, dilation 1) as ``F.unfold`` + :func:`linear`: channels-last output."""
    B, _, H, W = x.shape
    O, _, kh, kw = weight.shape
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    cols = F.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw))  # [B, C*kh*kw, Ho*Wo]
    y = linear(cols.transpose(1, 2), weight.reshape(O, -1), bias, backend)  # [B, Ho*Wo, O]
    return y.view(B, Ho, Wo, O).permute(0, 3, 1, 2)


def _im2col_applies(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> bool:
    if groups != 1 or isinstance(padding, str) or _pair(dilation) != (1, 1) or weight.shape[-2:] == (1, 1):
        return False
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    kh, kw = weight.shape[-2:]
    rows = x.shape[0] * ((x.shape[2] + 2 * ph - kh) // sh + 1) * ((x.shape[3] + 2 * pw - kw) // sw + 1)
    return 0 < rows <= IM2COL_MAX_ROWS


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: Union[int, Sequence[int]] = 1,
           padding: Union[int, Sequence[int], str] = 0, dilation: Union[int, Sequence[int]] = 1, groups: int = 1,
           backend: str = "auto") -> Tensor:
    """``F.conv2d``; a 1x1 stride-1 convolution of channels-last input [B, C, H, W] runs as
    :func:`linear` on its [B*H*W, C] view and returns channels-last output (no copies); a k x k one
    with at most :data:`IM2COL_MAX_ROWS` output positions as unfold + :func:`linear`."""
    if (backend != "reference" and not torch.jit.is_tracing() and x.dim() == 4
            and _is_pointwise(weight, stride, padding, dilation, groups)
            and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)
            and resolve_backend(backend, x, weight) == "onednn"):
        B, _, H, W = x.shape
        y = linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias, backend)  # [B, H, W, C_out]
        return y.permute(0, 3, 1, 2)
    if (backend != "reference" and not torch.jit.is_tracing() and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and _im2col_applies(x, weight, stride, padding, dilation, groups)
            and resolve_backend(backend, x, weight) == "onednn"):
        return _im2col_conv(x, weight, bias, stride, padding, backend)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class Linear(nn.Linear):
    """``nn.Linear`` whose product runs through ``backend`` (:func:`linear`); same parameters, init and keys."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.backend = check_backend(backend)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` computed by :func:`conv2d` with ``backend`` (zero padding); same parameters, init and keys."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = check_backend(backend)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            return super().forward(x)
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups, self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


def adopt_linear(module: nn.Linear, backend: str) -> Linear:
    """A :class:`Linear` sharing ``module``'s parameters (the same Parameter objects; nothing is drawn
    from the RNG), for blocks built by third-party code (timm's attention and MLP layers)."""
    new = torch.nn.utils.skip_init(Linear, module.in_features, module.out_features, module.bias is not None,
                                   backend=backend, device="meta")
    new.weight = module.weight
    new.bias = module.bias
    return new
