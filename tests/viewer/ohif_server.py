"""Host for OHIF: its static build, plus a same-origin reverse proxy to Orthanc's /dicom-web.

Why a proxy for Orthanc: OHIF fetches DICOMweb with XHR/fetch; serving the viewer and /dicom-web
from one origin means no CORS configuration in Orthanc and no browser flags. Absolute URLs that
Orthanc writes into DICOM JSON (its own host:port) are rewritten to this origin for the same reason.

``direct=True`` is the other way a site runs it: OHIF's data source points straight at the
node's DICOMweb root on another origin (the node answers CORS for this origin, the bearer token
comes with the viewer URL's ``token`` parameter); nothing is proxied.
"""

from __future__ import annotations

import json
import mimetypes
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("application/javascript", ".js")
mimetypes.add_type("font/woff2", ".woff2")


def app_config(data_source_root: str = "/dicom-web", name: str = "orthanc", friendly: str = "Orthanc (test PACS)",
               include_field: bool = False) -> str:
    """OHIF window.config with one DICOMweb data source (WADO-RS rendering, no pop-up dialogs)."""
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 1,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": name,
        "dataSources": [{
            "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
            "sourceName": name,
            "configuration": {
                "friendlyName": friendly,
                "name": name,
                "wadoUriRoot": data_source_root,
                "qidoRoot": data_source_root,
                "wadoRoot": data_source_root,
                "qidoSupportsIncludeField": include_field,
                "imageRendering": "wadors",
                "thumbnailRendering": "wadors",
                "enableStudyLazyLoad": True,
                "supportsFuzzyMatching": False,
                "supportsWildcard": True,
                "omitQuotationForMultipartRequest": True,
                "bulkDataURI": {"enabled": True},
            },
        }],
    }
    return "window.config = " + json.dumps(config, indent=1) + ";\n"


class OhifServer:
    """Serve ``dist`` and proxy ``/dicom-web`` to ``orthanc_url`` on a loopback port.

    With ``direct=True``, ``orthanc_url`` is any DICOMweb service (the node) that OHIF calls
    itself at ``orthanc_url + "/dicom-web"``, cross-origin; nothing is proxied.
    """

    def __init__(self, dist: Path, orthanc_url: str, port: int, direct: bool = False) -> None:
        self.dist, self.orthanc_url, self.port = dist, orthanc_url.rstrip("/"), port
        self.origin = f"http://127.0.0.1:{port}"
        self.config_js = (app_config(self.orthanc_url + "/dicom-web", "scpnode", "scp_node", include_field=True)
                          if direct else app_config())
        self.direct = direct
        handler = self._handler()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "OhifServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output quiet
                return

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                path = self.path.split("?", 1)[0]
                if path.startswith("/dicom-web/") and not server.direct:
                    return self._proxy()
                if path == "/app-config.js":
                    return self._send(200, server.config_js.encode(), "application/javascript")
                file = (server.dist / path.lstrip("/")).resolve()
                if server.dist.resolve() not in file.parents or not file.is_file():
                    file = server.dist / "index.html"  # single-page app routes (/viewer?...)
                content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                return self._send(200, file.read_bytes(), content_type)

            def _proxy(self) -> None:
                request = urllib.request.Request(server.orthanc_url + self.path)
                for header in ("Accept",):
                    if self.headers.get(header):
                        request.add_header(header, self.headers[header])
                try:
                    with urllib.request.urlopen(request, timeout=120) as response:
                        status, body = response.status, response.read()
                        content_type = response.headers.get("Content-Type", "application/octet-stream")
                except urllib.error.HTTPError as error:
                    status, body = error.code, error.read()
                    content_type = error.headers.get("Content-Type", "text/plain")
                if "json" in content_type:
                    body = body.replace(server.orthanc_url.encode(), server.origin.encode())
                self._send(status, body, content_type)

        return Handler
