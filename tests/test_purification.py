import subprocess
import tempfile
import sys
import textwrap

import lightning as L
import pytest
import torch

from lit_robust import EBM, ImageClassifier
from lit_robust.callbacks import MetricsFile
from lit_robust.callbacks.contract import ReplacedImages, rank_share
from lit_robust.callbacks.purification import EBMPurification, PureGenFilt, Purification
from lit_robust.datamodules import DigitsDataModule


def tiny_ebm(seed: int = 0) -> EBM:
    torch.manual_seed(seed)
    return EBM(img_size=8, channels=(4, 8), down=(True, False), bank_size=4)


def fit_with(callback, root=None):
    root = root or tempfile.mkdtemp()
    datamodule = DigitsDataModule(source="sklearn8x8", batch_size=64, seed=0)
    trainer = L.Trainer(max_steps=1, callbacks=[callback], logger=False, enable_checkpointing=False,
                        limit_val_batches=0, enable_model_summary=False, enable_progress_bar=False,
                        default_root_dir=str(root))
    trainer.fit(ImageClassifier(), datamodule=datamodule)
    return trainer.train_dataloader.dataset  # what the fit trained on (the DataModule has its own split back)


class CountingPurification(EBMPurification):
    """Counts computed chunks and can fail after a number of them (an interrupted run)."""

    def __init__(self, *args, fail_after=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.fail_after = 0, fail_after

    def purify_chunk(self, images, indices, generator):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        return super().purify_chunk(images, indices, generator)


def test_rank_shares_are_disjoint_and_cover_everything():
    for n_chunks, world in [(13, 2), (3, 4), (8, 3), (1, 2)]:
        shares = [rank_share(n_chunks, _Trainer(world, rank)).tolist() for rank in range(world)]
        assert sorted(c for share in shares for c in share) == list(range(n_chunks))


def test_callback_replaces_train_set_keeps_targets_and_moves_images(tmp_path):
    clean = DigitsDataModule(source="sklearn8x8", seed=0)
    clean.setup("fit")
    callback = EBMPurification(tiny_ebm(), steps=5, chunk_size=300, cache_dir=str(tmp_path), progress=False)
    purified = fit_with(callback, tmp_path / "run")
    assert (tmp_path / "run" / "plots" / "EBMPurification_before_after.png").stat().st_size > 1000
    assert isinstance(purified, ReplacedImages) and len(purified) == len(clean.train_dataset)
    assert torch.equal(purified[7][1], clean.train_dataset[7][1])
    change = (purified.images - clean.train_dataset.images).abs()
    assert 0 < change.mean() < 0.2 and purified.images.min() >= 0 and purified.images.max() <= 1
    assert callback.stats["purify/chunks_computed_rank0"] == 5  # ceil(1,258 / 300)


def test_repeated_run_reuses_cache_and_interrupted_run_keeps_finished_chunks(tmp_path):
    reference = fit_with(CountingPurification(tiny_ebm(), steps=3, chunk_size=200, cache_dir=str(tmp_path / "a"),
                                              progress=False)).images
    interrupted = CountingPurification(tiny_ebm(), steps=3, chunk_size=200, cache_dir=str(tmp_path / "b"),
                                       progress=False, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        interrupted.purify_dataset(*_images_and_trainer())
    assert len(list((tmp_path / "b").rglob("chunk_*.pt"))) == 2
    resumed = CountingPurification(tiny_ebm(), steps=3, chunk_size=200, cache_dir=str(tmp_path / "b"), progress=False)
    images = fit_with(resumed).images
    assert resumed.calls == 7 - 2 and torch.equal(images, reference)
    again = CountingPurification(tiny_ebm(), steps=3, chunk_size=200, cache_dir=str(tmp_path / "b"), progress=False)
    assert torch.equal(fit_with(again).images, reference) and again.calls == 0


def test_corrupted_chunk_is_rebuilt_and_other_parameters_get_other_keys(tmp_path):
    first = CountingPurification(tiny_ebm(), steps=3, chunk_size=400, cache_dir=str(tmp_path), progress=False)
    reference = fit_with(first).images
    chunk = sorted(tmp_path.rglob("chunk_00001.pt"))[0]
    payload = bytearray(chunk.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    chunk.write_bytes(bytes(payload))
    rebuilt = CountingPurification(tiny_ebm(), steps=3, chunk_size=400, cache_dir=str(tmp_path), progress=False)
    assert torch.equal(fit_with(rebuilt).images, reference) and rebuilt.calls == 1
    other = CountingPurification(tiny_ebm(seed=1), steps=3, chunk_size=400, cache_dir=str(tmp_path), progress=False)
    fit_with(other)
    assert other.calls == 4 and other.key != first.key


def test_filt_purifies_only_the_highest_energy_fraction(tmp_path):
    ebm = tiny_ebm()
    images = torch.rand(40, 1, 8, 8)
    callback = PureGenFilt(ebm, None, fraction=0.25, ebm_steps=3, chunk_size=16, cache_dir=str(tmp_path),
                           progress=False)
    out = callback.purify_dataset(images, _Trainer(), torch.device("cpu"))
    moved = (out != images).flatten(1).any(1)
    assert moved.sum() == 10
    with torch.no_grad():
        energies = ebm.energy(images)
    assert energies[moved].min() >= energies[~moved].max()


class _Trainer:
    """The few trainer attributes the purification's work loop reads."""

    def __init__(self, world_size: int = 1, global_rank: int = 0):
        self.world_size, self.global_rank, self.is_global_zero = world_size, global_rank, global_rank == 0
        self.default_root_dir = "."


def _images_and_trainer():
    datamodule = DigitsDataModule(source="sklearn8x8", seed=0)
    datamodule.setup("fit")
    return datamodule.train_dataset.images, _Trainer(), torch.device("cpu")


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, lightning as L
    from lit_robust import EBM, ImageClassifier
    from lit_robust.callbacks import EBMPurification
    from lit_robust.datamodules import DigitsDataModule
    devices, out, cache = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    ebm = EBM(img_size=8, channels=(4, 8), down=(True, False), bank_size=4)
    datamodule = DigitsDataModule(source="sklearn8x8", batch_size=64, seed=0)
    callback = EBMPurification(ebm, steps=4, chunk_size=150, cache_dir=cache, progress=False)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
                        callbacks=[callback],
                        logger=False, enable_checkpointing=False, limit_val_batches=0, enable_model_summary=False,
                        enable_progress_bar=False)
    trainer.fit(ImageClassifier(), datamodule=datamodule)
    if trainer.is_global_zero:
        torch.save(trainer.train_dataloader.dataset.images, out)
""")


@pytest.mark.slow  # ≈ 45 s; in CI, tests/test_example_project.py checks 2-process purification against one process
def test_two_ddp_processes_give_the_single_process_purified_set(tmp_path):
    script = tmp_path / "purify_ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"}
    for devices in (1, 2):
        subprocess.run([sys.executable, str(script), str(devices), str(tmp_path / f"out{devices}.pt"),
                        str(tmp_path / f"cache{devices}")], check=True, env=env, cwd=tmp_path, timeout=240,
                       capture_output=True)
    single, double = (torch.load(tmp_path / f"out{n}.pt", weights_only=True) for n in (1, 2))
    clean = _images_and_trainer()[0]
    assert single.shape == clean.shape and torch.equal(single, double)
    assert (single - clean).abs().mean() > 1e-3  # the identity is not the trivial "nothing was purified"
    # 9 chunks of 150: rank 0 wrote chunks 0, 2, …, 8, rank 1 chunks 1, 3, 5, 7, each its own files.
    assert len(list((tmp_path / "cache2").rglob("chunk_*.pt"))) == 9


def test_poisoned_data_gets_the_fig_6_2_trajectory_plot_and_numbers(tmp_path):
    import json

    from lit_robust.datamodules import PoisonedDataModule

    datamodule = PoisonedDataModule(DigitsDataModule(source="sklearn8x8", batch_size=64, seed=0), attack="badnets",
                                    params={"source_class": 1, "target_class": 7, "fraction": 0.5, "shape": "pixel",
                                            "position": [6, 6], "value": 1.0}, cache_dir=str(tmp_path / "poisons"),
                                    progress=False)
    callback = EBMPurification(tiny_ebm(), steps=6, chunk_size=400, cache_dir=str(tmp_path), progress=False,
                               trajectory_images=8)
    trainer = L.Trainer(max_steps=1, callbacks=[callback, MetricsFile(str(tmp_path / "run"))], logger=False,
                        enable_checkpointing=False, limit_val_batches=0, enable_model_summary=False,
                        enable_progress_bar=False, default_root_dir=str(tmp_path / "run"))
    trainer.fit(ImageClassifier(), datamodule=datamodule)
    assert (tmp_path / "run" / "plots" / "EBMPurification_l2_trajectory.png").exists()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # at step 6 the clean chain has moved away from x, and the poisoned chain started at x + δ (δ ≠ 0)
    assert metrics["purify/fig62_clean_vs_clean_purified_at_6"] > 0
    assert metrics["purify/fig62_clean_vs_poisoned_purified_at_6"] > metrics["purify/fig62_clean_vs_clean_purified_at_6"]


def test_shipped_ebm_moves_perturbed_digits_back_towards_their_clean_originals():
    """PureEBM's premise (thesis §6.3): mid-run Langevin on the shipped digits EBM pulls a perturbed image (±0.15 per
    pixel) back towards its clean original in ℓ2, every one of 32. Catches an identity purification (no closer) and a chain whose
    energy gradient does nothing (the same chain with a constant energy only adds noise)."""
    import copy

    ebm = EBM.pretrained("digits")
    digits = DigitsDataModule()
    digits.setup("fit")
    clean = digits.test_dataset.images[:32]
    signs = torch.randint(0, 2, clean.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    perturbed = (clean + 0.15 * signs).clamp(0, 1)
    flat = copy.deepcopy(ebm)
    with torch.no_grad():
        flat.net.head.weight.zero_()
    distance = lambda images: (images - clean).flatten(1).norm(dim=1)
    purified = distance(ebm.purify(perturbed, 50, generator=torch.Generator().manual_seed(1))[0])
    noise_only = distance(flat.purify(perturbed, 50, generator=torch.Generator().manual_seed(1))[0])
    assert (purified < distance(perturbed)).all()
    assert noise_only.mean() > distance(perturbed).mean()


# ---- behaviour of DDPMPurification / PureGen-NAIVE / PureGen-REPS (issue #29) -------------------------------------
# Data "images" x₀ ~ N(0.55, 0.1²) per pixel ([−1, 1] space: N(0.1, 0.2²)); the DDPM's network is the closed-form
# optimal ε-predictor of that distribution (tests/test_ddpm.py), the EBM's energy is its quadratic log-density.
from test_ddpm import GaussianOptimalDenoiser, tiny_ddpm  # noqa: E402  (tests/ is on sys.path under pytest)

from lit_robust.callbacks.purification import DDPMPurification, PureGenNaive, PureGenReps  # noqa: E402

DATA_MEAN, DATA_STD = 0.55, 0.1


def gaussian_ddpm():
    ddpm = tiny_ddpm().eval()
    ddpm.unet = GaussianOptimalDenoiser(ddpm.scheduler, mean=2 * DATA_MEAN - 1, std=2 * DATA_STD)
    return ddpm


class QuadraticEnergy(torch.nn.Module):
    """G(x) = c·‖x − μ‖²/2 in [−1, 1] space, with c = T/ε² so that one Langevin step (x − ε²/(2T)·∇G + ε·noise)
    halves the distance to μ: the EBM's chain contracts every image onto the data mean."""

    def __init__(self, mean: float, scale: float):
        super().__init__()
        self.mean, self.scale = mean, scale

    def forward(self, x):
        return 0.5 * self.scale * (x - self.mean).pow(2).flatten(1).sum(1)


def quadratic_ebm():
    ebm = tiny_ebm()
    ebm.net = QuadraticEnergy(2 * DATA_MEAN - 1, ebm.hparams.temperature / ebm.hparams.step_size ** 2)
    return ebm


def shifted_images(shift: float, n: int = 2000) -> torch.Tensor:
    return DATA_MEAN + shift + DATA_STD * torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _close_to_data_mean(out: torch.Tensor) -> bool:
    """|mean − 0.55| within 5 standard errors (pixels are independent under these per-pixel models)."""
    return abs(out.mean().item() - DATA_MEAN) < 5 * out.std().item() / out.numel() ** 0.5


def test_ddpm_purification_maps_shifted_images_to_the_data_distribution(tmp_path):
    """DDPMPurification with the optimal ε-predictor of N(0.55, 0.1²), from t = 1000, turns images shifted to
    N(0.80, 0.1²) into samples of N(0.55, 0.1²): mean within 5 standard errors, std within 5 %. Catches an identity
    purify_chunk (mean stays 0.80), a random output (uniform: std 0.29) and a callback that ignores forward_steps
    (shown failing with purify_chunk stubbed to ``images``, to ``torch.rand_like(images)`` and to
    ``ddpm.purify(images, 10, generator)``)."""
    images = shifted_images(0.25)
    callback = DDPMPurification(gaussian_ddpm(), forward_steps=1000, chunk_size=500, cache_dir=str(tmp_path),
                                progress=False)
    out = callback.purify_dataset(images, _Trainer(), torch.device("cpu"))
    assert out.shape == images.shape
    assert _close_to_data_mean(out), out.mean()
    assert out.std().item() == pytest.approx(DATA_STD, rel=0.05)


@pytest.mark.parametrize("cls,defaults", [(PureGenNaive, (150, 75, 1)), (PureGenReps, (10, 50, 5))])
def test_puregen_runs_ebm_then_ddpm_reps_times_on_each_chunk(tmp_path, cls, defaults):
    """Recording stubs for ``ebm.purify`` (x ↦ x/2) and ``ddpm.purify`` (x ↦ x + 0.1): every chunk goes through
    EBM then DDPM, ``reps`` times, with the thesis' default steps (NAIVE T = [150, 75, 1], REPS [10, 50, 5]), one
    generator shared by both, each stage fed the previous stage's output — the result equals the composition computed
    here. Catches a swapped order (x/2 + 0.05 ≠ x/2 + 0.1), a wrong count and a dropped stage (shown failing with the
    loop body's two lines swapped and with ``range(self.reps)`` → ``range(1)``)."""
    ebm_steps, ddpm_steps, reps = defaults
    ebm, ddpm = tiny_ebm(), tiny_ddpm()
    calls, generators = [], []

    def ebm_purify(images, steps, step_size=None, temperature=None, generator=None, **kwargs):
        calls.append(("ebm", steps))
        generators.append(generator)
        return images / 2, []

    def ddpm_purify(images, forward_steps, generator=None):
        calls.append(("ddpm", forward_steps))
        generators.append(generator)
        return images + 0.1

    ebm.purify, ddpm.purify = ebm_purify, ddpm_purify
    images = 0.25 + 0.5 * torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    callback = cls(ebm, ddpm, chunk_size=4, cache_dir=str(tmp_path), progress=False)
    assert (callback.ebm_steps, callback.ddpm_steps, callback.reps) == defaults
    out = callback.purify_dataset(images, _Trainer(), torch.device("cpu"))
    assert calls == [("ebm", ebm_steps), ("ddpm", ddpm_steps)] * reps * 3  # 3 chunks of ≤ 4 images
    per_chunk = 2 * reps
    assert all(g is generators[c * per_chunk] for c in range(3) for g in generators[c * per_chunk:(c + 1) * per_chunk])
    expected = images.clone()
    for _ in range(reps):
        expected = expected / 2 + 0.1
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("cls,steps", [(PureGenNaive, dict(ebm_steps=15, ddpm_steps=30)),
                                       (PureGenReps, dict(ebm_steps=15, ddpm_steps=30, reps=2))])
def test_puregen_with_gaussian_models_recentres_then_restores_the_spread(tmp_path, cls, steps):
    """Numeric effect on images shifted to N(0.85, 0.1²) with analytic models of the data N(0.55, 0.1²): the EBM's
    Langevin chain (quadratic energy) pulls every pixel onto the data mean but leaves almost no spread; the DDPM
    from t = 30 alone barely moves the mean but restores spread. EBM-then-DDPM must give the data mean (within 5
    standard errors; the DDPM alone is far off) AND more than 3× the spread of the EBM alone — both references are
    computed here. Catches an identity or DDPM-only chunk (mean), an EBM-only chunk or the order swapped to DDPM-then-EBM
    (spread), and a random output (mean/spread) (each shown failing by stubbing purify_chunk)."""
    images = shifted_images(0.3)
    ebm, ddpm = quadratic_ebm(), gaussian_ddpm()
    out = cls(ebm, ddpm, chunk_size=1000, cache_dir=str(tmp_path), progress=False, **steps).purify_dataset(
        images, _Trainer(), torch.device("cpu"))
    ebm_only = ebm.purify(images, steps["ebm_steps"], generator=torch.Generator().manual_seed(2))[0]
    ddpm_only = ddpm.purify(images, steps["ddpm_steps"], torch.Generator().manual_seed(2))
    assert not _close_to_data_mean(ddpm_only)  # the reference: the DDPM step alone does not re-centre
    assert _close_to_data_mean(out), out.mean()
    assert out.std() > 3 * ebm_only.std(), (out.std(), ebm_only.std())


def test_channels_last_purifies_in_that_format_to_the_same_images_under_its_own_cache_key(tmp_path):
    """EBMPurification runs the EBM and its chunks in channels_last (a convolution speed-up); the result equals the
    contiguous run to float rounding and lands under another cache key. Fails if the option is ignored (the chunk
    the EBM sees is not channels_last, or the keys coincide) or if it changes the purification itself."""
    images = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    class Recording(EBMPurification):
        def purify_chunk(self, chunk, indices, generator):
            weight = self.ebm.net.blocks[1].conv1.weight  # 4 → 8 channels: the two formats differ
            seen.append(chunk.is_contiguous(memory_format=torch.channels_last) and
                        weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous())
            return super().purify_chunk(chunk, indices, generator)

    runs = {}
    for channels_last in (True, False):
        seen.clear()
        callback = Recording(tiny_ebm(), steps=5, chunk_size=4, cache_dir=str(tmp_path), progress=False,
                             channels_last=channels_last)
        runs[channels_last] = (callback.purify_dataset(images, _Trainer(), torch.device("cpu")), callback.key)
        assert seen == [channels_last] * 3
    (fast, fast_key), (plain, plain_key) = runs[True], runs[False]
    assert fast_key != plain_key and (fast - images).abs().mean() > 1e-3
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)
    assert EBMPurification(tiny_ebm()).channels_last and not Purification().channels_last


def test_the_cache_key_covers_the_weights_purification_uses_not_the_ebms_replay_bank():
    """Two unseeded processes build EBMs with other random replay banks (training state Langevin purification never
    reads): their keys agree, so a repeated run hits the cache; other energy weights, settings or images change it."""
    images = torch.rand(4, 1, 8, 8)
    first, second = tiny_ebm(), tiny_ebm()
    second.bank.uniform_(-1, 1)
    key = EBMPurification(first, steps=3).cache_key(images)
    assert EBMPurification(second, steps=3).cache_key(images) == key
    assert EBMPurification(tiny_ebm(seed=1), steps=3).cache_key(images) != key
    assert EBMPurification(first, steps=4).cache_key(images) != key
    assert EBMPurification(first, steps=3).cache_key(images.flip(0)) != key
