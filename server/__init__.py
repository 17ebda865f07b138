"""The coordinator side: Hydra entry point, ServerApp, run outputs and baselines."""
