import os
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from cluster import Cluster  # noqa: E402


@pytest.fixture(scope="session")
def cluster():
    c = Cluster("test", int(os.environ.get("FF_TEST_PORT", "54329"))).init().start()
    yield c
    c.stop()


@pytest.fixture
def db(cluster):
    """A fresh database with the extension, per test."""
    name = "t_" + uuid.uuid4().hex[:12]
    cluster.create_db(name)
    yield name
    with cluster.connect() as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def conn(cluster, db):
    with cluster.connect(db) as c:
        yield c
