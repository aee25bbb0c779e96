"""What routes, frames and connections are handed: the started parts, typed.

``Gateway`` builds and starts them and makes one :class:`Services`; the app puts
it on ``app.state.services`` and every route reaches it through
``chat_gateway.api.caller.gateway_of`` (also ``services_of``).
"""

from __future__ import annotations

from dataclasses import dataclass

from chat_gateway.access.auth import Authenticator
from chat_gateway.access.limits import ConnectionLimits
from chat_gateway.access.ratelimit import Rates
from chat_gateway.access.shutdown import Shutdown
from chat_gateway.config import Settings
from chat_gateway.delivery.chat import Chat
from chat_gateway.delivery.commands import Control
from chat_gateway.delivery.hub import Hub
from chat_gateway.delivery.moderation import Moderation
from chat_gateway.delivery.output import Output
from chat_gateway.delivery.presence import Presence
from chat_gateway.delivery.publish_hook import PublishHook
from chat_gateway.delivery.publisher import Publisher
from chat_gateway.metrics import Metrics
from chat_gateway.ops.figures import Figures
from chat_gateway.ops.readiness import Readiness
from chat_gateway.storage import HistoryCache, Store
from chat_gateway.webhooks import Webhooks


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    auth: Authenticator
    store: Store
    history: HistoryCache  # reads of history and latest seqs, through the cache
    hub: Hub
    publisher: Publisher  # posts and ephemeral events
    chat: Chat  # edits, deletes, typing, read receipts
    publish_hook: PublishHook  # the backend's say on users' posts and edits (a no-op when unset)
    moderation: Moderation  # bans, mutes and slow mode: the checks every path asks
    presence: Presence
    control: Control  # server API commands to every instance
    rates: Rates  # rate.check(action, identity), 429 when refused
    figures: Figures  # live figures, this instance's and the cluster's
    readiness: Readiness
    webhooks: Webhooks | None  # None: WEBHOOK_URLS is not set
    limits: ConnectionLimits
    output: Output  # direct WebSocket output (chat_gateway.delivery.output)
    metrics: Metrics
    shutdown: Shutdown  # refuses new work once the instance shuts down
