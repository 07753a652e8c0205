"""The video DiT recipe (`train/video_dit.py`: `zoo.training.cli.main` over `VideoDiTTask`) in-process on a tiny
model: the moving-digits data, a short fit with PSA (bf16) and its exported diffusers folder, resume, one-line errors,
`python -m zoo.generate`, and the shipped checkpoint (manifest, loading, generation)."""

from __future__ import annotations

import hashlib
import json
from functools import partial

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from zoo.generate import main as generate_main
from zoo.training import VideoDiTTask
from zoo.training.cli import main as cli_main
from zoo.training.video_data import MovingDigits, MovingDigitsData, digit_sprites, render_clip
from zoo.video import VideoDiT, VideoDiTPipeline

from ._util import ROOT, read_metrics

CONFIG = ROOT / "configs" / "video" / "video_dit_digits.yaml"
main = partial(cli_main, VideoDiTTask, MovingDigitsData)  # train/video_dit.py
SHIPPED = ROOT / "checkpoints" / "zoo-video-dit-digits"
# The shipped model's card promises that at least 90% of generated frames show the requested digit (measured
# 0.924 to 0.943 over 160 frames per digit and three noise seeds, BENCHMARKS.md). The test's 10 clips (one per
# digit) called with labels only measure 0.969 (noise seed 7, the evaluator trained for 200 steps: 97.8% on
# unseen digits; 20 clips: 0.941, and 0.913 on seed 0); an untrained or broken model, or the wrong defaults (8
# frames of 32x32 at guidance 4), lands far below (5.6% in issue 17).
FRAME_ACCURACY_BOUND = 0.9

