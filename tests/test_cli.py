"""``python -m zoo``: packaged configs from any directory, swapping parts by flag, clear errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_vqa import QUIET, TINY_MIE, TINY_SORT_OF_CLEVR

from zoo.cli import main, packaged_config, resolve_config_args

ROOT = Path(__file__).resolve().parents[1]
# A tiny Sort-of-CLEVR and a small model: the same code path as the shipped config, sized for a CPU test.
SMALL_DATA = [*TINY_SORT_OF_CLEVR, "--data.init_args.batch_size=8", *QUIET]
SMALL = [*SMALL_DATA, *TINY_MIE]


def test_bare_config_name_resolves_to_the_packaged_file(elsewhere):
    assert packaged_config("vqa.yaml") == packaged_config("vqa")
    args = resolve_config_args(["fit", "--config", "vqa.yaml", "-c=x"])
    assert Path(args[2]).is_file() and Path(args[2]).name == "vqa.yaml"
    (elsewhere / "vqa.yaml").write_text("seed_everything: 1\n")
    assert resolve_config_args(["fit", "--config", "vqa.yaml"])[2] == "vqa.yaml", "a local file wins"


def test_python_m_zoo_fit_fast_dev_run_from_another_directory(elsewhere, subprocess_env):
    env = subprocess_env | {"ZOO_DATA_DIR": str(elsewhere / "data")}
    result = subprocess.run(
        [sys.executable, "-m", "zoo", "fit", "--config", "vqa.yaml", "--trainer.fast_dev_run=true", *SMALL],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # test_after_fit ran the test loop and printed its metrics
    assert "test/acc_relational" in result.stdout + result.stderr


def test_fusion_swapped_by_one_flag(elsewhere, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                "vqa.yaml",
                "--model.init_args.fusion=zoo.fusion.TwoTower",
                *SMALL_DATA,
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "zoo.fusion.TwoTower" in printed and "modality_fusion_layers" not in printed


def test_image_backbone_swapped_by_one_flag(elsewhere, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                "vqa.yaml",
                "--model.init_args.encoders.image=zoo.encoders.TimmImageEncoder",
                "--model.init_args.encoders.image.init_args.backbone=resnet18",
                *SMALL_DATA,
                "--print_config",
            ]
        )
    printed = capsys.readouterr().out
    assert "zoo.encoders.TimmImageEncoder" in printed and "backbone: resnet18" in printed


def test_unknown_yaml_key_names_the_key(elsewhere, cli_error):
    bad = elsewhere / "bad.yaml"
    bad.write_text(Path(packaged_config("vqa.yaml")).read_text().replace("modality_fusion_layers:", "fusion_layerz:"))
    err = cli_error(["fit", "--config", str(bad), "--trainer.fast_dev_run=true"])
    assert "fusion_layerz" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("modle: {}\n", "'modle' in bad.yaml is not accepted; did you mean 'model'?"),
        (
            "trainer:\n  callbackz: {}\n",
            "'trainer.callbackz' in bad.yaml is not accepted; did you mean 'trainer.callbacks'?",
        ),
        ("modle: {a: {}}\n", "'modle' in bad.yaml is not accepted; did you mean 'model'?"),
        ("zzz: {}\n", "'zzz' in bad.yaml is not accepted"),  # nothing spelt like it: no hint
    ],
)
def test_unknown_yaml_key_holding_an_empty_mapping_names_the_key_and_the_file(elsewhere, text, named, cli_error):
    """jsonargparse merges a config value by value, so a key whose mapping holds no value vanished unrefused."""
    (elsewhere / "bad.yaml").write_text(text)
    err = cli_error(["fit", "--config", "vqa.yaml", "--config", "bad.yaml", "--trainer.fast_dev_run=true", *SMALL])
    assert err.startswith(f"zoo: error: Option {named}\n"), err
    assert len(err.splitlines()) == 2 and "python -m zoo fit --help" in err


@pytest.mark.parametrize("text", ["callbackz: {}\n", "max_epochs: 1\ncallbackz: {a: {}}\n"])
def test_unknown_key_holding_an_empty_mapping_in_a_group_file_names_the_key_and_the_file(elsewhere, text, cli_error):
    """A group's own config file (``--trainer tr.yaml``) is loaded and merged apart from ``--config``."""
    (elsewhere / "tr.yaml").write_text(text)
    err = cli_error(["fit", "--config", "vqa.yaml", "--trainer", "tr.yaml", "--trainer.fast_dev_run=true", *SMALL])
    assert err.startswith(
        "zoo: error: Option 'trainer.callbackz' in tr.yaml is not accepted; did you mean 'trainer.callbacks'?\n"
    ), err
    assert len(err.splitlines()) == 2


