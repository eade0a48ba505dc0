"""The private aiomqtt and paho attributes worker/mqtt.py relies on exist where installed."""

from __future__ import annotations

from importlib.metadata import version

import aiomqtt
import paho.mqtt.client as paho
import pytest

from worker.mqtt import PINNED, PRIVATE_ATTRIBUTES


@pytest.mark.parametrize(("owner", "attribute"), PRIVATE_ATTRIBUTES)
async def test_private_attribute_exists(owner: str, attribute: str) -> None:
    """Each attribute in worker.mqtt.PRIVATE_ATTRIBUTES is on a fresh client of its class."""
    client = aiomqtt.Client("127.0.0.1")  # needs a running loop; never connects
    instances = {"aiomqtt.Client": client, "paho.Client": client._client}
    assert isinstance(instances["paho.Client"], paho.Client)
    assert hasattr(instances[owner], attribute), (
        f"{owner}.{attribute} is gone: worker/mqtt.py relies on it (read from {PINNED}; "
        f"installed: aiomqtt {version('aiomqtt')}, paho-mqtt {version('paho-mqtt')}); "
        "adapt worker/mqtt.py to the new version or pin the old one in pyproject.toml"
    )


def test_the_list_names_known_classes() -> None:
    """Every entry names one of the two classes the guard can check."""
    assert {owner for owner, _ in PRIVATE_ATTRIBUTES} == {"aiomqtt.Client", "paho.Client"}
