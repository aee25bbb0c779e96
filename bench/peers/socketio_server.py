"""python-socketio over Redis (AsyncRedisManager): the chat room as its docs show it.

``join`` enters a room and acknowledges; ``publish`` emits ``message`` to the
room on every instance through Redis. Run: ``python socketio_server.py PORT``.
"""

import os
import sys

import socketio
import uvicorn

manager = socketio.AsyncRedisManager(
    os.environ["REDIS_URL"], channel=os.environ.get("CHANNEL", "socketio")
)
sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager)


@sio.on("join")
async def join(sid, room):
    await sio.enter_room(sid, room)
    return "ok"


@sio.on("publish")
async def publish(sid, data):
    await sio.emit("message", data, room=data["room"])


app = socketio.ASGIApp(sio)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