def test_a_group_file_without_unknown_keys_is_taken(elsewhere, capsys):
    (elsewhere / "tr.yaml").write_text("max_epochs: 3\ncallbacks: []\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "vqa.yaml", "--trainer", "tr.yaml", *SMALL_DATA, "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "max_epochs: 3" in capsys.readouterr().out


def test_a_group_file_named_by_a_root_level_config_is_checked_by_its_own_parser(elsewhere, capsys):
    """There the root parser, which has no trainer options, loads the file: a real option must not read as unknown."""
    (elsewhere / "tr.yaml").write_text("plugins: {}\n")
    (elsewhere / "all.yaml").write_text("fit: {trainer: tr.yaml}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "all.yaml", "fit", "--config", "vqa.yaml", *SMALL_DATA, "--print_config"])
    out, err = capsys.readouterr()
    assert exit_info.value.code in (0, None), err
    assert "seed_everything:" in out


def test_unknown_key_in_a_group_file_named_by_a_root_level_config_names_the_key_and_the_file(elsewhere, cli_error):
    (elsewhere / "tr.yaml").write_text("callbackz: {}\n")
    (elsewhere / "all.yaml").write_text("fit: {trainer: tr.yaml}\n")
    err = cli_error(["--config", "all.yaml", "fit", "--config", "vqa.yaml", "--trainer.fast_dev_run=true", *SMALL])
    assert err.startswith(
        "zoo: error: Option 'trainer.callbackz' in tr.yaml is not accepted; did you mean 'trainer.callbacks'?\n"
    ), err


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (
            "--data.init_args.batch_sise=4",
            "data (datamodules.sort_of_clevr.SortOfCLEVRDataModule): Option 'batch_sise' is not accepted; "
            "did you mean 'batch_size'?",
        ),
        (
            "--trainer.max_epochz=1",
            "unrecognized arguments: --trainer.max_epochz=1; did you mean --trainer.max_epochs?",
        ),
        (  # no option of the encoder is spelt like it: no hint
            "--model.init_args.encoders.image.init_args.patch_sise=4",
            "model (lit_models.VQA) > encoders (zoo.encoders.ConvImageEncoder): Option 'patch_sise' is not accepted",
        ),
        (
            "--model.init_args.encoders.image.init_args.dim=abc",
            "model (lit_models.VQA) > encoders (zoo.encoders.ConvImageEncoder) > dim: Expected a <class 'int'>. "
            "Got value: abc",
        ),
    ],
)
def test_a_bad_argument_of_a_class_is_one_line_through_the_classes(flag, message, cli_error):
    """jsonargparse reports each subtype of ``Optional[X]`` it tried and the given value again, over a dozen lines;
    the zoo says the path of keys and classes and what was wrong, with the option spelt most like a misspelt key."""
    err = cli_error(["fit", "--config", "vqa.yaml", flag, "--trainer.fast_dev_run=true", *SMALL])
    assert err == f"zoo: error: {message}\n(python -m zoo fit --help lists the options)\n", err


def test_a_misspelt_trainer_key_in_yaml_gets_a_hint(elsewhere, cli_error):
    (elsewhere / "t.yaml").write_text("trainer:\n  max_epochz: 3\n")
    err = cli_error(["fit", "--config", "vqa.yaml", "--config", "t.yaml", *SMALL])
    hint = "does not accept option 'trainer.max_epochz'; did you mean 'trainer.max_epochs'?"
    assert err.startswith(f"zoo: error: Subcommand 'fit' {hint}\n"), err


def test_a_report_of_several_candidates_is_kept_whole(cli_error):
    err = cli_error(["fit", "--config", "vqa.yaml", "--model=lit_models.Nope", *SMALL])
    assert "Expected a path but lit_models.Nope" in err and "has no attribute 'Nope'" in err


def test_unknown_class_argument_holding_an_empty_mapping_names_the_key(elsewhere, cli_error):
    (elsewhere / "bad.yaml").write_text("model:\n  init_args:\n    fusion:\n      init_args:\n        depthz: {}\n")
    err = cli_error(["fit", "--config", "vqa.yaml", "--config", "bad.yaml", "--trainer.fast_dev_run=true", *SMALL])
    assert "Option 'depthz' is not accepted" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "shown"),
    [
        (["--model.init_args.optimizer.init_args.lr=nan"], "--model.init_args.optimizer.init_args.lr=nan"),
        (["--trainer.gradient_clip_val", "NaN"], "--trainer.gradient_clip_val=NaN"),
        (["--trainer.gradient_clip_val=.nan"], "--trainer.gradient_clip_val=.nan"),  # YAML's NaN: a float takes it
        (["--data.init_args.num_images=nan"], "--data.init_args.num_images=nan"),
    ],
)
def test_a_nan_for_a_number_is_one_line_naming_the_option(elsewhere, flags, shown, cli_error):
    err = cli_error(["fit", "--config", "vqa.yaml", "--trainer.fast_dev_run=true", *SMALL, *flags])
    assert err == f"zoo: error: {shown}: must be a number, not NaN\n"


