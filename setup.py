"""mmf_plugins: SOHO, VinVL/OSCAR+ and VL-BERT in one MMF-compatible registry.

Design card
-----------
* what: a vision-language model zoo with its own small MMF-compatible runtime (registry, config,
  ``mmf_run`` grammar, checkpoints, zoo), because ``pip install mmf`` cannot be installed on
  Python 3.11 / torch 2.x (see README "Why not pip install mmf").
* stack: torch 2.14.1 + torchvision 0.29.1 (pinned: the pair that imports together here),
  transformers 5, omegaconf 2.4, lightning 2, iopath, pycocotools, lmdb, safetensors.
* install: ``pip install -e '.[dev]'`` (``make setup``); configs/ and projects/ are read from the
  repository, so the editable install is the supported one.
* entry points: mmf_run, mmf_predict, mmf_zoo, mmf_convert, mmf_extract_features,
  mmf_convert_features, mmf_compare.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "transformers>=5.0,<6",
    "tokenizers>=0.21",
    "omegaconf>=2.4,<2.5",
    "lightning>=2.4,<3",
    "iopath>=0.1.10",
    "pycocotools>=2.0.8",
    "pycocoevalcap>=1.2",
    "lmdb>=1.4",
    "safetensors>=0.4",
    "numpy>=1.26",
    "pillow>=10",
    "matplotlib>=3.8",
    "tensorboard>=2.15",
    "rich>=13",
    "tqdm>=4.66",
    "pyyaml>=6",
]

setup(
    name="mmf_plugins",
    version="0.1.0",
    description="SOHO, VinVL/OSCAR+ and VL-BERT side by side in an MMF-compatible registry",
    python_requires=">=3.11",
    packages=find_packages(include=["mmf_plugins", "mmf_plugins.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={"dev": ["pytest>=8", "ruff>=0.5"]},
    entry_points={
        "console_scripts": [
            "mmf_run=mmf_plugins.cli.run:main",
            "mmf_predict=mmf_plugins.cli.predict:main",
            "mmf_zoo=mmf_plugins.cli.zoo:main",
            "mmf_convert=mmf_plugins.cli.convert:main",
            "mmf_extract_features=mmf_plugins.cli.extract:main",
            "mmf_convert_features=mmf_plugins.cli.convert_features:main",
            "mmf_compare=mmf_plugins.cli.compare:main",
        ]
    },
)
