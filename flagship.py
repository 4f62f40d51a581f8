"""The flagship, Narcissus → PureEBM → classifier: ``python flagship.py [seed=0] [key=value ...]``
(installed: ``lit-robust-flagship``); see ``lit_robust.run.cli.flagship``."""
from lit_robust.run.cli import flagship

if __name__ == "__main__":
    flagship()
