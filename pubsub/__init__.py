"""Moving events between gateway instances: Redis Pub/Sub, or in-process for one instance."""

from pubsub.base import Broker, BrokerUnavailable, create_broker

__all__ = ["Broker", "BrokerUnavailable", "create_broker"]
