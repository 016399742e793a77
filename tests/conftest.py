"""Fixtures shared by the tests (helpers that are not fixtures live in ``helpers.py``)."""
import pytest

from beit3.demo.data import make_demo_data


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """A tiny demo data root (40 images of 32 px, 2 WebDataset shards) in a temporary folder, one per test module."""
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root, num_images=40, image_size=32, seed=3, num_shards=2)
    return root
