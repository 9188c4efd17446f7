#!/usr/bin/env python
"""Extract region / grid features for a folder of images: ``python tools/extract_features.py --help``.

Same as the ``mmf_extract_features`` console script; the logic lives in ``mmf_plugins.cli.extract``.
"""

import sys

from mmf_plugins.cli.extract import main

if __name__ == "__main__":
    sys.exit(main())
