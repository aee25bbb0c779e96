"""Starlette with encode/broadcaster over Redis: the chat room of broadcaster's README.

A socket at ``/ws?room=R`` subscribes to R's channel and says ``ready``; every
text it sends is published to the channel, every message on the channel is
sent to it. Run: ``python broadcaster_server.py PORT``.
"""

import asyncio
import contextlib
import os
import sys

import uvicorn
from broadcaster import Broadcast
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

broadcast = Broadcast(os.environ["REDIS_URL"])
PREFIX = os.environ.get("CHANNEL", "broadcaster") + ":"


async def room_ws(websocket: WebSocket) -> None:
    await websocket.accept()
    channel = PREFIX + websocket.query_params["room"]
    async with broadcast.subscribe(channel=channel) as subscriber:
        await websocket.send_text("ready")

        async def receive() -> None:
            with contextlib.suppress(WebSocketDisconnect):
                async for text in websocket.iter_text():
                    await broadcast.publish(channel=channel, message=text)

        async def send() -> None:
            async for event in subscriber:
                await websocket.send_text(event.message)

        tasks = [asyncio.create_task(receive()), asyncio.create_task(send())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def lifespan(app):
    await broadcast.connect()
    yield
    await broadcast.disconnect()


app = Starlette(routes=[WebSocketRoute("/ws", room_ws)], lifespan=lifespan)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
