"""DINO estimator: training numerics, state, resume, API and errors (CPU, tiny models)."""

import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from nidl_dino import DINO, DINOLoss, DINOProjectionHead
from nidl_dino.core.base import NotFittedError

from dino_fixtures import SMALL_HEAD, FlattenLinear, RandomViews, TinyConv3d, views_loader


def make_dino(trainer_kwargs, encoder=FlattenLinear, n_local=2, **kwargs):
    params = dict(
        encoder_kwargs={"dim": 8},
        num_local_crops=n_local,
        warmup_teacher_temp_epochs=2,
        lr_scheduler_kwargs={"warmup_epochs": 1},
        random_state=0,
        **SMALL_HEAD,
    )
    params.update(kwargs)
    return DINO(encoder, **params, **trainer_kwargs)


def flat_params(module):
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def momentum_formula(k, total, base, final):
    return final - (final - base) * (math.cos(math.pi * k / total) + 1) / 2


class EMARecorder(Callback):
    """Callbacks' on_train_batch_end runs before the module's: teacher is still pre-EMA."""

    def __init__(self):
        self.records = []
        self._pending = None

    def _close_pending(self, pl_module):
        if self._pending is not None:
            self._pending["teacher_after"] = flat_params(pl_module.teacher)
            self.records.append(self._pending)
            self._pending = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._close_pending(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._pending = {
            "global_step": trainer.global_step,
            "teacher_before": flat_params(pl_module.teacher),
            "student": flat_params(pl_module.student),
            "outputs": outputs,
        }

    def on_train_end(self, trainer, pl_module):
        self._close_pending(pl_module)


def test_public_api_and_documented_attributes(quiet_trainer_kwargs):
    model = make_dino(quiet_trainer_kwargs)
    assert isinstance(model.loss, DINOLoss)
    assert isinstance(model.student_head, DINOProjectionHead)
    assert isinstance(model.teacher_head, DINOProjectionHead)
    assert model.encoder is model.teacher
    assert model.student is not model.teacher
    assert torch.equal(flat_params(model.student), flat_params(model.teacher))
    assert torch.equal(flat_params(model.student_head), flat_params(model.teacher_head))
    assert model.optimizer == "adamW" and model.lr_scheduler == "warmup_cosine"
    assert model.lr_scheduler_kwargs == {
        "warmup_epochs": 1,
        "warmup_start_lr": 1e-6,
        "min_lr": 0.0,
        "interval": "step",
    }
    assert model.num_large_crops == 2
    assert model.trainer_params["enable_checkpointing"] is False


@pytest.mark.parametrize("encoder", [FlattenLinear, TinyConv3d])
def test_fit_and_transform_rows_in_loader_order(quiet_trainer_kwargs, encoder):
    model = make_dino(quiet_trainer_kwargs, encoder=encoder, max_epochs=2)
    assert model.fit(views_loader()) is model
    assert model.fitted
    volumes = torch.randn(7, 1, 12, 12, 12)
    features = model.transform(DataLoader(volumes, batch_size=3))
    assert features.shape == (7, 8)
    model.eval()
    with torch.no_grad():
        expected = torch.cat([model.teacher(volumes[i : i + 1]) for i in range(7)])
    assert torch.allclose(features, expected, atol=1e-5)


def test_transform_with_targets_and_before_fit(quiet_trainer_kwargs):
    model = make_dino(quiet_trainer_kwargs, max_epochs=1)
    pairs = [(torch.randn(1, 12, 12, 12), torch.tensor(i)) for i in range(5)]
    with pytest.raises(NotFittedError, match="not fitted yet: call fit"):
        model.transform(DataLoader(pairs, batch_size=2))
    model.fit(views_loader())
    features, targets = model.transform_with_targets(DataLoader(pairs, batch_size=2))
    assert features.shape == (5, 8)
    assert targets.tolist() == [0, 1, 2, 3, 4]


def test_training_step_outputs_and_teacher_never_gets_gradients(quiet_trainer_kwargs):
    rec = EMARecorder()
    model = make_dino({**quiet_trainer_kwargs, "callbacks": [rec]}, max_steps=2, n_local=3)
    model.fit(views_loader(n_local=3, with_targets=True))
    out = rec.records[0]["outputs"]
    assert set(out) == {"loss", "z_student", "z_teacher", "y"}
    assert out["loss"].shape == ()
    assert out["z_student"].shape == (5, 4, 32)
    assert out["z_teacher"].shape == (2, 4, 32)
    assert out["z_teacher"].grad_fn is None
    assert out["y"].tolist() == [0, 1, 2, 3]
    for p in [*model.teacher.parameters(), *model.teacher_head.parameters()]:
        assert not p.requires_grad and p.grad is None


def test_momentum_first_middle_last_step(quiet_trainer_kwargs):
    rec = EMARecorder()
    total = 5
    model = make_dino(
        {**quiet_trainer_kwargs, "callbacks": [rec]},
        max_steps=total,
        base_lambda=0.9,
        final_lambda=1.0,
        optimizer="sgd",
        learning_rate=0.5,
    )
    model.fit(views_loader(n=4 * total))
    assert [r["global_step"] for r in rec.records] == [1, 2, 3, 4, 5]
    for k in (0, 2, 4):
        r = rec.records[k]
        m = momentum_formula(k, total, 0.9, 1.0)
        expected = m * r["teacher_before"] + (1 - m) * r["student"]
        assert torch.allclose(r["teacher_after"], expected, atol=1e-6), k
        assert not torch.allclose(r["teacher_before"], r["student"])  # the test can fail
    assert model.momentum_at(0) == pytest.approx(0.9)
    assert model.momentum_at(2) == pytest.approx(1.0 - 0.1 * (1 + math.cos(2 * math.pi / 5)) / 2)


def test_teacher_updated_once_per_optimizer_step_under_accumulation(quiet_trainer_kwargs):
    rec = EMARecorder()
    model = make_dino(
        {**quiet_trainer_kwargs, "callbacks": [rec], "accumulate_grad_batches": 2},
        max_epochs=1,
        base_lambda=0.8,
    )
    model.fit(views_loader(n=16))  # 4 batches -> 2 optimizer steps
    assert [r["global_step"] for r in rec.records] == [0, 1, 1, 2]
    for idx in (0, 2):  # no optimizer step on these batches: teacher untouched
        assert torch.equal(rec.records[idx]["teacher_after"], rec.records[idx]["teacher_before"])
    for idx, k in ((1, 0), (3, 1)):
        r = rec.records[idx]
        m = momentum_formula(k, 2, 0.8, 1.0)
        assert torch.allclose(
            r["teacher_after"], m * r["teacher_before"] + (1 - m) * r["student"], atol=1e-6
        )


def test_learning_rate_follows_warmup_cosine_per_step(quiet_trainer_kwargs):
    seen = []

    class LR(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    model = make_dino(
        {**quiet_trainer_kwargs, "callbacks": [LR()]},
        max_epochs=3,
        learning_rate=0.01,
        lr_scheduler_kwargs={"warmup_epochs": 1, "warmup_start_lr": 0.001, "min_lr": 0.0},
    )
    model.fit(views_loader(n=8))  # 2 steps per epoch, 6 steps, warm-up 2 steps
    expected = [0.001, 0.01] + [0.01 * (1 + math.cos(math.pi * j / 4)) / 2 for j in range(4)]
    assert seen == pytest.approx(expected)


def test_frozen_last_layer_for_first_epochs(quiet_trainer_kwargs):
    snapshots = []

    class Snap(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            head = pl_module.student_head
            snapshots.append((flat_params(head.last_layer), flat_params(head.mlp)))

    model = make_dino(
        {**quiet_trainer_kwargs, "callbacks": [Snap()]},
        max_epochs=2,
        freeze_last_layer=1,
        proj_norm_last_layer=False,
        learning_rate=0.01,
        lr_scheduler="none",
    )
    last0, mlp0 = flat_params(model.student_head.last_layer), flat_params(model.student_head.mlp)
    model.fit(views_loader(n=8))
    assert torch.equal(snapshots[0][0], last0)  # epoch 0: frozen
    assert not torch.equal(snapshots[0][1], mlp0)  # while the rest trains
    assert not torch.equal(snapshots[1][0], last0)  # epoch 1: trained


def test_weight_decay_groups(quiet_trainer_kwargs):
    model = make_dino(quiet_trainer_kwargs, encoder=TinyConv3d, weight_decay=0.1)
    names = {
        id(p): f"{prefix}.{n}"
        for prefix, mod in (("student", model.student), ("head", model.student_head))
        for n, p in mod.named_parameters()
    }
    decay, no_decay = model.parameter_groups()
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "student.net.0.bias" in no_decay_names  # conv bias
    assert "student.net.1.weight" in no_decay_names  # BatchNorm3d weight
    assert "head.mlp.1.weight" in no_decay_names  # BatchNorm1d weight
    assert "student.net.0.weight" in decay_names and "head.mlp.0.weight" in decay_names
    # the frozen weight-norm magnitude (norm_last_layer) is not trained at all
    assert not any("original0" in n for n in decay_names | no_decay_names)
    all_wd = make_dino(quiet_trainer_kwargs, encoder=TinyConv3d, exclude_bias_and_norm_wd=False)
    assert len(all_wd.parameter_groups()) == 1


@pytest.mark.parametrize(
    "optimizer,expected_cls",
    [
        ("sgd", torch.optim.SGD),
        ("adam", torch.optim.Adam),
        ("adamW", torch.optim.AdamW),
        (torch.optim.RMSprop, torch.optim.RMSprop),
        (lambda groups: torch.optim.SGD(groups, lr=0.1), torch.optim.SGD),
    ],
)
def test_optimizer_choices(quiet_trainer_kwargs, optimizer, expected_cls):
    model = make_dino(quiet_trainer_kwargs, max_steps=1, optimizer=optimizer)
    model.fit(views_loader())
    assert type(model.optimizer) is expected_cls
    if optimizer == "sgd":
        assert model.optimizer.param_groups[0]["momentum"] == 0.9


def test_user_lr_scheduler_class_and_none(quiet_trainer_kwargs):
    model = make_dino(
        quiet_trainer_kwargs,
        max_steps=2,
        lr_scheduler=torch.optim.lr_scheduler.StepLR,
        lr_scheduler_kwargs={"step_size": 1, "gamma": 0.5},
    )
    model.fit(views_loader())
    assert isinstance(model.lr_scheduler, torch.optim.lr_scheduler.StepLR)
    model = make_dino(quiet_trainer_kwargs, max_steps=2, lr_scheduler=None, learning_rate=0.02)
    model.fit(views_loader())
    assert model.lr_scheduler is None
    assert model.optimizer.param_groups[0]["lr"] == 0.02


def test_clip_grad_bounds_each_parameter_update(quiet_trainer_kwargs):
    changes = []

    class Delta(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = [p.detach().clone() for p in pl_module.student.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after = list(pl_module.student.parameters())
            changes.extend(
                (a.detach() - b).norm().item() for a, b in zip(after, self.before, strict=True)
            )

    def run(clip):
        changes.clear()
        model = make_dino(
            {**quiet_trainer_kwargs, "callbacks": [Delta()]},
            max_steps=2,
            optimizer="sgd",
            optimizer_kwargs={"momentum": 0.0},
            learning_rate=1.0,
            weight_decay=0.0,
            lr_scheduler="none",
            clip_grad=clip,
        )
        model.fit(views_loader())
        return max(changes)

    # SGD, lr 1, no momentum or decay: each update is the clipped gradient itself
    assert run(1e-4) <= 1e-4 * (1 + 1e-3)
    assert run(0.0) > 1e-3  # without clipping the same updates are much larger


def test_num_local_crops_zero(quiet_trainer_kwargs):
    rec = EMARecorder()
    model = make_dino({**quiet_trainer_kwargs, "callbacks": [rec]}, n_local=0, max_steps=2)
    model.fit(views_loader(n_local=0))
    assert rec.records[0]["outputs"]["z_student"].shape == (2, 4, 32)
    assert torch.isfinite(rec.records[0]["outputs"]["loss"])


def test_validation_and_sanity_check_leave_training_state_untouched(quiet_trainer_kwargs):
    model = make_dino(quiet_trainer_kwargs, max_steps=1)
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = pl.Trainer(**quiet_trainer_kwargs)
    results = trainer.validate(model, views_loader(), verbose=False)
    assert "val/loss" in results[0]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state0[key]), key

    seen = {}

    class AtSanityEnd(Callback):
        def on_sanity_check_end(self, trainer, pl_module):
            seen["center"] = pl_module.loss.center.clone()
            seen["teacher"] = flat_params(pl_module.teacher_head)

    model = make_dino({**quiet_trainer_kwargs, "callbacks": [AtSanityEnd()]}, max_steps=1)
    teacher0 = flat_params(model.teacher_head)
    model.fit(views_loader(), views_loader())
    assert torch.count_nonzero(seen["center"]) == 0
    assert torch.equal(seen["teacher"], teacher0)
    assert torch.count_nonzero(model.loss.center) > 0  # training did move it


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, quiet_trainer_kwargs):
    kwargs = {**quiet_trainer_kwargs, "enable_checkpointing": True}
    loader = views_loader(n=8, n_local=2)  # 2 steps per epoch, 4 in all
    full = make_dino(kwargs, max_epochs=2, learning_rate=0.01)
    full.fit(loader)

    class StopAfterFirstEpoch(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    ckpt_dir = tmp_path / "ckpt"
    first = make_dino(
        {**kwargs, "callbacks": [StopAfterFirstEpoch(), ModelCheckpoint(ckpt_dir, save_last=True)]},
        max_epochs=2,
        learning_rate=0.01,
    )
    first.fit(loader)
    assert first.trainer.global_step == 2
    resumed = make_dino(
        {**kwargs, "callbacks": [ModelCheckpoint(ckpt_dir, save_last=True)]},
        max_epochs=2,
        learning_rate=0.01,
        random_state=123,  # weights come from the checkpoint, not from the seed
    )
    resumed.fit(loader, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert resumed.trainer.global_step == 4
    assert torch.allclose(flat_params(resumed.teacher), flat_params(full.teacher), atol=1e-6)
    assert torch.allclose(
        flat_params(resumed.teacher_head), flat_params(full.teacher_head), atol=1e-6
    )
    assert torch.allclose(resumed.loss.center, full.loss.center, atol=1e-6)
    assert not torch.allclose(flat_params(first.teacher_head), flat_params(full.teacher_head))


def test_save_hparams_false_and_random_state(quiet_trainer_kwargs):
    model = make_dino(quiet_trainer_kwargs, max_steps=1, save_hparams=False)
    assert len(model.hparams) == 0
    model.fit(views_loader())
    a = make_dino(quiet_trainer_kwargs, random_state=7)
    b = make_dino(quiet_trainer_kwargs, random_state=7)
    assert torch.equal(flat_params(a.student_head), flat_params(b.student_head))
    # building a seeded estimator does not reseed the caller's random stream
    torch.manual_seed(5)
    reference = torch.rand(3)
    torch.manual_seed(5)
    make_dino(quiet_trainer_kwargs, random_state=7)
    assert torch.equal(torch.rand(3), reference)
    c = make_dino(quiet_trainer_kwargs, random_state=None)
    d = make_dino(quiet_trainer_kwargs, random_state=None)
    assert not torch.equal(flat_params(c.student_head), flat_params(d.student_head))


def test_hparams_saved_and_checkpoint_reload(tmp_path, quiet_trainer_kwargs):
    model = make_dino(
        {**quiet_trainer_kwargs, "enable_checkpointing": True, "default_root_dir": str(tmp_path)},
        encoder=TinyConv3d,
        max_steps=2,
    )
    assert model.hparams["proj_output_dim"] == 32 and model.hparams["num_local_crops"] == 2
    model.fit(views_loader())
    ckpt = next(tmp_path.rglob("*.ckpt"))
    # weights-only loading: the checkpoint holds no pickled class, only tensors and strings
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["encoder"].endswith(
        ":TinyConv3d"
    )
    loaded = DINO.load_from_checkpoint(ckpt, weights_only=True)
    assert loaded.fitted
    assert torch.equal(flat_params(loaded.teacher), flat_params(model.teacher))
    assert torch.equal(loaded.loss.center, model.loss.center)


def test_bad_arguments_give_one_clear_error(quiet_trainer_kwargs):
    def one_line(exc_info):
        assert "\n" not in str(exc_info.value)

    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'") as e:
        make_dino(quiet_trainer_kwargs, optimizer="lbfgs")
    one_line(e)
    with pytest.raises(ValueError, match="unknown lr_scheduler") as e:
        make_dino(quiet_trainer_kwargs, lr_scheduler="linear")
    one_line(e)
    with pytest.raises(ValueError, match="outputs 8 features but proj_input_dim is 16") as e:
        make_dino(quiet_trainer_kwargs, proj_input_dim=16)
    one_line(e)
    with pytest.raises(ValueError, match="num_local_crops must be >= 0"):
        make_dino(quiet_trainer_kwargs, n_local=-1)

    model = make_dino(quiet_trainer_kwargs, max_steps=1)
    with pytest.raises(ValueError, match="expects batches") as e:
        model.fit(DataLoader(torch.randn(8, 1, 12, 12, 12), batch_size=4))
    one_line(e)
    model = make_dino(quiet_trainer_kwargs, max_steps=1, n_local=4)
    with pytest.raises(ValueError, match="expects 6 views per batch.*got 4") as e:
        model.fit(views_loader(n_local=2))
    one_line(e)


def test_dataset_with_targets_as_spec_format(quiet_trainer_kwargs):
    model = make_dino(quiet_trainer_kwargs, max_steps=1)
    model.fit(DataLoader(RandomViews(n=8, with_targets=True), batch_size=4))
    assert model.fitted


def test_collapse_monitors_match_entropy_formulas(quiet_trainer_kwargs):
    model = make_dino(quiet_trainer_kwargs, teacher_temperature=0.04, warmup_teacher_temp_epochs=0)
    k = model.loss.output_dim
    # Uniform teacher (equal logits): both entropies are ln K.
    flat = model.collapse_monitors(torch.zeros(2, 4, k))
    assert flat["teacher_entropy"].item() == pytest.approx(math.log(k), abs=1e-5)
    assert flat["teacher_batch_entropy"].item() == pytest.approx(math.log(k), abs=1e-5)
    # Every view one-hot on its own prototype (4 samples, 2 views agree): per-view entropy ~0,
    # batch-mean distribution uniform over 4 prototypes, entropy ln 4.
    z = torch.zeros(2, 4, k)
    z[:, torch.arange(4), torch.arange(4)] = 10.0  # / 0.04 = 250 nats above the rest
    spread = model.collapse_monitors(z)
    assert spread["teacher_entropy"].item() == pytest.approx(0.0, abs=1e-5)
    assert spread["teacher_batch_entropy"].item() == pytest.approx(math.log(4), abs=1e-5)
    # The centre is subtracted first: a centre equal to the outputs makes them uniform again.
    model.loss.center.copy_(z[:1, :1])  # sample 0's logits as the centre
    centred = model.collapse_monitors(z[:, :1])
    assert centred["teacher_entropy"].item() == pytest.approx(math.log(k), abs=1e-5)


def test_collapse_monitors_are_logged(tmp_path, quiet_trainer_kwargs):
    from pytorch_lightning.loggers import CSVLogger

    model = make_dino(
        {**quiet_trainer_kwargs, "logger": CSVLogger(tmp_path), "log_every_n_steps": 1},
        max_steps=2,
    )
    model.fit(views_loader())
    logged = model.trainer.logged_metrics
    for name in ("train/teacher_entropy", "train/teacher_batch_entropy"):
        assert 0.0 <= float(logged[name]) <= math.log(model.loss.output_dim) + 1e-5
