"""The LangChain adapter's old address: it lives in worker.client.langchain, beside the client."""

from worker.client.langchain import MqttByteStore, MqttChatMessageHistory

__all__ = ["MqttByteStore", "MqttChatMessageHistory"]
