"""The parts of the shipped recipes (``recipes/*.py``), one module per job.

    config.py      TrainingConfig, LoraFields, TrackingFields: the fields every recipe shares
    run_folder.py  output_dir (the trainer's workspace): one run per folder, resume checks, config.yaml, cache
    models.py      --model checks, LoRA, gradient checkpointing
    optim.py       AdamW with decay groups, warmup + cosine
    evaluation.py  held-out splits, exact gathered evaluation, a checkpoint's weights for export
    export.py      the model card
    trainer.py     RecipeTrainer (the recipes' base class) and run_recipe (their main())

:mod:`acceltrain.recipe_kit` re-exports all of it under one name.
"""
