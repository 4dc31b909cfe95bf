"""The DDAE config through the CLI: the datamodule's classes and groups reach the model, DDAE runs, test saves the
confusion matrix (tests/test_configs.py runs every shipped config; this checks what DDAE adds)."""

from __future__ import annotations

from zoo.cli import ZooCLI, resolve_config_args


def test_ddae_config_links_classes_and_groups_runs_ddae_and_saves_the_confusion_matrix(tmp_path):
    config = "text_longtail_ddae.yaml"
    args = resolve_config_args(
        [
            "fit",
            "--config",
            config,
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
            f"--data.init_args.data_dir={tmp_path / 'wordnet'}",
            f"--data.init_args.cache_dir={tmp_path / 'ddae'}",
            # a small split keeps augmentation and scoring to seconds: 12 examples for the largest class, 4 the least
            "--data.init_args.max_train_per_class=12",
            "--data.init_args.imbalance_ratio=3",
            "--data.init_args.batch_size=16",
        ]
    )
    cli = ZooCLI(args=args + ["--data.init_args.max_copies=2"])
    assert cli.model.num_classes == 45 and cli.model.group_names == ["head", "medium", "tail"]
    stats = cli.datamodule.ddae_stats
    assert stats["augmented"] > 0 and 0 <= stats["rejected_fraction"] < 0.5
    assert list(tmp_path.rglob("confusion_matrix.png"))
