"""Shared fixture for the data tests: a tiny demo data root generated into a temporary folder."""
import pytest

from beit3.data.demo import make_demo_data


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root, num_images=40, image_size=32, seed=3, num_shards=2)
    return root
