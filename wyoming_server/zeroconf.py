"""Announce the Wyoming server over zeroconf (mDNS) so Home Assistant discovers it by itself.

The same service record as `wyoming.zeroconf.HomeAssistantZeroconf` (what wyoming-faster-whisper uses):
`_wyoming._tcp.local.` with one IPv4 address and the port; this one also withdraws it on shutdown. Needs the
optional `zeroconf` package (`pip install 'canary-server[zeroconf]'`).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any

log = logging.getLogger("canary.wyoming")

SERVICE_TYPE = "_wyoming._tcp.local."
MDNS_GROUP = "224.0.0.251"  # the address the outgoing interface is found for (no packet is sent)


def service_name() -> str:
    """`canary-server-<host>`: unique per machine, readable in Home Assistant's discovery list."""
    return f"canary-server-{socket.gethostname().split('.')[0]}"


def announced_address(host: str) -> str:
    """The IPv4 address to announce: `host` itself, or for a wildcard bind the interface mDNS goes out on."""
    if host in ("", "0.0.0.0", "::"):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.setblocking(False)
            probe.connect((MDNS_GROUP, 1))
            return probe.getsockname()[0]
        finally:
            probe.close()
    address = ipaddress.ip_address(socket.gethostbyname(host))
    if address.is_loopback:
        log.warning("zeroconf announces %s, a loopback address: set wyoming_host to a LAN address or 0.0.0.0", host)
    return str(address)


def _zeroconf_asyncio() -> Any:
    try:
        from zeroconf import asyncio as zc_asyncio
    except ImportError:
        raise RuntimeError(
            "wyoming_zeroconf needs the zeroconf package: pip install 'canary-server[zeroconf]'"
        ) from None
    return zc_asyncio


class ZeroconfAnnouncement:
    """`start()` registers the service, `stop()` withdraws it. `api`: `zeroconf.asyncio` (tests: a fake)."""

    def __init__(self, port: int, host: str, name: str | None = None, api: Any = None) -> None:
        self.port, self.host, self.name = port, host, name or service_name()
        self._api = api
        self._zc: Any = None
        self._info: Any = None

    async def start(self) -> None:
        api = self._api or _zeroconf_asyncio()
        address = announced_address(self.host)
        self._info = api.AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self.name}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(address)],
            port=self.port,
        )
        self._zc = api.AsyncZeroconf()
        await self._zc.async_register_service(self._info, allow_name_change=True)
        log.info("zeroconf: announced %s at %s:%d", self.name, address, self.port)

    async def stop(self) -> None:
        if self._zc is None:
            return
        try:
            await self._zc.async_unregister_service(self._info)
        finally:
            await self._zc.async_close()
            self._zc = None
