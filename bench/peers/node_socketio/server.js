// Socket.IO 4.8 over Redis (@socket.io/redis-adapter 8.3): the chat room as its docs show it.
//
// `join` enters a room and acknowledges; `publish` emits `message` to the room on
// every instance through Redis. Run: `node server.js PORT` with REDIS_URL (and
// CHANNEL, the adapter's key prefix) in the environment.
"use strict";

const { createServer } = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

async function main() {
  const port = Number(process.argv[2]);
  const pubClient = createClient({ url: process.env.REDIS_URL });
  const subClient = pubClient.duplicate();
  await Promise.all([pubClient.connect(), subClient.connect()]);
  const httpServer = createServer();
  const io = new Server(httpServer, {
    adapter: createAdapter(pubClient, subClient, { key: process.env.CHANNEL || "socket.io" }),
  });
  io.on("connection", (socket) => {
    socket.on("join", (room, ack) => {
      socket.join(room);
      if (typeof ack === "function") ack("ok");
    });
    socket.on("publish", (data) => {
      io.to(data.room).emit("message", data);
    });
  });
  const stop = () => {
    io.close();
    Promise.allSettled([pubClient.quit(), subClient.quit()]).then(() => process.exit(0));
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
  httpServer.listen(port, "127.0.0.1");
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
