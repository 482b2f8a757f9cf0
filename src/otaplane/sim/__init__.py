"""`otaplane sim`: simulated devices on the device channel (mqtt: the client, device: OTA behaviour,
fleet: registration and running N devices, stats: counters)."""
