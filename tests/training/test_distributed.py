"""DINO on 2 CPU processes (gloo DDP): every rank ends with the same teacher and centre.

The worker script is written to a temporary folder and run as ``python worker.py OUT``;
Lightning's DDP launcher re-runs it for rank 1. Each rank saves what it saw and what it ended
with; the test compares the ranks with each other and with formulas written here.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from dino_fixtures import TinyConv3d, gloo_env

N_SAMPLES, BATCH, EPOCHS, WORLD = 16, 2, 2, 2
BASE_LAMBDA, CENTER_MOMENTUM = 0.9, 0.9

WORKER = textwrap.dedent(
    f"""
    import sys
    from pathlib import Path

    import torch
    from pytorch_lightning.callbacks import Callback
    from torch.utils.data import DataLoader

    from nidl_dino import DINO
    from dino_fixtures import QUIET_TRAINER, SMALL_HEAD, RandomViews, TinyConv3d

    torch.set_num_threads(1)
    out = Path(sys.argv[1])


    def flat(*modules):
        return torch.cat(
            [p.detach().flatten().double().clone() for m in modules for p in m.parameters()]
        )


    class Recorder(Callback):
        # Callbacks' on_train_batch_end runs before the module's, i.e. before the EMA update.
        def __init__(self):
            self.steps, self.pending = [], None

        def close(self, module):
            if self.pending is not None:
                self.pending["teacher_after"] = flat(module.teacher, module.teacher_head)
                self.steps.append(self.pending)
                self.pending = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.close(module)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.pending = {{
                "global_step": int(trainer.global_step),
                "y": outputs["y"].tolist(),
                "z_teacher": outputs["z_teacher"].detach().clone(),
                "teacher_before": flat(module.teacher, module.teacher_head),
                "student": flat(module.student, module.student_head),
            }}

        def on_train_end(self, trainer, module):
            self.close(module)


    recorder = Recorder()
    model = DINO(
        TinyConv3d,
        encoder_kwargs={{"dim": 8}},
        num_local_crops=2,
        warmup_teacher_temp_epochs=1,
        base_lambda={BASE_LAMBDA},
        final_lambda=1.0,
        optimizer="sgd",
        learning_rate=0.1,
        lr_scheduler="none",
        random_state=0,
        devices={WORLD},
        strategy="ddp",
        max_epochs={EPOCHS},
        callbacks=[recorder],
        default_root_dir=str(out),
        **QUIET_TRAINER,
        **SMALL_HEAD,
    )
    model.fit(DataLoader(RandomViews(n={N_SAMPLES}, with_targets=True), batch_size={BATCH}))
    rank, global_step = model.global_rank, int(model.trainer.global_step)
    volumes = torch.randn(7, 1, 12, 12, 12, generator=torch.Generator().manual_seed(5))
    features = model.transform(DataLoader(volumes, batch_size=3))
    torch.save(
        {{
            "rank": rank,
            "global_step": global_step,
            "steps": recorder.steps,
            "teacher": model.teacher.state_dict(),
            "teacher_head": model.teacher_head.state_dict(),
            "center": model.loss.center.clone(),
            "volumes": volumes,
            "features": features,
        }},
        out / f"rank{{rank}}.pt",
    )
    """
)


def cosine(k: int, total: int, base: float, final: float) -> float:
    return final + (base - final) * (1 + math.cos(math.pi * k / total)) / 2


pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ddp")
    script = folder / "worker.py"
    script.write_text(WORKER)
    env = gloo_env()
    done = subprocess.run(
        [sys.executable, str(script), str(folder)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [r["rank"] for r in results] == list(range(WORLD))
    return results


def test_ranks_see_disjoint_halves_and_count_global_optimizer_steps(ranks):
    per_rank_batches = N_SAMPLES // WORLD // BATCH
    total = per_rank_batches * EPOCHS
    for r in ranks:
        assert r["global_step"] == total
        assert [s["global_step"] for s in r["steps"]] == list(range(1, total + 1))
    # DistributedSampler (Lightning shuffles training data): in each epoch every rank sees its
    # own half of the data and every sample is seen once
    for epoch in range(EPOCHS):
        epoch_steps = slice(epoch * per_rank_batches, (epoch + 1) * per_rank_batches)
        seen = [[i for s in r["steps"][epoch_steps] for i in s["y"]] for r in ranks]
        assert all(len(s) == N_SAMPLES // WORLD for s in seen)
        assert sorted(seen[0] + seen[1]) == list(range(N_SAMPLES))


def test_momentum_follows_cosine_over_global_optimizer_steps(ranks):
    total = N_SAMPLES // WORLD // BATCH * EPOCHS
    for r in ranks:
        for k, s in enumerate(r["steps"]):
            before, student, after = s["teacher_before"], s["student"], s["teacher_after"]
            # teacher_after = m * before + (1 - m) * student: m by least squares
            d = before - student
            assert d.norm() > 1e-3  # the test can fail: the student moved away
            m = float((after - student) @ d / (d @ d))
            assert m == pytest.approx(cosine(k, total, BASE_LAMBDA, 1.0), abs=1e-4), k
            assert torch.allclose(after, m * before + (1 - m) * student, atol=1e-6)


def test_teacher_and_center_identical_on_all_ranks(ranks):
    first, second = ranks
    for part in ("teacher", "teacher_head"):
        assert first[part].keys() == second[part].keys()
        for key, value in first[part].items():
            assert torch.allclose(value.double(), second[part][key].double(), atol=1e-6), (
                f"{part}.{key} differs between ranks"
            )
    assert torch.allclose(first["center"], second["center"], atol=1e-6)
    assert torch.count_nonzero(first["center"]) > 0


def test_center_is_ema_of_teacher_outputs_over_all_ranks(ranks):
    # A single process fed the union of the ranks' batches: centre <- m c + (1 - m) mean(z_t)
    center = torch.zeros(1, 1, ranks[0]["center"].shape[-1], dtype=torch.float64)
    for k in range(len(ranks[0]["steps"])):
        outputs = torch.cat([r["steps"][k]["z_teacher"].double() for r in ranks], dim=1)
        batch_center = outputs.mean(dim=(0, 1), keepdim=True)
        center = CENTER_MOMENTUM * center + (1 - CENTER_MOMENTUM) * batch_center
    for r in ranks:
        assert torch.allclose(r["center"].double(), center, atol=1e-6)


def test_transform_returns_every_sample_once_in_loader_order(ranks):
    for r in ranks:
        encoder = TinyConv3d(dim=8)
        encoder.load_state_dict(r["teacher"])
        encoder.eval()
        with torch.no_grad():
            expected = torch.cat([encoder(v[None]) for v in r["volumes"]])
        assert r["features"].shape == (len(r["volumes"]), 8)
        assert torch.allclose(r["features"], expected, atol=1e-5)
