"""Moving events between gateway instances: Redis Pub/Sub, or in-process for one instance."""

from chat_gateway.pubsub.base import Broker, BrokerUnavailable, Sent
from chat_gateway.pubsub.open import create_broker

__all__ = ["Broker", "BrokerUnavailable", "Sent", "create_broker"]
