"""A tiny shapes corpus shared by the dataset tests (generated once per session)."""

import pytest


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    from mmf_plugins.datasets.builders.shapes.generator import generate_shapes

    root = tmp_path_factory.mktemp("mmfdata")
    generate_shapes(root / "shapes", seed=0, num_images=18, progress=False)
    return root
