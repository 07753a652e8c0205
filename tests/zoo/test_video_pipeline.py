"""The zoo's VideoDiT and its diffusers pipeline: deterministic sampling on CPU, output types and shapes,
a save_pretrained / from_pretrained round trip, dense and PSA variants sharing weights, bad arguments."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import export_to_gif

from blocks.pyramid_sparse import PSAConfig
from zoo.video import VideoDiT, VideoDiTPipeline

CALL = dict(class_labels=[1, 4], num_frames=4, height=16, width=16, num_inference_steps=3, guidance_scale=3.0)
SMALL_PSA = dict(block_q=16, block_k=8, tile_size=(2, 4, 4))


def _model(**overrides) -> VideoDiT:
    torch.manual_seed(0)
    model = VideoDiT.from_size("xs", num_classes=5, **overrides)
    # adaLN-zero starts every branch and the output at zero: give the test model weights that do something.
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.05)
    return model


def _pipe(**overrides) -> VideoDiTPipeline:
    pipe = VideoDiTPipeline(transformer=_model(**overrides), scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return _pipe()


def _frames(pipe, seed=0, **changes):
    return pipe(**{**CALL, **changes}, generator=torch.Generator().manual_seed(seed)).frames


def test_generation_is_deterministic_with_a_generator(pipe):
    first = _frames(pipe)
    assert isinstance(first, np.ndarray) and first.shape == (2, 4, 16, 16, 3) and first.dtype == np.float32
    assert 0.0 <= first.min() and first.max() <= 1.0 and first.std() > 0.01
    np.testing.assert_array_equal(_frames(pipe), first)
    assert not np.array_equal(_frames(pipe, seed=1), first)
    assert not np.array_equal(_frames(pipe, class_labels=[2, 4]), first)  # the label conditions the video
    assert pipe.transformer.training  # sampling leaves the model's mode as it found it


def test_output_types_and_gif_export(pipe, tmp_path):
    as_np = _frames(pipe)
    pt = _frames(pipe, output_type="pt")
    assert pt.shape == (2, 4, 3, 16, 16)
    np.testing.assert_allclose(pt.permute(0, 1, 3, 4, 2).numpy(), as_np, atol=1e-6)
    pil = _frames(pipe, output_type="pil")
    assert len(pil) == 2 and len(pil[0]) == 4 and isinstance(pil[0][0], PIL.Image.Image) and pil[0][0].size == (16, 16)
    latent = _frames(pipe, output_type="latent")
    assert latent.shape == (2, 3, 4, 16, 16)
    path = export_to_gif(pil[0], str(tmp_path / "video.gif"))
    with PIL.Image.open(path) as gif:
        assert gif.n_frames == 4


def test_export_to_video(pipe, tmp_path):
    pytest.importorskip("imageio", reason="diffusers' export_to_video needs imageio, which the zoo does not install")
    pytest.importorskip("imageio_ffmpeg", reason="diffusers' export_to_video needs imageio-ffmpeg")
    from diffusers.utils import export_to_video

    path = export_to_video(list(_frames(pipe)[0]), str(tmp_path / "video.mp4"), fps=4)
    assert (tmp_path / "video.mp4").stat().st_size > 0 and path.endswith(".mp4")


def test_progress_bar_is_shown(capsys):
    pipe = _pipe()
    pipe.set_progress_bar_config(disable=False)
    pipe(**{**CALL, "num_inference_steps": 2})
    assert "2/2" in capsys.readouterr().err


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "VideoDiTPipeline"
    assert index["transformer"] == ["zoo.video.dit", "VideoDiT"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = VideoDiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.transformer, VideoDiT)
    np.testing.assert_array_equal(_frames(loaded), _frames(pipe))


def test_psa_and_dense_share_weights_and_agree_at_full_density(pipe):
    psa = _model(attention="psa", psa_config=PSAConfig.full_density(**SMALL_PSA).to_dict())
    psa.load_state_dict(pipe.transformer.state_dict(), strict=True)  # same keys, same shapes
    x, t, labels = torch.randn(2, 3, 4, 16, 16), torch.tensor([700.0, 300.0]), torch.tensor([0, 5])
    with torch.no_grad():
        dense = pipe.transformer.eval()(x, t, labels).sample
        torch.testing.assert_close(psa.eval()(x, t, labels).sample, dense, atol=1e-5, rtol=1e-5)
        psa.set_attention("psa", PSAConfig(warmup_steps=1, **SMALL_PSA))
        assert psa.config.psa_config["level_bounds"] == [0.10, 0.15, 0.15, 0.35]
        torch.testing.assert_close(psa(x, t, labels, denoising_step=0).sample, dense, atol=1e-5, rtol=1e-5)
        sparse = psa(x, t, labels, denoising_step=1).sample
    assert not torch.allclose(sparse, dense, atol=1e-4)
    assert float((sparse - dense).norm() / dense.norm()) < 0.5
    pipe.transformer.train()


def test_psa_pipeline_round_trip_keeps_the_psa_config(tmp_path):
    pipe = _pipe(attention="psa", psa_config=PSAConfig(warmup_steps=1, **SMALL_PSA).to_dict())
    first = _frames(pipe)
    pipe.save_pretrained(tmp_path)
    loaded = VideoDiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.transformer.blocks[0].attn.attention == "psa"
    assert loaded.transformer.blocks[0].attn.psa.config == PSAConfig(warmup_steps=1, **SMALL_PSA)
    np.testing.assert_array_equal(_frames(loaded), first)


def test_training_step_backpropagates_through_psa():
    model = _model(attention="psa", psa_config=PSAConfig(warmup_steps=0, **SMALL_PSA).to_dict())
    model.enable_gradient_checkpointing()
    x, noise = torch.randn(2, 3, 4, 16, 16), torch.randn(2, 3, 4, 16, 16)
    sigma = torch.tensor([0.3, 0.8]).view(2, 1, 1, 1, 1)
    pred = model((1 - sigma) * x + sigma * noise, sigma.flatten() * 1000, torch.tensor([0, 3])).sample
    torch.nn.functional.mse_loss(pred, noise - x).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_learned_positions_and_patch_in_time():
    pipe = _pipe(pos_embed="learned", patch_size=(2, 2, 2), max_grid=(4, 8, 8))
    assert _frames(pipe).shape == (2, 4, 16, 16, 3)
    with pytest.raises(ValueError, match="max_grid"):
        pipe(**{**CALL, "height": 32})


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(class_labels=[1, 5]), r"class_labels must lie in \[0, 5\)"),
        (dict(class_labels=[-1]), "class_labels"),
        (dict(class_labels=[]), "at least one"),
        (dict(height=15), "height must be a positive multiple of the patch size 2"),
        (dict(width=9), "width"),
        (dict(num_frames=0), "num_frames"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(output_type="mp4"), "output_type"),
        (dict(latents=torch.zeros(1, 3, 4, 16, 16)), "latents must have shape"),
    ],
)
def test_bad_arguments_raise_value_error(pipe, change, message):
    with pytest.raises(ValueError, match=message):
        pipe(**{**CALL, **change})


def test_bad_model_arguments_raise_value_error():
    model = _model()
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(torch.randn(1, 3, 4, 15, 16), 10.0, torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        model(torch.randn(1, 4, 4, 16, 16), 10.0, torch.tensor([1]))
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.randn(1, 3, 4, 16, 16), 10.0, torch.tensor([7]))
    with pytest.raises(ValueError, match="size must be one of"):
        VideoDiT.from_size("xl")
    with pytest.raises(ValueError, match="pos_embed"):
        VideoDiT.from_size("xs", pos_embed="sincos")
    no_null = VideoDiTPipeline(_model(class_dropout_prob=0.0), FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        no_null(**CALL)
    assert no_null(**{**CALL, "guidance_scale": 1.0}).frames.shape == (2, 4, 16, 16, 3)
    with pytest.raises(ValueError, match="VideoDiT"):
        VideoDiTPipeline(torch.nn.Linear(2, 2), FlowMatchEulerDiscreteScheduler())


def test_sizes_on_the_meta_device():
    with torch.device("meta"):
        counts = {
            size: sum(p.numel() for p in VideoDiT.from_size(size).parameters()) for size in ("xs", "s", "wan-1.3b")
        }
    assert counts["xs"] < 250_000 and 4e6 < counts["s"] < 7e6 and 1.4e9 < counts["wan-1.3b"] < 1.6e9


@pytest.mark.parametrize("backend", ["reference", "triton", "flex"])
def test_psa_gives_the_same_output_and_grads_on_every_kernel_backend(backend, monkeypatch, caplog):
    # PSA is a translation to the block-sparse op: every backend runs it (the Triton one interpreted on the CPU
    # here, fp32), compared with the gather path (CPU training's); FlexAttention has no CPU backward.
    model = _model(attention="psa", psa_config=PSAConfig(warmup_steps=0, **SMALL_PSA).to_dict())
    model.eval()  # no random label dropout between the two runs
    x = torch.randn(1, 3, 4, 16, 16)
    t, labels = torch.tensor([600.0]), torch.tensor([2])
    results = []
    for name in ("gather", backend):
        monkeypatch.setenv("ZOO_KERNELS", name)
        model.zero_grad()
        caplog.clear()
        with caplog.at_level("DEBUG", logger="kernels"), torch.set_grad_enabled(name != "flex"):
            out = model(x, t, labels).sample
        assert f"block_sparse_attention: {name} path" in caplog.text
        if name != "flex":
            out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    if backend != "flex":
        assert len(results[1][1]) == len(results[0][1]) > 0
        for got, want in zip(results[1][1], results[0][1], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
