"""Training CLIs for the adasplash-jax models: ``python -m train.gpt2``, ``python -m train.bert``,
``python -m train.plot RUN_DIR``. See train/trainer.py for the loop and train/data.py for the embedded corpus."""
