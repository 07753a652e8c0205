"""Bad inputs into every registered backbone (issue 20): each fails with one ValueError/TypeError naming the
problem, or succeeds correctly. Every registered name runs at tiny widths and depths (its structural settings,
such as FocalNet's focal levels, kept), so the whole zoo costs seconds.

Cases that used to kill the process (non-finite values into LITv2's deformable convolution) and the hypothesis
fuzz over every model run in a child process: a segmentation fault fails the test instead of ending pytest.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch

import zoo  # noqa: F401  (registers the zoo_* models)
from tests._subprocess import describe, run_python
from zoo.integrations import DenseBackbone
from zoo.models.litv2 import DeformableTokenMerging

# Per family: the smallest widths and depths its layers accept (heads dividing channels, MaxViT's 32-channel
# heads), overriding the registered size's.
TINY = {
    "biformer": dict(depths=(1, 1, 1, 1), embed_dims=(32, 32, 32, 32)),
    "cswin": dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=(2, 2, 2, 2)),
    "davit": dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64), num_heads=(1, 2, 2, 4)),
    "focalnet": dict(depths=(1, 1, 1, 1), embed_dim=8),
    "litv2": dict(depths=(1, 1, 1, 1), embed_dim=8, num_heads=(1, 1, 2, 2)),
    "maxvit": dict(depths=(1, 1, 1, 1), embed_dims=(32, 32, 32, 32), stem_width=8),
}
MODELS = timm.list_models("zoo_*")
ONE_PER_FAMILY = sorted({name.split("_")[1]: name for name in reversed(MODELS)}.values())


def _family(name: str) -> str:
    return name.split("_")[1]


def _tiny(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, **{**TINY[_family(name)], **kwargs})


def test_every_family_has_a_tiny_config():
    assert {_family(n) for n in MODELS} == set(TINY)


@pytest.mark.parametrize("name", MODELS)
def test_batch_of_zero_gives_empty_outputs_as_timm_models_do(name):
    model = _tiny(name).eval()
    x = torch.randn(0, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (0, 5)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (0, model.num_features)
        maps = model.forward_intermediates(x, intermediates_only=True)
    assert [m.shape[:2] for m in maps] == [(0, info["num_chs"]) for info in model.feature_info]
    # The empty batch stays in the graph: a backward through it works and gives zero gradients.
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()  # no batch statistics exist for zero samples (timm's models refuse too)
    model(x.requires_grad_()).sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_cpu_bf16_autocast_matches_fp32(name):
    model = _tiny(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert ((low.float() - reference).abs().max() / reference.abs().max()).item() < 0.05
    # Training under autocast: forward and backward run, every gradient finite.
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_a_bf16_model_takes_bf16_images(name):
    model = _tiny(name).to(torch.bfloat16)
    with torch.no_grad():  # inference: MaxViT, DaViT and FocalNet take the fused oneDNN path here
        assert torch.isfinite(model.eval()(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)).float()).all()
    out = model.train()(torch.randn(2, 3, 64, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_input_of_another_dtype_is_named_before_any_work(name):
    model = _tiny(name).eval()
    with pytest.raises(TypeError, match=r"input dtype torch\.float64 differs from the model's torch\.float32"):
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"floating-point images .* got torch\.uint8"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"expected a torch\.Tensor .* got ndarray"):
        model(torch.zeros(1, 3, 64, 64).numpy())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for the model ...
        assert model.to(torch.bfloat16)(torch.randn(1, 3, 64, 64)).shape == (1, 5)
        with pytest.raises(TypeError, match=r"input dtype torch\.float64 differs"):  # ... but never float64
            model(torch.randn(1, 3, 64, 64, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_classes=-1), r"num_classes must be an int >= 0 .* got -1"),
        (dict(num_classes=2.5), r"num_classes must be an int >= 0 .* got 2\.5"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must lie in \[0, 1\), got 1\.0"),
        (dict(drop_path_rate=-0.1), r"drop_path_rate must lie in \[0, 1\), got -0\.1"),
        (dict(drop_path_rate=float("nan")), r"drop_path_rate must lie in \[0, 1\), got nan"),
        (dict(drop_rate=1.5), r"drop_rate must lie in \[0, 1\), got 1\.5"),
        (dict(in_chans=0), r"in_chans must be an int >= 1, got 0"),
    ],
)
def test_shared_arguments_are_checked_at_creation(kwargs, message):
    for name in ONE_PER_FAMILY:
        with pytest.raises((ValueError, TypeError), match=message):
            timm.create_model(name, **{**TINY[_family(name)], **kwargs})
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 0"):
        _tiny("zoo_focalnet_t").reset_classifier(-3)


def test_dense_backbone_refuses_stages_it_does_not_have():
    with pytest.raises(ValueError, match=r"frozen_stages must be -1 \(none\) or 0\.\.4 .* got 5"):
        DenseBackbone("zoo_focalnet_t", frozen_stages=5, **TINY["focalnet"])
    with pytest.raises(ValueError, match=r"frozen_stages must be -1 .* got -2"):
        DenseBackbone("zoo_focalnet_t", frozen_stages=-2, **TINY["focalnet"])
    with pytest.raises(ValueError, match=r"out_indices must be stage indices in \[-4, 4\), got \(1, 4\)"):
        DenseBackbone("zoo_focalnet_t", out_indices=(1, 4), **TINY["focalnet"])
    with pytest.raises(TypeError, match=r"out_indices must be a sequence"):
        DenseBackbone("zoo_focalnet_t", out_indices=3, **TINY["focalnet"])
    backbone = DenseBackbone("zoo_focalnet_t", out_indices=(-1,), frozen_stages=4, **TINY["focalnet"])
    assert backbone.out_indices == (3,)
    assert not any(p.requires_grad for p in backbone.body.stages.parameters())


# ------------------------------------------------------------------- LITv2's deformable token merging


def test_deformable_merging_clamp_changes_no_value_or_gradient():
    # Offsets far beyond the map (what a diverging run predicts) are clamped where every tap reads zero anyway.
    from torchvision.ops import deform_conv2d

    merge = DeformableTokenMerging(4, 6).eval()
    torch.nn.init.normal_(merge.offset.weight, std=5.0)
    x = torch.randn(2, 8, 10, 4, requires_grad=True)
    nchw = x.permute(0, 3, 1, 2)
    offset = merge.offset(nchw) * 10
    assert offset.abs().max() > 100  # far past the clamp at max(H, W) + 2 = 12
    plain = deform_conv2d(nchw, offset, merge.weight, merge.bias, stride=2)
    limit = max(nchw.shape[-2:]) + 2
    clamped = deform_conv2d(nchw, offset.clamp(-limit, limit), merge.weight, merge.bias, stride=2)
    assert torch.equal(plain, clamped)
    (g_plain,) = torch.autograd.grad(plain.square().sum(), x, retain_graph=True)
    (g_clamped,) = torch.autograd.grad(clamped.square().sum(), x)
    assert torch.equal(g_plain, g_clamped)


def test_deformable_merging_in_bf16_is_the_fp32_op_rounded():
    merge = DeformableTokenMerging(4, 6).eval()
    torch.nn.init.normal_(merge.offset.weight, std=0.5)
    x = torch.randn(2, 8, 10, 4).bfloat16().float()
    low = merge.to(torch.bfloat16)(x.bfloat16())
    high = merge.float()(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), high, rtol=0.05, atol=0.05)


def test_non_finite_and_huge_pixels_into_litv2_do_not_crash():
    # Run in a child: unguarded, torchvision's kernel dereferences NaN/Inf sampling positions (SIGSEGV).
    proc = run_python(
        """
        import json, torch, timm, zoo
        torch.manual_seed(0)
        model = timm.create_model("zoo_litv2_s", num_classes=5, depths=(1, 1, 1, 1), embed_dim=8,
                                  num_heads=(1, 1, 2, 2)).eval()
        merge = model.stages[1].downsample
        torch.nn.init.normal_(merge.offset.weight, std=1.0)  # offsets that depend on the input
        result = {}
        for value in ["nan", "inf", "-inf", "1e20", "-3e38"]:
            x = torch.randn(2, 3, 64, 64)
            x[0, 1, 20, 30] = float(value)
            with torch.no_grad():
                y = model(x)
            result[value] = [bool(torch.isfinite(y[0]).all()), bool(torch.isfinite(y[1]).all()), list(y.shape)]
        model.train()  # a diverged training step: forward and backward run through
        x = torch.randn(2, 3, 64, 64)
        x[0, 0, 5, 5] = float("nan")
        model(x).sum().backward()
        print(json.dumps(result))
        """
    )
    assert proc.returncode == 0, describe(proc)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for value, (first_finite, second_finite, shape) in result.items():
        assert shape == [2, 5]
        assert second_finite, value  # the other image of the batch is untouched
        if value in ("nan", "inf", "-inf"):
            assert not first_finite, value  # NaN propagates as it would through a plain convolution


def test_non_finite_offsets_give_nan_at_their_positions():
    proc = run_python(
        """
        import json, torch
        from zoo.models.litv2 import DeformableTokenMerging
        merge = DeformableTokenMerging(4, 6).eval()  # zero offset weights: offsets are 0 * x
        x = torch.randn(1, 8, 8, 4)
        x[0, 2, 5, 1] = float("nan")  # in the 2 x 2 patch of output (1, 2): its offsets are NaN, the others 0
        offsets = merge.offset(x.permute(0, 3, 1, 2))
        y = merge(x)
        print(json.dumps([
            (~torch.isfinite(offsets)).any(1)[0].nonzero().tolist(),
            torch.isnan(y).any(-1)[0].nonzero().tolist(),
        ]))
        """
    )
    assert proc.returncode == 0, describe(proc)
    undefined, nan = json.loads(proc.stdout.strip().splitlines()[-1])
    assert undefined == [[1, 2]]
    assert [1, 2] in nan
    # Away from the NaN pixel (bilinear reads reach one pixel past a tap) every output is finite.
    assert all(abs(i * 2 - 2) <= 2 and abs(j * 2 - 5) <= 3 for i, j in nan), nan


# ------------------------------------------------------------------------------------- the fuzz suite


def test_fuzz_every_registered_model_with_bad_inputs():
    """hypothesis draws inputs for every registered model: batch (0-2), channels, sizes from 0, dtypes, memory
    layout and non-finite or huge pixels. Each call raises a ValueError/TypeError naming the shape or dtype, or
    returns (B, 5) logits, finite for every image without non-finite or huge values."""
    proc = run_python(
        f"""
        import math, timm, torch, zoo
        from hypothesis import HealthCheck, given, settings, strategies as st
        torch.set_num_threads(1)
        TINY = {TINY!r}
        models = {{}}

        def model(name):
            if name not in models:
                torch.manual_seed(0)
                models[name] = timm.create_model(name, num_classes=5, **TINY[name.split("_")[1]]).eval()
            return models[name]

        DTYPES = [torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.uint8,
                  torch.int64, torch.bool]
        SPECIALS = [None, math.nan, math.inf, -math.inf, 1e20, -1e30]

        @settings(max_examples=200, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(
            name=st.sampled_from({MODELS!r}),
            batch=st.integers(0, 2),
            channels=st.sampled_from([3, 3, 3, 1, 4]),
            height=st.integers(0, 80),
            width=st.integers(0, 80),
            dtype=st.sampled_from(DTYPES),
            special=st.sampled_from(SPECIALS),
            channels_last=st.booleans(),
            data=st.data(),
        )
        def check(name, batch, channels, height, width, dtype, special, channels_last, data):
            net = model(name)
            x = torch.randn(batch, channels, height, width).to(dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            poisoned = set()
            if special is not None and x.is_floating_point() and x.numel():
                b = data.draw(st.integers(0, batch - 1))
                x[b, data.draw(st.integers(0, channels - 1)), data.draw(st.integers(0, height - 1)),
                  data.draw(st.integers(0, width - 1))] = special
                poisoned.add(b)
            try:
                with torch.no_grad():
                    y = net(x)
            except (ValueError, TypeError) as e:
                message = str(e)
                assert ("shape" in message and str(tuple(x.shape)) in message) or "dtype" in message \\
                    or "floating-point" in message, message
                bad_shape = channels != 3 or min(height, width) < net.min_input_size
                bad_dtype = x.dtype != torch.float32
                assert bad_shape or bad_dtype, (name, tuple(x.shape), x.dtype, message)
                return
            assert channels == 3 and x.dtype == torch.float32, (name, tuple(x.shape), x.dtype)
            assert y.shape == (batch, 5) and y.dtype == torch.float32
            for i in range(batch):
                if i not in poisoned:
                    assert torch.isfinite(y[i]).all(), (name, i, special)

        check()
        print("fuzzed", len(models), "models")
        """,
        timeout=600,
    )
    assert proc.returncode == 0, describe(proc)
    assert "fuzzed" in proc.stdout