@pytest.mark.parametrize("value", ["inf", "-inf", "Infinity"])
def test_an_infinity_spelt_as_a_word_is_one_line_naming_the_option(elsewhere, value, cli_error):
    err = cli_error(["fit", "--config", "vqa.yaml", "--trainer.fast_dev_run=true", *SMALL,
                     f"--trainer.gradient_clip_val={value}"])  # fmt: skip
    assert err == f"zoo: error: --trainer.gradient_clip_val={value}: not a number; YAML writes infinity as .inf\n"


def test_nan_stays_a_word_for_a_text_option(elsewhere, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "vqa.yaml", "--trainer.default_root_dir=nan", "--print_config"])
    assert exit_info.value.code in (0, None) and "default_root_dir: nan" in capsys.readouterr().out


def test_a_value_of_the_wrong_type_names_the_key_without_the_usage_screen(elsewhere, cli_error):
    err = cli_error(["fit", "--config", "vqa.yaml", "--data.init_args.num_images=many"])
    named = "data (datamodules.sort_of_clevr.SortOfCLEVRDataModule) > num_images: Expected a <class 'int'>"
    assert err.startswith(f"zoo: error: {named}") and "Got value: many" in err
    assert "usage:" not in err and "Traceback" not in err
    assert "python -m zoo fit --help" in err


def test_unknown_class_names_the_class(elsewhere, cli_error):
    err = cli_error(["fit", "--config", "vqa.yaml", "--model.init_args.fusion=zoo.fusion.NoSuchFusion"])
    assert "NoSuchFusion" in err and "Traceback" not in err


def test_missing_data_folder_is_one_clear_line(elsewhere, cli_error):
    err = cli_error(
        [
            "fit",
            "--config",
            "vqa.yaml",
            "--data=datamodules.vqa_folder.VQAFolderDataModule",
            f"--data.init_args.data_dir={elsewhere / 'no_such_folder'}",
            "--trainer.fast_dev_run=true",
        ],
    )
    assert err.startswith("zoo: error:") and "no_such_folder" in err
    assert len(err.strip().splitlines()) == 1


def test_bad_value_is_named(elsewhere, cli_error):
    err = cli_error(
        [
            "fit",
            "--config",
            "vqa.yaml",
            "--model.init_args.fusion.init_args.modality_fusion_layers=9",
            "--trainer.fast_dev_run=true",
        ],
    )
    assert "modality_fusion_layers=9" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--trainer.devices=0"], "devices='0'"),  # Lightning's MisconfigurationException
        (["--trainer.limit_train_batches=3"], "`val_check_interval` (200)"),  # a ValueError of its loop's checks
        (["--trainer.devices=-3"], "`CPUAccelerator` should be an int > 0"),  # a TypeError of its accelerator's
    ],
)
def test_lightning_rejecting_a_trainer_setting_is_one_clear_line(elsewhere, flags, named, cli_error):
    err = cli_error(["fit", "--config", "vqa.yaml", "--trainer.accelerator=cpu", *SMALL, *flags])
    assert err.startswith("zoo: error:") and named in err and "Traceback" not in err, err


def test_nan_loss_stops_with_a_clear_error(elsewhere, cli_error):
    """A learning rate of 1e30 blows the loss up within a few steps: one line, no traceback."""
    err = cli_error(
        [
            "fit",
            "--config",
            "vqa.yaml",
            *SMALL,
            "--trainer.max_steps=6",
            "--trainer.limit_val_batches=0",
            "--model.init_args.optimizer.init_args.lr=1e30",
            "--model.init_args.scheduler=null",
        ],
    )
    assert err.startswith("zoo: error: the training loss became nan") and "Traceback" not in err


@pytest.mark.parametrize("bar", [False, True])
def test_training_metrics_reach_the_progress_bar_only_when_one_shows_them(elsewhere, bar):
    """Lightning turns progress-bar metrics into numbers every step (a host-device sync on a GPU): without a bar the
    task's training loss and accuracy are logged but not turned."""
    from zoo.cli import ZooCLI

    flags = [*SMALL, "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--test_after_fit=false"]
    flags += ["--trainer.logger=false", f"--trainer.enable_progress_bar={bar}"]
    cli = ZooCLI(args=resolve_config_args(["fit", "--config", "vqa.yaml", *flags]))
    assert "train/loss" in cli.trainer.callback_metrics
    assert ("train/loss" in cli.trainer.progress_bar_metrics) is bar


