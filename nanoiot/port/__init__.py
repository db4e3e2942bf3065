"""The device port: the one small interface between transports (sessions) and device actors.

A session implements :class:`~nanoiot.port.session.DeviceSession` (the actor writes commands and answers through
it); what a session gets back from ``attach`` is a :class:`~nanoiot.port.link.DeviceLink`, through which it reports
what the device did. Neither side imports the other: transports import this package, actors implement the link.
"""
