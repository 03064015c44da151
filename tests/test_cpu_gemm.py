"""m2f_kernels/cpu_gemm.py: float32 CPU linear layers and 1x1 convolutions through oneDNN, against
F.linear / F.conv2d (values, gradients, layouts, fallbacks) and in the model."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from m2f_kernels import cpu_gemm
from m2f_kernels.cpu_gemm import Conv2d, Linear, adopt_linear, conv2d, linear, onednn_available

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN linear op")


_REAL_CPU_VENDOR = cpu_gemm.cpu_vendor


@pytest.fixture(autouse=True)
def _auto_is_onednn(monkeypatch):
    """These tests check what `auto` runs where it picks oneDNN (every CPU but Intel's); the vendor
    rule itself is tested in test_auto_follows_the_measured_vendor_rule."""
    monkeypatch.setattr(cpu_gemm, "cpu_vendor", lambda: "AuthenticAMD")


def test_auto_follows_the_measured_vendor_rule(monkeypatch):
    x, w = torch.randn(5, 8), torch.randn(3, 8)
    monkeypatch.setattr(cpu_gemm, "cpu_vendor", lambda: "GenuineIntel")
    assert cpu_gemm.resolve_backend("auto", x, w) == "reference"
    assert cpu_gemm.resolve_for_device("auto", "cpu") == "reference"
    if onednn_available():
        assert cpu_gemm.resolve_backend("onednn", x, w) == "onednn"  # asked for by name: still oneDNN
        monkeypatch.setattr(cpu_gemm, "cpu_vendor", lambda: "AuthenticAMD")
        assert cpu_gemm.resolve_backend("auto", x, w) == "onednn"
        assert cpu_gemm.resolve_for_device("auto", "cpu") == "onednn"


def test_cpu_vendor_reads_proc_cpuinfo():
    v = _REAL_CPU_VENDOR.__wrapped__()  # uncached, unpatched
    try:
        with open("/proc/cpuinfo") as f:
            want = next((l.split(":", 1)[1].strip() for l in f if l.startswith("vendor_id")), None)
    except OSError:
        want = None
    assert v == want if want is not None else isinstance(v, str)


def _count_onednn_calls(monkeypatch):
    calls = []
    real = cpu_gemm._mm_nt

    def spy(*a, **k):
        calls.append(tuple(a[0].shape))
        return real(*a, **k)

    monkeypatch.setattr(cpu_gemm, "_mm_nt", spy)
    return calls


@needs_onednn
@pytest.mark.parametrize("shape,k,n,bias", [((37, 19), 19, 11, True), ((2, 5, 160), 160, 33, False),
                                            ((300, 256), 256, 1024, True), ((300, 1024), 1024, 64, True)])
def test_linear_equals_f_linear_values_and_gradients(monkeypatch, shape, k, n, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, requires_grad=True)
    w = torch.randn(n, k, generator=g, requires_grad=True)
    b = torch.randn(n, generator=g, requires_grad=True) if bias else None
    calls = _count_onednn_calls(monkeypatch)
    out = linear(x, w, b, "onednn")
    ref = F.linear(x, w, b)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)  # float32 rounding of K-term sums
    go = torch.randn(ref.shape, generator=g)
    inputs = [t for t in (x, w, b) if t is not None]
    for a, r in zip(torch.autograd.grad(out, inputs, go), torch.autograd.grad(ref, inputs, go)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)
    assert len(calls) == 3  # forward, input gradient, weight gradient


@needs_onednn
def test_linear_non_contiguous_input_partial_grads_and_double_backward():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 7, 150, generator=g)[:, 2]  # [40, 150], rows strided
    w = torch.randn(20, 150, generator=g, requires_grad=True)
    out = linear(x, w, None, "onednn")
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)
    (gw,) = torch.autograd.grad(out.square().sum(), w)  # x needs no gradient
    (rw,) = torch.autograd.grad(F.linear(x, w).square().sum(), w)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-3)
    # create_graph: second-order terms as F.linear's
    xg = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(linear(xg, w, None, "onednn").square().sum(), xg, create_graph=True)
    (rx,) = torch.autograd.grad(F.linear(xg, w).square().sum(), xg, create_graph=True)
    (ggw,) = torch.autograd.grad(gx.sum(), w)
    (rgw,) = torch.autograd.grad(rx.sum(), w)
    torch.testing.assert_close(ggw, rgw, rtol=1e-4, atol=1e-3)


def test_fallbacks_to_reference(monkeypatch):
    calls = _count_onednn_calls(monkeypatch)
    x64, w64 = torch.randn(5, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(linear(x64, w64, None, "auto"), F.linear(x64, w64))  # float64: reference
    x, w = torch.randn(5, 8), torch.randn(3, 8)
    assert torch.equal(linear(x, w, None, "reference"), F.linear(x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtype: reference
        assert linear(x, w, None, "auto").dtype == torch.bfloat16
    assert linear(torch.randn(0, 8), w, None, "auto").shape == (0, 3)
    assert calls == []
    monkeypatch.setattr(cpu_gemm, "onednn_available", lambda: False)
    assert cpu_gemm.resolve_for_device("auto", "cpu") == "reference"
    with pytest.raises(ValueError, match="gemm_backend: 'onednn'"):
        cpu_gemm.check_backend("onednn")
    with pytest.raises(ValueError, match="valid choices"):
        cpu_gemm.check_backend("mkl")


@needs_onednn
def test_pointwise_conv_of_channels_last_input_runs_as_linear(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 160, 6, 9, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(24, 160, 1, 1, generator=g, requires_grad=True)
    b = torch.randn(24, generator=g, requires_grad=True)
    calls = _count_onednn_calls(monkeypatch)
    out = conv2d(x, w, b, backend="auto")
    ref = F.conv2d(x, w, b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    go = torch.randn(ref.shape, generator=g)
    for a, r in zip(torch.autograd.grad(out, (x, w, b), go), torch.autograd.grad(ref, (x, w, b), go)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)
    assert len(calls) == 3
    # NCHW input, a 3x3 kernel, a stride: F.conv2d, unchanged
    calls.clear()
    xn = x.detach().contiguous()
    assert torch.equal(conv2d(xn, w, b, backend="auto"), F.conv2d(xn, w, b))
    w3 = torch.randn(4, 160, 3, 3, generator=g)
    assert torch.equal(conv2d(x, w3, None, 1, 1, backend="auto"), F.conv2d(x, w3, None, 1, 1))
    assert torch.equal(conv2d(x, w, b, 2, backend="auto"), F.conv2d(x, w, b, 2))
    assert calls == []


def test_gemm_modules_take_the_backend_at_construction_with_nn_init_and_keys():
    """Linear / Conv2d are nn.Linear / nn.Conv2d with the same initialisation (same RNG draws), keys
    and isinstance answers; the backend is a constructor argument (validated there)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 6), nn.Conv2d(6, 3, 1))
    torch.manual_seed(0)
    fast = nn.Sequential(Linear(4, 6, backend="reference"), Conv2d(6, 3, 1, backend="auto"))
    assert list(plain.state_dict()) == list(fast.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fast.state_dict().values()))
    assert isinstance(fast[0], nn.Linear) and isinstance(fast[1], nn.Conv2d)
    assert (fast[0].backend, fast[1].backend) == ("reference", "auto")
    assert "backend='auto'" in repr(fast[1])
    clone = copy.deepcopy(fast)
    buf = io.BytesIO()
    torch.save(clone.state_dict(), buf)
    buf.seek(0)
    fast.load_state_dict(torch.load(buf, weights_only=True))
    with pytest.raises(ValueError, match="valid choices"):
        Linear(4, 6, backend="fast")
    # adopt_linear: a third-party nn.Linear computed through the backend, its parameters shared, no RNG drawn
    state = torch.get_rng_state()
    adopted = adopt_linear(plain[0], "reference")
    assert torch.equal(torch.get_rng_state(), state)
    assert adopted.weight is plain[0].weight and adopted.bias is plain[0].bias and adopted.backend == "reference"
    x = torch.randn(3, 4)
    assert torch.equal(adopted(x), plain[0](x))