def test_components_lists_every_kind(capsys):
    main(["components"])
    out = capsys.readouterr().out
    for expected in (
        "encoder:",
        "zoo.fusion.mie.MIE",
        "zoo.fusion.two_tower.TwoTower",
        "lit_models.vqa.VQA",
        "datamodules.sort_of_clevr.SortOfCLEVRDataModule",
        "zoo.encoders.text.MiniLMTextEncoder",
        "zoo.layers.ffn.FeedForward",
    ):
        assert expected in out, expected


def _fitted_checkpoint(elsewhere) -> Path:
    from zoo.cli import ZooCLI

    flags = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1"]
    flags += ["--test_after_fit=false", "--trainer.logger=false"]
    cli = ZooCLI(args=resolve_config_args(["fit", "--config", "vqa.yaml", *SMALL, *flags]))
    return Path(cli.trainer.checkpoint_callback.best_model_path)  # the only validation's


def test_test_and_predict_run_the_converted_integer_model(elsewhere, capsys):
    import torch._inductor.config

    from zoo.cli import ZooCLI
    from zoo.quant import load_converted

    ckpt, out = _fitted_checkpoint(elsewhere), elsewhere / "vqa_int.pt"
    main(["convert", "--ckpt", str(ckpt), "--out", str(out), "--quant", "{}"])
    args = ["--config", "vqa.yaml", *SMALL, "--trainer.logger=false", "--converted", str(out)]
    cli = ZooCLI(args=resolve_config_args(["test", *args]))
    assert any(getattr(m, "zoo_converted", False) for m in cli.model.modules()), "the integer layers ran"
    tested = cli.trainer.callback_metrics["test/acc"].item()
    # the same integer model loaded in Python scores alike on the same test split
    reference = load_converted(out)
    reference_cli = ZooCLI(args=resolve_config_args(args[:-2]), run=False)
    metrics = reference_cli.trainer.test(reference, datamodule=reference_cli.datamodule, verbose=False)
    assert tested == pytest.approx(metrics[0]["test/acc"])
    main(["predict", *args, f"--trainer.default_root_dir={elsewhere / 'predict'}"])
    assert (elsewhere / "predict" / "predictions.jsonl").is_file()
    # compiled, with inductor freezing (the integer GEMMs' condition); the eager backend keeps the test quick
    with torch._inductor.config.patch(freezing=False):  # restored on exit, for the tests that follow
        cli = ZooCLI(args=resolve_config_args(["validate", *args, "--model.init_args.compile={backend: eager}"]))
        assert cli.model.compiled_regions and torch._inductor.config.freezing
    with pytest.raises(SystemExit):  # a config of another architecture
        main(["test", *args, "--model.init_args.fusion.init_args.depth=3"])
    err = capsys.readouterr().err
    assert f"--converted {out} does not fit the configured VQA" in err and "model.fusion.blocks.2" in err


def test_converted_model_errors_name_the_flag(elsewhere, capsys):
    args = ["--config", "vqa.yaml", *SMALL, "--trainer.logger=false"]
    for command, flags, message in [
        ("test", ["--converted", "gone.pt"], "--converted gone.pt: no such file"),
        ("fit", ["--converted", "gone.pt"], "--converted runs an integer model in validate, test or predict"),
        ("test", ["--converted", "gone.pt", "--ckpt_path", "x.ckpt"], "--converted and --ckpt_path"),
    ]:
        with pytest.raises(SystemExit):
            main([command, *args, *flags])
        assert message in capsys.readouterr().err


def test_help_names_the_program_and_the_zoo_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: python -m zoo ")  # not "__main__.py"
    assert "`python -m zoo components`" in out and "`python -m zoo convert --help`" in out


def test_a_message_over_several_lines_is_joined_and_a_worker_traceback_cut_to_its_last_line():
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from zoo.cli import _one_line
    from zoo.errors import DataError

    asked = MisconfigurationException("You requested gpu: [0, 1]\n But your machine only has: []")
    assert _one_line(asked) == "You requested gpu: [0, 1] But your machine only has: []"
    worker = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nzoo.errors.DataError: a.wav: not a readable sound file'
    )
    assert _one_line(worker) == "a.wav: not a readable sound file"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_adaptive_strategy_on_cuda_without_a_device_says_so(elsewhere, cli_error):
    err = cli_error(["fit", "--config", "vqa_gpu.yaml", "--trainer.accelerator=cuda", "--trainer.devices=auto"])
    assert "trainer.accelerator=cuda finds no device here" in err and "device_count" not in err
