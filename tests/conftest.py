import os

import pytest

# No guest a test starts has a way off this host: the NAT NIC is restricted (port
# forwards only) unless a test asks otherwise, and no test does.
os.environ["PINNACE_DEFAULT_NET"] = "restricted"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/guest/" in str(item.fspath):
            item.add_marker(pytest.mark.guest)


@pytest.fixture(scope="session")
def pinnace_home(tmp_path_factory):
    home = os.environ.get("PINNACE_HOME")
    return home or str(tmp_path_factory.mktemp("home"))