def test_builder_passes_the_configured_backend_to_every_linear_layer():
    """No plain nn.Linear / nn.Conv2d is left in a built model (timm's Swin blocks included): every
    GEMM takes the config's gemm_backend through its constructor."""
    from m2f.config import get_preset
    from m2f.models.build import build_model

    for preset, extra in (("tiny", []), ("tiny", ["backbone.kind=swin_t", "pixel_decoder.kind=fapn"]),
                          ("tiny", ["pixel_decoder.kind=transformer_encoder"]), ("tiny", ["pixel_decoder.kind=bifpn"])):
        model = build_model(get_preset(preset, extra + ["gemm_backend=reference"]))
        # The ResNet trunk keeps torchvision's convolutions and computes them through cpu_gemm.conv2d with
        # its own constructor backend; Swin's 4x4 patch embedding is never a GEMM; nn.MultiheadAttention's
        # out_proj (transformer_encoder) runs inside F.multi_head_attention_forward.
        exempt = ("backbone.conv1", "backbone.layer", "backbone.patch_embed")
        mods = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        plain = [n for n, m in mods if not isinstance(m, (Linear, Conv2d)) and not n.startswith(exempt)
                 and not n.endswith("self_attn.out_proj")]
        assert plain == [], (extra, plain)
        assert {m.backend for _, m in mods if isinstance(m, (Linear, Conv2d))} == {"reference"}
        assert model.transformer_decoder.gemm_backend == "reference"
        assert getattr(model.backbone, "gemm_backend", "reference") == "reference"


