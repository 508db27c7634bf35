"""stampline: secure manufacturing and provisioning of IoT devices."""

__version__ = "0.1.0"
