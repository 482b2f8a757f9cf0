"""otaplane: an OTA firmware control plane that speaks the IoT Platform OTA OpenAPI."""

__version__ = "0.1.0"