@needs_onednn
def test_model_with_onednn_gemms_equals_reference(monkeypatch):
    """The tiny model's training step with gemm_backend auto vs reference: same outputs, loss and
    gradients up to float32 rounding, and the oneDNN path really ran.  Full-mask matching and loss:
    the point losses' importance sampling (top-k of |logit|) turns rounding-level differences into
    different sampled points, which is not what this test is about."""
    from m2f.config import get_preset
    from m2f.loss import build_criterion
    from m2f.models.build import build_model

    over = {"loss.matching": "mask", "loss.loss": "mask"}
    cfg = get_preset("tiny", over)
    torch.manual_seed(0)
    models = {b: build_model(get_preset("tiny", {**over, "gemm_backend": b})).train() for b in ("reference", "auto")}
    models["auto"].load_state_dict(models["reference"].state_dict())
    crit = build_criterion(cfg.loss, cfg.num_classes)
    x = torch.randn(1, 3, 64, 96)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[0, :32], masks[1, 32:, 40:] = True, True
    tgt = [{"labels": torch.tensor([1, 2]), "masks": masks}]
    x = x.contiguous(memory_format=torch.channels_last)

    def run(backend):
        model = models[backend]
        model.zero_grad(set_to_none=True)
        out = model(x)
        loss = sum(crit(out, tgt, generator=torch.Generator().manual_seed(0)).values())
        loss.backward()
        return out.mask_logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                           if p.grad is not None}

    calls = _count_onednn_calls(monkeypatch)
    m_ref, l_ref, g_ref = run("reference")
    assert calls == []
    m_dnn, l_dnn, g_dnn = run("auto")
    assert len(calls) > 20
    torch.testing.assert_close(m_dnn, m_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(l_dnn, l_ref, rtol=1e-5, atol=1e-5)
    assert g_dnn.keys() == g_ref.keys()
    # Rounding-level differences may flip a ReLU whose input is within ~1e-6 of 0 (seen: one unit
    # of the pixel decoder's output conv), which changes every gradient below it by up to ~1e-3
    # relative.  So: every tensor to 1e-2 (a wrong product would be off by O(1)); the prediction
    # heads, whose gradients see no such flip, to 1e-5.
    errs = {n: float((g_dnn[n] - g_ref[n]).norm() / g_ref[n].norm().clamp_min(1e-12))
            for n in g_ref if not n.endswith("k_proj.bias")}  # k_proj.bias: 0 in exact arithmetic
    assert max(errs.values()) < 1e-2, max(errs.items(), key=lambda kv: kv[1])
    heads = {n: e for n, e in errs.items() if ".class_embed." in n or ".mask_embed." in n}
    assert len(heads) >= 4 and max(heads.values()) < 1e-5, heads


@needs_onednn
@pytest.mark.parametrize("batch", [1, 3])
def test_bmm_nt_equals_bmm(monkeypatch, batch):
    g = torch.Generator().manual_seed(4)
    a = torch.randn(batch, 50, 24, generator=g)
    b = torch.randn(batch, 24, 30, generator=g).transpose(1, 2)  # [B, 30, 24], strided
    calls = _count_onednn_calls(monkeypatch)
    out = cpu_gemm.bmm_nt(a, b, "auto")
    torch.testing.assert_close(out, torch.bmm(a, b.transpose(1, 2)), rtol=1e-5, atol=1e-5)
    assert out.shape == (batch, 50, 30) and len(calls) == batch
    assert torch.equal(cpu_gemm.bmm_nt(a, b, "reference"), torch.bmm(a, b.transpose(1, 2)))


@needs_onednn
@pytest.mark.parametrize("reduce", ["sum", "row_scale", "col_scale", "strided"])
def test_linear_gradients_for_broadcast_and_strided_output_grads(reduce):
    """Output gradients with zero strides (from sum / broadcasting) or gaps reach the oneDNN backward."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(50, 160, generator=g, requires_grad=True)
    w = torch.randn(30, 160, generator=g, requires_grad=True)
    b = torch.randn(30, generator=g, requires_grad=True)
    r1, rm = torch.randn(1, 30, generator=g), torch.randn(50, 1, generator=g)
    fn = {"sum": lambda y: y.sum(), "row_scale": lambda y: (y * r1).sum(), "col_scale": lambda y: (y * rm).sum(),
          "strided": lambda y: y[:, ::2].sum()}[reduce]
    got = torch.autograd.grad(fn(linear(x, w, b, "onednn")), (x, w, b))
    want = torch.autograd.grad(fn(F.linear(x, w, b)), (x, w, b))
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("shape,stride,bias", [((4, 96, 4, 4), 1, True), ((2, 64, 8, 6), 2, False),
                                               ((1, 32, 5, 7), 1, True)])
def test_small_output_kxk_conv_runs_as_one_gemm_with_the_same_values_and_gradients(monkeypatch, shape, stride, bias):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (0.1 * torch.randn(48, shape[1], 3, 3, generator=g)).contiguous(memory_format=torch.channels_last)
    w.requires_grad_()
    b = torch.randn(48, generator=g, requires_grad=True) if bias else None
    calls = _count_onednn_calls(monkeypatch)
    out = conv2d(x, w, b, stride, 1, backend="auto")
    ref = F.conv2d(x, w, b, stride, 1)
    assert calls and out.shape == ref.shape and out.shape[0] * out.shape[2] * out.shape[3] <= cpu_gemm.IM2COL_MAX_ROWS
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ins = (x, w) + ((b,) if bias else ())
    go = torch.randn(ref.shape, generator=g)
    for a, r in zip(torch.autograd.grad(out, ins, go), torch.autograd.grad(ref, ins, go)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)
    calls.clear()  # above the row limit, a reference backend, or NCHW input: F.conv2d itself
    big = torch.randn(4, shape[1], 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    assert torch.equal(conv2d(big, w, b, 1, 1, backend="auto"), F.conv2d(big, w, b, 1, 1))
    assert torch.equal(conv2d(x, w, b, stride, 1, backend="reference"), F.conv2d(x, w, b, stride, 1))
    assert torch.equal(conv2d(x.detach().contiguous(), w, b, stride, 1, backend="auto"),
                       F.conv2d(x.detach().contiguous(), w, b, stride, 1))
    assert calls == []
