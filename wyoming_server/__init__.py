"""The Wyoming protocol front door (Home Assistant's voice pipeline), on the same pipeline as HTTP.

`WyomingServer(pipeline, WyomingConfig(...))` is an async context manager; `canary-server serve` enters it in the
HTTP app's lifespan (cli/serve.py), so both front doors share one model, one engine and one continuous batch.
"""

from canary_server.wyoming_server.server import WyomingConfig, WyomingServer

__all__ = ["WyomingConfig", "WyomingServer"]
