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
from zoo.blocks.pyramid_sparse import PSAConfig

from zoo.video import VideoDiT, VideoDiTPipeline, disable_psa, enable_psa, psa_state

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
        enable_psa(psa, PSAConfig(warmup_steps=1, **SMALL_PSA))
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
    assert loaded.transformer.config.attention == "psa"
    assert psa_state(loaded.transformer).config == PSAConfig(warmup_steps=1, **SMALL_PSA)
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


@pytest.mark.parametrize("pos_embed", ["rope", "learned"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_psa_tokens_reordered_once_per_forward_give_the_per_layer_result(pos_embed, checkpointing, monkeypatch):
    # With PSA enabled the model puts its tokens in block order once per forward (`presort_tokens`); PSA's own
    # per-layer reorder must give the same output and gradients, with the rotary angles travelling with the tokens
    # and under gradient checkpointing (whose recomputation must see the same order).
    model = _model(attention="psa", pos_embed=pos_embed, psa_config=PSAConfig(warmup_steps=0, **SMALL_PSA).to_dict())
    model.eval()
    if checkpointing:
        model.enable_gradient_checkpointing()
    x, t, labels = torch.randn(2, 3, 4, 16, 16), torch.tensor([600.0, 200.0]), torch.tensor([2, 4])
    calls = []
    psa = psa_state(model).psa
    monkeypatch.setattr(type(psa), "forward", _recording(type(psa).forward, calls))
    results = []
    for presort in (True, False):
        monkeypatch.setattr(model, "presort_tokens", presort)
        model.zero_grad()
        calls.clear()
        with torch.enable_grad():
            out = model(x, t, labels).sample
            out.square().mean().backward()
        # Presorted: PSA is told no grid (no reorder of its own); per layer: it gets the grid every call.
        assert calls and all((grid is None) == presort for grid in calls)
        results.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert not torch.equal(results[0][0], torch.zeros_like(results[0][0]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    assert len(results[0][1]) == len(results[1][1]) > 0
    for got, want in zip(*(r[1] for r in results), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _recording(forward, calls: list):
    def wrapped(self, q, k, v, grid=None, *args, **kwargs):
        calls.append(grid)
        return forward(self, q, k, v, grid, *args, **kwargs)

    return wrapped


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


@pytest.mark.parametrize("backend", ["reference", "triton", "flex", "masked"])
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
        with caplog.at_level("DEBUG", logger="zoo.kernels"), torch.set_grad_enabled(name != "flex"):
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


def test_defaults_come_from_the_model_and_survive_save_and_load(tmp_path, monkeypatch):
    # The clip size from the transformer's config (what it was trained on), steps and guidance from the pipeline's
    # registered config: a call with labels only uses them, and save_pretrained/from_pretrained keep them.
    model = _model(sample_size=8, sample_frames=2)
    pipe = VideoDiTPipeline(model, FlowMatchEulerDiscreteScheduler(), num_inference_steps=2, guidance_scale=1.5)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    original = FlowMatchEulerDiscreteScheduler.set_timesteps

    def spy(self, num_inference_steps=None, *args, **kwargs):
        calls.append(num_inference_steps)
        return original(self, num_inference_steps, *args, **kwargs)

    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "set_timesteps", spy)
    first = pipe([1, 4], generator=torch.Generator().manual_seed(0)).frames
    assert first.shape == (2, 2, 8, 8, 3) and calls == [2]
    explicit = pipe(
        [1, 4], num_frames=2, height=8, width=8, num_inference_steps=2, guidance_scale=1.5,
        generator=torch.Generator().manual_seed(0),
    ).frames  # fmt: skip
    np.testing.assert_array_equal(first, explicit)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["num_inference_steps"] == 2 and index["guidance_scale"] == 1.5
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert config["sample_size"] == 8 and config["sample_frames"] == 2
    loaded = VideoDiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.num_inference_steps == 2 and loaded.config.guidance_scale == 1.5
    assert loaded.default_size == (2, 8, 8)
    np.testing.assert_array_equal(loaded([1, 4], generator=torch.Generator().manual_seed(0)).frames, first)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        VideoDiTPipeline(model, FlowMatchEulerDiscreteScheduler(), guidance_scale=float("inf"))
    with pytest.raises(ValueError, match="num_inference_steps"):
        VideoDiTPipeline(model, FlowMatchEulerDiscreteScheduler(), num_inference_steps=0)
    with pytest.raises(ValueError, match="sample_size"):
        _model(sample_size=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan"),
        (dict(guidance_scale=-1.0), "guidance_scale must be >= 0"),
        (dict(class_labels=[1, 2.5]), r"class_labels must be integers, got 2.5 \(float\)"),
        (dict(class_labels=["3"]), "class_labels must be integers, got '3'"),
        (dict(class_labels=[True]), "class_labels must be integers, got True"),
        (dict(class_labels=torch.tensor([1.0, 2.0])), "class_labels must be integers.*float32"),
        (dict(class_labels=np.array([0.5])), "class_labels must be integers.*float64"),
    ],
)
def test_bad_guidance_and_labels_fail_before_sampling(pipe, monkeypatch, change, message):
    def never(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(pipe.transformer, "forward", never)
    with pytest.raises(ValueError, match=message):
        pipe(**{**CALL, **change})


def test_integer_label_arrays_are_accepted(pipe):
    from zoo.video.pipeline import _labels

    assert _labels(np.array([1, 4])) == _labels(torch.tensor([1, 4])) == _labels((np.int64(1), 4)) == [1, 4]
    np.testing.assert_array_equal(_frames(pipe, class_labels=torch.tensor([1, 4])), _frames(pipe))


def test_from_pretrained_verifies_the_manifest_and_names_the_failing_file(pipe, tmp_path):
    from zoo.video import ManifestError, write_manifest

    pipe.save_pretrained(tmp_path)
    write_manifest(tmp_path)
    VideoDiTPipeline.from_pretrained(tmp_path)  # intact: loads
    config = tmp_path / "transformer" / "config.json"
    original = config.read_bytes()
    config.write_bytes(original.replace(b'"num_heads": 4', b'"num_heads": 2'))
    with pytest.raises(ManifestError, match=r"transformer/config.json does not match its sha256"):
        VideoDiTPipeline.from_pretrained(tmp_path)
    config.write_bytes(original)
    extra = tmp_path / "transformer" / "diffusion_pytorch_model.bin"
    extra.write_bytes(b"unlisted")
    with pytest.raises(ManifestError, match=r"diffusion_pytorch_model.bin is not listed"):
        VideoDiTPipeline.from_pretrained(tmp_path)
    extra.unlink()
    (tmp_path / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ManifestError, match=r"scheduler_config.json is listed in MANIFEST.sha256 but missing"):
        VideoDiTPipeline.from_pretrained(tmp_path)


def test_one_switch_for_the_zoo_video_dit(pipe):
    # enable_psa/disable_psa are the VideoDiT's switch as for diffusers' models: processors on diffusers'
    # convention, the config kept up to date, every original processor put back.
    from zoo.video import PSAAttnProcessor, VideoDiTAttnProcessor

    model = _model()
    assert not hasattr(model, "set_attention")
    originals = dict(model.attn_processors)
    assert len(originals) == 2 and all(isinstance(p, VideoDiTAttnProcessor) for p in originals.values())
    state = enable_psa(model, PSAConfig(warmup_steps=2, **SMALL_PSA))
    assert all(isinstance(p, PSAAttnProcessor) for p in model.attn_processors.values())
    assert model.config.attention == "psa" and model.config.psa_config == state.config.to_dict()
    assert psa_state(model) is state
    model.eval()
    x, t, labels = torch.randn(1, 3, 4, 16, 16), torch.tensor([500.0]), torch.tensor([2])
    with torch.no_grad():
        sparse = model(x, t, labels).sample  # no step given (training): PSA
        warm = model(x, t, labels, denoising_step=1).sample  # inside the warm-up: the original processor
        after = model(x, t, labels, denoising_step=2).sample
        disable_psa(model)
        dense = model(x, t, labels).sample
    assert model.attn_processors == originals and psa_state(model) is None
    assert model.config.attention == "dense" and model.config.psa_config is None
    assert torch.equal(warm, dense) and torch.equal(after, sparse) and not torch.allclose(sparse, dense, atol=1e-4)
    assert not model._forward_pre_hooks  # VideoDiT gets the step as an argument, not from a hook


def test_psa_copies_are_independent(pipe):
    # The training EMA deep-copies the model: the copy's processors must share the copy's state, not the original's.
    import copy

    model = _model(attention="psa", psa_config=PSAConfig(warmup_steps=0, **SMALL_PSA).to_dict())
    twin = copy.deepcopy(model)
    assert psa_state(twin) is not psa_state(model)
    assert all(p.state is psa_state(twin) for p in twin.attn_processors.values())
    with torch.no_grad():
        twin.eval()(torch.randn(1, 3, 4, 16, 16), 500.0, torch.tensor([1]))
    assert psa_state(twin).densities and not psa_state(model).densities


def test_enable_psa_on_the_pipeline_and_the_attention_backend_switch():
    # enable_psa takes the pipeline as for diffusers' pipelines; diffusers' set_attention_backend reaches the
    # wrapped processors, and a backend that bypasses torch's SDPA is refused while PSA is on.
    pipe = _pipe()
    state = enable_psa(pipe, PSAConfig(warmup_steps=0, **SMALL_PSA))
    assert psa_state(pipe.transformer) is state and pipe.transformer.config.attention == "psa"
    pipe.transformer.set_attention_backend("native")
    assert all(str(p._attention_backend.value) == "native" for p in pipe.transformer.attn_processors.values())
    assert _frames(pipe, num_inference_steps=1).shape == (2, 4, 16, 16, 3)
    for p in pipe.transformer.attn_processors.values():
        p.original._attention_backend = "_native_flash"
    with pytest.raises(RuntimeError, match="attention backend '_native_flash'"):
        _frames(pipe, num_inference_steps=1)
    disable_psa(pipe)
    assert pipe.transformer.config.attention == "dense"
