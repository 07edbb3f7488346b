"""A loopback HTTP server standing in for the Hugging Face hub (`HF_ENDPOINT`): it serves the
files it is given the way huggingface_hub downloads them, and counts what it was asked."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.app_thread import AppThread

COMMIT = "c0ffee" + "0" * 34


class HubStandIn:
    """Serve `files` ({"owner/repo/file.gguf": bytes}) at /owner/repo/resolve/REV/file.gguf.

    `downloads` counts GET requests per file; anything unknown is a 404 like the hub's.
    Use as a context manager; `url` is what HF_ENDPOINT should be.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.downloads: dict[str, int] = {}
        self.requests = 0
        self._served: AppThread | None = None

    def __enter__(self) -> HubStandIn:
        self._served = AppThread(self._app)
        self.url = self._served.url
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._served is not None
        self._served.close()

    def _app(self):  # noqa: ANN202
        from aiohttp import web

        async def resolve(request: web.Request) -> web.StreamResponse:
            self.requests += 1
            key = f"{request.match_info['owner']}/{request.match_info['repo']}/" \
                  f"{request.match_info['file']}"
            body = self.files.get(key)
            if body is None:
                return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound"},
                                    text=f"{key} not found")
            headers = {"X-Repo-Commit": COMMIT,
                       "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
                       "Content-Length": str(len(body))}
            if request.method == "HEAD":
                return web.Response(headers=headers)
            self.downloads[key] = self.downloads.get(key, 0) + 1
            return web.Response(body=body, headers=headers,
                                content_type="application/octet-stream")

        app = web.Application()
        app.router.add_route("*", "/{owner}/{repo}/resolve/{rev}/{file}", resolve)
        return app


def catalog_file(path: Path, *entries: dict[str, object]) -> Path:
    """Write a `models.catalog` TOML file of [[model]] tables; returns its path."""
    lines = []
    for entry in entries:
        lines.append("[[model]]")
        lines += [f"{key} = {value!r}" if isinstance(value, int) else f'{key} = "{value}"'
                  for key, value in entry.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path
