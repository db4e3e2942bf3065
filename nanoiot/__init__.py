"""NanoIoT: a device-command (RPC) server compatible with ThingsBoard's device-RPC API."""

__version__ = "0.1.0"
