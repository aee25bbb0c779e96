"""Moving events between gateway instances: Redis Pub/Sub, or in-process for one instance."""

from pubsub.base import Broker, BrokerUnavailable, Sent
from pubsub.open import create_broker

__all__ = ["Broker", "BrokerUnavailable", "Sent", "create_broker"]
