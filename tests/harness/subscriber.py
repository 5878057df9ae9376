"""A real Centrifugo client (centrifuge-python over WebSocket) running its asyncio loop in a
background thread, recording every publication and connection event it sees, so synchronous
tests can assert on what a browser would have received."""

import asyncio
import base64
import threading
import time

from centrifuge import (Client, ClientEventHandler, PublicationContext, ServerPublicationContext,
                        ServerSubscribedContext, ServerUnsubscribedContext, SubscriptionEventHandler)

from .common import wait_until


class Event:
    def __init__(self, kind, channel, data=None, offset=None, tags=None, info=None):
        self.kind, self.channel, self.data, self.offset, self.tags, self.info = kind, channel, data, offset, tags, info
        self.at = time.monotonic()

    def __repr__(self):
        return f"Event({self.kind}, {self.channel}, {self.data!r})"


class Subscriber:
    """Connects as `user` and subscribes to `channels`; `events` lists what arrived, in order."""

    def __init__(self, centrifugo, user="subscriber", channels=(), binary=False):
        self.centrifugo, self.user, self.channels, self.binary = centrifugo, user, list(channels), binary
        self.events = []
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.client = None
        self.subscribed = set()
        self.raw_frames = []

    def _record(self, event):
        with self.lock:
            self.events.append(event)

    def _decode(self, data):
        return data

    def start(self, timeout=15):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._connect(), self.loop).result(timeout)
        wait_until(lambda: set(self.channels) <= self.subscribed, timeout, what=f"subscriptions {self.channels}")
        return self

    async def _connect(self):
        outer = self

        class ClientEvents(ClientEventHandler):
            async def on_disconnected(self, ctx):
                outer._record(Event("disconnected", None, data={"code": ctx.code, "reason": ctx.reason}))

            async def on_connecting(self, ctx):
                outer._record(Event("connecting", None, data={"code": ctx.code, "reason": ctx.reason}))

            async def on_connected(self, ctx):
                outer._record(Event("connected", None, data={"client": ctx.client}))

            async def on_subscribed(self, ctx: ServerSubscribedContext):
                outer._record(Event("server_subscribed", ctx.channel, data=ctx.data))

            async def on_unsubscribed(self, ctx: ServerUnsubscribedContext):
                outer._record(Event("server_unsubscribed", ctx.channel))

            async def on_publication(self, ctx: ServerPublicationContext):
                pub = ctx.pub
                outer._record(Event("publication", ctx.channel, pub.data, pub.offset, pub.tags, info=pub.info))

        self.client = Client(self.centrifugo.ws_url, events=ClientEvents(), token=self.centrifugo.token(self.user),
                             proxy=None, use_protobuf=self.binary)
        if not self.binary:
            self._record_raw_frames()
        for channel in self.channels:
            self._new_subscription(channel)
        await self.client.connect()
        for channel in self.channels:
            await self.client.get_subscription(channel).subscribe()

    def _new_subscription(self, channel):
        outer = self

        class SubEvents(SubscriptionEventHandler):
            async def on_subscribed(self, ctx):
                outer.subscribed.add(channel)

            async def on_unsubscribed(self, ctx):
                outer.subscribed.discard(channel)
                outer._record(Event("unsubscribed", channel, data={"code": ctx.code, "reason": ctx.reason}))

            async def on_publication(self, ctx: PublicationContext):
                pub = ctx.pub
                outer._record(Event("publication", channel, pub.data, pub.offset, pub.tags, info=pub.info))

        return self.client.new_subscription(channel, events=SubEvents())

    def _record_raw_frames(self):
        """Keeps every JSON frame as Centrifugo sent it (the client decodes data into Python
        objects, which would hide how each number and string was written)."""
        codec = self.client._codec
        decode = codec.decode_replies

        def recording(data):
            with self.lock:
                self.raw_frames.extend(line for line in data.strip().split("\n") if line)
            return decode(data)

        codec.decode_replies = recording

    def raw_publication_frames(self):
        with self.lock:
            return [f for f in self.raw_frames if '"pub":' in f]

    def publications(self, channel=None):
        with self.lock:
            return [e for e in self.events if e.kind == "publication" and (channel is None or e.channel == channel)]

    def of_kind(self, kind):
        with self.lock:
            return [e for e in self.events if e.kind == kind]

    def wait_for_publications(self, count, channel=None, timeout=20):
        wait_until(lambda: len(self.publications(channel)) >= count, timeout,
                   what=f"{count} publications on {channel or 'any channel'} (have {len(self.publications(channel))})")
        return self.publications(channel)

    def stop(self):
        if self.client is not None:
            try:
                asyncio.run_coroutine_threadsafe(self.client.disconnect(), self.loop).result(5)
            except Exception:
                pass

        async def cancel_the_rest():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_the_rest(), self.loop).result(5)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
