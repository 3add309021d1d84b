"""Faust agents: ingest (validate and route) and profile (fold events into profiles).

Importing this package requires a configured engine (`personify.engine.configure`); Faust's
autodiscovery imports the agent modules, which register themselves on the app.
"""

__all__: list[str] = []
