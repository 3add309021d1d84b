"""The HTTP API (aiohttp): events in, profiles out, health, metrics and the OpenAPI document.

Importing this package requires a configured engine; the server registers itself as a
service of the Faust app.
"""

__all__: list[str] = []
