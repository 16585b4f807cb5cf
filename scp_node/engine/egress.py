"""Where the engine may connect: loopback, or a host the config names in ``[engine] allowed_hosts``.

Why a module of its own, standard library only: the config check (``scp_node.config``) and the HTTP
backend both need it, and the config must stay importable without pydicom or torch. Zero egress
must stay provable with a model server in the picture, so the rule is checked twice:

* when the config is loaded (:func:`check_base_url`, no DNS): the URL's host is ``localhost``, a
  loopback address, or named in ``allowed_hosts`` (a host name, an address, or a network in CIDR
  form) — anything else is a :class:`EgressError` and the node does not start;
* every time a connection is opened (:func:`checked_addresses`, with DNS): every address the host
  resolves to must be loopback, or be listed in ``allowed_hosts`` (by address or network), or —
  for a host listed *by name* — be a private, link-local or loopback address. A LAN name that
  suddenly resolves to a public address is refused, not followed. The connection then goes to the
  address that was checked, never to a second, unchecked resolution.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., Sequence[tuple]]


class EgressError(ValueError):
    """The model server's address is not loopback and not allowed by ``[engine] allowed_hosts``."""


@dataclass(frozen=True)
class ServerURL:
    """A checked ``base_url``: scheme, host (lower case, no brackets), port and path prefix (no trailing /)."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.path}"


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _networks(allowed_hosts: Iterable[str]) -> tuple[list[str], list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    """``allowed_hosts`` split into host names (lower case) and networks (an address is a /32 or /128)."""
    names, networks = [], []
    for entry in allowed_hosts:
        item = str(entry).strip().lower().strip("[]")
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            names.append(item.rstrip("."))
    return names, networks


def check_allowed_hosts(allowed_hosts: Iterable[str]) -> None:
    """Every entry is a host name, an IP address or a CIDR network (EgressError names a bad one)."""
    for entry in allowed_hosts:
        item = str(entry).strip()
        if _network_or_none(item) is None and not _HOST_NAME.match(item):
            raise EgressError(f"[engine] allowed_hosts entry {entry!r} is not a host name, an address or a network")


_HOST_NAME = re.compile(r"^(?=.{1,253}\.?$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
                        r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\.?$", re.IGNORECASE)


def _network_or_none(item: str) -> object:
    try:
        return ipaddress.ip_network(item.strip("[]"), strict=False)
    except ValueError:
        return None


def check_base_url(base_url: str, allowed_hosts: Iterable[str] = ()) -> ServerURL:
    """The parsed ``base_url`` when its host is loopback or allowed (no DNS here); else EgressError.

    ``base_url`` is what the OpenAI client takes: ``http://127.0.0.1:8000/v1``. No user name or
    password in it (they would end up in logs; use ``api_key_file``), no query, no fragment.
    """
    try:
        parts = urlsplit(str(base_url).strip())
        port = parts.port
    except ValueError as exc:
        raise EgressError(f"[engine] base_url {base_url!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EgressError(f"[engine] base_url {base_url!r} must be http(s)://host[:port]/path, "
                          "e.g. http://127.0.0.1:8000/v1")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise EgressError("[engine] base_url must not hold a user, password, query or fragment "
                          "(put an API key in api_key_file)")
    host = parts.hostname.lower().rstrip(".")
    names, networks = _networks(allowed_hosts)
    ip = _ip(host)
    if ip is not None:
        allowed = ip.is_loopback or any(ip in net for net in networks)
    else:
        allowed = host == "localhost" or host in names
    if not allowed:
        raise EgressError(
            f"[engine] base_url host {host!r} is not loopback and not named in [engine] allowed_hosts; "
            "the node sends images only to a model server on this host or one the config names "
            f"(add allowed_hosts = [\"{host}\"] if that server is inside the hospital network)")
    return ServerURL(parts.scheme, host, port or (443 if parts.scheme == "https" else 80),
                     parts.path.rstrip("/"))


def address_allowed(host: str, address: str, allowed_hosts: Iterable[str]) -> bool:
    """Whether ``host`` resolving to ``address`` may be connected to (see the module docstring)."""
    ip = _ip(address)
    if ip is None:
        return False
    if ip.is_loopback:
        return True
    names, networks = _networks(allowed_hosts)
    if any(ip in net for net in networks):
        return True
    if host.lower().rstrip(".") in names:
        return ip.is_private or ip.is_link_local
    return False


def checked_addresses(url: ServerURL, allowed_hosts: Iterable[str],
                      resolver: Resolver = socket.getaddrinfo) -> list[str]:
    """The addresses ``url.host`` resolves to, all of them allowed; EgressError when any is not.

    One address that is not allowed refuses the whole name: a name that half points outside is a
    misconfiguration (or an attack on DNS), not something to pick around.
    """
    allowed_hosts = tuple(allowed_hosts)
    try:
        infos = resolver(url.host, url.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve the model server's host {url.host!r}: {exc.strerror or exc}") from None
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise OSError(f"the model server's host {url.host!r} resolves to no address")
    bad = [a for a in addresses if not address_allowed(url.host, a, allowed_hosts)]
    if bad:
        raise EgressError(
            f"the model server's host {url.host!r} resolves to {', '.join(bad)}, which is neither loopback, "
            "nor a private address of a host named in [engine] allowed_hosts, nor an address or network "
            "listed there; refusing to connect")
    return addresses
