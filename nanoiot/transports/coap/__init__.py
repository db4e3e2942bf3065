"""The CoAP device transport (RFC 7252, Observe RFC 7641, block-wise RFC 7959) on a Twisted DatagramProtocol.

Layers, bottom up: ``codec`` (bytes <-> coapthon message objects, one declared error), ``messages`` (message ids,
dedup, CON retransmission, the housekeeping sweep), ``observe`` (observers and their 24-bit numbers), ``blockwise``
(Block1 reassembly, Block2 representations) and ``server`` (``CoapServer`` and the ``CoapSession`` a device actor
talks to).
"""
