"""ThingsBoard's HTTP device API: long-poll for commands, answer them, call the server (``device_api``)."""

from nanoiot.transports.http.device_api import DeviceApiResource, HttpCallSession, HttpPollSession

__all__ = ["DeviceApiResource", "HttpCallSession", "HttpPollSession"]
