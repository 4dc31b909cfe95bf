"""What every task shares (``lit_models._task.ZooTask``): a non-finite validation or test loss stops the run before a
checkpoint of it is written, and a bad optimizer or schedule value is one line naming its key."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_vqa import QUIET, TINY_MIE, TINY_SORT_OF_CLEVR

from lit_models._task import TrainingDivergedError
from zoo.cli import ZooCLI, resolve_config_args

# A tiny Sort-of-CLEVR and a small model on the CPU: the same code path as the shipped config, sized for a test.
SMALL = [
    "--config",
    "vqa.yaml",
    *TINY_SORT_OF_CLEVR,
    "--data.init_args.batch_size=8",
    *TINY_MIE,
    "--trainer.accelerator=cpu",
    *QUIET,
]


def test_nan_validation_loss_stops_the_run_before_a_checkpoint_of_it_is_written(elsewhere, cli_error):
    """An absurd learning rate: step 1's training loss is finite, the weights it leaves give a NaN validation loss.
    The config's ModelCheckpoints would write the best and the last checkpoint of these weights when validation ends."""
    root = elsewhere / "runs"
    err = cli_error(
        [
            "fit",
            *SMALL,
            "--model.init_args.optimizer.init_args.lr=1e10",
            "--model.init_args.scheduler=null",
            "--trainer.max_steps=1",
            "--trainer.val_check_interval=1",
            f"--trainer.default_root_dir={root}",
        ],
    )
    assert re.match(r"zoo: error: the validation loss became (nan|-?inf) at epoch 0, global step 1;", err), err
    assert "learning rate" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(root.rglob("*.ckpt"))


def test_nan_loss_in_validate_and_test_is_a_clear_error(elsewhere):
    cli = ZooCLI(args=resolve_config_args(SMALL), run=False)
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))  # finite weights: no error
    with torch.no_grad():
        cli.model.head[-1].weight[0, 0] = float("nan")  # one weight: every logit row, so every loss, is NaN
    with pytest.raises(TrainingDivergedError, match=r"the validation loss became nan with the weights of epoch 0"):
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    with pytest.raises(TrainingDivergedError, match=r"the test loss became nan .* test another checkpoint"):
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--model.init_args.optimizer.init_args.lr=-1", "--trainer.fast_dev_run=true"],
            "model.init_args.optimizer (torch.optim.AdamW): Invalid learning rate: -1.0",
        ),
        (
            ["--model.init_args.optimizer.init_args.weight_decay=-1", "--trainer.fast_dev_run=true"],
            "model.init_args.optimizer (torch.optim.AdamW): Invalid weight_decay value: -1.0",
        ),
        (  # a torch schedule whose second argument is not the run's length: LinearLR's start_factor gets it (2)
            [
                "--model.init_args.scheduler=torch.optim.lr_scheduler.LinearLR",
                "--trainer.limit_train_batches=2",
                "--trainer.val_check_interval=1",
            ],
            "model.init_args.scheduler (torch.optim.lr_scheduler.LinearLR): Starting multiplicative factor",
        ),
    ],
)
def test_bad_optimizer_or_schedule_value_names_the_key(elsewhere, flags, message, cli_error):
    err = cli_error(["fit", *SMALL, *flags])
    assert err.startswith(f"zoo: error: {message}"), err
    assert len(err.strip().splitlines()) == 1


def test_a_classifier_stops_on_a_nan_validation_or_test_loss_too():
    """``Classifier`` has epoch-end hooks of its own (per-class F1, the confusion matrix); they keep the check."""
    from lightning.pytorch import Trainer

    from lit_models.classification import TextClassifier
    from zoo.encoders import TransformerTextEncoder

    model = TextClassifier(TransformerTextEncoder(dim=16, depth=1, num_heads=2), num_classes=2)
    batch = {"text": ["a red cube", "two blue spheres"], "label": torch.tensor([0, 1]), "group": torch.tensor([0, 0])}
    batches = torch.utils.data.DataLoader([batch], batch_size=None)  # the one batch as it is
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, batches, verbose=False)  # finite: no error
    with torch.no_grad():
        next(model.head.parameters()).fill_(float("nan"))
    for run, what in [(trainer.validate, "validation"), (trainer.test, "test")]:
        with pytest.raises(TrainingDivergedError, match=f"the {what} loss became nan"):
            run(model, batches, verbose=False)


def test_a_batch_without_labels_is_a_zero_loss_not_a_nan():
    """A VQA batch of answers outside ``max_answers`` (all -100): cross-entropy's mean is NaN there, which the NaN
    checks would take for a diverged run; with some labels, the mean over the labelled ones."""
    from lit_models.classification import TextClassifier
    from zoo.encoders import TransformerTextEncoder

    model = TextClassifier(TransformerTextEncoder(dim=16, depth=1, num_heads=2), num_classes=3, label_smoothing=0.1)
    logits = torch.randn(4, 3)
    assert model._loss(logits, torch.full((4,), -100)).item() == 0.0
    labels = torch.tensor([1, -100, 2, 0])
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)  # ignore_index -100
    assert torch.allclose(model._loss(logits, labels), expected)
