import os
import socket

import pytest

from tests.conftest import NetworkBlocked


def test_outside_connections_are_refused():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock, pytest.raises(NetworkBlocked):
        sock.connect(("93.184.216.34", 443))


def test_hub_is_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
