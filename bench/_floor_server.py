"""The transport floor of a push, as a server: what `bench/broker.py` measures against.

``python bench/_floor_server.py BOOTSTRAP PORT TOPIC`` serves, with nothing else in the way:

- ``POST /v1/events`` (one event or ``{"events": [...]}``): one message per partition of the
  visitors' keys to TOPIC on the broker at BOOTSTRAP (aiokafka, acks=all, the engine's murmur2
  partitioner), answered 202 once the broker has it;
- a consumer of TOPIC (``fetch_max_wait_ms`` 10, as the engine's) that, for each event read,
  sends a fixed list of 20 items (the size of a real one) on the visitor's WebSocket;
- ``GET /v1/ws?user_id=U`` (sends the list once on open) and ``GET /metrics`` (events pushed,
  under the name the push benchmark reads).

No validation, no tables, no ranking: the HTTP, broker and WebSocket work every push needs.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import orjson
from aiohttp import WSMsgType, web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from personify.engine.publisher import partition_for

PARTITIONS = 4
ITEMS = [
    {
        "item_id": f"item-{i:05d}",
        "score": round(1.0 - i / 40, 4),
        "reasons": [{"kind": "covisit", "item_id": f"item-{i + 1:05d}", "weight": 0.5}],
    }
    for i in range(20)
]


class Floor:
    """The sockets, the producer and the consumer."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.seq: dict[str, int] = {}
        self.pushed = 0
        self.producer: Any = None
        self.consumer_task: asyncio.Task[None] | None = None

    async def push(self, user: str) -> None:
        ws = self.sockets.get(user)
        if ws is None:
            return
        self.seq[user] = self.seq.get(user, 0) + 1
        msg = {"type": "recommendations", "seq": self.seq[user], "user_id": user, "items": ITEMS}
        self.pushed += 1
        await ws.send_frame(orjson.dumps(msg), WSMsgType.TEXT)  # as the engine sends

    async def consume(self) -> None:
        consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            group_id="floor",
            fetch_max_wait_ms=10,
            auto_offset_reset="latest",
        )
        await consumer.start()
        try:
            while True:
                for messages in (await consumer.getmany(timeout_ms=100)).values():
                    for message in messages:
                        for event in orjson.loads(message.value):
                            await self.push(event["user_id"])
        finally:
            await consumer.stop()

    async def start(self, _app: web.Application) -> None:
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks=-1)
        await self.producer.start()
        self.consumer_task = asyncio.create_task(self.consume())

    async def stop(self, _app: web.Application) -> None:
        if self.consumer_task is not None:
            self.consumer_task.cancel()
            await asyncio.gather(self.consumer_task, return_exceptions=True)
        await self.producer.stop()

    async def events(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        events = body.get("events", [body])
        groups: dict[int, list[Any]] = {}
        for event in events:
            groups.setdefault(partition_for(event["user_id"], PARTITIONS), []).append(event)
        sent = [
            await self.producer.send(self.topic, orjson.dumps(group), partition=p)
            for p, group in groups.items()
        ]
        await asyncio.gather(*sent)
        return web.json_response({"accepted": len(events)}, status=202)

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        user = request.query["user_id"]
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets[user] = ws
        await self.push(user)
        async for _msg in ws:
            pass
        self.sockets.pop(user, None)
        return ws

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(text=f'personify_lists_computed_total{{kind="user"}} {self.pushed}\n')


def main() -> None:
    bootstrap, port, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    floor = Floor(bootstrap, topic)
    app = web.Application()
    app.on_startup.append(floor.start)
    app.on_cleanup.append(floor.stop)
    app.router.add_post("/v1/events", floor.events)
    app.router.add_get("/v1/ws", floor.ws)
    app.router.add_get("/metrics", floor.metrics)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    main()
