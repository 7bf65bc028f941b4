import os

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/guest/" in str(item.fspath):
            item.add_marker(pytest.mark.guest)


@pytest.fixture(scope="session")
def pinnace_home(tmp_path_factory):
    home = os.environ.get("PINNACE_HOME")
    return home or str(tmp_path_factory.mktemp("home"))
