"""Compare finished runs: delegates to ``mmf_compare`` (mmf_plugins.cli.compare)."""

import sys

from mmf_plugins.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
