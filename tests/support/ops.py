"""Scraping the node's ops port the way Prometheus does: its text format read by prometheus_client's parser."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as rsp:
            return rsp.status, rsp.read(), rsp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


@dataclass
class Scrape:
    """Samples of one scrape: ``value(name, **labels)`` sums the samples that match."""

    samples: list[tuple[str, dict[str, str], float]]
    types: dict[str, str]

    def value(self, name: str, **labels: str) -> float:
        return sum(v for n, lab, v in self.samples
                   if n == name and all(lab.get(k) == want for k, want in labels.items()))

    def has(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.samples)


def scrape(port: int, host: str = "127.0.0.1") -> Scrape:
    status, body, ctype = _get(f"http://{host}:{port}/metrics")
    assert status == 200, body[:500]
    assert ctype.startswith("text/plain"), ctype
    samples: list[tuple[str, dict[str, str], float]] = []
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        types[family.name] = family.type
        for s in family.samples:
            samples.append((s.name, dict(s.labels), float(s.value)))
    return Scrape(samples, types)


def healthz(port: int, host: str = "127.0.0.1") -> tuple[int, dict]:
    status, body, ctype = _get(f"http://{host}:{port}/healthz")
    assert ctype == "application/json", ctype
    return status, json.loads(body)