# The recipe's code path (PSA over a Gilbert-ordered token grid, EMA, CFG label dropout) at 8 frames of 8x8:
# a (4, 4, 4) grid of 64 tokens, 4 query blocks x 8 key blocks, 2 updates an epoch.
TINY = [
    f"--config={CONFIG}",
    "--model.model_kwargs={hidden_size: 32, num_layers: 1, num_heads: 2}",
    "--model.patch_size=[2, 2, 2]",
    "--model.psa_config={block_q: 16, block_k: 8, level_bounds: [0.25, 0.375, 0.5, 0.75], warmup_steps: 0}",
    "--model.warmup_steps=1",
    "--data.num_frames=8",
    "--data.frame_size=8",
    "--data.digit_size=4",
    "--data.clips_per_epoch=8",
    "--data.batch_size=4",
    "--samples.every_n_epochs=1",
    "--samples.labels=[3]",
    "--samples.num_inference_steps=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


CLI_ARGV = ["train/video_dit.py"]  # the CLI parses `args`, not pytest's command line (tests/train/conftest.py)


def test_moving_digits_are_seeded_bounded_and_split():
    data = MovingDigits("train", length=20, num_frames=12, size=16, digit_size=8, max_speed=1.0, seed=3)
    clip, label = data[5]
    again, same = MovingDigits("train", 20, 12, 16, 8, 1.0, seed=3)[5]
    assert clip.shape == (1, 12, 16, 16) and torch.equal(clip, again) and label == same
    assert clip.min() == -1.0 and 0.5 < clip.max() <= 1.0
    assert not torch.equal(clip, MovingDigits("train", 20, 12, 16, 8, 1.0, seed=4)[5][0])
    # Every frame holds the whole digit: the ink is the same however the digit moved.
    ink = (clip[0] + 1).sum(dim=(1, 2))
    assert torch.allclose(ink, ink[0].expand_as(ink), rtol=1e-5)
    assert len({tuple(torch.nonzero(f > -1).min(0).values.tolist()) for f in clip[0]}) > 1  # it moves
    # Train and held-back digits are the classification recipe's stratified split: disjoint, 1437 + 360.
    train, train_labels = digit_sprites("train", 8)
    held, held_labels = digit_sprites("held_back", 8)
    assert (len(train), len(held)) == (1437, 360) and set(held_labels.tolist()) == set(range(10))
    assert not {s.tobytes() for s in held} <= {s.tobytes() for s in train}


def test_render_clip_bounces_off_the_edges():
    sprite = np.ones((2, 2), dtype=np.float32)
    clip = render_clip(sprite, (0.0, 0.0), (0.0, 1.0), num_frames=9, size=6)
    xs = [int(np.nonzero(f.max(0) > 0)[0].min()) for f in clip]
    assert xs == [0, 1, 2, 3, 4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="digit_size 8 must not exceed the canvas size 6"):
        render_clip(np.ones((8, 8), np.float32), (0.0, 0.0), (1.0, 1.0), 2, 6)
    with pytest.raises(ValueError, match="data.digit_size must lie in"):
        MovingDigitsData(frame_size=8, digit_size=9)


def test_fit_exports_a_pipeline_that_loads_and_generates(tmp_path, capsys):
    main([*TINY, "--trainer.max_epochs=2", "--trainer.precision=bf16-mixed", f"--trainer.default_root_dir={tmp_path}"])
    run = tmp_path / "lightning_logs" / "version_0"
    rows = read_metrics(run / "metrics.csv")
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    densities = [float(r["train/psa_density"]) for r in rows if r.get("train/psa_density")]
    assert len(losses) == 4 and all(np.isfinite(losses))
    # PSA is sparse on this grid: 2 of 8 key blocks full, 1 at 2x, 1 at 4x, 2 at 8x, 2 skipped.
    assert densities and all(d == pytest.approx(0.375) for d in densities)
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["epoch=0-label=3.gif", "epoch=1-label=3.gif"]
    assert Image.open(run / "samples" / "epoch=1-label=3.gif").n_frames == 8
    summary = json.loads((run / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["attention"] == "psa" and summary["train_seconds"] > 0
    assert summary["precision"] == "bf16-mixed"

    folder = run / "pipeline"
    assert {"model_index.json", "transformer", "scheduler"} == {p.name for p in folder.iterdir()}
    assert json.loads((folder / "model_index.json").read_text())["transformer"] == ["zoo.video.dit", "VideoDiT"]
    pipe = VideoDiTPipeline.from_pretrained(str(folder))
    assert pipe.transformer.config.attention == "psa" and pipe.transformer.config.psa_config["block_k"] == 8
    # The clip trained on is the pipeline's default size (the transformer's config), as in diffusers.
    assert (pipe.transformer.config.sample_frames, pipe.transformer.config.sample_size) == (8, 8)
    # The export holds the EMA weights, in float32.
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    for key, value in pipe.transformer.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, ckpt["ema.module." + key].float()), key
    assert any(not torch.equal(ckpt["ema.module." + k], ckpt["model." + k]) for k in pipe.transformer.state_dict())
    frames = pipe([3, 7], num_inference_steps=2, generator=torch.manual_seed(0))
    assert frames.frames.shape == (2, 8, 8, 8, 1) and np.isfinite(frames.frames).all()

    capsys.readouterr()
    generate_main([str(folder), "--labels", "3", "7", "--out", str(tmp_path / "gen"), "--steps", "2"])
    out, err = capsys.readouterr()
    written = sorted(p.name for p in (tmp_path / "gen").iterdir())
    assert written == ["0-label=3.gif", "1-label=7.gif"] and out.split() == [str(tmp_path / "gen" / w) for w in written]
    assert "2/2" in err  # diffusers' progress bar over the denoising steps
    assert Image.open(tmp_path / "gen" / "1-label=7.gif").size == (8, 8)


def test_resume_continues_steps_ema_and_training_time(tmp_path):
    main([*TINY, "--trainer.max_epochs=1", "--samples.every_n_epochs=0", f"--trainer.default_root_dir={tmp_path}"])
    first = torch.load(
        tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert (first["epoch"], first["global_step"]) == (0, 2) and first["train_seconds"] > 0
    main(
        [
            *TINY,
            "--trainer.max_epochs=2",
            "--samples.every_n_epochs=0",
            f"--trainer.default_root_dir={tmp_path}",
            "--ckpt_path=last",
        ]
    )
    # The resumed run logs on into version_0: its metrics.csv holds the whole history once.
    assert not (tmp_path / "lightning_logs" / "version_1").exists()
    run = tmp_path / "lightning_logs" / "version_0"
    second = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (second["epoch"], second["global_step"]) == (1, 4)
    assert second["train_seconds"] > first["train_seconds"]
    steps = [int(r["step"]) for r in read_metrics(run / "metrics.csv") if r.get("train/loss")]
    assert steps == [0, 1, 2, 3]
    assert json.loads((run / "training_summary.json").read_text())["steps"] == 4


@pytest.mark.parametrize(
    "args, named",
    [
        (["--model.lrr=1"], "--model.lrr"),
        (["--model.attention=sparse"], "attention"),
        (["--model.size=xl"], "model.size"),
        (["--data.digit_size=99"], "data.digit_size"),
        (["--model.psa_config={block_k: 12}"], "block_k"),
        (["--model.condition_init=big"], "condition_init"),
    ],
)
def test_bad_settings_stop_before_training_with_one_line(tmp_path, capsys, args, named):
    with pytest.raises(SystemExit) as info:
        main([*TINY, *args, f"--trainer.default_root_dir={tmp_path}"])
    out, err = capsys.readouterr()
    assert info.value.code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], err
    assert "Traceback" not in err and "Epoch" not in out


def test_recipe_resolves_to_a_sparse_psa_model(capsys):
    with pytest.raises(SystemExit):
        main([f"--config={CONFIG}", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["attention"] == "psa" and config["model"]["psa_config"]["warmup_steps"] == 0
    with torch.device("meta"):
        model = VideoDiT.from_size(
            config["model"]["size"],
            **config["model"]["model_kwargs"],
            in_channels=1,
            patch_size=tuple(config["model"]["patch_size"]),
            attention="psa",
            psa_config=config["model"]["psa_config"],
        )
    assert model.config.attention == "psa"
    grid = [config["data"]["num_frames"] // config["model"]["patch_size"][0]] + [
        config["data"]["frame_size"] // config["model"]["patch_size"][1]
    ] * 2
    tokens = int(np.prod(grid))
    # Several blocks for PSA to be sparse over: 8 query blocks, 16 key blocks.
    assert tokens // config["model"]["psa_config"]["block_q"] >= 4
    assert tokens // config["model"]["psa_config"]["block_k"] >= 8


def test_shipped_checkpoint_matches_its_manifest_and_generates(tmp_path):
    manifest = (SHIPPED / "MANIFEST.sha256").read_text().split("\n")
    entries = [line.split("  ", 1) for line in manifest if line.strip()]
    names = {name for _, name in entries}
    assert {"model_index.json", "transformer/diffusion_pytorch_model.safetensors", "README.md"} <= names
    total = 0
    for digest, name in entries:
        data = (SHIPPED / name).read_bytes()
        total += len(data)
        assert hashlib.sha256(data).hexdigest() == digest, name
    assert total <= 20 * 2**20
    readme = (SHIPPED / "README.md").read_text()
    assert "python train/video_dit.py --config configs/video/video_dit_digits.yaml" in readme
    assert not (SHIPPED / "sampling.json").exists()  # folded into the configs
    pipe = VideoDiTPipeline.from_pretrained(str(SHIPPED))
    assert pipe.transformer.config.attention == "psa"
    # The weights load under the parameter names they were saved with (VideoDiT's attention on diffusers'
    # processor convention kept qkv / q_norm / k_norm / proj).
    from safetensors.torch import load_file

    saved = load_file(SHIPPED / "transformer" / "diffusion_pytorch_model.safetensors")
    state = pipe.transformer.state_dict()
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in saved)
    recipe = yaml.safe_load(CONFIG.read_text())["data"]
    assert pipe.default_size == (recipe["num_frames"], recipe["frame_size"], recipe["frame_size"])
    frames = pipe([3], num_inference_steps=3, generator=torch.manual_seed(0)).frames
    assert frames.shape == (1, recipe["num_frames"], recipe["frame_size"], recipe["frame_size"], 1)
    assert np.isfinite(frames).all() and frames.std() > 0.05


def test_a_tampered_shipped_checkpoint_is_refused(tmp_path):
    import shutil

    from zoo.video import ManifestError

    folder = tmp_path / "copy"
    shutil.copytree(SHIPPED, folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="transformer/diffusion_pytorch_model.safetensors does not match"):
        VideoDiTPipeline.from_pretrained(str(folder))


def test_gpu_overlay_selects_bf16_on_one_gpu(capsys):
    # The overlay needs a GPU to run; here it must compose onto the recipe and change only the hardware keys.
    with pytest.raises(SystemExit):
        main([f"--config={CONFIG}", "--print_config"])
    base = yaml.safe_load(capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main([f"--config={CONFIG}", f"--config={CONFIG.parent / 'gpu.yaml'}", "--print_config"])
    gpu = yaml.safe_load(capsys.readouterr().out)
    assert gpu["trainer"]["accelerator"] == "gpu" and gpu["trainer"]["precision"] == "bf16-mixed"
    assert gpu["model"]["cpu_threads"] is None and base["model"]["cpu_threads"] == 1
    for section in ("model", "data"):
        changed = {k for k in base[section] if base[section][k] != gpu[section][k]}
        assert changed <= {"cpu_threads", "num_workers"}, changed
    assert gpu["model"]["psa_config"] == base["model"]["psa_config"]


def test_shipped_checkpoint_called_with_labels_only_draws_the_requested_digits():
    # A new user's call: labels only. The defaults must be the ones the model card's figures were measured at,
    # and the project's independent judge (a CNN trained on the held-back digits only,
    # zoo.evaluation) must find the requested digit in at least 90% of the frames: the card's bar.
    # One clip per digit with a noise seed the BENCHMARKS.md figures did not use; the evaluator trained for a third
    # of the benchmark's steps, which keeps it above 95% on unseen digits at a third of the time.
    from zoo.evaluation import clip_metrics, train_frame_classifier

    recipe = yaml.safe_load(CONFIG.read_text())["data"]
    classifier, evaluator_accuracy = train_frame_classifier(recipe["frame_size"], recipe["digit_size"], steps=200)
    assert evaluator_accuracy >= 0.95
    pipe = VideoDiTPipeline.from_pretrained(str(SHIPPED))
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10)
    frames = pipe(labels.tolist(), generator=torch.Generator().manual_seed(7), output_type="pt").frames
    metrics = clip_metrics(classifier, frames[:, :, 0] * 2 - 1, labels)
    assert metrics["frame_accuracy"] >= FRAME_ACCURACY_BOUND, metrics
    assert metrics["clip_accuracy"] >= 0.9, metrics


def test_generate_defaults_to_the_pipelines_settings(tmp_path, monkeypatch):
    # `python -m zoo.generate` samples at the pipeline's defaults (the settings the folder's figures were measured
    # at), unless told; an --out that is a file is refused before anything is sampled.
    seen = []
    original = VideoDiTPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append((kwargs["num_inference_steps"], kwargs["guidance_scale"]))
        return original(self, *args, **{**kwargs, "num_inference_steps": 1})

    monkeypatch.setattr(VideoDiTPipeline, "__call__", spy)
    generate_main([str(SHIPPED), "--labels", "3", "--out", str(tmp_path / "a")])
    generate_main([str(SHIPPED), "--labels", "3", "--out", str(tmp_path / "b"), "--steps", "5", "--guidance", "1.5"])
    assert seen == [(None, None), (5, 1.5)]
    index = json.loads((SHIPPED / "model_index.json").read_text())
    assert (index["num_inference_steps"], index["guidance_scale"]) == (25, 8.0)
    assert Image.open(tmp_path / "a" / "0-label=3.gif").n_frames == 16
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(VideoDiTPipeline, "__call__", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(SystemExit) as exit_info:
        generate_main([str(SHIPPED), "--labels", "3", "--out", str(tmp_path / "file")])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("attention", ["sta", "vmoba"])
def test_the_recipe_trains_with_a_sparse_pattern(tmp_path, attention):
    # Issue 18: `--model.attention {sta,neighborhood,radial,vmoba}` trains the recipe's model with that pattern.
    main(
        [
            *TINY,
            f"--model.attention={attention}",
            "--model.pattern_config={density: 0.3, tile: [1, 2, 2], chunk: [2, 2, 2]}",
            "--trainer.max_epochs=1",
            "--samples.every_n_epochs=0",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    run = tmp_path / "lightning_logs" / "version_0"
    losses = [float(r["train/loss"]) for r in read_metrics(run / "metrics.csv") if r.get("train/loss")]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert json.loads((run / "training_summary.json").read_text())["attention"] == attention
    pipe = VideoDiTPipeline.from_pretrained(str(run / "pipeline"))
    assert pipe.transformer.config.attention == attention
    assert pipe.transformer.config.pattern_config["density"] == 0.3
