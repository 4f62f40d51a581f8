"""The Hydra configs, installed as the package ``lit_robust.conf`` (``pkg://lit_robust.conf``) so that the console
scripts find them after a plain ``pip install``; this file only makes the folder a regular package."""
