"""Command-line flags that size the shipped VQA configs for a CPU test: the same code paths on a tiny Sort-of-CLEVR
and a two-block MIE. Each test adds its own batch size and trainer limits."""

#: 24 training images, 4 for validation and 4 for test (20 questions each)
TINY_SORT_OF_CLEVR = [
    "--data.init_args.num_images=24",
    "--data.init_args.val_images=4",
    "--data.init_args.test_images=4",
]
#: MIE with two blocks, fusion opening in the second
TINY_MIE = [
    "--model.init_args.fusion.init_args.depth=2",
    "--model.init_args.fusion.init_args.modality_fusion_layers=1",
]
#: no progress bar or model summary in the test's output
QUIET = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
