"""Exact resume and determinism of `mamba-dense fit` (real CLI subprocesses on the shrunk demo config).

Every run trains the demo recipe (VMamba + UPerNet on the synthetic shapes, random resize / crop /
flip / photometric augmentation) at toy size for 2 epochs of 6 steps on the CPU, with dropout and
drop path switched on so that the global RNG matters, `--trainer.deterministic true` and one thread.
`_resume_probe.StepProbe` writes one line per training step (hash of the batch, loss as float.hex)
and per validation. A killed run dies by SIGKILL (a real kill: no exception, no cleanup) and is
resumed with `--ckpt_path last` in a new process.

Tolerance: none. Batches, per-step losses and validation metrics must be bit-identical to the
uninterrupted run's (CPU, deterministic algorithms, OMP_NUM_THREADS=1).
"""

import glob
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo" / "shapes.yaml"
STEPS_PER_EPOCH, EPOCHS, EVERY = 6, 2, 3  # 12 images / batch 2; a checkpoint every 3 steps


def fit(tmp: Path, name: str, *extra: str, kill_at_step: int = -1, kill_in_save_at_step: int = -1,
        log: str = "") -> tuple[subprocess.CompletedProcess, list[dict]]:
    """One `mamba-dense fit` subprocess under `tmp/name` (the dataset in `tmp/shapes`); returns it and
    the probe's records (file `tmp/<log or name>.jsonl`)."""
    run_dir, records, data = tmp / name, tmp / f"{log or name}.jsonl", tmp / "shapes"
    # NOTE: jsonargparse merges these init_args into the demo's ModelCheckpoint: unset its monitor
    callbacks = (
        "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: "
        f"{{every_n_train_steps: {EVERY}, save_last: true, save_top_k: 0, monitor: null, filename: null}}}}, "
        f"{{class_path: _resume_probe.StepProbe, init_args: {{path: '{records}', kill_at_step: {kill_at_step}, "
        f"kill_in_save_at_step: {kill_in_save_at_step}}}}}]"
    )
    args = [
        sys.executable, "-m", "mamba_dense.cli", "fit", "--config", str(DEMO),
        "--model.init_args.encoder_kwargs={dims: 16, depths: [1, 1, 1, 1]}",
        "--model.init_args.head_kwargs={channels: 16, norm: groupnorm, dropout: 0.1}",
        "--model.init_args.drop_path_rate=0.1", "--model.init_args.warmup_iters=4",
        f"--data.init_args.root={data}", "--data.init_args.crop_size=64", "--data.init_args.batch_size=2",
        "--data.init_args.val_batch_size=2", "--data.init_args.num_train=12", "--data.init_args.num_val=2",
        f"--trainer.max_epochs={EPOCHS}", "--trainer.accelerator=cpu", "--trainer.deterministic=true",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={run_dir}", f"--trainer.callbacks={callbacks}",
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = records.read_text().splitlines() if records.exists() else []
    return proc, [json.loads(line) for line in lines]


def steps(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records if "batch" in r}


def vals(records: list[dict]) -> dict[int, dict]:
    return {r["val_epoch"]: r["metrics"] for r in records if "val_epoch" in r}


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def reference(tmp) -> list[dict]:
    """The uninterrupted run."""
    proc, records = fit(tmp, "reference")
    ok(proc)
    assert sorted(steps(records)) == list(range(STEPS_PER_EPOCH * EPOCHS)) and sorted(vals(records)) == [0, 1]
    return records


def test_two_runs_are_bit_identical(tmp, reference):
    proc, records = fit(tmp, "twin")
    ok(proc)
    assert steps(records) == steps(reference)  # same batches, losses equal bit for bit
    assert vals(records) == vals(reference)
    losses = [float.fromhex(r["loss"]) for r in steps(reference).values()]
    assert len(set(losses)) > 1 and all(map(torch.isfinite, torch.tensor(losses)))


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp, reference):
    kill_at = STEPS_PER_EPOCH + EVERY + 2  # epoch 1, batch 5; the last checkpoint holds 9 steps
    proc, before = fit(tmp, "killed", kill_at_step=kill_at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    assert sorted(steps(before)) == list(range(kill_at))
    last = tmp / "killed" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == STEPS_PER_EPOCH + EVERY
    loader_state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state == [{"epoch": 1, "batches": EVERY, "seed": 0}]

    # resumed in the same folder, so that `--ckpt_path last` has to find version_0's checkpoint
    proc, after = fit(tmp, "killed", "--ckpt_path=last", log="resumed")
    ok(proc)
    assert "Resuming from the newest last checkpoint" in proc.stderr + proc.stdout
    assert "not resumable" not in proc.stderr  # Lightning sees a stateful loader
    redone = steps(after)
    assert sorted(redone) == list(range(STEPS_PER_EPOCH + EVERY, STEPS_PER_EPOCH * EPOCHS))
    ref = steps(reference)
    assert {s: ref[s] for s in steps(before)} == steps(before)
    assert {s: ref[s] for s in redone} == redone  # same batches, same augmentation, same losses
    assert vals(after)[EPOCHS - 1] == vals(reference)[EPOCHS - 1]  # final validation metrics, bit for bit


def test_sigkill_while_saving_keeps_the_previous_checkpoint_then_resume_matches(tmp, reference):
    save_at = STEPS_PER_EPOCH + EVERY  # killed half-way through writing the step-9 checkpoint
    proc, before = fit(tmp, "killed_in_save", kill_in_save_at_step=save_at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    folder = tmp / "killed_in_save" / "lightning_logs" / "version_0" / "checkpoints"
    partial = glob.glob(str(folder / ".last.ckpt.*.tmp"))
    assert len(partial) == 1 and os.path.getsize(partial[0]) > 0  # the kill hit the write itself
    ckpt = torch.load(folder / "last.ckpt", weights_only=True)  # complete: the previous checkpoint
    assert ckpt["global_step"] == STEPS_PER_EPOCH  # saved after the epoch's last batch, before validation

    proc, after = fit(tmp, "killed_in_save", "--ckpt_path=last", log="resumed_after_save")
    ok(proc)
    ref = steps(reference)
    redone = steps(after)
    assert sorted(redone) == list(range(STEPS_PER_EPOCH, STEPS_PER_EPOCH * EPOCHS))
    assert {s: ref[s] for s in redone} == redone
    # NOTE: Lightning 2.6 does not run the epoch-0 validation that the killed run never reached (the
    # checkpoint was taken after the epoch's last batch, before it); training does not depend on it
    assert vals(after) == {EPOCHS - 1: vals(reference)[EPOCHS - 1]}


def test_loader_resumes_mid_epoch_with_workers(tmp, reference):
    """The training loader alone: an epoch read by 2 workers from a saved position continues exactly the
    epoch that the main process reads whole (same order, same augmentation)."""
    from mamba_dense.datamodules import ShapesDataModule

    def loader(workers: int):
        dm = ShapesDataModule(str(tmp / "shapes"), crop_size=64, batch_size=2, num_train=12, num_val=2,
                              num_workers=workers, persistent_workers=False)
        dm.setup("fit")
        return dm.train_dataloader()

    whole = loader(0)
    whole.sampler.set_epoch(3)
    expected = [(b["image"], b["mask"], b["name"]) for b in whole]
    first = iter(whole)
    for _ in range(2):
        next(first)
    state = whole.state_dict()
    assert state == {"epoch": 3, "batches": 2, "seed": 0}
    resumed = loader(2)
    resumed.load_state_dict(state)
    rest = [(b["image"], b["mask"], b["name"]) for b in resumed]
    assert len(rest) == len(expected) - 2
    for (image, mask, names), (image2, mask2, names2) in zip(expected[2:], rest):
        assert names == names2 and torch.equal(image, image2) and torch.equal(mask, mask2)
