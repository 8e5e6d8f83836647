"""How a device's split-training loop reaches the training server: `link.request(frame)
-> reply frame`. Two links, one interface:

    RetryingLink  over MQTT (a started edgeqtl.transport.RequestClient): each try waits
                  `timeout` s; a step is sent again, with the same request id and step, until
                  a reply comes, so a server restart or a broker outage is waited out (the
                  server answers a repeat from its record, never applying a step twice)
    LocalLink     straight to a TrainingService in this process (tests, benchmarks): the
                  frame is encoded and decoded on the way, as the wire would
"""
from __future__ import annotations

from edgeqtl.wire import Frame, decode_frame, encode_frame


class RetryingLink:
    def __init__(self, transport, timeout: float = 30.0, retries: int = 1000):
        """retries: tries after the first before a step gives up (the default, 1000 tries
        of 30 s, rides out about eight hours of outage)."""
        self.transport = transport
        self.timeout = timeout
        self.retries = retries

    def request(self, frame: Frame) -> Frame:
        return self.transport.request(frame, timeout=self.timeout, retries=self.retries)


class LocalLink:
    def __init__(self, service):
        self.service = service

    def request(self, frame: Frame) -> Frame:
        return self.service.handle(decode_frame(encode_frame(frame)))
