"""Command line: `python -m kdjax.main --config=experiments/<name>.py[:args] --workdir=DIR`.

Overrides use ml_collections config flags (`--config.loss.temperature=4`). The config is
locked, so an override naming a key the schema lacks is an error. Config files are Python
and run as code when loaded: only use config files you trust.
"""

from kdjax import train
from kdjax.cli import run_config_main

if __name__ == '__main__':
  run_config_main(train.run)
